//! DNS over TCP (RFC 7766), served by us rather than by hickory-server so that the connections
//! have the limits of every other listener ([`crate::listener`]): a cap per client address, a
//! cap overall that closes the oldest connection for a newcomer, a deadline for each query
//! (which is also the idle timeout between queries), and a longest life per connection. The
//! answers come from the same [`ClustersetResponder`] as over UDP.
//!
//! Queries on one connection are answered in order, one at a time, as hickory does: a client
//! cannot make one connection cost more than one query's work at once.

use super::handler::ClustersetResponder;
use crate::listener::Limits;
use hickory_proto::op::{Header, Message, MessageType, ResponseCode};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

/// The DNS port's TCP limits. A stub resolver opens one connection for a truncated answer and
/// closes it; a forwarding CoreDNS keeps a few open.
pub const LIMITS: Limits = Limits {
    connections: 256,
    per_client: 16,
    request_timeout: Duration::from_secs(5),
    connection_lifetime: Duration::from_secs(120),
};

/// Answers DNS over TCP on `listener` within `limits` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    responder: Arc<ClustersetResponder>,
    limits: Limits,
) -> std::io::Result<()> {
    crate::listener::serve(listener, limits, "dns/tcp", move |stream, from| {
        connection(stream, from, responder.clone(), limits.request_timeout)
    })
    .await
}

