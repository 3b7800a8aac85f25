//! Root of trust: one trait ([`RootOfTrust`]) over a PKCS#11 HSM or a TPM 2.0.
//!
//! Nothing above this module knows which hardware is underneath. The root
//! wraps and unwraps data-encryption keys (DEKs) with a binding (the DEK's id,
//! used as AAD / checked inside the sealed object), keeps versioned root keys
//! for rotation, and signs with keys that never leave the device.

pub mod pkcs11;
pub mod tpm;

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of a data-encryption key in bytes (AES-256).
pub const DEK_LEN: usize = 32;

/// A plaintext data-encryption key. Zeroized on drop; `Debug` prints a mask.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Dek([u8; DEK_LEN]);

impl Dek {
    /// A fresh DEK from the operating system's CSPRNG.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut k = [0u8; DEK_LEN];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Dek(k)
    }

    /// Builds a DEK from exactly [`DEK_LEN`] bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, RootError> {
        let arr: [u8; DEK_LEN] = b
            .try_into()
            .map_err(|_| RootError::Integrity("unwrapped key has the wrong length".into()))?;
        Ok(Dek(arr))
    }

    /// The key bytes. Do not copy them anywhere that is not zeroized.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.0
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(***)")
    }
}

/// A DEK wrapped by a root key version: opaque bytes only the root can open.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedDek {
    /// Which root key version wrapped it.
    pub root_version: u32,
    /// Backend-specific blob (PKCS#11: IV || AES-GCM ciphertext+tag;
    /// TPM: marshalled TPM2B_PUBLIC || TPM2B_PRIVATE of a sealed object).
    pub blob: Vec<u8>,
}

impl fmt::Debug for WrappedDek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WrappedDek(v{}, {} bytes)",
            self.root_version,
            self.blob.len()
        )
    }
}

/// Which hardware is underneath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Pkcs11,
    Tpm,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Pkcs11 => "pkcs11",
            BackendKind::Tpm => "tpm",
        })
    }
}

/// Signature algorithms a hardware-held key can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SignAlg {
    /// ECDSA over NIST P-256 with SHA-256; signatures are DER (RFC 3279).
    EcdsaP256Sha256,
    /// Ed25519 (pure EdDSA, RFC 8032); 64-byte signatures. PKCS#11 only,
    /// where the token supports CKM_EDDSA.
    Ed25519,
    /// RSA-3072, RSASSA-PSS with SHA-256, MGF1-SHA-256, salt length 32.
    RsaPss3072Sha256,
}

impl SignAlg {
    /// Stable name used in config, CLI and API (`ecdsa-p256`, `ed25519`, `rsa-pss-3072`).
    pub fn as_str(self) -> &'static str {
        match self {
            SignAlg::EcdsaP256Sha256 => "ecdsa-p256",
            SignAlg::Ed25519 => "ed25519",
            SignAlg::RsaPss3072Sha256 => "rsa-pss-3072",
        }
    }

    /// Parses [`SignAlg::as_str`].
    pub fn parse(s: &str) -> Option<SignAlg> {
        match s {
            "ecdsa-p256" => Some(SignAlg::EcdsaP256Sha256),
            "ed25519" => Some(SignAlg::Ed25519),
            "rsa-pss-3072" => Some(SignAlg::RsaPss3072Sha256),
            _ => None,
        }
    }
}

/// A reference to a hardware-held signing key, persisted by the caller.
/// PKCS#11: the object label; TPM: the marshalled public+private blobs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeyRef {
    pub alg: SignAlg,
    pub handle: Vec<u8>,
}

impl fmt::Debug for SigningKeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SigningKeyRef({:?}, {} bytes)",
            self.alg,
            self.handle.len()
        )
    }
}

/// Errors of the root of trust. Messages name the fix; none carries key
/// material or a PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    /// The device could not be reached or opened (module missing, TPM down).
    #[error("root device unavailable: {0}")]
    Unavailable(String),
    /// Authentication to the device failed (wrong PIN / auth value).
    #[error("root device refused the credentials: {0}")]
    Auth(String),
    /// Something is not set up (token, root key version).
    #[error("root device not initialised: {0}")]
    NotInitialised(String),
    /// A wrapped blob failed its integrity check (tampered, moved or wrong key).
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// Invalid configuration of the backend.
    #[error("invalid root configuration: {0}")]
    Config(String),
    /// Any other device error.
    #[error("root device error: {0}")]
    Device(String),
    /// The device cannot do this (e.g. Ed25519 on a TPM).
    #[error("not supported by the root device: {0}")]
    Unsupported(String),
}

