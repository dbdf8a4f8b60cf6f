use which::which;

/// Building this crate depends on the `bpf-linker` binary, which cargo cannot express; rebuild
/// when the linker changes so a new linker never pairs with stale output.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker is not on PATH; run `cargo xtask setup` to install it"
        ),
    }
}
