//! Gateway HA in the lab (scripts/lab.sh --nodes 3,1 --no-nat --ha): M1's first two nodes are
//! gateway candidates, labelled in the test's API server (listening on M1's cluster switch),
//! and elect the active gateway through its Lease; M1's third node is a route agent that
//! follows the holder. The test hands the gateway over gracefully (SIGTERM), kills it (SIGKILL),
//! cuts its links, and cuts it off from the API server alone, with pings at 50 ms intervals
//! both ways and an iperf3 stream (both directions) between M1's worker pod and M2's pod, and
//! prints each traffic gap (bench/RESULTS.md, docs/ha.md); DNS for M1's exported service is
//! asked of the surviving candidate throughout. Then M2, restarted with both candidates as its
//! endpoints (the standby's first), finds the active one; and with M2 behind NAT (M1 has no
//! endpoint for it), M2 finds the new gateway after a crash through its health probe. It needs
//! root and skips otherwise.

#[path = "support/apiserver.rs"]
mod apiserver;
mod support;

use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

const M1_WORKER_POD: &str = "10.244.3.10";
/// Where the test's API server listens, on M1's cluster switch.
const API_ADDRESS: &str = "172.18.1.254";
const CANDIDATES: [&str; 2] = ["m1gw", "m1n2"];

fn node_name(ns: &str) -> &'static str {
    match ns {
        "m1gw" => "m1-gw",
        "m1n2" => "m1-n2",
        _ => "m1-n3",
    }
}

/// Starts meshd on M1's node `node` with the election configuration.
fn start(lab: &Lab, node: &str) -> Child {
    lab.spawn_node_meshd(
        node,
        &lab.state.join("m1-ha.toml"),
        Some(&lab.state.join("kubeconfig")),
    )
}

/// The node holding the Lease (its lab namespace), if any.
fn holder(server: &apiserver::ApiServer) -> Option<&'static str> {
    let lease = server.get("Lease", "default", "meshd-gateway")?;
    let name = lease["spec"]["holderIdentity"].as_str()?.to_string();
    CANDIDATES.into_iter().find(|ns| node_name(ns) == name)
}

/// Pings `to` from `from` every 50 ms for `seconds`, in the background. A count, not a
/// deadline (`-w`): with a deadline, ping quits at the first ICMP error (a "net unreachable"
/// while routes move).
fn pinger(lab: &Lab, from: &str, to: &str, seconds: u32) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &lab.ns(from)])
        .args(["ping", "-D", "-n", "-i", "0.05", "-W", "1"])
        .args(["-c", &(seconds * 20).to_string(), to])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The longest time without an echo reply in ping's output (`ping -D`: each line starts with
