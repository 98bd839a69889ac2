//! Attacks from a peer that holds its keys: the test stops M2's meshd and speaks WireGuard to M1
//! itself, with M2's key, from M2's address, so it can put any inner packet into the tunnel.
//! What an authenticated peer (or any pod of its cluster) may reach is this cluster's prefixes
//! and the gateway's own discovery services, nothing else of the gateway node or its LAN.

mod support;

use boringtun::noise::{Tunn, TunnResult};
use meshd::keys::{PrivateKey, PublicKey};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use support::*;

/// A WireGuard peer in the test process, holding M2's key, talking to M1's meshd.
struct RoguePeer {
    tunn: Tunn,
    socket: UdpSocket,
    m1: SocketAddr,
}

impl RoguePeer {
    /// Replaces M2's meshd: kills it and completes a handshake with M1 from M2's port.
    fn take_over_m2(lab: &Lab) -> RoguePeer {
        let m2 = PrivateKey::from_file(&lab.state.join("m2.key")).unwrap();
        let m1_pub = std::fs::read_to_string(lab.state.join("m1.pub")).unwrap();
        let m1 = PublicKey::from_base64("m1.pub", &m1_pub).unwrap();
        lab.kill_meshd(2);
        let socket = in_netns(&lab.ns("m2gw"), || {
            UdpSocket::bind(format!("{M2_UNDERLAY}:51820")).unwrap()
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut peer = RoguePeer {
            tunn: Tunn::new(
                boringtun::x25519::StaticSecret::from(*m2.as_bytes()),
                boringtun::x25519::PublicKey::from(*m1.as_bytes()),
                None,
                None,
                7,
                None,
            ),
            socket,
            m1: format!("{M1_UNDERLAY}:51820").parse().unwrap(),
        };
        let mut out = vec![0u8; 2048];
        match peer.tunn.format_handshake_initiation(&mut out, true) {
            TunnResult::WriteToNetwork(init) => peer.socket.send_to(init, peer.m1).unwrap(),
            _ => panic!("no handshake initiation"),
        };
        let start = Instant::now();
        while peer.tunn.time_since_last_handshake().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "M1 did not answer the handshake\n{}",
                lab.log(1)
            );
            peer.receive();
        }
        peer
    }

    fn send(&mut self, packet: &[u8]) {
        let mut out = vec![0u8; packet.len() + 64];
        match self.tunn.encapsulate(packet, &mut out) {
            TunnResult::WriteToNetwork(datagram) => {
                self.socket.send_to(datagram, self.m1).unwrap();
            }
            _ => panic!("no data message"),
        }
    }

