//! Multi-node clusters in the lab (scripts/lab.sh --nodes 3,2): pods on nodes that are not the
//! gateway reach the other cluster through meshd's route agent, across kindnet's masquerade
//! rule; the masquerade bypass and the agent's routes come back when removed, and meshd leaves
//! nothing behind when it exits. They need root and skip with a message otherwise.

#[path = "support/apiserver.rs"]
mod apiserver;
mod support;

use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

/// The pod on M1's third node and the one on M2's second: neither is on a gateway node.
const M1_WORKER_POD: &str = "10.244.3.10";
const M2_WORKER_POD: &str = "10.245.2.10";

/// Ping and two seconds of iperf3 from pod `a` to pod `b` and back (namespace, address).
fn traffic_both_ways(lab: &Lab, a: (&str, &str), b: (&str, &str)) {
    for (from, to) in [(a, b), (b, a)] {
        assert!(
            lab.ping_within(from.0, to.1, Duration::from_secs(10))
                .is_some(),
            "{} cannot ping {}",
            from.0,
            to.1
        );
        let moved = lab.iperf3(from.0, to.0, to.1, &["-t", "2"]);
        assert!(
            moved > 1_000_000,
            "iperf3 {} -> {} moved {moved} bytes",
            from.0,
            to.0
        );
    }
}

