//! Named signing keys held in the root device: create, versions (rotate:
//! a new version signs, old versions still verify until disabled), sign a
//! message or a prehashed SHA-256 digest, verify (in software, against the
//! stored public key), public keys as PEM SPKI and JWK, and short-lived JWTs.
//!
//! Records live in the sled tree `keys` (name -> [`KeyRecord`]); the private
//! halves never leave the device: a record holds only the device reference
//! and the public key.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::name::{NameError, SecretName};
use crate::root::{RootError, RootOfTrust, SignAlg, SigningKeyRef};
use crate::store::{decode, encode, StoreError};

/// State of one key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyVersionState {
    /// Verifies; signs when it is the current version.
    Enabled,
    /// Neither signs nor verifies.
    Disabled,
}

/// One version of a named key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    pub version: u32,
    pub key_ref: SigningKeyRef,
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    pub state: KeyVersionState,
    pub created_at: u64,
}

/// A named key and its versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub name: String,
    pub alg: SignAlg,
    pub created_at: u64,
    pub created_by: String,
    /// The version that signs.
    pub current: u32,
    pub versions: Vec<KeyVersion>,
}

/// What to sign or verify.
#[derive(Debug, Clone, Copy)]
pub enum SignInput<'a> {
    Message(&'a [u8]),
    /// A SHA-256 digest (32 bytes), for ECDSA and RSA-PSS keys.
    Sha256Digest(&'a [u8]),
}

/// Errors of the keys layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    #[error("invalid key name: {0}")]
    InvalidName(#[from] NameError),
    #[error("key not found")]
    NotFound,
    #[error("key version {0} not found")]
    VersionNotFound(u32),
    #[error("key already exists")]
    Exists,
    #[error("key version {0} is disabled")]
    Disabled(u32),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Root(#[from] RootError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for KeysError {
    fn from(e: sled::Error) -> Self {
        KeysError::Store(e.into())
    }
}

/// The key registry.
pub struct Keys {
    root: Arc<dyn RootOfTrust>,
    db: sled::Db,
    tree: sled::Tree,
    /// The store's free-space guard, asked before every change.
    disk: Arc<crate::store::DiskGuard>,
    /// Serialises changes to records (creation, rotation, state changes).
    write: Mutex<()>,
}

fn device_label(name: &str, version: u32) -> String {
    let mut r = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut r);
    format!("keyseal-key:{name}:v{version}:{}", hex::encode(r))
}

impl Keys {
    /// Opens the registry in the store's database.
    pub fn open(
        root: Arc<dyn RootOfTrust>,
        store: &crate::store::Store,
    ) -> Result<Keys, KeysError> {
        let db = store.db.clone();
        Ok(Keys {
            tree: db.open_tree("keys")?,
            disk: store.disk.clone(),
            db,
            root,
            write: Mutex::new(()),
        })
    }

    fn load(&self, name: &str) -> Result<KeyRecord, KeysError> {
        match self.tree.get(name.as_bytes())? {
            Some(b) => Ok(decode("keys", &b)?),
            None => Err(KeysError::NotFound),
        }
    }

    fn save(&self, rec: &KeyRecord) -> Result<(), KeysError> {
        self.tree.insert(rec.name.as_bytes(), encode(rec)?)?;
        self.db.flush()?;
        Ok(())
    }

    fn new_version(
        &self,
        name: &str,
        alg: SignAlg,
        version: u32,
        now: u64,
    ) -> Result<KeyVersion, KeysError> {
        let key_ref = self
            .root
            .create_signing_key(&device_label(name, version), alg)?;
        let spki = match self.root.public_key_spki(&key_ref) {
            Ok(s) => s,
            Err(e) => {
                // Do not leave a half-made key on the device.
                let _ = self.root.destroy_signing_key(&key_ref);
                return Err(e.into());
            }
        };
        Ok(KeyVersion {
            version,
            key_ref,
            spki,
            state: KeyVersionState::Enabled,
            created_at: now,
        })
    }

    /// Creates key `name` (version 1) on the device.
    pub fn create(
        &self,
        name: &SecretName,
        alg: SignAlg,
        actor: &str,
        now: u64,
    ) -> Result<KeyRecord, KeysError> {
        let _w = self.write.lock();
        self.disk.check_write()?;
        if self.tree.contains_key(name.as_str().as_bytes())? {
            return Err(KeysError::Exists);
        }
        let v = self.new_version(name.as_str(), alg, 1, now)?;
        let rec = KeyRecord {
            name: name.as_str().to_owned(),
            alg,
            created_at: now,
            created_by: actor.to_owned(),
            current: 1,
            versions: vec![v],
        };
        if let Err(e) = self.save(&rec) {
            let _ = self.root.destroy_signing_key(&rec.versions[0].key_ref);
            return Err(e);
        }
        Ok(rec)
    }

    /// The record of `name`.
    pub fn get(&self, name: &SecretName) -> Result<KeyRecord, KeysError> {
        self.load(name.as_str())
    }

    /// Keys whose name starts with `prefix`.
    pub fn list(&self, prefix: &str) -> Result<Vec<KeyRecord>, KeysError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(prefix.as_bytes()) {
            let (_, v) = kv?;
            out.push(decode("keys", &v)?);
        }
        Ok(out)
    }

    /// Adds a new version that becomes the signing version.
    pub fn rotate(&self, name: &SecretName, now: u64) -> Result<KeyRecord, KeysError> {
        let _w = self.write.lock();
        self.disk.check_write()?;
        let mut rec = self.load(name.as_str())?;
        let next = rec.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let v = self.new_version(&rec.name, rec.alg, next, now)?;
        let key_ref = v.key_ref.clone();
        rec.versions.push(v);
        rec.current = next;
        if let Err(e) = self.save(&rec) {
            let _ = self.root.destroy_signing_key(&key_ref);
            return Err(e);
        }
        Ok(rec)
    }

    /// Disables (or re-enables) one version. The current version cannot be
    /// disabled: rotate first.
    pub fn set_enabled(
        &self,
        name: &SecretName,
        version: u32,
        enabled: bool,
    ) -> Result<KeyRecord, KeysError> {
        let _w = self.write.lock();
        self.disk.check_write()?;
        let mut rec = self.load(name.as_str())?;
        if !enabled && version == rec.current {
            return Err(KeysError::InvalidArgument(format!(
                "version {version} is the signing version; rotate the key before disabling it"
            )));
        }
        let v = rec
            .versions
            .iter_mut()
            .find(|v| v.version == version)
            .ok_or(KeysError::VersionNotFound(version))?;
        v.state = if enabled {
            KeyVersionState::Enabled
        } else {
            KeyVersionState::Disabled
        };
        self.save(&rec)?;
        Ok(rec)
    }

    /// Destroys the key: every version's private key on the device, then the record.
    pub fn destroy(&self, name: &SecretName) -> Result<(), KeysError> {
        let _w = self.write.lock();
        self.disk.check_write()?;
        let rec = self.load(name.as_str())?;
        for v in &rec.versions {
            self.root.destroy_signing_key(&v.key_ref)?;
        }
        self.tree.remove(name.as_str().as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Signs with the current version; returns (version, signature).
    pub fn sign(
        &self,
        name: &SecretName,
        input: SignInput<'_>,
    ) -> Result<(u32, Vec<u8>), KeysError> {
        let rec = self.load(name.as_str())?;
        let v = rec
            .versions
            .iter()
            .find(|v| v.version == rec.current)
            .ok_or(KeysError::VersionNotFound(rec.current))?;
        if v.state == KeyVersionState::Disabled {
            return Err(KeysError::Disabled(v.version));
        }
        let sig = match input {
            SignInput::Message(m) => self.root.sign(&v.key_ref, m)?,
            SignInput::Sha256Digest(d) => {
                if d.len() != 32 {
                    return Err(KeysError::InvalidArgument(
                        "a SHA-256 digest is 32 bytes".into(),
                    ));
                }
                if rec.alg == SignAlg::Ed25519 {
                    return Err(KeysError::InvalidArgument(
                        "Ed25519 signs whole messages, not digests".into(),
                    ));
                }
                self.root.sign_digest(&v.key_ref, d)?
            }
        };
        Ok((v.version, sig))
    }

    /// Verifies `signature` over `input` with `version` (or any enabled
    /// version when `None`); returns the version that verified.
    pub fn verify(
        &self,
        name: &SecretName,
        input: SignInput<'_>,
        signature: &[u8],
        version: Option<u32>,
    ) -> Result<Option<u32>, KeysError> {
        let rec = self.load(name.as_str())?;
        for v in &rec.versions {
            if version.is_some_and(|want| want != v.version) || v.state == KeyVersionState::Disabled
            {
                continue;
            }
            if verify_spki(rec.alg, &v.spki, input, signature)? {
                return Ok(Some(v.version));
            }
        }
        if let Some(want) = version {
            if !rec.versions.iter().any(|v| v.version == want) {
                return Err(KeysError::VersionNotFound(want));
            }
        }
        Ok(None)
    }
}

/// Verifies a signature in software against a DER SPKI.
pub fn verify_spki(
    alg: SignAlg,
    spki: &[u8],
    input: SignInput<'_>,
    sig: &[u8],
) -> Result<bool, KeysError> {
    let bad_key = |e: String| {
        KeysError::Store(StoreError::Corrupt {
            tree: "keys",
            reason: format!("public key: {e}"),
        })
    };
    let digest = |input: SignInput<'_>| -> Result<[u8; 32], KeysError> {
        match input {
            SignInput::Message(m) => Ok(Sha256::digest(m).into()),
            SignInput::Sha256Digest(d) => d
                .try_into()
                .map_err(|_| KeysError::InvalidArgument("a SHA-256 digest is 32 bytes".into())),
        }
    };
    match alg {
        SignAlg::EcdsaP256Sha256 => {
            use p256::ecdsa::signature::hazmat::PrehashVerifier;
            use p256::pkcs8::DecodePublicKey;
            let vk = p256::ecdsa::VerifyingKey::from_public_key_der(spki)
                .map_err(|e| bad_key(e.to_string()))?;
            if let SignInput::Message(m) = input {
                // ring's assembly P-256: ~65 µs per verification against
                // p256's ~343 µs here (release). ring has no prehash API,
                // so a digest goes to p256 below.
                let point = vk.to_encoded_point(false);
                return Ok(ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_ASN1,
                    point.as_bytes(),
                )
                .verify(m, sig)
                .is_ok());
            }
            let Ok(s) = p256::ecdsa::Signature::from_der(sig) else {
                return Ok(false);
            };
            Ok(vk.verify_prehash(&digest(input)?, &s).is_ok())
        }
        SignAlg::Ed25519 => {
            use ed25519_dalek::pkcs8::DecodePublicKey;
            use ed25519_dalek::Verifier;
            let SignInput::Message(m) = input else {
                return Err(KeysError::InvalidArgument(
                    "Ed25519 verifies whole messages, not digests".into(),
                ));
            };
            let vk = ed25519_dalek::VerifyingKey::from_public_key_der(spki)
                .map_err(|e| bad_key(e.to_string()))?;
            let Ok(s) = ed25519_dalek::Signature::from_slice(sig) else {
                return Ok(false);
            };
            Ok(vk.verify(m, &s).is_ok())
        }
        SignAlg::RsaPss3072Sha256 => {
            use rsa::pkcs8::DecodePublicKey;
            let pk =
                rsa::RsaPublicKey::from_public_key_der(spki).map_err(|e| bad_key(e.to_string()))?;
            Ok(pk
                .verify(rsa::Pss::new_with_salt::<Sha256>(32), &digest(input)?, sig)
                .is_ok())
        }
    }
}

