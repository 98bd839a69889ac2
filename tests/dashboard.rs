//! The Grafana dashboard (deploy/grafana/meshd-dashboard.json) against docs/metrics.md, and
//! docs/metrics.md against the metric families the code registers, so that a panel cannot query a
//! metric meshd does not serve.
//!
//! The dashboard checks: valid JSON with panels; every panel titled, with a unique id and a place
//! on the grid; every data panel, query and query variable on the `${DS_PROMETHEUS}` data source
//! variable; every PromQL expression (and every `label_values` variable query) names only series
//! of metric families listed in docs/metrics.md, with only their documented labels (plus the
//! labels Prometheus adds, [`SCRAPE_LABELS`]); legends name only those labels; every `$variable`
//! is defined. [`checks_catch_broken_dashboards`] proves each check bites.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Labels meshd does not emit that the dashboard may filter and group by: Prometheus's target
/// labels (`instance`, `job`) and `cluster`, set by the scrape configuration or seen as an
/// external label through a global view (docs/metrics.md, "Grafana").
const SCRAPE_LABELS: [&str; 3] = ["instance", "job", "cluster"];

/// Grafana's built-in variables the queries may use.
const BUILTIN_VARIABLES: [&str; 6] = [
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];

/// The data source variable every panel and query uses.
const DATASOURCE_VARIABLE: &str = "DS_PROMETHEUS";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug)]
struct Family {
    kind: Kind,
    labels: BTreeSet<String>,
}

/// The backticked words of a markdown table cell.
fn backticked(cell: &str) -> Vec<(String, String)> {
    // (text before the word since the previous one, word)
    let mut words = Vec::new();
    let mut rest = cell;
    let mut gap = String::new();
    while let Some(open) = rest.find('`') {
        gap.push_str(&rest[..open]);
        let Some(len) = rest[open + 1..].find('`') else {
            break;
        };
        words.push((
            std::mem::take(&mut gap),
            rest[open + 1..open + 1 + len].to_string(),
        ));
        rest = &rest[open + 1 + len + 1..];
    }
    words
}

/// The label names in a labels cell of docs/metrics.md: backticked words, where text in
/// parentheses explains (and is skipped) and the words after a `:` are the label's values, e.g.
/// "`peer`, `reason`: `a`, `b`" or "`qtype` (`A`, `AAAA`), `rcode` (...)".
fn documented_labels(cell: &str) -> BTreeSet<String> {
    let mut outside = String::new();
    let mut depth = 0usize;
    for c in cell.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => outside.push(c),
            _ => {}
        }
    }
    let mut labels = BTreeSet::new();
    let mut is_label = true;
    for (gap, word) in backticked(&outside) {
        if gap.contains(':') {
            is_label = false;
        }
        if is_label {
            labels.insert(word);
        }
    }
    labels
}

/// The metric families in the table of docs/metrics.md, by the name they are exposed under.
fn documented_families(doc: &str) -> BTreeMap<String, Family> {
    let mut families = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| `name` | type | labels | meaning |" splits into ["", name, type, labels, meaning, ""].
        if cells.len() < 5 || !cells[1].starts_with("`meshd_") {
            continue;
        }
        let name = cells[1].trim_matches('`').to_string();
        let kind = match cells[2] {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            other => panic!(
                "docs/metrics.md: {name} has type {other:?}; expected counter, gauge or histogram"
            ),
        };
        if kind == Kind::Counter {
            assert!(
                name.ends_with("_total"),
                "docs/metrics.md: counter {name} must be listed as exposed, with its _total suffix"
            );
        }
        let labels = documented_labels(cells[3]);
        assert!(
            families
                .insert(name.clone(), Family { kind, labels })
                .is_none(),
            "docs/metrics.md lists {name} twice"
        );
    }
    assert!(
        families.len() >= 5,
        "docs/metrics.md: found only {} metric rows (`| `meshd_...` | type | labels | meaning |`); did the table's format change?",
        families.len()
    );
    families
}

/// Series names a query may use, each with its family's name.
fn series_names(families: &BTreeMap<String, Family>) -> BTreeMap<String, String> {
    let mut series = BTreeMap::new();
    for (name, family) in families {
        match family.kind {
            Kind::Counter | Kind::Gauge => {
                series.insert(name.clone(), name.clone());
            }
            Kind::Histogram => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    series.insert(format!("{name}{suffix}"), name.clone());
                }
            }
        }
    }
    series
}

/// What one PromQL expression uses.
#[derive(Debug, Default)]
struct Usage {
    /// Metric names, each with the label names of its selector's matchers.
    selectors: Vec<(String, Vec<String>)>,
    /// Label names in by/without/on/ignoring/group_left/group_right lists.
    grouping: Vec<String>,
    /// `$var` / `${var}` references.
    variables: Vec<String>,
}

