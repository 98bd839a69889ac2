//! End-to-end tests of the clusterset.local DNS responder in the two-cluster lab: meshd in each
//! gateway serves its own exports file (scripts/lab.sh writes one per cluster) and its peer's
//! (synced through the tunnel) on the gateway's pod-side address, and the real `dig` and `curl`
//! ask it from the pods. Both clusters export web and db; M2 alone exports hello.
//! They need root and skip with a message otherwise.

mod support;

use std::time::{Duration, Instant};
use support::*;

/// M2's gateway, pod side: where M2's CoreDNS would forward clusterset.local.
const M2_DNS: &str = "10.245.1.1";
const M1_DNS: &str = "10.244.1.1";

fn dig(lab: &Lab, ns: &str, server: &str, args: &[&str]) -> String {
    let at = format!("@{server}");
    let mut cmd = vec!["dig", &at, "+time=2", "+tries=1"];
    cmd.extend_from_slice(args);
    lab.exec_ok(ns, &cmd)
}

fn short(lab: &Lab, ns: &str, server: &str, name: &str, qtype: &str) -> String {
    dig(lab, ns, server, &[name, qtype, "+short"])
        .trim()
        .to_string()
}

/// Asks until `name` answers `want` (the first catalog sync takes a moment after the lab is up).
fn wait_for_answer(lab: &Lab, ns: &str, server: &str, name: &str, want: &str) -> Duration {
    let start = Instant::now();
    loop {
        let got = short(lab, ns, server, name, "A");
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{name} from {server} answers {got:?}, not {want:?}; logs:\n{}\n{}",
            lab.log(1),
            lab.log(2)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `curl http://NAME/` from m1pod, whose resolver is M1's meshd; the page, trimmed.
fn fetch_from_m1(lab: &Lab, name: &str) -> String {
    let url = format!("http://{name}/");
    lab.exec_ok("m1pod", &["curl", "-sS", "--max-time", "5", &url])
        .trim()
        .to_string()
}

/// The proof: M2 exports hello, backed by a real HTTP server in m2pod. From m1pod, M1's
/// responder answers its address and curl (resolving through M1's meshd) fetches the page
/// through the tunnel. M2's gateway dies: within 10 s M1 stops answering the name (its services
/// are withdrawn, NODATA so no denial is cached). M2 comes back: so does the name.
#[test]
fn services_of_the_other_cluster_resolve_and_are_withdrawn_while_it_is_down() {
    if !root_or_skip("services_of_the_other_cluster_resolve_and_are_withdrawn_while_it_is_down") {
        return;
    }
    let lab = Lab::up("tx", "meshd", "meshd");
    let hello = "hello.demo.svc.clusterset.local";
    wait_for_answer(&lab, "m1pod", M1_DNS, hello, "10.97.0.20");
    assert_eq!(fetch_from_m1(&lab, hello), "hello from m2");
    // Both sides keep a catalog of the other: M2's responder knows M1's web too.
    assert_eq!(
        short(
            &lab,
            "m2pod",
            M2_DNS,
            "db-0.m1.db.demo.svc.clusterset.local",
            "A"
        ),
        "10.244.1.10"
    );

    let body = lab.http_get("m1gw", "127.0.0.1:9090", "/metrics");
    assert_eq!(
        metric(&body, "meshd_exported_services"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "meshd_imported_services{peer=\"m2\"}"),
        Some(3.0),
        "{body}"
    );
    assert!(
        metric(&body, "meshd_peer_rtt_seconds_count{peer=\"m2\"}").is_some_and(|n| n >= 1.0),
        "{body}"
    );

    lab.kill_meshd(2);
    let start = Instant::now();
    let gone = loop {
        let out = dig(&lab, "m1pod", M1_DNS, &[hello, "A"]);
        if out.contains("ANSWER: 0") {
            break out;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "M1 still answers {hello} {:?} after M2 died:\n{out}\n{}",
            start.elapsed(),
            lab.log(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("withdrawn {:?} after M2's meshd died", start.elapsed());
    assert!(
        gone.contains("status: NOERROR") || gone.contains("status: NXDOMAIN"),
        "{gone}"
    );
    // M1's own services still answer.
    assert_eq!(
        short(&lab, "m1pod", M1_DNS, "web.demo.svc.clusterset.local", "A"),
        "10.96.0.10"
    );

    let mut m2 = lab.start_meshd(2, |config| config);
    let back = wait_for_answer(&lab, "m1pod", M1_DNS, hello, "10.97.0.20");
    eprintln!("restored {back:?} after M2's meshd restarted");
    assert_eq!(fetch_from_m1(&lab, hello), "hello from m2");
    let _ = m2.kill();
    let _ = m2.wait();
}

#[test]
fn meshd_answers_clusterset_local_for_its_exports() {
    if !root_or_skip("meshd_answers_clusterset_local_for_its_exports") {
        return;
    }
    let lab = Lab::up("td", "meshd", "meshd");
    let web = "web.demo.svc.clusterset.local";
    wait_for_answer(&lab, "m2pod", M2_DNS, web, "10.97.0.10\n10.96.0.10");

    // ClusterSetIP, from a pod of the same cluster, over UDP and TCP: the local cluster first.
    assert_eq!(
        short(&lab, "m2pod", M2_DNS, web, "A"),
        "10.97.0.10\n10.96.0.10"
    );
    assert_eq!(
        dig(&lab, "m2pod", M2_DNS, &[web, "A", "+tcp", "+short"]).trim(),
        "10.97.0.10\n10.96.0.10"
    );
    // The same through the tunnel, from the other cluster's pod.
    assert_eq!(
        short(&lab, "m1pod", M2_DNS, web, "A"),
        "10.97.0.10\n10.96.0.10"
    );
    // <cluster>.<svc>.<ns>.svc is no name (the MCS DNS specification); the bare name's SRV.
    for cluster in ["m1", "m2", "m3"] {
        let full = dig(&lab, "m2pod", M2_DNS, &[&format!("{cluster}.{web}"), "A"]);
        assert!(full.contains("status: NXDOMAIN"), "{full}");
    }
    assert_eq!(
        short(&lab, "m2pod", M2_DNS, web, "SRV"),
        "0 100 80 web.demo.svc.clusterset.local."
    );

    // Headless: the ready endpoints of every cluster, and one endpoint by hostname.
    assert_eq!(
        short(&lab, "m1pod", M1_DNS, "db.demo.svc.clusterset.local", "A"),
        format!("{M1_POD}\n{M2_POD}")
    );
    assert_eq!(
        short(
            &lab,
            "m1pod",
            M1_DNS,
            "db-0.m1.db.demo.svc.clusterset.local",
            "A"
        ),
        M1_POD
    );

    // SRV for named ports.
    assert_eq!(
        short(&lab, "m2pod", M2_DNS, &format!("_http._tcp.{web}"), "SRV"),
        "0 100 80 web.demo.svc.clusterset.local."
    );
    assert_eq!(
        short(
            &lab,
            "m1pod",
            M1_DNS,
            "_pg._tcp.db.demo.svc.clusterset.local",
            "SRV"
        ),
        "0 50 5432 db-0.m1.db.demo.svc.clusterset.local.\n0 50 5432 db-0.m2.db.demo.svc.clusterset.local."
    );

    // The version TXT record.
    assert_eq!(
        short(&lab, "m2pod", M2_DNS, "dns-version.clusterset.local", "TXT"),
        "\"1.0.0\""
    );

    // Negative answers: NXDOMAIN with SOA, NODATA with SOA, REFUSED outside the zone.
    let nx = dig(
        &lab,
        "m2pod",
        M2_DNS,
        &["nope.demo.svc.clusterset.local", "A"],
    );
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(nx.contains("flags: qr aa"), "{nx}");
    assert!(nx.contains("AUTHORITY: 1"), "{nx}");
    assert!(nx.contains("IN\tSOA\tns.clusterset.local."), "{nx}");
    let nodata = dig(&lab, "m2pod", M2_DNS, &[web, "TXT"]);
    assert!(nodata.contains("status: NOERROR"), "{nodata}");
    assert!(nodata.contains("ANSWER: 0, AUTHORITY: 1"), "{nodata}");
    let refused = dig(&lab, "m2pod", M2_DNS, &["example.com", "A"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    assert!(refused.contains("ANSWER: 0"), "{refused}");

    // Every query is counted.
    let body = lab.http_get("m2gw", "127.0.0.1:9090", "/metrics");
    let answered = metric(
        &body,
        "meshd_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}",
    )
    .unwrap_or(0.0);
    assert!(answered >= 4.0, "A/NOERROR counted {answered}:\n{body}");
    let refused = metric(
        &body,
        "meshd_dns_queries_total{qtype=\"A\",rcode=\"REFUSED\"}",
    )
    .unwrap_or(0.0);
    assert_eq!(refused, 1.0, "{body}");
}

#[test]
fn exports_are_reread_on_sighup_and_a_bad_file_keeps_the_running_catalog() {
    if !root_or_skip("exports_are_reread_on_sighup_and_a_bad_file_keeps_the_running_catalog") {
        return;
    }
    let lab = Lab::up("tr", "meshd", "meshd");
    let exports = lab.state.join("m2.exports.toml");
    let api = "api.demo.svc.clusterset.local";
    assert!(dig(&lab, "m2pod", M2_DNS, &[api, "A"]).contains("status: NXDOMAIN"));

    let mut text = std::fs::read_to_string(&exports).unwrap();
    text.push_str(
        "\n[[services]]\nnamespace = \"demo\"\nname = \"api\"\nips = [\"10.97.0.30\"]\nendpoints = [{ ip = \"10.245.1.10\" }]\n",
    );
    std::fs::write(&exports, &text).unwrap();
    let hup = || {
        // SAFETY: kill(2) with a pid read from the lab's own pid file.
        assert_eq!(unsafe { libc::kill(lab.pid(2), libc::SIGHUP) }, 0);
    };
    hup();
    let start = Instant::now();
    while short(&lab, "m2pod", M2_DNS, api, "A") != "10.97.0.30" {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "api never appeared after SIGHUP; log:\n{}",
            lab.log(2)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The new generation reaches M1 through its held catalog request.
    wait_for_answer(&lab, "m1pod", M1_DNS, api, "10.97.0.30");

    // A refused file on reload: logged, and DNS keeps answering from the running catalog.
    std::fs::write(&exports, text.replace("10.97.0.30", "10.97.0.300")).unwrap();
    hup();
    let start = Instant::now();
    while !lab.log(2).contains("exports file refused") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no refusal logged:\n{}",
            lab.log(2)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        lab.log(2).contains("services[3] (demo/api).ips[0]"),
        "{}",
        lab.log(2)
    );
    assert_eq!(short(&lab, "m2pod", M2_DNS, api, "A"), "10.97.0.30");
}
