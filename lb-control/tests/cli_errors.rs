//! Bad input to `lb-control` gives one clear message and a failing exit status, never a panic.

use std::process::{Command, Output};

fn lb_control(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lb-control"))
        .args(args)
        .output()
        .expect("lb-control starts")
}

/// Asserts the command failed cleanly and its error mentions every one of `expected`.
fn assert_fails_saying(output: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, stderr:\n{stderr}"
    );
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        !stderr.contains("panicked"),
        "lb-control panicked:\n{stderr}"
    );
    for text in expected {
        assert!(
            stderr.contains(text),
            "{text:?} missing from stderr:\n{stderr}"
        );
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test loads XDP programs and needs root: run it as root or with `cargo xtask test`"
    );
}

#[test]
fn unknown_interface_is_named_in_the_error() {
    require_root();
    let output = lb_control(&["run", "--interface", "nosuchif0", "--instance", "cli-test"]);
    assert_fails_saying(
        &output,
        &[
            "interface \"nosuchif0\" does not exist in this network namespace",
            "ip link",
        ],
    );
}

#[test]
fn missing_bpffs_mount_point_is_explained() {
    require_root();
    let output = lb_control(&[
        "run",
        "--interface",
        "lo",
        "--instance",
        "cli-test",
        "--bpffs",
        "/nonexistent/bpf",
    ]);
    assert_fails_saying(
        &output,
        &[
            "/nonexistent/bpf: no such directory",
            "BPF filesystem",
            "--bpffs",
        ],
    );
}

#[test]
fn running_without_root_says_root_is_needed() {
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_lb-control"))
        .args(["run", "--interface", "lo", "--instance", "cli-test"])
        .output()
        .expect("setpriv (util-linux) runs lb-control as nobody");
    assert_fails_saying(&output, &["needs root", "CAP_BPF"]);
}

#[test]
fn invalid_flags_are_all_reported_with_their_field() {
    let output = lb_control(&[
        "run",
        "--interface",
        "an-interface-name-too-long",
        "--instance",
        "bad/name",
    ]);
    assert_fails_saying(
        &output,
        &[
            "command line: instance: \"bad/name\" is not a valid instance name",
            "dataplane.interfaces[0]: \"an-interface-name-too-long\" is not an interface name",
        ],
    );
}

#[test]
fn check_config_names_the_file_and_field() {
    let dir = std::env::temp_dir().join(format!("lb-control-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("lb.toml");
    std::fs::write(&file, "[dataplane]\nxdp_mode = \"turbo\"\n").expect("write config");
    let output = lb_control(&["check-config", file.to_str().expect("utf-8 path")]);
    assert_fails_saying(
        &output,
        &[
            file.to_str().expect("utf-8 path"),
            "xdp_mode",
            "unknown variant `turbo`",
        ],
    );

    std::fs::write(
        &file,
        "instance = \"edge\"\n[dataplane]\ninterfaces = [\"eth0\"]\n",
    )
    .expect("write config");
    let output = lb_control(&["check-config", file.to_str().expect("utf-8 path")]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The gateway's certificate files are read too, not first at start.
    let cert = dir.join("gateway.crt");
    std::fs::write(&cert, "not a certificate\n").expect("write cert");
    std::fs::write(
        &file,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:8443\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            dir.join("missing.key").display()
        ),
    )
    .expect("write config");
    let output = lb_control(&["check-config", file.to_str().expect("utf-8 path")]);
    assert_fails_saying(
        &output,
        &[
            file.to_str().expect("utf-8 path"),
            "gateway.tls_cert",
            cert.to_str().expect("utf-8 path"),
        ],
    );
    std::fs::remove_dir_all(&dir).expect("remove temp dir");
}

#[test]
fn stats_of_an_instance_that_never_ran_says_what_to_check() {
    require_root();
    let output = lb_control(&["stats", "--instance", "never-ran-instance"]);
    assert_fails_saying(
        &output,
        &[
            "never-ran-instance/PROTO_STATS",
            "is an lb-control instance of that name running",
        ],
    );
}
