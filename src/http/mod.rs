//! HTTP, both ways, on hyper 1: serving it on a TCP port that anyone on the network may reach,
//! within the limits of [`crate::listener`] plus a deadline for the request headers (slowloris)
//! ([`serve`]); and asking for it ([`client`]).

pub mod client;

use crate::listener::Limits;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Serves `router` on `listener` within `limits` until the task is dropped. `what` names the
/// listener in its log lines.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    what: &'static str,
) -> std::io::Result<()> {
    crate::listener::serve(listener, limits, what, move |stream, from| {
        // Handlers that ask who is calling (`ConnectInfo<SocketAddr>`) find it as axum's own
        // server would put it.
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(from))),
        );
        async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.request_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(listener = what, error = %e, "connection ended");
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;
    use std::time::Instant;

    const TIGHT: Limits = Limits {
        connections: 8,
        per_client: 3,
        request_timeout: Duration::from_millis(300),
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
