//! Joining two clusters: what one cluster's administrator hands to the other, and the Secret that
//! holds this cluster's private key.
//!
//! Joining is: generate a key per cluster, exchange the two `[[peers]]` stanzas, apply the
//! overlays. [`peer_stanza`] (`meshctl stanza`) turns this cluster's facts (its private key, name,
//! reachable endpoint, CIDRs and tunnel address), from flags or from its own meshd.toml, into the
//! `[[peers]]` table the other cluster adds to its configuration. [`write_secret`]
//! (`meshctl secret`) writes the Kubernetes Secret the DaemonSet of deploy/ mounts to a new file
//! only its owner can read.
//!
//! Every input goes through meshd's own loader ([`Config::from_parts`]) and parsers, so both
//! commands refuse exactly what meshd would refuse, naming the flag (or the config file and its
//! field) at fault. The private key is read to derive its public key or to fill the Secret file;
//! it is never part of anything returned for printing. I/O is limited to the files named on the
//! command line; meshctl prints the results.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ipnet::IpNet;
use meshd::config::{resolve_endpoint, Config, ConfigArgs, ConfigError, ConfigFile};
use meshd::keys::{KeyError, PrivateKey, PublicKey};
use serde::Serialize;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The Secret the DaemonSet mounts (deploy/base/daemonset.yaml): its name and the key in it.
const SECRET_NAME: &str = "meshd-key";
/// The Secret's key holding the private key file; mounted as /etc/meshd/private.key.
const SECRET_KEY: &str = "private.key";
/// The namespace deploy/ installs meshd into.
pub const DEFAULT_NAMESPACE: &str = "meshd-system";

/// Exit code for refused input (a flag, the config file, `--out`), as clap's usage errors.
const EXIT_USAGE: u8 = 2;
/// Exit code when writing failed.
const EXIT_FAILED: u8 = 1;

/// `meshctl stanza`: this cluster's facts. Every one may come from `--config` instead.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StanzaArgs {
    /// This cluster's meshd.toml, or the ConfigMap manifest holding it (deploy/overlays/*/
    /// meshd-config.yaml): its cluster, private_key_file, local_cidrs and tunnel_address are the
    /// defaults of the flags below (the whole file is checked as meshd would).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This cluster's private key file, as `meshctl genkey` writes it; only its public key is
    /// printed.
    #[arg(long, value_name = "FILE")]
    pub private_key_file: Option<PathBuf>,
    /// This cluster's name: the other cluster calls its peer by it.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Where the other cluster reaches this gateway's WireGuard port: an address or host name and
    /// the UDP port (after any port forward), e.g. 203.0.113.10:51820. Repeat it for each gateway
    /// candidate (docs/ha.md): the stanza then lists them as `endpoints`.
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: Vec<String>,
    /// This gateway cannot be reached (it is behind NAT): the other cluster waits for its first
    /// packet and learns its address from it.
    #[arg(long, conflicts_with = "endpoint")]
    pub no_endpoint: bool,
    /// This cluster's CIDRs (pods, services); repeat or comma-separate.
    #[arg(long = "local-cidr", value_name = "CIDR", value_delimiter = ',')]
    pub local_cidrs: Vec<String>,
    /// This gateway's tunnel address with prefix, as in its config (e.g. 100.64.0.1/24).
    #[arg(long, value_name = "ADDRESS/PREFIX")]
    pub tunnel_address: Option<String>,
    /// LOCAL=GLOBAL: the global range this cluster's LOCAL range stands as (its `global_cidrs`,
    /// for clusters whose ranges overlap); the stanza then gives the global ranges. Repeat or
    /// comma-separate.
    #[arg(
        long = "global-cidr",
        value_name = "LOCAL=GLOBAL",
        value_delimiter = ','
    )]
    pub global_cidrs: Vec<String>,
    /// Seconds between the keepalives the other cluster sends to this one: set it (25) when the
    /// other cluster is behind NAT, so its NAT mapping stays open.
    #[arg(long, value_name = "SECONDS")]
    pub persistent_keepalive: Option<u16>,
}

/// `meshctl secret`: the Secret manifest holding a private key, written to a file.
#[derive(Debug, Clone, clap::Args)]
pub struct SecretArgs {
    /// The private key file to put in the Secret, as `meshctl genkey` writes it.
    #[arg(long, value_name = "FILE")]
    pub private_key_file: PathBuf,
    /// The file to write the manifest to, created with mode 0600. Never standard output or a
    /// terminal: the manifest holds the private key.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace --out if it exists (the new file is mode 0600 too).
    #[arg(long)]
    pub force: bool,
    /// Namespace of the Secret: the one meshd's DaemonSet runs in.
    #[arg(long, value_name = "NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
}

