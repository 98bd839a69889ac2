//! The hickory-server plumbing: a [`RequestHandler`] that checks the request (opcode, one
//! question, class IN, EDNS version), asks [`super::answer::answer`] about the question against
//! the current snapshot of the clusterset view, and writes the reply.
//!
//! The view is read from an [`ArcSwap`]: one atomic load per query, no lock, and the snapshot is
//! released before the reply is sent. The responder keeps the [`Snapshot`] (the view indexed by
//! service name) of the last view it saw in a second `ArcSwap` and builds a new one on the first
//! query after the view changes. Wire decoding (FORMERR for undecodable messages) and
//! encoding (TC when a UDP reply exceeds 512 bytes or the client's EDNS buffer) are hickory's.
//! Every query is counted in [`QueryCounters`]; nothing is logged per query above debug.

use super::answer::{answer, Answer, Rcode, RecordData, Snapshot, ZONE};
use super::rrl::{ResponseRateLimiter, Verdict};
use super::{QueryCounters, QueryRcode, QueryType};
use crate::discovery::ClustersetView;
use arc_swap::{ArcSwap, Guard};
use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use std::sync::Arc;

/// The largest UDP payload we offer in EDNS replies (the DNS flag day 2020 value).
const MAX_UDP_PAYLOAD: u16 = 1232;

/// Answers `clusterset.local` questions from a snapshot of the clusterset view.
#[derive(Debug)]
pub struct ClustersetResponder {
    view: Arc<ArcSwap<ClustersetView>>,
    /// The index of the last view answered from.
    snapshot: ArcSwap<Snapshot>,
    ttl: u32,
    counters: Arc<QueryCounters>,
    zone: Name,
    /// Response-rate limiting of UDP answers.
    rrl: ResponseRateLimiter,
}

/// What goes into one reply, before encoding.
struct Reply {
    rcode: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    soa: Option<Record>,
}

impl Reply {
    fn error(rcode: ResponseCode) -> Self {
        Reply {
            rcode,
            authoritative: false,
            answers: Vec::new(),
            soa: None,
        }
    }
}

impl ClustersetResponder {
    /// A responder reading `view` on every query; answers carry `ttl` seconds; UDP answers are
    /// rate-limited to `rate_limit` identical ones a second per client prefix (0: not limited).
    pub fn new(
        view: Arc<ArcSwap<ClustersetView>>,
        ttl: u32,
        rate_limit: u32,
        counters: Arc<QueryCounters>,
    ) -> Self {
        let zone = Name::from_ascii(ZONE).unwrap_or_else(|_| Name::root());
        let snapshot = ArcSwap::from_pointee(Snapshot::new(view.load_full()));
        ClustersetResponder {
            view,
            snapshot,
            ttl,
            counters,
            zone,
            rrl: ResponseRateLimiter::new(rate_limit),
        }
    }

    /// The snapshot of the current view: the kept one, or a new one when the view has changed.
    fn snapshot(&self) -> Arc<Snapshot> {
        let view = self.view.load();
        let kept = self.snapshot.load();
        if Arc::ptr_eq(kept.view(), &view) {
            return Guard::into_inner(kept);
        }
        let fresh = Arc::new(Snapshot::new(Guard::into_inner(view)));
        self.snapshot.store(fresh.clone());
        fresh
    }

    fn reply(&self, request: &Request) -> (QueryType, Reply) {
        if request.metadata.op_code != OpCode::Query {
            return (QueryType::Other, Reply::error(ResponseCode::NotImp));
        }
        let queries = request.queries.queries();
        let [query] = queries else {
            return (QueryType::Other, Reply::error(ResponseCode::FormErr));
        };
        let qtype = query.query_type();
        let counted = QueryType::of(qtype);
        if query.query_class() != DNSClass::IN {
            return (counted, Reply::error(ResponseCode::NotImp));
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return (counted, Reply::error(ResponseCode::BADVERS));
        }
        let name = query.original().name();
        let (result, serial) = {
            let snapshot = self.snapshot();
            (answer(&snapshot, name, qtype), snapshot.serial())
        };
        (counted, self.records(name, result, serial))
    }

