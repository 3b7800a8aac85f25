//! TLS of the proxy: the interception CA (its ECDSA P-256 key held in the
//! root device, never extractable), per-host leaf certificates minted on
//! demand and cached, and upstream client certificates (mTLS) whose keys
//! are sealed under the root.
//!
//! The CA record lives in the sled tree `proxy_ca` (key `ca`): the device
//! reference of the signing key, the self-signed CA certificate (DER, valid
//! [`CA_VALIDITY_DAYS`]) and its subject common name. It is created once, on
//! first use, and never changes afterwards. Certificates are built with
//! `rcgen`; the CA's signatures come from [`RootOfTrust::sign`] through
//! rcgen's remote-key interface, so the private key is only ever used
//! inside the device.
//!
//! Leaf keys are software P-256 keys generated in memory per host; a leaf
//! is valid [`LEAF_VALIDITY_DAYS`] and is re-minted a day before it ends.
//! At most [`LEAF_CACHE`] hosts are cached (least recently used first out).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, RemoteKeyPair, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use super::model::{invalid, ProxyError};
use crate::root::{RootOfTrust, SignAlg, SigningKeyRef};
use crate::store::{decode, encode};

/// Label of the CA key in the root device (a suffix is added if taken).
pub const CA_KEY_LABEL: &str = "keyseal-proxy-ca";
/// Validity of the CA certificate.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of a minted leaf certificate.
pub const LEAF_VALIDITY_DAYS: i64 = 7;
/// Hosts whose leaf is kept in memory.
pub const LEAF_CACHE: usize = 1024;
/// Kind of the sealed upstream client keys (name = target name).
pub const CLIENT_KEY_KIND: &str = "proxy-tls-key";

const T_CA: &str = "proxy_ca";
const K_CA: &[u8] = b"ca";
/// DER prefix of a P-256 SubjectPublicKeyInfo (the point follows).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The persisted CA.
#[derive(Clone, Serialize, Deserialize)]
struct CaRecord {
    key_ref: SigningKeyRef,
    cert_der: Vec<u8>,
    common_name: String,
    created_at: u64,
}

/// The CA ready to sign: the device key (through rcgen's remote-key
/// interface) and an issuer description for rcgen.
struct LoadedCa {
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// Carries the CA's subject name and key-id method for rcgen's
    /// `signed_by`; its own signature is not used (see [`issuer_for`]).
    issuer: rcgen::Certificate,
}

/// A CA signing key in the root device, seen by rcgen as a remote key.
struct DeviceKey {
    root: Arc<dyn RootOfTrust>,
    key: SigningKeyRef,
    point: Vec<u8>,
}

impl RemoteKeyPair for DeviceKey {
    fn public_key(&self) -> &[u8] {
        &self.point
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        // ECDSA P-256 over SHA-256(msg), DER signature: what rcgen expects
        // for PKCS_ECDSA_P256_SHA256.
        self.root.sign(&self.key, msg).map_err(|e| {
            tracing::error!(error = %e, "proxy CA: the root device did not sign");
            rcgen::Error::RemoteKeyError
        })
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> ProxyError {
    ProxyError::FailedPrecondition(format!("{what}: {e}"))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_serial() -> SerialNumber {
    let mut s = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut s);
    s[0] &= 0x7f;
    s[0] |= 0x01;
    SerialNumber::from_slice(&s)
}

fn ca_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "keyseal");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The CA's parameters without dates and serial (used for the issuer
/// description; dates and serial do not go into a leaf).
fn ca_params(common_name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_name(common_name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// The issuer description rcgen's `signed_by` needs. rcgen reads only the
/// issuer's subject name, key-id method and key usages from it (the
/// authority key identifier comes from the signing key itself), so it is
/// made by self-signing the same parameters with a throwaway in-memory key:
/// no device call at start-up, and the persisted CA certificate (signed by
/// the device) stays the one that is served and trusted.
fn issuer_for(common_name: &str) -> Result<rcgen::Certificate, ProxyError> {
    let throwaway =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| tls_err("CA issuer", e))?;
    ca_params(common_name)
        .self_signed(&throwaway)
        .map_err(|e| tls_err("CA issuer", e))
}

/// The uncompressed P-256 point of a SubjectPublicKeyInfo.
fn p256_point(spki: &[u8]) -> Result<Vec<u8>, ProxyError> {
    match spki.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(p) if p.len() == 65 && p[0] == 0x04 => Ok(p.to_vec()),
        _ => Err(ProxyError::FailedPrecondition(
            "proxy CA key is not an uncompressed P-256 key".into(),
        )),
    }
}

/// PEM of one DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A minted leaf ready for a TLS server.
pub struct Leaf {
    pub config: Arc<rustls::ServerConfig>,
    /// When to mint again (a day before the leaf ends).
    renew_at: SystemTime,
}

/// The interception CA and the leaf cache.
pub struct ProxyCa {
    root: Arc<dyn RootOfTrust>,
    db: sled::Db,
    tree: sled::Tree,
    /// The store's free-space guard, asked before the CA is created.
    disk: Arc<crate::store::DiskGuard>,
    loaded: Mutex<Option<Arc<LoadedCa>>>,
    /// Serialises CA creation and leaf minting (one device signature each).
    mint: Mutex<()>,
    leaves: Mutex<lru::LruCache<String, Arc<Leaf>>>,
}

impl std::fmt::Debug for ProxyCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCa").finish_non_exhaustive()
    }
}

