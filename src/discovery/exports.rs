//! The static exports file: how the lab and bare hosts export services without a Kubernetes API.
//!
//! Parse, don't validate: the TOML (config field `exports_file`) becomes loose file structs
//! (serde, unknown fields refused), and one step turns them into the same [`ExportCatalog`] the
//! ServiceExport watcher will produce. Every refusal names the file, the service
//! (`services[0] (demo/web)`) and the field, and says what to write instead. meshd reads the file
//! at start and again on SIGHUP; a refused file on reload keeps the running catalog.
//!
//! ```toml
//! [[services]]
//! namespace = "demo"
//! name = "web"
//! type = "ClusterSetIP"          # or "Headless" (no ips); default ClusterSetIP
//! ips = ["10.97.0.10"]
//! ports = [{ name = "http", protocol = "TCP", port = 80 }]
//! endpoints = [{ ip = "10.245.1.10", hostname = "web-0", ready = true }]
//! ```

use super::catalog::{
    is_dns_label, Endpoint, ExportCatalog, ExportedService, PortProtocol, ServicePort, ServiceType,
};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// An exports file that cannot be used: which file, service and field, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ExportsError {
    #[error("cannot read exports file {path}: {source}; check exports_file (or --exports-file)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("exports file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("exports file {path}: {service}.{field}: {problem}")]
    Field {
        path: PathBuf,
        service: String,
        field: String,
        problem: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportsFile {
    /// Kept as tables so that a service's own errors can name it.
    #[serde(default)]
    services: Vec<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    namespace: String,
    name: String,
    #[serde(rename = "type")]
    service_type: Option<String>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    ports: Vec<PortFile>,
    #[serde(default)]
    endpoints: Vec<EndpointFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortFile {
    name: Option<String>,
    protocol: Option<String>,
    port: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    ip: String,
    hostname: Option<String>,
    ready: Option<bool>,
}

/// The local cluster's catalog: the exports file's when there is one, else an empty catalog.
pub fn load(
    path: Option<&Path>,
    cluster: &str,
    generation: u64,
) -> Result<ExportCatalog, ExportsError> {
    match path {
        Some(path) => read(path, cluster, generation),
        None => Ok(ExportCatalog {
            cluster: cluster.to_string(),
            generation,
            services: Vec::new(),
        }),
    }
}

/// Reads and checks the exports file of cluster `cluster`; `generation` is stamped on the result.
pub fn read(path: &Path, cluster: &str, generation: u64) -> Result<ExportCatalog, ExportsError> {
    let text = std::fs::read_to_string(path).map_err(|source| ExportsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, cluster, generation)
}

/// Parses and checks exports-file text; `path` only names the file in errors.
pub fn parse(
    path: &Path,
    text: &str,
    cluster: &str,
    generation: u64,
) -> Result<ExportCatalog, ExportsError> {
    let file: ExportsFile = toml::from_str(text).map_err(|e| ExportsError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut services = Vec::with_capacity(file.services.len());
    let mut seen = BTreeSet::new();
    for (i, table) in file.services.into_iter().enumerate() {
        let text_of = |key: &str| table.get(key).and_then(|v| v.as_str()).unwrap_or("?");
        let label = format!(
            "services[{i}] ({}/{})",
            text_of("namespace"),
            text_of("name")
        );
        let fail = |field: &str, problem: String| ExportsError::Field {
            path: path.to_path_buf(),
            service: label.clone(),
            field: field.to_string(),
            problem,
        };
        let service: ServiceFile = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| fail("fields", e.message().to_string()))?;
        let service = check_service(service, &fail)?;
        if !seen.insert((service.namespace.clone(), service.name.clone())) {
            return Err(fail(
                "name",
                format!(
                    "{}/{} is exported twice; merge the two entries into one",
                    service.namespace, service.name
                ),
            ));
        }
        services.push(service);
    }
    Ok(ExportCatalog {
        cluster: cluster.to_string(),
        generation,
        services,
    })
}

fn check_service(
    s: ServiceFile,
    fail: &dyn Fn(&str, String) -> ExportsError,
) -> Result<ExportedService, ExportsError> {
    for (field, value) in [("namespace", &s.namespace), ("name", &s.name)] {
        if !is_dns_label(value) {
            return Err(fail(
                field,
                format!("'{value}' is not a DNS label: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"),
            ));
        }
    }
    let service_type = match s.service_type.as_deref() {
        None | Some("ClusterSetIP") => ServiceType::ClusterSetIP,
        Some("Headless") => ServiceType::Headless,
        Some(other) => {
            return Err(fail(
                "type",
                format!("'{other}' is not a service type: use \"ClusterSetIP\" or \"Headless\""),
            ))
        }
    };
    let ips = s
        .ips
        .iter()
        .enumerate()
        .map(|(i, text)| {
            text.trim().parse::<IpAddr>().map_err(|_| {
                fail(
                    &format!("ips[{i}]"),
                    format!("'{text}' is not an IP address; write e.g. 10.97.0.10"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    match service_type {
        ServiceType::ClusterSetIP if ips.is_empty() => {
            return Err(fail(
                "ips",
                "a ClusterSetIP service needs at least one service IP; add ips = [...] or set type = \"Headless\"".into(),
            ))
        }
        ServiceType::Headless if !ips.is_empty() => {
            return Err(fail(
                "ips",
                "a Headless service has no service IP; remove ips or set type = \"ClusterSetIP\""
                    .into(),
            ))
        }
        _ => {}
    }
    let mut ports = Vec::with_capacity(s.ports.len());
    for (i, p) in s.ports.into_iter().enumerate() {
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => PortProtocol::Tcp,
            Some("UDP") => PortProtocol::Udp,
            Some("SCTP") => PortProtocol::Sctp,
            Some(other) => {
                return Err(fail(
                    &format!("ports[{i}].protocol"),
                    format!("'{other}' is not a protocol: use \"TCP\", \"UDP\" or \"SCTP\""),
                ))
            }
        };
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                fail(
                    &format!("ports[{i}].port"),
                    format!("{} is not a port number: use 1-65535", p.port),
                )
            })?;
        if let Some(name) = &p.name {
            if !is_dns_label(name) {
                return Err(fail(
                    &format!("ports[{i}].name"),
                    format!("'{name}' is not a port name: use lowercase letters, digits or '-' (e.g. \"http\")"),
                ));
            }
        }
        ports.push(ServicePort {
            name: p.name,
            protocol,
            port,
            ..Default::default()
        });
    }
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    for (i, e) in s.endpoints.into_iter().enumerate() {
        let ip = e.ip.trim().parse::<IpAddr>().map_err(|_| {
            fail(
                &format!("endpoints[{i}].ip"),
                format!("'{}' is not an IP address; write e.g. 10.245.1.10", e.ip),
            )
        })?;
        if let Some(host) = &e.hostname {
            if !is_dns_label(host) {
                return Err(fail(
                    &format!("endpoints[{i}].hostname"),
                    format!(
                        "'{host}' is not a DNS label: use 1-63 lowercase letters, digits or '-'"
                    ),
                ));
            }
        }
        endpoints.push(Endpoint {
            ip,
            hostname: e.hostname,
            ready: e.ready.unwrap_or(true),
        });
    }
    Ok(ExportedService {
        namespace: s.namespace,
        name: s.name,
        service_type,
        ips,
        ports,
        endpoints,
        exported_at: None,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = r#"
[[services]]
namespace = "demo"
name = "web"
type = "ClusterSetIP"
ips = ["10.97.0.10"]
ports = [{ name = "http", protocol = "TCP", port = 80 }, { port = 9000, protocol = "UDP" }]
endpoints = [{ ip = "10.245.1.10" }, { ip = "10.245.1.11", ready = false }]

[[services]]
namespace = "demo"
name = "db"
type = "Headless"
ports = [{ name = "pg", port = 5432 }]
endpoints = [{ ip = "10.245.1.20", hostname = "db-0" }, { ip = "fd00::20" }]
"#;

    fn load(text: &str) -> Result<ExportCatalog, ExportsError> {
        parse(Path::new("/etc/meshd/exports.toml"), text, "m2", 4)
    }

    fn refused(text: &str) -> String {
        load(text).expect_err("should be refused").to_string()
    }

    #[test]
    fn a_full_file_becomes_a_catalog() {
        let c = load(WEB).unwrap();
        assert_eq!(c.cluster, "m2");
        assert_eq!(c.generation, 4);
        assert_eq!(c.services.len(), 2);
        let web = &c.services[0];
        assert_eq!(web.service_type, ServiceType::ClusterSetIP);
        assert_eq!(web.ips, ["10.97.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            web.ports,
            [
                ServicePort {
                    name: Some("http".into()),
                    protocol: PortProtocol::Tcp,
                    port: 80,
                    ..Default::default()
                },
                ServicePort {
                    name: None,
                    protocol: PortProtocol::Udp,
                    port: 9000,
                    ..Default::default()
                }
            ]
        );
        assert!(web.endpoints[0].ready && !web.endpoints[1].ready);
        let db = &c.services[1];
        assert_eq!(db.service_type, ServiceType::Headless);
        assert_eq!(db.ports[0].protocol, PortProtocol::Tcp);
        assert_eq!(db.endpoints[0].hostname.as_deref(), Some("db-0"));
        assert!(db.endpoints[1].ip.is_ipv6());
    }

    #[test]
    fn an_empty_file_exports_nothing() {
        assert!(load("").unwrap().services.is_empty());
    }

    #[test]
    fn each_bad_input_is_refused_naming_service_and_field() {
        let svc = "[[services]]\nnamespace = \"demo\"\nname = \"web\"\n";
        let cases: &[(String, &str)] = &[
            (
                format!("{svc}ips = [\"10.97.0.300\"]\n"),
                "services[0] (demo/web).ips[0]: '10.97.0.300' is not an IP address",
            ),
            (
                format!("{svc}ips = [\"10.97.0.10\"]\nendpoints = [{{ ip = \"pod-a\" }}]\n"),
                "services[0] (demo/web).endpoints[0].ip: 'pod-a' is not an IP address",
            ),
            (
                format!("{svc}ips = [\"10.97.0.10\"]\n{svc}ips = [\"10.97.0.11\"]\n"),
                "services[1] (demo/web).name: demo/web is exported twice",
            ),
            (
                format!("{svc}ips = [\"10.97.0.10\"]\nports = [{{ port = 0 }}]\n"),
                "services[0] (demo/web).ports[0].port: 0 is not a port number",
            ),
            (
                format!("{svc}ips = [\"10.97.0.10\"]\nports = [{{ port = 70000 }}]\n"),
                "services[0] (demo/web).ports[0].port: 70000 is not a port number",
            ),
            (
                format!(
                    "{svc}ips = [\"10.97.0.10\"]\nports = [{{ port = 80, protocol = \"HTTP\" }}]\n"
                ),
                "services[0] (demo/web).ports[0].protocol: 'HTTP' is not a protocol",
            ),
            (
                format!("{svc}ips = [\"10.97.0.10\"]\ncolour = \"blue\"\n"),
                "services[0] (demo/web).fields: unknown field `colour`",
            ),
            (
                format!("{svc}ips = [\"10.97.0.10\"]\nports = [{{ port = 80, prot = \"TCP\" }}]\n"),
                "services[0] (demo/web).fields: unknown field `prot`",
            ),
            (
                format!("{svc}type = \"NodePort\"\n"),
                "services[0] (demo/web).type: 'NodePort' is not a service type",
            ),
            (
                svc.to_string(),
                "services[0] (demo/web).ips: a ClusterSetIP service needs at least one service IP",
            ),
            (
                format!("{svc}type = \"Headless\"\nips = [\"10.97.0.10\"]\n"),
                "services[0] (demo/web).ips: a Headless service has no service IP",
            ),
            (
                "[[services]]\nnamespace = \"Demo\"\nname = \"web\"\nips = [\"10.97.0.10\"]\n"
                    .to_string(),
                "services[0] (Demo/web).namespace: 'Demo' is not a DNS label",
            ),
            (
                format!("{svc}type = \"Headless\"\nendpoints = [{{ ip = \"10.245.1.1\", hostname = \"a.b\" }}]\n"),
                "services[0] (demo/web).endpoints[0].hostname: 'a.b' is not a DNS label",
            ),
            (
                "[[services]]\nname = \"web\"\n".to_string(),
                "services[0] (?/web).fields: missing field `namespace`",
            ),
        ];
        for (text, expected) in cases {
            let e = refused(text);
            assert!(
                e.starts_with("exports file /etc/meshd/exports.toml: "),
                "{e}"
            );
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
        }
    }

    #[test]
    fn unknown_top_level_fields_and_bad_toml_are_refused_with_the_file_name() {
        let e = refused("[[service]]\nname = \"web\"\n");
        assert!(e.contains("/etc/meshd/exports.toml"), "{e}");
        assert!(e.contains("service"), "{e}");
        let e = refused("[[services]\n");
        assert!(e.contains("is not valid"), "{e}");
    }

    #[test]
    fn a_missing_file_names_the_path_and_the_setting() {
        let e = read(Path::new("/nonexistent/exports.toml"), "m1", 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/exports.toml"), "{e}");
        assert!(e.contains("exports_file"), "{e}");
    }
}
