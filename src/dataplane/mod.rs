//! The dataplane: TUN device, WireGuard UDP port, and the threads that move packets between them.
//!
//! Packets never touch the async runtime. Three OS threads do the work:
//! - `meshd-tx`: TUN → [`PeerTable::encapsulate`] → UDP,
//! - `meshd-rx`: UDP (batched `recvmmsg`) → [`PeerTable::decapsulate`] → TUN,
//! - `meshd-timers`: WireGuard timers (handshake retries, keepalives, rekeys) every 250 ms.
//!
//! The loops work over batches of packets with buffers allocated once per thread, so offload
//! (super-packets from the TUN device, UDP GSO/GRO) changes the batch sources, not the loops.
//!
//! The control plane describes the wanted state as a [`DeviceSpec`] and hands it to
//! [`Dataplane::apply`], which reconciles it with the running peers (sessions of unchanged peers
//! survive) and swaps in a new immutable [`PeerTable`].

mod peer;
pub mod routing;
mod table;
pub mod udp;

pub use peer::{Peer, PeerStats, PeerStatus};
pub use table::{DropReason, DropStats, Identity, Inbound, Outbound, PeerTable};

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use parking_lot::Mutex;
use quinn_udp::RecvMeta;
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tun_rs::SyncDevice;
use udp::{BindError, UdpPort, RECV_BATCH};

/// Largest packet or datagram a buffer must hold (IP's limit).
pub const MAX_PACKET: usize = 65536;
/// Room WireGuard adds to a packet (header, counter, tag) plus slack for handshake messages.
const WG_ROOM: usize = 256;
/// How often WireGuard's timers run.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How long the receive thread sleeps in one poll (it checks for a replaced port in between).
const RECV_WAKEUP: Duration = Duration::from_secs(1);

/// A peer as the control plane wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSpec {
    /// A name for logs and `meshctl` (the config's peer name, or a key prefix for `wg set` peers).
    pub name: String,
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    /// The configured endpoint; the running peer's endpoint also follows roaming.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// The whole device as the control plane wants it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceSpec {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerSpec>,
}

impl DeviceSpec {
    pub fn peer_mut(&mut self, key: &PublicKey) -> Option<&mut PeerSpec> {
        self.peers.iter_mut().find(|p| p.public_key == *key)
    }

    /// Every prefix routed into the tunnel.
    pub fn routed_prefixes(&self) -> Vec<IpNet> {
        let mut all: Vec<IpNet> = self
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// Why a spec could not be applied. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, io::Error),
}

/// What [`Dataplane::apply`] reconciles against.
struct Running {
    spec: DeviceSpec,
    peers: HashMap<PublicKey, Arc<Peer>>,
    identity: Option<Arc<Identity>>,
    next_index: u32,
}

impl Running {
    fn allocate_index(&mut self) -> u32 {
        // boringtun keeps 24 bits for the peer; the low 8 are its session ring.
        self.next_index = (self.next_index + 1) & 0x00ff_ffff;
        self.next_index
    }
}

/// The running dataplane.
pub struct Dataplane {
    tun: SyncDevice,
    table: ArcSwap<PeerTable>,
    udp: ArcSwap<UdpPort>,
    running: Mutex<Running>,
    pub drops: DropStats,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("listen_port", &self.listen_port())
            .finish_non_exhaustive()
    }
}

/// Settings for the TUN device.
#[derive(Debug, Clone)]
pub struct TunSettings {
    pub name: String,
    pub mtu: u16,
    pub address: Option<IpNet>,
}

fn spawn(name: &'static str, f: impl FnOnce() + Send + 'static) -> Result<(), ApplyError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| ApplyError::Thread(name, e))
}

/// Opens the TUN device, up, with its address and MTU.
pub fn open_tun(settings: &TunSettings) -> io::Result<SyncDevice> {
    let mut builder = tun_rs::DeviceBuilder::new()
        .name(&settings.name)
        .mtu(settings.mtu);
    match settings.address {
        Some(IpNet::V4(net)) => builder = builder.ipv4(net.addr(), net.prefix_len(), None),
        Some(IpNet::V6(net)) => builder = builder.ipv6(net.addr(), net.prefix_len()),
        None => {}
    }
    builder.build_sync()
}

