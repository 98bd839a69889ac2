//! The cross-platform WireGuard UAPI, so `wg show`, `wg set` and `wg setconf` work against meshd
//! as against wireguard-go or boringtun-cli.
//!
//! The protocol is text over a Unix socket at `/var/run/wireguard/<interface>.sock`: a request is
//! `get=1` or `set=1` followed by `key=value` lines and an empty line; the answer is `key=value`
//! lines ending in `errno=N` and an empty line. [`apply_set`] turns a `set` request into a new
//! [`DeviceSpec`] (pure, testable); [`format_get`] renders the device; [`serve`] is the socket.
//! The socket is created mode 0600: the protocol carries the private key, as it does for
//! wireguard-go.

use crate::dataplane::{DeviceSpec, PeerSpec, PeerStatus};
use crate::keys::{decode_hex, encode_hex, PresharedKey, PrivateKey, PublicKey};
use ipnet::IpNet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// The directory every WireGuard implementation puts its UAPI sockets in.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// The socket path for an interface.
pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.sock"))
}

/// A refused request; `errno` is what the client sees (wg prints its strerror).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct UapiError {
    pub errno: i32,
    pub message: String,
}

fn invalid(message: impl Into<String>) -> UapiError {
    UapiError {
        errno: libc::EINVAL,
        message: message.into(),
    }
}

fn parse_key(key: &str, value: &str) -> Result<[u8; 32], UapiError> {
    decode_hex(value).ok_or_else(|| invalid(format!("{key}: expected 64 hex digits")))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(format!(
            "{key}: expected true or false, got '{value}'"
        ))),
    }
}

fn parse_number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    value
        .parse()
        .map_err(|_| invalid(format!("{key}: '{value}' is not a valid number")))
}

/// The peer a `set` request is currently talking about.
struct Current {
    key: PublicKey,
    /// `update_only=true` on a peer that does not exist: ignore its lines.
    skip: bool,
}

/// Applies the lines of a `set=1` request (without the `set=1` line) to `spec`.
///
/// As in wireguard-go: an allowed IP given to one peer is taken from any other peer that had the
/// same prefix; `remove=true` drops the peer; `replace_peers` and `replace_allowed_ips` start
/// from empty.
pub fn apply_set(spec: &DeviceSpec, lines: &[String]) -> Result<DeviceSpec, UapiError> {
    let mut next = spec.clone();
    let mut current: Option<Current> = None;
    for line in lines {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| invalid(format!("line '{line}' is not key=value")))?;
        if key == "public_key" {
            let public = PublicKey::from_bytes(parse_key(key, value)?);
            if next.peer_mut(&public).is_none() {
                next.peers.push(PeerSpec {
                    name: public.short(),
                    public_key: public,
                    preshared_key: None,
                    endpoint: None,
                    endpoints: Vec::new(),
                    allowed_ips: Vec::new(),
                    persistent_keepalive: None,
                });
            }
            current = Some(Current {
                key: public,
                skip: false,
            });
            continue;
        }
        match current.as_mut() {
            None => match key {
                "private_key" => {
                    let bytes = parse_key(key, value)?;
                    next.private_key = if bytes == [0u8; 32] {
                        None
                    } else {
                        Some(PrivateKey::from_bytes(bytes))
                    };
                }
                "listen_port" => next.listen_port = parse_number(key, value)?,
                "fwmark" => next.fwmark = parse_number(key, value)?,
                "replace_peers" => {
                    if parse_bool(key, value)? {
                        next.peers.clear();
                    }
                }
                _ => return Err(invalid(format!("unknown device key '{key}'"))),
            },
            Some(cur) => {
                if cur.skip {
                    continue;
                }
                let cur_key = cur.key;
                match key {
                    "update_only" => {
                        if parse_bool(key, value)?
                            && !spec.peers.iter().any(|p| p.public_key == cur_key)
                        {
                            next.peers.retain(|p| p.public_key != cur_key);
                            cur.skip = true;
                        }
                    }
                    "remove" => {
                        if parse_bool(key, value)? {
                            next.peers.retain(|p| p.public_key != cur_key);
                            cur.skip = true;
                        }
                    }
                    "preshared_key" => {
                        let bytes = parse_key(key, value)?;
                        let peer = next.peer_mut(&cur_key).expect("current peer exists");
                        peer.preshared_key =
                            (bytes != [0u8; 32]).then(|| PresharedKey::from_bytes(bytes));
                    }
                    "endpoint" => {
                        let addr: SocketAddr = value
                            .trim_start_matches('[')
                            .parse()
                            .or_else(|_| value.parse())
                            .map_err(|_| {
                                invalid(format!("endpoint: '{value}' is not an address:port"))
                            })?;
                        next.peer_mut(&cur_key)
                            .expect("current peer exists")
                            .endpoint = Some(addr);
                    }
                    "persistent_keepalive_interval" => {
                        let secs: u16 = parse_number(key, value)?;
                        next.peer_mut(&cur_key)
                            .expect("current peer exists")
                            .persistent_keepalive = (secs > 0).then_some(secs);
                    }
                    "replace_allowed_ips" => {
                        if parse_bool(key, value)? {
                            next.peer_mut(&cur_key)
                                .expect("current peer exists")
                                .allowed_ips
                                .clear();
                        }
                    }
                    "allowed_ip" => {
                        let net: IpNet = value
                            .parse()
                            .map_err(|_| invalid(format!("allowed_ip: '{value}' is not a CIDR")))?;
                        let net = net.trunc();
                        for other in next.peers.iter_mut() {
                            other.allowed_ips.retain(|n| *n != net);
                        }
                        next.peer_mut(&cur_key)
                            .expect("current peer exists")
                            .allowed_ips
                            .push(net);
                    }
                    "protocol_version" => {
                        if value != "1" {
                            return Err(invalid(format!(
                                "protocol_version {value} is not supported; only 1"
                            )));
                        }
                    }
                    _ => return Err(invalid(format!("unknown peer key '{key}'"))),
                }
            }
        }
    }
    Ok(next)
}

