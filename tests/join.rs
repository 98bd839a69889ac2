//! Joining two clusters with meshctl, as an operator does it: keys, the two `[[peers]]` stanzas
//! (`meshctl stanza`), each loaded by meshd's own config loader on the other side, and the key's
//! Secret (`meshctl secret`): a 0600 file of valid YAML holding the key, which never reaches the
//! terminal; `meshctl check-config` on meshd.toml or an overlay's ConfigMap. Bad input exits 2
//! naming the flag or the file and field.

mod support;

use base64::Engine;
use meshd::config::{Config, ConfigArgs, ConfigFile};
use meshd::keys::PrivateKey;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::{meshctl, text};

/// Runs meshctl in `dir` with `args`.
fn run(dir: &Path, args: &[&str]) -> Output {
    meshctl().current_dir(dir).args(args).output().unwrap()
}

fn ok_stdout(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A fresh key file from `meshctl genkey`, and the key.
fn genkey(dir: &Path, name: &str) -> (PathBuf, PrivateKey) {
    let path = dir.join(name);
    std::fs::write(&path, ok_stdout(&run(dir, &["genkey"]))).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key = PrivateKey::from_file(&path).unwrap();
    (path, key)
}

/// Neither stream of `out` shows the private key, in base64 or as the Secret's encoding of it.
fn assert_key_not_shown(out: &Output, key: &PrivateKey) {
    let plain = key.to_base64();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{}\n", plain.as_str()));
    for (stream, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let shown = String::from_utf8_lossy(bytes);
        assert!(
            !shown.contains(plain.as_str()) && !shown.contains(&encoded),
            "the private key appeared on {stream}"
        );
    }
}

/// This cluster's own part of meshd.toml, as in deploy/overlays (the key at `key`).
fn own_config(cluster: &str, key: &Path, local: &str, tunnel: &str) -> String {
    format!(
        "cluster = \"{cluster}\"\nprivate_key_file = \"{}\"\nlocal_cidrs = [{local}]\ntunnel_address = \"{tunnel}\"\n",
        key.display()
    )
}

fn load(path: &Path, text: &str) -> Config {
    let file = ConfigFile::parse(path, text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    Config::from_parts(file, &ConfigArgs::default()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn each_clusters_stanza_loads_in_the_other_clusters_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (m1_key_path, m1_key) = genkey(d, "m1.key");
    let (m2_key_path, m2_key) = genkey(d, "m2.key");

    // M1 is reachable and asks M2 (behind NAT) for keepalives; M2 cannot be reached.
    let m1 = run(
        d,
        &[
            "stanza",
            "--cluster",
            "m1",
            "--private-key-file",
            "m1.key",
            "--endpoint",
            "192.0.2.1:51820",
            "--local-cidr",
            "10.244.0.0/16,10.96.0.0/16",
            "--tunnel-address",
            "100.64.0.1/24",
            "--persistent-keepalive",
            "25",
        ],
    );
    assert_key_not_shown(&m1, &m1_key);
    let m1_stanza = ok_stdout(&m1);
    let m2 = run(
        d,
        &[
            "stanza",
            "--cluster",
            "m2",
            "--private-key-file",
            "m2.key",
            "--no-endpoint",
            "--local-cidr",
            "10.245.0.0/16",
            "--local-cidr",
            "10.97.0.0/16",
            "--tunnel-address",
            "100.64.0.2/24",
        ],
    );
    assert_key_not_shown(&m2, &m2_key);
    let m2_stanza = ok_stdout(&m2);

    let m2_path = d.join("m2.toml");
    let m2_config = format!(
        "{}\n{m1_stanza}",
        own_config(
            "m2",
            &m2_key_path,
            "\"10.245.0.0/16\", \"10.97.0.0/16\"",
            "100.64.0.2/24"
        )
    );
    let loaded = load(&m2_path, &m2_config);
    assert_eq!(loaded.peers.len(), 1);
    let peer = &loaded.peers[0];
    assert_eq!(peer.name, "m1");
    assert_eq!(peer.public_key, m1_key.public_key());
    assert_eq!(peer.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
    let expected: Vec<ipnet::IpNet> = ["10.244.0.0/16", "10.96.0.0/16", "100.64.0.1/32"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(peer.allowed_cidrs, expected);
    assert_eq!(peer.tunnel_address, Some("100.64.0.1".parse().unwrap()));
    assert_eq!(peer.persistent_keepalive, Some(25));

    let m1_config = format!(
        "{}\n{m2_stanza}",
        own_config(
            "m1",
            &m1_key_path,
            "\"10.244.0.0/16\", \"10.96.0.0/16\"",
            "100.64.0.1/24"
        )
    );
    let loaded = load(&d.join("m1.toml"), &m1_config);
    let peer = &loaded.peers[0];
    assert_eq!(peer.name, "m2");
    assert_eq!(peer.public_key, m2_key.public_key());
    assert_eq!(
        peer.endpoint, None,
        "M2 is behind NAT: M1 learns its address"
    );
    assert_eq!(peer.tunnel_address, Some("100.64.0.2".parse().unwrap()));
    assert_eq!(peer.persistent_keepalive, None);
    let notes = String::from_utf8_lossy(&m2.stderr);
    assert!(notes.contains("meshctl: note: no endpoint"), "{notes}");
}

#[test]
fn the_stanza_can_come_from_the_clusters_own_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (m1_key_path, m1_key) = genkey(d, "m1.key");
    let config = d.join("meshd.toml");
    std::fs::write(
        &config,
        own_config(
            "m1",
            &m1_key_path,
            "\"10.244.0.0/16\", \"10.96.0.0/16\"",
            "100.64.0.1/24",
        ),
    )
    .unwrap();
    let from_file = run(
        d,
        &[
            "stanza",
            "--config",
            "meshd.toml",
            "--endpoint",
            "203.0.113.10:51820",
        ],
    );
    assert_key_not_shown(&from_file, &m1_key);
    let from_flags = run(
        d,
        &[
            "stanza",
            "--cluster=m1",
            "--private-key-file=m1.key",
            "--local-cidr=10.244.0.0/16,10.96.0.0/16",
            "--tunnel-address=100.64.0.1/24",
            "--endpoint=203.0.113.10:51820",
        ],
    );
    assert_eq!(ok_stdout(&from_file), ok_stdout(&from_flags));
    assert!(from_file.stderr.is_empty(), "{}", text(&from_file));
}

/// The Secret manifest, parsed by PyYAML (as deploy/check_policy.py reads manifests), as JSON.
fn parse_yaml(path: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .expect(
            "python3 is needed to parse YAML: apt-get install python3-yaml (scripts/deps.sh does)",
        );
    assert!(
        out.status.success(),
        "PyYAML could not read {} (apt-get install python3-yaml if it is missing):\n{}",
        path.display(),
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_secret_is_a_0600_file_the_daemonset_can_mount() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, key) = genkey(d, "m1.key");
    let meshctl_path = env!("CARGO_BIN_EXE_meshctl");
    // Even with a permissive umask the file is the owner's alone.
    let out = Command::new("sh")
        .current_dir(d)
        .args([
            "-c",
            "umask 000 && exec \"$0\" secret --private-key-file m1.key --out m1-secret.yaml",
        ])
        .arg(meshctl_path)
        .output()
        .unwrap();
    assert_key_not_shown(&out, &key);
    let shown = ok_stdout(&out);
    assert!(shown.contains("kubectl apply -f m1-secret.yaml"), "{shown}");
    assert!(shown.contains(&key.public_key().to_base64()), "{shown}");
    let path = d.join("m1-secret.yaml");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    let secret = parse_yaml(&path);
    assert_eq!(secret["apiVersion"], "v1");
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["type"], "Opaque");
    // What deploy/base/daemonset.yaml mounts: Secret meshd-key, key private.key.
    assert_eq!(secret["metadata"]["name"], "meshd-key");
    assert_eq!(secret["metadata"]["namespace"], "meshd-system");
    let data = secret["data"]["private.key"]
        .as_str()
        .expect("data.private.key");
    let file = base64::engine::general_purpose::STANDARD
        .decode(data)
        .unwrap();
    let mounted = PrivateKey::from_base64(
        "the Secret's private.key",
        &String::from_utf8(file).unwrap(),
    )
    .unwrap();
    assert_eq!(mounted, key);
    let daemonset =
        std::fs::read_to_string(support::repo_root().join("deploy/base/daemonset.yaml")).unwrap();
    assert!(daemonset.contains("name: meshd-key") && daemonset.contains("key: private.key"));

    // Never overwritten by accident; --force replaces it, still 0600.
    let again = run(
        d,
        &[
            "secret",
            "--private-key-file",
            "m1.key",
            "--out",
            "m1-secret.yaml",
        ],
    );
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, other) = genkey(d, "m1-new.key");
    let forced = run(
        d,
        &[
            "secret",
            "--private-key-file",
            "m1-new.key",
            "--out",
            "m1-secret.yaml",
            "--force",
        ],
    );
    assert_key_not_shown(&forced, &other);
    ok_stdout(&forced);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o} after --force");
    let data = parse_yaml(&path)["data"]["private.key"]
        .as_str()
        .unwrap()
        .to_string();
    let file = base64::engine::general_purpose::STANDARD
        .decode(data)
        .unwrap();
    assert_eq!(
        PrivateKey::from_base64("replaced", &String::from_utf8(file).unwrap()).unwrap(),
        other
    );
}

#[test]
fn bad_input_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, key) = genkey(d, "m1.key");
    let stanza = |extra: &[&str]| {
        let mut args = vec![
            "stanza",
            "--cluster",
            "m1",
            "--private-key-file",
            "m1.key",
            "--local-cidr",
            "10.244.0.0/16",
        ];
        args.extend_from_slice(extra);
        run(d, &args)
    };
    let cases: Vec<(Output, &str)> = vec![
        (
            stanza(&[
                "--endpoint",
                "192.0.2.1:51820",
                "--local-cidr",
                "10.96.0.0/33",
            ]),
            "--local-cidr: '10.96.0.0/33' is not a CIDR; write an address and prefix length",
        ),
        (
            stanza(&["--endpoint", "192.0.2.1"]),
            "--endpoint: '192.0.2.1' is not a reachable host:port",
        ),
        (stanza(&[]), "--endpoint: missing"),
        (
            stanza(&["--no-endpoint", "--tunnel-address", "100.64.0.300/24"]),
            "--tunnel-address: '100.64.0.300/24' is not an address with prefix",
        ),
        (
            run(
                d,
                &[
                    "stanza",
                    "--cluster=m1",
                    "--private-key-file=absent.key",
                    "--local-cidr=10.244.0.0/16",
                    "--no-endpoint",
                ],
            ),
            "--private-key-file: cannot read the private key from absent.key",
        ),
        (
            run(d, &["stanza", "--config", "absent.toml", "--no-endpoint"]),
            "cannot read config file absent.toml",
        ),
        (
            run(
                d,
                &[
                    "secret",
                    "--private-key-file",
                    "absent.key",
                    "--out",
                    "s.yaml",
                ],
            ),
            "--private-key-file: cannot read the private key from absent.key",
        ),
        (
            run(d, &["secret", "--private-key-file", "m1.key", "--out", "-"]),
            "--out -: is standard output",
        ),
        (
            run(
                d,
                &[
                    "secret",
                    "--private-key-file",
                    "m1.key",
                    "--out",
                    "/dev/stdout",
                ],
            ),
            "--out /dev/stdout: is not a regular file",
        ),
        (
            run(
                d,
                &[
                    "secret",
                    "--private-key-file",
                    "m1.key",
                    "--out",
                    "s.yaml",
                    "--namespace",
                    "Meshd",
                ],
            ),
            "--namespace: 'Meshd' is not a Kubernetes namespace name",
        ),
    ];
    for (out, expected) in cases {
        assert_eq!(out.status.code(), Some(2), "{expected}:\n{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with(&format!("meshctl: error: {expected}")),
            "expected '{expected}':\n{err}"
        );
        assert!(out.stdout.is_empty(), "{}", text(&out));
        assert_key_not_shown(&out, &key);
    }
    assert!(!d.join("s.yaml").exists());
    // A key file that is not a key is described, never echoed.
    std::fs::write(d.join("bad.key"), "not-a-key\n").unwrap();
    std::fs::set_permissions(
        d.join("bad.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let out = run(
        d,
        &["secret", "--private-key-file", "bad.key", "--out", "s.yaml"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--private-key-file: private key file bad.key is not a WireGuard key"),
        "{err}"
    );
    assert!(!err.contains("not-a-key"), "{err}");
}

#[test]
fn check_config_accepts_what_meshd_accepts_and_names_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (key_path, key) = genkey(d, "m1.key");
    let overlay = support::repo_root().join("deploy/overlays/m1/meshd-config.yaml");
    let out = run(
        d,
        &[
            "check-config",
            overlay.to_str().unwrap(),
            "--private-key-file",
            "m1.key",
        ],
    );
    assert_key_not_shown(&out, &key);
    let shown = ok_stdout(&out);
    assert!(
        shown.contains("meshd-config.yaml: meshd accepts it\ncluster m1 ("),
        "{shown}"
    );

    let config = d.join("meshd.toml");
    std::fs::write(
        &config,
        format!(
            "{}[[peers]]\nname = \"m2\"\npublic_key = \"{}\"\nallowed_cidrs = [\"10.244.0.0/24\"]\n",
            own_config("m1", &key_path, "\"10.244.0.0/16\"", "100.64.0.1/24"),
            PrivateKey::generate().public_key()
        ),
    )
    .unwrap();
    let out = run(d, &["check-config", "meshd.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("meshctl: error: meshd.toml: local cluster 'm1' CIDR 10.244.0.0/16 overlaps peer 'm2' CIDR 10.244.0.0/24"),
        "{err}"
    );
}
