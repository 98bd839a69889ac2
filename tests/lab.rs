//! End-to-end tests in the two-cluster lab (scripts/lab.sh): real namespaces, TUN devices, UDP,
//! iperf3, ping, wg and wireguard-go. They need root and skip with a message otherwise.

mod support;

use boringtun::noise::{Tunn, TunnResult};
use meshd::keys::{PrivateKey, PublicKey};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::*;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Checks `wg show dump` of gateway `i`: one peer, a handshake in the last `max_age` seconds,
/// transfer both ways; returns (rx, tx).
fn assert_wg_peer_live(lab: &Lab, i: u8, max_age: u64) -> (u64, u64) {
    let dump = lab.wg_dump(i);
    assert_eq!(dump.len(), 2, "expected the device and one peer: {dump:?}");
    let peer = &dump[1];
    let handshake: u64 = peer[4].parse().unwrap();
    assert!(handshake > 0, "no handshake: {peer:?}");
    assert!(
        now_secs().saturating_sub(handshake) <= max_age,
        "stale handshake: {peer:?}"
    );
    let (rx, tx): (u64, u64) = (peer[5].parse().unwrap(), peer[6].parse().unwrap());
    assert!(rx > 0 && tx > 0, "no transfer: {peer:?}");
    (rx, tx)
}

#[test]
fn pods_reach_each_other_both_ways_through_meshd() {
    if !root_or_skip("pods_reach_each_other_both_ways_through_meshd") {
        return;
    }
    let lab = Lab::up("tp", "meshd", "meshd");
    assert!(lab.ping("m1pod", M2_POD), "m1pod cannot ping m2pod");
    assert!(lab.ping("m2pod", M1_POD), "m2pod cannot ping m1pod");
    let there = lab.iperf3("m1pod", "m2pod", M2_POD, &["-t", "2"]);
    let back = lab.iperf3("m2pod", "m1pod", M1_POD, &["-t", "2"]);
    assert!(
        there > 0 && back > 0,
        "iperf3 moved {there} and {back} bytes"
    );

    // meshd programmed the remote CIDRs through its interface.
    let routes = lab.exec_ok("m1gw", &["ip", "route", "show", "dev", &lab.iface(1)]);
    for cidr in ["10.245.0.0/16", "10.97.0.0/16"] {
        assert!(routes.contains(cidr), "route {cidr} missing:\n{routes}");
    }

    // wg show works against meshd and counts at least what iperf3 moved.
    let (rx, tx) = assert_wg_peer_live(&lab, 1, 60);
    assert!(
        tx >= there && rx >= back,
        "wg counters {rx}/{tx} below iperf3's {back}/{there}"
    );

    // The UAPI socket carries the private key: root only.
    let socket = format!("/var/run/wireguard/{}.sock", lab.iface(1));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{socket} mode {mode:o}");

    // Metrics agree with wg on the byte counters.
    let body = lab.http_get("m1gw", "127.0.0.1:9090", "/metrics");
    let metric_tx = metric(&body, "meshd_peer_tx_bytes_total{peer=\"m2\"}").expect("tx metric");
    assert!(
        metric_tx >= tx as f64,
        "metrics tx {metric_tx} < wg tx {tx}:\n{body}"
    );

    udp_bursts_arrive_whole_and_in_order_through_coalesced_tun_writes(&lab);
}

/// Payload of datagram `seq` of flow `flow`, `len` bytes: the numbers, then a pattern of both.
fn udp_payload(flow: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut p = vec![flow];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((5..len).map(|i| (i as u32 ^ seq ^ (u32::from(flow) * 77)) as u8));
    p
}