/// The Grafana variables of `expr` (`$name`, `${name}`, `${name:format}`), and the expression
/// with each replaced by what PromQL accepts in its place: a duration inside `[...]`, a plain
/// word elsewhere (the dashboard uses them inside matcher strings).
fn substitute_variables(expr: &str) -> (Vec<String>, String) {
    let mut variables = Vec::new();
    let mut out = String::with_capacity(expr.len());
    let mut in_range = false;
    let mut rest = expr;
    while let Some(c) = rest.chars().next() {
        if c == '$' {
            let (name, len) = match rest[1..].strip_prefix('{') {
                Some(braced) => {
                    let end = braced.find('}').unwrap_or(braced.len());
                    let inner = &braced[..end];
                    (inner.split(':').next().unwrap_or("").to_string(), end + 3)
                }
                None => {
                    let end = rest[1..]
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len() - 1);
                    (rest[1..1 + end].to_string(), end + 1)
                }
            };
            variables.push(name);
            out.push_str(if in_range { "5m" } else { "x" });
            rest = &rest[len.min(rest.len())..];
            continue;
        }
        match c {
            '[' => in_range = true,
            ']' => in_range = false,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    (variables, out)
}

/// What `expr` uses, read from its syntax tree (promql-parser) after its Grafana variables are
/// set aside: syntax errors are reported, as Prometheus would.
fn scan(expr: &str) -> Result<Usage, String> {
    use promql_parser::parser::{self, Expr, LabelModifier};
    let (variables, promql) = substitute_variables(expr);
    let tree = parser::parse(&promql).map_err(|e| format!("{expr:?} is not valid PromQL: {e}"))?;
    let mut usage = Usage {
        variables,
        ..Usage::default()
    };
    let mut stack = vec![&tree];
    let modifier_labels = |m: &LabelModifier| m.labels().labels.clone();
    while let Some(node) = stack.pop() {
        match node {
            Expr::VectorSelector(vs) | Expr::MatrixSelector(parser::MatrixSelector { vs, .. }) => {
                let name = vs.name.clone().ok_or_else(|| {
                    format!("a selector without a metric name in {expr:?}; name the meshd_ metric")
                })?;
                let labels = vs
                    .matchers
                    .matchers
                    .iter()
                    .chain(vs.matchers.or_matchers.iter().flatten())
                    .map(|m| m.name.clone())
                    .filter(|l| l != "__name__")
                    .collect();
                usage.selectors.push((name, labels));
            }
            Expr::Aggregate(agg) => {
                usage.grouping.extend(
                    agg.modifier
                        .as_ref()
                        .map(modifier_labels)
                        .unwrap_or_default(),
                );
                stack.push(&agg.expr);
                stack.extend(agg.param.as_deref());
            }
            Expr::Binary(bin) => {
                if let Some(m) = &bin.modifier {
                    usage
                        .grouping
                        .extend(m.matching.as_ref().map(modifier_labels).unwrap_or_default());
                    usage.grouping.extend(
                        m.card
                            .labels()
                            .map(|l| l.labels.clone())
                            .unwrap_or_default(),
                    );
                }
                stack.push(&bin.lhs);
                stack.push(&bin.rhs);
            }
            Expr::Paren(p) => stack.push(&p.expr),
            Expr::Unary(u) => stack.push(&u.expr),
            Expr::Subquery(sq) => stack.push(&sq.expr),
            Expr::Call(call) => stack.extend(call.args.args.iter().map(|a| &**a)),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }
    Ok(usage)
}

/// What a dashboard queries, checked against the documented families: one line per problem.
struct Checker<'a> {
    families: &'a BTreeMap<String, Family>,
    series: BTreeMap<String, String>,
    variables: BTreeSet<String>,
    problems: Vec<String>,
}

impl Checker<'_> {
    /// Labels a series may carry: its family's documented labels, the scrape labels, and `le` on
    /// a histogram's buckets.
    fn labels_of(&self, series: &str) -> BTreeSet<String> {
        let mut labels: BTreeSet<String> = SCRAPE_LABELS.iter().map(|l| l.to_string()).collect();
        if let Some(family) = self.series.get(series).and_then(|f| self.families.get(f)) {
            labels.extend(family.labels.iter().cloned());
            if family.kind == Kind::Histogram && series.ends_with("_bucket") {
                labels.insert("le".into());
            }
        }
        labels
    }

    /// Checks one expression; returns the labels its series may carry (for its legend), or
    /// `None` when it names a metric it should not (reported; the labels are then unknown).
    fn expr(&mut self, at: &str, expr: &str) -> Option<BTreeSet<String>> {
        let usage = match scan(expr) {
            Ok(usage) => usage,
            Err(e) => {
                self.problems.push(format!("{at}: {e}"));
                return None;
            }
        };
        let reported = self.problems.len();
        let mut available = BTreeSet::new();
        if usage.selectors.is_empty() {
            self.problems
                .push(format!("{at}: the query {expr:?} names no meshd_ metric"));
        }
        for (name, labels) in &usage.selectors {
            if !name.starts_with("meshd_") {
                self.problems.push(format!(
                    "{at}: {name} is not a meshd metric; the dashboard shows meshd's metrics only (docs/metrics.md)"
                ));
                continue;
            }
            let Some(family) = self.series.get(name) else {
                self.problems.push(format!(
                    "{at}: {name} is not a series of any metric family listed in docs/metrics.md (a typo, or a histogram without _bucket/_sum/_count?)"
                ));
                continue;
            };
            let allowed = self.labels_of(name);
            for label in labels {
                if !allowed.contains(label) {
                    self.problems.push(format!(
                        "{at}: {name} has no label {label:?}; docs/metrics.md gives {family} the labels {:?} (plus {SCRAPE_LABELS:?})",
                        self.families[family].labels
                    ));
                }
            }
            available.extend(allowed);
        }
        for var in &usage.variables {
            if !self.variables.contains(var) && !BUILTIN_VARIABLES.contains(&var.as_str()) {
                self.problems.push(format!(
                    "{at}: ${var} is not a dashboard variable (templating.list) nor one of Grafana's"
                ));
            }
        }
        if self.problems.len() > reported {
            return None;
        }
        for label in &usage.grouping {
            if !available.contains(label) {
                self.problems.push(format!(
                    "{at}: groups by {label:?}, which none of the query's metrics carries"
                ));
            }
        }
        Some(available)
    }

    fn datasource(&mut self, at: &str, value: Option<&Value>) {
        let uid = format!("${{{DATASOURCE_VARIABLE}}}");
        let ok = value.is_some_and(|ds| {
            ds["type"] == "prometheus" && ds["uid"].as_str() == Some(uid.as_str())
        });
        if !ok {
            self.problems.push(format!(
                "{at}: datasource must be {{\"type\": \"prometheus\", \"uid\": \"{uid}\"}}, found {value:?}"
            ));
        }
    }

    fn panel(&mut self, panel: &Value, ids: &mut BTreeSet<u64>) {
        let title = panel["title"].as_str().unwrap_or("").trim().to_string();
        let at = format!("panel {:?} (id {})", title, panel["id"]);
        if title.is_empty() {
            self.problems.push(format!("{at}: no title"));
        }
        match panel["id"].as_u64() {
            Some(id) if !ids.insert(id) => self.problems.push(format!("{at}: id used twice")),
            Some(_) => {}
            None => self.problems.push(format!("{at}: no numeric id")),
        }
        let grid = &panel["gridPos"];
        match (grid["x"].as_u64(), grid["w"].as_u64(), grid["h"].as_u64()) {
            (Some(x), Some(w), Some(h)) if w > 0 && h > 0 && x + w <= 24 => {}
            _ => self.problems.push(format!(
                "{at}: gridPos {grid} is not on Grafana's 24-column grid"
            )),
        }
        if panel["type"] == "row" {
            for child in panel["panels"].as_array().into_iter().flatten() {
                self.panel(child, ids);
            }
            return;
        }
        self.datasource(&at, panel.get("datasource"));
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            self.problems.push(format!("{at}: no query (targets)"));
        }
        let mut ref_ids = BTreeSet::new();
        for target in &targets {
            let ref_id = target["refId"].as_str().unwrap_or("");
            let at = format!("{at} query {ref_id:?}");
            if ref_id.is_empty() || !ref_ids.insert(ref_id.to_string()) {
                self.problems
                    .push(format!("{at}: refId missing or used twice in the panel"));
            }
            self.datasource(&at, target.get("datasource"));
            let Some(expr) = target["expr"].as_str().filter(|e| !e.trim().is_empty()) else {
                self.problems.push(format!("{at}: no PromQL expr"));
                continue;
            };
            let Some(available) = self.expr(&at, expr) else {
                continue;
            };
            let legend = target["legendFormat"].as_str().unwrap_or("");
            for part in legend.split("{{").skip(1) {
                let label = part.split("}}").next().unwrap_or("").trim();
                if !available.contains(label) {
                    self.problems.push(format!(
                        "{at}: legend {legend:?} names {label:?}, which the query's metrics do not carry"
                    ));
                }
            }
        }
    }
}

