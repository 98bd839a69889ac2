//! The control plane: turns configuration (the file, SIGHUP, `wg set`) into dataplane state and
//! host routes.
//!
//! A [`Controller`] is the one place a new [`DeviceSpec`] enters: it applies the spec to the
//! dataplane, then tells the route task which prefixes to route through the TUN device.

pub mod routes;
pub mod uapi;

use crate::config::Config;
use crate::dataplane::{ApplyError, Dataplane, Delivery, DeviceSpec, GatewayServices, PeerSpec};
use ipnet::IpNet;
use parking_lot::Mutex;
use std::sync::Arc;
use tokio::sync::watch;
use uapi::{UapiDevice, UapiError};

/// The device spec a checked configuration describes.
pub fn spec_from_config(config: &Config) -> DeviceSpec {
    DeviceSpec {
        private_key: config.private_key.clone(),
        listen_port: config.listen_port,
        fwmark: 0,
        peers: config
            .peers
            .iter()
            .map(|p| PeerSpec {
                name: p.name.clone(),
                public_key: p.public_key,
                preshared_key: None,
                endpoint: p.endpoint,
                endpoints: p.endpoints.clone(),
                allowed_ips: p.allowed_cidrs.clone(),
                persistent_keepalive: p.persistent_keepalive,
            })
            .collect(),
        delivery: delivery_from_config(config),
        translation: config.translation.clone(),
    }
}

/// Where decrypted packets may go: this cluster's prefixes, and the catalog sync and health
/// probe on our tunnel address (see [`crate::dataplane::delivery`]).
fn delivery_from_config(config: &Config) -> Delivery {
    Delivery {
        cidrs: config
            .local_cidrs
            .iter()
            .chain(&config.deliver_cidrs)
            .copied()
            .collect(),
        gateway: config.tunnel_address.map(|net| GatewayServices {
            address: net.addr(),
            tcp_ports: vec![config.discovery_port],
            udp_ports: vec![config.discovery_port],
        }),
    }
}

/// Applies specs to the dataplane and publishes the prefixes to route.
pub struct Controller {
    dataplane: Arc<Dataplane>,
    routes: watch::Sender<Vec<IpNet>>,
    /// Serialises read-modify-write of the spec (concurrent `wg set` calls).
    updating: Mutex<()>,
}

impl Controller {
    /// Returns the controller and the receiver the route task follows.
    pub fn new(dataplane: Arc<Dataplane>) -> (Arc<Self>, watch::Receiver<Vec<IpNet>>) {
        let prefixes = dataplane.spec().routed_prefixes();
        let (routes, rx) = watch::channel(prefixes);
        (
            Arc::new(Controller {
                dataplane,
                routes,
                updating: Mutex::new(()),
            }),
            rx,
        )
    }

    pub fn dataplane(&self) -> &Arc<Dataplane> {
        &self.dataplane
    }

    /// Replaces the whole spec (start-up, SIGHUP).
    pub fn apply(&self, spec: DeviceSpec) -> Result<(), ApplyError> {
        let _guard = self.updating.lock();
        self.apply_locked(spec)
    }

    fn apply_locked(&self, spec: DeviceSpec) -> Result<(), ApplyError> {
        let prefixes = spec.routed_prefixes();
        self.dataplane.apply(spec)?;
        self.routes.send_replace(prefixes);
        Ok(())
    }
}

impl UapiDevice for Controller {
    fn get(&self) -> String {
        let table = self.dataplane.table();
        uapi::format_get(
            &self.dataplane.spec(),
            self.dataplane.listen_port(),
            |key| table.peer(key).map(|p| p.status()),
        )
    }

    fn set(&self, lines: &[String]) -> Result<(), UapiError> {
        let _guard = self.updating.lock();
        let next = uapi::apply_set(&self.dataplane.spec(), lines)?;
        self.apply_locked(next).map_err(|e| UapiError {
            errno: match &e {
                ApplyError::Bind(crate::dataplane::udp::BindError::InUse { .. }) => {
                    libc::EADDRINUSE
                }
                _ => libc::EIO,
            },
            message: e.to_string(),
        })
    }
}