/// The hardware root of trust. Implementations are `Send + Sync` and safe to
/// call from many threads; they block, so async callers use
/// `tokio::task::spawn_blocking`.
pub trait RootOfTrust: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Whether root key `version` exists on the device and may be used.
    fn has_version(&self, version: u32) -> Result<bool, RootError>;

    /// Creates root key version `version` (must not exist yet). Only ever
    /// called by an explicit init or a rotation.
    fn create_version(&self, version: u32) -> Result<(), RootError>;

    /// Retires root key version `version`: it can no longer unwrap anything.
    /// PKCS#11 destroys the key object; TPM records the retirement (the
    /// primary is re-derivable from the owner seed, see docs/ARCHITECTURE.md).
    fn retire_version(&self, version: u32) -> Result<(), RootError>;

    /// Wraps `dek` under root key `version`, bound to `binding` (the DEK id).
    fn wrap(&self, version: u32, dek: &Dek, binding: &[u8]) -> Result<WrappedDek, RootError>;

    /// Unwraps `wrapped` with the root key version it names; fails with
    /// [`RootError::Integrity`] when the blob or the binding do not match.
    fn unwrap(&self, wrapped: &WrappedDek, binding: &[u8]) -> Result<Dek, RootError>;

    /// Creates a signing key that never leaves the device. `label` is unique.
    fn create_signing_key(&self, label: &str, alg: SignAlg) -> Result<SigningKeyRef, RootError>;

    /// The public key as DER SubjectPublicKeyInfo.
    fn public_key_spki(&self, key: &SigningKeyRef) -> Result<Vec<u8>, RootError>;

    /// Signs `message` (hashed with SHA-256 for ECDSA and RSA-PSS; whole
    /// for Ed25519). ECDSA signatures are DER; RSA-PSS 384 bytes; Ed25519 64.
    fn sign(&self, key: &SigningKeyRef, message: &[u8]) -> Result<Vec<u8>, RootError>;

    /// Signs a prehashed SHA-256 `digest` (32 bytes) with an ECDSA or RSA-PSS
    /// key; Ed25519 keys refuse with [`RootError::Unsupported`].
    fn sign_digest(&self, key: &SigningKeyRef, digest: &[u8]) -> Result<Vec<u8>, RootError>;

    /// Destroys a signing key.
    fn destroy_signing_key(&self, key: &SigningKeyRef) -> Result<(), RootError>;
}

/// DER-encodes an ECDSA signature given as raw `r || s` (32 bytes each).
pub(crate) fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, RootError> {
    if raw.len() != 64 {
        return Err(RootError::Device(format!(
            "unexpected ECDSA signature length {}",
            raw.len()
        )));
    }
    fn int(v: &[u8]) -> Vec<u8> {
        let mut i = 0;
        while i < v.len() - 1 && v[i] == 0 {
            i += 1;
        }
        let mut out = Vec::with_capacity(v.len() + 3);
        out.push(0x02);
        let body = &v[i..];
        if body[0] & 0x80 != 0 {
            out.push((body.len() + 1) as u8);
            out.push(0);
        } else {
            out.push(body.len() as u8);
        }
        out.extend_from_slice(body);
        out
    }
    let r = int(&raw[..32]);
    let s = int(&raw[32..]);
    let mut out = vec![0x30, (r.len() + s.len()) as u8];
    out.extend(r);
    out.extend(s);
    Ok(out)
}

/// DER SubjectPublicKeyInfo for an uncompressed P-256 point (65 bytes, 0x04||X||Y).
pub(crate) fn p256_spki_from_point(point: &[u8]) -> Result<Vec<u8>, RootError> {
    if point.len() != 65 || point[0] != 0x04 {
        return Err(RootError::Device("unexpected EC point encoding".into()));
    }
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING point }
    let mut out = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    out.extend_from_slice(point);
    Ok(out)
}
