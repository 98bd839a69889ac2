//! The binaries as a user runs them: key compatibility with `wg`, and configuration errors that
//! exit non-zero naming the input at fault.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use support::*;

fn run_with_stdin(mut cmd: Command, input: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn wg_available(test: &str) -> bool {
    Command::new("wg").arg("--version").output().is_ok()
        || support::skip(
            test,
            "`wg` (wireguard-tools) is not installed; scripts/test.sh installs it",
        )
}

#[test]
fn keys_are_compatible_with_wg_both_ways() {
    if !wg_available("keys_are_compatible_with_wg_both_ways") {
        return;
    }
    for _ in 0..5 {
        // meshctl genkey → wg pubkey == meshctl pubkey
        let private = stdout(&meshctl().arg("genkey").output().unwrap());
        assert_eq!(private.trim().len(), 44);
        let ours = stdout(&run_with_stdin(meshctl_cmd("pubkey"), &private));
        let theirs = stdout(&run_with_stdin(wg_cmd("pubkey"), &private));
        assert_eq!(ours, theirs);
        // wg genkey → meshctl pubkey == wg pubkey
        let private = stdout(&Command::new("wg").arg("genkey").output().unwrap());
        let ours = stdout(&run_with_stdin(meshctl_cmd("pubkey"), &private));
        let theirs = stdout(&run_with_stdin(wg_cmd("pubkey"), &private));
        assert_eq!(ours, theirs);
    }
}

fn meshctl_cmd(sub: &str) -> Command {
    let mut c = meshctl();
    c.arg(sub);
    c
}

fn wg_cmd(sub: &str) -> Command {
    let mut c = Command::new("wg");
    c.arg(sub);
    c
}

#[test]
fn pubkey_refuses_a_malformed_key() {
    let out = run_with_stdin(meshctl_cmd("pubkey"), "not a key\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the private key on standard input"), "{err}");
    assert!(!err.contains("not a key"), "the input was echoed: {err}");
}

fn meshd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn config_errors_exit_non_zero_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, stdout(&meshctl().arg("genkey").output().unwrap())).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cases = [
        ("private_key_file = \"/nonexistent\"\n", "/nonexistent"),
        ("listen_port = \"x\"\n", "listen_port"),
        ("local_cidrs = [\"10.244.0.0/33\"]\n", "local_cidrs[0]"),
        (
            "[[peers]]\nname = \"m2\"\npublic_key = \"bad\"\n",
            "peers[0] (m2).public_key",
        ),
    ];
    for (body, expected) in cases {
        let path = dir.path().join("meshd.toml");
        let body = if body.starts_with("private_key_file") {
            body.to_string()
        } else {
            format!("private_key_file = \"{}\"\n{body}", key.display())
        };
        std::fs::write(&path, body).unwrap();
        let out = meshd(&["--config", path.to_str().unwrap()]);
        assert!(!out.status.success(), "accepted: {expected}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "'{expected}' not named:\n{err}");
    }
    let out = meshd(&["--config", "/nonexistent/meshd.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/meshd.toml"));
}

#[test]
fn port_in_use_exits_non_zero_naming_the_port() {
    if !root_or_skip("port_in_use_exits_non_zero_naming_the_port") {
        return;
    }
    let ns = "tportuse";
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
    assert!(Command::new("ip")
        .args(["netns", "add", ns])
        .status()
        .unwrap()
        .success());
    let holder = in_netns(ns, || std::net::UdpSocket::bind("[::]:51999").unwrap());
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_meshd"))
        .args([
            "--interface",
            "tportuse0",
            "--listen-port",
            "51999",
            "--metrics-listen",
            "off",
        ])
        .output()
        .unwrap();
    drop(holder);
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listen port 51999/udp is already in use"),
        "{err}"
    );
}