    fn records(&self, name: &Name, result: Answer, serial: u32) -> Reply {
        let rcode = match result.rcode {
            Rcode::NoError => ResponseCode::NoError,
            Rcode::NxDomain => ResponseCode::NXDomain,
            Rcode::Refused => ResponseCode::Refused,
            Rcode::ServFail => ResponseCode::ServFail,
        };
        let answers = result
            .records
            .into_iter()
            .filter_map(|data| {
                let (owner, rdata) = match data {
                    RecordData::A(ip) => (name.clone(), RData::A(A(ip))),
                    RecordData::Aaaa(ip) => (name.clone(), RData::AAAA(AAAA(ip))),
                    RecordData::Txt(text) => (name.clone(), RData::TXT(TXT::new(vec![text]))),
                    RecordData::Srv {
                        priority,
                        weight,
                        port,
                        target,
                    } => {
                        // Targets come from catalog names; one that is not a valid DNS name
                        // (a label over 63 bytes) cannot be answered and is left out.
                        let target = Name::from_ascii(&target).ok()?;
                        (
                            name.clone(),
                            RData::SRV(SRV::new(priority, weight, port, target)),
                        )
                    }
                    RecordData::Soa => return Some(soa_record(&self.zone, self.ttl, serial)),
                };
                Some(Record::from_rdata(owner, self.ttl, rdata))
            })
            .collect();
        Reply {
            rcode,
            authoritative: matches!(result.rcode, Rcode::NoError | Rcode::NxDomain),
            answers,
            soa: result.soa.then(|| soa_record(&self.zone, self.ttl, serial)),
        }
    }
}

fn soa_record(zone: &Name, ttl: u32, serial: u32) -> Record {
    let host = |label: &str| {
        Name::from_ascii(label)
            .and_then(|l| l.append_name(zone))
            .unwrap_or_else(|_| zone.clone())
    };
    let ttl_i32 = i32::try_from(ttl).unwrap_or(i32::MAX);
    Record::from_rdata(
        zone.clone(),
        ttl,
        RData::SOA(SOA::new(
            host("ns"),
            host("hostmaster"),
            serial,
            ttl_i32,
            ttl_i32,
            ttl_i32.saturating_mul(12),
            ttl,
        )),
    )
}

impl ClustersetResponder {
    /// UDP answers to one question pass response-rate limiting; TCP ones always go.
    fn rate_limit(&self, request: &Request) -> Verdict {
        if request.protocol() != Protocol::Udp {
            return Verdict::Send;
        }
        match request.request_info() {
            Ok(info) => self.rrl.check(
                request.src().ip(),
                info.query.name(),
                info.query.query_type(),
                std::time::Instant::now(),
            ),
            Err(_) => Verdict::Send,
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for ClustersetResponder {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let response_edns = request.edns.as_ref().map(|req| {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            edns.set_version(0);
            edns
        });
        let (qtype, mut reply) = self.reply(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = reply.authoritative;
        metadata.response_code = reply.rcode;
        match self.rate_limit(request) {
            Verdict::Send => {}
            Verdict::Slip => {
                self.counters.count_limited(true);
                metadata.truncation = true;
                reply.answers.clear();
                reply.soa = None;
            }
            Verdict::Drop => {
                self.counters.count_limited(false);
                return ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                });
            }
        }
        let rcode = QueryRcode::of(reply.rcode);
        let response = MessageResponseBuilder::new(&request.queries, response_edns.as_ref()).build(
            metadata,
            reply.answers.iter(),
            [],
            reply.soa.iter(),
            [],
        );
        let sent = response_handle.send_response(response).await;
        self.counters.count(qtype, rcode);
        match sent {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "DNS reply not sent");
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The responder over real sockets on loopback: UDP and TCP, EDNS, truncation, bad input.
    use super::super::{serve, QueryCounters, QueryRcode, QueryType};
    use crate::discovery::catalog::{Endpoint, ExportCatalog, ExportedService, ServiceType};
    use crate::discovery::ClustersetView;
    use arc_swap::ArcSwap;
    use hickory_proto::op::{Edns, Message, Query, ResponseCode};
    use hickory_proto::rr::{DNSClass, Name, RecordType};
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream, UdpSocket};
    use std::sync::Arc;
    use std::time::Duration;

    /// A headless service with `n` ready endpoints: big enough to overflow 512 bytes.
    fn view(n: u8) -> ClustersetView {
        let endpoints = (1..=n)
            .map(|i| Endpoint {
                ip: format!("10.245.1.{i}").parse().unwrap(),
                hostname: None,
                ready: true,
            })
            .collect();
        ClustersetView::build(
            Arc::new(ExportCatalog {
                cluster: "m1".into(),
                generation: 3,
                services: vec![ExportedService {
                    namespace: "demo".into(),
                    name: "many".into(),
                    service_type: ServiceType::Headless,
                    ips: Vec::new(),
                    ports: Vec::new(),
                    endpoints,
                    exported_at: None,
                    ..Default::default()
                }],
            }),
            &BTreeMap::new(),
        )
    }

    struct Running {
        addr: SocketAddr,
        counters: Arc<QueryCounters>,
        view: Arc<ArcSwap<ClustersetView>>,
        _runtime: tokio::runtime::Runtime,
    }

    fn start(view: ClustersetView) -> Running {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let counters = Arc::new(QueryCounters::default());
        let view = Arc::new(ArcSwap::from_pointee(view));
        let (server, addr) = runtime
            .block_on(serve(
                "127.0.0.1:0".parse().unwrap(),
                view.clone(),
                5,
                crate::defaults::DNS_RATE_LIMIT,
                counters.clone(),
            ))
            .unwrap();
        runtime.spawn(server.run());
        Running {
            addr,
            counters,
            view,
            _runtime: runtime,
        }
    }

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m
    }