/// Bursts of UDP datagrams of two flows from M1's pod to M2's arrive whole and in order per flow,
/// through TUN writes that coalesced them (M2's meshd wrote fewer packets than datagrams).
fn udp_bursts_arrive_whole_and_in_order_through_coalesced_tun_writes(lab: &Lab) {
    let receiver = lab.udp_socket_in("m2pod");
    // Room for the whole burst: what is measured is meshd, not this socket.
    let size: libc::c_int = 16 << 20;
    // SAFETY: an open socket; the value is a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&receiver),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::addr_of!(size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    let port = receiver.local_addr().unwrap().port();
    let to: SocketAddr = format!("{M2_POD}:{port}").parse().unwrap();
    let tun_writes = || -> u64 {
        let path = format!("/sys/class/net/{}/statistics/rx_packets", lab.iface(2));
        lab.exec_ok("m2gw", &["cat", &path]).trim().parse().unwrap()
    };
    let writes_before = tun_writes();
    // Two flows (two source ports), interleaved in bursts, full-size and odd sizes, the last
    // of each burst shorter: 1,500 datagrams.
    let senders = [lab.udp_socket_in("m1pod"), lab.udp_socket_in("m1pod")];
    let mut sent = [0u32; 2];
    let sizes = [1300usize, 1300, 1300, 1300, 1300, 1300, 700, 1300, 64, 1];
    for burst in 0..150 {
        for (k, len) in sizes.iter().enumerate() {
            let flow = (burst + k) % 2;
            let payload = udp_payload(flow as u8, sent[flow], (*len).max(5));
            senders[flow].send_to(&payload, to).unwrap();
            sent[flow] += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    receiver
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut next = [0u32; 2];
    let mut buf = vec![0u8; 2048];
    while let Ok(n) = receiver.recv(&mut buf) {
        let flow = usize::from(buf[0]);
        let seq = u32::from_be_bytes(buf[1..5].try_into().unwrap());
        assert!(flow < 2, "a datagram of no flow: {:?}", &buf[..n.min(16)]);
        assert_eq!(
            seq, next[flow],
            "flow {flow}: datagram {seq} where {} was due",
            next[flow]
        );
        assert_eq!(
            buf[..n],
            udp_payload(flow as u8, seq, n)[..],
            "flow {flow} datagram {seq} changed"
        );
        next[flow] += 1;
    }
    assert_eq!(next, sent, "datagrams received of those sent, per flow");
    let writes = tun_writes() - writes_before;
    let datagrams = u64::from(sent[0] + sent[1]);
    assert!(
        writes < datagrams,
        "{datagrams} datagrams took {writes} TUN writes: nothing was coalesced"
    );
}

#[test]
fn interop_with_wireguard_go_both_ways() {
    if !root_or_skip("interop_with_wireguard_go_both_ways") {
        return;
    }
    let lab = Lab::up("ti", "meshd", "wireguard-go");
    assert!(
        lab.ping("m1pod", M2_POD),
        "meshd -> wireguard-go ping failed"
    );
    assert!(
        lab.ping("m2pod", M1_POD),
        "wireguard-go -> meshd ping failed"
    );
    assert!(lab.iperf3("m1pod", "m2pod", M2_POD, &["-t", "2"]) > 0);
    assert!(lab.iperf3("m2pod", "m1pod", M1_POD, &["-t", "2"]) > 0);
    assert!(
        lab.ping_within("m1pod", "fd00:245::10", Duration::from_secs(5))
            .is_some(),
        "IPv6 meshd -> wireguard-go"
    );
    assert!(
        lab.ping("m2pod", "fd00:244::10"),
        "IPv6 wireguard-go -> meshd"
    );
    assert_wg_peer_live(&lab, 1, 60);
    assert_wg_peer_live(&lab, 2, 60);
}

#[test]
fn empty_meshd_configured_only_with_wg_set() {
    if !root_or_skip("empty_meshd_configured_only_with_wg_set") {
        return;
    }
    let lab = Lab::up("tw", "meshd-wg", "meshd");
    assert!(lab.ping("m2pod", M1_POD));
    assert!(lab.iperf3("m1pod", "m2pod", M2_POD, &["-t", "2"]) > 0);
    // meshd routed the allowed IPs that `wg set` gave it.
    let routes = lab.exec_ok("m1gw", &["ip", "route", "show", "dev", &lab.iface(1)]);
    assert!(routes.contains("10.245.0.0/16"), "{routes}");
    // `wg showconf` | `wg setconf` round-trips.
    let conf = lab.exec_ok("m1gw", &["wg", "showconf", &lab.iface(1)]);
    let path = lab.state.join("m1.conf");
    std::fs::write(&path, &conf).unwrap();
    lab.exec_ok(
        "m1gw",
        &["wg", "setconf", &lab.iface(1), path.to_str().unwrap()],
    );
    assert!(lab.ping("m1pod", M2_POD));
    // A new listen port through wg set: meshd rebinds, and M2 follows M1's new source port.
    lab.exec_ok(
        "m1gw",
        &["wg", "set", &lab.iface(1), "listen-port", "51900"],
    );
    assert_eq!(lab.wg_dump(1)[0][2], "51900");
    assert!(
        lab.ping_within("m1pod", M2_POD, Duration::from_secs(5))
            .is_some(),
        "no traffic after the listen port changed\n{}",
        lab.log(1)
    );
    assert_eq!(lab.wg_dump(2)[1][2], format!("{M1_UNDERLAY}:51900"));
    // Bad input through wg set is refused and changes nothing.
    let out = lab.exec("m1gw", &["wg", "set", &lab.iface(1), "peer", "AAAA"]);
    assert!(!out.status.success());
    assert_eq!(lab.wg_dump(1).len(), 2);
}

#[test]
fn peer_restart_gets_traffic_flowing_within_5s() {
    if !root_or_skip("peer_restart_gets_traffic_flowing_within_5s") {
        return;
    }
    let lab = Lab::up("tr", "meshd", "meshd");
    assert!(lab.ping("m1pod", M2_POD));
    let mut child = lab.restart_meshd(2, |config| config);
    // Traffic from the side that did not restart: it still holds the old session.
    let took = lab.ping_within("m1pod", M2_POD, Duration::from_secs(5));
    assert!(
        took.is_some(),
        "no traffic within 5 s of the peer's restart\n{}",
        lab.log(2)
    );
    // SAFETY: signal 0 only checks existence.
    assert_eq!(
        unsafe { libc::kill(child.id() as i32, 0) },
        0,
        "restarted meshd died\n{}",
        lab.log(2)
    );
    assert!(lab.ping("m2pod", M1_POD));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn peer_behind_nat_is_reached_and_followed_when_it_roams() {
    if !root_or_skip("peer_behind_nat_is_reached_and_followed_when_it_roams") {
        return;
    }
    // M1 knows no endpoint for M2; M2 contacts M1 and keeps the path open.
    let lab = Lab::up_with("tn", "meshd", "meshd", &["--nat"]);
    assert!(lab.ping("m1pod", M2_POD));
    assert_eq!(lab.wg_dump(1)[1][2], format!("{M2_UNDERLAY}:51820"));

    // M2 moves to another port (a NAT rebinding): M1 follows its authenticated packets.
    let mut child = lab.restart_meshd(2, |config| {
        config.replace("listen_port = 51820", "listen_port = 40000")
    });
    let reached = lab.ping_within("m1pod", M2_POD, Duration::from_secs(10));
    let endpoint = lab.wg_dump(1)[1][2].clone();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        reached.is_some(),
        "M1 did not follow M2 to its new port\n{}",
        lab.log(2)
    );
    assert_eq!(endpoint, format!("{M2_UNDERLAY}:40000"));
}

#[test]
fn second_up_after_a_crash_works() {
    if !root_or_skip("second_up_after_a_crash_works") {
        return;
    }
    let lab = Lab::up("tc", "meshd", "meshd");
    // The script died without `down`: namespaces, processes and sockets are all still there.
    let out = lab.up_again();
    assert!(out.status.success(), "second up failed:\n{}", text(&out));
    assert!(lab.ping("m1pod", M2_POD));
    assert!(lab.ping("m2pod", M1_POD));
}

#[test]
fn sighup_adds_and_removes_peers_without_dropping_others() {
    if !root_or_skip("sighup_adds_and_removes_peers_without_dropping_others") {
        return;
    }
    let lab = Lab::up("th", "meshd", "meshd");
    assert!(lab.ping("m1pod", M2_POD));
    let handshake_before = lab.wg_dump(1)[1][4].clone();
    let config = lab.state.join("m1.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let extra = PrivateKey::generate().public_key();
    std::fs::write(
        &config,
        format!("{original}\n[[peers]]\nname = \"m3\"\npublic_key = \"{extra}\"\nallowed_cidrs = [\"10.246.0.0/16\"]\n"),
    )
    .unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(lab.pid(1), libc::SIGHUP) };
    let start = std::time::Instant::now();
    while lab.wg_dump(1).len() != 3 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lab.wg_dump(1).len(), 3, "peer m3 not added\n{}", lab.log(1));
    let routes = lab.exec_ok("m1gw", &["ip", "route", "show", "dev", &lab.iface(1)]);
    assert!(routes.contains("10.246.0.0/16"), "{routes}");
    assert!(lab.ping("m1pod", M2_POD), "m2 dropped by the reload");
    let m2 = lab
        .wg_dump(1)
        .into_iter()
        .find(|l| l[3].contains("10.245.0.0/16"))
        .unwrap();
    assert_eq!(
        m2[4], handshake_before,
        "m2's session was restarted by the reload"
    );

    // A config that fails validation is refused and the running one stays.
    std::fs::write(&config, format!("mtu = 10\n{original}")).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(lab.pid(1), libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.wg_dump(1).len(), 3);
    assert!(lab.log(1).contains("mtu: 10 is below"), "{}", lab.log(1));

    std::fs::write(&config, &original).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(lab.pid(1), libc::SIGHUP) };
    let start = std::time::Instant::now();
    while lab.wg_dump(1).len() != 2 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lab.wg_dump(1).len(), 2, "peer m3 not removed");
    let routes = lab.exec_ok("m1gw", &["ip", "route", "show", "dev", &lab.iface(1)]);
    assert!(!routes.contains("10.246.0.0/16"), "{routes}");
    assert!(lab.ping("m1pod", M2_POD));
}

