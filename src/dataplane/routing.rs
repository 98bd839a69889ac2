//! Cryptokey routing: which peer owns an IP address.
//!
//! Outbound, the destination of a packet read from the TUN device picks the peer (longest prefix
//! wins). Inbound, the source of a decrypted packet must map back to the peer that sent it, or the
//! packet is dropped. The table is immutable once built; the dataplane swaps in a new one when the
//! peer set changes, so lookups take no lock and allocate nothing.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

/// A longest-prefix-match table from IP prefixes to values (peers).
#[derive(Debug, Clone)]
pub struct CryptokeyRouter<T> {
    /// One exact-match map per prefix length, longest first.
    v4: Vec<(u8, HashMap<u32, T>)>,
    v6: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for CryptokeyRouter<T> {
    fn default() -> Self {
        CryptokeyRouter {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask_v4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask_v6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

fn insert_sorted<K: std::hash::Hash + Eq, T>(
    tables: &mut Vec<(u8, HashMap<K, T>)>,
    len: u8,
    key: K,
    value: T,
) {
    let pos = match tables.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(pos) => pos,
        Err(pos) => {
            tables.insert(pos, (len, HashMap::new()));
            pos
        }
    };
    tables[pos].1.insert(key, value);
}

impl<T: Clone> CryptokeyRouter<T> {
    /// Adds a prefix; an existing identical prefix is replaced (the last insert wins, as `wg set`).
    pub fn insert(&mut self, net: IpNet, value: T) {
        match net.trunc() {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                insert_sorted(&mut self.v4, len, u32::from(n.network()), value)
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                insert_sorted(&mut self.v6, len, u128::from(n.network()), value)
            }
        }
    }

    /// The value of the longest prefix holding `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .find_map(|(len, map)| map.get(&mask_v4(a, *len)))
            }
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => self.lookup(IpAddr::V4(v4)),
                None => {
                    let a = u128::from(a);
                    self.v6
                        .iter()
                        .find_map(|(len, map)| map.get(&mask_v6(a, *len)))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &'static str)]) -> CryptokeyRouter<&'static str> {
        let mut t = CryptokeyRouter::default();
        for (net, v) in entries {
            t.insert(net.parse().unwrap(), *v);
        }
        t
    }

    fn at(t: &CryptokeyRouter<&'static str>, ip: &str) -> Option<&'static str> {
        t.lookup(ip.parse().unwrap()).copied()
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[
            ("10.245.0.0/16", "m2"),
            ("10.245.7.0/24", "m3"),
            ("10.245.7.7/32", "m4"),
            ("0.0.0.0/0", "default"),
        ]);
        assert_eq!(at(&t, "10.245.1.10"), Some("m2"));
        assert_eq!(at(&t, "10.245.7.1"), Some("m3"));
        assert_eq!(at(&t, "10.245.7.7"), Some("m4"));
        assert_eq!(at(&t, "192.0.2.1"), Some("default"));
    }

    #[test]
    fn misses_return_none_for_both_families() {
        let t = table(&[("10.245.0.0/16", "m2"), ("fd00:245::/32", "m2v6")]);
        assert_eq!(at(&t, "10.246.0.1"), None);
        assert_eq!(at(&t, "fd00:245::1"), Some("m2v6"));
        assert_eq!(at(&t, "fd00:246::1"), None);
        assert_eq!(at(&t, "::ffff:10.245.0.9"), Some("m2"));
    }

    #[test]
    fn same_prefix_last_insert_wins_and_host_bits_are_ignored() {
        let t = table(&[("10.245.0.0/16", "old"), ("10.245.9.9/16", "new")]);
        assert_eq!(at(&t, "10.245.0.1"), Some("new"));
    }

    #[test]
    fn source_check_distinguishes_peers() {
        let t = table(&[("10.244.0.0/16", "m1"), ("10.245.0.0/16", "m2")]);
        let sender = "m2";
        assert_eq!(at(&t, "10.245.1.10"), Some(sender));
        assert_ne!(at(&t, "10.244.1.10"), Some(sender));
    }

    #[test]
    fn v6_prefix_edges() {
        let t = table(&[("::/0", "all"), ("fd00::1/128", "host")]);
        assert_eq!(at(&t, "fd00::1"), Some("host"));
        assert_eq!(at(&t, "fd00::2"), Some("all"));
    }
}
