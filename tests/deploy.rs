//! The meshd.toml in each overlay's ConfigMap (deploy/overlays/*/meshd-config.yaml) is loaded by
//! meshd's own config loader, so a deployable cluster configuration cannot drift from what meshd
//! accepts. The rest of deploy/ is checked by deploy/validate.sh.

use ipnet::IpNet;
use meshd::config::{Config, ConfigArgs, ConfigFile};
use meshd::keys::PrivateKey;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where the DaemonSet mounts the Secret's key (deploy/base/daemonset.yaml).
const KEY_PATH: &str = "/etc/meshd/private.key";

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The block scalar under `key: |` in a YAML file, without its indentation.
fn block_scalar(path: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let header = format!("{key}: |");
    let mut lines = text.lines();
    let key_indent = lines
        .by_ref()
        .find(|line| line.trim() == header)
        .map(|line| line.len() - line.trim_start().len())
        .unwrap_or_else(|| panic!("{}: no `{header}` block", path.display()));
    let mut block = String::new();
    let mut indent = None;
    for line in lines {
        let this_indent = line.len() - line.trim_start().len();
        if line.trim().is_empty() {
            block.push('\n');
            continue;
        }
        if this_indent <= key_indent {
            break;
        }
        let indent = *indent.get_or_insert(this_indent);
        assert!(
            this_indent >= indent,
            "{}: line {line:?} is indented less than the first line of the `{key}` block",
            path.display()
        );
        block.push_str(&line[indent..]);
        block.push('\n');
    }
    block
}

/// Loads an overlay's meshd.toml with a throwaway private key in place of the mounted Secret.
fn load_overlay(overlay: &str) -> Config {
    let path = deploy_dir()
        .join("overlays")
        .join(overlay)
        .join("meshd-config.yaml");
    let toml = block_scalar(&path, "meshd.toml");
    let mut file = ConfigFile::parse(&path, &toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(
        file.private_key_file.as_deref(),
        Some(Path::new(KEY_PATH)),
        "{}: private_key_file must be where the DaemonSet mounts the Secret",
        path.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("private.key");
    std::fs::write(&key, PrivateKey::generate().to_base64().as_str()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    file.private_key_file = Some(key);
    Config::from_parts(file, &ConfigArgs::default())
        .unwrap_or_else(|e| panic!("{}: {e}\n{toml}", path.display()))
}

fn cidrs(texts: &[&str]) -> Vec<IpNet> {
    texts.iter().map(|t| t.parse().unwrap()).collect()
}

#[test]
fn m1_overlay_config_loads() {
    let m1 = load_overlay("m1");
    assert_eq!(m1.cluster, "m1");
    assert_eq!(m1.interface, "meshd0");
    assert_eq!(m1.listen_port, 51820);
    assert_eq!(m1.local_cidrs, cidrs(&["10.244.0.0/16", "10.96.0.0/16"]));
    assert_eq!(m1.tunnel_address, Some("100.64.0.1/24".parse().unwrap()));
    assert_eq!(m1.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
    assert_eq!(m1.dns_listen, Some("0.0.0.0:5353".parse().unwrap()));
    assert!(
        m1.kubernetes,
        "exports come from ServiceExports in a cluster"
    );
    assert_eq!(m1.exports_file, None);
    assert_eq!(m1.peers.len(), 1);
    let m2 = &m1.peers[0];
    assert_eq!(m2.name, "m2");
    assert_eq!(
        m2.allowed_cidrs,
        cidrs(&["10.245.0.0/16", "10.97.0.0/16", "100.64.0.2/32"])
    );
    assert_eq!(
        m2.endpoint, None,
        "M2 is behind NAT: M1 learns its endpoint"
    );
    assert_eq!(m2.persistent_keepalive, None);
}

#[test]
fn m2_overlay_config_loads() {
    let m2 = load_overlay("m2");
    assert_eq!(m2.cluster, "m2");
    assert_eq!(m2.interface, "meshd0");
    assert_eq!(m2.listen_port, 51820);
    assert_eq!(m2.local_cidrs, cidrs(&["10.245.0.0/16", "10.97.0.0/16"]));
    assert_eq!(m2.tunnel_address, Some("100.64.0.2/24".parse().unwrap()));
    assert_eq!(m2.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
    assert_eq!(m2.dns_listen, Some("0.0.0.0:5353".parse().unwrap()));
    assert!(
        m2.kubernetes,
        "exports come from ServiceExports in a cluster"
    );
    assert_eq!(m2.exports_file, None);
    assert_eq!(m2.peers.len(), 1);
    let m1 = &m2.peers[0];
    assert_eq!(m1.name, "m1");
    assert_eq!(
        m1.allowed_cidrs,
        cidrs(&["10.244.0.0/16", "10.96.0.0/16", "100.64.0.1/32"])
    );
    assert_eq!(
        m1.endpoint,
        Some("192.0.2.1:51820".parse::<SocketAddr>().unwrap())
    );
    assert_eq!(m1.persistent_keepalive, Some(25));
}

#[test]
fn overlays_mirror_each_other() {
    let m1 = load_overlay("m1");
    let m2 = load_overlay("m2");
    for (here, there) in [(&m1, &m2), (&m2, &m1)] {
        let peer = &here.peers[0];
        assert_eq!(peer.name, there.cluster, "{}: peer name", here.cluster);
        let tunnel = there.tunnel_address.expect("tunnel_address");
        let mut expected = there.local_cidrs.clone();
        expected.push(IpNet::new(tunnel.addr(), 32).unwrap());
        assert_eq!(
            peer.allowed_cidrs, expected,
            "{}'s peer {} must allow exactly {}'s local CIDRs and tunnel address",
            here.cluster, peer.name, there.cluster
        );
    }
    assert_ne!(m1.peers[0].public_key, m2.peers[0].public_key);
}

#[test]
fn daemonset_mounts_what_the_config_names() {
    let path = deploy_dir().join("base/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    for needle in [
        r#"command: ["meshd", "--config", "/etc/meshd/meshd.toml"]"#,
        "mountPath: /etc/meshd",
        "path: meshd.toml",
        "path: private.key",
        "containerPort: 51820",
        "containerPort: 9090",
        "containerPort: 5353",
    ] {
        assert!(
            text.contains(needle),
            "{}: `{needle}` not found; the overlays' meshd.toml relies on it",
            path.display()
        );
    }
}
