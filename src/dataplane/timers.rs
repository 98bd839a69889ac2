//! The timer loop (`meshd-timers`): WireGuard timers (handshake retries, keepalives, rekeys) every
//! 250 ms, and the path MTU towards each peer re-measured.

use super::table::{DropReason, PeerTable};
use super::{pmtu, Dataplane, MAX_PACKET, TIMER_TICK, WG_ROOM};

impl Dataplane {
    /// Drives every peer's WireGuard timers and resets the handshake rate limiter each second.
    pub(super) fn timer_loop(&self) {
        let mut out = vec![0u8; MAX_PACKET + WG_ROOM];
        let mut ticks: u64 = 0;
        loop {
            std::thread::sleep(TIMER_TICK);
            ticks += 1;
            let table = self.table.load();
            if ticks.is_multiple_of(4) {
                if let Some(identity) = &table.identity {
                    identity.rate_limiter.reset_count();
                    identity.sources.forget_idle(std::time::Instant::now());
                }
                self.measure_paths(&table);
            }
            if !self.forwarding() {
                continue;
            }
            let port = self.udp.load();
            for peer in table.peers() {
                let result = peer.tunn().update_timers(&mut out);
                if let boringtun::noise::TunnResult::WriteToNetwork(datagram) = result {
                    if matches!(
                        boringtun::noise::Tunn::parse_incoming_packet(datagram),
                        Ok(boringtun::noise::Packet::HandshakeInit(_))
                    ) {
                        if let Some(next) = peer.initiation_sent() {
                            tracing::info!(public_key = %peer.public_key, endpoint = %next,
                                "no answer from the peer's endpoint: trying its next one (endpoints)");
                        }
                    }
                    match peer.endpoint() {
                        Some(to) => {
                            peer.stats.count_tx(datagram.len());
                            self.send(&port, datagram, to);
                        }
                        None => self.drops.count(DropReason::NoEndpoint),
                    }
                }
            }
        }
    }

    /// Reads the route MTU to every peer's endpoint and updates the largest inner packet the
    /// transmit path lets through to it (see [`pmtu`]); logs each change.
    fn measure_paths(&self, table: &PeerTable) {
        for peer in table.peers() {
            let Some(endpoint) = peer.endpoint() else {
                continue;
            };
            let route = match pmtu::route_mtu(endpoint) {
                Ok(route) => route,
                Err(e) => {
                    tracing::debug!(error = %e, endpoint = %endpoint, "no route MTU to the peer's endpoint");
                    continue;
                }
            };
            let limit = pmtu::inner_limit(route, endpoint, self.mtu);
            let previous = peer.set_path_limit(limit);
            if previous.unwrap_or(self.mtu) != limit {
                tracing::info!(
                    public_key = %peer.public_key,
                    endpoint = %endpoint,
                    route_mtu = route,
                    largest_packet = limit,
                    "path MTU to the peer changed: larger packets get an ICMP too-big (IPv4 without DF: fragments)"
                );
            }
        }
    }
}
