//! The masquerade bypass: traffic between this cluster's CIDRs and the remote clusters' keeps
//! its source address, whatever the CNI's masquerade rules say.
//!
//! kindnet, flannel and Calico masquerade pod traffic that leaves the pod CIDR, in iptables
//! (legacy or nft backend) or in nftables chains of their own. The kernel binds a connection's
//! source NAT once, in the first NAT chain of the postrouting hook that chooses one, and skips
//! the later chains; an `accept` binds nothing, so it cannot stop a later chain. meshd's own
//! table, `inet meshd`, therefore has a NAT chain at priority `srcnat - 50` (before iptables'
//! `nat` table at `srcnat` and any CNI chain near it) that maps cross-cluster traffic to its own
//! source (`snat ip to ip saddr`): NAT is bound, the address is unchanged, and no later
//! masquerade rule runs. One mechanism for every backend, written with the `nft` tool (the
//! system's own, so no netlink encoding of our own to get wrong); see docs/architecture.md.

use ipnet::IpNet;
use std::io::Write;
use std::process::{Command, Stdio};

/// The table's family and name: `nft list table inet meshd` shows it.
pub const TABLE: &str = "inet meshd";

/// What went wrong writing or reading the table, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BypassError {
    #[error("cannot run nft (the nftables tool) for the masquerade bypass: {0}; install nftables on this node, or set masquerade_bypass = false if its CNI does not masquerade traffic to other clusters")]
    NoTool(String),
    #[error("nft refused the masquerade bypass (table {TABLE}) while {action}: {message}; the kernel needs nf_tables with NAT (modules nf_tables, nft_nat, nft_chain_nat)")]
    Refused {
        action: &'static str,
        message: String,
    },
}

/// The bypass table, as meshd wrote it.
pub struct Bypass {
    local: Vec<IpNet>,
    remote: Vec<IpNet>,
    /// `nft list table` right after meshd wrote it: what a check compares with.
    written: Option<String>,
    restored: u64,
}

fn elements(nets: &[IpNet], v6: bool) -> String {
    let list: Vec<String> = nets
        .iter()
        .filter(|n| n.addr().is_ipv6() == v6)
        .map(|n| n.to_string())
        .collect();
    if list.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", list.join(", "))
    }
}

/// The nft script that replaces the table atomically (one transaction: create, delete, create).
pub fn script(local: &[IpNet], remote: &[IpNet]) -> String {
    let mut s = format!("table {TABLE} {{}}\ndelete table {TABLE}\ntable {TABLE} {{\n");
    for (name, nets, v6) in [
        ("local4", local, false),
        ("remote4", remote, false),
        ("local6", local, true),
        ("remote6", remote, true),
    ] {
        let kind = if v6 { "ipv6_addr" } else { "ipv4_addr" };
        s.push_str(&format!(
            "  set {name} {{ type {kind}; flags interval; auto-merge;{} }}\n",
            elements(nets, v6)
        ));
    }
    s.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat - 50; policy accept;\n",
    );
    for (family, v) in [("ip", "4"), ("ip6", "6")] {
        for (from, to) in [("local", "remote"), ("remote", "local")] {
            s.push_str(&format!(
                "    {family} saddr @{from}{v} {family} daddr @{to}{v} snat {family} to {family} saddr\n"
            ));
        }
    }
    s.push_str("  }\n}\n");
    s
}

fn nft(args: &[&str], input: Option<&str>, action: &'static str) -> Result<String, BypassError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BypassError::NoTool(e.to_string()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| BypassError::NoTool(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| BypassError::NoTool(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BypassError::Refused {
            action,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The table as the kernel has it now (`nft list table inet meshd`); `None` when there is none.
pub fn current() -> Result<Option<String>, BypassError> {
    match nft(&["list", "table", "inet", "meshd"], None, "reading it") {
        Ok(text) => Ok(Some(text)),
        Err(BypassError::Refused { message, .. }) if message.contains("No such file") => Ok(None),
        Err(e) => Err(e),
    }
}

impl Bypass {
    /// A bypass for traffic between `local` and `remote` prefixes (nothing written yet).
    pub fn new(local: Vec<IpNet>, remote: Vec<IpNet>) -> Self {
        Bypass {
            local,
            remote,
            written: None,
            restored: 0,
        }
    }

    /// How often [`Bypass::check`] found the table changed or gone and wrote it again.
    pub fn restored(&self) -> u64 {
        self.restored
    }

    /// Writes the table (replacing any left by an earlier meshd).
    pub fn apply(&mut self) -> Result<(), BypassError> {
        nft(
            &["-f", "-"],
            Some(&script(&self.local, &self.remote)),
            "writing it",
        )?;
        self.written = Some(current()?.unwrap_or_default());
        Ok(())
    }

    /// New prefixes (a reloaded configuration): written when they differ.
    pub fn set_prefixes(
        &mut self,
        local: Vec<IpNet>,
        remote: Vec<IpNet>,
    ) -> Result<(), BypassError> {
        if local == self.local && remote == self.remote && self.written.is_some() {
            return Ok(());
        }
        self.local = local;
        self.remote = remote;
        self.apply()
    }

    /// Compares the table with what meshd wrote; writes it again when it changed or is gone.
    /// Returns whether it had to.
    pub fn check(&mut self) -> Result<bool, BypassError> {
        let now = current()?;
        if now.is_some() && now == self.written {
            return Ok(false);
        }
        self.apply()?;
        self.restored += 1;
        Ok(true)
    }

    /// Deletes the table (meshd exiting, or starting and clearing what a killed meshd left).
    pub fn remove() -> Result<(), BypassError> {
        match nft(&["delete", "table", "inet", "meshd"], None, "deleting it") {
            Err(BypassError::Refused { message, .. }) if message.contains("No such file") => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_replaces_the_table_with_both_directions_and_families() {
        let local = vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/64".parse().unwrap(),
        ];
        let remote = vec![
            "10.245.0.0/16".parse().unwrap(),
            "10.97.0.0/16".parse().unwrap(),
        ];
        let s = script(&local, &remote);
        assert!(
            s.starts_with("table inet meshd {}\ndelete table inet meshd\ntable inet meshd {\n"),
            "{s}"
        );
        assert!(s.contains("set local4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.244.0.0/16 }; }"), "{s}");
        assert!(s.contains("set remote4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.245.0.0/16, 10.97.0.0/16 }; }"), "{s}");
        assert!(s.contains("set local6 { type ipv6_addr; flags interval; auto-merge; elements = { fd00:244::/64 }; }"), "{s}");
        assert!(
            s.contains("set remote6 { type ipv6_addr; flags interval; auto-merge; }"),
            "{s}"
        );
        assert!(
            s.contains("type nat hook postrouting priority srcnat - 50; policy accept;"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr @local4 ip daddr @remote4 snat ip to ip saddr\n"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr @remote4 ip daddr @local4 snat ip to ip saddr\n"),
            "{s}"
        );
        assert!(
            s.contains("ip6 saddr @local6 ip6 daddr @remote6 snat ip6 to ip6 saddr\n"),
            "{s}"
        );
        assert!(
            s.contains("ip6 saddr @remote6 ip6 daddr @local6 snat ip6 to ip6 saddr\n"),
            "{s}"
        );
    }

    #[test]
    fn a_missing_tool_says_what_to_install_or_set() {
        let e = BypassError::NoTool("No such file or directory (os error 2)".into()).to_string();
        assert!(e.contains("install nftables"), "{e}");
        assert!(e.contains("masquerade_bypass = false"), "{e}");
    }
}
