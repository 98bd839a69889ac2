//! WireGuard keys in the format `wg genkey` / `wg pubkey` read and write.
//!
//! Owns the conversion between x25519 keys and their text forms (44 characters of standard
//! base64 for files and flags, 64 hex digits for the UAPI). Private keys never leave this module
//! in printable form except through [`PrivateKey::to_base64`], which exists for `meshctl genkey`
//! and is never used for logging: the `Debug` impl prints `(hidden)`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519::{PublicKey as DalekPublic, StaticSecret};
use std::fmt;
use std::path::Path;
use zeroize::Zeroizing;

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is not a WireGuard key: expected 44 characters of base64 encoding 32 bytes (as `wg genkey` and `wg pubkey` write), found {found}")]
    Malformed { what: String, found: String },
    #[error("the private key file {path} is readable by group or others (mode {mode:o}): run `chmod 600 {path}` (in Kubernetes, mount the Secret with mode 0400), then start again")]
    Exposed { path: String, mode: u32 },
    #[error("cannot read {what} from {path}: {source}; create one with `(umask 077; meshctl genkey > {path})`")]
    Unreadable {
        what: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Decodes 32 key bytes from base64, describing the input (never echoing it) on failure.
fn decode_base64(what: &str, text: &str) -> Result<[u8; 32], KeyError> {
    let trimmed = text.trim();
    let bytes = Zeroizing::new(STANDARD.decode(trimmed).map_err(|_| KeyError::Malformed {
        what: what.to_string(),
        found: format!("{} characters that do not decode as base64", trimmed.len()),
    })?);
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Malformed {
        what: what.to_string(),
        found: format!("{} bytes after decoding", bytes.len()),
    })
}

/// Decodes 32 key bytes from the 64 lowercase hex digits the UAPI uses.
pub(crate) fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Encodes key bytes as the 64 lowercase hex digits the UAPI uses.
pub(crate) fn encode_hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A peer's (or our own) public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Parses the base64 form; `what` names the input in the error (e.g. `peers[0].public_key`).
    pub fn from_base64(what: &str, text: &str) -> Result<Self, KeyError> {
        decode_base64(what, text).map(PublicKey)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub(crate) fn to_dalek(self) -> DalekPublic {
        DalekPublic::from(self.0)
    }

    /// The first characters of the base64 form: enough to tell peers apart in logs and names.
    pub fn short(&self) -> String {
        self.to_base64()[..8].to_string()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// Our private key. Zeroed on drop; `Debug` never shows it.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl PrivateKey {
    /// A fresh key from the operating system's random source, clamped as `wg genkey` does.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, bytes.as_mut());
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        PrivateKey(bytes)
    }

    pub fn from_base64(what: &str, text: &str) -> Result<Self, KeyError> {
        decode_base64(what, text).map(|b| PrivateKey(Zeroizing::new(b)))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(Zeroizing::new(bytes))
    }

    /// Reads a key file as `wg genkey` writes it. The file must not be readable by group or
    /// others (a key anyone on the node can read is no secret).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let what = format!("private key file {}", path.display());
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Exposed {
                    path: path.display().to_string(),
                    mode,
                });
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            KeyError::Unreadable {
                what: "the private key".into(),
                path: path.display().to_string(),
                source,
            }
        })?);
        Self::from_base64(&what, &text)
    }

    /// The base64 form, for writing a key file. Never log it.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(*self.0))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(DalekPublic::from(&self.to_dalek()).to_bytes())
    }

    pub(crate) fn to_dalek(&self) -> StaticSecret {
        StaticSecret::from(*self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey((hidden))")
    }
}

/// An optional WireGuard preshared key (post-quantum hedge). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub(crate) Zeroizing<[u8; 32]>);

impl PresharedKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PresharedKey(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey((hidden))")
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        *self.0 == *other.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_clamped_and_round_trip() {
        let key = PrivateKey::generate();
        assert_eq!(key.as_bytes()[0] & 7, 0);
        assert_eq!(key.as_bytes()[31] & 0xc0, 0x40);
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        let back = PrivateKey::from_base64("test", &text).unwrap();
        assert_eq!(back.public_key(), key.public_key());
    }

    #[test]
    fn known_vector_matches_wg_pubkey() {
        // RFC 7748 section 6.1: Alice's private and public key.
        let private = PrivateKey::from_bytes(
            decode_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a").unwrap(),
        );
        assert_eq!(
            encode_hex(private.public_key().as_bytes()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn malformed_keys_name_the_input_and_never_echo_it() {
        let err = PublicKey::from_base64("peers[0].public_key", "not-a-key!").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("peers[0].public_key"), "{text}");
        assert!(!text.contains("not-a-key"), "{text}");
        let short = STANDARD.encode([1u8; 16]);
        let err = PublicKey::from_base64("k", &short).unwrap_err().to_string();
        assert!(err.contains("16 bytes"), "{err}");
    }

    #[test]
    fn debug_hides_private_key() {
        let key = PrivateKey::generate();
        let shown = format!("{key:?}");
        assert!(!shown.contains(key.to_base64().as_str()));
        assert!(shown.contains("hidden"));
    }

    #[test]
    fn hex_round_trip_and_rejects_bad_digits() {
        let bytes = [0xabu8; 32];
        assert_eq!(decode_hex(&encode_hex(&bytes)), Some(bytes));
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex(&"g".repeat(64)), None);
    }
}
