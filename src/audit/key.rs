//! The audit HMAC key: hashes identifiers that are themselves sensitive
//! before they enter the log (as Vault's `audit-hash`), so the log never
//! holds them but an operator holding the daemon can still look one up
//! (`keyseal audit hash VALUE`).
//!
//! The key is a sealed singleton of the secret store (kind `audit`, name
//! `hmac-key`): 32 random bytes, wrapped by the root, covered by root
//! rotation.

use std::fmt;

use rand::RngCore;
use zeroize::Zeroizing;

use crate::secrets::{SecretStore, SecretsError};

/// Sealed-singleton kind and name of the audit HMAC key.
pub const HMAC_KEY_KIND: &str = "audit";
pub const HMAC_KEY_NAME: &str = "hmac-key";
/// Prefix of every hashed value.
pub const HASH_PREFIX: &str = "hmac-sha256:";

/// The audit HMAC key. `Debug` prints a mask.
///
/// Held as ring's HMAC key (the inner and outer hash states computed once),
/// as the API-key pepper is: every proxied request hashes its path, and
/// computing those states per call (`hmac::Hmac::new_from_slice`) plus the
/// portable SHA-256 was ~3% of keyseald's samples under gateway load.
/// ring does not zeroize the key's states when it is dropped (neither
/// the pepper's); this key lives as long as the audit log, i.e. the
/// process, which is non-dumpable with core dumps off.
#[derive(Clone)]
pub struct AuditKey(ring::hmac::Key);

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
        Ok(AuditKey::from_bytes(&v))
    }

    /// A key from raw bytes (tests, tools).
    pub fn from_bytes(bytes: &[u8]) -> AuditKey {
        AuditKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes))
    }

    /// `hmac-sha256:<lowercase hex of HMAC-SHA256(key, value)>`.
    pub fn hash(&self, value: &[u8]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let tag = ring::hmac::sign(&self.0, value);
        let mut s = String::with_capacity(HASH_PREFIX.len() + 2 * tag.as_ref().len());
        s.push_str(HASH_PREFIX);
        for b in tag.as_ref() {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
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
        // RFC 4231 test case 6: a key longer than the block size.
        let k = AuditKey::from_bytes(&[0xaa; 131]);
        assert_eq!(
            k.hash(b"Test Using Larger Than Block-Size Key - Hash Key First"),
            "hmac-sha256:60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }
}