/// `meshctl check-config`: a cluster's configuration, checked as meshd checks it at start.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckConfigArgs {
    /// meshd.toml, or the ConfigMap manifest holding it (deploy/overlays/*/meshd-config.yaml).
    #[arg(value_name = "FILE")]
    pub config: PathBuf,
    /// The cluster's private key file, in place of the file's private_key_file (the path on the
    /// gateway, such as /etc/meshd/private.key).
    #[arg(long, value_name = "FILE")]
    pub private_key_file: Option<PathBuf>,
}

/// Why a join helper refused or failed; the message names the flag or file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// A flag's value, or a file named by one, is refused.
    #[error("{0}")]
    Input(ConfigError),
    /// A cluster's configuration file is refused by meshd's loader.
    #[error("{path}: {source}")]
    InFile { path: String, source: ConfigError },
    /// The private key could not be read.
    #[error("{via}: {source}")]
    Key { via: String, source: KeyError },
    /// `--out` names something the Secret must not be written to.
    #[error("--out {path}: {problem}")]
    OutRefused { path: String, problem: String },
    /// Writing the Secret file failed.
    #[error(
        "--out {path}: cannot write it: {source}; check that its directory exists and is writable"
    )]
    OutFailed {
        path: String,
        source: std::io::Error,
    },
}

impl JoinError {
    /// `EXIT_USAGE` (2) for refused input, `EXIT_FAILED` (1) when writing failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            JoinError::OutFailed { .. } => EXIT_FAILED,
            _ => EXIT_USAGE,
        }
    }
}

fn flag_error(flag: &str, problem: impl Into<String>) -> JoinError {
    JoinError::Input(ConfigError::Field {
        field: flag.to_string(),
        problem: problem.into(),
    })
}

/// The `[[peers]]` table describing this cluster to the other one.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStanza {
    pub name: String,
    pub public_key: PublicKey,
    /// As given (a host name stays a name: the other meshd resolves it); several: one per gateway
    /// candidate.
    pub endpoints: Vec<String>,
    /// This cluster's CIDRs, then the tunnel address as a host route unless they contain it.
    pub allowed_cidrs: Vec<IpNet>,
    pub tunnel_address: Option<IpAddr>,
    pub persistent_keepalive: Option<u16>,
}

/// The TOML shape of a stanza: one `[[peers]]` table, fields in the order of docs/configuration.md.
#[derive(Serialize)]
struct StanzaToml<'a> {
    peers: [PeerToml<'a>; 1],
}

#[derive(Serialize)]
struct PeerToml<'a> {
    name: &'a str,
    public_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoints: Option<Vec<&'a str>>,
    allowed_cidrs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tunnel_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    persistent_keepalive: Option<u16>,
}

impl PeerStanza {
    /// The stanza as TOML, with a comment saying what it is and where it goes.
    pub fn to_toml(&self) -> String {
        let table = StanzaToml {
            peers: [PeerToml {
                name: &self.name,
                public_key: self.public_key.to_base64(),
                endpoint: match self.endpoints.as_slice() {
                    [one] => Some(one.as_str()),
                    _ => None,
                },
                endpoints: (self.endpoints.len() > 1)
                    .then(|| self.endpoints.iter().map(String::as_str).collect()),
                allowed_cidrs: self.allowed_cidrs.iter().map(|c| c.to_string()).collect(),
                tunnel_address: self.tunnel_address.map(|a| a.to_string()),
                persistent_keepalive: self.persistent_keepalive,
            }],
        };
        let body = toml::to_string(&table)
            .expect("a table of strings, string arrays and an integer always serializes");
        format!(
            "# Cluster {}'s meshd gateway: add this table to the other cluster's meshd.toml.\n{body}",
            self.name
        )
    }
}

/// Which settings came from flags, to name the flag rather than the file's field in errors.
fn flag_for(field: &str, flags: &ConfigArgs) -> Option<&'static str> {
    let base = field.split('[').next().unwrap_or(field);
    match base {
        "cluster" if flags.cluster.is_some() => Some("--cluster"),
        "local_cidrs" if !flags.local_cidrs.is_empty() => Some("--local-cidr"),
        "tunnel_address" if flags.tunnel_address.is_some() => Some("--tunnel-address"),
        "global_cidrs" if !flags.global_cidrs.is_empty() => Some("--global-cidr"),
        _ => None,
    }
}

/// The key under which a ConfigMap manifest holds meshd's configuration.
const CONFIGMAP_KEY: &str = "meshd.toml";

/// Reads a cluster's configuration: a meshd.toml, or (for a `.yaml` / `.yml` file) a ConfigMap
/// manifest holding it under `meshd.toml`, as deploy/overlays/*/meshd-config.yaml do.
fn read_cluster_config(path: &Path) -> Result<ConfigFile, JoinError> {
    let is_manifest = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    if !is_manifest {
        return ConfigFile::read(path).map_err(JoinError::Input);
    }
    let text = std::fs::read_to_string(path).map_err(|source| {
        JoinError::Input(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })
    })?;
    let toml = configmap_block(&text).map_err(|problem| {
        JoinError::Input(ConfigError::Parse {
            path: path.to_path_buf(),
            message: problem,
        })
    })?;
    ConfigFile::parse(path, &toml).map_err(JoinError::Input)
}

