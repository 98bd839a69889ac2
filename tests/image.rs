//! The container image (deploy/Dockerfile, built by scripts/image.sh, as scripts/test.sh does
//! before the tests): what is in it, and the lab's gateways run from it with exactly what the
//! rendered DaemonSet gives meshd's pod (scripts/lab.sh --from-image).

mod support;

use std::process::Command;
use support::*;

/// The image the suite builds: `scripts/image.sh --offline --arch amd64`.
fn image() -> String {
    format!("meshd:{}-amd64", env!("CARGO_PKG_VERSION"))
}

/// Runs podman as scripts/image.sh does (runc, no default ulimits).
fn podman(args: &[&str]) -> std::process::Output {
    let conf = std::env::temp_dir().join("meshd-test-containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n",
    )
    .unwrap();
    Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", &conf)
        .output()
        .expect("podman (scripts/test.sh installs it)")
}

/// True when the suite's image is there; otherwise the test is skipped (and fails under
/// MESHD_NO_SKIP).
fn image_or_skip(test: &str) -> bool {
    root_or_skip(test)
        && (podman(&["image", "exists", &image()]).status.success()
            || skip(
                test,
                "no meshd image: build it with scripts/image.sh --offline --arch amd64",
            ))
}

#[test]
fn the_image_holds_two_static_binaries_nft_and_nothing_writable() {
    if !image_or_skip("the_image_holds_two_static_binaries_nft_and_nothing_writable") {
        return;
    }
    let created = podman(&["create", &image()]);
    assert!(created.status.success(), "{}", text(&created));
    let id = String::from_utf8(created.stdout)
        .unwrap()
        .trim()
        .to_string();
    let exported = podman(&["export", &id]);
    let _ = podman(&["rm", &id]);
    assert!(exported.status.success(), "{}", text(&exported));
    let mut archive = tar_entries(&exported.stdout);
    archive.sort();
    assert_eq!(
        archive,
        [
            "lib/",
            "lib/x86_64-linux-gnu/",
            "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "lib/x86_64-linux-gnu/libbsd.so.0",
            "lib/x86_64-linux-gnu/libc.so.6",
            "lib/x86_64-linux-gnu/libedit.so.2",
            "lib/x86_64-linux-gnu/libgmp.so.10",
            "lib/x86_64-linux-gnu/libjansson.so.4",
            "lib/x86_64-linux-gnu/libmd.so.0",
            "lib/x86_64-linux-gnu/libmnl.so.0",
            "lib/x86_64-linux-gnu/libnftables.so.1",
            "lib/x86_64-linux-gnu/libnftnl.so.11",
            "lib/x86_64-linux-gnu/libtinfo.so.6",
            "lib/x86_64-linux-gnu/libxtables.so.12",
            "lib64/",
            "lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "run/",
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/meshctl",
            "usr/local/bin/meshd",
            "usr/sbin/",
            "usr/sbin/nft",
            "var/",
            "var/run -> /run",
        ],
        "the image's files"
    );
    // nft runs from the image's own libraries (the masquerade bypass needs it).
    let nft = podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        &image(),
        "nft",
        "--version",
    ]);
    assert!(
        String::from_utf8_lossy(&nft.stdout).starts_with("nftables v"),
        "{}",
        text(&nft)
    );
    let labels = podman(&[
        "inspect",
        "--format",
        "{{json .Config.Labels}} {{.Config.User}} {{json .Config.Cmd}} {{.Architecture}}",
        &image(),
    ]);
    let labels = String::from_utf8_lossy(&labels.stdout).to_string();
    for expected in [
        "\"org.opencontainers.image.version\":\"0.1.0\"",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.source",
        " 0:0 ",
        "[\"meshd\",\"--config\",\"/etc/meshd/meshd.toml\"]",
        " amd64",
    ] {
        assert!(labels.contains(expected), "{expected} not in {labels}");
    }
}

