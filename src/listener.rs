//! TCP listeners that anyone on the network may reach, with limits.
//!
//! meshd's metrics and health ports listen on node addresses, its DNS responder on node or pod
//! addresses, and its catalog sync on the tunnel address: reachable from the LAN, from every pod
//! of the cluster, and (the sync) from peers. A client that opens connections and never finishes
//! a request, or holds them open idle, must not be able to take the port away from the kubelet's
//! probe, Prometheus or a pod's resolver. So each listener here has:
//! - a cap on connections per client address: a connection beyond it is closed at once, unread;
//! - a cap overall: a new connection beyond it closes the oldest open one, so clients from many
//!   addresses can make the port churn but cannot keep a newcomer out;
//! - a deadline for each request (the protocol's handler applies it: HTTP headers, a DNS
//!   query's bytes), and a deadline for a whole connection (long-polls included), after which
//!   it is closed.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at once, from everybody.
    pub connections: usize,
    /// Open connections at once from one client address.
    pub per_client: usize,
    /// Time a client has to send a whole request (HTTP headers, a DNS query) once connected
    /// or answered.
    pub request_timeout: Duration,
    /// Longest life of a connection, whatever it does.
    pub connection_lifetime: Duration,
}

impl Limits {
    /// For the metrics and health ports: short requests, a few scrapers and probes.
    pub const PROBES: Limits = Limits {
        connections: 256,
        per_client: 16,
        request_timeout: Duration::from_secs(5),
        connection_lifetime: Duration::from_secs(30),
    };
}

/// Who holds how many connections, oldest first.
#[derive(Default)]
struct Occupancy {
    next_id: u64,
    /// Open connections by admission order, each with how to close it.
    open: BTreeMap<u64, Arc<Notify>>,
    by_client: HashMap<IpAddr, usize>,
}

/// One admitted connection; gives its place back when dropped.
struct Admitted {
    occupancy: Arc<Mutex<Occupancy>>,
    id: u64,
    client: IpAddr,
    /// Notified when a newer connection needs the place.
    evicted: Arc<Notify>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut o = self.occupancy.lock();
        o.open.remove(&self.id);
        if let Some(n) = o.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                o.by_client.remove(&self.client);
            }
        }
    }
}

/// Admits a connection from `client`, closing the oldest one when the listener is full; `None`
/// when the client already holds its share.
fn admit(occupancy: &Arc<Mutex<Occupancy>>, client: IpAddr, limits: &Limits) -> Option<Admitted> {
    let mut o = occupancy.lock();
    let mine = o.by_client.get(&client).copied().unwrap_or(0);
    if mine >= limits.per_client {
        return None;
    }
    if o.open.len() >= limits.connections {
        if let Some((_, oldest)) = o.open.pop_first() {
            oldest.notify_one();
        }
    }
    let id = o.next_id;
    o.next_id += 1;
    let evicted = Arc::new(Notify::new());
    o.open.insert(id, evicted.clone());
    o.by_client.insert(client, mine + 1);
    Some(Admitted {
        occupancy: occupancy.clone(),
        id,
        client,
        evicted,
    })
}

/// Accepts connections on `listener` within `limits` until the task is dropped, and runs
/// `connection` for each admitted one, for at most `limits.connection_lifetime` and closed early
/// when a newer connection needs its place. `what` names the listener in the one log line a
/// refused connection burst gets.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    what: &'static str,
    connection: F,
) -> std::io::Result<()>
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let occupancy = Arc::new(Mutex::new(Occupancy::default()));
    let mut refused: u64 = 0;
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors or a connection reset before accept: keep serving.
            Err(e) if is_transient(&e) => {
                tracing::debug!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(admitted) = admit(&occupancy, from.ip(), &limits) else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(listener = what, client = %from.ip(), refused, "a client holds {} connections: closing its new ones", limits.per_client);
            }
            drop(stream);
            continue;
        };
        let served = connection(stream, from);
        tokio::spawn(async move {
            tokio::select! {
                ended = tokio::time::timeout(limits.connection_lifetime, served) => if ended.is_err() {
                    tracing::debug!(listener = what, "connection closed at its lifetime");
                },
                _ = admitted.evicted.notified() => {
                    tracing::debug!(listener = what, "connection closed for a newer one: listener full");
                }
            }
            drop(admitted);
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    ) || e.kind() == std::io::ErrorKind::ConnectionReset
}
