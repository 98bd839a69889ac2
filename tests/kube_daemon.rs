//! The meshd binary with `--kubernetes`, against the in-process API server: the wiring from
//! KUBECONFIG to the watcher to the DNS responder, end to end. A ServiceExport appears → `dig`
//! against meshd answers its Service's IP and the export's status is written; a SIGHUP keeps the
//! watcher's catalog (the exports file is not consulted); the export goes → the name goes. Needs
//! root (meshd opens a TUN device) and skips with a message otherwise.

#[path = "support/apiserver.rs"]
mod apiserver;
mod support;

use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::root_or_skip;

/// Liveness only: a state that never comes fails the test after this long.
const DEADLINE: Duration = Duration::from_secs(30);

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn dig(port: u16, name: &str) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=1", "+tries=1"])
        .args([name, "A"])
        .output()
        .expect("dig (dnsutils) is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, log: &std::path::Path, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what} never happened; meshd's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn meshd_serves_dns_for_the_clusters_service_exports() {
    if !root_or_skip("meshd_serves_dns_for_the_clusters_service_exports") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(apiserver::ApiServer::start());
    server.apply_service(("demo", "web"), "10.96.0.10", "web-x1", "10.244.1.10");
    let export = json!({
        "apiVersion": server.mcs_api_version(), "kind": "ServiceExport",
        "metadata": {"namespace": "demo", "name": "web",
                     "creationTimestamp": "2026-03-01T00:00:00Z"},
    });
    server.apply(export);
    // The gateway is the node labelled meshd.io/gateway=true; at 127.0.0.1 it is this host.
    server.apply(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "m1-gateway", "labels": {"meshd.io/gateway": "true"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]},
    }));

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig);
    let dns_port = free_udp_port();
    let log = dir.path().join("meshd.log");
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_meshd"))
            .args(["--cluster", "m1", "--interface", "mkube0", "--mtu", "1420"])
            .args(["--listen-port", &free_udp_port().to_string()])
            .args(["--kubernetes", "true"])
            .args(["--dns-listen", &format!("127.0.0.1:{dns_port}")])
            .args(["--metrics-listen", "off", "--health-listen", "off"])
            // This host's own network namespace: no nftables table, no VXLAN end in it.
            .args(["--masquerade-bypass", "false", "--route-mode", "direct"])
            .arg("--admin-socket")
            .arg(dir.path().join("admin.sock"))
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let web = "web.demo.svc.clusterset.local";
    wait_for("web answered from the ServiceExport", &log, || {
        dig(dns_port, web).contains("10.96.0.10")
    });
    wait_for("the export's status written", &log, || {
        server
            .get("ServiceExport", "demo", "web")
            .and_then(|o| o["status"]["conditions"].as_array().cloned())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Valid" && c["status"] == "True")
            })
    });

    // SIGHUP re-reads the configuration; with kubernetes = true no exports file replaces the
    // watcher's catalog.
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(daemon.0.id() as i32, libc::SIGHUP) }, 0);
    wait_for("the SIGHUP handled", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("SIGHUP: configuration reloaded")
    });
    assert!(dig(dns_port, web).contains("10.96.0.10"));

    server.delete("ServiceExport", "demo", "web");
    wait_for("web withdrawn with its export", &log, || {
        dig(dns_port, web).contains("status: NXDOMAIN")
    });
    drop(daemon);
    drop(server);
}