/// The public key as PEM SPKI.
pub fn spki_pem(spki: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(spki);
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    out
}

/// The `kid` of a key version in JWKs and JWT headers.
pub fn kid(name: &str, version: u32) -> String {
    format!("{name}#v{version}")
}

/// The public key as a JWK (RFC 7517/7518/8037), with `kid`, `alg`, `use`.
pub fn jwk(alg: SignAlg, spki: &[u8], kid: &str) -> Result<serde_json::Value, KeysError> {
    let bad_key = |e: String| {
        KeysError::Store(StoreError::Corrupt {
            tree: "keys",
            reason: format!("public key: {e}"),
        })
    };
    Ok(match alg {
        SignAlg::EcdsaP256Sha256 => {
            use p256::elliptic_curve::sec1::ToEncodedPoint;
            use p256::pkcs8::DecodePublicKey;
            let pk =
                p256::PublicKey::from_public_key_der(spki).map_err(|e| bad_key(e.to_string()))?;
            let pt = pk.to_encoded_point(false);
            let (Some(x), Some(y)) = (pt.x(), pt.y()) else {
                return Err(bad_key("EC point".into()));
            };
            serde_json::json!({"kty": "EC", "crv": "P-256", "x": B64URL.encode(x), "y": B64URL.encode(y),
                "alg": "ES256", "use": "sig", "kid": kid})
        }
        SignAlg::Ed25519 => {
            use ed25519_dalek::pkcs8::DecodePublicKey;
            let vk = ed25519_dalek::VerifyingKey::from_public_key_der(spki)
                .map_err(|e| bad_key(e.to_string()))?;
            serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": B64URL.encode(vk.as_bytes()),
                "alg": "EdDSA", "use": "sig", "kid": kid})
        }
        SignAlg::RsaPss3072Sha256 => {
            use rsa::pkcs8::DecodePublicKey;
            use rsa::traits::PublicKeyParts;
            let pk =
                rsa::RsaPublicKey::from_public_key_der(spki).map_err(|e| bad_key(e.to_string()))?;
            serde_json::json!({"kty": "RSA", "n": B64URL.encode(pk.n().to_bytes_be()),
                "e": B64URL.encode(pk.e().to_bytes_be()), "alg": "PS256", "use": "sig", "kid": kid})
        }
    })
}