/// `curl` from a pod; the body when it answered within 2 s.
fn curl(lab: &Lab, pod: &str, url: &str) -> Option<String> {
    let out = lab.exec(pod, &["curl", "-sS", "--max-time", "2", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What meshd may change on a node, with packet counters and timestamps taken out: routes of
/// every table, policy rules, the nftables ruleset and the iptables rules.
fn snapshot(lab: &Lab, node: &str) -> String {
    let mut all = String::new();
    for cmd in [
        &["ip", "-4", "route", "show", "table", "all"][..],
        &["ip", "-6", "route", "show", "table", "all"],
        &["ip", "-4", "rule"],
        &["ip", "-6", "rule"],
        &["nft", "list", "ruleset"],
        &["iptables-save"],
        &["ip", "-o", "link", "show"],
    ] {
        all.push_str(&format!("$ {}\n", cmd.join(" ")));
        all.push_str(&lab.exec_ok(node, cmd));
    }
    all.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let mut l = l.to_string();
            for (start, end) in [
                ("[", "]"),
                ("counter packets ", " bytes "),
                ("link/ether ", " brd"),
            ] {
                if let (Some(a), Some(b)) = (l.find(start), l.find(end)) {
                    if a < b && l[a..].starts_with(start) {
                        l.replace_range(a + start.len()..b, "N");
                    }
                }
            }
            l
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts meshd as the lab does on a non-gateway node of cluster `i`.
fn start_agent(lab: &Lab, node: &str, i: u8) -> Child {
    lab.spawn_node_meshd(node, &lab.state.join(format!("m{i}.toml")), None)
}

fn agent_routes(lab: &Lab, node: &str) -> String {
    lab.exec_ok(node, &["ip", "route", "show", "proto", "77"])
}

/// Waits up to 10 s for `route` among meshd's routes on `node`; fails with `what` otherwise.
fn await_route(lab: &Lab, node: &str, route: &str, what: &str) {
    let found = wait_until(Duration::from_secs(10), || {
        agent_routes(lab, node).contains(route)
    });
    assert!(found.is_some(), "{what}:\n{}", agent_routes(lab, node));
}

fn bad_source(lab: &Lab, gateway: &str) -> f64 {
    let body = lab.http_get(gateway, "127.0.0.1:9090", "/metrics");
    metric(&body, "meshd_dropped_packets_total{reason=\"bad_source\"}").unwrap_or(0.0)
}

#[test]
fn pods_on_every_node_reach_the_other_cluster_and_meshd_keeps_and_cleans_its_part() {
    if !root_or_skip(
        "pods_on_every_node_reach_the_other_cluster_and_meshd_keeps_and_cleans_its_part",
    ) {
        return;
    }
    let lab = Lab::up_with("to", "meshd", "meshd", &["--nodes", "3,2", "--nat"]);

    // kindnet's masquerade rule is on the nodes, as on a kind cluster.
    let nat = lab.exec_ok("m1n3", &["iptables-save", "-t", "nat"]);
    assert!(
        nat.contains("-A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE"),
        "{nat}"
    );

    // Worker pod to worker pod, both ways: ping, iperf3, HTTP with the true source address.
    traffic_both_ways(&lab, ("m1n3pod", M1_WORKER_POD), ("m2n2pod", M2_WORKER_POD));
    let hello = wait_until(Duration::from_secs(15), || {
        curl(&lab, "m1n3pod", "http://hello.demo.svc.clusterset.local/").as_deref()
            == Some("hello from m2n2")
    });
    assert!(
        hello.is_some(),
        "hello.demo.svc.clusterset.local never answered from m1n3pod"
    );
    assert_eq!(
        curl(&lab, "m2n2pod", &format!("http://{M1_WORKER_POD}/")).as_deref(),
        Some("hello from m1n3")
    );
    let served = std::fs::read_to_string(lab.state.join("www-m2n2pod.log")).unwrap();
    assert!(
        served.contains(&format!("{M1_WORKER_POD} - -")),
        "M2's pod saw another source:\n{served}"
    );
    let served = std::fs::read_to_string(lab.state.join("www-m1n3pod.log")).unwrap();
    assert!(
        served.contains(&format!("{M2_WORKER_POD} - -")),
        "M1's pod saw another source:\n{served}"
    );

    // meshctl peers on the route agent: its role, the gateway, its routes, the bypass.
    let socket = lab.state.join("m1n3.admin.sock");
    let out = meshctl()
        .args(["peers", "--socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        table.starts_with(
            "node: route agent; gateway 172.18.1.1 · direct (via 172.18.1.1 on eth0) · masquerade bypass: in place\n"
        ),
        "{table}"
    );
    for prefix in ["10.245.0.0/16", "10.97.0.0/16"] {
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == [prefix, "172.18.1.1", "in", "place"]),
            "{table}"
        );
    }
    let out = meshctl()
        .args([
            "peers",
            "--socket",
            lab.state.join("m1.admin.sock").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        text(&out).contains("node: gateway 172.18.1.1 (this node) · vxlan end for the agents (meshd-vx over eth0) · masquerade bypass: in place"),
        "{}",
        text(&out)
    );

    // The bypass removed by hand (meshd frozen so that it cannot put it back yet): a new
    // connection leaves masqueraded and M2's gateway drops it as bad_source.
    let agent = pid(&lab, "m1n3");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    lab.exec_ok("m1n3", &["nft", "delete", "table", "inet", "meshd"]);
    let dropped = bad_source(&lab, "m2gw");
    let without = curl(&lab, "m1n3pod", &format!("http://{M2_WORKER_POD}/"));
    let dropped_after = bad_source(&lab, "m2gw");
    // SAFETY: as above.
    unsafe { libc::kill(agent, libc::SIGCONT) };
    assert_eq!(
        without, None,
        "traffic passed without the masquerade bypass"
    );
    assert!(
        dropped_after > dropped,
        "M2 did not count the masqueraded packets as bad_source ({dropped} -> {dropped_after})"
    );
    // meshd puts it back within seconds.
    let back = wait_until(Duration::from_secs(10), || {
        curl(&lab, "m1n3pod", &format!("http://{M2_WORKER_POD}/")).is_some()
    });
    assert!(back.is_some(), "the masquerade bypass did not come back");
    // ... and counts it (published a moment after it is written back).
    let counted = wait_until(Duration::from_secs(5), || {
        peers_json(&lab, "m1n3")["node"]["masquerade_bypass"]["restored"].as_u64() >= Some(1)
    });
    assert!(counted.is_some(), "{}", peers_json(&lab, "m1n3")["node"]);

    // A route removed by hand comes back too.
    lab.exec_ok("m1n3", &["ip", "route", "del", "10.245.0.0/16"]);
    await_route(
        &lab,
        "m1n3",
        "10.245.0.0/16 via 172.18.1.1",
        "the route to the gateway did not come back",
    );
    assert!(lab
        .ping_within("m1n3pod", M2_WORKER_POD, Duration::from_secs(5))
        .is_some());

    // meshctl diagnose on the route agent: every node check passes; a route that sends the
    // remote CIDRs out of another interface than the gateway's, under strict rp_filter, and
    // forwarding turned off each fail their check, with the fix.
    let diagnose = || {
        // In the node's network namespace, as in meshd's pod (hostNetwork).
        let out = lab.exec(
            "m1n3",
            &[
                env!("CARGO_BIN_EXE_meshctl"),
                "diagnose",
                "--socket",
                socket.to_str().unwrap(),
            ],
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, report) = diagnose();
    assert_eq!(code, Some(0), "{report}");
    for check in ["node", "forwarding", "bypass", "routes", "rp_filter"] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("ok") && l.split_whitespace().nth(1) == Some(check)),
            "{check} did not pass:\n{report}"
        );
    }
    lab.exec_ok(
        "m1n3",
        &["ip", "route", "add", "10.245.0.0/17", "dev", "pod0"],
    );
    let (code, report) = diagnose();
    lab.exec_ok(
        "m1n3",
        &["ip", "route", "del", "10.245.0.0/17", "dev", "pod0"],
    );
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("FAIL  rp_filter") && report.contains("rp_filter=1 on eth0"),
        "{report}"
    );
    assert!(
        report.contains("sysctl -w net.ipv4.conf.eth0.rp_filter=2"),
        "{report}"
    );
    lab.exec_ok("m1n3", &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    let off = wait_until(Duration::from_secs(10), || {
        diagnose().1.contains("FAIL  forwarding")
    });
    lab.exec_ok("m1n3", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(
        off.is_some(),
        "forwarding off was not reported:\n{}",
        diagnose().1
    );
    assert!(wait_until(Duration::from_secs(10), || diagnose().0 == Some(0)).is_some());

    // The route agent exiting removes everything it added.
    let running = snapshot(&lab, "m1n3");
    stop(agent, libc::SIGTERM);
    let clean = snapshot(&lab, "m1n3");
    assert_ne!(running, clean);
    assert_eq!(agent_routes(&lab, "m1n3"), "");
    assert!(!clean.contains("table inet meshd"), "{clean}");
    // Killed, it leaves its routes and table; the next start clears them and writes its own;
    // a clean exit after that leaves the node exactly as it was.
    let mut killed = start_agent(&lab, "m1n3", 1);
    assert!(
        wait_until(Duration::from_secs(10), || agent_routes(&lab, "m1n3")
            .lines()
            .count()
            == 3)
        .is_some()
    );
    stop(killed.id() as i32, libc::SIGKILL);
    let _ = killed.wait();
    assert_eq!(
        agent_routes(&lab, "m1n3").lines().count(),
        3,
        "a killed meshd cannot clean up"
    );
    let mut again = start_agent(&lab, "m1n3", 1);
    // Up once it reports its routes in place (the killed one's were cleared first).
    let up = wait_until(Duration::from_secs(10), || {
        try_peers_json(&lab, "m1n3").is_ok_and(|v| {
            v["node"]["routes"]
                .as_array()
                .is_some_and(|r| r.len() == 3 && r.iter().all(|r| r["in_place"] == true))
        })
    });
    assert!(
        up.is_some(),
        "the restarted route agent did not put its routes in place"
    );
    assert_eq!(agent_routes(&lab, "m1n3").lines().count(), 3);
    assert!(lab
        .ping_within("m1n3pod", M2_WORKER_POD, Duration::from_secs(10))
        .is_some());
    stop(again.id() as i32, libc::SIGTERM);
    let _ = again.wait();
    assert_eq!(snapshot(&lab, "m1n3"), clean);

    // A peer CIDR taken out of the configuration: on SIGHUP the route agent drops its route and
    // the bypass its prefix; put back, both return.
    let config_path = lab.state.join("m1.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();
    assert!(original.contains("\"10.97.0.0/16\", "), "{original}");
    std::fs::write(&config_path, original.replace("\"10.97.0.0/16\", ", "")).unwrap();
    let hup = |lab: &Lab| {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid(lab, "m1n2"), libc::SIGHUP) };
    };
    let remote4 =
        |lab: &Lab| lab.exec_ok("m1n2", &["nft", "list", "set", "inet", "meshd", "remote4"]);
    hup(&lab);
    let dropped = wait_until(Duration::from_secs(10), || {
        !agent_routes(&lab, "m1n2").contains("10.97.0.0/16")
            && !remote4(&lab).contains("10.97.0.0/16")
    });
    assert!(
        dropped.is_some(),
        "{}\n{}",
        agent_routes(&lab, "m1n2"),
        remote4(&lab)
    );
    assert!(agent_routes(&lab, "m1n2").contains("10.245.0.0/16"));
    std::fs::write(&config_path, &original).unwrap();
    hup(&lab);
    let back = wait_until(Duration::from_secs(10), || {
        agent_routes(&lab, "m1n2").contains("10.97.0.0/16")
            && remote4(&lab).contains("10.97.0.0/16")
    });
    assert!(
        back.is_some(),
        "{}\n{}",
        agent_routes(&lab, "m1n2"),
        remote4(&lab)
    );

    // route_mode auto: a node that reaches the gateway only through a router (here m1n3) takes
    // the VXLAN path, and its pod still reaches M2's.
    stop(pid(&lab, "m1n2"), libc::SIGTERM);
    lab.exec_ok(
        "m1n2",
        &[
            "ip",
            "route",
            "add",
            "172.18.1.1/32",
            "via",
            "172.18.1.3",
            "dev",
            "eth0",
        ],
    );
    let mut routed = start_agent(&lab, "m1n2", 1);
    await_route(
        &lab,
        "m1n2",
        "10.245.0.0/16 via 240.18.1.1 dev meshd-vx onlink",
        "auto did not take VXLAN behind a router",
    );
    assert!(lab
        .ping_within("m1n2pod", M2_WORKER_POD, Duration::from_secs(10))
        .is_some());
    let node = &peers_json(&lab, "m1n2")["node"];
    assert_eq!(node["path"], "vxlan (meshd-vx over eth0)", "{node}");
    stop(routed.id() as i32, libc::SIGTERM);
    let _ = routed.wait();

    // The gateway from the Kubernetes API: with kubernetes = true and no gateway_address, the
    // agent asks the API server (the test's, listening inside m1n2) for the nodes labelled
    // meshd.io/gateway=true; with one candidate, it routes to its InternalIP at once, before any
    // Lease names a holder (this gateway runs without the election; tests/ha.rs has it).
    lab.exec_ok("m1n2", &["ip", "route", "del", "172.18.1.1/32"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = in_netns(&lab.ns("m1n2"), || {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    });
    let server = {
        let _entered = runtime.enter();
        runtime.block_on(apiserver::ApiServer::start_on(listener))
    };
    for (name, address, gateway) in [
        ("m1-gw", "172.18.1.1", true),
        ("m1-n2", "172.18.1.2", false),
        ("m1-n3", "172.18.1.3", false),
    ] {
        let mut node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {}},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]},
        });
        if gateway {
            node["metadata"]["labels"]["meshd.io/gateway"] = json!("true");
        }
        server.apply(node);
    }
    let kubeconfig = lab.state.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig);
    let config: String = std::fs::read_to_string(lab.state.join("m1.toml"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("gateway_address") && !l.starts_with("exports_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    let kube_config = lab.state.join("m1-kubernetes.toml");
    std::fs::write(&kube_config, format!("kubernetes = true\n{config}")).unwrap();
    let log = lab.state.join("m1n2-kubernetes.log");
    let mut from_api = Command::new("ip")
        .args(["netns", "exec", &lab.ns("m1n2")])
        .arg(env!("CARGO_BIN_EXE_meshd"))
        .arg("--config")
        .arg(&kube_config)
        .arg("--admin-socket")
        .arg(lab.state.join("m1n2.admin.sock"))
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let routed = wait_until(Duration::from_secs(10), || {
        agent_routes(&lab, "m1n2").contains("10.245.0.0/16 via 172.18.1.1 dev eth0")
    });
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        routed.is_some(),
        "no route to the labelled gateway:\n{logged}"
    );
    assert!(
        logged.contains("gateway candidates, from the Kubernetes API")
            && logged.contains("one gateway candidate: routing to it")
            && logged.contains("m1-gw"),
        "{logged}"
    );
    assert!(lab
        .ping_within("m1n2pod", M2_WORKER_POD, Duration::from_secs(10))
        .is_some());
    stop(from_api.id() as i32, libc::SIGTERM);
    let _ = from_api.wait();

    // The same for a gateway: its TUN device, routes and bypass go with it.
    stop(pid(&lab, "m2"), libc::SIGTERM);
    let clean = snapshot(&lab, "m2gw");
    assert!(
        !clean.contains("table inet meshd") && !clean.contains(&lab.iface(2)),
        "{clean}"
    );
    let mut gateway = lab.start_meshd(2, |c| c);
    assert!(lab
        .ping_within("m2n2pod", M1_POD, Duration::from_secs(15))
        .is_some());
    stop(gateway.id() as i32, libc::SIGTERM);
    let _ = gateway.wait();
    assert_eq!(snapshot(&lab, "m2gw"), clean);
}

#[test]
fn vxlan_forced_carries_the_same_traffic_with_its_mtu_and_leaves_nothing() {
    if !root_or_skip("vxlan_forced_carries_the_same_traffic_with_its_mtu_and_leaves_nothing") {
        return;
    }
    let lab = Lab::up_with(
        "tz",
        "meshd",
        "meshd",
        &["--nodes", "2,2", "--no-nat", "--route-mode", "vxlan"],
    );
    const M1_POD_2: &str = "10.244.2.10";
    traffic_both_ways(&lab, ("m1n2pod", M1_POD_2), ("m2n2pod", M2_WORKER_POD));
    assert_eq!(
        curl(&lab, "m1n2pod", &format!("http://{M2_WORKER_POD}/")).as_deref(),
        Some("hello from m2n2")
    );

    // The agent's VXLAN end points at the gateway; the remote CIDRs go through it.
    let socket = lab.state.join("m1n2.admin.sock");
    let out = meshctl()
        .args(["peers", "--socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        table.starts_with("node: route agent; gateway 172.18.1.1 · vxlan (meshd-vx over eth0) ·"),
        "{table}"
    );
    assert!(
        agent_routes(&lab, "m1n2").contains("10.245.0.0/16 via 240.18.1.1 dev meshd-vx onlink"),
        "{}",
        agent_routes(&lab, "m1n2")
    );
    let link = lab.exec_ok("m1n2", &["ip", "-d", "link", "show", "meshd-vx"]);
    assert!(
        link.contains("vxlan id 77 remote 172.18.1.1 local 172.18.1.2 dev eth0")
            && link.contains("dstport 4877"),
        "{link}"
    );
    // MTU: the underlay's less VXLAN's 50 bytes; a larger packet with DF gets "fragmentation
    // needed" naming it, a packet at the tunnel MTU passes.
    let mtu = |node: &str, dev: &str| -> u32 {
        let show = lab.exec_ok(node, &["ip", "-o", "link", "show", dev]);
        show.split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(mtu("m1n2", "meshd-vx"), mtu("m1n2", "eth0") - 50);
    // One ping of `size` bytes of payload with DF set, from m1n2's pod to m2n2's.
    let df_ping = |size: &str| {
        lab.exec(
            "m1n2pod",
            &[
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                "-M",
                "do",
                "-s",
                size,
                M2_WORKER_POD,
            ],
        )
    };
    let big = df_ping("1423");
    assert!(text(&big).contains("mtu = 1450"), "{}", text(&big));
    let fits = df_ping("1392");
    assert!(fits.status.success(), "{}", text(&fits));
    let report = lab.exec(
        "m1n2",
        &[
            env!("CARGO_BIN_EXE_meshctl"),
            "diagnose",
            "--socket",
            socket.to_str().unwrap(),
        ],
    );
    assert!(report.status.success(), "{}", text(&report));
    let rp_filter =
        |node: &str| lab.exec_ok(node, &["sysctl", "-n", "net.ipv4.conf.eth0.rp_filter"]);
    assert_eq!(
        rp_filter("m1n2").trim(),
        "2",
        "loosened on the underlay while the agent runs"
    );

    // A VXLAN end deleted by hand, the agent's or the gateway's, is made again within seconds,
    // with the agent's routes through it.
    for node in ["m1n2", "m1gw"] {
        lab.exec_ok(node, &["ip", "link", "del", "meshd-vx"]);
        await_route(
            &lab,
            "m1n2",
            "10.245.0.0/16 via 240.18.1.1 dev meshd-vx onlink",
            &format!("the route through a new meshd-vx after deleting {node}'s"),
        );
        assert!(
            lab.ping_within("m1n2pod", M2_WORKER_POD, Duration::from_secs(10))
                .is_some(),
            "no traffic after {node}'s meshd-vx was made again"
        );
    }
    assert_eq!(rp_filter("m1n2").trim(), "2");

    // Exiting, the agent takes its VXLAN end away and puts rp_filter back; the gateway too.
    stop(pid(&lab, "m1n2"), libc::SIGTERM);
    let clean = snapshot(&lab, "m1n2");
    assert!(!clean.contains("meshd-vx"), "{clean}");
    assert_eq!(rp_filter("m1n2").trim(), "1");
    let mut again = start_agent(&lab, "m1n2", 1);
    assert!(
        wait_until(Duration::from_secs(10), || agent_routes(&lab, "m1n2")
            .contains("meshd-vx"))
        .is_some()
    );
    assert!(lab
        .ping_within("m1n2pod", M2_WORKER_POD, Duration::from_secs(10))
        .is_some());
    stop(again.id() as i32, libc::SIGTERM);
    let _ = again.wait();
    assert_eq!(snapshot(&lab, "m1n2"), clean);
    assert_eq!(rp_filter("m1n2").trim(), "1");
    stop(pid(&lab, "m1"), libc::SIGTERM);
    assert!(!lab
        .exec_ok("m1gw", &["ip", "-o", "link", "show"])
        .contains("meshd-vx"));
}
