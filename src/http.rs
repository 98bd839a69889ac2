//! Serving HTTP on a TCP port that anyone on the network may reach, with limits.
//!
//! meshd's metrics and health ports listen on node addresses and its catalog sync on the tunnel
//! address: reachable from the LAN, from every pod of the cluster, and (the sync) from peers. A
//! client that opens connections and never finishes its request headers, or holds them open
//! idle, must not be able to take the port away from the kubelet's probe or Prometheus. So each
//! listener here has:
//! - a cap on connections per client address: a connection beyond it is closed at once, unread;
//! - a cap overall: a new connection beyond it closes the oldest open one, so clients from many
//!   addresses can make the port churn but cannot keep a newcomer (the kubelet's probe) out;
//! - a deadline for the request headers (slowloris), and a deadline for a whole connection
//!   (long-polls included), after which it is closed.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at once, from everybody.
    pub connections: usize,
    /// Open connections at once from one client address.
    pub per_client: usize,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// Longest life of a connection, whatever it does.
    pub connection_lifetime: Duration,
}

impl Limits {
    /// For the metrics and health ports: short requests, a few scrapers and probes.
    pub const PROBES: Limits = Limits {
        connections: 256,
        per_client: 16,
        header_timeout: Duration::from_secs(5),
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

/// Serves `router` on `listener` within `limits` until the task is dropped. `what` names the
/// listener in the one log line a refused connection burst gets.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    what: &'static str,
) -> std::io::Result<()> {
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
        // Handlers that ask who is calling (`ConnectInfo<SocketAddr>`) find it as axum's own
        // server would put it.
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(from))),
        );
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                ended = tokio::time::timeout(limits.connection_lifetime, connection) => match ended {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(listener = what, error = %e, "connection ended"),
                    Err(_) => tracing::debug!(listener = what, "connection closed at its lifetime"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    const TIGHT: Limits = Limits {
        connections: 8,
        per_client: 3,
        header_timeout: Duration::from_millis(300),
        connection_lifetime: Duration::from_secs(2),
    };

    async fn server(limits: Limits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(listener, router, limits, "test"));
        addr
    }

    fn get(from: &str, to: std::net::SocketAddr) -> std::io::Result<String> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(
            &format!("{from}:0")
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )?;
        socket.connect(&to.into())?;
        let mut s: TcpStream = socket.into();
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    fn slow_client(from: &str, to: std::net::SocketAddr) -> TcpStream {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(
                &format!("{from}:0")
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.connect(&to.into()).unwrap();
        let mut s: TcpStream = socket.into();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
        s
    }

    /// One client holding its share of slow connections does not keep another out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_client_is_capped_and_others_are_served() {
        let addr = server(TIGHT).await;
        let held: Vec<TcpStream> = (0..10).map(|_| slow_client("127.0.0.2", addr)).collect();
        let answer = tokio::task::spawn_blocking(move || get("127.0.0.1", addr))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Beyond its three, the slow client's connections were closed unread.
        let closed = held
            .into_iter()
            .filter_map(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut buf = [0u8; 16];
                let closed = match s.read(&mut buf) {
                    Ok(n) => n == 0,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                };
                closed.then_some(())
            })
            .count();
        assert!(
            closed >= 7,
            "only {closed} of 10 slow connections were closed"
        );
    }

    /// Slow clients from more addresses than the listener has room for: each new connection
    /// closes the oldest, so a newcomer is still served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_listener_closes_its_oldest_for_a_newcomer() {
        let addr = server(TIGHT).await;
        let held: Vec<TcpStream> = (2..40)
            .map(|i| slow_client(&format!("127.0.1.{i}"), addr))
            .collect();
        let answer = tokio::task::spawn_blocking(move || get("127.0.0.1", addr))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(held);
    }

    /// Headers not finished in time: the connection is closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unfinished_headers_are_cut_off() {
        let addr = server(TIGHT).await;
        let closed_after = tokio::task::spawn_blocking(move || {
            let mut s = slow_client("127.0.0.1", addr);
            let start = Instant::now();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 256];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            start.elapsed()
        })
        .await
        .unwrap();
        assert!(
            closed_after < Duration::from_secs(4),
            "a connection without complete headers stayed open {closed_after:?}"
        );
    }
}