/// The names in a tar archive (symlinks as "name -> target"), without the runtime's own
/// mount points (podman export adds /dev, /proc, /sys, /etc and /run/.containerenv entries).
fn tar_entries(tar: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() {
        let header = &tar[at..at + 512];
        if header.iter().all(|b| *b == 0) {
            break;
        }
        let field = |range: std::ops::Range<usize>| {
            let raw = &header[range];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).to_string()
        };
        let prefix = field(345..500);
        let name = field(0..100);
        let name = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let size = u64::from_str_radix(field(124..136).trim(), 8).unwrap_or(0) as usize;
        let kind = header[156];
        let name = name.trim_start_matches("./").to_string();
        let runtime = ["dev", "proc", "sys", "etc"]
            .iter()
            .any(|d| name == format!("{d}/") || name.starts_with(&format!("{d}/")))
            || name.starts_with("run/.");
        if !runtime && !name.is_empty() {
            names.push(if kind == b'2' {
                format!("{name} -> {}", field(157..257))
            } else {
                name
            });
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    names
}

/// The lab with both gateways running from the image under the DaemonSet's pod settings: the
/// probes answer (lab.sh checks them), meshd holds only NET_ADMIN and cannot write its root,
/// traffic and clusterset.local DNS cross the tunnel, `wg show` and the image's `meshctl peers`
/// work.
#[test]
fn the_lab_runs_from_the_image_as_the_daemonset_runs_it() {
    if !image_or_skip("the_lab_runs_from_the_image_as_the_daemonset_runs_it") {
        return;
    }
    let image = image();
    let lab = Lab::up_with("ta", "meshd", "meshd", &["--from-image", &image]);
    let name = "tam1-meshd";
    let inspect = podman(&[
        "inspect",
        "--format",
        "{{.HostConfig.ReadonlyRootfs}} {{json .HostConfig.CapDrop}} {{json .HostConfig.CapAdd}} {{.State.Pid}}",
        name,
    ]);
    let inspect = String::from_utf8_lossy(&inspect.stdout).to_string();
    assert!(
        inspect.starts_with("true "),
        "root not read-only: {inspect}"
    );
    let pid = inspect.split_whitespace().last().unwrap().to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    // CAP_NET_ADMIN is bit 12, and nothing else.
    assert_eq!(effective, "0000000000001000", "meshd's capabilities");
    assert!(status.contains("NoNewPrivs:\t1"), "no_new_privs not set");

    assert!(lab.ping("m1pod", M2_POD), "m1pod cannot reach m2pod");
    assert!(lab.ping("m2pod", M1_POD), "m2pod cannot reach m1pod");
    let answer = lab.exec_ok(
        "m1pod",
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=3",
            "@10.244.1.1",
            "hello.demo.svc.clusterset.local",
            "A",
        ],
    );
    assert_eq!(answer.trim(), "10.97.0.20", "DNS through port 53 -> 5353");
    let page = lab.exec_ok(
        "m1pod",
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://hello.demo.svc.clusterset.local/",
        ],
    );
    assert_eq!(page.trim(), "hello from m2");
    let wg = lab.exec_ok("m1gw", &["wg", "show", &lab.iface(1), "latest-handshakes"]);
    assert!(!wg.trim().ends_with("\t0"), "no handshake: {wg}");
    // Up within a few seconds (a handshake that just completed reads `handshaking` until the
    // peer's next packet arrives).
    let mut peers = String::new();
    for _ in 0..50 {
        let out = podman(&["exec", name, "meshctl", "peers"]);
        peers = text(&out);
        if out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("m2") && l.contains(" up "))
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("m2 not up in the image's meshctl peers after 10 s:\n{peers}");
}

/// kubectl as scripts/lab.sh finds it: on PATH, else the one deploy/validate.sh installs.
fn kubectl() -> Option<std::path::PathBuf> {
    let on_path = Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return Some("kubectl".into());
    }
    let home = std::env::var("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache")
        });
    let venv = home.join("meshd/deploy-venv/bin/kubectl");
    venv.exists().then_some(venv)
}

fn pod_to_podman(manifests: &str, args: &[&str]) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg(repo_root().join("scripts/pod-to-podman.py"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifests.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The podman arguments come from the rendered DaemonSet, and a pod setting the lab cannot
/// model stops it with the field named instead of being left out.
#[test]
fn the_containers_settings_are_read_from_the_rendered_daemonset() {
    let Some(kubectl) = kubectl() else {
        skip(
            "the_containers_settings_are_read_from_the_rendered_daemonset",
            "no kubectl: deploy/validate.sh installs it",
        );
        return;
    };
    let rendered = Command::new(kubectl)
        .args(["kustomize"])
        .arg(repo_root().join("deploy/overlays/m1"))
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{}", text(&rendered));
    let manifests = String::from_utf8(rendered.stdout).unwrap();
    let args = [
        "--netns",
        "n1",
        "--volume",
        "config=/c",
        "--volume",
        "run=/r",
    ];
    let out = pod_to_podman(&manifests, &args);
    assert!(out.status.success(), "{}", text(&out));
    let lines = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    for expected in [
        "--network=ns:/run/netns/n1",
        "--user=0:0",
        "--security-opt=no-new-privileges",
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop=ALL",
        "--cap-add=NET_ADMIN",
        "--volume=/c:/etc/meshd:ro",
        "--device=/dev/net/tun:/dev/net/tun",
        "--volume=/r:/run:rw",
        "--env=MESHD_LOG=info",
        "--entrypoint=meshd",
    ] {
        assert!(lines.contains(&expected), "{expected} not in {lines:?}");
    }
    let command = lines.split(|l| *l == "--").nth(1).unwrap();
    assert_eq!(command, ["--config", "/etc/meshd/meshd.toml"]);
    let probes = pod_to_podman(&manifests, &["--probes"]);
    assert_eq!(
        String::from_utf8_lossy(&probes.stdout),
        "liveness 9091 /healthz\nreadiness 9091 /readyz\n"
    );

    for (from, to, named) in [
        ("privileged: false", "privileged: true", "privileged"),
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: true\n          procMount: Unmasked",
            "procMount",
        ),
        ("hostNetwork: true", "hostNetwork: false", "hostNetwork"),
        (
            "mountPath: /run",
            "mountPath: /run\n          subPath: x",
            "subPath",
        ),
    ] {
        assert!(
            manifests.contains(from),
            "the rendered DaemonSet has no {from:?}"
        );
        let out = pod_to_podman(&manifests.replacen(from, to, 1), &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(named),
            "{from} -> {to}: {err}"
        );
    }
}