impl Dataplane {
    /// Opens the UDP port, starts the threads over `tun`, and applies `spec`.
    pub fn start(tun: SyncDevice, spec: DeviceSpec) -> Result<Arc<Self>, ApplyError> {
        let udp = UdpPort::bind(spec.listen_port)?;
        let first_index = rand_core::RngCore::next_u32(&mut rand_core::OsRng) & 0x00ff_ffff;
        let dataplane = Arc::new(Dataplane {
            tun,
            table: ArcSwap::from_pointee(PeerTable::default()),
            udp: ArcSwap::from_pointee(udp),
            running: Mutex::new(Running {
                spec: DeviceSpec::default(),
                peers: HashMap::new(),
                identity: None,
                next_index: first_index,
            }),
            drops: DropStats::default(),
        });
        let initial_port = dataplane.udp.load().port();
        dataplane.apply(DeviceSpec {
            listen_port: initial_port,
            ..spec
        })?;
        let (tx, timers) = (dataplane.clone(), dataplane.clone());
        spawn("meshd-tx", move || tx.tx_loop())?;
        spawn("meshd-timers", move || timers.timer_loop())?;
        dataplane.spawn_rx(dataplane.udp.load_full())?;
        Ok(dataplane)
    }

    fn spawn_rx(self: &Arc<Self>, port: Arc<UdpPort>) -> Result<(), ApplyError> {
        let me = self.clone();
        spawn("meshd-rx", move || me.rx_loop(&port))
    }

    /// The spec currently applied (the listen port is the one actually bound).
    pub fn spec(&self) -> DeviceSpec {
        self.running.lock().spec.clone()
    }

    /// The current peer table (for status queries).
    pub fn table(&self) -> Arc<PeerTable> {
        self.table.load_full()
    }

    pub fn listen_port(&self) -> u16 {
        self.udp.load().port()
    }