/// A small deterministic generator for garbage (no test depends on its quality).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Captures WireGuard data packets m1gw sends to m2gw, as seen on m2gw's underlay.
fn capture_data_packets(lab: &Lab, count: usize) -> Vec<Vec<u8>> {
    in_netns(&lab.ns("m2gw"), move || {
        // SAFETY: plain socket creation; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                (libc::ETH_P_IP as u16).to_be() as i32,
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut packets = Vec::new();
        let mut buf = vec![0u8; 65536];
        while packets.len() < count {
            // SAFETY: buf is valid for its length; fd is open.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n > 0);
            let ip = &buf[..n as usize];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[9] != 17 || ip[12..16] != [192, 0, 2, 1] || ip.len() < ihl + 8 + 32 {
                continue;
            }
            let udp = &ip[ihl..];
            if u16::from_be_bytes([udp[2], udp[3]]) != 51820 || udp[8] != 4 {
                continue;
            }
            packets.push(udp[8..].to_vec());
        }
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        packets
    })
}

#[test]
fn garbage_flood_is_dropped_and_counted_while_iperf3_runs() {
    if !root_or_skip("garbage_flood_is_dropped_and_counted_while_iperf3_runs") {
        return;
    }
    let lab = Lab::up("tg", "meshd", "meshd");
    let m2_key = PublicKey::from_base64(
        "m2.pub",
        &std::fs::read_to_string(lab.state.join("m2.pub")).unwrap(),
    )
    .unwrap();
    let target: SocketAddr = format!("{M2_UNDERLAY}:51820").parse().unwrap();

    // Real data packets to replay, captured while traffic flows.
    let pinger = {
        let ns = lab.ns("m1pod");
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns, "ping", "-c", "40", "-i", "0.05", M2_POD,
                ])
                .output()
                .unwrap()
        })
    };
    let captured = capture_data_packets(&lab, 20);
    pinger.join().unwrap();

    // Handshake initiations from keys m2 does not know (valid MAC1: they reach the DH step).
    let mut strangers = Vec::new();
    for i in 0..50u32 {
        let mut tunn = Tunn::new(
            boringtun::x25519::StaticSecret::from(*PrivateKey::generate().as_bytes()),
            boringtun::x25519::PublicKey::from(*m2_key.as_bytes()),
            None,
            None,
            i,
            None,
        );
        let mut out = vec![0u8; 256];
        match tunn.format_handshake_initiation(&mut out, false) {
            TunnResult::WriteToNetwork(init) => strangers.push(init.to_vec()),
            _ => panic!("no handshake initiation"),
        }
    }

    let iperf = {
        let ns1 = lab.ns("m1pod");
        let pidfile = lab.state.join("iperf3-flood.pid");
        lab.exec_ok(
            "m2pod",
            &["iperf3", "-s", "-1", "-D", "-I", pidfile.to_str().unwrap()],
        );
        std::thread::sleep(Duration::from_millis(300));
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns1, "iperf3", "-c", M2_POD, "-t", "6", "-J",
                ])
                .output()
                .unwrap()
        })
    };

    let socket = lab.udp_socket_in("m1gw");
    let mut rng = XorShift(0x9e3779b97f4a7c15);
    let (mut random, mut truncated, mut handshakes, mut replays) = (0u64, 0u64, 0u64, 0u64);
    let mut oversized = 0u64;
    for i in 0..100_000u64 {
        let datagram = match i % 5 {
            0 => {
                random += 1;
                // Never a valid type byte 1-4 with a valid length: pure noise.
                let len = 1 + (rng.next() % 1400) as usize;
                let mut d = rng.bytes(len);
                d[0] = 5 + (d[0] % 250);
                d
            }
            1 => {
                truncated += 1;
                let kind = 1 + (rng.next() % 4) as u8;
                let len = match kind {
                    1 => 147,
                    2 => 91,
                    3 => 63,
                    _ => 31,
                };
                let mut d = rng.bytes(len);
                d[..4].copy_from_slice(&[kind, 0, 0, 0]);
                d
            }
            2 => {
                handshakes += 1;
                strangers[(i as usize / 5) % strangers.len()].clone()
            }
            3 => {
                replays += 1;
                captured[(i as usize / 5) % captured.len()].clone()
            }
            _ => {
                // A data message far longer than a receive slot, with a live receiver index
                // (taken from a captured packet) or a dead one; a few at UDP's largest size.
                oversized += 1;
                let mut d = captured[(i as usize / 5) % captured.len()].clone();
                if i % 2 == 0 {
                    d[4..8].copy_from_slice(&(rng.next() as u32).to_le_bytes());
                }
                let len = if i % 97 == 4 {
                    65_507
                } else {
                    1_700 + (rng.next() % 7_000) as usize
                };
                d.resize(len, 0x5a);
                d
            }
        };
        socket.send_to(&datagram, target).unwrap();
        if i % 200 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    let out = iperf.join().unwrap();
    assert!(
        out.status.success(),
        "iperf3 failed during the flood:\n{}",
        text(&out)
    );
    let moved = received_bytes(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert!(moved > 0, "iperf3 moved nothing during the flood");
    assert!(lab.ping("m1pod", M2_POD), "tunnel broken after the flood");
    assert!(lab.ping("m2pod", M1_POD), "tunnel broken after the flood");

    let body = lab.http_get("m2gw", "127.0.0.1:9090", "/metrics");
    let dropped = |reason: &str| {
        metric(
            &body,
            &format!("meshd_dropped_packets_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let garbage = dropped("garbage");
    let strangers_dropped =
        dropped("unknown_peer") + dropped("under_load") + dropped("rate_limited");
    let replayed = dropped("replay");
    let too_long = dropped("oversized");
    let sent = (random + truncated + handshakes + replays + oversized) as f64;
    let counted = garbage + strangers_dropped + replayed + too_long;
    assert!(
        garbage >= 0.9 * (random + truncated) as f64,
        "garbage {garbage}\n{body}"
    );
    assert!(
        strangers_dropped >= 0.9 * handshakes as f64,
        "strangers {strangers_dropped}\n{body}"
    );
    assert!(
        replayed >= 0.9 * replays as f64,
        "replays {replayed}\n{body}"
    );
    assert!(
        too_long >= 0.8 * oversized as f64,
        "oversized {too_long} of {oversized}\n{body}"
    );
    assert!(
        counted <= sent + 100.0,
        "counted {counted} of {sent} sent\n{body}"
    );
    // meshd is still the process we started.
    // SAFETY: signal 0 only checks existence.
    assert_eq!(
        unsafe { libc::kill(lab.pid(2), 0) },
        0,
        "meshd died\n{}",
        lab.log(2)
    );
}

#[test]
fn tcp_mss_is_clamped_to_the_tunnel() {
    if !root_or_skip("tcp_mss_is_clamped_to_the_tunnel") {
        return;
    }
    // Pods have MTU 1500 (MSS 1460); the tunnel has 1420, so SYNs must carry at most 1380.
    let lab = Lab::up("tm", "meshd", "meshd");
    let (mss, ss) = lab.tcp_mss(5003, "m1pod");
    assert!(
        mss <= 1380,
        "connection MSS {mss} exceeds the tunnel's 1380:\n{ss}"
    );
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    if !root_or_skip("spoofed_inner_source_is_dropped_and_counted") {
        return;
    }
    let lab = Lab::up("ts", "meshd", "meshd");
    let bad_source = |lab: &Lab| {
        let body = lab.http_get("m1gw", "127.0.0.1:9090", "/metrics");
        metric(&body, "meshd_dropped_packets_total{reason=\"bad_source\"}").unwrap_or(0.0)
    };
    let before = bad_source(&lab);
    // M2's gateway sends from an address outside what M1 allows for M2 (10.245.0.0/16 etc.).
    lab.exec_ok("m2gw", &["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"]);
    let out = lab.exec(
        "m2gw",
        &[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "10.99.0.1",
            M1_POD,
        ],
    );
    assert!(
        !out.status.success(),
        "spoofed pings were answered:\n{}",
        text(&out)
    );
    let after = bad_source(&lab);
    assert!(
        after >= before + 3.0,
        "bad_source went from {before} to {after}"
    );
    // Legitimate traffic still flows.
    assert!(lab.ping("m2pod", M1_POD));
}

#[test]
fn gateways_reach_each_other_over_an_ipv6_underlay() {
    if !root_or_skip("gateways_reach_each_other_over_an_ipv6_underlay") {
        return;
    }
    let lab = Lab::up_with("t6", "meshd", "wireguard-go", &["--ipv6-underlay"]);
    assert!(lab.ping("m1pod", M2_POD));
    assert!(lab.ping("m2pod", M1_POD));
    assert!(lab
        .ping_within("m1pod", "fd00:245::10", Duration::from_secs(5))
        .is_some());
    assert_eq!(lab.wg_dump(1)[1][2], "[fd00:192::2]:51820");
    assert_eq!(lab.wg_dump(2)[1][2], "[fd00:192::1]:51820");
}

/// `wg set IFACE fwmark N` marks the tunnel's UDP packets: with a policy rule that sends marked
/// packets to a table where the peer is unreachable, the tunnel stops; with the mark cleared it
/// carries traffic again.
#[test]
fn fwmark_set_with_wg_marks_the_tunnels_packets() {
    if !root_or_skip("fwmark_set_with_wg_marks_the_tunnels_packets") {
        return;
    }
    let lab = Lab::up("ty", "meshd", "meshd");
    let iface = lab.iface(1);
    assert!(lab.ping("m1pod", M2_POD));
    lab.exec_ok(
        "m1gw",
        &["ip", "rule", "add", "fwmark", "0x51", "lookup", "51"],
    );
    lab.exec_ok(
        "m1gw",
        &[
            "ip",
            "route",
            "add",
            "unreachable",
            M2_UNDERLAY,
            "table",
            "51",
        ],
    );
    lab.exec_ok("m1gw", &["wg", "set", &iface, "fwmark", "0x51"]);
    let shown = lab.exec_ok("m1gw", &["wg", "show", &iface, "fwmark"]);
    assert_eq!(shown.trim(), "0x51");
    assert!(
        !lab.ping("m1pod", M2_POD),
        "marked packets still reached the peer: the mark was not applied"
    );
    lab.exec_ok("m1gw", &["wg", "set", &iface, "fwmark", "0"]);
    assert!(lab.ping("m1pod", M2_POD), "the tunnel did not recover");
}

/// A route for a peer's CIDR that already goes through another device is a conflict meshd
/// refuses to start with (naming the route and the fix), not a route it counts as its own.
#[test]
fn a_route_through_another_device_is_a_conflict() {
    if !root_or_skip("a_route_through_another_device_is_a_conflict") {
        return;
    }
    let lab = Lab::up("tk", "meshd", "meshd");
    lab.kill_meshd(1);
    lab.exec_ok(
        "m1gw",
        &["ip", "route", "add", "10.245.0.0/16", "via", M2_UNDERLAY],
    );
    let config = lab.state.join("m1.toml");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns("m1gw")])
        .arg(env!("CARGO_BIN_EXE_meshd"))
        .args(["--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("meshd kept running over a conflicting route");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("route 10.245.0.0/16 already goes through ul0"),
        "{stderr}"
    );
}

/// The kernel's routes and the underlay's MTU are read over netlink in both families: in a
/// namespace whose only default route is IPv6's (through a 1400-byte interface, beside a
/// smaller one without a default route; veth pairs, as this machine has no dummy module), the underlay MTU is that route's interface's, and the
/// main table's routes of both families are listed with their interfaces.
#[test]
fn routes_and_underlay_mtu_are_read_over_netlink_in_both_families() {
    if !root_or_skip("routes_and_underlay_mtu_are_read_over_netlink_in_both_families") {
        return;
    }
    let ns = "tu-netlink";
    let ip = |args: &str| {
        let out = std::process::Command::new("ip")
            .args(args.split_whitespace())
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args}: {}", text(&out));
    };
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", ns])
        .output();
    ip(&format!("netns add {ns}"));
    struct Gone(&'static str);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", self.0])
                .output();
        }
    }
    let _gone = Gone(ns);
    for cmd in [
        "link add wan0 type veth peer name wan1",
        "link set wan0 mtu 1400 up",
        "link set wan1 up",
        "link add side0 type veth peer name side1",
        "link set side0 mtu 1300 up",
        "link set side1 up",
        "-6 addr add 2001:db8:1::2/64 dev wan0 nodad",
        "-6 route add default via 2001:db8:1::1 dev wan0",
        "addr add 198.51.100.2/24 dev side0",
        "route add 10.99.0.0/16 dev side0",
        "-6 route add 2001:db8:99::/48 dev side0",
    ] {
        ip(&format!("-n {ns} {cmd}"));
    }
    let (mtu, why, routes) = in_netns(ns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mtu, why) = runtime.block_on(meshd::netlink::underlay_mtu("meshd0"));
        drop(runtime);
        (mtu, why, meshd::netlink::main_routes_blocking().unwrap())
    });
    assert_eq!(mtu, 1400, "{why}");
    assert!(why.contains("wan0") && why.contains("IPv6"), "{why}");
    for (dev, prefix) in [
        ("side0", "10.99.0.0/16"),
        ("side0", "2001:db8:99::/48"),
        ("wan0", "::/0"),
        ("wan0", "2001:db8:1::/64"),
    ] {
        assert!(
            routes
                .iter()
                .any(|(d, p)| d == dev && p.to_string() == prefix),
            "{dev} {prefix} not in {routes:?}"
        );
    }
}

