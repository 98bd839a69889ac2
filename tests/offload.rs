//! The offloaded hot path (TUN super-packets, UDP GSO/GRO, coalesced TUN writes) must carry every
//! kind of traffic byte-exactly, and so must the path with offload forced off.

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

/// Runs the mix in a lab started with `extra` options, after checking that each meshd's start-up
/// log line shows every setting in `expect` (e.g. "offload=true").
fn traffic_mix(prefix: &str, extra: &[&str], expect: &[&str]) {
    let lab = Lab::up_with(prefix, "meshd", "meshd", extra);
    for i in [1, 2] {
        for setting in expect {
            assert!(
                lab.log(i).contains(setting),
                "m{i} does not run with {setting}:\n{}",
                lab.log(i)
            );
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
    traffic_mix("to", &[], &["offload=true", "tx_threads=1"]);
}

#[test]
fn traffic_mix_with_offload_forced_off() {
    if !root_or_skip("traffic_mix_with_offload_forced_off") {
        return;
    }
    traffic_mix(
        "tf",
        &["--no-offload"],
        &["offload=false", "gso_segments=1"],
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
        &["offload=true", "tx_threads=2"],
    );
}