/// Renders a `get=1` answer (without the final `errno` line).
pub fn format_get(
    spec: &DeviceSpec,
    listen_port: u16,
    status: impl Fn(&PublicKey) -> Option<PeerStatus>,
) -> String {
    let mut out = String::new();
    if let Some(key) = &spec.private_key {
        let _ = writeln!(out, "private_key={}", encode_hex(key.as_bytes()));
    }
    let _ = writeln!(out, "listen_port={listen_port}");
    if spec.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", spec.fwmark);
    }
    for peer in &spec.peers {
        let live = status(&peer.public_key);
        let _ = writeln!(out, "public_key={}", encode_hex(peer.public_key.as_bytes()));
        if let Some(psk) = &peer.preshared_key {
            let _ = writeln!(out, "preshared_key={}", encode_hex(psk.as_bytes()));
        }
        let _ = writeln!(out, "protocol_version=1");
        if let Some(endpoint) = live.as_ref().and_then(|s| s.endpoint).or(peer.endpoint) {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        let since_epoch = live
            .as_ref()
            .and_then(|s| s.last_handshake)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", since_epoch.as_secs());
        let _ = writeln!(
            out,
            "last_handshake_time_nsec={}",
            since_epoch.subsec_nanos()
        );
        let _ = writeln!(out, "tx_bytes={}", live.as_ref().map_or(0, |s| s.tx_bytes));
        let _ = writeln!(out, "rx_bytes={}", live.as_ref().map_or(0, |s| s.rx_bytes));
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            peer.persistent_keepalive.unwrap_or(0)
        );
        for net in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out
}

/// What the UAPI server needs from the daemon.
pub trait UapiDevice: Send + Sync + 'static {
    /// The `get=1` body.
    fn get(&self) -> String;
    /// Applies a `set=1` request's lines.
    fn set(&self, lines: &[String]) -> Result<(), UapiError>;
}

/// Longest request line we accept: a request is a few hundred short lines.
const MAX_LINE: usize = 4096;

/// Serves the UAPI on `path` until the task is dropped. Replaces a stale socket file.
pub async fn serve(path: PathBuf, device: std::sync::Arc<dyn UapiDevice>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let device = device.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, device).await {
                tracing::debug!(error = %e, "UAPI connection ended");
            }
        });
    }
}

async fn read_line(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    line: &mut String,
) -> std::io::Result<bool> {
    line.clear();
    let n = (&mut *reader).take(MAX_LINE as u64).read_line(line).await?;
    if n == 0 {
        return Ok(false);
    }
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "UAPI line too long or truncated",
        ));
    }
    line.pop();
    Ok(true)
}

