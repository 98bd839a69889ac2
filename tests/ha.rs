//! Gateway HA in the lab (scripts/lab.sh --nodes 3,1 --no-nat --ha): M1's first two nodes are
//! gateway candidates, labelled in the test's API server (listening on M1's cluster switch),
//! and elect the active gateway through its Lease; M1's third node is a route agent that
//! follows the holder. The test hands the gateway over gracefully (SIGTERM), kills it (SIGKILL)
//! and cuts it off from the API server, with pings at 50 ms intervals both ways between M1's
//! worker pod and M2's pod, and prints each traffic gap. It needs root and skips otherwise.

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
    let log = std::fs::File::create(lab.state.join(format!("{node}.log"))).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns(node)])
        .arg(env!("CARGO_BIN_EXE_meshd"))
        .arg("--config")
        .arg(lab.state.join("m1-ha.toml"))
        .arg("--admin-socket")
        .arg(lab.state.join(format!("{node}.admin.sock")))
        .env("KUBECONFIG", lab.state.join("kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    std::fs::write(
        lab.state.join(format!("{node}.pid")),
        child.id().to_string(),
    )
    .unwrap();
    child
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
        .args(["ping", "-n", "-i", "0.05", "-W", "1"])
        .args(["-c", &(seconds * 20).to_string(), to])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The longest run of unanswered pings (each 50 ms) in ping's output, unanswered ones at the
/// end included, as a duration, and the number of answers.
fn longest_gap(output: &str) -> (Duration, usize) {
    let mut seqs: Vec<u64> = output
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let sent: u64 = output
        .lines()
        .find_map(|l| {
            l.split(" packets transmitted")
                .next()
                .filter(|_| l.contains("packets transmitted"))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut bounds = vec![0];
    bounds.extend(&seqs);
    bounds.push(sent + 1);
    let gap = bounds
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0] + 1))
        .max()
        .unwrap_or(0);
    (Duration::from_millis(gap * 50), seqs.len())
}

fn gap_of(child: Child) -> (Duration, usize) {
    let out = child.wait_with_output().unwrap();
    longest_gap(&String::from_utf8_lossy(&out.stdout))
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

    // The API server on M1's switch, reachable from every M1 node; the nodes labelled as the
    // lab has them (the first two are candidates).
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
    // The standby routes like an agent, to the active gateway.
    assert!(lab
        .exec_ok("m1n2", &["ip", "route", "show", "proto", "77"])
        .contains("10.245.0.0/16 via 172.18.1.1"),);
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

    let mut gaps = Vec::new();
    for (what, signal) in [
        ("graceful (SIGTERM)", libc::SIGTERM),
        ("crash (SIGKILL)", libc::SIGKILL),
    ] {
        let active = holder(&server).unwrap();
        let out = pinger(&lab, "m1n3pod", M2_POD, 8);
        let back = pinger(&lab, "m2pod", M1_WORKER_POD, 8);
        std::thread::sleep(Duration::from_secs(2));
        stop(pid(&lab, active), signal);
        let next = await_active(&lab, &server, Some(active));
        let (there, answered) = gap_of(out);
        let (back_gap, back_answered) = gap_of(back);
        eprintln!(
            "{what}: {active} -> {next}: longest gap {there:?} M1 worker pod -> M2 ({answered} answers), {back_gap:?} M2 -> M1 worker pod ({back_answered} answers)"
        );
        assert!(
            answered > 40 && back_answered > 40,
            "traffic did not come back after the {what} hand-over; m1n3's routes:\n{}\nits log:\n{}",
            lab.exec_ok("m1n3", &["ip", "route"]),
            std::fs::read_to_string(lab.state.join("m1n3.log")).unwrap_or_default()
        );
        gaps.push((what, there, back_gap));
        // M2 follows the new gateway: its endpoint for M1 moved (WireGuard roaming).
        let dump = lab.wg_dump(2);
        let expected = if next == "m1n2" {
            "192.0.2.12:"
        } else {
            "192.0.2.1:"
        };
        assert!(dump[1][2].starts_with(expected), "{dump:?}");
        // The stopped one comes back as a standby.
        children.push(start(&lab, active));
        assert!(wait_until(Duration::from_secs(10), || {
            try_peers_json(&lab, active).is_ok_and(|j| j["node"]["election"]["holder"].is_string())
        })
        .is_some());
    }

    // Cut off from the API server but not from M2: the active gateway stops forwarding before
    // its Lease can expire, and the standby starts only after that. The bytes each sends to M2,
    // sampled every 100 ms: never both growing in one interval.
    let active = holder(&server).unwrap();
    let other = CANDIDATES.into_iter().find(|c| *c != active).unwrap();
    let out = pinger(&lab, "m1n3pod", M2_POD, 9);
    std::thread::sleep(Duration::from_secs(1));
    for chain in ["OUTPUT", "INPUT"] {
        let dir = if chain == "OUTPUT" { "-d" } else { "-s" };
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
    let last = samples.last().unwrap();
    let first = samples.first().unwrap();
    assert!(last.1 > first.1, "the standby never took over: {samples:?}");
    assert_eq!(holder(&server), Some(other));
    eprintln!("partition from the API server: {active} fenced, {other} took over; longest gap {partition_gap:?} ({answered} answers)");
    assert!(answered > 40);
    for (what, there, back) in &gaps {
        eprintln!("RESULT {what}: {there:?} / {back:?}");
    }
    eprintln!("RESULT partition: {partition_gap:?}");

    for node in ["m1gw", "m1n2", "m1n3"] {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid(&lab, node), libc::SIGTERM) };
    }
    for mut child in children {
        let _ = child.wait();
    }
}
