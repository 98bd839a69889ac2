//! `meshctl diagnose`, `exports` and `resolve` against the two-cluster lab. Each diagnose check
//! gets its fault injected for real (peer down, route deleted, DNS unreachable, underlay MTU
//! lowered) and must fail, then pass again once the fault is removed: a diagnose that says "all
//! green" while traffic is broken is a bug. They need root and skip with a message otherwise.

mod support;

use std::process::Output;
use std::time::{Duration, Instant};
use support::*;

/// `meshctl ARGS --socket <m1's>` run inside M1's gateway (where its DNS and metrics listen).
fn meshctl_in_m1(lab: &Lab, args: &[&str]) -> Output {
    meshctl_in(lab, 1, args)
}

/// `meshctl ARGS --socket <mI's>` run inside gateway `i`.
fn meshctl_in(lab: &Lab, i: u8, args: &[&str]) -> Output {
    let socket = lab.state.join(format!("m{i}.admin.sock"));
    lab.exec(
        &format!("m{i}gw"),
        &[
            env!("CARGO_BIN_EXE_meshctl"),
            args[0],
            "--socket",
            socket.to_str().unwrap(),
        ]
        .into_iter()
        .chain(args[1..].iter().copied())
        .collect::<Vec<_>>(),
    )
}

/// The report line of check `name`.
fn line<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} check in:\n{report}"))
}

