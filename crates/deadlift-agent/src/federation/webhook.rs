//! The signed headers of one delivery between agents, in the manner of Standard
//! Webhooks: `webhook-id`, `webhook-timestamp` (Unix seconds), `webhook-signature`
//! (`v1a,<base64 Ed25519 signature over "id.timestamp.body">`, several may be given,
//! space-separated) and `deadlift-peer` (the sending agent's name, which picks the key
//! to verify with). The deliverer builds them with [`Webhook::sign`]; the receiving
//! route reads them with [`Webhook::from_headers`] and the federation checks them with
//! [`Webhook::check_time`] and [`Webhook::verify`]. One type, so both sides agree.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

use super::{FederationError, Identity};

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";
/// The header naming the sending agent.
pub const PEER_HEADER: &str = "deadlift-peer";
/// How far a delivery's timestamp may be from our clock.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// The signature scheme's prefix: asymmetric (Ed25519), version 1.
const SCHEME: &str = "v1a,";

/// The signed headers of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// The sending agent's name.
    pub sender: String,
    /// The event id, or a batch's id.
    pub id: String,
    /// When it was signed, in Unix seconds.
    pub timestamp: i64,
    /// One or more `v1a,<base64>` signatures, space-separated.
    pub signature: String,
}

impl Webhook {
    /// Signs a delivery of `body` as `identity`.
    pub fn sign(identity: &Identity, id: String, timestamp: i64, body: &[u8]) -> Self {
        let signature = identity.sign(&signed_content(&id, timestamp, body));
        Self {
            sender: identity.name.clone(),
            id,
            timestamp,
            signature: format!("{SCHEME}{}", BASE64.encode(signature.to_bytes())),
        }
    }

    /// The headers to send, by name.
    pub fn headers(&self) -> [(&'static str, String); 4] {
        [
            (PEER_HEADER, self.sender.clone()),
            (ID_HEADER, self.id.clone()),
            (TIMESTAMP_HEADER, self.timestamp.to_string()),
            (SIGNATURE_HEADER, self.signature.clone()),
        ]
    }

    /// Reads the headers of a received delivery; `header` answers a header's value
    /// by name.
    pub fn from_headers<'a>(
        header: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Self, FederationError> {
        let sender = header(PEER_HEADER).ok_or_else(|| {
            FederationError::PeerUnknown(format!("the {PEER_HEADER} header is missing"))
        })?;
        let (Some(id), Some(timestamp), Some(signature)) = (
            header(ID_HEADER),
            header(TIMESTAMP_HEADER),
            header(SIGNATURE_HEADER),
        ) else {
            return Err(FederationError::SignatureInvalid(format!(
                "{ID_HEADER}, {TIMESTAMP_HEADER} and {SIGNATURE_HEADER} are required"
            )));
        };
        let timestamp = timestamp.trim().parse().map_err(|_| {
            FederationError::SignatureInvalid(format!("{TIMESTAMP_HEADER} is not a number"))
        })?;
        Ok(Self {
            sender: sender.to_owned(),
            id: id.to_owned(),
            timestamp,
            signature: signature.to_owned(),
        })
    }

    /// Refuses a timestamp further than the tolerance from `now_secs` (a replayed or
    /// badly delayed delivery). Timestamps at the ends of the `i64` range cannot
    /// overflow the check.
    pub fn check_time(&self, now_secs: i64) -> Result<(), FederationError> {
        let fresh = now_secs
            .checked_sub(self.timestamp)
            .is_some_and(|skew| skew.unsigned_abs() <= TIMESTAMP_TOLERANCE_SECS.unsigned_abs());
        if fresh {
            Ok(())
        } else {
            Err(FederationError::SignatureExpired(format!(
                "{TIMESTAMP_HEADER} is more than {TIMESTAMP_TOLERANCE_SECS} s from this agent's clock"
            )))
        }
    }

    /// Whether any of the signatures verifies for `body` with `key`.
    pub fn verify(&self, key: &VerifyingKey, body: &[u8]) -> bool {
        let content = signed_content(&self.id, self.timestamp, body);
        self.signature.split(' ').any(|entry| {
            let Some(encoded) = entry.strip_prefix(SCHEME) else {
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
}

/// What is signed: `id.timestamp.body`.
fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    content
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::parse_public_key;

    fn identity(name: &str) -> (tempfile::TempDir, Identity) {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::load_or_create(dir.path(), name).unwrap();
        (dir, identity)
    }

    #[test]
    fn a_signature_verifies_only_for_the_same_id_time_and_body() {
        let (_dir, me) = identity("a");
        let key = parse_public_key(&me.public_key()).unwrap();
        let signed = Webhook::sign(&me, "evt_1".into(), 1_700_000_000, b"{}");
        assert!(signed.verify(&key, b"{}"));
        assert!(!signed.verify(&key, b"{ }"));
        let other_id = Webhook {
            id: "evt_2".into(),
            ..signed.clone()
        };
        assert!(!other_id.verify(&key, b"{}"));
        let other_time = Webhook {
            timestamp: 1_700_000_001,
            ..signed.clone()
        };
        assert!(!other_time.verify(&key, b"{}"));
        let several = Webhook {
            signature: format!("v1a,AAAA {}", signed.signature),
            ..signed.clone()
        };
        assert!(several.verify(&key, b"{}"));
        let (_other_dir, other) = identity("b");
        let other_key = parse_public_key(&other.public_key()).unwrap();
        assert!(!signed.verify(&other_key, b"{}"));
    }

    #[test]
    fn headers_read_back_as_they_were_sent() {
        let (_dir, me) = identity("payments");
        let signed = Webhook::sign(&me, "evt_1".into(), 1_700_000_000, b"{}");
        let headers = signed.headers();
        let read = Webhook::from_headers(|name| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        })
        .unwrap();
        assert_eq!(read, signed);
        assert!(matches!(
            Webhook::from_headers(|_| None),
            Err(FederationError::PeerUnknown(_))
        ));
        assert!(matches!(
            Webhook::from_headers(|name| (name == PEER_HEADER).then_some("payments")),
            Err(FederationError::SignatureInvalid(_))
        ));
    }

    /// Issue 11: a `webhook-timestamp` near `i64::MIN` overflowed the skew check.
    #[test]
    fn timestamps_far_off_or_at_the_ends_of_the_range_are_refused() {
        let (_dir, me) = identity("a");
        let at = |timestamp| Webhook::sign(&me, "e".into(), timestamp, b"");
        let now = 1_700_000_000;
        assert!(at(now).check_time(now).is_ok());
        assert!(at(now - TIMESTAMP_TOLERANCE_SECS).check_time(now).is_ok());
        assert!(
            at(now + TIMESTAMP_TOLERANCE_SECS + 1)
                .check_time(now)
                .is_err()
        );
        for extreme in [i64::MIN, i64::MIN + 1, i64::MAX] {
            assert!(at(extreme).check_time(now).is_err(), "{extreme}");
        }
    }
}