async fn handle(
    stream: tokio::net::UnixStream,
    device: std::sync::Arc<dyn UapiDevice>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        if !read_line(&mut reader, &mut line).await? {
            return Ok(());
        }
        let reply = match line.as_str() {
            "get=1" => {
                // The request ends with an empty line.
                read_line(&mut reader, &mut line).await?;
                format!("{}errno=0\n\n", device.get())
            }
            "set=1" => {
                let mut lines = Vec::new();
                while read_line(&mut reader, &mut line).await? && !line.is_empty() {
                    lines.push(line.clone());
                }
                // Reconciling the dataplane may block (resolving names, netlink): off the runtime.
                let device = device.clone();
                match tokio::task::spawn_blocking(move || device.set(&lines)).await {
                    Ok(Ok(())) => "errno=0\n\n".to_string(),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "UAPI set refused");
                        format!("errno={}\n\n", e.errno)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "UAPI set failed");
                        format!("errno={}\n\n", libc::EIO)
                    }
                }
            }
            _ => {
                write
                    .write_all(format!("errno={}\n\n", libc::EINVAL).as_bytes())
                    .await?;
                return Ok(());
            }
        };
        write.write_all(reply.as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    fn key_hex(k: &PublicKey) -> String {
        encode_hex(k.as_bytes())
    }

    #[test]
    fn set_adds_a_peer_with_everything() {
        let private = PrivateKey::generate();
        let peer = PrivateKey::generate().public_key();
        let req = format!(
            "private_key={}\nlisten_port=51999\npublic_key={}\nendpoint=192.0.2.2:51820\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.245.0.0/16\nallowed_ip=fd00::/64\nprotocol_version=1",
            encode_hex(private.as_bytes()),
            key_hex(&peer)
        );
        let spec = apply_set(&DeviceSpec::default(), &lines(&req)).unwrap();
        assert_eq!(spec.private_key, Some(private));
        assert_eq!(spec.listen_port, 51999);
        assert_eq!(spec.peers.len(), 1);
        let p = &spec.peers[0];
        assert_eq!(p.public_key, peer);
        assert_eq!(p.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert_eq!(p.allowed_ips.len(), 2);
    }

    #[test]
    fn allowed_ip_moves_between_peers_and_remove_works() {
        let a = PrivateKey::generate().public_key();
        let b = PrivateKey::generate().public_key();
        let spec = apply_set(
            &DeviceSpec::default(),
            &lines(&format!(
                "public_key={}\nallowed_ip=10.245.0.0/16\npublic_key={}\nallowed_ip=10.245.0.0/16",
                key_hex(&a),
                key_hex(&b)
            )),
        )
        .unwrap();
        assert!(spec.peers[0].allowed_ips.is_empty());
        assert_eq!(spec.peers[1].allowed_ips.len(), 1);
        let spec = apply_set(
            &spec,
            &lines(&format!("public_key={}\nremove=true", key_hex(&a))),
        )
        .unwrap();
        assert_eq!(spec.peers.len(), 1);
        assert_eq!(spec.peers[0].public_key, b);
        let spec = apply_set(&spec, &lines("replace_peers=true")).unwrap();
        assert!(spec.peers.is_empty());
    }

    #[test]
    fn update_only_ignores_unknown_peers() {
        let a = PrivateKey::generate().public_key();
        let spec = apply_set(
            &DeviceSpec::default(),
            &lines(&format!(
                "public_key={}\nupdate_only=true\nallowed_ip=10.0.0.0/8",
                key_hex(&a)
            )),
        )
        .unwrap();
        assert!(spec.peers.is_empty());
    }

    #[test]
    fn bad_requests_are_refused_with_einval() {
        for bad in [
            "listen_port=abc",
            "private_key=zz",
            "nonsense",
            "colour=blue",
            "public_key=0000000000000000000000000000000000000000000000000000000000000001\nallowed_ip=10.0.0.0/33",
            "public_key=0000000000000000000000000000000000000000000000000000000000000001\nendpoint=nowhere",
            "public_key=0000000000000000000000000000000000000000000000000000000000000001\nprotocol_version=2",
        ] {
            let err = apply_set(&DeviceSpec::default(), &lines(bad)).unwrap_err();
            assert_eq!(err.errno, libc::EINVAL, "{bad}");
        }
    }

    #[test]
    fn get_renders_what_wg_expects() {
        let private = PrivateKey::generate();
        let peer = PrivateKey::generate().public_key();
        let spec = DeviceSpec {
            private_key: Some(private.clone()),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerSpec {
                name: "m2".into(),
                public_key: peer,
                preshared_key: None,
                endpoint: Some("192.0.2.2:51820".parse().unwrap()),
                endpoints: Vec::new(),
                allowed_ips: vec!["10.245.0.0/16".parse().unwrap()],
                persistent_keepalive: Some(25),
            }],
            ..DeviceSpec::default()
        };
        let text = format_get(&spec, 51820, |_| None);
        let expected = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\nprotocol_version=1\nendpoint=192.0.2.2:51820\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=25\nallowed_ip=10.245.0.0/16\n",
            encode_hex(private.as_bytes()),
            key_hex(&peer)
        );
        assert_eq!(text, expected);
    }
}
