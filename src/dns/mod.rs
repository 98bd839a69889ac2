//! The `clusterset.local` DNS responder (the MCS API DNS specification, as Submariner Lighthouse
//! answers it).
//!
//! Three layers, as in hickory-dns: [`answer`] is the answer logic, a pure function over a
//! [`ClustersetView`] snapshot indexed by service name; [`handler`] is the hickory-server
//! [`RequestHandler`] that reads the view from an `ArcSwap`, indexes it once per view and encodes
//! replies; [`serve`] binds UDP and TCP, runs hickory's [`Server`] on UDP and our own [`tcp`]
//! listener (with connection limits) on TCP. The responder knows nothing
//! of Kubernetes: whoever owns the catalogs (today `meshd` with the static exports file) stores a
//! new view and the next query sees it.
//!
//! [`RequestHandler`]: hickory_server::server::RequestHandler

pub mod answer;
pub mod handler;
pub mod rrl;
pub mod tcp;

use crate::discovery::ClustersetView;
use arc_swap::ArcSwap;
use handler::ClustersetResponder;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::Server;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The query types counted by name; everything else is `other` (bounded label cardinality).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryType {
    A,
    Aaaa,
    Srv,
    Txt,
    Soa,
    Any,
    Other,
}

impl QueryType {
    pub const ALL: [QueryType; 7] = [
        QueryType::A,
        QueryType::Aaaa,
        QueryType::Srv,
        QueryType::Txt,
        QueryType::Soa,
        QueryType::Any,
        QueryType::Other,
    ];

    pub fn of(t: RecordType) -> Self {
        match t {
            RecordType::A => QueryType::A,
            RecordType::AAAA => QueryType::Aaaa,
            RecordType::SRV => QueryType::Srv,
            RecordType::TXT => QueryType::Txt,
            RecordType::SOA => QueryType::Soa,
            RecordType::ANY => QueryType::Any,
            _ => QueryType::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QueryType::A => "A",
            QueryType::Aaaa => "AAAA",
            QueryType::Srv => "SRV",
            QueryType::Txt => "TXT",
            QueryType::Soa => "SOA",
            QueryType::Any => "ANY",
            QueryType::Other => "other",
        }
    }
}

/// The response codes the responder gives, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryRcode {
    NoError,
    NxDomain,
    Refused,
    ServFail,
    FormErr,
    NotImp,
    BadVers,
}

impl QueryRcode {
    pub const ALL: [QueryRcode; 7] = [
        QueryRcode::NoError,
        QueryRcode::NxDomain,
        QueryRcode::Refused,
        QueryRcode::ServFail,
        QueryRcode::FormErr,
        QueryRcode::NotImp,
        QueryRcode::BadVers,
    ];

    pub fn of(code: ResponseCode) -> Self {
        match code {
            ResponseCode::NoError => QueryRcode::NoError,
            ResponseCode::NXDomain => QueryRcode::NxDomain,
            ResponseCode::Refused => QueryRcode::Refused,
            ResponseCode::FormErr => QueryRcode::FormErr,
            ResponseCode::NotImp => QueryRcode::NotImp,
            ResponseCode::BADVERS => QueryRcode::BadVers,
            _ => QueryRcode::ServFail,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QueryRcode::NoError => "NOERROR",
            QueryRcode::NxDomain => "NXDOMAIN",
            QueryRcode::Refused => "REFUSED",
            QueryRcode::ServFail => "SERVFAIL",
            QueryRcode::FormErr => "FORMERR",
            QueryRcode::NotImp => "NOTIMP",
            QueryRcode::BadVers => "BADVERS",
        }
    }
}

/// Queries answered, by query type and response code: relaxed atomics, read at scrape time by
/// the metrics collector (`meshd_dns_queries_total`).
#[derive(Debug, Default)]
pub struct QueryCounters {
    counts: [[AtomicU64; QueryRcode::ALL.len()]; QueryType::ALL.len()],
    /// Answers held back by response-rate limiting: sent truncated, and not sent
    /// (`meshd_dns_rate_limited_total`).
    slipped: AtomicU64,
    dropped: AtomicU64,
}

