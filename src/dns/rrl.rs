//! Response-rate limiting for DNS over UDP, as authoritative servers do (BIND's RRL).
//!
//! meshd's responder listens on node addresses. Over UDP the source address is not proven, so a
//! sender can aim the answers at someone else: a flood of identical queries with a victim's
//! address turns the responder into an amplifier. The limiter counts identical answers (same
//! name, same type) per client prefix (/24 for IPv4, /56 for IPv6) and allows a configured number
//! a second ([`crate::defaults::DNS_RATE_LIMIT`]). Past that, every [`SLIP`]th answer goes out truncated (TC set, no records), so that a
//! real client asks again over TCP, and the rest is not sent. TCP is never limited: its source is
//! proven by the handshake. A resolver in front of meshd (the cluster's CoreDNS) caches answers
//! for their TTL and so asks the same question far less often than the limit.

use hickory_proto::rr::{LowerName, RecordType};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Every this many limited answers, one is sent truncated instead of dropped.
pub const SLIP: u32 = 2;
/// Entries tracked at once. A new one beyond it first sweeps out the windows that have ended (at
/// most once a second); while every entry is live, new questions are answered untracked.
const MAX_ENTRIES: usize = 65_536;
/// How long a window counts answers.
const WINDOW: Duration = Duration::from_secs(1);

/// What to do with one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Send it truncated: TC set, no records (the client may ask over TCP).
    Slip,
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    answers: u32,
    limited: u32,
}

/// The limiter's state: answer counts per (client prefix, name, type) in one-second windows.
#[derive(Debug)]
pub struct ResponseRateLimiter {
    per_second: u32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    windows: HashMap<(IpAddr, LowerName, RecordType), Window>,
    /// When ended windows were last swept out of a full table.
    swept: Instant,
}

/// The client's prefix: /24 for IPv4, /56 for IPv6 (one site); IPv4-mapped addresses as IPv4.
fn prefix(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => prefix(IpAddr::V4(v4)),
            None => IpAddr::V6((u128::from(v6) & (u128::MAX << 72)).into()),
        },
    }
}

impl ResponseRateLimiter {
    /// A limiter allowing `per_second` identical answers to a prefix; 0 allows everything.
    pub fn new(per_second: u32) -> Self {
        ResponseRateLimiter {
            per_second,
            state: Mutex::new(State {
                windows: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    /// Decides the answer to `client` about `name`/`qtype` at `now`.
    pub fn check(
        &self,
        client: IpAddr,
        name: &LowerName,
        qtype: RecordType,
        now: Instant,
    ) -> Verdict {
        if self.per_second == 0 {
            return Verdict::Send;
        }
        let mut state = self.state.lock();
        let key = (prefix(client), name.clone(), qtype);
        // A question already tracked is always counted, so a table filled with other questions
        // lets no tracked flood through; only a new one may find the table full.
        if state.windows.len() >= MAX_ENTRIES && !state.windows.contains_key(&key) {
            if now.saturating_duration_since(state.swept) >= WINDOW {
                state.swept = now;
                state
                    .windows
                    .retain(|_, w| now.saturating_duration_since(w.started) < WINDOW);
            }
            if state.windows.len() >= MAX_ENTRIES {
                return Verdict::Send;
            }
        }
        let window = state.windows.entry(key).or_insert(Window {
            started: now,
            answers: 0,
            limited: 0,
        });
        if now.saturating_duration_since(window.started) >= WINDOW {
            *window = Window {
                started: now,
                answers: 0,
                limited: 0,
            };
        }
        window.answers += 1;
        if window.answers <= self.per_second {
            return Verdict::Send;
        }
        window.limited += 1;
        if window.limited.is_multiple_of(SLIP) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;

    fn name(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).unwrap())
    }

    fn verdicts(
        l: &ResponseRateLimiter,
        client: &str,
        q: &str,
        at: Instant,
        n: usize,
    ) -> [usize; 3] {
        let mut counts = [0; 3];
        for _ in 0..n {
            let i = match l.check(client.parse().unwrap(), &name(q), RecordType::A, at) {
                Verdict::Send => 0,
                Verdict::Slip => 1,
                Verdict::Drop => 2,
            };
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn identical_answers_to_one_prefix_are_limited_with_slip() {
        let l = ResponseRateLimiter::new(crate::defaults::DNS_RATE_LIMIT);
        let t0 = Instant::now();
        let web = "web.demo.svc.clusterset.local.";
        let cases = [
            ("192.0.2.7", web, 1000, [20, 490, 490]),
            // Same /24, same question: the same window.
            ("192.0.2.200", web, 10, [0, 5, 5]),
            // Another question, or another prefix: its own.
            ("192.0.2.7", "db.demo.svc.clusterset.local.", 10, [10, 0, 0]),
            ("198.51.100.7", web, 10, [10, 0, 0]),
        ];
        for (client, question, n, want) in cases {
            assert_eq!(
                verdicts(&l, client, question, t0, n),
                want,
                "{client} {question}"
            );
        }
        // A second later, the window starts over.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            verdicts(&l, "192.0.2.7", "web.demo.svc.clusterset.local.", t1, 20),
            [20, 0, 0]
        );
    }

    #[test]
    fn zero_turns_it_off() {
        let l = ResponseRateLimiter::new(0);
        let t0 = Instant::now();
        assert_eq!(verdicts(&l, "192.0.2.7", "web.", t0, 1000), [1000, 0, 0]);
    }

    #[test]
    fn ipv6_clients_share_their_56() {
        let l = ResponseRateLimiter::new(crate::defaults::DNS_RATE_LIMIT);
        let t0 = Instant::now();
        let sent: usize = (0..40)
            .map(|i| verdicts(&l, &format!("2001:db8:0:{i:x}::1"), "web.", t0, 1)[0])
            .sum();
        assert_eq!(sent, 20);
    }

    /// A table filled with distinct questions (a flood of random names) neither lets a tracked
    /// question's flood through nor grows past its bound; a second later the ended windows go.
    #[test]
    fn a_full_table_still_limits_what_it_tracks() {
        let l = ResponseRateLimiter::new(crate::defaults::DNS_RATE_LIMIT);
        let t0 = Instant::now();
        assert_eq!(verdicts(&l, "192.0.2.7", "web.", t0, 20), [20, 0, 0]);
        for i in 0..MAX_ENTRIES {
            let client = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + (i as u32) * 256));
            l.check(client, &name("x."), RecordType::A, t0);
        }
        assert_eq!(l.state.lock().windows.len(), MAX_ENTRIES);
        assert_eq!(verdicts(&l, "192.0.2.7", "web.", t0, 10), [0, 5, 5]);
        let t1 = t0 + WINDOW;
        assert_eq!(verdicts(&l, "198.51.100.7", "web.", t1, 1), [1, 0, 0]);
        assert_eq!(l.state.lock().windows.len(), 1);
    }
}
