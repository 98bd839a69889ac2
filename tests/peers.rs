//! `meshctl peers`, the admin API and the peer metrics end to end in the two-cluster lab: real
//! traffic, a peer that dies, a non-root caller, malformed requests. Needs root; skips otherwise.

mod support;

use meshd::admin::api::{PeerState, PeerView, PeersResponse};
use meshd::admin::client::AdminClient;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::*;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `meshctl peers --socket SOCKET ARGS...` inside m1's gateway namespace.
fn meshctl_peers(lab: &Lab, socket: &Path, args: &[&str]) -> Output {
    let mut cmd = vec![
        env!("CARGO_BIN_EXE_meshctl"),
        "peers",
        "--socket",
        socket.to_str().unwrap(),
    ];
    cmd.extend_from_slice(args);
    lab.exec("m1gw", &cmd)
}

/// The JSON output of `meshctl peers --output json` and its exit code.
fn peers_json(lab: &Lab, socket: &Path) -> (PeersResponse, Option<i32>) {
    let out = meshctl_peers(lab, socket, &["--output", "json"]);
    let parsed = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("meshctl peers --output json: {e}\n{}", text(&out)));
    (parsed, out.status.code())
}

fn m2(response: &PeersResponse) -> PeerView {
    assert_eq!(response.peers.len(), 1, "{response:?}");
    let peer = response.peers[0].clone();
    assert_eq!(peer.name, "m2");
    peer
}

/// One scrape of m1's `/metrics`, parsed by prometheus-parse.
fn scrape(lab: &Lab) -> prometheus_parse::Scrape {
    let response = lab.http_get("m1gw", "127.0.0.1:9090", "/metrics");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_else(|| panic!("not an HTTP response:\n{response}"));
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of `metric{label="value"}` in a scrape.
fn sample(scrape: &prometheus_parse::Scrape, metric: &str, label: (&str, &str)) -> f64 {
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && s.labels.get(label.0) == Some(label.1))
        .unwrap_or_else(|| panic!("no {metric}{{{}=\"{}\"}} in the scrape", label.0, label.1));
    match found.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{metric} is not a number: {other:?}"),
    }
}

