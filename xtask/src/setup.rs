//! `cargo xtask setup`: installs what is missing, and nothing else, saying what it does.
//!
//! - rust-src for the nightly toolchain that aya-build compiles the XDP program with;
//! - bpf-linker, built against the libLLVM inside that toolchain (no system LLVM needed);
//! - the Debian packages the lab and the tests use;
//! - the pinned JavaScript clients the tests run (polkadot.js, polkadot-api, chopsticks).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

/// The toolchain aya-build compiles the XDP program with (`rustup run nightly cargo …`).
const EBPF_TOOLCHAIN: &str = "nightly";

/// Debian packages the lab and tests need, with the command each provides (checked first); a
/// package that provides no command is named by an absolute path of a file it installs.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("util-linux", "nsenter"),
    ("wrk", "wrk"),
    ("curl", "curl"),
    ("nodejs", "node"),
    ("npm", "npm"),
    // `cargo xtask bench l4` and `bench gateway`: the nodes' web server, the reference
    // balancers and TLS proxy.
    ("nginx", "nginx"),
    ("nftables", "nft"),
    ("haproxy", "haproxy"),
    // The shared state store: the members the tests start, etcdctl to inspect them, and
    // protoc, which the etcd-client crate's build script needs.
    ("etcd-server", "etcd"),
    // The HA lab (`cargo xtask run --ha`) and its tests: VRRP moves the floating addresses.
    ("keepalived", "keepalived"),
    ("etcd-client", "etcdctl"),
    ("protobuf-compiler", "protoc"),
    // protoc's own imports (google/protobuf/*.proto), only recommended by protobuf-compiler,
    // which is installed without its recommends.
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    // The shipped alert rules and dashboard: promtool checks and unit-tests the rules, and a
    // real Prometheus scrapes a lab pair with them (tests/tests/monitoring.rs).
    ("prometheus", "promtool"),
];

pub fn run() -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("this project needs Linux (XDP, network namespaces); this host is not Linux");
    }
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_debian_packages()?;
    ensure_js_client()?;
    Ok(())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root; run this command as root (e.g. with sudo -E)");
    }
    Ok(())
}

/// Runs a command with inherited output, failing with `what` when it fails.
pub fn run_step(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("{what}: could not start {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn output_of(command: &mut Command) -> Option<String> {
    let output = command.stderr(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
    .with_context(|| {
        format!(
            "the {EBPF_TOOLCHAIN} toolchain, which builds the XDP program, is not installed \
             (`rustup toolchain list`); install it with `rustup toolchain install {EBPF_TOOLCHAIN}`"
        )
    })?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        println!("setup: rust-src for {EBPF_TOOLCHAIN}: present");
        return Ok(());
    }
    println!("setup: rust-src for {EBPF_TOOLCHAIN}: installing");
    run_step(
        Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]),
        "installing rust-src",
    )
}

/// LLVM major version of the toolchain that compiles the XDP program, from `rustc -vV`.
fn toolchain_llvm_major() -> anyhow::Result<u32> {
    let version = output_of(Command::new("rustup").args(["run", EBPF_TOOLCHAIN, "rustc", "-vV"]))
        .context("running rustc -vV for the XDP toolchain")?;
    llvm_major_from(&version, "LLVM version: ").context("rustc -vV printed no LLVM version")
}

/// Parses the major version after `prefix` on some line of `text` ("LLVM version: 22.1.4").
fn llvm_major_from(text: &str, prefix: &str) -> Option<u32> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(prefix))
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.trim().parse().ok())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let wanted = toolchain_llvm_major()?;
    match installed_bpf_linker_llvm() {
        LinkerLlvm::Missing => println!(
            "setup: bpf-linker: missing; building it against the toolchain's LLVM {wanted} \
             (about a minute)"
        ),
        LinkerLlvm::Broken => println!(
            "setup: bpf-linker: its libLLVM is gone (toolchain updated?); rebuilding against LLVM {wanted}"
        ),
        LinkerLlvm::Static => {
            println!("setup: bpf-linker (statically linked LLVM): present");
            return Ok(());
        }
        LinkerLlvm::Major(have) if have >= wanted => {
            println!("setup: bpf-linker (LLVM {have}): present");
            return Ok(());
        }
        LinkerLlvm::Major(have) => println!(
            "setup: bpf-linker uses LLVM {have}, older than the toolchain's LLVM {wanted}: rebuilding"
        ),
    }
    build_bpf_linker(wanted)
}

