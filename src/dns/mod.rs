//! The `clusterset.local` DNS responder (the MCS API DNS specification, as Submariner Lighthouse
//! answers it).
//!
//! Three layers, as in hickory-dns: [`answer`] is the answer logic, a pure function over a
//! [`ClustersetView`] snapshot indexed by service name; [`handler`] is the hickory-server
//! [`RequestHandler`] that reads the view from an `ArcSwap`, indexes it once per view and encodes
//! replies; [`serve`] binds UDP and TCP and runs hickory's [`Server`]. The responder knows nothing
//! of Kubernetes: whoever owns the catalogs (today `meshd` with the static exports file) stores a
//! new view and the next query sees it.
//!
//! [`RequestHandler`]: hickory_server::server::RequestHandler

pub mod answer;
pub mod handler;
pub mod rrl;

use crate::discovery::ClustersetView;
use arc_swap::ArcSwap;
use handler::ClustersetResponder;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use hickory_server::Server;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Default TTL of answers, in seconds: short, so a failover shows within seconds.
pub const DEFAULT_TTL: u32 = 5;
/// How long a TCP client may stay silent before its connection is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Replies queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;

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
}

/// Binds `listen` (UDP and TCP on the same port; port 0 picks one) and returns the running server
/// and its address; it answers from `view` until dropped, UDP answers rate-limited to
/// `rate_limit` identical ones a second per client prefix ([`rrl`]; 0: off). Await
/// `block_until_done` on the server to learn if a listener dies.
pub async fn serve(
    listen: SocketAddr,
    view: Arc<ArcSwap<ClustersetView>>,
    ttl: u32,
    rate_limit: u32,
    counters: Arc<QueryCounters>,
) -> Result<(Server<ClustersetResponder>, SocketAddr), DnsError> {
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
    let mut server = Server::new(ClustersetResponder::new(view, ttl, rate_limit, counters));
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
    Ok((server, local))
}
