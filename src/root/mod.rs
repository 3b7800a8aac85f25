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
    #[serde(with = "serde_bytes")]
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

thread_local! {
    static DEADLINE: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Runs `f` with `deadline` as this thread's deadline for device work: a
/// backend that must wait for its device (the TPM's single connection)
/// gives up with [`RootError::Unavailable`] once it passes, instead of
/// queueing behind a device that stopped answering. The daemon sets it to
/// the request's deadline (`DaemonState::blocking`).
pub fn with_deadline<T>(deadline: std::time::Instant, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<std::time::Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DEADLINE.with(|d| d.replace(Some(deadline))));
    f()
}

/// This thread's deadline for device work, if any (see [`with_deadline`]).
pub(crate) fn deadline() -> Option<std::time::Instant> {
    DEADLINE.with(|d| d.get())
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

// ---------------------------------------------------------------------------
// Minimal DER encoding (public keys only; nothing here sees secrets).

/// DER OID 1.3.101.112 (id-Ed25519, RFC 8410).
pub(crate) const OID_ED25519: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];
/// DER OID 1.2.840.113549.1.1.1 (rsaEncryption).
const OID_RSA_ENCRYPTION: [u8; 11] = [
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
/// Length in bytes of an Ed25519 public key and of an Ed25519 signature.
pub(crate) const ED25519_KEY_LEN: usize = 32;
pub(crate) const ED25519_SIG_LEN: usize = 64;
/// Bits and bytes of an RSA-3072 modulus (and of its signatures).
pub(crate) const RSA3072_BITS: usize = 3072;
pub(crate) const RSA3072_LEN: usize = RSA3072_BITS / 8;
/// RSA-PSS salt length keyseal uses (= SHA-256 output length).
pub(crate) const PSS_SALT_LEN: usize = 32;

/// Appends DER length octets: short form below 128, long form above.
fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// One DER tag-length-value.
pub(crate) fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    der_len(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// DER INTEGER of a non-negative big-endian number (minimal encoding).
fn der_uint(be: &[u8]) -> Vec<u8> {
    let skip = be.iter().take_while(|&&b| b == 0).count();
    let body = &be[skip..];
    let mut content = Vec::with_capacity(body.len() + 1);
    if body.first().map_or(true, |b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(body);
    der_tlv(0x02, &content)
}

/// The contents of a DER OCTET STRING that spans all of `der`, if it is one.
pub(crate) fn der_octet_string(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    (rest.len() == len).then_some(rest)
}

/// DER SubjectPublicKeyInfo of an Ed25519 public key (32 bytes, RFC 8410):
/// `30 2a 30 05 06 03 2b 65 70 03 21 00 || key`.
pub(crate) fn ed25519_spki(key: &[u8]) -> Result<Vec<u8>, RootError> {
    if key.len() != ED25519_KEY_LEN {
        return Err(RootError::Device(format!(
            "unexpected Ed25519 public key length {}",
            key.len()
        )));
    }
    let mut bits = vec![0x00];
    bits.extend_from_slice(key);
    let mut body = der_tlv(0x30, &OID_ED25519);
    body.extend(der_tlv(0x03, &bits));
    Ok(der_tlv(0x30, &body))
}

/// DER SubjectPublicKeyInfo (rsaEncryption, RFC 3279) of an RSA-3072 public
/// key given as big-endian modulus and public exponent.
pub(crate) fn rsa3072_spki(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>, RootError> {
    let skip = modulus.iter().take_while(|&&b| b == 0).count();
    let n = &modulus[skip..];
    if n.len() != RSA3072_LEN || n[0] & 0x80 == 0 {
        return Err(RootError::Device(format!(
            "unexpected RSA modulus: {} significant bytes, expected a {RSA3072_BITS}-bit modulus",
            n.len()
        )));
    }
    let e_skip = exponent.iter().take_while(|&&b| b == 0).count();
    let e = &exponent[e_skip..];
    if e.is_empty() || e.len() > 8 || e.last().map_or(true, |b| b & 1 == 0) {
        return Err(RootError::Device("unexpected RSA public exponent".into()));
    }
    // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
    let mut rsa_key = der_uint(n);
    rsa_key.extend(der_uint(e));
    let rsa_key = der_tlv(0x30, &rsa_key);
    let mut bits = Vec::with_capacity(rsa_key.len() + 1);
    bits.push(0x00);
    bits.extend(rsa_key);
    // AlgorithmIdentifier { rsaEncryption, NULL }
    let mut alg = OID_RSA_ENCRYPTION.to_vec();
    alg.extend_from_slice(&[0x05, 0x00]);
    let mut body = der_tlv(0x30, &alg);
    body.extend(der_tlv(0x03, &bits));
    Ok(der_tlv(0x30, &body))
}

#[cfg(test)]
mod der_tests {
    use super::*;

    #[test]
    fn lengths_short_and_long_form() {
        let enc = |n: usize| {
            let mut v = Vec::new();
            der_len(n, &mut v);
            v
        };
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(0x7f), [0x7f]);
        assert_eq!(enc(0x80), [0x81, 0x80]);
        assert_eq!(enc(0xff), [0x81, 0xff]);
        assert_eq!(enc(0x100), [0x82, 0x01, 0x00]);
        assert_eq!(enc(0x1_0000), [0x83, 0x01, 0x00, 0x00]);
    }

    #[test]
    fn integers_are_minimal_and_positive() {
        assert_eq!(der_uint(&[0, 0, 1]), [0x02, 0x01, 0x01]);
        assert_eq!(der_uint(&[0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der_uint(&[]), [0x02, 0x01, 0x00]);
        assert_eq!(der_uint(&[1, 0, 1]), [0x02, 0x03, 1, 0, 1]);
    }

    #[test]
    fn octet_string_parsing() {
        assert_eq!(der_octet_string(&[0x04, 0x02, 7, 8]), Some(&[7u8, 8][..]));
        assert_eq!(der_octet_string(&[0x04, 0x03, 7, 8]), None);
        assert_eq!(der_octet_string(&[0x03, 0x01, 7]), None);
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend([5u8; 0x80]);
        assert_eq!(der_octet_string(&long).map(<[u8]>::len), Some(0x80));
    }

    #[test]
    fn ed25519_spki_layout() {
        let spki = ed25519_spki(&[9u8; 32]).unwrap();
        assert_eq!(
            &spki[..12],
            &[0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00]
        );
        assert_eq!(spki.len(), 44);
        assert!(ed25519_spki(&[9u8; 31]).is_err());
    }

    #[test]
    fn rsa_spki_layout() {
        let mut n = vec![0u8; RSA3072_LEN];
        n[0] = 0xc1;
        n[RSA3072_LEN - 1] = 0x01;
        let spki = rsa3072_spki(&n, &[0x01, 0x00, 0x01]).unwrap();
        // SEQUENCE, long form length of two bytes.
        assert_eq!(&spki[..2], &[0x30, 0x82]);
        assert_eq!(
            usize::from(u16::from_be_bytes([spki[2], spki[3]])),
            spki.len() - 4
        );
        // The modulus INTEGER gets a leading zero (top bit set): 385 bytes.
        let needle = [0x02, 0x82, 0x01, 0x81, 0x00, 0xc1];
        assert!(spki.windows(needle.len()).any(|w| w == needle));
        assert!(spki.ends_with(&[0x02, 0x03, 0x01, 0x00, 0x01]));
        // 2048-bit modulus and an even exponent are refused.
        assert!(rsa3072_spki(&n[128..], &[0x01, 0x00, 0x01]).is_err());
        assert!(rsa3072_spki(&n, &[0x02]).is_err());
    }
}