/// Runs diagnose until check `name` reads `want` ("ok" or "FAIL"); returns the whole report and
/// the exit code.
fn diagnose_until(lab: &Lab, name: &str, want: &str) -> (String, Option<i32>) {
    let start = Instant::now();
    loop {
        let out = meshctl_in_m1(lab, &["diagnose"]);
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        if line(&report, name).starts_with(want) {
            return (report, out.status.code());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{name} never became {want}:\n{report}\n{}",
            lab.log(1)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn all_pass(lab: &Lab) {
    let start = Instant::now();
    loop {
        let out = meshctl_in_m1(lab, &["diagnose"]);
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.code() == Some(0) {
            assert!(report.ends_with("all checks passed\n"), "{report}");
            assert!(!report.contains("FAIL"), "{report}");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "diagnose never passed:\n{report}\n{}",
            lab.log(1)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn diagnose_fails_on_every_injected_fault_and_passes_after() {
    if !root_or_skip("diagnose_fails_on_every_injected_fault_and_passes_after") {
        return;
    }
    let lab = Lab::up("tg", "meshd", "meshd");
    let iface = lab.iface(1);
    all_pass(&lab);

    // A route deleted behind meshd's back.
    lab.exec_ok(
        "m1gw",
        &["ip", "route", "del", "10.245.0.0/16", "dev", &iface],
    );
    let (report, code) = diagnose_until(&lab, "routes", "FAIL");
    assert_eq!(code, Some(1), "{report}");
    assert!(
        line(&report, "routes").contains("10.245.0.0/16 (peer m2)"),
        "{report}"
    );
    assert!(report.contains("fix: "), "{report}");
    lab.exec_ok(
        "m1gw",
        &["ip", "route", "add", "10.245.0.0/16", "dev", &iface],
    );
    all_pass(&lab);

    // DNS unreachable: the responder's address is gone from the gateway.
    lab.exec_ok(
        "m1gw",
        &["ip", "addr", "del", "10.244.1.1/24", "dev", "pod0"],
    );
    let (report, code) = diagnose_until(&lab, "dns", "FAIL");
    assert_eq!(code, Some(1), "{report}");
    lab.exec_ok(
        "m1gw",
        &["ip", "addr", "add", "10.244.1.1/24", "dev", "pod0"],
    );
    all_pass(&lab);

    // The underlay's MTU lowered below the tunnel's MTU + WireGuard's overhead.
    lab.exec_ok("m1gw", &["ip", "link", "set", "ul0", "mtu", "1400"]);
    let (report, code) = diagnose_until(&lab, "mtu", "FAIL");
    assert_eq!(code, Some(1), "{report}");
    assert!(report.contains("set mtu = 1320"), "{report}");
    lab.exec_ok("m1gw", &["ip", "link", "set", "ul0", "mtu", "1500"]);
    all_pass(&lab);

    // The peer down: no handshake partner, no probe answers, no catalog answers.
    lab.kill_meshd(2);
    let (report, code) = diagnose_until(&lab, "handshakes", "FAIL");
    assert_eq!(code, Some(1), "{report}");
    assert!(
        line(&report, "handshakes").contains("m2 is down"),
        "{report}"
    );
    diagnose_until(&lab, "catalog-sync", "FAIL");
    let mut m2 = lab.start_meshd(2, |config| config);
    all_pass(&lab);
    let _ = m2.kill();
    let _ = m2.wait();
}

#[test]
fn exports_and_resolve_show_and_explain_the_clusterset() {
    if !root_or_skip("exports_and_resolve_show_and_explain_the_clusterset") {
        return;
    }
    let lab = Lab::up("te", "meshd", "meshd");
    let start = Instant::now();
    let table = loop {
        let out = meshctl_in_m1(&lab, &["exports"]);
        assert!(out.status.success(), "{}", text(&out));
        let table = String::from_utf8(out.stdout).unwrap();
        if table.contains("demo/hello") {
            break table;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{table}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(table.starts_with("CLUSTER "), "{table}");
    assert!(table.contains("m1 (local)  up"), "{table}");
    let hello = table.lines().find(|l| l.starts_with("demo/hello")).unwrap();
    assert!(
        hello.contains("ClusterSetIP") && hello.contains(" m2 ") && hello.contains("10.97.0.20"),
        "{table}"
    );
    let web = table.lines().find(|l| l.starts_with("demo/web")).unwrap();
    assert!(web.contains("m1, m2"), "{table}");
    let json = meshctl_in_m1(&lab, &["exports", "--output", "json"]);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed["view"]["clusters"][1]["catalog"]["cluster"], "m2");
    assert_eq!(parsed["sync"][0]["peer"], "m2");

    let out = meshctl_in_m1(&lab, &["resolve", "hello.demo.svc.clusterset.local"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("hello.demo.svc.clusterset.local. 5 A 10.97.0.20"),
        "{said}"
    );
    assert!(
        said.contains("cluster m2: ClusterSetIP 10.97.0.20"),
        "{said}"
    );

    let out = meshctl_in_m1(&lab, &["resolve", "nope.demo.svc.clusterset.local"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("Non-Existent Domain"), "{said}");
    assert!(said.contains("no cluster exports demo/nope"), "{said}");

    let out = meshctl_in_m1(
        &lab,
        &[
            "resolve",
            "web.demo.svc.clusterset.local",
            "--type",
            "BOGUS",
        ],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("--type 'BOGUS'"), "{}", text(&out));

    // No conflicts while both clusters export web alike.
    assert!(web.ends_with("  no"), "{table}");
    // M2 re-exports web on another port: M1's export is as old (both undated) and m1 sorts
    // first, so M1's ports win; both exports are in conflict (as the MCS API asks), as each
    // cluster's meshctl exports says.
    let exports = lab.state.join("m2.exports.toml");
    let before = std::fs::read_to_string(&exports).unwrap();
    let changed = before.replacen("port = 80 }", "port = 8080 }", 1);
    assert_ne!(before, changed);
    std::fs::write(&exports, changed).unwrap();
    // SAFETY: kill(2) with a pid read from the lab's own pid file.
    assert_eq!(unsafe { libc::kill(lab.pid(2), libc::SIGHUP) }, 0);
    let start = Instant::now();
    let table = loop {
        let table = String::from_utf8(meshctl_in(&lab, 2, &["exports"]).stdout).unwrap();
        if table.contains("demo/web: PortConflict: ") {
            break table;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{table}\n{}",
            lab.log(2)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let web = table.lines().find(|l| l.starts_with("demo/web")).unwrap();
    assert!(web.ends_with("yes (PortConflict)"), "{table}");
    assert!(table.contains("cluster m1's export"), "{table}");
    let start = Instant::now();
    loop {
        let table = String::from_utf8(meshctl_in_m1(&lab, &["exports"]).stdout).unwrap();
        let web = table.lines().find(|l| l.starts_with("demo/web")).unwrap();
        if web.ends_with("yes (PortConflict)") {
            assert!(table.contains("this cluster's, the oldest"), "{table}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{table}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // M2 down: resolve says why its service left the answer.
    lab.kill_meshd(2);
    let start = Instant::now();
    loop {
        let out = meshctl_in_m1(&lab, &["resolve", "hello.demo.svc.clusterset.local"]);
        let said = text(&out);
        if said.contains("does not answer the health probe") {
            assert_eq!(out.status.code(), Some(1), "{said}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{said}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let table = String::from_utf8(meshctl_in_m1(&lab, &["exports"]).stdout).unwrap();
    assert!(table.contains("m2 (down)"), "{table}");
}