impl ProxyCa {
    /// Opens the CA tree; the CA itself is created on first use.
    pub fn open(
        root: Arc<dyn RootOfTrust>,
        store: &crate::store::Store,
    ) -> Result<ProxyCa, ProxyError> {
        let cap = NonZeroUsize::new(LEAF_CACHE).unwrap_or(NonZeroUsize::MIN);
        let db = store.db.clone();
        Ok(ProxyCa {
            tree: db.open_tree(T_CA)?,
            disk: store.disk.clone(),
            db,
            root,
            loaded: Mutex::new(None),
            mint: Mutex::new(()),
            leaves: Mutex::new(lru::LruCache::new(cap)),
        })
    }

    fn load_record(&self, rec: CaRecord) -> Result<Arc<LoadedCa>, ProxyError> {
        let spki = self.root.public_key_spki(&rec.key_ref).map_err(|e| {
            ProxyError::FailedPrecondition(format!("proxy CA key in the root device: {e}"))
        })?;
        let point = p256_point(&spki)?;
        let key = KeyPair::from_remote(Box::new(DeviceKey {
            root: self.root.clone(),
            key: rec.key_ref,
            point,
        }))
        .map_err(|e| tls_err("proxy CA key", e))?;
        Ok(Arc::new(LoadedCa {
            cert_der: CertificateDer::from(rec.cert_der),
            key,
            issuer: issuer_for(&rec.common_name)?,
        }))
    }

    fn create_key(&self) -> Result<SigningKeyRef, ProxyError> {
        let alg = SignAlg::EcdsaP256Sha256;
        match self.root.create_signing_key(CA_KEY_LABEL, alg) {
            Ok(k) => Ok(k),
            Err(first) => {
                // A key of that label left by an earlier store: use a new label.
                let mut r = [0u8; 6];
                rand::rngs::OsRng.fill_bytes(&mut r);
                let label = format!("{CA_KEY_LABEL}-{}", hex::encode(r));
                self.root.create_signing_key(&label, alg).map_err(|_| {
                    ProxyError::FailedPrecondition(format!(
                        "cannot create the proxy CA key in the root device: {first}"
                    ))
                })
            }
        }
    }

    /// The CA, created (key in the device, self-signed certificate) on
    /// first call. Blocking: may sign with the device.
    fn ensure(&self) -> Result<Arc<LoadedCa>, ProxyError> {
        if let Some(ca) = self.loaded.lock().clone() {
            return Ok(ca);
        }
        let _m = self.mint.lock();
        if let Some(ca) = self.loaded.lock().clone() {
            return Ok(ca);
        }
        let rec = match self.tree.get(K_CA)? {
            Some(b) => decode(T_CA, &b)?,
            None => self.create()?,
        };
        let ca = self.load_record(rec)?;
        *self.loaded.lock() = Some(ca.clone());
        Ok(ca)
    }

    fn create(&self) -> Result<CaRecord, ProxyError> {
        self.disk.check_write()?;
        let key_ref = self.create_key()?;
        let made = (|| {
            let spki = self
                .root
                .public_key_spki(&key_ref)
                .map_err(|e| tls_err("proxy CA key", e))?;
            let point = p256_point(&spki)?;
            let key = KeyPair::from_remote(Box::new(DeviceKey {
                root: self.root.clone(),
                key: key_ref.clone(),
                point,
            }))
            .map_err(|e| tls_err("proxy CA key", e))?;
            let mut id = [0u8; 4];
            rand::rngs::OsRng.fill_bytes(&mut id);
            let common_name = format!("keyseal proxy CA {}", hex::encode(id));
            let mut p = ca_params(&common_name);
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
            p.serial_number = Some(random_serial());
            let cert = p
                .self_signed(&key)
                .map_err(|e| tls_err("signing the proxy CA certificate", e))?;
            let rec = CaRecord {
                key_ref: key_ref.clone(),
                cert_der: cert.der().to_vec(),
                common_name,
                created_at: now_secs(),
            };
            self.tree.insert(K_CA, encode(&rec)?)?;
            self.db.flush()?;
            Ok::<_, ProxyError>(rec)
        })();
        if made.is_err() {
            // Do not leave an unused key on the device.
            let _ = self.root.destroy_signing_key(&key_ref);
        } else {
            tracing::info!("proxy CA created (key in the root device)");
        }
        made
    }

