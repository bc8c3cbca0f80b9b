//! This agent's identity: its name and Ed25519 signing key, kept in
//! `<data_dir>/identity.key` (readable by the owner only), and the parsing of the
//! public keys peers register.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// Failures of loading or creating the identity.
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

    /// Signs `content` (what [`Webhook`](super::Webhook) puts together).
    pub(crate) fn sign(&self, content: &[u8]) -> Signature {
        self.key.sign(content)
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

/// Parses a base64 Ed25519 public key.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    // Standard Webhooks writes public keys with a `whpk_` prefix.
    let text = text.trim();
    let text = text.strip_prefix("whpk_").unwrap_or(text);
    let bytes = BASE64
        .decode(text)
        .map_err(|_| "the public key is not base64".to_owned())?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "an Ed25519 public key is 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid Ed25519 public key".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_persists_and_keys_parse_only_when_valid() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(dir.path(), "a").unwrap();
        let again = Identity::load_or_create(dir.path(), "a").unwrap();
        assert_eq!(first.public_key(), again.public_key());
        assert!(parse_public_key(&first.public_key()).is_ok());
        assert!(parse_public_key("not base64!").is_err());
        assert!(parse_public_key(&BASE64.encode([1u8; 31])).is_err());
        std::fs::write(dir.path().join("identity.key"), "zz").unwrap();
        assert!(matches!(
            Identity::load_or_create(dir.path(), "a"),
            Err(IdentityError::Corrupt(_))
        ));
    }
}
