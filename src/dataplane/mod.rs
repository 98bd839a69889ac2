//! The dataplane: TUN device, WireGuard UDP port, and the threads that move packets between them.
//!
//! Packets never touch the async runtime. Three OS threads do the work:
//! - `meshd-tx`: TUN → [`PeerTable::encapsulate`] → UDP,
//! - `meshd-rx`: UDP (batched `recvmmsg`) → [`PeerTable::decapsulate`] → TUN (TCP and UDP
//!   flows coalesced by [`coalesce`]),
//! - `meshd-timers`: WireGuard timers (handshake retries, keepalives, rekeys) every 250 ms.
//!
//! The loops work over batches of packets with buffers allocated once per thread, so offload
//! (super-packets from the TUN device, UDP GSO/GRO) changes the batch sources, not the loops.
//!
//! The control plane describes the wanted state as a [`DeviceSpec`] and hands it to
//! [`Dataplane::apply`], which reconciles it with the running peers (sessions of unchanged peers
//! survive) and swaps in a new immutable [`PeerTable`].

pub mod coalesce;
pub mod delivery;
pub mod mss;
/// Two tables that completed a handshake (the integration tests' helper, shared).
#[cfg(test)]
#[path = "../../tests/support/pair.rs"]
mod pair;
mod peer;
pub mod pmtu;
mod reconcile;
pub mod routing;
mod rx;
pub mod sources;
mod table;
mod timers;
pub mod translate;
mod tx;
pub mod udp;

pub use delivery::{Delivery, GatewayServices};
pub use peer::{Peer, PeerStats, PeerStatus};
pub use table::{DropReason, DropStats, Identity, Inbound, Outbound, PeerTable};
pub use translate::{GlobalCidr, Translation, TranslationStats};

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tun_rs::SyncDevice;
use udp::{BindError, UdpPort};

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
    /// Every endpoint the peer may be at (`endpoints`; empty or one: no rotation).
    pub endpoints: Vec<SocketAddr>,
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
    /// The global ranges this cluster's ranges stand as (`global_cidrs`; `wg set` leaves it alone).
    pub translation: Translation,
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
    /// Whether the TUN device takes UDP super-packets (Linux ≥ 6.2, with offload): the receive
    /// loop then writes each UDP flow's datagrams of a batch in one write, as it does each TCP
    /// flow's segments whenever offload is on ([`coalesce`]).
    uso: bool,
    table: ArcSwap<PeerTable>,
    udp: ArcSwap<UdpPort>,
    running: Mutex<Running>,
    /// This gateway forwards: the only one in its cluster, or the active one of several
    /// candidates. A standby drops everything, in and out, and runs no timers.
    forwarding: AtomicBool,
    /// `meshd-tx` and `meshd-rx` put themselves under SCHED_BATCH as they start.
    batch_scheduling: bool,
    pub drops: DropStats,
    /// Packets translated to and from the global ranges, each way.
    pub translated: Arc<TranslationStats>,
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

/// How the dataplane's threads run.
#[derive(Debug, Clone, Copy)]
pub struct Threads {
    /// TUN queues, each with its own `meshd-tx` thread (the device must be multi-queue for
    /// more than one).
    pub queues: usize,
    /// False: a standby that drops every packet until [`Dataplane::set_forwarding`].
    pub forwarding: bool,
    /// `meshd-tx` and `meshd-rx` under SCHED_BATCH: woken by traffic, they do not preempt the
    /// task running (often the program receiving it).
    pub batch_scheduling: bool,
}

