//! The offloaded hot path (TUN super-packets, UDP GSO/GRO, coalesced TUN writes) must carry every
//! kind of traffic byte-exactly, and so must the path with offload forced off; the packet
//! threads run under SCHED_BATCH unless told not to.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;
use support::*;

/// Deterministic incompressible data.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` from a server in namespace `server_ns` at `addr` to a client in `client_ns`;
/// returns what the client received.
fn transfer(lab: &Lab, server_ns: &str, addr: &str, client_ns: &str, data: Vec<u8>) -> Vec<u8> {
    let listener = in_netns(&lab.ns(server_ns), {
        let addr = addr.to_string();
        move || TcpListener::bind(addr).unwrap()
    });
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(&data).unwrap();
    });
    let mut conn = in_netns(&lab.ns(client_ns), {
        let addr = addr.to_string();
        move || TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(10)).unwrap()
    });
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    server.join().unwrap();
    got
}

/// The scheduling policy (SCHED_OTHER 0, SCHED_BATCH 3, ...) of each thread of process `pid`,
/// by thread name.
fn thread_policies(pid: i32) -> Vec<(String, i32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        let stat = std::fs::read_to_string(task.join("stat")).unwrap();
        // Fields after the name's closing parenthesis start with the third (state); the
        // policy is the 41st.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = after_name.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        threads.push((comm.trim().to_string(), policy));
    }
    threads
}

/// Runs the mix in a lab started with `extra` options, after checking that each meshd's start-up
/// log line shows every setting in `expect` (e.g. "offload=true") and that its packet threads
/// (`tx_threads` of `meshd-tx`, one `meshd-rx`) and only they run under SCHED_BATCH when
/// `expect` has "batch_scheduling=true".
fn traffic_mix(prefix: &str, extra: &[&str], expect: &[&str]) {
    let lab = Lab::up_with(prefix, "meshd", "meshd", extra);
    let batch = expect.contains(&"batch_scheduling=true");
    let tx_threads = if expect.contains(&"tx_threads=2") {
        2
    } else {
        1
    };
    for i in [1, 2] {
        for setting in expect {
            assert!(
                lab.log(i).contains(setting),
                "m{i} does not run with {setting}:\n{}",
                lab.log(i)
            );
        }
        let threads = thread_policies(lab.pid(i));
        let packet = |name: &str| name == "meshd-tx" || name == "meshd-rx";
        let count = |name: &str| threads.iter().filter(|(n, _)| n == name).count();
        assert_eq!(
            (count("meshd-tx"), count("meshd-rx")),
            (tx_threads, 1),
            "m{i}: {threads:?}"
        );
        for (name, policy) in &threads {
            let want = if batch && packet(name) {
                libc::SCHED_BATCH
            } else {
                libc::SCHED_OTHER
            };
            assert_eq!(*policy, want, "m{i}'s thread {name}: {threads:?}");
        }
    }

    // Byte-exact bulk transfers both ways (a mismatch names the first bad offset).
    // IPv4 and IPv6 (TCPv6 super-packets take their own segmentation path).
    for (server, addr, client, seed, size) in [
        ("m2pod", "10.245.1.10:5001", "m1pod", 7, 64 << 20),
        ("m1pod", "10.244.1.10:5002", "m2pod", 11, 64 << 20),
        ("m2pod", "[fd00:245::10]:5003", "m1pod", 13, 16 << 20),
        ("m1pod", "[fd00:244::10]:5004", "m2pod", 17, 16 << 20),
    ] {
        let sent = payload(size, seed);
        let got = transfer(&lab, server, addr, client, sent.clone());
        assert_eq!(
            got.len(),
            sent.len(),
            "{server} -> {client}: length differs"
        );
        if let Some(at) = got.iter().zip(&sent).position(|(a, b)| a != b) {
            panic!("{server} -> {client}: first corrupted byte at offset {at}");
        }
    }

    // Both directions at once.
    let both = lab.iperf3("m1pod", "m2pod", M2_POD, &["-t", "2", "--bidir"]);
    assert!(both > 0);

    // TCP, UDP and ICMP together.
    let pinger = {
        let ns = lab.ns("m1pod");
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns, "ping", "-c", "100", "-i", "0.02", "-s", "1200", M2_POD,
                ])
                .output()
                .unwrap()
        })
    };
    let tcp = {
        let ns = lab.ns("m2pod");
        lab.exec_ok("m1pod", &["iperf3", "-s", "-1", "-D", "-p", "5202"]);
        std::thread::sleep(Duration::from_millis(300));
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns, "iperf3", "-c", M1_POD, "-p", "5202", "-t", "3", "-J",
                ])
                .output()
                .unwrap()
        })
    };
    let udp = lab.iperf3(
        "m1pod",
        "m2pod",
        M2_POD,
        &["-u", "-b", "100M", "-t", "3", "-l", "1300"],
    );
    assert!(udp > 0, "no UDP received");
    let tcp = tcp.join().unwrap();
    assert!(
        tcp.status.success(),
        "TCP during the mix failed:\n{}",
        text(&tcp)
    );
    assert!(received_bytes(&String::from_utf8_lossy(&tcp.stdout)).unwrap() > 0);
    let ping = pinger.join().unwrap();
    let summary = String::from_utf8_lossy(&ping.stdout).to_string();
    let received: u32 = summary
        .split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ping summary:\n{summary}"));
    assert!(received >= 90, "ICMP lost in the mix: {summary}");
}