    fn udp_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send_to(bytes, addr).unwrap();
        let mut buf = vec![0u8; 65535];
        let n = s.recv(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    fn udp(addr: SocketAddr, m: &Message) -> Message {
        let reply = udp_raw(addr, &m.to_vec().unwrap()).expect("no UDP reply");
        Message::from_vec(&reply).unwrap()
    }

    fn tcp(addr: SocketAddr, m: &Message) -> Message {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let bytes = m.to_vec().unwrap();
        s.write_all(&(bytes.len() as u16).to_be_bytes()).unwrap();
        s.write_all(&bytes).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut reply).unwrap();
        Message::from_vec(&reply).unwrap()
    }

    #[test]
    fn answers_over_udp_and_tcp_with_ttl_and_authority() {
        let dns = start(view(3));
        for reply in [
            udp(
                dns.addr,
                &query("many.demo.svc.clusterset.local.", RecordType::A, None),
            ),
            tcp(
                dns.addr,
                &query("many.demo.svc.clusterset.local.", RecordType::A, None),
            ),
        ] {
            assert_eq!(reply.metadata.id, 4242);
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
            assert!(reply.metadata.authoritative);
            assert!(!reply.metadata.recursion_available);
            assert_eq!(reply.answers.len(), 3);
            assert!(reply.answers.iter().all(|r| r.ttl == 5));
        }
        let nx = udp(
            dns.addr,
            &query("nope.demo.svc.clusterset.local.", RecordType::A, None),
        );
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(nx.authorities.len(), 1);
        assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(nx.authorities[0].name.to_string(), "clusterset.local.");
        let refused = udp(dns.addr, &query("example.com.", RecordType::A, None));
        assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
        assert!(refused.answers.is_empty() && refused.authorities.is_empty());
        assert_eq!(dns.counters.get(QueryType::A, QueryRcode::NoError), 2);
        assert_eq!(dns.counters.get(QueryType::A, QueryRcode::NxDomain), 1);
        assert_eq!(dns.counters.get(QueryType::A, QueryRcode::Refused), 1);

        // A new snapshot is seen by the next query.
        dns.view.store(Arc::new(view(1)));
        let reply = udp(
            dns.addr,
            &query("many.demo.svc.clusterset.local.", RecordType::A, None),
        );
        assert_eq!(reply.answers.len(), 1);
        dns.view.store(Arc::new(ClustersetView::unloaded()));
        let reply = udp(
            dns.addr,
            &query("many.demo.svc.clusterset.local.", RecordType::A, None),
        );
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn udp_answers_that_do_not_fit_are_truncated_and_tcp_carries_them() {
        let dns = start(view(100));
        let name = "many.demo.svc.clusterset.local.";
        let plain = udp(dns.addr, &query(name, RecordType::A, None));
        assert!(plain.metadata.truncation, "no TC without EDNS");
        assert!(plain.answers.len() < 100);
        let edns = udp(dns.addr, &query(name, RecordType::A, Some(4096)));
        assert!(
            edns.metadata.truncation,
            "100 A records exceed our 1232-byte EDNS limit"
        );
        assert!(edns.edns.is_some(), "EDNS request, EDNS reply");
        let full = tcp(dns.addr, &query(name, RecordType::A, None));
        assert!(!full.metadata.truncation);
        assert_eq!(full.answers.len(), 100);
        let small = start(view(40));
        let fits = udp(small.addr, &query(name, RecordType::A, Some(1232)));
        assert!(!fits.metadata.truncation);
        assert_eq!(fits.answers.len(), 40);
    }

    #[test]
    fn bad_requests_get_formerr_notimp_or_nothing_and_do_not_stall_others() {
        let dns = start(view(1));
        let good = || {
            udp(
                dns.addr,
                &query("many.demo.svc.clusterset.local.", RecordType::A, None),
            )
        };

        // Zero questions.
        let mut none = Message::query();
        none.metadata.id = 7;
        assert_eq!(
            udp(dns.addr, &none).metadata.response_code,
            ResponseCode::FormErr
        );
        // Two questions.
        let mut two = query("many.demo.svc.clusterset.local.", RecordType::A, None);
        two.add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            udp(dns.addr, &two).metadata.response_code,
            ResponseCode::FormErr
        );
        // Another class.
        let mut chaos = query("version.bind.", RecordType::TXT, None);
        chaos.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(
            udp(dns.addr, &chaos).metadata.response_code,
            ResponseCode::NotImp
        );
        // Another opcode.
        let mut status = query("many.demo.svc.clusterset.local.", RecordType::A, None);
        status.metadata.op_code = hickory_proto::op::OpCode::Status;
        assert_eq!(
            udp(dns.addr, &status).metadata.response_code,
            ResponseCode::NotImp
        );
        // EDNS version 1.
        let mut v1 = query("many.demo.svc.clusterset.local.", RecordType::A, Some(1232));
        if let Some(e) = v1.edns.as_mut() {
            e.set_version(1);
        }
        // Extended code 16 decodes as BADSIG, which shares BADVERS's number.
        let code = udp(dns.addr, &v1).metadata.response_code;
        assert!(
            matches!(code, ResponseCode::BADVERS | ResponseCode::BADSIG),
            "{code:?}"
        );

        // Garbage: too short for a header (dropped), a header claiming questions it lacks,
        // a name of 200 one-byte labels (past the 255-byte limit), a compression loop.
        assert!(udp_raw(dns.addr, b"\x01\x02\x03").is_none());
        let lying = b"\x00\x09\x01\x00\x00\x05\x00\x00\x00\x00\x00\x00";
        let reply = Message::from_vec(&udp_raw(dns.addr, lying).expect("FORMERR reply")).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        let mut long = lying[..].to_vec();
        long[5] = 1;
        for _ in 0..200 {
            long.extend_from_slice(b"\x01a");
        }
        long.extend_from_slice(b"\x00\x00\x01\x00\x01");
        if let Some(reply) = udp_raw(dns.addr, &long) {
            let reply = Message::from_vec(&reply).unwrap();
            assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        }
        let mut looped = lying[..].to_vec();
        looped[5] = 1;
        looped.extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01");
        if let Some(reply) = udp_raw(dns.addr, &looped) {
            let reply = Message::from_vec(&reply).unwrap();
            assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        }
        // A TCP client that connects and says nothing does not hold up anyone.
        let _silent = TcpStream::connect(dns.addr).unwrap();
        assert_eq!(good().answers.len(), 1);
        assert_eq!(dns.counters.get(QueryType::Other, QueryRcode::FormErr), 2);
        assert_eq!(dns.counters.get(QueryType::Txt, QueryRcode::NotImp), 1);
    }

    /// A flood of one question over UDP from one address (as a spoofed-source amplification
    /// would aim it at a victim): 20 full answers, then every second one truncated and the
    /// rest unsent, all counted; TCP still gets the full answer.
    #[test]
    fn identical_udp_answers_are_rate_limited_and_tcp_is_not() {
        let dns = start(view(3));
        let q = query("many.demo.svc.clusterset.local.", RecordType::A, None);
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for _ in 0..100 {
            s.send_to(&q.to_vec().unwrap(), dns.addr).unwrap();
        }
        let (mut full, mut truncated) = (0, 0);
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = s.recv(&mut buf) {
            let reply = Message::from_vec(&buf[..n]).unwrap();
            if reply.metadata.truncation {
                assert!(reply.answers.is_empty());
                truncated += 1;
            } else {
                assert_eq!(reply.answers.len(), 3);
                full += 1;
            }
        }
        assert_eq!((full, truncated), (20, 40));
        assert_eq!(dns.counters.limited(), (40, 40));
        assert_eq!(tcp(dns.addr, &q).answers.len(), 3);
    }
}