/// What the installed bpf-linker links against. It prints no LLVM version of its own, so the
/// dynamic libLLVM it loads tells.
enum LinkerLlvm {
    Missing,
    Broken,
    Static,
    Major(u32),
}

fn installed_bpf_linker_llvm() -> LinkerLlvm {
    let Some(path) = find_command("bpf-linker") else {
        return LinkerLlvm::Missing;
    };
    let Some(libraries) = output_of(Command::new("ldd").arg(&path)) else {
        return LinkerLlvm::Static;
    };
    let Some(line) = libraries.lines().find(|line| line.contains("libLLVM")) else {
        return LinkerLlvm::Static;
    };
    if line.contains("not found") {
        return LinkerLlvm::Broken;
    }
    line.split("libLLVM.so.")
        .nth(1)
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.parse().ok())
        .or_else(|| {
            line.split("libLLVM-")
                .nth(1)
                .and_then(|version| version.split(['-', '.']).next())
                .and_then(|major| major.parse().ok())
        })
        .map_or(LinkerLlvm::Static, LinkerLlvm::Major)
}

/// Builds bpf-linker against the libLLVM shipped inside the rust toolchain: a folder whose lib/
/// links `libLLVM.so` and its versioned name to the toolchain's library stands in for an LLVM
/// install, and an rpath keeps the binary working once that folder is gone.
fn build_bpf_linker(llvm_major: u32) -> anyhow::Result<()> {
    let sysroot = output_of(Command::new("rustup").args([
        "run",
        EBPF_TOOLCHAIN,
        "rustc",
        "--print",
        "sysroot",
    ]))
    .context("finding the toolchain's sysroot")?;
    let toolchain_lib = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&toolchain_lib)
        .with_context(|| format!("reading {}", toolchain_lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with(&format!("libLLVM.so.{llvm_major}")))
        .with_context(|| {
            format!(
                "no libLLVM.so.{llvm_major}* in {}; the toolchain ships no LLVM library to link \
                 bpf-linker against",
                toolchain_lib.display()
            )
        })?;
    let prefix = std::env::temp_dir().join(format!("lb-llvm-prefix-{}", std::process::id()));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(link);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(toolchain_lib.join(&libllvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let result = run_step(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", toolchain_lib.display()),
            ),
        "building bpf-linker",
    );
    let _ = std::fs::remove_dir_all(&prefix);
    result
}

fn ensure_debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, provided)| !is_installed(provided))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages: present");
        return Ok(());
    }
    require_root(&format!(
        "installing the Debian packages {}",
        missing.join(", ")
    ))?;
    println!("setup: Debian packages: installing {}", missing.join(" "));
    run_step(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    run_step(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

/// Whether `provided` (a command, or a file's absolute path) is on this machine.
fn is_installed(provided: &str) -> bool {
    if provided.starts_with('/') {
        Path::new(provided).is_file()
    } else {
        find_command(provided).is_some()
    }
}

fn find_command(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Installs the pinned JavaScript clients the tests drive (polkadot.js, polkadot-api,
/// chopsticks, the OpenAPI validator) from the lock file, again whenever the lock file is newer
/// than the install.
fn ensure_js_client() -> anyhow::Result<()> {
    let js_dir = workspace_root().join("tests/js");
    let lock = js_dir.join("package-lock.json");
    if !lock.is_file() {
        return Ok(());
    }
    // npm writes node_modules/.package-lock.json on every install.
    let installed = js_dir.join("node_modules/.package-lock.json");
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if let (Some(installed), Some(wanted)) = (modified(&installed), modified(&lock))
        && installed >= wanted
    {
        println!("setup: JavaScript test clients (tests/js): present");
        return Ok(());
    }
    println!("setup: JavaScript test clients (tests/js): npm ci");
    run_step(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&js_dir),
        "npm ci in tests/js",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_is_read_from_rustc_and_bpf_linker_output() {
        let rustc = "rustc 1.97.0-nightly\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major_from(rustc, "LLVM version: "), Some(22));
        assert_eq!(
            llvm_major_from("bpf-linker 0.13.0\n", "LLVM version: "),
            None
        );
    }
}
