//! Federation between agents: this agent's Ed25519 identity, its peers (other agents,
//! with the subjects that flow each way), the signed delivery of events to them in the
//! manner of Standard Webhooks, and the checks on receipt.
//!
//! A delivery carries `webhook-id` (the event id), `webhook-timestamp` (Unix seconds),
//! `webhook-signature: v1a,<base64 Ed25519 signature over "id.timestamp.body">` and
//! `deadlift-peer` (the sender's agent name, to pick the key to verify with).
//! Peer and outbox SQL lives in `peers.rs`; the delivery loop in `deliver.rs`.

pub mod deliver;
pub mod peers;

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// The header naming the sending agent.
pub const PEER_HEADER: &str = "deadlift-peer";
/// How far a delivery's timestamp may be from our clock.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// Failures of identity and signatures.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write the identity key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the identity key file {0} is not 32 bytes of hex")]
    Corrupt(String),
    #[error("cannot generate a key: {0}")]
    Random(String),
}

/// This agent's name and signing key.
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the key from `<dir>/identity.key`, creating it (readable by the owner only)
    /// at first start.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Self, IdentityError> {
        let path = dir.join("identity.key");
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        let seed = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut seed = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut seed)
                    .map_err(|_| IdentityError::Corrupt(path.display().to_string()))?;
                seed
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
                write_private(&path, &hex::encode(seed)).map_err(io)?;
                seed
            }
            Err(e) => return Err(io(e)),
        };
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The public key, base64 (what peers register).
    pub fn public_key(&self) -> String {
        BASE64.encode(self.key.verifying_key().to_bytes())
    }

    /// The `webhook-signature` value for a delivery.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let signature = self.key.sign(&signed_content(id, timestamp, body));
        format!("v1a,{}", BASE64.encode(signature.to_bytes()))
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    content
}

/// Parses a base64 Ed25519 public key.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = BASE64
        .decode(text.trim())
        .map_err(|_| "the public key is not base64".to_owned())?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "an Ed25519 public key is 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid Ed25519 public key".to_owned())
}

/// Checks a `webhook-signature` header (one or more space-separated `v1a,<base64>`)
/// against `key`. True when any signature verifies.
pub fn verify(key: &VerifyingKey, header: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
    let content = signed_content(id, timestamp, body);
    header.split(' ').any(|entry| {
        let Some(encoded) = entry.strip_prefix("v1a,") else {
            return false;
        };
        let Ok(bytes) = BASE64.decode(encoded) else {
            return false;
        };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        key.verify(&content, &Signature::from_bytes(&bytes)).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_and_signatures_verify_only_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(dir.path(), "a").unwrap();
        let again = Identity::load_or_create(dir.path(), "a").unwrap();
        assert_eq!(first.public_key(), again.public_key());
        let key = parse_public_key(&first.public_key()).unwrap();
        let header = first.sign("evt_1", 1_700_000_000, b"{}");
        assert!(verify(&key, &header, "evt_1", 1_700_000_000, b"{}"));
        assert!(!verify(&key, &header, "evt_1", 1_700_000_000, b"{ }"));
        assert!(!verify(&key, &header, "evt_2", 1_700_000_000, b"{}"));
        assert!(!verify(&key, &header, "evt_1", 1_700_000_001, b"{}"));
        assert!(verify(
            &key,
            &format!("v1a,AAAA {header}"),
            "evt_1",
            1_700_000_000,
            b"{}"
        ));
        let other = Identity::load_or_create(tempfile::tempdir().unwrap().path(), "b").unwrap();
        let other_key = parse_public_key(&other.public_key()).unwrap();
        assert!(!verify(&other_key, &header, "evt_1", 1_700_000_000, b"{}"));
        assert!(parse_public_key("not base64!").is_err());
        assert!(parse_public_key(&BASE64.encode([1u8; 31])).is_err());
    }
}