/// Every problem with `dashboard`, checked against `families`; empty when it is fine.
fn problems(dashboard: &Value, families: &BTreeMap<String, Family>) -> Vec<String> {
    let templating: Vec<Value> = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut checker = Checker {
        families,
        series: series_names(families),
        variables: templating
            .iter()
            .filter_map(|v| v["name"].as_str().map(String::from))
            .collect(),
        problems: Vec::new(),
    };
    for key in ["title", "uid"] {
        if dashboard[key].as_str().is_none_or(str::is_empty) {
            checker.problems.push(format!("dashboard: no {key}"));
        }
    }
    if dashboard["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
        checker.problems.push(format!(
            "dashboard: schemaVersion {} (want 36 or later: datasources referenced by uid)",
            dashboard["schemaVersion"]
        ));
    }
    let datasource_variable = templating.iter().any(|v| {
        v["name"] == DATASOURCE_VARIABLE && v["type"] == "datasource" && v["query"] == "prometheus"
    });
    if !datasource_variable {
        checker.problems.push(format!(
            "dashboard: no templating variable {DATASOURCE_VARIABLE} of type datasource for prometheus"
        ));
    }
    for var in templating.iter().filter(|v| v["type"] == "query") {
        let at = format!("variable {}", var["name"]);
        checker.datasource(&at, var.get("datasource"));
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or("");
        if let Some(definition) = var["definition"].as_str() {
            if definition != query {
                checker.problems.push(format!(
                    "{at}: definition {definition:?} differs from the query {query:?} Grafana runs"
                ));
            }
        }
        // label_values(SELECTOR, LABEL)
        let args = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','));
        let Some((selector, label)) = args else {
            checker.problems.push(format!(
                "{at}: query {query:?} is not label_values(SELECTOR, LABEL)"
            ));
            continue;
        };
        let label = label.trim();
        let Some(available) = checker.expr(&at, selector) else {
            continue;
        };
        if !available.contains(label) {
            checker.problems.push(format!(
                "{at}: lists values of {label:?}, which {selector} does not carry"
            ));
        }
    }
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    if panels.iter().all(|p| p["type"] == "row") {
        checker.problems.push("dashboard: no panels".into());
    }
    let mut ids = BTreeSet::new();
    for panel in &panels {
        checker.panel(panel, &mut ids);
    }
    checker.problems
}