#[test]
fn traffic_mix_with_offload() {
    if !root_or_skip("traffic_mix_with_offload") {
        return;
    }
    traffic_mix(
        "to",
        &[],
        &["offload=true", "tx_threads=1", "batch_scheduling=true"],
    );
}

#[test]
fn traffic_mix_with_offload_forced_off() {
    if !root_or_skip("traffic_mix_with_offload_forced_off") {
        return;
    }
    traffic_mix(
        "tf",
        &["--no-offload", "--no-batch-scheduling"],
        &["offload=false", "gso_segments=1", "batch_scheduling=false"],
    );
}

#[test]
fn traffic_mix_with_two_transmit_queues() {
    if !root_or_skip("traffic_mix_with_two_transmit_queues") {
        return;
    }
    traffic_mix(
        "tq",
        &["--tx-threads", "2"],
        &["offload=true", "tx_threads=2", "batch_scheduling=true"],
    );
}

/// Waits until gateway `i`'s log has a line containing every one of `words`.
fn wait_for_log(lab: &Lab, i: u8, words: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !lab
        .log(i)
        .lines()
        .any(|line| words.iter().all(|w| line.contains(w)))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "m{i} never logged {words:?}:\n{}",
            lab.log(i)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One 1400-byte ping with DF from m1pod to m2pod; what ping printed.
fn df_ping_1400(lab: &Lab) -> String {
    let ping = lab.exec(
        "m1pod",
        &[
            "ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1372", M2_POD,
        ],
    );
    text(&ping)
}

/// The underlay between the gateways carries 1400 bytes, less than the tunnel's 1420 plus
/// WireGuard's 60: meshd must answer oversized packets with ICMP too-big (DF, IPv6) or fragment
/// them (IPv4 without DF) so that traffic keeps flowing, and follow the MTU back up.
fn smaller_underlay(prefix: &str, extra: &[&str]) {
    let lab = Lab::up_with(prefix, "meshd", "meshd", extra);
    for gw in ["m1gw", "m2gw"] {
        lab.exec_ok(gw, &["ip", "link", "set", "ul0", "mtu", "1400"]);
    }
    for i in [1, 2] {
        wait_for_log(
            &lab,
            i,
            &["path MTU", "route_mtu=1400", "largest_packet=1340"],
        );
    }

    // A connection opened now has its SYNs clamped to the path (1340 - 40), so the server in
    // m2pod, which has learned no path MTU towards m1pod, sends segments that fit from the start.
    let (mss, ss) = lab.tcp_mss(5010, "m2pod");
    assert!(
        mss <= 1300,
        "server MSS {mss} exceeds the path's 1300:\n{ss}"
    );

    let out = df_ping_1400(&lab);
    assert!(
        out.contains("Frag needed and DF set (mtu = 1340)"),
        "no ICMP fragmentation needed for a 1400-byte DF packet:\n{out}"
    );
    let ping6 = lab.exec(
        "m1pod",
        &["ping", "-c", "1", "-W", "1", "-s", "1372", "fd00:245::10"],
    );
    let out = text(&ping6);
    assert!(
        out.contains("Packet too big: mtu=1340"),
        "no ICMPv6 packet too big for a 1420-byte packet:\n{out}"
    );
    let unfragmentable = lab.exec(
        "m1pod",
        &[
            "ping", "-c", "3", "-W", "1", "-M", "dont", "-s", "3000", M2_POD,
        ],
    );
    assert!(
        unfragmentable.status.success(),
        "IPv4 without DF is not carried as fragments:\n{}",
        text(&unfragmentable)
    );

    for (server, addr, client, seed) in [
        ("m2pod", "10.245.1.10:5011", "m1pod", 23),
        ("m1pod", "10.244.1.10:5012", "m2pod", 29),
        ("m2pod", "[fd00:245::10]:5013", "m1pod", 31),
    ] {
        let sent = payload(8 << 20, seed);
        let got = transfer(&lab, server, addr, client, sent.clone());
        assert!(got == sent, "{server} -> {client}: transfer differs");
    }
    let metrics = lab.exec_ok("m1gw", &["curl", "-s", "http://127.0.0.1:9090/metrics"]);
    let too_big = metric(&metrics, "meshd_dropped_packets_total{reason=\"too_big\"}");
    assert!(
        too_big.unwrap_or(0.0) >= 2.0,
        "too_big not counted:\n{metrics}"
    );

    for gw in ["m1gw", "m2gw"] {
        lab.exec_ok(gw, &["ip", "link", "set", "ul0", "mtu", "1500"]);
    }
    wait_for_log(
        &lab,
        1,
        &["path MTU", "route_mtu=1500", "largest_packet=1420"],
    );
}

#[test]
fn smaller_underlay_mtu_with_offload() {
    if !root_or_skip("smaller_underlay_mtu_with_offload") {
        return;
    }
    smaller_underlay("pm", &[]);
}

#[test]
fn smaller_underlay_mtu_with_offload_forced_off() {
    if !root_or_skip("smaller_underlay_mtu_with_offload_forced_off") {
        return;
    }
    smaller_underlay("pn", &["--no-offload"]);
}

/// An ICMP "fragmentation needed" for a 1480-byte WireGuard datagram from 192.0.2.1:51820 to
/// 192.0.2.2:51820 announcing `mtu`, as a router between the gateways would send it to M1's
/// gateway (Python: the test needs a raw socket in another namespace).
const FRAG_NEEDED: &str = r#"
import socket, struct, sys
def checksum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1480, 0, 0x4000, 64, 17, 0,
                 socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.2"))
ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
icmp = struct.pack("!BBHHH", 3, 4, 0, 0, int(sys.argv[1])) + ip + struct.pack("!HHHH", 51820, 51820, 1460, 0)
icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).sendto(icmp, ("192.0.2.1", 0))
"#;