    /// Inner packets M1 sent us within 200 ms (handshake messages are answered on the way).
    fn receive(&mut self) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        let (mut buf, mut out) = (vec![0u8; 65536], vec![0u8; 65536]);
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            let mut result = self.tunn.decapsulate(Some(from.ip()), &buf[..n], &mut out);
            loop {
                match result {
                    TunnResult::WriteToNetwork(reply) => {
                        self.socket.send_to(reply, self.m1).unwrap();
                        result = self.tunn.decapsulate(None, &[], &mut out);
                    }
                    TunnResult::WriteToTunnelV4(p, _) => {
                        packets.push(p.to_vec());
                        break;
                    }
                    _ => break,
                }
            }
        }
        packets
    }
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN from `src` (port 40000 + `port`'s low byte) to `dst:port`, checksums filled in.
fn syn(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&(40000 + (port & 0xff)).to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let pseudo = [&src.octets()[..], &dst.octets(), &[0, 6, 0, 20]].concat();
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// True when one of `packets` answers a SYN to `dst:port` (SYN-ACK or RST: the port was reached).
fn answered(packets: &[Vec<u8>], dst: Ipv4Addr, port: u16) -> bool {
    packets.iter().any(|p| {
        p.len() >= 40 && p[9] == 6 && p[12..16] == dst.octets() && p[20..22] == port.to_be_bytes()
    })
}

/// From inside the tunnel, M2's side sends SYNs to M1's gateway node (its underlay address, an
/// address on its LAN side, meshd's metrics port on the tunnel address) and to M1's pod. Only the
/// pod answers; the rest is dropped as `bad_destination` before it reaches M1's TUN device.
#[test]
fn a_peer_reaches_this_cluster_and_nothing_else_of_the_gateway() {
    if !root_or_skip("a_peer_reaches_this_cluster_and_nothing_else_of_the_gateway") {
        return;
    }
    let lab = Lab::up("tj", "meshd", "meshd");
    // M1's gateway node has a LAN side too, and something listening on every address.
    lab.exec_ok(
        "m1gw",
        &[
            "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
        ],
    );
    lab.exec_ok(
        "m1gw",
        &["ip", "addr", "add", "198.51.100.1/24", "dev", "lan0"],
    );
    lab.exec_ok("m1gw", &["ip", "link", "set", "lan0", "up"]);
    let listener = in_netns(&lab.ns("m1gw"), || {
        std::net::TcpListener::bind("0.0.0.0:2222").unwrap()
    });
    let mut rogue = RoguePeer::take_over_m2(&lab);
    let before = metric(
        &lab.http_get("m1gw", "127.0.0.1:9090", "/metrics"),
        "meshd_dropped_packets_total{reason=\"bad_destination\"}",
    )
    .unwrap();

    let src: Ipv4Addr = M2_POD.parse().unwrap();
    let pod: Ipv4Addr = M1_POD.parse().unwrap();
    let node: Ipv4Addr = M1_UNDERLAY.parse().unwrap();
    let lan: Ipv4Addr = "198.51.100.1".parse().unwrap();
    let tunnel: Ipv4Addr = "100.64.0.1".parse().unwrap();
    let forbidden = [(node, 2222), (lan, 2222), (tunnel, 9090), (tunnel, 2222)];
    let mut packets = Vec::new();
    for _ in 0..3 {
        for (dst, port) in forbidden {
            rogue.send(&syn(src, dst, port));
        }
        rogue.send(&syn(src, pod, 80));
        packets.extend(rogue.receive());
    }
    assert!(
        answered(&packets, pod, 80),
        "M1's pod did not answer through the tunnel"
    );
    for (dst, port) in forbidden {
        assert!(
            !answered(&packets, dst, port),
            "{dst}:{port} answered a peer through the tunnel"
        );
    }
    let after = metric(
        &lab.http_get("m1gw", "127.0.0.1:9090", "/metrics"),
        "meshd_dropped_packets_total{reason=\"bad_destination\"}",
    )
    .unwrap();
    assert!(
        after - before >= 3.0 * forbidden.len() as f64,
        "bad_destination went from {before} to {after}"
    );
    drop(listener);
}

/// Raises this process's open-file limit to its hard limit (the slow clients need fds).
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// 2,000 slowloris clients (request headers never finished) from 200 addresses hold sockets on
/// M1's health and metrics ports; the kubelet's probe and Prometheus still get their answers.
#[test]
fn probes_are_answered_while_2000_slow_clients_hold_sockets() {
    if !root_or_skip("probes_are_answered_while_2000_slow_clients_hold_sockets") {
        return;
    }
    raise_fd_limit();
    let lab = Lab::up("tl", "meshd", "meshd");
    let slow = in_netns(&lab.ns("m1gw"), || {
        use std::io::Write;
        let mut held = Vec::new();
        for i in 0..2000u32 {
            let from: SocketAddr = format!("127.0.{}.{}:0", 1 + i / 200, 2 + i % 200)
                .parse()
                .unwrap();
            let port = if i % 2 == 0 { 9091 } else { 9090 };
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.bind(&from.into()).unwrap();
            let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            if socket.connect(&to.into()).is_ok() {
                let mut stream: std::net::TcpStream = socket.into();
                let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
                held.push(stream);
            }
        }
        held
    });
    assert!(
        slow.len() >= 1900,
        "only {} slow clients connected",
        slow.len()
    );
    for _ in 0..5 {
        let health = lab.http_get("m1gw", "127.0.0.1:9091", "/healthz");
        assert!(health.starts_with("HTTP/1.0 200"), "healthz: {health}");
        let metrics = lab.http_get("m1gw", "127.0.0.1:9090", "/metrics");
        assert!(metrics.contains("meshd_dropped_packets_total"), "{metrics}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        lab.ping("m1pod", M2_POD),
        "the tunnel suffered from the slow clients"
    );
    // The slow clients that kept their place are cut off once the header deadline passes.
    let mut last = slow.into_iter().last().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 512];
    let closed = loop {
        match std::io::Read::read(&mut last, &mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    assert!(
        closed,
        "a client that never finished its headers was kept 10 s"
    );
}