/// Puts the calling thread under SCHED_BATCH, at its CPU share but without wake-up
/// preemption: woken by a packet, it waits for the running task's slice to end instead of
/// interrupting it. On a busy machine that task is often the program that receives what the
/// tunnel delivers, whose socket buffer (208 KiB by default) overflows when it falls behind,
/// while meshd's own queues (4 MiB socket buffers, 1,000 packets of TUN queue) absorb the wait
/// (bench/RESULTS.md, 2026-12-01 07:35). A refusal is logged and the thread keeps running.
fn schedule_as_batch(thread: &str) {
    // musl's sched_param has more fields than glibc's: all zero, priority 0 as SCHED_BATCH needs.
    // SAFETY: sched_param is plain integers, for which all zero bytes are a valid value.
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        tracing::warn!(
            thread,
            error = %io::Error::last_os_error(),
            "cannot put the packet thread under SCHED_BATCH, so receivers on this node may lose UDP bursts: allow sched_setscheduler (seccomp), or set batch_scheduling = false to run without it"
        );
    }
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
    /// Opens the UDP port, starts the threads over `tun` (whose MTU is `mtu`) as `threads`
    /// says, and applies `spec`. With more than one queue (the device must be multi-queue) each
    /// extra TUN queue gets its own `meshd-tx` thread: the kernel spreads flows over the queues,
    /// so several flows (and several peers) are encrypted in parallel.
    pub fn start(
        tun: SyncDevice,
        mtu: u16,
        spec: DeviceSpec,
        threads: Threads,
    ) -> Result<Arc<Self>, ApplyError> {
        let Threads {
            queues,
            forwarding,
            batch_scheduling,
        } = threads;
        let udp = UdpPort::bind(spec.listen_port)?;
        if udp.is_ipv4_only() {
            tracing::warn!(
                port = udp.port(),
                "this host has no IPv6 (booted with ipv6.disable=1?): the WireGuard port is IPv4 only, and peers with IPv6 endpoints cannot be reached"
            );
        }
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
        let uso = offload && tun.udp_gso();
        let dataplane = Arc::new(Dataplane {
            tun,
            mtu,
            offload,
            uso,
            table: ArcSwap::from_pointee(PeerTable::default()),
            udp: ArcSwap::from_pointee(udp),
            running: Mutex::new(Running {
                spec: DeviceSpec::default(),
                peers: HashMap::new(),
                identity: None,
                next_index: first_index,
            }),
            forwarding: AtomicBool::new(forwarding),
            batch_scheduling,
            drops: DropStats::default(),
            translated: Arc::default(),
        });
        let initial_port = dataplane.udp.load().port();
        dataplane.apply(DeviceSpec {
            listen_port: initial_port,
            ..spec
        })?;
        let (tx, timers) = (dataplane.clone(), dataplane.clone());
        spawn("meshd-tx", move || {
            tx.packet_thread("meshd-tx");
            tx.tx_loop(&tx.tun)
        })?;
        for queue in tx_queues {
            let tx = dataplane.clone();
            spawn("meshd-tx", move || {
                tx.packet_thread("meshd-tx");
                tx.tx_loop(&queue)
            })?;
        }
        spawn("meshd-timers", move || timers.timer_loop())?;
        dataplane.spawn_rx(dataplane.udp.load_full())?;
        Ok(dataplane)
    }

    fn spawn_rx(self: &Arc<Self>, port: Arc<UdpPort>) -> Result<(), ApplyError> {
        let me = self.clone();
        spawn("meshd-rx", move || {
            me.packet_thread("meshd-rx");
            me.rx_loop(&port)
        })
    }

    /// Set-up of a thread that moves packets, as it starts.
    fn packet_thread(&self, name: &str) {
        if self.batch_scheduling {
            schedule_as_batch(name);
        }
    }

    /// Whether this gateway forwards (see [`Dataplane::set_forwarding`]).
    pub fn forwarding(&self) -> bool {
        self.forwarding.load(Ordering::Acquire)
    }

    /// Turns forwarding off (a standby: every packet is dropped as `standby`, the timers stop)
    /// or on. Turned on, every session starts over and a handshake goes to every peer whose
    /// endpoint is known: the peers' sessions with another candidate (same key) are not ours,
    /// and the handshake moves their endpoint here (WireGuard roaming).
    pub fn set_forwarding(&self, on: bool) {
        let was = self.forwarding.swap(on, Ordering::AcqRel);
        if on && !was {
            let peers = self.restart_sessions();
            self.initiate_handshakes(&peers);
        }
    }

    /// The peer `key` stopped answering its health probe: when it has several endpoints, moves
    /// to the next and sends a handshake there at once, instead of waiting for WireGuard's own
    /// timers (15 s of silence, then a retry every 5 s). This is how a side behind NAT finds
    /// the other cluster's new active gateway within seconds. Returns the new endpoint.
    pub fn try_next_endpoint(&self, key: &PublicKey) -> Option<SocketAddr> {
        if !self.forwarding() {
            return None;
        }
        let peer = self.running.lock().peers.get(key).cloned()?;
        let next = peer.next_endpoint()?;
        self.initiate_handshakes(&[peer]);
        Some(next)
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

    pub(super) fn send(&self, port: &UdpPort, datagram: &[u8], to: SocketAddr) {
        if let Err(e) = port.send_to(datagram, to) {
            self.drops.count(DropReason::SendFailed);
            tracing::trace!(error = %e, to = %to, "send failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::schedule_as_batch;

    #[test]
    fn a_packet_thread_puts_itself_under_sched_batch() {
        // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let before = policy();
        let within = std::thread::spawn(move || {
            schedule_as_batch("test");
            policy()
        })
        .join()
        .unwrap();
        assert_eq!(within, libc::SCHED_BATCH);
        // Only the calling thread changes.
        assert_eq!(policy(), before);
    }
}