    /// Reconciles the running peers with `spec`. Peers whose key, preshared key and keepalive are
    /// unchanged keep their sessions; removed peers are dropped; the listen port is rebound if it
    /// changed (0 keeps the current port).
    pub fn apply(self: &Arc<Self>, mut spec: DeviceSpec) -> Result<(), ApplyError> {
        let mut running = self.running.lock();
        let current_port = self.udp.load().port();
        if spec.listen_port == 0 {
            spec.listen_port = current_port;
        }
        if spec.listen_port != current_port {
            let port = Arc::new(UdpPort::bind(spec.listen_port)?);
            self.spawn_rx(port.clone())?;
            let old = self.udp.swap(port);
            old.close();
            tracing::info!(
                old = old.port(),
                new = spec.listen_port,
                "listen port changed"
            );
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
                        peer.clone()
                    }
                    None => {
                        let index = running.allocate_index();
                        let tunn =
                            identity.tunn(&want.public_key, psk, want.persistent_keepalive, index);
                        tracing::info!(peer = %want.name, public_key = %want.public_key, "peer added");
                        let peer = Arc::new(Peer::new(want.public_key, index, tunn, want.endpoint));
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

    /// Starts a handshake with each new peer whose endpoint we know, so that a restarted gateway
    /// is reachable at once instead of after its peer's session times out.
    fn initiate_handshakes(&self, peers: &[Arc<Peer>]) {
        let mut out = [0u8; WG_ROOM];
        let port = self.udp.load();
        for peer in peers {
            let Some(to) = peer.endpoint() else { continue };
            let result = peer.tunn().format_handshake_initiation(&mut out, false);
            if let boringtun::noise::TunnResult::WriteToNetwork(init) = result {
                peer.stats.count_tx(init.len());
                self.send(&port, init, to);
            }
        }
    }

    fn send(&self, port: &UdpPort, datagram: &[u8], to: SocketAddr) {
        if let Err(e) = port.send_to(datagram, to) {
            self.drops.count(DropReason::SendFailed);
            tracing::trace!(error = %e, to = %to, "send failed");
        }
    }

    fn tun_write(&self, packet: &[u8]) {
        if let Err(e) = self.tun.send(packet) {
            self.drops.count(DropReason::SendFailed);
            tracing::trace!(error = %e, "TUN write failed");
        }
    }

    /// TUN → encrypt → UDP. A batch is one packet until TUN offload yields super-packets.
    fn tx_loop(&self) {
        let mut batch = PacketBatch::new(1);
        let mut out = vec![0u8; MAX_PACKET + WG_ROOM];
        loop {
            batch.clear();
            match self.tun.recv(batch.next_buffer()) {
                Ok(n) => batch.commit(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading the TUN device failed; the dataplane stops");
                    std::process::exit(1);
                }
            }
            let table = self.table.load();
            let port = self.udp.load();
            for packet in batch.packets() {
                match table.encapsulate(packet, &mut out) {
                    Outbound::Send(datagram, to) => self.send(&port, datagram, to),
                    Outbound::Queued => {}
                    Outbound::Drop(reason) => self.drops.count(reason),
                }
            }
        }
    }

    /// UDP → decrypt → TUN, a `recvmmsg` batch at a time, until `port` is replaced.
    fn rx_loop(&self, port: &UdpPort) {
        let mut storage = vec![vec![0u8; MAX_PACKET]; RECV_BATCH];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); RECV_BATCH];
        let mut out = vec![0u8; MAX_PACKET + WG_ROOM];
        while !port.is_closed() {
            let n = match port.recv_batch(&mut bufs, &mut meta, RECV_WAKEUP) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "UDP receive failed");
                    continue;
                }
            };
            let table = self.table.load();
            for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                let src = udp::canonical(m.addr);
                let stride = if m.stride == 0 { m.len } else { m.stride };
                for datagram in buf[..m.len].chunks(stride.max(1)) {
                    self.receive(&table, port, datagram, src, &mut out);
                }
            }
        }
    }

    fn receive(
        &self,
        table: &PeerTable,
        port: &UdpPort,
        datagram: &[u8],
        src: SocketAddr,
        out: &mut [u8],
    ) {
        match table.decapsulate(datagram, src, out) {
            Inbound::ToTun(packet) => self.tun_write(packet),
            Inbound::Reply(reply, peer) => {
                self.send(port, reply, src);
                match peer {
                    Some(peer) => {
                        while let Some(queued) = PeerTable::flush_queued(&peer, out) {
                            self.send(port, queued, src);
                        }
                    }
                    // A cookie reply: the handshake itself was not processed.
                    None => self.drops.count(DropReason::UnderLoad),
                }
            }
            Inbound::Done => {}
            Inbound::Drop(reason) => self.drops.count(reason),
        }
    }

    /// Drives every peer's WireGuard timers and resets the handshake rate limiter each second.
    fn timer_loop(&self) {
        let mut out = vec![0u8; MAX_PACKET + WG_ROOM];
        let mut ticks: u64 = 0;
        loop {
            std::thread::sleep(TIMER_TICK);
            ticks += 1;
            let table = self.table.load();
            if ticks.is_multiple_of(4) {
                if let Some(identity) = &table.identity {
                    identity.rate_limiter.reset_count();
                }
            }
            let port = self.udp.load();
            for peer in table.peers() {
                let result = peer.tunn().update_timers(&mut out);
                if let boringtun::noise::TunnResult::WriteToNetwork(datagram) = result {
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
}

/// Packets read in one go, in buffers allocated once.
struct PacketBatch {
    buffers: Vec<Vec<u8>>,
    lens: Vec<usize>,
}

impl PacketBatch {
    fn new(size: usize) -> Self {
        PacketBatch {
            buffers: vec![vec![0u8; MAX_PACKET]; size],
            lens: Vec::with_capacity(size),
        }
    }

    fn clear(&mut self) {
        self.lens.clear();
    }

    fn next_buffer(&mut self) -> &mut [u8] {
        &mut self.buffers[self.lens.len()]
    }

    fn commit(&mut self, len: usize) {
        self.lens.push(len);
    }

    fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.buffers
            .iter()
            .zip(&self.lens)
            .map(|(buf, len)| &buf[..*len])
    }
}