/// Claims of a minted token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenClaims {
    pub iss: String,
    pub sub: String,
    pub scope: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    /// The API key id the token was exchanged for.
    pub key_id: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl Keys {
    /// Mints a JWT signed by the current version of key `name`: ES256 for
    /// ECDSA P-256, EdDSA for Ed25519, PS256 for RSA-PSS.
    pub fn mint_jwt(&self, name: &SecretName, claims: &TokenClaims) -> Result<String, KeysError> {
        let rec = self.load(name.as_str())?;
        let alg = match rec.alg {
            SignAlg::EcdsaP256Sha256 => "ES256",
            SignAlg::Ed25519 => "EdDSA",
            SignAlg::RsaPss3072Sha256 => "PS256",
        };
        let header =
            serde_json::json!({"alg": alg, "typ": "JWT", "kid": kid(&rec.name, rec.current)});
        let body =
            serde_json::to_vec(claims).map_err(|e| KeysError::InvalidArgument(e.to_string()))?;
        let signing_input = format!(
            "{}.{}",
            B64URL.encode(header.to_string().as_bytes()),
            B64URL.encode(&body)
        );
        let (_, sig) = self.sign(name, SignInput::Message(signing_input.as_bytes()))?;
        let sig = match rec.alg {
            // JWS wants ECDSA as raw r || s.
            SignAlg::EcdsaP256Sha256 => p256::ecdsa::Signature::from_der(&sig)
                .map_err(|e| {
                    KeysError::Root(RootError::Device(format!(
                        "bad ECDSA signature from device: {e}"
                    )))
                })?
                .to_bytes()
                .to_vec(),
            _ => sig,
        };
        Ok(format!("{signing_input}.{}", B64URL.encode(sig)))
    }

    /// The JWKS (enabled versions) of the given keys.
    pub fn jwks(&self, names: &[SecretName]) -> Result<serde_json::Value, KeysError> {
        let mut keys = Vec::new();
        for n in names {
            let rec = self.load(n.as_str())?;
            for v in rec
                .versions
                .iter()
                .filter(|v| v.state == KeyVersionState::Enabled)
            {
                keys.push(jwk(rec.alg, &v.spki, &kid(&rec.name, v.version))?);
            }
        }
        Ok(serde_json::json!({ "keys": keys }))
    }
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::EncodePublicKey as _;

    use super::*;

    /// ECDSA: a whole message goes through ring, a digest through p256;
    /// both accept the right signature and refuse a wrong one or a wrong
    /// message.
    #[test]
    fn ecdsa_verifies_messages_and_digests() {
        let sk = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
        let spki = sk.verifying_key().to_public_key_der().unwrap();
        let spki = spki.as_bytes();
        let sig: p256::ecdsa::Signature = sk.sign(b"payload");
        let der = sig.to_der();
        let der = der.as_bytes();
        let alg = SignAlg::EcdsaP256Sha256;
        let ok = |input, sig: &[u8]| verify_spki(alg, spki, input, sig).unwrap();
        assert!(ok(SignInput::Message(b"payload"), der));
        assert!(!ok(SignInput::Message(b"payload!"), der));
        let digest: [u8; 32] = Sha256::digest(b"payload").into();
        assert!(ok(SignInput::Sha256Digest(&digest), der));
        let other: [u8; 32] = Sha256::digest(b"other").into();
        assert!(!ok(SignInput::Sha256Digest(&other), der));
        let mut bad = der.to_vec();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        assert!(!ok(SignInput::Message(b"payload"), &bad));
        assert!(!ok(SignInput::Message(b"payload"), b"not DER"));
        assert!(!ok(SignInput::Sha256Digest(&digest), b"not DER"));
    }
}
