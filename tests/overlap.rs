//! Overlapping clusters (`scripts/lab.sh demo --overlap`): M2 is a kind cluster left at its
//! defaults, so both clusters use 10.244.0.0/16 for pods and 10.96.0.0/16 for services, and
//! each has global ranges that meshd translates to and from, statelessly, in the dataplane.
//! The demo itself fails when any of its checks fails; this test also reads what it printed.

mod support;

use meshd::keys::PrivateKey;
use std::time::Duration;
use support::{lab_demo, peers_json, root_or_skip, text, wait_until, Lab};

#[test]
fn pods_of_clusters_with_the_same_ranges_reach_each_other_through_translation() {
    if !root_or_skip("pods_of_clusters_with_the_same_ranges_reach_each_other_through_translation") {
        return;
    }
    // The default topology: three M1 nodes, two M2 nodes behind NAT; from the pod of M1's last
    // node to the pod of M2's last node, through route agents, bypasses and both gateways.
    let out = lab_demo("tO", &["--overlap", "--nodes", "3,2", "--nat"]);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    let expect = [
        // Both ways by global address, the same local address in each cluster.
        "m1n3pod is 10.244.3.10 in M1, 100.81.3.10 to M2; m2n2pod is 10.244.2.10 in M2, 100.82.2.10 to M1",
        "3 packets transmitted, 3 received",
        // DNS hands out M2's global service address, and it serves.
        "hello.demo.svc.clusterset.local. 5 IN\tA\t100.92.0.20",
        "hello from m2n2",
        // M2's pod sees the caller at M1's global address.
        "hello from m1 seen by m2 from 100.81.3.10",
        // IPv6 likewise.
        "bytes from fd00:f2::10",
        // Frag-needed from M2's gateway reaches the caller translated; the next packets fit.
        "From 100.64.0.2 icmp_seq=1 Frag needed and DF set (mtu = 1380)",
        "1360 bytes from 100.82.1.10",
        // traceroute across: M2's gateway, then the pod.
        " 3  100.64.0.2 ",
        " 4  100.82.1.10 ",
        // meshctl exports: M1's own web at its local address, M2's at its global one.
        "10.96.0.10, 100.92.0.10",
        // meshctl peers -o wide shows the mapping and the counts.
        "10.244.0.0/16  100.81.0.0/16",
        "fd00:244::/64  fd00:f1::/64",
        "lab demo passed: pods of two clusters that both use 10.244.0.0/16",
    ];
    for line in expect {
        assert!(report.contains(line), "missing {line:?} in:\n{report}");
    }
    // The bulk transfer arrived byte-exact both ways (the demo compares; the line shows all three).
    let sums = report
        .lines()
        .find(|l| l.starts_with("sent "))
        .expect("bulk transfer line");
    let hashes: Vec<&str> = sums
        .split(|c: char| !c.is_ascii_hexdigit())
        .filter(|w| w.len() == 64)
        .collect();
    assert!(
        hashes.len() == 3 && hashes.iter().all(|h| *h == hashes[0]),
        "{sums}"
    );
    // Translated packets were counted both ways.
    for direction in ["outbound", "inbound"] {
        let line = report
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "meshd_translated_packets_total{{direction=\"{direction}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no {direction} count in:\n{report}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 1000.0, "{line}");
    }
}

/// A SIGHUP that changes global_cidrs keeps the running ranges (the dataplane and the catalogs
/// peers hold must agree, and peers learn new ranges only from a new stanza), says so, and
/// refuses a new peer that overlaps them.
#[test]
fn a_reload_keeps_the_running_global_ranges() {
    if !root_or_skip("a_reload_keeps_the_running_global_ranges") {
        return;
    }
    let lab = Lab::up_with("tQ", "meshd", "meshd", &["--overlap"]);
    assert!(lab.ping("m2pod", "100.81.1.10"));
    let config = lab.state.join("m1.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    assert!(original.contains("=100.81.0.0/16"), "{original}");
    std::fs::write(
        &config,
        original.replace("=100.81.0.0/16", "=100.83.0.0/16"),
    )
    .unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(lab.pid(1), libc::SIGHUP) };
    let warned = wait_until(Duration::from_secs(10), || {
        lab.log(1)
            .contains("global_cidrs changes take effect only after a restart")
    });
    assert!(warned.is_some(), "{}", lab.log(1));
    let globals = &peers_json(&lab, "m1")["translation"]["global_cidrs"];
    assert_eq!(globals[0]["global"], "100.81.0.0/16", "{globals}");
    assert!(
        lab.ping("m2pod", "100.81.1.10"),
        "the running mapping broke"
    );
    assert!(!lab.ping("m2pod", "100.83.1.10"));

    // The new file alone is fine (its own global range is 100.83.0.0/16); against the running
    // ranges, m3 overlaps.
    let extra = PrivateKey::generate().public_key();
    let moved = original.replace("=100.81.0.0/16", "=100.83.0.0/16");
    std::fs::write(
        &config,
        format!("{moved}\n[[peers]]\nname = \"m3\"\npublic_key = \"{extra}\"\nallowed_cidrs = [\"100.81.5.0/24\"]\n"),
    )
    .unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(lab.pid(1), libc::SIGHUP) };
    let refused = wait_until(Duration::from_secs(10), || {
        lab.log(1)
            .contains("CIDR 100.81.0.0/16 overlaps peer 'm3' CIDR 100.81.5.0/24")
    });
    assert!(refused.is_some(), "{}", lab.log(1));
    assert_eq!(lab.wg_dump(1).len(), 2, "the overlapping peer was added");
}
