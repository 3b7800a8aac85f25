//! The audit HMAC key: hashes identifiers that are themselves sensitive
//! before they enter the log (as Vault's `audit-hash`), so the log never
//! holds them but an operator holding the daemon can still look one up
//! (`keyseal audit hash VALUE`).
//!
//! The key is a sealed singleton of the secret store (kind `audit`, name
//! `hmac-key`): 32 random bytes, wrapped by the root, covered by root
//! rotation.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secrets::{SecretStore, SecretsError};

/// Sealed-singleton kind and name of the audit HMAC key.
pub const HMAC_KEY_KIND: &str = "audit";
pub const HMAC_KEY_NAME: &str = "hmac-key";
/// Prefix of every hashed value.
pub const HASH_PREFIX: &str = "hmac-sha256:";

/// The audit HMAC key. `Debug` prints a mask.
#[derive(Clone)]
pub struct AuditKey(Zeroizing<Vec<u8>>);

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey(***)")
    }
}

impl AuditKey {
    /// Opens the store's audit key, creating it on first use.
    pub fn load_or_create(secrets: &SecretStore) -> Result<AuditKey, SecretsError> {
        let v = secrets.open_or_create_value(HMAC_KEY_KIND, HMAC_KEY_NAME, || {
            let mut k = Zeroizing::new(vec![0u8; 32]);
            rand::rngs::OsRng.fill_bytes(&mut k);
            k
        })?;
        Ok(AuditKey(v))
    }

    /// A key from raw bytes (tests, tools).
    pub fn from_bytes(bytes: &[u8]) -> AuditKey {
        AuditKey(Zeroizing::new(bytes.to_vec()))
    }

    /// `hmac-sha256:<lowercase hex of HMAC-SHA256(key, value)>`.
    pub fn hash(&self, value: &[u8]) -> String {
        // HMAC accepts keys of any length; the error branch cannot happen.
        let tag = match <Hmac<Sha256> as Mac>::new_from_slice(&self.0) {
            Ok(mut m) => {
                m.update(value);
                m.finalize().into_bytes().to_vec()
            }
            Err(_) => Vec::new(),
        };
        format!("{HASH_PREFIX}{}", hex::encode(tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_test_case_2() {
        let k = AuditKey::from_bytes(b"Jefe");
        assert_eq!(
            k.hash(b"what do ya want for nothing?"),
            "hmac-sha256:5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(format!("{k:?}"), "AuditKey(***)");
    }
}
