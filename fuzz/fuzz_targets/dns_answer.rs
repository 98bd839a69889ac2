//! The `clusterset.local` answer path: any query name and type against a clusterset with
//! ClusterSetIP and headless services in two clusters.
#![no_main]

use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use libfuzzer_sys::fuzz_target;
use meshd::discovery::catalog::{
    ClusterEntry, ClustersetView, Endpoint, ExportCatalog, ExportedService, PortProtocol,
    ServicePort, ServiceType,
};
use meshd::dns::answer::{answer, Snapshot};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

fn service(name: &str, kind: ServiceType, ips: &[&str], endpoints: &[&str]) -> ExportedService {
    ExportedService {
        namespace: "demo".into(),
        name: name.into(),
        service_type: kind,
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        ports: vec![ServicePort {
            name: Some("http".into()),
            protocol: PortProtocol::Tcp,
            port: 80,
            ..Default::default()
        }],
        endpoints: endpoints
            .iter()
            .enumerate()
            .map(|(i, ip)| Endpoint {
                ip: ip.parse().unwrap(),
                hostname: (i == 0).then(|| "db-0".to_string()),
                ready: true,
            })
            .collect(),
        exported_at: None,
        ..Default::default()
    }
}

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let local = ExportCatalog {
            cluster: "m1".into(),
            generation: 1,
            services: vec![
                service(
                    "web",
                    ServiceType::ClusterSetIP,
                    &["10.96.0.10", "fd00:96::10"],
                    &["10.244.1.10"],
                ),
                service(
                    "db",
                    ServiceType::Headless,
                    &[],
                    &["10.244.1.20", "10.244.1.21"],
                ),
            ],
        };
        let remote = ExportCatalog {
            cluster: "m2".into(),
            generation: 1,
            services: vec![
                service(
                    "web",
                    ServiceType::ClusterSetIP,
                    &["10.97.0.10"],
                    &["10.245.1.10"],
                ),
                service(
                    "db",
                    ServiceType::Headless,
                    &[],
                    &["10.245.1.20", "fd00:245::20"],
                ),
            ],
        };
        let remotes = BTreeMap::from([(
            "m2".to_string(),
            ClusterEntry {
                up: true,
                catalog: Arc::new(remote),
            },
        )]);
        Snapshot::new(Arc::new(ClustersetView::build(Arc::new(local), &remotes)))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((qtype, wire)) = data.split_at_checked(2) else {
        return;
    };
    let qtype = RecordType::from(u16::from_be_bytes([qtype[0], qtype[1]]));
    let mut decoder = BinDecoder::new(wire);
    if let Ok(name) = Name::read(&mut decoder) {
        let _ = answer(snapshot(), &name, qtype);
    }
    if let Ok(text) = std::str::from_utf8(wire) {
        if let Ok(name) = Name::from_utf8(text) {
            let _ = answer(snapshot(), &name, qtype);
        }
    }
});