    /// The CA certificate (PEM), creating the CA on first call. Blocking.
    pub fn certificate_pem(&self) -> Result<String, ProxyError> {
        Ok(cert_pem(&self.ensure()?.cert_der))
    }

    /// The TLS server config for `host` (a DNS name or an IP address):
    /// a cached leaf, or a new one signed by the CA in the device.
    /// Blocking on a miss.
    pub fn leaf(&self, host: &str) -> Result<Arc<Leaf>, ProxyError> {
        let now = SystemTime::now();
        if let Some(l) = self.leaves.lock().get(host) {
            if l.renew_at > now {
                return Ok(l.clone());
            }
        }
        let ca = self.ensure()?;
        let _m = self.mint.lock();
        if let Some(l) = self.leaves.lock().get(host) {
            if l.renew_at > now {
                return Ok(l.clone());
            }
        }
        let t0 = std::time::Instant::now();
        let leaf = Arc::new(mint_leaf(&ca, host)?);
        tracing::info!(host = %host, us = t0.elapsed().as_micros() as u64, "proxy leaf certificate minted");
        self.leaves.lock().put(host.to_owned(), leaf.clone());
        Ok(leaf)
    }

    /// Number of cached leaves (for tests and status).
    pub fn cached_leaves(&self) -> usize {
        self.leaves.lock().len()
    }
}

fn mint_leaf(ca: &LoadedCa, host: &str) -> Result<Leaf, ProxyError> {
    let mut p = CertificateParams::new(vec![host.to_owned()])
        .map_err(|_| invalid(format!("{host:?} cannot be a certificate name")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(LEAF_VALIDITY_DAYS);
    p.serial_number = Some(random_serial());
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| tls_err("leaf key", e))?;
    let cert = p
        .signed_by(&key, &ca.issuer, &ca.key)
        .map_err(|e| tls_err("signing a leaf with the proxy CA", e))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("TLS server", e))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), ca.cert_der.clone()], key_der)
        .map_err(|e| tls_err("TLS server", e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let renew = Duration::from_secs(((LEAF_VALIDITY_DAYS - 1) * 86_400) as u64);
    Ok(Leaf {
        config: Arc::new(cfg),
        renew_at: SystemTime::now() + renew,
    })
}

// ---------------------------------------------------------------------------
// Upstream client certificates (mTLS)
// ---------------------------------------------------------------------------

/// Checks a client certificate chain (PEM) and its private key (PEM,
/// PKCS#8, SEC1 or PKCS#1) for use against an upstream: both parse, the key
/// is usable by rustls, and it matches the first certificate. Errors never
/// quote the key.
pub fn check_client_auth(cert_pem: &str, key_pem: &[u8]) -> Result<(), ProxyError> {
    client_auth(cert_pem, key_pem).map(|_| ())
}

/// The certificate chain and key for a rustls client.
pub fn client_auth(
    cert_pem: &str,
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ProxyError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| invalid("client certificate is not PEM"))?;
    if certs.is_empty() {
        return Err(invalid("client certificate PEM holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| invalid("client key is not a PEM private key (PKCS#8, SEC1 or PKCS#1)"))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|_| invalid("client key is not a usable ECDSA, Ed25519 or RSA key"))?;
    let ck = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    ck.keys_match()
        .map_err(|_| invalid("client key does not match the client certificate"))?;
    Ok((certs, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_point() {
        let mut spki = P256_SPKI_PREFIX.to_vec();
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        spki.extend(&point);
        assert_eq!(p256_point(&spki).unwrap(), point);
        assert!(p256_point(&spki[..90]).is_err());
    }

    #[test]
    fn pem_lines() {
        let pem = cert_pem(&[1u8; 100]);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
    }

    #[test]
    fn client_auth_checks() {
        let k1 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let k2 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .self_signed(&k1)
            .unwrap();
        let pem = cert.pem();
        assert!(check_client_auth(&pem, k1.serialize_pem().as_bytes()).is_ok());
        let e = check_client_auth(&pem, k2.serialize_pem().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        assert!(check_client_auth("junk", k1.serialize_pem().as_bytes()).is_err());
        assert!(check_client_auth(&pem, b"junk").is_err());
    }
}
