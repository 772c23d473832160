//! Edge secrets at rest: only a salted SHA-256 is kept, compared in constant time.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A salted hash of an edge secret, written as `sha256:<salt hex>:<hash hex>`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct StoredSecret {
    salt: [u8; 16],
    hash: [u8; 32],
}

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredSecret(<hash>)")
    }
}

fn digest(salt: &[u8; 16], secret: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(secret.as_bytes());
    hasher.finalize().into()
}

impl StoredSecret {
    /// Hashes `secret` with a fresh random salt.
    pub(crate) fn new(secret: &str) -> Self {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        Self {
            hash: digest(&salt, secret),
            salt,
        }
    }

    /// Whether `secret` is the one hashed, in time independent of where they differ.
    pub(crate) fn matches(&self, secret: &str) -> bool {
        digest(&self.salt, secret).ct_eq(&self.hash).into()
    }

    /// The text form kept in the state file.
    pub(crate) fn encode(&self) -> String {
        format!(
            "sha256:{}:{}",
            hex::encode(self.salt),
            hex::encode(self.hash)
        )
    }

    /// Reads the text form.
    pub(crate) fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let (Some("sha256"), Some(salt), Some(hash), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(Self {
            salt: hex::decode(salt).ok()?.try_into().ok()?,
            hash: hex::decode(hash).ok()?.try_into().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_secret_and_round_trips() {
        let stored = StoredSecret::new("s3cr3t");
        assert!(stored.matches("s3cr3t"));
        assert!(!stored.matches("s3cr3"));
        let text = stored.encode();
        assert!(!text.contains("s3cr3t"));
        assert_eq!(StoredSecret::decode(&text), Some(stored.clone()));
        assert_ne!(StoredSecret::new("s3cr3t"), stored, "salted");
        for bad in [
            "",
            "md5:00:00",
            "sha256:zz:00",
            "sha256:00:00",
            "sha256:a:b:c",
        ] {
            assert_eq!(StoredSecret::decode(bad), None, "{bad}");
        }
    }
}