impl QueryCounters {
    /// Counts an answer that response-rate limiting sent truncated (`slipped`) or not at all.
    pub fn count_limited(&self, slipped: bool) {
        let counter = if slipped {
            &self.slipped
        } else {
            &self.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers sent truncated and answers not sent by response-rate limiting.
    pub fn limited(&self) -> (u64, u64) {
        (
            self.slipped.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }

    pub fn count(&self, qtype: QueryType, rcode: QueryRcode) {
        self.counts[qtype as usize][rcode as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, qtype: QueryType, rcode: QueryRcode) -> u64 {
        self.counts[qtype as usize][rcode as usize].load(Ordering::Relaxed)
    }
}

/// The responder could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot listen for DNS on {addr}/{proto}: {source}; set dns_listen (or --dns-listen) to a free address, or \"off\"")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot start the DNS responder's thread: {0}; the machine is out of threads or memory"
    )]
    Thread(#[source] std::io::Error),
    #[error("the DNS responder's {proto} listener stopped: {reason}; meshd exits so that the kubelet restarts it")]
    Stopped { proto: &'static str, reason: String },
}

/// Binds `listen` (UDP and TCP on the same port; port 0 picks one) and returns the running server
/// and its address; it answers from `view` until dropped, UDP answers rate-limited to
/// `rate_limit` identical ones a second per client prefix ([`rrl`]; 0: off), TCP connections
/// within [`tcp::LIMITS`]. Await [`DnsServer::run`] to learn if a listener dies.
pub async fn serve(
    listen: SocketAddr,
    view: Arc<ArcSwap<ClustersetView>>,
    ttl: u32,
    rate_limit: u32,
    counters: Arc<QueryCounters>,
) -> Result<(DnsServer, SocketAddr), DnsError> {
    let bind_error = |proto| {
        move |source| DnsError::Bind {
            addr: listen,
            proto,
            source,
        }
    };
    let udp = tokio::net::UdpSocket::bind(listen)
        .await
        .map_err(bind_error("udp"))?;
    let local = udp.local_addr().map_err(bind_error("udp"))?;
    let tcp = tokio::net::TcpListener::bind(local)
        .await
        .map_err(bind_error("tcp"))?;
    let responder = Arc::new(ClustersetResponder::new(view, ttl, rate_limit, counters));
    let mut server = Server::new(Shared(responder.clone()));
    server.register_socket(udp);
    let tcp = tokio::spawn(tcp::serve(tcp, responder, tcp::LIMITS));
    Ok((DnsServer { udp: server, tcp }, local))
}

/// The running responder: hickory's UDP server and our TCP listener.
pub struct DnsServer {
    udp: Server<Shared>,
    tcp: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl DnsServer {
    /// Serves until a listener stops, and says which and why.
    pub async fn run(mut self) -> DnsError {
        let stopped = tokio::select! {
            udp = self.udp.block_until_done() => ("udp", udp.err().map(|e| e.to_string())),
            tcp = &mut self.tcp => ("tcp", match tcp {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("the task ended: {e}")),
            }),
        };
        self.tcp.abort();
        DnsError::Stopped {
            proto: stopped.0,
            reason: stopped.1.unwrap_or_else(|| "it stopped".into()),
        }
    }
}

/// [`serve`] on a thread of its own (`meshd-dns`) with its own runtime, so that nothing the
/// control plane does (a SIGHUP reload, a UAPI `set`, checking a peer's 8 MiB catalog) delays an
/// answer. Returns the bound address and the thread's end: it resolves, with the reason, when a
/// listener stops.
pub async fn spawn(
    listen: SocketAddr,
    view: Arc<ArcSwap<ClustersetView>>,
    ttl: u32,
    rate_limit: u32,
    counters: Arc<QueryCounters>,
) -> Result<(DnsThread, SocketAddr), DnsError> {
    let (ready, bound) = tokio::sync::oneshot::channel();
    let (end, ended) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("meshd-dns".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready.send(Err(DnsError::Thread(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                match serve(listen, view, ttl, rate_limit, counters).await {
                    Ok((server, local)) => {
                        let _ = ready.send(Ok(local));
                        let _ = end.send(server.run().await);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            });
        })
        .map_err(DnsError::Thread)?;
    let local = bound.await.unwrap_or_else(|_| {
        Err(DnsError::Stopped {
            proto: "udp",
            reason: "the DNS thread ended while starting".into(),
        })
    })?;
    Ok((DnsThread { ended }, local))
}

/// The end of the DNS thread started by [`spawn`].
pub struct DnsThread {
    ended: tokio::sync::oneshot::Receiver<DnsError>,
}

impl DnsThread {
    /// Waits until the responder stops, and says why.
    pub async fn stopped(self) -> DnsError {
        self.ended.await.unwrap_or_else(|_| DnsError::Stopped {
            proto: "udp",
            reason: "the DNS thread ended".into(),
        })
    }
}

/// The responder as hickory's UDP server holds it, shared with the TCP listener.
struct Shared(Arc<ClustersetResponder>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.0
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::catalog::{Endpoint, ExportCatalog, ExportedService, ServiceType};
    use crate::discovery::sync::{accept_catalog, SyncPeer};
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::Name;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    fn headless(cluster: &str, services: usize, endpoints: usize) -> ExportCatalog {
        ExportCatalog {
            cluster: cluster.into(),
            generation: 1,
            services: (0..services)
                .map(|s| ExportedService {
                    namespace: "demo".into(),
                    name: format!("svc{s}"),
                    service_type: ServiceType::Headless,
                    ips: Vec::new(),
                    ports: Vec::new(),
                    endpoints: (0..endpoints)
                        .map(|e| Endpoint {
                            ip: format!("10.245.{}.{}", s % 250, e % 250 + 1)
                                .parse()
                                .unwrap(),
                            hostname: Some(format!("pod-{e}")),
                            ready: true,
                        })
                        .collect(),
                    exported_at: None,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// DNS answers from a thread of its own: while the control plane's runtime is held by
    /// checking a peer's multi-megabyte catalog and by a reload stuck resolving a name (both on
    /// the runtime's own thread, the worst case: with DNS on that runtime no query would be
    /// answered until both were done), queries keep being answered, the median within 10 ms.
    #[test]
    fn dns_answers_while_the_control_plane_is_busy() {
        let control = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let view = ClustersetView::build(Arc::new(headless("m1", 1, 1)), &Default::default());
        let (_thread, addr) = control
            .block_on(spawn(
                "127.0.0.1:0".parse().unwrap(),
                Arc::new(ArcSwap::from_pointee(view)),
                5,
                0,
                Arc::new(QueryCounters::default()),
            ))
            .unwrap();
        let body = serde_json::to_vec(&headless("m2", 2_000, 40)).unwrap();
        let peer = SyncPeer {
            name: "m2".into(),
            tunnel_address: "100.64.0.2".parse().unwrap(),
            allowed_cidrs: vec!["10.245.0.0/16".parse().unwrap()],
        };

        let stop = Arc::new(AtomicBool::new(false));
        let asking = stop.clone();
        let asker = std::thread::spawn(move || {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut query = Message::query();
            query.add_query(Query::query(
                Name::from_ascii("svc0.demo.svc.clusterset.local.").unwrap(),
                hickory_proto::rr::RecordType::A,
            ));
            let query = query.to_vec().unwrap();
            let mut answered = Vec::new();
            let mut buf = [0u8; 512];
            while !asking.load(Ordering::Relaxed) {
                let sent = Instant::now();
                socket.send_to(&query, addr).unwrap();
                if socket.recv(&mut buf).is_ok() {
                    answered.push((sent, sent.elapsed()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            answered
        });
        std::thread::sleep(Duration::from_millis(100));
        let (start, end, services) = control.block_on(async {
            let start = Instant::now();
            let accepted = accept_catalog(&peer, &body).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            (start, Instant::now(), accepted.catalog.services.len())
        });
        stop.store(true, Ordering::Relaxed);
        let answered = asker.join().unwrap();
        assert_eq!(services, 2_000);
        let mut during: Vec<Duration> = answered
            .iter()
            .filter(|(sent, _)| *sent >= start && *sent < end)
            .map(|(_, took)| *took)
            .collect();
        during.sort();
        assert!(
            during.len() >= 10,
            "{} answers while the control plane was busy for {:?}",
            during.len(),
            end - start
        );
        let median = during[during.len() / 2];
        assert!(
            median < Duration::from_millis(10),
            "median answer {median:?} while the control plane was busy (slowest {:?})",
            during.last().unwrap()
        );
    }
}
