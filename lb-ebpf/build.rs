use which::which;

/// Building this crate depends on the `bpf-linker` binary, which cargo cannot express; rebuild
/// when the linker changes so a new linker never pairs with stale output.
///
/// Linker flags go here because aya-build sets the kernel crate's RUSTFLAGS itself.
/// `--disable-expand-memcpy-in-order`: by default bpf-linker has LLVM keep memory intrinsics
/// for a late in-order expansion, which expands memcpy but leaves every memset (a struct's
/// `Default`, a zeroed `bpf_fib_lookup`) as a call to compiler-builtins' byte-at-a-time loop:
/// 48 iterations to clear the parsed packet. Without it LLVM writes them as plain stores
/// (BPF_PROG_TEST_RUN: established NAT flow 334 -> 280 ns, passed packet 113 -> 91 ns).
/// `+allows-misaligned-mem-access` (LLVM 22): packet fields, which sit at any offset, are read
/// and written a word at a time instead of byte by byte. The verifier rejects misaligned stack
/// accesses, so byte structures live in the per-CPU scratch map (see `SCRATCH` in maps.rs).
/// (rustc passes `--cpu generic` itself, so `--cpu v3` here is a duplicate argument bpf-linker
/// rejects; `+alu32` alone made most LB fixtures fail, packets dropped and counted nowhere, and
/// is left off.)
fn main() {
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker is not on PATH; run `cargo xtask setup` to install it"
        ),
    }
}
