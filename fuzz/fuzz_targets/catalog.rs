//! Catalog acceptance: what a peer's gateway answers to `GET /v1/catalog`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::discovery::sync::{accept_catalog, SyncPeer};
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static PEER: OnceLock<SyncPeer> = OnceLock::new();
    let peer = PEER.get_or_init(|| SyncPeer {
        name: "m2".into(),
        tunnel_address: "100.64.0.2".parse().unwrap(),
        allowed_cidrs: vec![
            "10.245.0.0/16".parse().unwrap(),
            "10.97.0.0/16".parse().unwrap(),
        ],
    });
    if let Ok(accepted) = accept_catalog(peer, data) {
        assert!(accepted.catalog.services.len() <= meshd::discovery::catalog::MAX_SERVICES);
        for service in &accepted.catalog.services {
            assert!(service.check().is_ok());
        }
    }
});