/// The `meshd.toml` entry of the one ConfigMap in a YAML file (one document or several, as
/// `kubectl kustomize` prints them) that has it.
fn configmap_block(text: &str) -> Result<String, String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde::Deserialize;
    let mut found: Vec<(String, String)> = Vec::new();
    for (number, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(document)
            .map_err(|e| format!("document {} is not valid YAML: {e}", number + 1))?;
        if value.get("kind").and_then(|k| k.as_str()) != Some("ConfigMap") {
            continue;
        }
        let map: ConfigMap = serde_yaml_ng::from_value(value)
            .map_err(|e| format!("document {} is not a valid ConfigMap: {e}", number + 1))?;
        if let Some(toml) = map.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY)) {
            let name = map
                .metadata
                .name
                .clone()
                .unwrap_or_else(|| "(no name)".into());
            found.push((name, toml.clone()));
        }
    }
    match found.len() {
        0 => Err(format!("it holds no ConfigMap with a `{CONFIGMAP_KEY}` entry; give meshd.toml itself, or a ConfigMap manifest holding it as deploy/overlays/*/meshd-config.yaml do")),
        1 => Ok(found.remove(0).1),
        _ => Err(format!(
            "it holds {} ConfigMaps with a `{CONFIGMAP_KEY}` entry ({}); give the file of one cluster",
            found.len(),
            found.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Checks a cluster's configuration with meshd's loader, `flags` winning over the file's fields.
/// Errors name the flag when the value came from one, else the file and its field.
fn load_checked(
    file: ConfigFile,
    source: Option<&Path>,
    flags: &ConfigArgs,
) -> Result<Config, JoinError> {
    let key_from_file = flags.private_key_file.is_none() && file.private_key_file.is_some();
    let in_file = |e: ConfigError| match source {
        Some(path) => JoinError::InFile {
            path: path.display().to_string(),
            source: e,
        },
        None => JoinError::Input(e),
    };
    Config::from_parts(file, flags).map_err(|e| match e {
        ConfigError::Key(source) if key_from_file => JoinError::Key {
            via: format!(
                "{}: private_key_file (not on this machine? give the key with --private-key-file)",
                flags
                    .config
                    .as_deref()
                    .unwrap_or(Path::new("the config"))
                    .display()
            ),
            source,
        },
        ConfigError::Key(source) => JoinError::Key {
            via: "--private-key-file".into(),
            source,
        },
        ConfigError::Field { field, problem } => match flag_for(&field, flags) {
            Some(flag) => flag_error(flag, problem),
            None => in_file(ConfigError::Field { field, problem }),
        },
        other => in_file(other),
    })
}

/// Builds this cluster's stanza for the other cluster, checking every input as meshd does.
/// Returns the stanza and notes for the operator (printed apart from the stanza).
pub fn peer_stanza(args: &StanzaArgs) -> Result<(PeerStanza, Vec<String>), JoinError> {
    let file = match &args.config {
        Some(path) => read_cluster_config(path)?,
        None => ConfigFile::default(),
    };
    let named_cluster = args.cluster.is_some() || file.cluster.is_some();
    let flags = ConfigArgs {
        config: args.config.clone(),
        cluster: args.cluster.clone(),
        private_key_file: args.private_key_file.clone(),
        local_cidrs: args.local_cidrs.clone(),
        tunnel_address: args.tunnel_address.clone(),
        global_cidrs: args.global_cidrs.clone(),
        ..ConfigArgs::default()
    };
    let config = load_checked(file, args.config.as_deref(), &flags)?;

    let private_key = config.private_key.as_ref().ok_or_else(|| {
        flag_error(
            "--private-key-file",
            "missing: name this cluster's private key file (`meshctl genkey > FILE` makes one), or --config with private_key_file set; only its public key is printed",
        )
    })?;
    if !named_cluster {
        return Err(flag_error(
            "--cluster",
            "missing: give this cluster's name (the other cluster calls its peer by it), or --config with cluster set",
        ));
    }
    if config.local_cidrs.is_empty() {
        return Err(flag_error(
            "--local-cidr",
            "missing: give this cluster's pod and service CIDRs, e.g. --local-cidr 10.244.0.0/16,10.96.0.0/16, or --config with local_cidrs set",
        ));
    }
    let endpoints = match (args.endpoint.as_slice(), args.no_endpoint) {
        ([], true) => Vec::new(),
        ([], false) => {
            return Err(flag_error(
                "--endpoint",
                "missing: give the host:port where the other cluster reaches this gateway (e.g. 203.0.113.10:51820), or --no-endpoint if it cannot (behind NAT: it then learns this gateway's address from its packets)",
            ))
        }
        (texts, _) => {
            let mut endpoints = Vec::new();
            for text in texts {
                let text = text.trim();
                resolve_endpoint("--endpoint", text).map_err(JoinError::Input)?;
                endpoints.push(text.to_string());
            }
            endpoints
        }
    };

    let mut notes = Vec::new();
    // The other cluster knows this one by its global ranges, where it has them.
    let translation = &config.translation;
    let mut allowed_cidrs: Vec<IpNet> = config
        .local_cidrs
        .iter()
        .map(|c| translation.global_net(*c))
        .collect();
    let tunnel_address = config
        .tunnel_address
        .map(|net| translation.global(net.addr()));
    if !translation.is_empty() {
        let pairs: Vec<String> = translation.cidrs().iter().map(|c| c.to_string()).collect();
        notes.push(format!(
            "global ranges: the other cluster reaches this one's {} (LOCAL=GLOBAL), translated by this gateway",
            pairs.join(", ")
        ));
    }
    match tunnel_address {
        Some(addr) if !allowed_cidrs.iter().any(|c| c.contains(&addr)) => {
            allowed_cidrs.push(IpNet::from(addr));
        }
        Some(_) => {}
        None => notes.push(
            "no tunnel address (--tunnel-address or tunnel_address): the other cluster will treat this one as a plain WireGuard peer, without service catalog or health probe".to_string(),
        ),
    }
    if endpoints.is_empty() {
        notes.push(format!(
            "no endpoint: the other cluster will wait for {name} to contact it, so {name} needs the other cluster's endpoint, and a persistent keepalive towards it if {name} is behind NAT (the other cluster's `meshctl stanza --persistent-keepalive 25`)",
            name = config.cluster
        ));
    }
    let stanza = PeerStanza {
        name: config.cluster.clone(),
        public_key: private_key.public_key(),
        endpoints,
        allowed_cidrs,
        tunnel_address,
        persistent_keepalive: args.persistent_keepalive.filter(|k| *k > 0),
    };
    Ok((stanza, notes))
}

/// Checks a cluster's configuration file with meshd's loader, as meshd does at start.
pub fn check_config(args: &CheckConfigArgs) -> Result<Config, JoinError> {
    let file = read_cluster_config(&args.config)?;
    let flags = ConfigArgs {
        config: Some(args.config.clone()),
        private_key_file: args.private_key_file.clone(),
        ..ConfigArgs::default()
    };
    load_checked(file, Some(&args.config), &flags)
}

/// A checked configuration in a few lines: what this cluster is and which peers it has.
pub fn describe(config: &Config) -> String {
    let list = |cidrs: &[IpNet]| {
        cidrs
            .iter()
            .map(IpNet::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let public_key = config
        .private_key
        .as_ref()
        .map_or_else(|| "none".to_string(), |k| k.public_key().to_base64());
    let none = || "none".to_string();
    let mut text = format!(
        "cluster {} (public key {public_key}), interface {}, listen port {}\n  local CIDRs {}; tunnel address {}\n",
        config.cluster,
        config.interface,
        config.listen_port,
        list(&config.local_cidrs),
        config.tunnel_address.map_or_else(none, |a| a.to_string()),
    );
    for peer in &config.peers {
        let endpoint = match (peer.endpoint, peer.endpoints.len()) {
            (_, n) if n > 1 => peer
                .endpoints
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(" or "),
            (Some(e), _) => e.to_string(),
            (None, _) => "none (learned from its packets)".to_string(),
        };
        let keepalive = peer
            .persistent_keepalive
            .map_or_else(|| "off".to_string(), |k| format!("{k} s"));
        text.push_str(&format!(
            "peer {} (public key {}), endpoint {endpoint}, keepalive {keepalive}\n  allowed CIDRs {}; tunnel address {}\n",
            peer.name,
            peer.public_key,
            list(&peer.allowed_cidrs),
            peer.tunnel_address.map_or_else(none, |a| a.to_string()),
        ));
    }
    text
}

/// What [`write_secret`] wrote.
#[derive(Debug, Clone)]
pub struct SecretWritten {
    pub path: PathBuf,
    pub namespace: String,
    /// The public key of the private key in the Secret, to tell which key it holds.
    pub public_key: PublicKey,
}

impl SecretWritten {
    /// What was written and what to run next; holds no secret.
    pub fn instructions(&self) -> String {
        let file = shell_word(&self.path.display().to_string());
        format!(
            "wrote Secret {ns}/{SECRET_NAME} (the private key of public key {key}) to {file}, mode 0600\n\
             apply it with kubectl's context on this cluster, then delete the file:\n  \
             kubectl create namespace {ns}    # unless it exists\n  \
             kubectl apply -f {file}\n  \
             shred -u {file}\n",
            ns = self.namespace,
            key = self.public_key,
        )
    }
}

/// `text` as one shell word: as is when it needs no quoting, else in single quotes.
fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// A Kubernetes namespace name: a DNS label (RFC 1123) of at most 63 characters.
fn valid_namespace(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// The Secret manifest the DaemonSet mounts, holding `key` as `meshctl genkey` writes it.
fn secret_manifest(key: &PrivateKey, namespace: &str) -> Zeroizing<String> {
    let file = Zeroizing::new(format!("{}\n", key.to_base64().as_str()));
    let data = Zeroizing::new(STANDARD.encode(file.as_bytes()));
    Zeroizing::new(format!(
        "# The private key of this cluster's meshd gateway (public key {public}),\n\
         # mounted by meshd's DaemonSet (deploy/base/daemonset.yaml). Written by `meshctl secret`:\n\
         # apply it with `kubectl apply -f`, then delete this file. Never commit it.\n\
         apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n  \
           name: {SECRET_NAME}\n  \
           namespace: {namespace}\n  \
           labels:\n    \
             app.kubernetes.io/name: meshd\n    \
             app.kubernetes.io/part-of: meshd\n\
         type: Opaque\n\
         data:\n  \
           {SECRET_KEY}: {data}\n",
        public = key.public_key(),
        data = data.as_str(),
    ))
}

/// Writes the Secret manifest for `args.private_key_file` to `args.out` (see `write_private_file`).
pub fn write_secret(args: &SecretArgs) -> Result<SecretWritten, JoinError> {
    if !valid_namespace(&args.namespace) {
        return Err(flag_error(
            "--namespace",
            format!(
                "'{}' is not a Kubernetes namespace name: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
                args.namespace
            ),
        ));
    }
    let key = PrivateKey::from_file(&args.private_key_file).map_err(|source| JoinError::Key {
        via: "--private-key-file".into(),
        source,
    })?;
    let manifest = secret_manifest(&key, &args.namespace);
    write_private_file(&args.out, manifest.as_bytes(), args.force)?;
    Ok(SecretWritten {
        path: args.out.clone(),
        namespace: args.namespace.clone(),
        public_key: key.public_key(),
    })
}

/// Writes `contents` to a new regular file at `path` with mode 0600. Refuses standard output
/// (`-`), anything that is not a regular file (a terminal, pipe, device, directory or symbolic
/// link), and an existing file unless `force`; with `force` the file is replaced atomically by a
/// new one of mode 0600.
fn write_private_file(path: &Path, contents: &[u8], force: bool) -> Result<(), JoinError> {
    let shown = path.display().to_string();
    let refused = |problem: &str| JoinError::OutRefused {
        path: shown.clone(),
        problem: problem.to_string(),
    };
    let failed = |source| JoinError::OutFailed {
        path: shown.clone(),
        source,
    };
    if path.as_os_str() == "-" {
        return Err(refused(
            "is standard output, and the Secret holds the private key, which is never printed; name a file",
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => {
            return Err(refused(
                "is not a regular file (a terminal, pipe, device, directory or symbolic link); name a new file",
            ))
        }
        Ok(_) if !force => {
            return Err(refused(
                "exists; name another file, or pass --force to replace it",
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    if !force {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    refused("exists; name another file, or pass --force to replace it")
                }
                _ => failed(e),
            })?;
        return file
            .write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(failed);
    }
    let name = path
        .file_name()
        .ok_or_else(|| refused("names no file; name a file"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".meshctl-{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        // The temporary file may hold the key: never leave it behind.
        let _ = std::fs::remove_file(&temp);
        return Err(failed(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Fixture {
        dir: tempfile::TempDir,
        key: PrivateKey,
        key_path: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate();
        let key_path = dir.path().join("m1.key");
        std::fs::write(&key_path, format!("{}\n", key.to_base64().as_str())).unwrap();
        std::fs::set_permissions(
            &key_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Fixture { dir, key, key_path }
    }

    fn m1_args(fx: &Fixture) -> StanzaArgs {
        StanzaArgs {
            private_key_file: Some(fx.key_path.clone()),
            cluster: Some("m1".into()),
            endpoint: vec!["192.0.2.1:51820".into()],
            local_cidrs: vec!["10.244.0.0/16".into(), "10.96.0.0/16".into()],
            tunnel_address: Some("100.64.0.1/24".into()),
            persistent_keepalive: Some(25),
            ..StanzaArgs::default()
        }
    }

    fn cidrs(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn refused(args: &StanzaArgs) -> String {
        peer_stanza(args)
            .expect_err("the stanza should be refused")
            .to_string()
    }

    #[test]
    fn stanza_from_flags_describes_this_cluster() {
        let fx = fixture();
        let (stanza, notes) = peer_stanza(&m1_args(&fx)).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            stanza,
            PeerStanza {
                name: "m1".into(),
                public_key: fx.key.public_key(),
                endpoints: vec!["192.0.2.1:51820".into()],
                allowed_cidrs: cidrs(&["10.244.0.0/16", "10.96.0.0/16", "100.64.0.1/32"]),
                tunnel_address: Some("100.64.0.1".parse().unwrap()),
                persistent_keepalive: Some(25),
            }
        );
        let text = stanza.to_toml();
        let expected = format!(
            "# Cluster m1's meshd gateway: add this table to the other cluster's meshd.toml.\n\
             [[peers]]\n\
             name = \"m1\"\n\
             public_key = \"{}\"\n\
             endpoint = \"192.0.2.1:51820\"\n\
             allowed_cidrs = [\"10.244.0.0/16\", \"10.96.0.0/16\", \"100.64.0.1/32\"]\n\
             tunnel_address = \"100.64.0.1\"\n\
             persistent_keepalive = 25\n",
            fx.key.public_key()
        );
        assert_eq!(text, expected);
        assert!(!text.contains(fx.key.to_base64().as_str()));
    }

    #[test]
    fn a_cluster_with_global_ranges_hands_out_the_global_ones() {
        let fx = fixture();
        let args = StanzaArgs {
            global_cidrs: vec![
                "10.244.0.0/16=100.81.0.0/16".into(),
                "10.96.0.0/16=100.91.0.0/16".into(),
            ],
            ..m1_args(&fx)
        };
        let (stanza, notes) = peer_stanza(&args).unwrap();
        assert_eq!(
            stanza.allowed_cidrs,
            cidrs(&["100.81.0.0/16", "100.91.0.0/16", "100.64.0.1/32"])
        );
        assert_eq!(stanza.tunnel_address, Some("100.64.0.1".parse().unwrap()));
        assert!(
            notes[0].contains("10.244.0.0/16=100.81.0.0/16"),
            "{notes:?}"
        );
        // A mapping of a range the cluster does not have is refused, naming the flag.
        let args = StanzaArgs {
            global_cidrs: vec!["10.250.0.0/16=100.81.0.0/16".into()],
            ..m1_args(&fx)
        };
        let e = refused(&args);
        assert!(
            e.contains("--global-cidr") && e.contains("not one of local_cidrs"),
            "{e}"
        );
    }

    #[test]
    fn two_endpoints_make_an_endpoints_list_for_gateway_candidates() {
        let fx = fixture();
        let args = StanzaArgs {
            endpoint: vec!["192.0.2.1:51820".into(), "192.0.2.11:51820".into()],
            ..m1_args(&fx)
        };
        let (stanza, _) = peer_stanza(&args).unwrap();
        let text = stanza.to_toml();
        assert!(
            text.contains("endpoints = [\"192.0.2.1:51820\", \"192.0.2.11:51820\"]\n")
                && !text.contains("endpoint = "),
            "{text}"
        );
        // The other cluster's meshd reads it as both endpoints, in order.
        let file: meshd::config::ConfigFile = toml::from_str(&text).unwrap();
        assert_eq!(file.peers[0].endpoints.len(), 2);
    }

    #[test]
    fn stanza_reads_defaults_from_the_config_and_flags_win() {
        let fx = fixture();
        let config = fx.dir.path().join("meshd.toml");
        std::fs::write(
            &config,
            format!(
                "cluster = \"m1\"\nprivate_key_file = \"{}\"\nlocal_cidrs = [\"10.244.0.0/16\"]\ntunnel_address = \"fd00:64::1/64\"\n",
                fx.key_path.display()
            ),
        )
        .unwrap();
        let args = StanzaArgs {
            config: Some(config.clone()),
            endpoint: vec!["[2001:db8::1]:51820".into()],
            ..StanzaArgs::default()
        };
        let (stanza, _) = peer_stanza(&args).unwrap();
        assert_eq!(stanza.name, "m1");
        assert_eq!(stanza.public_key, fx.key.public_key());
        assert_eq!(
            stanza.allowed_cidrs,
            cidrs(&["10.244.0.0/16", "fd00:64::1/128"])
        );
        let args = StanzaArgs {
            cluster: Some("edge".into()),
            local_cidrs: vec!["10.250.0.0/16".into()],
            ..args
        };
        let (stanza, _) = peer_stanza(&args).unwrap();
        assert_eq!(stanza.name, "edge");
        assert_eq!(
            stanza.allowed_cidrs,
            cidrs(&["10.250.0.0/16", "fd00:64::1/128"])
        );
    }

    #[test]
    fn a_tunnel_address_inside_the_cidrs_adds_no_route_and_none_is_noted() {
        let fx = fixture();
        let args = StanzaArgs {
            tunnel_address: Some("10.244.255.1/24".into()),
            ..m1_args(&fx)
        };
        let (stanza, _) = peer_stanza(&args).unwrap();
        assert_eq!(
            stanza.allowed_cidrs,
            cidrs(&["10.244.0.0/16", "10.96.0.0/16"])
        );
        assert_eq!(stanza.tunnel_address, Some("10.244.255.1".parse().unwrap()));
        let args = StanzaArgs {
            tunnel_address: None,
            endpoint: Vec::new(),
            no_endpoint: true,
            persistent_keepalive: Some(0),
            ..m1_args(&fx)
        };
        let (stanza, notes) = peer_stanza(&args).unwrap();
        assert_eq!(stanza.tunnel_address, None);
        assert!(stanza.endpoints.is_empty());
        assert_eq!(stanza.persistent_keepalive, None);
        assert_eq!(notes.len(), 2, "{notes:?}");
        let text = stanza.to_toml();
        assert!(!text.contains("endpoint"), "{text}");
        assert!(!text.contains("tunnel_address"), "{text}");
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        let fx = fixture();
        let cases: Vec<(StanzaArgs, &str)> = vec![
            (
                StanzaArgs {
                    local_cidrs: vec!["10.244.0.0/33".into()],
                    ..m1_args(&fx)
                },
                "--local-cidr: '10.244.0.0/33' is not a CIDR",
            ),
            (
                StanzaArgs {
                    local_cidrs: vec!["10.244.1.0/16".into()],
                    ..m1_args(&fx)
                },
                "--local-cidr: '10.244.1.0/16' has host bits set; did you mean 10.244.0.0/16?",
            ),
            (
                StanzaArgs {
                    tunnel_address: Some("100.64.0.1".into()),
                    ..m1_args(&fx)
                },
                "--tunnel-address: '100.64.0.1' is not an address with prefix",
            ),
            (
                StanzaArgs {
                    cluster: Some("m 1".into()),
                    ..m1_args(&fx)
                },
                "--cluster: 'm 1' must be a non-empty name without spaces",
            ),
            (
                StanzaArgs {
                    endpoint: vec!["192.0.2.1".into()],
                    ..m1_args(&fx)
                },
                "--endpoint: '192.0.2.1' is not a reachable host:port",
            ),
            (
                StanzaArgs {
                    endpoint: Vec::new(),
                    ..m1_args(&fx)
                },
                "--endpoint: missing",
            ),
            (
                StanzaArgs {
                    cluster: None,
                    ..m1_args(&fx)
                },
                "--cluster: missing",
            ),
            (
                StanzaArgs {
                    local_cidrs: vec![],
                    ..m1_args(&fx)
                },
                "--local-cidr: missing",
            ),
            (
                StanzaArgs {
                    private_key_file: None,
                    ..m1_args(&fx)
                },
                "--private-key-file: missing",
            ),
            (
                StanzaArgs {
                    private_key_file: Some("/nonexistent/m1.key".into()),
                    ..m1_args(&fx)
                },
                "--private-key-file: cannot read the private key from /nonexistent/m1.key",
            ),
        ];
        for (args, expected) in cases {
            let text = refused(&args);
            assert!(
                text.starts_with(expected),
                "expected '{expected}', got: {text}"
            );
        }
    }

    #[test]
    fn config_errors_name_the_file_and_field() {
        let fx = fixture();
        let config = fx.dir.path().join("meshd.toml");
        std::fs::write(
            &config,
            "cluster = \"m1\"\nprivate_key_file = \"/etc/meshd/absent.key\"\nlocal_cidrs = [\"10.244.0.0/33\"]\n",
        )
        .unwrap();
        let args = StanzaArgs {
            config: Some(config.clone()),
            endpoint: vec!["192.0.2.1:51820".into()],
            ..StanzaArgs::default()
        };
        let text = refused(&args);
        assert!(
            text.starts_with(&format!(
                "{}: private_key_file (not on this machine? give the key with --private-key-file): cannot read the private key from /etc/meshd/absent.key",
                config.display()
            )),
            "{text}"
        );
        let args = StanzaArgs {
            private_key_file: Some(fx.key_path.clone()),
            ..args
        };
        let text = refused(&args);
        assert!(
            text.starts_with(&format!(
                "{}: local_cidrs[0]: '10.244.0.0/33' is not a CIDR",
                config.display()
            )),
            "{text}"
        );
        let args = StanzaArgs {
            config: Some(fx.dir.path().join("absent.toml")),
            ..args
        };
        assert!(refused(&args).contains("absent.toml"));
    }

    #[test]
    fn a_configmap_manifest_gives_its_meshd_toml_entry() {
        let literal = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: meshd-config\ndata:\n  meshd.toml: |\n    cluster = \"m1\"\n\n    [[peers]]\n      name = \"m2\"\n  other: x\n";
        assert_eq!(
            configmap_block(literal).unwrap(),
            "cluster = \"m1\"\n\n[[peers]]\n  name = \"m2\"\n"
        );
        // What a hand-written parser of literal blocks got wrong: a quoted key and a quoted
        // value, an indentation indicator, and a ConfigMap after other documents.
        let quoted = "kind: ConfigMap\napiVersion: v1\ndata:\n  \"meshd.toml\": \"cluster = \\\"m1\\\"\\n\"\n";
        assert_eq!(configmap_block(quoted).unwrap(), "cluster = \"m1\"\n");
        let indicator = "kind: ConfigMap\napiVersion: v1\ndata:\n  meshd.toml: |2\n      indented = 1\n    cluster = \"m1\"\n";
        assert_eq!(
            configmap_block(indicator).unwrap(),
            "  indented = 1\ncluster = \"m1\"\n"
        );
        let several = format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: meshd\n---\n{literal}"
        );
        assert!(configmap_block(&several)
            .unwrap()
            .starts_with("cluster = \"m1\""));

        let none =
            configmap_block("kind: ConfigMap\napiVersion: v1\ndata:\n  other: x\n").unwrap_err();
        assert!(
            none.contains("no ConfigMap with a `meshd.toml` entry"),
            "{none}"
        );
        let two = configmap_block(&format!(
            "{literal}---\n{}",
            literal.replace("meshd-config", "other")
        ))
        .unwrap_err();
        assert!(
            two.contains("2 ConfigMaps") && two.contains("meshd-config, other"),
            "{two}"
        );
        let broken = configmap_block("kind: ConfigMap\ndata: [unclosed\n").unwrap_err();
        assert!(
            broken.starts_with("document 1 is not valid YAML"),
            "{broken}"
        );
    }

    #[test]
    fn check_config_reads_the_overlays_with_a_local_key() {
        let fx = fixture();
        let overlay =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/overlays/m2/meshd-config.yaml");
        let config = check_config(&CheckConfigArgs {
            config: overlay.clone(),
            private_key_file: Some(fx.key_path.clone()),
        })
        .unwrap();
        assert_eq!(config.cluster, "m2");
        assert_eq!(config.private_key.as_ref(), Some(&fx.key));
        let text = describe(&config);
        assert!(
            text.starts_with(&format!("cluster m2 (public key {})", fx.key.public_key())),
            "{text}"
        );
        assert!(text.contains("\npeer m1 (public key "), "{text}");
        let err = check_config(&CheckConfigArgs {
            config: overlay,
            private_key_file: None,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("meshd-config.yaml: private_key_file (not on this machine? give the key with --private-key-file): cannot read the private key from /etc/meshd/private.key"), "{err}");
    }

    #[test]
    fn the_secret_manifest_holds_the_key_file_for_the_daemonset() {
        let key = PrivateKey::generate();
        let text = secret_manifest(&key, "meshd-system");
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("  private.key: "))
            .expect("a private.key entry");
        let decoded = String::from_utf8(STANDARD.decode(data).unwrap()).unwrap();
        assert_eq!(decoded, format!("{}\n", key.to_base64().as_str()));
        assert!(text.contains("\n  name: meshd-key\n  namespace: meshd-system\n"));
        assert!(text.contains(&key.public_key().to_base64()));
        assert!(!text.contains(key.to_base64().as_str()));
    }

    #[test]
    fn the_secret_file_is_private_and_never_overwritten_by_accident() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.yaml");
        write_private_file(&path, b"one", false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = write_private_file(&path, b"two", false).unwrap_err();
        assert!(err.to_string().contains("pass --force"), "{err}");
        assert_eq!(err.exit_code(), EXIT_USAGE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"two", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_secret_is_never_written_to_stdout_a_device_or_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link.yaml");
        std::os::unix::fs::symlink(dir.path().join("target.yaml"), &link).unwrap();
        for (path, force) in [
            (Path::new("-"), false),
            (Path::new("/dev/null"), true),
            (Path::new("/dev/stdout"), true),
            (dir.path(), true),
            (link.as_path(), true),
        ] {
            let err = write_private_file(path, b"secret", force).unwrap_err();
            assert_eq!(err.exit_code(), EXIT_USAGE, "{err}");
            assert!(err.to_string().starts_with("--out "), "{err}");
        }
        assert!(!dir.path().join("target.yaml").exists());
        let err =
            write_private_file(&dir.path().join("absent/secret.yaml"), b"x", false).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_FAILED, "{err}");
    }

    #[test]
    fn namespaces_and_shell_words_are_checked() {
        assert!(valid_namespace("meshd-system"));
        for bad in ["", "-a", "a-", "Meshd", "a_b", &"a".repeat(64)] {
            assert!(!valid_namespace(bad), "{bad}");
        }
        assert_eq!(shell_word("m1-secret.yaml"), "m1-secret.yaml");
        assert_eq!(shell_word("my secret's.yaml"), r"'my secret'\''s.yaml'");
    }
}
