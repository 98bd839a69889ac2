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

pub mod delivery;
pub mod mss;
/// Two tables that completed a handshake (the integration tests' helper, shared).
#[cfg(test)]
#[path = "../../tests/support/pair.rs"]
mod pair;
mod peer;
pub mod pmtu;
pub mod routing;
pub mod sources;
mod table;
pub mod udp;

pub use delivery::{Delivery, GatewayServices};
pub use peer::{Peer, PeerStats, PeerStatus};
pub use table::{DropReason, DropStats, Identity, Inbound, Outbound, PeerTable};

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use parking_lot::Mutex;
use pmtu::Oversized;
use quinn_udp::RecvMeta;
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
use udp::{BindError, UdpPort, RECV_BATCH};

/// Largest packet or datagram a buffer must hold (IP's limit).
pub const MAX_PACKET: usize = 65536;
/// Room WireGuard adds to a packet (header, counter, tag) plus slack for handshake messages.
const WG_ROOM: usize = 256;
/// How often WireGuard's timers run.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Packets the kernel may queue for us on the TUN device before it drops (its default, 500,
/// overflows under UDP bursts; WireGuard's own interfaces use 1000).
const TUN_TX_QUEUE_LEN: u32 = 1000;
/// Slots one TUN read may fill: the segments of a 64 KiB super-packet at the smallest MSS we
/// expect (1280-byte MTU).
const SEGMENTS_PER_READ: usize = 64;
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
    /// Where decrypted packets may go (set from the configuration; `wg set` leaves it alone).
    pub delivery: Delivery,
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
    #[error("cannot set up the TUN device's queues (non-blocking mode, extra queues): {0}")]
    TunMode(io::Error),
    #[error("cannot set fwmark {mark:#x} on the WireGuard socket (SO_MARK needs CAP_NET_ADMIN): {source}")]
    Mark { mark: u32, source: io::Error },
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
    mtu: u16,
    /// Whether TUN offload is on; UDP GSO follows it (`offload = false` turns both off).
    offload: bool,
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
    /// IFF_VNET_HDR with TSO: reads yield TCP super-packets, writes may be coalesced.
    pub offload: bool,
    /// IFF_MULTI_QUEUE, for more than one transmit thread.
    pub multi_queue: bool,
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
        .mtu(settings.mtu)
        .offload(settings.offload)
        .multi_queue(settings.multi_queue)
        .tx_queue_len(TUN_TX_QUEUE_LEN);
    match settings.address {
        Some(IpNet::V4(net)) => builder = builder.ipv4(net.addr(), net.prefix_len(), None),
        Some(IpNet::V6(net)) => builder = builder.ipv6(net.addr(), net.prefix_len()),
        None => {}
    }
    builder.build_sync()
}