#[test]
fn a_smaller_mtu_learned_from_a_router_lowers_the_path_limit() {
    if !root_or_skip("a_smaller_mtu_learned_from_a_router_lowers_the_path_limit") {
        return;
    }
    // The gateways' own interfaces carry 1500: only the kernel's path MTU cache, filled by the
    // router's ICMP, knows that the path to M2 carries 1400.
    let lab = Lab::up("pr", "meshd", "meshd");
    lab.exec_ok("m2gw", &["python3", "-c", FRAG_NEEDED, "1400"]);
    let route = lab.exec_ok("m1gw", &["ip", "route", "get", "192.0.2.2"]);
    assert!(route.contains("mtu 1400"), "no path MTU learned:\n{route}");
    wait_for_log(
        &lab,
        1,
        &["path MTU", "route_mtu=1400", "largest_packet=1340"],
    );
    let out = df_ping_1400(&lab);
    assert!(
        out.contains("Frag needed and DF set (mtu = 1340)"),
        "no ICMP fragmentation needed after the router's:\n{out}"
    );
    // The learned MTU forgotten: the limit goes back to the tunnel MTU.
    lab.exec_ok("m1gw", &["ip", "route", "flush", "cache"]);
    wait_for_log(
        &lab,
        1,
        &["path MTU", "route_mtu=1500", "largest_packet=1420"],
    );
}