fn dashboard_text() -> String {
    read(&root().join("deploy/grafana/meshd-dashboard.json"))
}

fn families() -> BTreeMap<String, Family> {
    documented_families(&read(&root().join("docs/metrics.md")))
}

#[test]
fn dashboard_queries_only_documented_metrics() {
    let text = dashboard_text();
    let dashboard: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("deploy/grafana/meshd-dashboard.json is not valid JSON: {e}"));
    let families = families();
    let problems = problems(&dashboard, &families);
    assert!(
        problems.is_empty(),
        "deploy/grafana/meshd-dashboard.json:\n  {}",
        problems.join("\n  ")
    );
    // The panels the dashboard is for: peer state, traffic, RTT, handshakes, drops, DNS, sync
    // errors and build info each have a query.
    let exprs: Vec<String> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("\"expr\""))
        .map(String::from)
        .collect();
    for family in [
        "meshd_peer_up",
        "meshd_peer_rx_bytes_total",
        "meshd_peer_tx_bytes_total",
        "meshd_peer_rx_packets_total",
        "meshd_peer_tx_packets_total",
        "meshd_peer_rtt_seconds_bucket",
        "meshd_peer_last_handshake_timestamp_seconds",
        "meshd_dropped_packets_total",
        "meshd_dns_queries_total",
        "meshd_catalog_sync_errors_total",
        "meshd_build_info",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(family)),
            "no panel queries {family}"
        );
    }
}