impl Dataplane {
    /// Opens the UDP port, starts the threads over `tun` (whose MTU is `mtu`), and applies `spec`.
    /// With `queues` > 1 (the device must be multi-queue) each extra TUN queue gets its own
    /// `meshd-tx` thread: the kernel spreads flows over the queues, so several flows (and several
    /// peers) are encrypted in parallel.
    pub fn start(
        tun: SyncDevice,
        queues: usize,
        mtu: u16,
        spec: DeviceSpec,
    ) -> Result<Arc<Self>, ApplyError> {
        let udp = UdpPort::bind(spec.listen_port)?;
        let mut tx_queues = Vec::with_capacity(queues.max(1) - 1);
        for _ in 1..queues {
            tx_queues.push(tun.try_clone().map_err(ApplyError::TunMode)?);
        }
        tun.set_nonblocking(true).map_err(ApplyError::TunMode)?;
        for queue in &tx_queues {
            queue.set_nonblocking(true).map_err(ApplyError::TunMode)?;
        }
        let first_index = rand_core::RngCore::next_u32(&mut rand_core::OsRng) & 0x00ff_ffff;
        let offload = tun.tcp_gso();
        let dataplane = Arc::new(Dataplane {
            tun,
            mtu,
            offload,
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
        spawn("meshd-tx", move || tx.tx_loop(&tx.tun))?;
        for queue in tx_queues {
            let tx = dataplane.clone();
            spawn("meshd-tx", move || tx.tx_loop(&queue))?;
        }
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

    /// Datagrams per UDP GSO send (1: no GSO, because offload is off or the kernel lacks it;
    /// datagrams then leave in `sendmmsg` batches).
    pub fn max_segments(&self) -> usize {
        if self.offload {
            self.udp.load().max_segments()
        } else {
            1
        }
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

    /// Reads from the (non-blocking) TUN device into `bufs`: waits for the first packet, then
    /// takes what else is already queued while a whole super-packet's segments still fit.
    /// Returns how many slots were filled.
    fn read_tun_batch(
        &self,
        queue: &SyncDevice,
        original: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> usize {
        let mut filled = 0;
        while bufs.len() - filled >= SEGMENTS_PER_READ {
            match queue.recv_multiple(
                original,
                &mut bufs[filled..],
                &mut sizes[filled..],
                VIRTIO_NET_HDR_LEN,
            ) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if filled > 0 {
                        break;
                    }
                    if let Err(e) = udp::poll_fd(queue.as_raw_fd(), libc::POLLIN, RECV_WAKEUP) {
                        tracing::error!(error = %e, "waiting on the TUN device failed; the dataplane stops");
                        std::process::exit(1);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    tracing::error!(error = %e, "the TUN device is gone; the dataplane stops");
                    std::process::exit(1);
                }
                Err(e) => {
                    self.drops.count(DropReason::Garbage);
                    tracing::debug!(error = %e, "unusable read from the TUN device");
                }
            }
        }
        filled
    }

    /// TUN → encrypt → UDP. With offload, one read yields a TCP super-packet that tun-rs splits
    /// into MTU-sized segments; a batch gathers what is queued, each packet is encrypted straight
    /// into a contiguous buffer, and runs of equal-sized datagrams to the same endpoint leave in
    /// one `sendmsg` with UDP GSO.
    fn tx_loop(&self, queue: &SyncDevice) {
        let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET];
        let mut bufs = vec![vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET]; IDEAL_BATCH_SIZE];
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut out = vec![0u8; IDEAL_BATCH_SIZE * (usize::from(self.mtu) + WG_ROOM) + MAX_PACKET];
        let mut runs: Vec<GsoRun> = Vec::with_capacity(IDEAL_BATCH_SIZE);
        let mut scratch = OversizedScratch {
            reply: vec![0u8; VIRTIO_NET_HDR_LEN + pmtu::REPLY_MAX],
            fragment: vec![0u8; MAX_PACKET],
        };
        loop {
            let n = self.read_tun_batch(queue, &mut original, &mut bufs, &mut sizes);
            let table = self.table.load();
            let port = self.udp.load();
            let segments = self.max_segments();
            let gso = segments > 1;
            let mut batch = Batch::new(&mut out, &mut runs, segments);
            for (buf, size) in bufs.iter_mut().zip(&sizes).take(n) {
                let packet = &mut buf[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + size];
                mss::clamp_with(packet, |p| table.mtu_towards(p, self.mtu));
                match table.encapsulate(packet, batch.room()) {
                    Outbound::Send(datagram, to) => {
                        let len = datagram.len();
                        batch.push(len, to);
                    }
                    Outbound::TooBig(limit) => {
                        self.oversized(queue, &table, packet, limit, &mut scratch, &mut batch)
                    }
                    Outbound::Queued => {}
                    Outbound::Drop(reason) => self.drops.count(reason),
                }
            }
            batch.finish();
            if gso {
                for run in &runs {
                    self.send_run(&port, &out, run);
                }
            } else {
                self.send_singles(&port, &out, &runs);
            }
        }
    }

    /// Answers a packet larger than `limit`, the path to its peer (see [`pmtu`]): an ICMP too-big
    /// back into the TUN device, or, for IPv4 without DF, its fragments into the batch.
    fn oversized(
        &self,
        queue: &SyncDevice,
        table: &PeerTable,
        packet: &[u8],
        limit: u16,
        scratch: &mut OversizedScratch,
        batch: &mut Batch<'_>,
    ) {
        match pmtu::too_big_reply(packet, limit, &mut scratch.reply[VIRTIO_NET_HDR_LEN..]) {
            Oversized::Reply(len) => {
                self.drops.count(DropReason::TooBig);
                self.write_reply(queue, &mut scratch.reply, len);
            }
            Oversized::Fragment => {
                let cut = pmtu::fragment_v4(packet, limit, &mut scratch.fragment, |piece| {
                    self.encapsulate_fragment(table, piece, batch)
                });
                if cut.is_none() {
                    self.drops.count(DropReason::TooBig);
                }
            }
            Oversized::Drop => self.drops.count(DropReason::TooBig),
        }
    }

    /// Encrypts one fragment of an oversized IPv4 packet into the batch, if there is room left.
    fn encapsulate_fragment(&self, table: &PeerTable, piece: &[u8], batch: &mut Batch<'_>) {
        if batch.room().len() < piece.len() + WG_ROOM {
            self.drops.count(DropReason::TooBig);
            return;
        }
        match table.encapsulate(piece, batch.room()) {
            Outbound::Send(datagram, to) => {
                let len = datagram.len();
                batch.push(len, to);
            }
            Outbound::Queued => {}
            Outbound::TooBig(_) => self.drops.count(DropReason::TooBig),
            Outbound::Drop(reason) => self.drops.count(reason),
        }
    }

    /// Writes an ICMP answer (after `VIRTIO_NET_HDR_LEN` bytes of room in `buf`) to the TUN device.
    fn write_reply(&self, queue: &SyncDevice, buf: &mut [u8], len: usize) {
        let start = if self.offload {
            buf[..VIRTIO_NET_HDR_LEN].fill(0);
            0
        } else {
            VIRTIO_NET_HDR_LEN
        };
        if let Err(e) = queue.send(&buf[start..VIRTIO_NET_HDR_LEN + len]) {
            tracing::trace!(error = %e, "writing an ICMP too-big to the TUN device failed");
        }
    }

    /// Sends runs of one datagram each with `sendmmsg`, 64 at a time (no UDP GSO).
    fn send_singles(&self, port: &UdpPort, out: &[u8], runs: &[GsoRun]) {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut chunk: [(&[u8], SocketAddr); udp::SEND_BATCH] =
            [(&[], unspecified); udp::SEND_BATCH];
        for group in runs.chunks(udp::SEND_BATCH) {
            for (slot, run) in chunk.iter_mut().zip(group) {
                *slot = (
                    &out[run.start..run.start + run.bytes],
                    run.to.unwrap_or(unspecified),
                );
            }
            let (sent, result) = port.send_many(&chunk[..group.len()]);
            if let Err(e) = result {
                for _ in sent..group.len() {
                    self.drops.count(DropReason::SendFailed);
                }
                tracing::trace!(error = %e, "sendmmsg failed");
            }
        }
    }

    fn send_run(&self, port: &UdpPort, out: &[u8], run: &GsoRun) {
        if let Some(to) = run.to {
            let contents = &out[run.start..run.start + run.bytes];
            if let Err(e) = port.send_segments(contents, run.segment, to) {
                for _ in 0..run.count {
                    self.drops.count(DropReason::SendFailed);
                }
                tracing::trace!(error = %e, to = %to, "send failed");
            }
        }
    }

    /// UDP → decrypt → TUN, a `recvmmsg` batch (with GRO) at a time, until `port` is replaced.
    /// Decrypted packets collect in a batch that tun-rs coalesces (TCP/UDP GRO) into
    /// super-packets before writing them to the TUN device.
    fn rx_loop(&self, port: &UdpPort) {
        let mut storage = vec![vec![0u8; MAX_PACKET]; RECV_BATCH];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); RECV_BATCH];
        let mut to_tun = TunBatch::new(usize::from(self.mtu));
        while !port.is_closed() {
            // Wait for the first datagrams, then take whatever else is already queued (without
            // waiting) so that more segments of a flow meet in one coalescing TUN write.
            let mut wait = RECV_WAKEUP;
            loop {
                let n = match port.recv_batch(&mut bufs, &mut meta, wait) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "UDP receive failed");
                        0
                    }
                };
                if n == 0 {
                    break;
                }
                let table = self.table.load();
                for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                    let src = udp::canonical(m.addr);
                    let stride = if m.stride == 0 { m.len } else { m.stride };
                    for datagram in buf[..m.len].chunks(stride.max(1)) {
                        self.receive(&table, port, datagram, src, &mut to_tun);
                        if to_tun.is_full() {
                            self.flush_to_tun(&mut to_tun);
                        }
                    }
                }
                if to_tun.len >= IDEAL_BATCH_SIZE / 2 {
                    break;
                }
                wait = Duration::ZERO;
            }
            self.flush_to_tun(&mut to_tun);
        }
    }

    fn flush_to_tun(&self, batch: &mut TunBatch) {
        if batch.len == 0 {
            return;
        }
        match self.tun.send_multiple(
            &mut batch.gro,
            &mut batch.bufs[..batch.len],
            VIRTIO_NET_HDR_LEN,
        ) {
            Ok(bytes) => tracing::trace!(packets = batch.len, bytes, "TUN batch written"),
            Err(e) => {
                self.drops.count(DropReason::SendFailed);
                tracing::trace!(error = %e, "TUN write failed");
            }
        }
        batch.len = 0;
    }

    fn receive(
        &self,
        table: &PeerTable,
        port: &UdpPort,
        datagram: &[u8],
        src: SocketAddr,
        to_tun: &mut TunBatch,
    ) {
        let slot = to_tun.next_slot();
        match table.decapsulate(datagram, src, &mut slot[VIRTIO_NET_HDR_LEN..]) {
            Inbound::ToTun(packet) => {
                mss::clamp_with(packet, |p| table.mtu_from(p, self.mtu));
                let len = packet.len();
                to_tun.commit(len);
            }
            Inbound::Reply(reply, peer) => {
                self.send(port, reply, src);
                let out = &mut slot[VIRTIO_NET_HDR_LEN..];
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
                    identity.sources.forget_idle(std::time::Instant::now());
                }
                self.measure_paths(&table);
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

/// A run of encrypted datagrams in the output buffer that can leave in one GSO `sendmsg`:
/// same destination, same size (the last may be shorter), within the kernel's limits.
#[derive(Clone, Copy)]
struct GsoRun {
    max_segments: usize,
    start: usize,
    bytes: usize,
    segment: usize,
    count: usize,
    to: Option<SocketAddr>,
}

/// The transmit thread's output buffer as it fills: encrypted datagrams back to back from
/// `out[0]` to `out[pos]`, grouped into runs that can leave in one send each.
struct Batch<'a> {
    out: &'a mut [u8],
    pos: usize,
    run: GsoRun,
    runs: &'a mut Vec<GsoRun>,
}

impl<'a> Batch<'a> {
    /// An empty batch over `out`, collecting its runs (of at most `max_segments`) in `runs`.
    fn new(out: &'a mut [u8], runs: &'a mut Vec<GsoRun>, max_segments: usize) -> Self {
        runs.clear();
        Batch {
            out,
            pos: 0,
            run: GsoRun::new(max_segments),
            runs,
        }
    }

    /// Where the next datagram goes.
    fn room(&mut self) -> &mut [u8] {
        &mut self.out[self.pos..]
    }

    /// Takes the `len`-byte datagram just written at `room()`, for `to`.
    fn push(&mut self, len: usize, to: SocketAddr) {
        if !self.run.admits(len, to) {
            self.runs.push(self.run);
            self.run.restart(self.pos);
        }
        self.run.push(len, to);
        self.pos += len;
    }

    /// Closes the last run.
    fn finish(self) {
        if self.run.to.is_some() {
            self.runs.push(self.run);
        }
    }
}

/// Buffers for answering oversized packets, allocated once per transmit thread.
struct OversizedScratch {
    /// An ICMP answer, after room for a virtio_net_hdr.
    reply: Vec<u8>,
    /// One fragment at a time.
    fragment: Vec<u8>,
}

/// The most UDP payload one GSO send may carry.
const GSO_MAX_BYTES: usize = 65000;

impl GsoRun {
    fn new(max_segments: usize) -> Self {
        GsoRun {
            max_segments: max_segments.max(1),
            start: 0,
            bytes: 0,
            segment: 0,
            count: 0,
            to: None,
        }
    }

    /// Whether a datagram of `len` bytes to `to` can join this run.
    fn admits(&self, len: usize, to: SocketAddr) -> bool {
        match self.to {
            None => true,
            Some(dst) => {
                dst == to
                    && len <= self.segment
                    && self.bytes == self.count * self.segment
                    && self.count < self.max_segments
                    && self.bytes + len <= GSO_MAX_BYTES
            }
        }
    }

    fn push(&mut self, len: usize, to: SocketAddr) {
        if self.to.is_none() {
            self.segment = len;
            self.to = Some(to);
        }
        self.bytes += len;
        self.count += 1;
    }

    fn restart(&mut self, start: usize) {
        *self = GsoRun {
            start,
            ..GsoRun::new(self.max_segments)
        };
    }
}

/// Decrypted packets waiting for one coalescing write to the TUN device. Each buffer keeps
/// `VIRTIO_NET_HDR_LEN` bytes of headroom; its length is exactly headroom + packet, as tun-rs's
/// GRO expects. Buffers grow once (coalescing appends) and are reused.
struct TunBatch {
    bufs: Vec<Vec<u8>>,
    len: usize,
    slot_len: usize,
    gro: GROTable,
}

impl TunBatch {
    fn new(mtu: usize) -> Self {
        let slot_len = VIRTIO_NET_HDR_LEN + mtu.max(1280) + WG_ROOM;
        // tun-rs coalesces segments into the first buffer of a flow only if it already has room
        // for a whole super-packet: it never reallocates.
        let capacity = 2 * VIRTIO_NET_HDR_LEN + MAX_PACKET;
        let slot = |_| {
            let mut buf = Vec::with_capacity(capacity);
            buf.resize(slot_len, 0);
            buf
        };
        TunBatch {
            bufs: (0..IDEAL_BATCH_SIZE).map(slot).collect(),
            len: 0,
            slot_len,
            gro: GROTable::default(),
        }
    }

    fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    /// The next free buffer, at its full length for decryption into.
    fn next_slot(&mut self) -> &mut Vec<u8> {
        let slot = &mut self.bufs[self.len];
        slot.resize(self.slot_len, 0);
        slot
    }

    /// Keeps the packet of `len` bytes just decrypted into the next slot.
    fn commit(&mut self, len: usize) {
        self.bufs[self.len].truncate(VIRTIO_NET_HDR_LEN + len);
        self.len += 1;
    }
}