/// Sends `request` as is over the admin socket; returns the whole answer.
fn raw_request(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = String::new();
    // hyper may close before reading the rest of a garbage request; what arrived is the answer.
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn meshctl_peers_reports_live_state_and_failures() {
    if !root_or_skip("meshctl_peers_reports_live_state_and_failures") {
        return;
    }
    let lab = Lab::up("tq", "meshd", "meshd");
    let socket: PathBuf = lab.state.join("m1.admin.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{} mode {mode:o}", socket.display());

    // Live state, and counters that grow by at least what iperf3 moved.
    let (before, _) = peers_json(&lab, &socket);
    let before = m2(&before);
    let moved = lab.iperf3("m1pod", "m2pod", M2_POD, &["-t", "2"]);
    let (after, code) = peers_json(&lab, &socket);
    let after = m2(&after);
    assert_eq!(after.status, PeerState::Up, "{after:?}");
    assert_eq!(code, Some(0), "all peers up, yet exit {code:?}");
    let handshake = after.last_handshake.expect("a handshake");
    assert!(
        now_secs().saturating_sub(handshake) < 10,
        "stale handshake: {after:?}"
    );
    assert!(
        after.tx_bytes - before.tx_bytes >= moved,
        "tx grew by {} but iperf3 moved {moved}",
        after.tx_bytes - before.tx_bytes
    );
    assert!(after.rx_bytes > before.rx_bytes, "{before:?}\n{after:?}");
    assert_eq!(after.endpoint.as_deref(), Some("192.0.2.2:51820"));
    assert!(!after.endpoint_learned, "{after:?}");
    assert_eq!(after.mtu, 1420);
    let rtt = after.rtt_ms.expect("a probe RTT through the tunnel");
    assert!(rtt > 0.0 && rtt < 1000.0, "{after:?}");
    assert!(after
        .allowed_cidrs
        .contains(&"10.245.0.0/16".parse().unwrap()));

    // The table.
    let out = meshctl_peers(&lab, &socket, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    let header = table.lines().next().unwrap();
    for column in [
        "NAME",
        "ENDPOINT",
        "STATUS",
        "HANDSHAKE",
        "RTT",
        "RX",
        "TX",
        "RATE",
        "ALLOWED CIDRS",
    ] {
        assert!(header.contains(column), "no {column} column:\n{table}");
    }
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.starts_with("m2 ") && row.contains(" up ") && row.contains("192.0.2.2:51820"),
        "{table}"
    );
    let wide =
        String::from_utf8(meshctl_peers(&lab, &socket, &["--output", "wide"]).stdout).unwrap();
    assert!(
        wide.contains(&after.public_key) && wide.contains("1420"),
        "{wide}"
    );

    // /metrics agrees with meshctl within one scrape: first ≤ meshctl ≤ second.
    let first = scrape(&lab);
    let (now, _) = peers_json(&lab, &socket);
    let now = m2(&now);
    let second = scrape(&lab);
    for (metric, value) in [
        ("meshd_peer_rx_bytes_total", now.rx_bytes),
        ("meshd_peer_tx_bytes_total", now.tx_bytes),
    ] {
        let (a, b) = (
            sample(&first, metric, ("peer", "m2")),
            sample(&second, metric, ("peer", "m2")),
        );
        assert!(
            a <= value as f64 && value as f64 <= b,
            "{metric}: scrapes {a} and {b}, meshctl {value}"
        );
    }
    assert_eq!(sample(&second, "meshd_peer_up", ("peer", "m2")), 1.0);
    assert!(
        sample(&second, "meshd_peer_handshakes_total", ("peer", "m2")) >= 1.0,
        "no handshake counted"
    );
    assert!(now.handshakes >= 1, "{now:?}");
    assert_eq!(
        sample(
            &second,
            "meshd_build_info",
            ("version", env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );

    // Status and probes.
    let status = AdminClient::new(&socket).status().unwrap();
    assert_eq!(status.cluster, "m1");
    assert_eq!(status.interface, lab.iface(1));
    assert!(status.health.live && status.health.ready, "{status:?}");
    let ready = lab.http_get("m1gw", "127.0.0.1:9091", "/readyz");
    assert!(ready.starts_with("HTTP/1.0 200"), "{ready}");
    let live = lab.http_get("m1gw", "127.0.0.1:9091", "/healthz");
    assert!(live.starts_with("HTTP/1.0 200"), "{live}");

    // Malformed requests get clean HTTP errors, and meshd answers afterwards.
    let garbage = raw_request(&socket, b"\x16\x03\x01 hello, not HTTP\r\n\r\n");
    assert!(
        garbage.starts_with("HTTP/1.1 400"),
        "garbage got: {garbage:?}"
    );
    let unknown = raw_request(&socket, b"GET /v2/nope HTTP/1.0\r\n\r\n");
    assert!(unknown.starts_with("HTTP/1.0 404"), "{unknown}");
    assert!(
        unknown.contains("\"error\":\"no such endpoint /v2/nope"),
        "{unknown}"
    );
    let post = raw_request(
        &socket,
        b"POST /v1/peers HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.0 405"), "{post}");
    assert!(post.contains("\"error\":"), "{post}");
    let (still, code) = peers_json(&lab, &socket);
    assert_eq!(m2(&still).status, PeerState::Up);
    assert_eq!(code, Some(0));

    // A non-root user is refused by the socket's mode, with a message saying why.
    let copy = lab.state.join("meshctl");
    std::fs::copy(env!("CARGO_BIN_EXE_meshctl"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&copy)
        .args(["peers", "--socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied") && err.contains(socket.to_str().unwrap()),
        "{err}"
    );

    // m2's meshd dies: the health probe goes unanswered, so m2 is down within 10 s (with no
    // traffic of ours needed) and meshctl exits 1.
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(lab.pid(2), libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let deadline = Duration::from_secs(10);
    let seen = loop {
        let (response, code) = peers_json(&lab, &socket);
        let peer = m2(&response);
        if peer.status == PeerState::Down {
            assert_eq!(code, Some(1), "{peer:?}");
            break peer;
        }
        assert!(
            killed.elapsed() < deadline,
            "m2 not down {deadline:?} after its meshd was killed: {peer:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "m2 seen {} after {:?}: {}",
        seen.status.as_str(),
        killed.elapsed(),
        seen.reason
    );
    let out = meshctl_peers(&lab, &socket, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("m2 is down: no answer to the health probe"),
        "{table}"
    );

    // meshd gone: exit 2, naming the socket.
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(lab.pid(1), libc::SIGTERM) }, 0);
    let start = Instant::now();
    let out = loop {
        let out = meshctl_peers(&lab, &socket, &[]);
        if out.status.code() == Some(2) || start.elapsed() > Duration::from_secs(10) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(socket.to_str().unwrap()) && err.contains("is meshd running?"),
        "{err}"
    );
}