/// Each check fails a dashboard broken in its way: the test above can fail.
#[test]
fn checks_catch_broken_dashboards() {
    let text = dashboard_text();
    let families = families();
    let cases = [
        // (replace every, with, a problem that must then be reported)
        (
            "rate(meshd_peer_rx_bytes_total{",
            "rate(meshd_peer_rx_byte_total{",
            "meshd_peer_rx_byte_total is not a series",
        ),
        (
            "meshd_peer_rtt_seconds_bucket{",
            "meshd_peer_rtt_seconds{",
            "meshd_peer_rtt_seconds is not a series",
        ),
        (
            "meshd_dns_queries_total{",
            "meshd_dns_queries_total{peer=~\\\"$peer\\\", ",
            "meshd_dns_queries_total has no label \"peer\"",
        ),
        (
            "sum by (qtype, rcode)",
            "sum by (qtype, code)",
            "groups by \"code\"",
        ),
        (
            "{{qtype}} {{rcode}}",
            "{{type}} {{rcode}}",
            "names \"type\"",
        ),
        (
            "sum(meshd_peer_up{",
            "sum(up{job=\\\"meshd\\\"} * meshd_peer_up{",
            "up is not a meshd metric",
        ),
        (
            "[$__rate_interval]",
            "[$__rate_intervals]",
            "$__rate_intervals is not a dashboard variable",
        ),
        (
            "label_values(meshd_peer_up{",
            "label_values(meshd_peer_up_total{",
            "meshd_peer_up_total is not a series",
        ),
        (
            "\"uid\": \"${DS_PROMETHEUS}\"",
            "\"uid\": \"prometheus\"",
            "datasource must be",
        ),
        ("\"title\": \"Peers up\"", "\"title\": \"\"", "no title"),
        (
            "sum by (qtype, rcode) (rate(",
            "sum by (qtype, rcode) (rate((",
            "is not valid PromQL",
        ),
        (
            "count by (version) (meshd_build_info{",
            "count by (version) ({",
            "a selector without a metric name",
        ),
        (
            "count(meshd_peer_up{",
            "count(meshd_peer_up{} * on (peers) group_left (hostname) meshd_build_info{} * meshd_peer_up{",
            "groups by \"peers\"",
        ),
        (
            "label_values(meshd_build_info, cluster)",
            "label_values(meshd_build_info, cluster_name)",
            "lists values of \"cluster_name\"",
        ),
    ];
    for (from, to, expected) in cases {
        assert!(
            text.contains(from),
            "the dashboard no longer contains {from:?}; update this case"
        );
        let broken: Value = serde_json::from_str(&text.replace(from, to))
            .unwrap_or_else(|e| panic!("replacing {from:?} with {to:?} broke the JSON: {e}"));
        let found = problems(&broken, &families);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "replacing {from:?} with {to:?} was not reported as {expected:?}; reported: {found:#?}"
        );
    }
    // And a dashboard without its panels.
    let mut empty: Value = serde_json::from_str(&text).unwrap();
    empty["panels"] = Value::Array(Vec::new());
    assert!(problems(&empty, &families).contains(&"dashboard: no panels".to_string()));
}

/// The doc's label parsing, on the row formats docs/metrics.md uses.
#[test]
fn doc_label_cells_parse() {
    let labels = |cell: &str| documented_labels(cell).into_iter().collect::<Vec<_>>();
    assert_eq!(labels("`reason`: `garbage`, `replay`"), ["reason"]);
    assert_eq!(labels("`peer` (its configured name)"), ["peer"]);
    assert_eq!(
        labels("`peer`, `reason`: `unreachable`, `refused`"),
        ["peer", "reason"]
    );
    assert_eq!(
        labels("`qtype` (`A`, `other`), `rcode` (`NOERROR`, `NXDOMAIN`)"),
        ["qtype", "rcode"]
    );
    assert!(labels("none").is_empty());
}

/// The name literals passed to prometheus-client's register calls under src/: every string
/// literal that is a whole `meshd_*` name.
fn registered_names(dir: &Path, names: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            registered_names(&path, names);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = read(&path);
            for (at, _) in text.match_indices("\"meshd_") {
                let rest = &text[at + 1..];
                let len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                if rest[len..].starts_with('"') {
                    names.insert(rest[..len].to_string());
                }
            }
        }
    }
}

/// docs/metrics.md lists exactly the families the code registers, so the names the dashboard is
/// checked against are served. prometheus-client appends `_total` to counters and the unit
/// (`_seconds`) to families registered with one.
#[test]
fn metrics_doc_lists_the_registered_families() {
    let families = families();
    let mut registered = BTreeSet::new();
    registered_names(&root().join("src"), &mut registered);
    assert!(
        registered.len() >= 5,
        "found only {registered:?} registered under src/"
    );
    let exposed = |name: &str| {
        [
            name.to_string(),
            format!("{name}_total"),
            format!("{name}_seconds"),
        ]
    };
    for name in &registered {
        assert!(
            exposed(name).iter().any(|n| families.contains_key(n)),
            "src/ registers {name}, which docs/metrics.md does not list"
        );
    }
    for name in families.keys() {
        assert!(
            registered
                .iter()
                .any(|r| exposed(r).iter().any(|n| n == name)),
            "docs/metrics.md lists {name}, which nothing under src/ registers"
        );
    }
}
