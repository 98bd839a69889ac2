//! The control plane: turns configuration (file, SIGHUP, `wg set`) into dataplane state and host
//! routes.

pub mod routes;
pub mod uapi;
