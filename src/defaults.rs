//! Defaults that more than one room uses: the leaf module that every other may import, so that
//! the configuration that sets a value and the code that serves it agree without importing
//! each other.

/// Path of meshd's admin socket (`admin_socket`; meshctl's `--socket`).
pub const ADMIN_SOCKET: &str = "/run/meshd/meshd.sock";

/// TTL of DNS answers, in seconds (`dns_ttl`): short, so a failover shows within seconds.
pub const DNS_TTL: u32 = 5;

/// Identical DNS answers a second to one client prefix before response-rate limiting
/// (`dns_rate_limit`).
pub const DNS_RATE_LIMIT: u32 = 20;