/// One client's connection: length-prefixed queries, each answered before the next is read;
/// closed when the client closes it, is silent for `request_timeout` (or takes longer to send
/// one query), or sends something that is not a DNS message.
async fn connection(
    stream: TcpStream,
    from: SocketAddr,
    responder: Arc<ClustersetResponder>,
    request_timeout: Duration,
) {
    let (mut reader, writer) = stream.into_split();
    let mut reply = TcpReply {
        writer: Arc::new(tokio::sync::Mutex::new(writer)),
    };
    loop {
        let raw = match tokio::time::timeout(request_timeout, read_message(&mut reader)).await {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) => {
                tracing::debug!(client = %from, error = %e, "DNS over TCP: connection ended");
                return;
            }
            Err(_) => {
                tracing::debug!(client = %from, "DNS over TCP: no query in time, closing");
                return;
            }
        };
        // Fewer than twelve bytes is no DNS message: nothing to answer, and a client that
        // sends one is not speaking DNS.
        let Ok(header) = Header::read(&mut BinDecoder::new(&raw)) else {
            return;
        };
        if header.metadata.message_type == MessageType::Response {
            // Never answer an answer (reflection loops).
            continue;
        }
        match Request::from_bytes(raw, from, Protocol::Tcp) {
            Ok(request) => {
                responder
                    .handle_request::<_, TokioTime>(&request, reply.clone())
                    .await;
            }
            Err(_) => {
                let formerr = Message::error_msg(
                    header.metadata.id,
                    header.metadata.op_code,
                    ResponseCode::FormErr,
                );
                let Ok(bytes) = formerr.to_vec() else { return };
                if reply.send(bytes).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads one length-prefixed message.
async fn read_message(reader: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    reader.read_exact(&mut len).await?;
    let mut raw = vec![0u8; usize::from(u16::from_be_bytes(len))];
    reader.read_exact(&mut raw).await?;
    Ok(raw)
}

/// Where the responder writes its answers: the connection's write half, length-prefixed.
#[derive(Clone)]
struct TcpReply {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

impl TcpReply {
    async fn send(&mut self, message: Vec<u8>) -> std::io::Result<()> {
        let len = u16::try_from(message.len()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a DNS answer longer than 65,535 bytes",
            )
        })?;
        let mut framed = Vec::with_capacity(message.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&message);
        self.writer.lock().await.write_all(&framed).await
    }
}

#[async_trait::async_trait]
impl ResponseHandler for TcpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(u16::MAX);
        let info = response.destructive_emit(&mut encoder)?;
        self.send(bytes).await?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    //! Real TCP connections on loopback (127.0.0.0/8 gives each client its own address).
    use super::*;
    use crate::discovery::catalog::{Endpoint, ExportCatalog, ExportedService, ServiceType};
    use crate::discovery::ClustersetView;
    use crate::dns::QueryCounters;
    use arc_swap::ArcSwap;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};
    use std::io::{Read, Write};
    use std::time::Instant;

    const TIGHT: Limits = Limits {
        connections: 8,
        per_client: 3,
        request_timeout: Duration::from_millis(400),
        connection_lifetime: Duration::from_secs(3),
    };

    /// A responder for one headless service, `web.demo` at 10.244.1.10, on TCP only.
    async fn start(limits: Limits) -> SocketAddr {
        let catalog = ExportCatalog {
            cluster: "m1".into(),
            generation: 1,
            services: vec![ExportedService {
                namespace: "demo".into(),
                name: "web".into(),
                service_type: ServiceType::Headless,
                ips: Vec::new(),
                ports: Vec::new(),
                endpoints: vec![Endpoint {
                    ip: "10.244.1.10".parse().unwrap(),
                    hostname: None,
                    ready: true,
                }],
                exported_at: None,
                ..Default::default()
            }],
        };
        let view = ClustersetView::build(Arc::new(catalog), &Default::default());
        let responder = Arc::new(ClustersetResponder::new(
            Arc::new(ArcSwap::from_pointee(view)),
            5,
            0,
            Arc::new(QueryCounters::default()),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, responder, limits));
        addr
    }

    fn connect(from: &str, to: SocketAddr) -> std::net::TcpStream {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let from: SocketAddr = format!("{from}:0").parse().unwrap();
        socket.bind(&from.into()).unwrap();
        socket.connect(&to.into()).unwrap();
        let s: std::net::TcpStream = socket.into();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    }

    fn framed(id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(
            Name::from_ascii("web.demo.svc.clusterset.local.").unwrap(),
            RecordType::A,
        ));
        let bytes = m.to_vec().unwrap();
        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&bytes);
        out
    }

    /// Reads one answer, or `None` when the server closed the connection.
    fn answer(s: &mut std::net::TcpStream) -> Option<Message> {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut raw = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut raw).ok()?;
        Some(Message::from_vec(&raw).unwrap())
    }

    fn closed(mut s: &std::net::TcpStream) -> bool {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    fn query(from: &str, to: SocketAddr) -> Option<Message> {
        let mut s = connect(from, to);
        s.write_all(&framed(7)).ok()?;
        answer(&mut s)
    }

    /// Queries pipelined on one connection are answered in order; an answer is not answered;
    /// a header followed by garbage gets FORMERR; fewer than twelve bytes closes the connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_queries_answers_and_garbage() {
        let addr = start(TIGHT).await;
        tokio::task::spawn_blocking(move || {
            let mut s = connect("127.0.0.1", addr);
            let mut response = Message::response(99, hickory_proto::op::OpCode::Query)
                .to_vec()
                .unwrap();
            let mut burst = (response.len() as u16).to_be_bytes().to_vec();
            burst.append(&mut response);
            for id in [1, 2] {
                burst.extend(framed(id));
            }
            // Twelve header bytes that promise a question, then none.
            burst.extend_from_slice(b"\x00\x0c\x00\x03\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00");
            burst.extend(framed(4));
            s.write_all(&burst).unwrap();
            let ids: Vec<(u16, ResponseCode, usize)> = (0..4)
                .map(|_| {
                    let m = answer(&mut s).expect("an answer");
                    (m.metadata.id, m.metadata.response_code, m.answers.len())
                })
                .collect();
            assert_eq!(
                ids,
                [
                    (1, ResponseCode::NoError, 1),
                    (2, ResponseCode::NoError, 1),
                    (3, ResponseCode::FormErr, 0),
                    (4, ResponseCode::NoError, 1)
                ]
            );
            s.write_all(b"\x00\x03abc").unwrap();
            assert!(
                closed(&s),
                "a message shorter than a header left the connection open"
            );
        })
        .await
        .unwrap();
    }

    /// One address holding many silent connections keeps its share only; another client is
    /// answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_holding_connections_is_capped() {
        let addr = start(TIGHT).await;
        tokio::task::spawn_blocking(move || {
            let held: Vec<_> = (0..10).map(|_| connect("127.0.0.2", addr)).collect();
            assert!(
                query("127.0.0.1", addr).is_some(),
                "a second client was not answered"
            );
            let cut = held
                .iter()
                .filter(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    closed(s)
                })
                .count();
            assert!(
                cut >= 7,
                "only {cut} of 10 connections from one address were closed"
            );
        })
        .await
        .unwrap();
    }

    /// Silent connections from more addresses than the listener holds: the oldest make room,
    /// so a newcomer is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_listener_closes_its_oldest_for_a_newcomer() {
        let addr = start(TIGHT).await;
        tokio::task::spawn_blocking(move || {
            let held: Vec<_> = (2..60)
                .map(|i| connect(&format!("127.0.2.{i}"), addr))
                .collect();
            assert!(
                query("127.0.0.1", addr).is_some(),
                "the newcomer was not answered"
            );
            assert!(closed(&held[0]), "the oldest connection is still open");
        })
        .await
        .unwrap();
    }

    /// A client that says nothing, or drips a query a byte at a time, is cut off at the
    /// request deadline; one that keeps asking is cut off at the connection's lifetime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_dripping_and_endless_clients_are_cut_off() {
        let addr = start(TIGHT).await;
        tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let silent = connect("127.0.0.3", addr);
            assert!(closed(&silent));
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "silent for {:?}",
                start.elapsed()
            );

            let mut drip = connect("127.0.0.4", addr);
            let start = Instant::now();
            let bytes = framed(5);
            let mut cut = false;
            for b in &bytes {
                if drip.write_all(&[*b]).is_err() {
                    cut = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            drip.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            assert!(
                cut || closed(&drip),
                "a query dripped over {:?} was answered",
                start.elapsed()
            );

            let mut endless = connect("127.0.0.5", addr);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(6) {
                if endless.write_all(&framed(6)).is_err() || answer(&mut endless).is_none() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let lived = start.elapsed();
            assert!(
                lived > Duration::from_secs(2) && lived < Duration::from_secs(5),
                "a busy connection lived {lived:?} (lifetime 3 s)"
            );
        })
        .await
        .unwrap();
    }
}