/// A gateway on a host without IPv6 (booted with `ipv6.disable=1`, where every AF_INET6 socket
/// fails with EAFNOSUPPORT): the kernel flag cannot be set per namespace, so meshd runs with a
/// preloaded shim that fails AF_INET6 sockets the same way, in a namespace with IPv6 turned off.
/// meshd says its port is IPv4 only, and the tunnel carries traffic both ways.
#[test]
fn a_gateway_without_ipv6_binds_ipv4_and_carries_traffic() {
    if !root_or_skip("a_gateway_without_ipv6_binds_ipv4_and_carries_traffic") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("no_ipv6.c");
    let shim = dir.path().join("no_ipv6.so");
    std::fs::write(
        &source,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>
int socket(int domain, int type, int protocol) {
    static int (*real)(int, int, int);
    if (domain == AF_INET6) { errno = EAFNOSUPPORT; return -1; }
    if (!real) real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    return real(domain, type, protocol);
}
"#,
    )
    .unwrap();
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("cc (build-essential) builds the shim");
    assert!(out.status.success(), "{}", text(&out));

    let lab = Lab::up("tv", "meshd", "meshd");
    lab.exec_ok(
        "m1gw",
        &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
    );
    let mut m1 = lab.restart_meshd_env(1, &[("LD_PRELOAD", shim.to_str().unwrap())], |c| c);
    let log = lab.log(1);
    assert!(log.contains("IPv4 only"), "{log}");
    assert!(lab.ping("m1pod", M2_POD), "m1pod cannot reach m2pod\n{log}");
    assert!(lab.ping("m2pod", M1_POD), "m2pod cannot reach m1pod\n{log}");
    let dump = lab.wg_dump(1);
    assert_eq!(dump[0][2], "51820", "{dump:?}");
    let _ = m1.kill();
    let _ = m1.wait();
}
