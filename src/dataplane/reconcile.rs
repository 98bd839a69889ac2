//! Reconciliation: a new [`DeviceSpec`] against the running peers (sessions of unchanged peers
//! survive), and the new immutable [`PeerTable`] swapped in.

use super::delivery;
use super::peer::Peer;
use super::table::{Identity, PeerTable};
use super::udp::UdpPort;
use super::{ApplyError, Dataplane, DeviceSpec, WG_ROOM};
use std::collections::HashMap;
use std::sync::Arc;

impl Dataplane {
    /// Reconciles the running peers with `spec`. Peers whose key, preshared key and keepalive are
    /// unchanged keep their sessions; removed peers are dropped; the listen port is rebound if it
    /// changed (0 keeps the current port).
    pub fn apply(self: &Arc<Self>, mut spec: DeviceSpec) -> Result<(), ApplyError> {
        let mut running = self.running.lock();
        let current_port = self.udp.load().port();
        if spec.listen_port == 0 {
            spec.listen_port = current_port;
        }
        let mark = |port: &UdpPort| {
            port.set_mark(spec.fwmark)
                .map_err(|source| ApplyError::Mark {
                    mark: spec.fwmark,
                    source,
                })
        };
        if spec.listen_port != current_port {
            let port = Arc::new(UdpPort::bind(spec.listen_port)?);
            if spec.fwmark != 0 {
                mark(&port)?;
            }
            self.spawn_rx(port.clone())?;
            let old = self.udp.swap(port);
            old.close();
            tracing::info!(
                old = old.port(),
                new = spec.listen_port,
                "listen port changed"
            );
        } else if spec.fwmark != running.spec.fwmark {
            mark(&self.udp.load())?;
            tracing::info!(fwmark = spec.fwmark, "fwmark set on the WireGuard socket");
        }

        let identity_changed = spec.private_key != running.spec.private_key;
        if identity_changed {
            running.identity = spec
                .private_key
                .as_ref()
                .map(|k| Arc::new(Identity::new(k.to_dalek())));
            if let Some(key) = &spec.private_key {
                tracing::info!(public_key = %key.public_key(), "private key set");
            }
        }
        let mut table = PeerTable::new(running.identity.clone());
        table.destinations = delivery::DestinationFilter::new(&spec.delivery);
        table.translation = spec.translation.clone();
        table.translated = self.translated.clone();
        let mut peers = HashMap::new();
        let mut fresh = Vec::new();
        if let Some(identity) = running.identity.clone() {
            for want in &spec.peers {
                let psk = want.preshared_key.as_ref().map(|k| *k.as_bytes());
                let before = running
                    .spec
                    .peers
                    .iter()
                    .find(|p| p.public_key == want.public_key);
                let peer = match running.peers.get(&want.public_key) {
                    Some(peer) => {
                        let before = before.expect("a running peer has a spec");
                        if identity_changed
                            || before.preshared_key != want.preshared_key
                            || before.persistent_keepalive != want.persistent_keepalive
                        {
                            peer.replace_tunn(identity.tunn(
                                &want.public_key,
                                psk,
                                want.persistent_keepalive,
                                peer.index,
                            ));
                        }
                        if before.endpoint != want.endpoint {
                            if let Some(endpoint) = want.endpoint {
                                peer.set_endpoint(endpoint);
                            }
                        }
                        if before.endpoints != want.endpoints {
                            peer.set_candidates(want.endpoints.clone());
                        }
                        peer.clone()
                    }
                    None => {
                        let index = running.allocate_index();
                        let tunn =
                            identity.tunn(&want.public_key, psk, want.persistent_keepalive, index);
                        tracing::info!(peer = %want.name, public_key = %want.public_key, "peer added");
                        let peer = Arc::new(Peer::new(want.public_key, index, tunn, want.endpoint));
                        peer.set_candidates(want.endpoints.clone());
                        fresh.push(peer.clone());
                        peer
                    }
                };
                table.insert(peer.clone(), &want.allowed_ips);
                peers.insert(want.public_key, peer);
            }
        }
        for (key, _) in running
            .peers
            .iter()
            .filter(|(k, _)| !peers.contains_key(*k))
        {
            tracing::info!(public_key = %key, "peer removed");
        }
        running.peers = peers;
        running.spec = spec;
        self.table.store(Arc::new(table));
        drop(running);
        self.initiate_handshakes(&fresh);
        Ok(())
    }

    /// Starts every peer's protocol state over (no sessions); returns the peers.
    pub(super) fn restart_sessions(&self) -> Vec<Arc<Peer>> {
        let running = self.running.lock();
        let Some(identity) = running.identity.clone() else {
            return Vec::new();
        };
        let mut peers = Vec::new();
        for want in &running.spec.peers {
            if let Some(peer) = running.peers.get(&want.public_key) {
                let psk = want.preshared_key.as_ref().map(|k| *k.as_bytes());
                peer.replace_tunn(identity.tunn(
                    &want.public_key,
                    psk,
                    want.persistent_keepalive,
                    peer.index,
                ));
                peers.push(peer.clone());
            }
        }
        peers
    }

    /// Starts a handshake with each new peer whose endpoint we know, so that a restarted gateway
    /// is reachable at once instead of after its peer's session times out. A standby sends
    /// nothing.
    pub(super) fn initiate_handshakes(&self, peers: &[Arc<Peer>]) {
        if !self.forwarding() {
            return;
        }
        let mut out = [0u8; WG_ROOM];
        let port = self.udp.load();
        for peer in peers {
            let Some(to) = peer.endpoint() else { continue };
            let result = peer.tunn().format_handshake_initiation(&mut out, true);
            if let boringtun::noise::TunnResult::WriteToNetwork(init) = result {
                peer.stats.count_tx(init.len());
                self.send(&port, init, to);
            }
        }
    }
}