/// its Unix time), less the 50 ms ping interval, and the number of replies. Between two replies
/// it is their timestamps' distance (ping's own sends may slip on a busy machine, so counting
/// lost sequence numbers would undercount); before the first and after the last it is the lost
/// sequence numbers times 50 ms. An ICMP error such as "net unreachable" from a node on the way
/// is no reply.
fn longest_gap(output: &str) -> (Duration, usize) {
    let mut replies: Vec<(u64, f64)> = output
        .lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| {
            let time = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l
                .split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((seq, time))
        })
        .collect();
    replies.sort_by_key(|r| r.0);
    replies.dedup_by_key(|r| r.0);
    let sent: u64 = output
        .lines()
        .find_map(|l| {
            l.split(" packets transmitted")
                .next()
                .filter(|_| l.contains("packets transmitted"))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let interval = 0.05;
    let between = replies
        .windows(2)
        .map(|w| (w[1].1 - w[0].1 - interval).max(0.0))
        .fold(0.0, f64::max);
    let (first, last) = match (replies.first(), replies.last()) {
        (Some(f), Some(l)) => (f.0, l.0),
        _ => (sent + 1, 0),
    };
    let edges = first.saturating_sub(1).max(sent.saturating_sub(last)) as f64 * interval;
    let gap = between.max(edges);
    (
        Duration::from_millis((gap * 1000.0).round() as u64),
        replies.len(),
    )
}

fn gap_of(child: Child) -> (Duration, usize) {
    let out = child.wait_with_output().unwrap();
    longest_gap(&String::from_utf8_lossy(&out.stdout))
}

/// An iperf3 stream both ways from M1's worker pod to M2's pod for `seconds`, reporting every
/// 100 ms (JSON); its server runs in M2's pod on port 5299.
fn iperf(lab: &Lab, seconds: u32) -> Child {
    lab.exec_ok("m2pod", &["iperf3", "-s", "-1", "-D", "-p", "5299"]);
    std::thread::sleep(Duration::from_millis(300));
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("m1n3pod"),
            "iperf3",
            "-c",
            M2_POD,
            "-p",
            "5299",
        ])
        .args(["--bidir", "-J", "-i", "0.1", "-t", &seconds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The longest run of 100 ms intervals without a byte, each way, from iperf3's JSON.
fn iperf_gaps(child: Child) -> (Duration, Duration) {
    let out = child.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let longest = |key: &str| {
        let mut run = 0u64;
        let mut worst = 0u64;
        for interval in report["intervals"].as_array().into_iter().flatten() {
            if interval[key]["bytes"].as_u64().unwrap_or(0) == 0 {
                run += 1;
                worst = worst.max(run);
            } else {
                run = 0;
            }
        }
        Duration::from_millis(worst * 100)
    };
    (longest("sum"), longest("sum_bidir_reverse"))
}

/// Cuts (or restores) every link of `node`: all traffic in, out and through its cluster and
/// underlay interfaces dropped, the routes left as they are.
fn cut_links(lab: &Lab, node: &str, cut: bool) {
    let op = if cut { "-I" } else { "-D" };
    for dev in ["eth0", "ul0"] {
        for (chain, side) in [
            ("INPUT", "-i"),
            ("OUTPUT", "-o"),
            ("FORWARD", "-i"),
            ("FORWARD", "-o"),
        ] {
            lab.exec_ok(node, &["iptables", op, chain, side, dev, "-j", "DROP"]);
        }
    }
}

/// Whether meshd on `node` answers an A record for `name` (its DNS listens on every address).
fn dns_answers(lab: &Lab, node: &str, name: &str) -> bool {
    let address = if node == "m1gw" {
        "172.18.1.1"
    } else {
        "172.18.1.2"
    };
    let out = lab.exec(
        "m1n3",
        &[
            "dig",
            "+short",
            "+time=1",
            "+tries=1",
            &format!("@{address}"),
            name,
            "A",
        ],
    );
    out.status.success() && !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// Waits until one candidate holds the Lease and traffic flows from M1's worker pod to M2's.
fn await_active(lab: &Lab, server: &apiserver::ApiServer, not: Option<&str>) -> &'static str {
    let mut found = None;
    let took = wait_until(Duration::from_secs(20), || {
        found = holder(server).filter(|h| Some(*h) != not);
        found.is_some() && lab.ping("m1n3pod", M2_POD)
    });
    assert!(
        took.is_some(),
        "no active gateway with traffic (holder {:?}); logs:\n{}",
        holder(server),
        CANDIDATES
            .iter()
            .map(
                |n| std::fs::read_to_string(lab.state.join(format!("{n}.log"))).unwrap_or_default()
            )
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    found.unwrap()
}

/// Bytes this gateway sent to its peer (M2), from `meshctl peers`.
fn tx_bytes(lab: &Lab, node: &str) -> u64 {
    try_peers_json(lab, node)
        .ok()
        .and_then(|j| j["peers"][0]["tx_bytes"].as_u64())
        .unwrap_or(0)
}

/// How the active gateway goes away.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    /// SIGTERM: a rolling update or a drain.
    Graceful,
    /// SIGKILL: a crash.
    Crash,
    /// Every link of its node cut.
    LinksCut,
}

#[test]
fn two_candidates_hand_over_on_stop_crash_and_partition() {
    if !root_or_skip("two_candidates_hand_over_on_stop_crash_and_partition") {
        return;
    }
    let lab = Lab::up_with(
        "ha",
        "meshd",
        "meshd",
        &["--nodes", "3,1", "--no-nat", "--ha"],
    );
    for node in ["m1", "m1n2", "m1n3"] {
        stop(pid(&lab, node), libc::SIGTERM);
    }

    // The API server on M1's switch, reachable from every M1 node; the nodes as the lab has
    // them (the first two are candidates), and M1's web service exported.
    lab.exec_ok(
        "m1sw",
        &[
            "ip",
            "addr",
            "add",
            &format!("{API_ADDRESS}/24"),
            "dev",
            "br0",
        ],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = in_netns(&lab.ns("m1sw"), || {
        std::net::TcpListener::bind(format!("{API_ADDRESS}:0")).unwrap()
    });
    let server = {
        let _entered = runtime.enter();
        runtime.block_on(apiserver::ApiServer::start_on(listener))
    };
    for (ns, address) in [
        ("m1gw", "172.18.1.1"),
        ("m1n2", "172.18.1.2"),
        ("m1n3", "172.18.1.3"),
    ] {
        let mut node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node_name(ns), "labels": {}},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]},
        });
        if CANDIDATES.contains(&ns) {
            node["metadata"]["labels"]["meshd.io/gateway"] = json!("true");
        }
        server.apply(node);
    }
    server.apply_service(("demo", "web"), "10.96.0.10", "web-1", M1_POD);
    server.apply(json!({
        "apiVersion": server.mcs_api_version(), "kind": "ServiceExport",
        "metadata": {"namespace": "demo", "name": "web"},
    }));
    server.write_kubeconfig(&lab.state.join("kubeconfig"));
    // The lab's configuration, with the election instead of gateway_address, exports from the
    // API, and DNS on every candidate's own addresses.
    let config: String = std::fs::read_to_string(lab.state.join("m1.toml"))
        .unwrap()
        .lines()
        .filter(|l| {
            !l.starts_with("gateway_address")
                && !l.starts_with("exports_file")
                && !l.starts_with("dns_listen")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        lab.state.join("m1-ha.toml"),
        format!("kubernetes = true\ndns_listen = \"0.0.0.0:53\"\n{config}"),
    )
    .unwrap();
    let mut children = vec![start(&lab, "m1gw"), start(&lab, "m1n3")];
    let first = await_active(&lab, &server, None);
    assert_eq!(first, "m1gw", "the only candidate running takes the Lease");
    children.push(start(&lab, "m1n2"));
    assert!(wait_until(Duration::from_secs(10), || {
        try_peers_json(&lab, "m1n2").is_ok_and(|j| j["node"]["election"]["holder"] == "m1-gw")
    })
    .is_some());
    let standby = peers_json(&lab, "m1n2");
    assert_eq!(standby["node"]["election"]["active"], false, "{standby}");
    assert_eq!(standby["node"]["election"]["candidate"], true, "{standby}");
    // The standby routes like an agent, to the active gateway, and already answers DNS for
    // this cluster's services (its ServiceExport watcher is warm, it writes nothing).
    assert!(lab
        .exec_ok("m1n2", &["ip", "route", "show", "proto", "77"])
        .contains("10.245.0.0/16 via 172.18.1.1"));
    const WEB: &str = "web.demo.svc.clusterset.local";
    assert!(wait_until(Duration::from_secs(10), || dns_answers(&lab, "m1n2", WEB)).is_some());
    // The active gateway's peer settles to up (a handshake, answered traffic, the probe).
    assert!(wait_until(Duration::from_secs(15), || {
        try_peers_json(&lab, "m1gw").is_ok_and(|j| j["peers"][0]["status"] == "up")
    })
    .is_some());
    let table = meshctl()
        .args(["peers", "--socket"])
        .arg(lab.state.join("m1gw.admin.sock"))
        .output()
        .unwrap();
    assert!(
        text(&table).contains("election: m1-gw is the active gateway · holds the Lease since"),
        "{}",
        text(&table)
    );
    let standby_table = meshctl()
        .args(["peers", "--socket"])
        .arg(lab.state.join("m1n2.admin.sock"))
        .output()
        .unwrap();
    assert_eq!(
        standby_table.status.code(),
        Some(0),
        "{}",
        text(&standby_table)
    );
    assert!(
        text(&standby_table).contains(
            "election: m1-n2 is a standby gateway candidate · active gateway m1-gw (172.18.1.1) since"
        ),
        "{}",
        text(&standby_table)
    );
    eprintln!(
        "meshctl peers on the active gateway:\n{}\nmeshctl peers on the standby:\n{}",
        String::from_utf8_lossy(&table.stdout),
        String::from_utf8_lossy(&standby_table.stdout)
    );
    let gauge = |node: &str| {
        metric(
            &lab.http_get(node, "127.0.0.1:9090", "/metrics"),
            "meshd_gateway_active",
        )
    };
    assert_eq!((gauge("m1gw"), gauge("m1n2")), (Some(1.0), Some(0.0)));

    let mut results = Vec::new();
    for failure in [Failure::Graceful, Failure::Crash, Failure::LinksCut] {
        let active = holder(&server).unwrap();
        let survivor = CANDIDATES.into_iter().find(|c| *c != active).unwrap();
        let out = pinger(&lab, "m1n3pod", M2_POD, 10);
        let back = pinger(&lab, "m2pod", M1_WORKER_POD, 10);
        let stream = iperf(&lab, 10);
        std::thread::sleep(Duration::from_secs(2));
        match failure {
            Failure::Graceful => stop(pid(&lab, active), libc::SIGTERM),
            Failure::Crash => stop(pid(&lab, active), libc::SIGKILL),
            Failure::LinksCut => cut_links(&lab, active, true),
        }
        // DNS for this cluster's service, asked of the survivor every 100 ms until the end of
        // the measurement: it never stops answering.
        let mut unanswered = 0;
        for _ in 0..30 {
            if !dns_answers(&lab, survivor, WEB) {
                unanswered += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let next = await_active(&lab, &server, Some(active));
        let (there, answered) = gap_of(out);
        let (back_gap, back_answered) = gap_of(back);
        let (stream_there, stream_back) = iperf_gaps(stream);
        eprintln!(
            "{failure:?}: {active} -> {next}: ping gap {there:?} M1 worker pod -> M2 ({answered} answers), {back_gap:?} back ({back_answered} answers); iperf3 without a byte {stream_there:?} there, {stream_back:?} back; DNS unanswered by the survivor {unanswered} of 30"
        );
        assert_eq!(next, survivor);
        assert!(
            answered > 100 && back_answered > 100,
            "traffic did not come back after {failure:?}"
        );
        assert_eq!(
            unanswered, 0,
            "the surviving candidate stopped answering DNS"
        );
        results.push((failure, there, back_gap, stream_there, stream_back));
        // M2 follows the new gateway: its endpoint for M1 moved (WireGuard roaming).
        let dump = lab.wg_dump(2);
        let expected = if next == "m1n2" {
            "192.0.2.12:"
        } else {
            "192.0.2.1:"
        };
        assert!(dump[1][2].starts_with(expected), "{dump:?}");
        // The old one comes back as a standby.
        match failure {
            Failure::LinksCut => cut_links(&lab, active, false),
            _ => children.push(start(&lab, active)),
        }
        assert!(wait_until(Duration::from_secs(15), || {
            try_peers_json(&lab, active).is_ok_and(|j| {
                j["node"]["election"]["holder"] == node_name(next)
                    && j["node"]["election"]["active"] == false
            })
        })
        .is_some());
    }
    let transitions = metric(
        &lab.http_get("m1n2", "127.0.0.1:9090", "/metrics"),
        "meshd_gateway_transitions_total",
    );
    assert!(transitions >= Some(1.0), "{transitions:?}");

    // Cut off from the API server but not from M2: the active gateway stops forwarding before
    // its Lease can expire, and the standby starts only after that. The bytes each sends to M2,
    // sampled every 100 ms: never both growing in one interval.
    let active = holder(&server).unwrap();
    let other = CANDIDATES.into_iter().find(|c| *c != active).unwrap();
    let out = pinger(&lab, "m1n3pod", M2_POD, 9);
    std::thread::sleep(Duration::from_secs(1));
    for (chain, dir) in [("OUTPUT", "-d"), ("INPUT", "-s")] {
        lab.exec_ok(
            active,
            &["iptables", "-I", chain, dir, API_ADDRESS, "-j", "DROP"],
        );
    }
    let mut samples = Vec::new();
    for _ in 0..60 {
        samples.push((tx_bytes(&lab, active), tx_bytes(&lab, other)));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (partition_gap, answered) = gap_of(out);
    let both: Vec<usize> = samples
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1].0 > w[0].0 && w[1].1 > w[0].1)
        .map(|(i, _)| i)
        .collect();
    assert!(
        both.is_empty(),
        "both gateways sent in intervals {both:?}: {samples:?}"
    );
    let (first, last) = (samples.first().unwrap(), samples.last().unwrap());
    assert!(last.1 > first.1, "the standby never took over: {samples:?}");
    assert_eq!(holder(&server), Some(other));
    eprintln!("partition from the API server: {active} fenced, {other} took over; ping gap {partition_gap:?} ({answered} answers)");
    assert!(answered > 100);
    for (chain, dir) in [("OUTPUT", "-d"), ("INPUT", "-s")] {
        lab.exec_ok(
            active,
            &["iptables", "-D", chain, dir, API_ADDRESS, "-j", "DROP"],
        );
    }

    // M2 restarted with both of M1's candidates as its endpoints, the standby's first: the
    // standby answers nothing (it drops), and M2 moves on to the active one.
    let standby = active;
    let underlay = |ns: &str| {
        if ns == "m1gw" {
            "192.0.2.1"
        } else {
            "192.0.2.12"
        }
    };
    let dropped = |ns: &str| {
        metric(
            &lab.http_get(ns, "127.0.0.1:9090", "/metrics"),
            "meshd_dropped_packets_total{reason=\"standby\"}",
        )
        .unwrap_or(0.0)
    };
    let before = dropped(standby);
    let endpoints = format!(
        "endpoints = [\"{}:51820\", \"{}:51820\"]",
        underlay(standby),
        underlay(other)
    );
    let mut m2 = lab.restart_meshd(2, |c| {
        c.replace("endpoint = \"192.0.2.1:51820\"", &endpoints)
    });
    let found = lab.ping_within("m2pod", M1_WORKER_POD, Duration::from_secs(30));
    eprintln!("M2 found the active gateway through its endpoints after {found:?}");
    assert!(found.is_some(), "{}", lab.log(2));
    assert!(dropped(standby) > before, "the standby answered M2");
    let dump = lab.wg_dump(2);
    assert!(dump[1][2].starts_with(underlay(other)), "{dump:?}");
    assert!(lab.log(2).contains("trying its next one"), "{}", lab.log(2));

    // Behind NAT: M1 has no endpoint for M2, which reaches out with keepalives, so a new M1
    // gateway cannot reach M2 first. M2 notices through its health probe that M1 went silent
    // and moves on to its next endpoint at once.
    for node in CANDIDATES {
        stop(pid(&lab, node), libc::SIGTERM);
    }
    let ha_config = lab.state.join("m1-ha.toml");
    let without_endpoint: String = std::fs::read_to_string(&ha_config)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("endpoint = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&ha_config, without_endpoint).unwrap();
    children.push(start(&lab, "m1gw"));
    stop(m2.id() as i32, libc::SIGKILL);
    let _ = m2.wait();
    m2 = lab.start_meshd(2, |c| {
        c.lines()
            .map(|l| {
                if l.starts_with("endpoints = ") {
                    "endpoints = [\"192.0.2.1:51820\", \"192.0.2.12:51820\"]\npersistent_keepalive = 2"
                        .to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    assert_eq!(await_active(&lab, &server, None), "m1gw");
    children.push(start(&lab, "m1n2"));
    assert!(wait_until(Duration::from_secs(10), || {
        try_peers_json(&lab, "m1n2").is_ok_and(|j| j["node"]["election"]["holder"] == "m1-gw")
    })
    .is_some());
    let out = pinger(&lab, "m1n3pod", M2_POD, 12);
    let back = pinger(&lab, "m2pod", M1_WORKER_POD, 12);
    std::thread::sleep(Duration::from_secs(2));
    stop(pid(&lab, "m1gw"), libc::SIGKILL);
    assert_eq!(await_active(&lab, &server, Some("m1gw")), "m1n2");
    let (nat_there, nat_answered) = gap_of(out);
    let (nat_back, nat_back_answered) = gap_of(back);
    eprintln!("Crash with M2 behind NAT: ping gap {nat_there:?} there ({nat_answered} answers), {nat_back:?} back ({nat_back_answered} answers)");
    assert!(
        nat_answered > 100 && nat_back_answered > 100,
        "M2 never found the new gateway:\n{}",
        lab.log(2)
    );
    assert!(
        lab.log(2).contains("trying its next endpoint"),
        "{}",
        lab.log(2)
    );

    for (failure, there, back, stream_there, stream_back) in &results {
        eprintln!("RESULT {failure:?}: ping {there:?} / {back:?}, iperf3 {stream_there:?} / {stream_back:?}");
    }
    eprintln!("RESULT partition: {partition_gap:?}");
    eprintln!("RESULT crash, M2 behind NAT: ping {nat_there:?} / {nat_back:?}");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(m2.id() as i32, libc::SIGTERM) };
    let _ = m2.wait();
    for node in ["m1gw", "m1n2", "m1n3"] {
        // SAFETY: as above.
        unsafe { libc::kill(pid(&lab, node), libc::SIGTERM) };
    }
    for mut child in children {
        let _ = child.wait();
    }
}

#[test]
fn a_gap_counts_unanswered_and_errored_pings_to_the_end() {
    let out = "[100.000] 64 bytes from 10.245.1.10: icmp_seq=1 ttl=61 time=0.4 ms\n\
               [100.050] 64 bytes from 10.245.1.10: icmp_seq=2 ttl=61 time=0.4 ms\n\
               [100.100] From 172.18.1.1 icmp_seq=3 Destination Net Unreachable\n\
               [100.460] 64 bytes from 10.245.1.10: icmp_seq=6 ttl=61 time=0.4 ms\n\
               [100.510] 64 bytes from 10.245.1.10: icmp_seq=7 ttl=61 time=0.4 ms\n\
               \n--- 10.245.1.10 ping statistics ---\n\
               10 packets transmitted, 4 received, +1 errors\n";
    // Between 2 and 6: 410 ms by the clock less one interval (the sends slipped: three lost
    // sequence numbers would say 150 ms); 8-10 lost at the end: 150 ms.
    assert_eq!(longest_gap(out), (Duration::from_millis(360), 4));
    let silent_start = "[5.0] 64 bytes from 10.245.1.10: icmp_seq=9 ttl=61 time=0.4 ms\n\
                        9 packets transmitted, 1 received\n";
    assert_eq!(longest_gap(silent_start), (Duration::from_millis(400), 1));
    assert_eq!(longest_gap(""), (Duration::ZERO, 0));
}
