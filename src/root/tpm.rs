//! TPM 2.0 backend (`tss-esapi` over a TCTI: `/dev/tpmrm0`, tpm2-abrmd or
//! swtpm over TCP).
//!
//! # Keys
//!
//! Root key version N is a storage primary key under the Owner hierarchy,
//! created with `TPM2_CreatePrimary` from a fixed ECC P-256 template whose
//! `unique` field is derived from N ([`root_unique`]). The TPM derives a
//! primary deterministically from its owner seed and the template, so the key
//! is re-created on demand and nothing is persisted in NV. Primaries are
//! cached as transient objects in the connection (created lazily on first
//! use). Signing keys hang off a separate, fixed "signing primary".
//!
//! Signing keys: ECDSA P-256 / SHA-256 and RSA-3072 RSASSA-PSS / SHA-256
//! (exponent 65537; the TPM uses salt length = digest length = 32). Both
//! sign a SHA-256 digest computed here (`sign` hashes the message), with a
//! null hashcheck ticket (the keys are unrestricted). RSA-3072 support is
//! checked with TPM2_TestParms first (many TPMs only do RSA-2048), and
//! creating such a key takes the TPM ~1-3 s of prime generation on swtpm,
//! during which the connection (and every other TPM call) waits. There is no
//! Ed25519 on TPM 2.0: [`RootError::Unsupported`].
//!
//! A DEK is wrapped as a sealed data object (KeyedHash, null scheme) created
//! under the version's primary with `TPM2_Create`; its sensitive data is
//! `dek (32 bytes) || sha256(binding) (32 bytes)`. The TPM encrypts and
//! integrity-protects it with a key derived from the primary, so only this
//! TPM (owner seed) and only that version's primary can load it. Unwrapping
//! loads it, unseals, flushes it, and checks the binding hash in constant time.
//!
//! Object authorisation: with `auth_value` set, sealed objects and signing
//! keys carry it as their authValue and are subject to the TPM's
//! dictionary-attack protection (a wrong `auth_value` counts towards DA
//! lockout); without it they are created `noDA` (there is nothing to guess).
//! With `pcrs` set, sealed objects get a PolicyPCR (+ PolicyPassword when
//! `auth_value` is set) authPolicy over the sha256 bank values at wrap time,
//! and `userWithAuth` is cleared: they unseal only while those PCRs hold the
//! same values. Each blob records its own PCR selection, so changing `pcrs` in
//! the configuration affects new wraps only.
//!
//! # Blob format
//!
//! `WrappedDek::blob`: `0x01 || pcr_mask (u32 BE, bit i = sha256 PCR i) ||
//! len (u32 BE) || TPMT_PUBLIC || len (u32 BE) || TPM2B_PRIVATE buffer`.
//! `SigningKeyRef::handle`: `0x02 || len || TPMT_PUBLIC || len || private`.
//! A blob that does not parse, that the TPM refuses to load (integrity HMAC,
//! wrong parent / version) or whose binding does not match is
//! [`RootError::Integrity`].
//!
//! # Sessions
//!
//! All authorisations use password sessions (plain authValue in the command),
//! not HMAC or salted/encrypted sessions. Measured against swtpm on the
//! development machine (2 cores): load + unseal + flush takes about 0.8 ms
//! with password sessions and about 10 ms with a salted HMAC session with
//! parameter encryption (even reusing the session), and unwrap is on the read
//! path of every secret whose DEK is not cached. The price: the
//! DEK (in TPM2_Create and the TPM2_Unseal response) and `auth_value` travel
//! in clear between this process and the TPM. Whoever can observe that
//! channel (the LPC/SPI bus, root on this host reading the swtpm socket or
//! the kernel's TPM buffers) sees them; such an attacker can usually read
//! this process's memory anyway.
//!
//! # Retirement on a TPM — be aware
//!
//! `retire_version` flushes the version's primary and makes this process
//! refuse the version ([`RootError::NotInitialised`]); the store records the
//! retirement and calls `retire_version` again at every open. That is a
//! policy refusal by keyseal, not destruction: the primary is re-derivable
//! from the owner seed by anyone with Owner-hierarchy access to this TPM
//! (the owner auth is empty on most machines), who can then load and unseal
//! old blobs they have copies of. Cryptographic retirement of every version
//! at once needs an owner-seed change (`tpm2_clear`, which also destroys all
//! other owner-hierarchy keys); there is no per-version destruction on a TPM
//! without persisting keys in NV. Likewise, anyone with access to the TPM and
//! write access to the store could seal DEKs of their choosing under keyseal's
//! primaries: the TPM protects key material from leaving the machine, not
//! from other users of the same TPM.
//!
//! # Concurrency and faults
//!
//! The ESAPI `Context` is not `Sync` and the TPM runs one command at a time,
//! so one connection sits behind a mutex. When the transport breaks (swtpm or
//! tpm2-abrmd restarted, I/O error) the call fails with
//! [`RootError::Unavailable`], the connection is dropped, and the next call
//! reconnects (re-deriving primaries as needed). A call that finds a
//! previously working connection broken is retried once on a new connection
//! (nothing it did persists on the TPM), so the first request after a quick
//! TPM restart succeeds; while the TPM is down the retry's connect fails at
//! once with "cannot reach TPM".
//!
//! Without a resource manager (swtpm, `/dev/tpm0`) the TPM has few transient
//! object slots (3 on libtpms), so at most [`MAX_CACHED_PRIMARIES`] primaries
//! stay loaded. If the TPM is still full after keyseal flushed its own
//! primaries, it flushes every transient object (leftovers of a crashed
//! client): such a TPM must be dedicated to keyseal. Use `/dev/tpmrm0` or
//! tpm2-abrmd to share a TPM; they virtualise the slots. The swtpm TCTI opens
//! a TCP connection per command, so other clients (e.g. `tpm2_*` tools) can
//! interleave with keyseal; a restarted swtpm shows up as primaries missing
//! from the TPM, which keyseal detects (name check on the error path) and
//! handles like a broken link.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tss_esapi::attributes::{ObjectAttributes, ObjectAttributesBuilder};
use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK, TPM2_TRANSIENT_FIRST};
use tss_esapi::constants::{CapabilityType, PropertyTag, SessionType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, CapabilityData, CreateKeyResult, Digest, EccParameter, EccPoint, EccScheme, HashScheme,
    HashcheckTicket, KeyedHashScheme, Name, PcrSelectionList, PcrSelectionListBuilder, PcrSlot,
    Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa,
    PublicKeyedHashParameters, PublicParameters, PublicRsaParameters, PublicRsaParametersBuilder,
    RsaExponent, RsaScheme, SensitiveData, Signature, SignatureScheme, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;
use zeroize::Zeroizing;

use super::{
    ecdsa_raw_to_der, p256_spki_from_point, rsa3072_spki, BackendKind, Dek, RootError, RootOfTrust,
    SignAlg, SigningKeyRef, WrappedDek, DEK_LEN, RSA3072_LEN,
};

/// Most primaries kept loaded at once: libtpms has 3 transient object
/// slots, and one must stay free for the object being loaded.
pub const MAX_CACHED_PRIMARIES: usize = 2;
/// Blob tag of a sealed DEK.
const TAG_SEALED_DEK: u8 = 0x01;
/// Blob tag of a signing key.
const TAG_SIGNING_KEY: u8 = 0x02;
/// Length of sha256(binding) inside the sealed data.
const BINDING_HASH_LEN: usize = 32;
/// Highest PCR index accepted (PC client TPMs have 24 PCRs).
const MAX_PCR: u8 = 23;
/// Longest object authValue (the name algorithm's digest size, sha256).
const MAX_AUTH_LEN: usize = 32;

/// Settings of the TPM backend.
#[derive(Clone)]
pub struct TpmConfig {
    /// TCTI: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`,
    /// `tabrmd:` ... (tss-esapi `TctiNameConf` syntax; swtpm over TCP only).
    pub tcti: String,
    /// authValue of sealed objects and signing keys (at most 32 bytes).
    pub auth_value: Option<Zeroizing<Vec<u8>>>,
    /// sha256-bank PCR indices new sealed objects are bound to; empty = none.
    pub pcrs: Vec<u8>,
}

impl fmt::Debug for TpmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmConfig")
            .field("tcti", &self.tcti)
            .field("auth_value", &self.auth_value.as_ref().map(|_| "***"))
            .field("pcrs", &self.pcrs)
            .finish()
    }
}

/// Which primary key: a root key version or the signing primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrimaryId {
    Root(u32),
    Signing,
}

impl PrimaryId {
    fn label(self) -> String {
        match self {
            PrimaryId::Root(v) => format!("keyseal-root-v{v}"),
            PrimaryId::Signing => "keyseal-signing".to_owned(),
        }
    }
}

/// The template's `unique` for a primary: x = sha256(label), y = 32 zero
/// bytes. Changing this changes every key: never do it.
fn root_unique(id: PrimaryId) -> Result<EccPoint, tss_esapi::Error> {
    let x = Sha256::digest(id.label().as_bytes()).to_vec();
    Ok(EccPoint::new(
        EccParameter::try_from(x)?,
        EccParameter::try_from(vec![0u8; 32])?,
    ))
}

/// The fixed storage-primary template (ECC P-256, AES-128-CFB, restricted
/// decrypt). noDA as in the TCG SRK template: the auth is empty.
fn primary_template(id: PrimaryId) -> Result<Public, tss_esapi::Error> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(root_unique(id)?)
        .build()
}

/// Template of a sealed data object.
fn sealed_template(with_auth: bool, policy: Option<Digest>) -> Result<Public, tss_esapi::Error> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(policy.is_none())
        .with_no_da(!with_auth)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(policy.unwrap_or_default())
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

/// Object attributes of a signing key: made in and bound to this TPM,
/// unrestricted sign only.
fn signing_attributes(with_auth: bool) -> Result<ObjectAttributes, tss_esapi::Error> {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(!with_auth)
        .with_sign_encrypt(true)
        .build()
}

/// Template of an ECDSA P-256 / SHA-256 signing key.
fn signing_template(with_auth: bool) -> Result<Public, tss_esapi::Error> {
    let attrs = signing_attributes(with_auth)?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// Parameters of an RSA-3072 RSASSA-PSS / SHA-256 signing key, exponent
/// 65537 (encoded as 0, the TPM's default). The TPM picks the PSS salt
/// length: the digest length (32) when the key is large enough, as here.
fn rsa3072_parameters() -> Result<PublicRsaParameters, tss_esapi::Error> {
    PublicRsaParametersBuilder::new_unrestricted_signing_key(
        RsaScheme::RsaPss(HashScheme::new(HashingAlgorithm::Sha256)),
        RsaKeyBits::Rsa3072,
        RsaExponent::ZERO_EXPONENT,
    )
    .build()
}

/// Template of an RSA-3072 RSASSA-PSS / SHA-256 signing key.
fn rsa_signing_template(with_auth: bool) -> Result<Public, tss_esapi::Error> {
    let attrs = signing_attributes(with_auth)?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_rsa_parameters(rsa3072_parameters()?)
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
}

/// Why there are no Ed25519 keys on a TPM.
fn ed25519_unsupported() -> RootError {
    RootError::Unsupported(
        "ed25519: TPM 2.0 has no Ed25519 keys (TPM ECC keys use NIST/BN curves; Curve25519/EdDSA are not in the PC Client profile, not implemented by libtpms/swtpm or common hardware TPMs, and tss-esapi 7 has no API for them); use ecdsa-p256 or rsa-pss-3072 on the TPM, or the PKCS#11 backend for Ed25519".into(),
    )
}

// ---------------------------------------------------------------------------
// Error classification

/// The raw TSS2_RC of an error (tss-esapi 7 hides it behind `Display`).
fn raw_rc(e: &tss_esapi::Error) -> Option<u32> {
    let s = match e {
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatZero(rc)) => rc.to_string(),
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatOne(rc)) => rc.to_string(),
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::Success) => return Some(0),
        tss_esapi::Error::WrapperError(_) => return None,
    };
    let hex = s.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

const LAYER_TPM: u32 = 0;
const LAYER_ESYS: u32 = 7;
const LAYER_SYS: u32 = 8;
const LAYER_TCTI: u32 = 10;
const LAYER_RESMGR: u32 = 11;
const LAYER_RESMGR_TPM: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The transport to the TPM is broken (or the ESAPI state with it).
    Link,
    /// The TPM answered with an error (or warning).
    Tpm {
        kind: Option<Tss2ResponseCodeKind>,
        format_one: bool,
        warning: bool,
    },
    /// A local error (marshalling, parameters, wrapper).
    Local,
}

fn classify(e: &tss_esapi::Error) -> Class {
    let tss2 = match e {
        tss_esapi::Error::Tss2Error(rc) => *rc,
        tss_esapi::Error::WrapperError(_) => return Class::Local,
    };
    let Some(raw) = raw_rc(e) else {
        return Class::Local;
    };
    let layer = (raw >> 16) & 0xff;
    let base = raw & 0xffff;
    match layer {
        LAYER_TCTI | LAYER_RESMGR => Class::Link,
        // GENERAL_FAILURE, BAD_CONTEXT, BAD_SEQUENCE, NO_CONNECTION,
        // TRY_AGAIN, IO_ERROR, MALFORMED_RESPONSE, INSUFFICIENT_RESPONSE,
        // INCOMPATIBLE_TCTI, BAD_TCTI_STRUCTURE.
        LAYER_ESYS | LAYER_SYS if matches!(base, 1 | 3 | 7 | 8 | 9 | 10 | 17 | 19 | 20 | 22) => {
            Class::Link
        }
        LAYER_TPM | LAYER_RESMGR_TPM => {
            // Format-zero: bit 7 clear; bit 11 (severity) set for warnings.
            let format_one = matches!(tss2, Tss2ResponseCode::FormatOne(_));
            let warning = !format_one && base & (1 << 11) != 0;
            Class::Tpm {
                kind: tss2.kind(),
                format_one,
                warning,
            }
        }
        _ => Class::Local,
    }
}

fn is_reference_kind(k: Tss2ResponseCodeKind) -> bool {
    use Tss2ResponseCodeKind as K;
    matches!(
        k,
        K::ReferenceH0
            | K::ReferenceH1
            | K::ReferenceH2
            | K::ReferenceH3
            | K::ReferenceH4
            | K::ReferenceH5
            | K::ReferenceH6
            | K::ReferenceS0
            | K::ReferenceS1
            | K::ReferenceS2
            | K::ReferenceS3
            | K::ReferenceS4
            | K::ReferenceS5
            | K::ReferenceS6
    )
}

fn unavailable_hint(tcti: &str) -> String {
    format!(
        "is swtpm/tpm2-abrmd running (or /dev/tpmrm0 present and accessible: `tss` group) and is `tcti` in the [root.tpm] config right (currently '{tcti}')?"
    )
}

// ---------------------------------------------------------------------------
// Blobs

fn put_chunk(out: &mut Vec<u8>, chunk: &[u8]) -> Result<(), RootError> {
    let len = u32::try_from(chunk.len())
        .map_err(|_| RootError::Device("TPM object too large to serialize".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(chunk);
    Ok(())
}

fn take_u32(b: &mut &[u8]) -> Option<u32> {
    let (head, rest) = b.split_first_chunk::<4>()?;
    *b = rest;
    Some(u32::from_be_bytes(*head))
}

fn take_chunk<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(take_u32(b)?).ok()?;
    if b.len() < len {
        return None;
    }
    let (chunk, rest) = b.split_at(len);
    *b = rest;
    Some(chunk)
}

fn serialize_object(head: &[u8], public: &Public, private: &Private) -> Result<Vec<u8>, RootError> {
    let public = public
        .marshall()
        .map_err(|e| RootError::Device(format!("cannot marshal TPM public area: {e}")))?;
    let mut out = Vec::with_capacity(head.len() + 8 + public.len() + private.len());
    out.extend_from_slice(head);
    put_chunk(&mut out, &public)?;
    put_chunk(&mut out, private.value())?;
    Ok(out)
}

/// A parsed blob: header fields, public and private.
struct ObjectBlob {
    pcr_mask: u32,
    public: Public,
    private: Private,
}

fn parse_object(blob: &[u8], tag: u8, what: &str) -> Result<ObjectBlob, RootError> {
    let bad = |why: &str| RootError::Integrity(format!("{what} is malformed: {why}"));
    let (&first, mut rest) = blob.split_first().ok_or_else(|| bad("empty"))?;
    if first != tag {
        return Err(bad(&format!("unknown format tag {first:#04x}")));
    }
    let pcr_mask = if tag == TAG_SEALED_DEK {
        let mask = take_u32(&mut rest).ok_or_else(|| bad("truncated header"))?;
        if mask >> (u32::from(MAX_PCR) + 1) != 0 {
            return Err(bad("PCR selection out of range"));
        }
        mask
    } else {
        0
    };
    let public_bytes = take_chunk(&mut rest).ok_or_else(|| bad("truncated public area"))?;
    let private_bytes = take_chunk(&mut rest).ok_or_else(|| bad("truncated private area"))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    let public = Public::unmarshall(public_bytes).map_err(|_| bad("public area"))?;
    // Unmarshalling ignores trailing bytes; insist on the canonical encoding.
    if public.marshall().ok().as_deref() != Some(public_bytes) {
        return Err(bad("public area is not canonical"));
    }
    let private = Private::try_from(private_bytes.to_vec()).map_err(|_| bad("private area"))?;
    Ok(ObjectBlob {
        pcr_mask,
        public,
        private,
    })
}

// ---------------------------------------------------------------------------
// PCRs

fn pcr_mask_from(pcrs: &[u8]) -> Result<u32, RootError> {
    let mut mask = 0u32;
    for &p in pcrs {
        if p > MAX_PCR {
            return Err(RootError::Config(format!(
                "PCR index {p} in root.tpm.pcrs is out of range (0..={MAX_PCR})"
            )));
        }
        mask |= 1 << p;
    }
    Ok(mask)
}

fn pcr_indices(mask: u32) -> Vec<u8> {
    (0..=MAX_PCR).filter(|i| mask & (1 << i) != 0).collect()
}

fn pcr_selection(mask: u32) -> Result<(Vec<PcrSlot>, PcrSelectionList), RootError> {
    let slots = pcr_indices(mask)
        .into_iter()
        .map(|i| PcrSlot::try_from(1u32 << i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RootError::Config(format!("bad PCR selection: {e}")))?;
    let list = PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| RootError::Config(format!("bad PCR selection: {e}")))?;
    Ok((slots, list))
}

// ---------------------------------------------------------------------------
// Connection

/// One ESAPI connection and the primaries loaded in it.
struct Conn {
    ctx: Context,
    /// Loaded primaries with their names, least recently used first.
    primaries: Vec<(PrimaryId, KeyHandle, Name)>,
    /// Set when the transport broke: the connection is dropped after the call.
    broken: bool,
    tcti: String,
}

impl Conn {
    fn open(tcti: &str, conf: &TctiNameConf) -> Result<Conn, RootError> {
        let ctx = Context::new(conf.clone()).map_err(|e| {
            RootError::Unavailable(format!(
                "cannot reach TPM via TCTI '{tcti}': {}: {e}",
                unavailable_hint(tcti)
            ))
        })?;
        let mut conn = Conn {
            ctx,
            primaries: Vec::new(),
            broken: false,
            tcti: tcti.to_owned(),
        };
        // One round trip: some TCTIs (swtpm) connect per command, so only
        // this shows that the TPM answers.
        if let Err(e) = conn.ctx.get_tpm_property(PropertyTag::Manufacturer) {
            return Err(match classify(&e) {
                Class::Link => RootError::Unavailable(format!(
                    "cannot reach TPM via TCTI '{tcti}': {}: {e}",
                    unavailable_hint(tcti)
                )),
                _ => conn.err("querying the TPM", e),
            });
        }
        Ok(conn)
    }

    /// Flushes every transient object the TPM lists. Only called when the
    /// TPM has no free object slot even after flushing our own primaries:
    /// without a resource manager those are leftovers of clients that died
    /// (with `/dev/tpmrm0` or tpm2-abrmd the list holds only our own).
    fn flush_all_transients(&mut self) -> Result<(), RootError> {
        self.evict_primaries(None, 0)?;
        let (data, _) = self
            .ctx
            .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)
            .map_err(|e| self.err("listing transient objects", e))?;
        let CapabilityData::Handles(handles) = data else {
            return Ok(());
        };
        for h in handles.into_inner() {
            if !matches!(h, TpmHandle::Transient(_)) {
                continue;
            }
            if let Ok(obj) = self.ctx.tr_from_tpm_public(h) {
                if let Err(e) = self.ctx.flush_context(obj) {
                    return Err(self.err("flushing a stale transient object", e));
                }
                tracing::warn!("TPM out of object slots: flushed transient object {:?}", h);
            }
        }
        Ok(())
    }

    /// Maps a tss-esapi error of operation `what`; marks the connection
    /// broken on transport errors.
    fn err(&mut self, what: &str, e: tss_esapi::Error) -> RootError {
        match classify(&e) {
            Class::Link => {
                self.broken = true;
                RootError::Unavailable(format!(
                    "{what}: lost the TPM connection via TCTI '{}' ({e}); keyseal reconnects on the next request; {}",
                    self.tcti,
                    unavailable_hint(&self.tcti)
                ))
            }
            Class::Tpm { kind, .. } if kind.is_some_and(is_reference_kind) => {
                self.lost_state(what, &e)
            }
            Class::Tpm { kind, .. } => match kind {
                Some(Tss2ResponseCodeKind::Lockout) => RootError::Auth(format!(
                    "{what}: the TPM is in dictionary-attack lockout (too many wrong auth values); fix root.tpm.auth_value, then wait for the lockout to expire or run `tpm2_dictionarylockout --clear-lockout`"
                )),
                Some(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth) => {
                    RootError::Auth(format!(
                        "{what}: the TPM rejected the authorisation ({e}); check root.tpm.auth_value (it must be the value the object was created with) and that the owner hierarchy auth is empty"
                    ))
                }
                Some(
                    Tss2ResponseCodeKind::ObjectMemory
                    | Tss2ResponseCodeKind::Memory
                    | Tss2ResponseCodeKind::ObjectHandles,
                ) => RootError::Device(format!(
                    "{what}: the TPM has no free object slots ({e}); without a resource manager the TPM must be dedicated to keyseal: use `device:/dev/tpmrm0` or tpm2-abrmd to share it"
                )),
                Some(Tss2ResponseCodeKind::Initialize) => RootError::Unavailable(format!(
                    "{what}: the TPM has not been started ({e}); run `tpm2_startup -c` (swtpm: start it with --flags startup-clear)"
                )),
                Some(Tss2ResponseCodeKind::Hierarchy | Tss2ResponseCodeKind::Disabled) => {
                    RootError::Unavailable(format!(
                        "{what}: the TPM owner hierarchy is disabled ({e}); enable the TPM in firmware"
                    ))
                }
                _ => RootError::Device(format!("{what}: {e}")),
            },
            Class::Local => RootError::Device(format!("{what}: {e}")),
        }
    }

    /// The TPM no longer holds what this connection loaded (it restarted, or
    /// another client flushed our objects): same treatment as a broken link.
    fn lost_state(&mut self, what: &str, e: &dyn fmt::Display) -> RootError {
        self.broken = true;
        RootError::Unavailable(format!(
            "{what}: the TPM no longer holds the keys keyseal loaded ({e}); it was probably restarted (TCTI '{}'); keyseal reconnects on the next request",
            self.tcti
        ))
    }

    /// After an operation under cached primary `id` failed: if the TPM no
    /// longer holds that primary under its handle (restart, or flushed by
    /// another client), the failure is not about the operation's input.
    fn primary_lost(&mut self, id: PrimaryId, what: &str) -> Option<RootError> {
        let (_, handle, name) = self.primaries.iter().find(|(p, _, _)| *p == id)?.clone();
        match self.ctx.read_public(handle) {
            Ok((_, actual, _)) if actual == name => None,
            Ok(_) => Some(self.lost_state(
                what,
                &"a different object is loaded under the primary's handle",
            )),
            Err(e) => match classify(&e) {
                Class::Link => Some(self.err(what, e)),
                _ => Some(self.lost_state(what, &e)),
            },
        }
    }

    /// Forgets loaded handles without flushing them (the TPM lost them, or
    /// the handle numbers may now belong to another client's objects), so
    /// that dropping the Context does not flush anything.
    fn abandon(&mut self) {
        for (_, handle, _) in self.primaries.drain(..) {
            let mut obj: ObjectHandle = handle.into();
            // Errors only concern tss-esapi's bookkeeping (flush vs close).
            let _ = self.ctx.tr_close(&mut obj);
        }
    }

    /// Like [`Conn::err`] for loading a stored blob: whatever the TPM (or the
    /// marshalling) rejects about the blob is an integrity failure.
    fn load_err(&mut self, what: &str, e: tss_esapi::Error) -> RootError {
        match classify(&e) {
            Class::Tpm {
                kind,
                format_one,
                warning,
            } if !warning
                && (format_one
                    || matches!(
                        kind,
                        Some(
                            Tss2ResponseCodeKind::Sensitive
                                | Tss2ResponseCodeKind::Policy
                                | Tss2ResponseCodeKind::Unbalanced
                                | Tss2ResponseCodeKind::NoResult
                        )
                    )) =>
            {
                RootError::Integrity(format!(
                    "{what}: the TPM refused the stored object ({e}): it was altered, or sealed by another TPM / owner seed or another root key version"
                ))
            }
            Class::Local => RootError::Integrity(format!("{what}: malformed stored object ({e})")),
            _ => self.err(what, e),
        }
    }

    fn is_object_memory(e: &tss_esapi::Error) -> bool {
        matches!(
            classify(e),
            Class::Tpm {
                kind: Some(
                    Tss2ResponseCodeKind::ObjectMemory
                        | Tss2ResponseCodeKind::Memory
                        | Tss2ResponseCodeKind::ObjectHandles
                ),
                ..
            }
        )
    }

    /// Flushes cached primaries (all but `keep`) to free object slots.
    fn evict_primaries(
        &mut self,
        keep: Option<PrimaryId>,
        max_left: usize,
    ) -> Result<(), RootError> {
        let mut i = 0;
        while self.primaries.len() > max_left && i < self.primaries.len() {
            if Some(self.primaries[i].0) == keep {
                i += 1;
                continue;
            }
            let (id, handle, _) = self.primaries.remove(i);
            if let Err(e) = self.ctx.flush_context(handle.into()) {
                return Err(self.err(&format!("flushing primary {}", id.label()), e));
            }
        }
        Ok(())
    }

    /// The handle of primary `id`, derived now if not loaded.
    fn primary(&mut self, id: PrimaryId) -> Result<KeyHandle, RootError> {
        if let Some(pos) = self.primaries.iter().position(|(p, _, _)| *p == id) {
            let entry = self.primaries.remove(pos);
            let handle = entry.1;
            self.primaries.push(entry);
            return Ok(handle);
        }
        self.evict_primaries(None, MAX_CACHED_PRIMARIES - 1)?;
        let template = primary_template(id)
            .map_err(|e| RootError::Device(format!("building the primary key template: {e}")))?;
        let mut attempt = 0;
        let handle = loop {
            let res = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.create_primary(Hierarchy::Owner, template.clone(), None, None, None, None)
                });
            match res {
                Ok(r) => break r.key_handle,
                Err(e) if attempt < 2 && Self::is_object_memory(&e) => {
                    attempt += 1;
                    if attempt == 1 {
                        self.evict_primaries(None, 0)?;
                    } else {
                        self.flush_all_transients()?;
                    }
                }
                Err(e) => {
                    return Err(self.err(&format!("deriving the TPM primary key {}", id.label()), e))
                }
            }
        };
        let name = match self.ctx.tr_get_name(handle.into()) {
            Ok(n) => n,
            Err(e) => {
                let _ = self.ctx.flush_context(handle.into());
                return Err(self.err("reading the primary key name", e));
            }
        };
        self.primaries.push((id, handle, name));
        Ok(handle)
    }

    /// Asks the TPM (TPM2_TestParms) whether it can make RSA-3072 RSASSA-PSS
    /// keys; many TPMs only do RSA-2048.
    fn check_rsa3072(&mut self) -> Result<(), RootError> {
        let params = rsa3072_parameters()
            .map_err(|e| RootError::Device(format!("building RSA-3072 parameters: {e}")))?;
        match self.ctx.test_parms(PublicParameters::Rsa(params)) {
            Ok(()) => Ok(()),
            Err(e) => match classify(&e) {
                Class::Tpm { warning: false, .. } => Err(RootError::Unsupported(format!(
                    "rsa-pss-3072: this TPM cannot make 3072-bit RSASSA-PSS keys (TPM2_TestParms: {e}); use ecdsa-p256 on the TPM, or the PKCS#11 backend"
                ))),
                _ => Err(self.err("asking the TPM whether it supports RSA-3072", e)),
            },
        }
    }

    /// Flushes a cached primary if loaded.
    fn forget_primary(&mut self, id: PrimaryId) -> Result<(), RootError> {
        if let Some(pos) = self.primaries.iter().position(|(p, _, _)| *p == id) {
            let (_, handle, _) = self.primaries.remove(pos);
            if let Err(e) = self.ctx.flush_context(handle.into()) {
                return Err(self.err(&format!("flushing primary {}", id.label()), e));
            }
        }
        Ok(())
    }

    /// TPM2_Create under primary `parent_id`, retrying after freeing
    /// object slots as [`Conn::load`] does: the TPM builds the new object in
    /// a transient slot, and after a keyseald was killed its primaries may
    /// still hold the slots. The outer error is from freeing slots; the
    /// inner one is the TPM's answer to the last Create.
    fn create_under(
        &mut self,
        parent_id: PrimaryId,
        template: &Public,
        auth: Option<&Auth>,
        data: Option<&SensitiveData>,
    ) -> Result<Result<CreateKeyResult, tss_esapi::Error>, RootError> {
        let mut attempt = 0;
        loop {
            let parent = self.primary(parent_id)?;
            let res = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.create(
                        parent,
                        template.clone(),
                        auth.cloned(),
                        data.cloned(),
                        None,
                        None,
                    )
                });
            match res {
                Err(e) if attempt < 2 && Self::is_object_memory(&e) => {
                    attempt += 1;
                    if attempt == 1 {
                        self.evict_primaries(Some(parent_id), 1)?;
                    } else {
                        // Re-derives the parent on the next turn.
                        self.flush_all_transients()?;
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// Loads `blob` under `parent` (retrying after freeing slots).
    fn load(
        &mut self,
        parent_id: PrimaryId,
        blob: &ObjectBlob,
        what: &str,
    ) -> Result<KeyHandle, RootError> {
        let mut attempt = 0;
        loop {
            let parent = self.primary(parent_id)?;
            let res = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.load(parent, blob.private.clone(), blob.public.clone())
                });
            match res {
                Ok(h) => return Ok(h),
                Err(e) if attempt < 2 && Self::is_object_memory(&e) => {
                    attempt += 1;
                    if attempt == 1 {
                        self.evict_primaries(Some(parent_id), 1)?;
                    } else {
                        // Re-derives the parent on the next turn.
                        self.flush_all_transients()?;
                    }
                }
                Err(e) if classify(&e) == Class::Link => return Err(self.err(what, e)),
                Err(e) => {
                    if let Some(lost) = self.primary_lost(parent_id, what) {
                        return Err(lost);
                    }
                    return Err(self.load_err(what, e));
                }
            }
        }
    }

    /// Runs `f` on a loaded object and flushes it, also when `f` fails.
    fn with_loaded<T>(
        &mut self,
        handle: KeyHandle,
        f: impl FnOnce(&mut Conn) -> Result<T, RootError>,
    ) -> Result<T, RootError> {
        let res = f(self);
        let flushed = self.ctx.flush_context(handle.into());
        if flushed.is_err() {
            let mut obj: ObjectHandle = handle.into();
            let _ = self.ctx.tr_close(&mut obj);
        }
        match (res, flushed) {
            (Ok(v), Ok(())) => Ok(v),
            (Ok(_), Err(e)) => Err(self.err("flushing a loaded TPM object", e)),
            (Err(e), Err(fe)) => {
                // The operation's error wins; still notice a broken link.
                let _ = self.err("flushing a loaded TPM object", fe);
                Err(e)
            }
            (Err(e), Ok(())) => Err(e),
        }
    }

    /// Starts a policy (or trial) session with PolicyPCR over `mask`
    /// (`pcr_digest` empty for a real session: the TPM uses current values)
    /// and PolicyPassword when `with_auth`.
    fn policy_session(
        &mut self,
        trial: bool,
        mask: u32,
        pcr_digest: Digest,
        with_auth: bool,
    ) -> Result<PolicySession, RootError> {
        let (_, selection) = pcr_selection(mask)?;
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                if trial {
                    SessionType::Trial
                } else {
                    SessionType::Policy
                },
                SymmetricDefinition::Null,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| self.err("starting a TPM policy session", e))?
            .ok_or_else(|| RootError::Device("TPM returned no policy session".into()))?;
        let policy = PolicySession::try_from(session)
            .map_err(|e| RootError::Device(format!("not a policy session: {e}")))?;
        let res = self
            .ctx
            .policy_pcr(policy, pcr_digest, selection)
            .and_then(|()| {
                if with_auth {
                    self.ctx.policy_password(policy)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = res {
            let err = self.err("applying the PCR policy", e);
            self.flush_session(policy);
            return Err(err);
        }
        Ok(policy)
    }

    fn flush_session(&mut self, policy: PolicySession) {
        let handle: ObjectHandle = SessionHandle::from(policy).into();
        if let Err(e) = self.ctx.flush_context(handle) {
            let _ = self.err("flushing a TPM session", e);
        }
    }

    /// The PolicyPCR(+PolicyPassword) digest over the current values of the
    /// PCRs in `mask`, computed by the TPM in a trial session.
    fn pcr_policy_digest(&mut self, mask: u32, with_auth: bool) -> Result<Digest, RootError> {
        let (slots, selection) = pcr_selection(mask)?;
        // Read the values (at most 8 per TPM2_PCR_Read).
        let mut values: Vec<(PcrSlot, Digest)> = Vec::new();
        let mut remaining = selection;
        while !remaining.is_empty() {
            let (_, read, digests) = self
                .ctx
                .pcr_read(remaining.clone())
                .map_err(|e| self.err("reading PCRs", e))?;
            let read_slots: Vec<PcrSlot> = read
                .get_selections()
                .iter()
                .filter(|s| s.hashing_algorithm() == HashingAlgorithm::Sha256)
                .flat_map(|s| s.selected())
                .collect();
            if read_slots.is_empty() {
                return Err(RootError::Config(format!(
                    "the TPM returned no sha256 values for PCRs {:?}: is the sha256 PCR bank active? (root.tpm.pcrs)",
                    pcr_indices(mask)
                )));
            }
            let mut sorted = read_slots.clone();
            sorted.sort();
            for (slot, d) in sorted.iter().zip(digests.value().iter()) {
                values.push((*slot, d.clone()));
            }
            remaining
                .subtract(&read)
                .map_err(|e| RootError::Device(format!("PCR selection bookkeeping: {e}")))?;
        }
        let mut h = Sha256::new();
        for slot in &slots {
            let d = values
                .iter()
                .find(|(s, _)| s == slot)
                .map(|(_, d)| d)
                .ok_or_else(|| RootError::Device(format!("TPM did not return PCR {slot:?}")))?;
            h.update(d.value());
        }
        let pcr_digest = Digest::try_from(h.finalize().to_vec())
            .map_err(|e| RootError::Device(format!("PCR digest: {e}")))?;
        let trial = self.policy_session(true, mask, pcr_digest, with_auth)?;
        let digest = self
            .ctx
            .policy_get_digest(trial)
            .map_err(|e| self.err("reading the trial policy digest", e));
        self.flush_session(trial);
        digest
    }
}

// ---------------------------------------------------------------------------
// The root

/// Mutable state: the connection (None = reconnect on next use) and the
/// versions retired in this process.
struct State {
    conn: Option<Conn>,
    retired: BTreeSet<u32>,
}

/// The TPM 2.0 root of trust.
pub struct TpmRoot {
    tcti: String,
    tcti_conf: TctiNameConf,
    auth_value: Option<Zeroizing<Vec<u8>>>,
    pcr_mask: u32,
    state: Mutex<State>,
}

impl fmt::Debug for TpmRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmRoot")
            .field("tcti", &self.tcti)
            .field("pcrs", &pcr_indices(self.pcr_mask))
            .field("auth_value", &self.auth_value.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl TpmRoot {
    /// Validates the configuration and connects to the TPM (the connection
    /// is checked with one round trip).
    pub fn open(cfg: &TpmConfig) -> Result<TpmRoot, RootError> {
        let tcti = cfg.tcti.trim();
        if tcti.starts_with("swtpm") && tcti.contains("path=") {
            return Err(RootError::Config(format!(
                "TCTI '{tcti}': swtpm over a UNIX socket (path=) is not supported by tss-esapi 7; use `swtpm:host=127.0.0.1,port=N` with swtpm --server type=tcp"
            )));
        }
        let tcti_conf = TctiNameConf::from_str(tcti).map_err(|e| {
            RootError::Config(format!(
                "cannot parse TCTI '{tcti}' in root.tpm.tcti ({e}); examples: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, `tabrmd:`"
            ))
        })?;
        if let Some(a) = &cfg.auth_value {
            if a.len() > MAX_AUTH_LEN {
                return Err(RootError::Config(format!(
                    "root.tpm auth_value is {} bytes; the TPM accepts at most {MAX_AUTH_LEN}",
                    a.len()
                )));
            }
        }
        let pcr_mask = pcr_mask_from(&cfg.pcrs)?;
        let conn = Conn::open(tcti, &tcti_conf)?;
        Ok(TpmRoot {
            tcti: tcti.to_owned(),
            tcti_conf,
            auth_value: cfg.auth_value.clone().filter(|a| !a.is_empty()),
            pcr_mask,
            state: Mutex::new(State {
                conn: Some(conn),
                retired: BTreeSet::new(),
            }),
        })
    }

    /// Runs `f` on the connection, connecting first if needed; drops the
    /// connection if `f` found the transport broken. When a connection that
    /// had been working finds the TPM gone or restarted (nothing was done:
    /// TPM commands here leave no persistent state), `f` runs once more on a
    /// new connection, so a request right after a quick TPM restart succeeds
    /// and one while the TPM is down fails with the reconnect's message.
    fn with_conn<T>(
        &self,
        mut f: impl FnMut(&mut Conn, &BTreeSet<u32>) -> Result<T, RootError>,
    ) -> Result<T, RootError> {
        // The TPM runs one command at a time. Behind a TPM that stopped
        // answering, waiters give up at their request's deadline rather than
        // pile up (each holds a blocking thread) and run stale work later.
        let mut guard = match super::deadline() {
            None => self.state.lock(),
            Some(deadline) => self.state.try_lock_until(deadline).ok_or_else(|| {
                RootError::Unavailable(format!(
                    "the TPM (TCTI '{}') is still busy with an earlier command that has not been answered: it may be paused, overloaded or wedged; retry later",
                    self.tcti
                ))
            })?,
        };
        let state = &mut *guard;
        let mut retried = false;
        loop {
            let fresh = state.conn.is_none();
            if fresh {
                state.conn = Some(Conn::open(&self.tcti, &self.tcti_conf)?);
                tracing::info!(tcti = %self.tcti, "reconnected to the TPM");
            }
            let Some(conn) = state.conn.as_mut() else {
                return Err(RootError::Unavailable("no TPM connection".into()));
            };
            let res = f(conn, &state.retired);
            if conn.broken {
                tracing::warn!(tcti = %self.tcti, "TPM connection lost; reconnecting");
                conn.abandon();
                state.conn = None;
                if !fresh && !retried {
                    retried = true;
                    continue;
                }
            }
            return res;
        }
    }

    fn check_version(version: u32, retired: &BTreeSet<u32>) -> Result<(), RootError> {
        if version == 0 {
            return Err(RootError::NotInitialised(
                "root key version 0 does not exist (versions start at 1)".into(),
            ));
        }
        if retired.contains(&version) {
            return Err(RootError::NotInitialised(format!(
                "root key version {version} is retired; data still wrapped under it must be re-wrapped (rotated) before retirement"
            )));
        }
        Ok(())
    }

    fn auth(&self) -> Result<Option<Auth>, RootError> {
        self.auth_value
            .as_ref()
            .map(|a| Auth::try_from(a.to_vec()))
            .transpose()
            .map_err(|e| RootError::Config(format!("root.tpm auth_value: {e}")))
    }
}

impl RootOfTrust for TpmRoot {
    fn kind(&self) -> BackendKind {
        BackendKind::Tpm
    }

    fn has_version(&self, version: u32) -> Result<bool, RootError> {
        Ok(version >= 1 && !self.state.lock().retired.contains(&version))
    }

    fn create_version(&self, version: u32) -> Result<(), RootError> {
        self.with_conn(|conn, retired| {
            if retired.contains(&version) {
                return Err(RootError::Config(format!(
                    "root key version {version} was retired and cannot be created again; use a higher version"
                )));
            }
            Self::check_version(version, retired)?;
            conn.primary(PrimaryId::Root(version)).map(|_| ())
        })
    }

    fn retire_version(&self, version: u32) -> Result<(), RootError> {
        if version == 0 {
            return Err(RootError::NotInitialised(
                "root key version 0 does not exist (versions start at 1)".into(),
            ));
        }
        let mut guard = self.state.lock();
        let state = &mut *guard;
        state.retired.insert(version);
        // Best effort: if the TPM is unreachable there is nothing loaded
        // worth flushing, and the retirement is recorded already.
        if let Some(conn) = state.conn.as_mut() {
            let res = conn.forget_primary(PrimaryId::Root(version));
            if conn.broken {
                conn.abandon();
                state.conn = None;
            }
            if let Err(e) = res {
                tracing::warn!(version, error = %e, "could not flush a retired primary");
            }
        }
        Ok(())
    }

    fn wrap(&self, version: u32, dek: &Dek, binding: &[u8]) -> Result<WrappedDek, RootError> {
        let auth = self.auth()?;
        let with_auth = auth.is_some();
        let mask = self.pcr_mask;
        let mut sealed = Zeroizing::new(Vec::with_capacity(DEK_LEN + BINDING_HASH_LEN));
        sealed.extend_from_slice(dek.expose());
        sealed.extend_from_slice(&Sha256::digest(binding));
        let data = SensitiveData::try_from(sealed.to_vec())
            .map_err(|e| RootError::Device(format!("building the sealed data: {e}")))?;
        let (public, private) = self.with_conn(|conn, retired| {
            Self::check_version(version, retired)?;
            let policy = if mask != 0 {
                Some(conn.pcr_policy_digest(mask, with_auth)?)
            } else {
                None
            };
            let template = sealed_template(with_auth, policy).map_err(|e| {
                RootError::Device(format!("building the sealed object template: {e}"))
            })?;
            let created = conn
                .create_under(
                    PrimaryId::Root(version),
                    &template,
                    auth.as_ref(),
                    Some(&data),
                )?
                .map_err(|e| {
                    let what = format!("sealing a DEK under root key version {version}");
                    if classify(&e) != Class::Link {
                        if let Some(lost) = conn.primary_lost(PrimaryId::Root(version), &what) {
                            return lost;
                        }
                    }
                    conn.err(&what, e)
                })?;
            Ok((created.out_public, created.out_private))
        })?;
        let mut head = vec![TAG_SEALED_DEK];
        head.extend_from_slice(&mask.to_be_bytes());
        Ok(WrappedDek {
            root_version: version,
            blob: serialize_object(&head, &public, &private)?,
        })
    }

    fn unwrap(&self, wrapped: &WrappedDek, binding: &[u8]) -> Result<Dek, RootError> {
        let version = wrapped.root_version;
        let blob = parse_object(&wrapped.blob, TAG_SEALED_DEK, "wrapped DEK")?;
        let Public::KeyedHash {
            object_attributes, ..
        } = &blob.public
        else {
            return Err(RootError::Integrity(
                "wrapped DEK is malformed: not a sealed data object".into(),
            ));
        };
        let uses_policy = !object_attributes.user_with_auth();
        let uses_auth = !object_attributes.no_da();
        if uses_policy != (blob.pcr_mask != 0) {
            return Err(RootError::Integrity(
                "wrapped DEK is malformed: PCR selection does not match the object's policy".into(),
            ));
        }
        let auth = if uses_auth {
            Some(self.auth()?.ok_or_else(|| {
                RootError::Auth(
                    "this DEK was sealed with an auth value but root.tpm.auth_value is not set"
                        .into(),
                )
            })?)
        } else {
            None
        };
        let mask = blob.pcr_mask;
        let expected = Sha256::digest(binding);
        self.with_conn(|conn, retired| {
            Self::check_version(version, retired)?;
            let what = format!("loading a DEK sealed under root key version {version}");
            let handle = conn.load(PrimaryId::Root(version), &blob, &what)?;
            conn.with_loaded(handle, |conn| {
                if let Some(a) = auth.clone() {
                    conn.ctx
                        .tr_set_auth(handle.into(), a)
                        .map_err(|e| conn.err("setting the object auth value", e))?;
                }
                let session = if uses_policy {
                    let p = conn.policy_session(false, mask, Digest::default(), uses_auth)?;
                    Some(p)
                } else {
                    None
                };
                let res = conn.ctx.execute_with_session(
                    Some(session.map_or(AuthSession::Password, AuthSession::from)),
                    |ctx| ctx.unseal(handle.into()),
                );
                if let Some(p) = session {
                    conn.flush_session(p);
                }
                let data = res.map_err(|e| {
                    let kind = match classify(&e) {
                        Class::Tpm { kind, .. } => kind,
                        _ => None,
                    };
                    if matches!(kind, Some(Tss2ResponseCodeKind::PolicyFail)) {
                        RootError::Integrity(format!(
                            "the TPM refused to unseal the DEK: PCRs {:?} (sha256) no longer hold the values they had when it was wrapped (firmware, boot loader or Secure Boot change?), or the blob was altered",
                            pcr_indices(mask)
                        ))
                    } else {
                        conn.err("unsealing a DEK", e)
                    }
                })?;
                let bytes = data.value();
                if bytes.len() != DEK_LEN + BINDING_HASH_LEN {
                    return Err(RootError::Integrity(format!(
                        "sealed data has the wrong length ({} bytes)",
                        bytes.len()
                    )));
                }
                let (key, bound) = bytes.split_at(DEK_LEN);
                if !bool::from(bound.ct_eq(expected.as_slice())) {
                    return Err(RootError::Integrity(
                        "the DEK is bound to a different id (binding mismatch)".into(),
                    ));
                }
                Dek::from_slice(key)
            })
        })
    }

    fn create_signing_key(&self, _label: &str, alg: SignAlg) -> Result<SigningKeyRef, RootError> {
        let auth = self.auth()?;
        let template = match alg {
            SignAlg::EcdsaP256Sha256 => signing_template(auth.is_some()),
            SignAlg::RsaPss3072Sha256 => rsa_signing_template(auth.is_some()),
            SignAlg::Ed25519 => return Err(ed25519_unsupported()),
        }
        .map_err(|e| RootError::Device(format!("building the signing key template: {e}")))?;
        let (public, private) = self.with_conn(|conn, _| {
            if alg == SignAlg::RsaPss3072Sha256 {
                conn.check_rsa3072()?;
            }
            let created =
                conn.create_under(PrimaryId::Signing, &template, auth.as_ref(), None)?
                    .map_err(|e| {
                        let what = format!("creating a TPM {} signing key", alg.as_str());
                        if let Class::Tpm {
                            kind:
                                Some(
                                    Tss2ResponseCodeKind::KeySize
                                    | Tss2ResponseCodeKind::Asymmetric,
                                ),
                            ..
                        } = classify(&e)
                        {
                            return RootError::Unsupported(format!(
                                "{}: this TPM cannot create such keys ({e})",
                                alg.as_str()
                            ));
                        }
                        if classify(&e) != Class::Link {
                            if let Some(lost) = conn.primary_lost(PrimaryId::Signing, &what) {
                                return lost;
                            }
                        }
                        conn.err(&what, e)
                    })?;
            Ok((created.out_public, created.out_private))
        })?;
        Ok(SigningKeyRef {
            alg,
            handle: serialize_object(&[TAG_SIGNING_KEY], &public, &private)?,
        })
    }

    fn public_key_spki(&self, key: &SigningKeyRef) -> Result<Vec<u8>, RootError> {
        if key.alg == SignAlg::Ed25519 {
            return Err(ed25519_unsupported());
        }
        let blob = parse_signing_key(key)?;
        match key.alg {
            SignAlg::EcdsaP256Sha256 => {
                p256_point(&blob.public).and_then(|p| p256_spki_from_point(&p))
            }
            SignAlg::RsaPss3072Sha256 => {
                let (modulus, exponent) = rsa3072_public(&blob.public)?;
                rsa3072_spki(&modulus, &exponent)
            }
            SignAlg::Ed25519 => Err(ed25519_unsupported()),
        }
    }

    fn sign(&self, key: &SigningKeyRef, message: &[u8]) -> Result<Vec<u8>, RootError> {
        if key.alg == SignAlg::Ed25519 {
            return Err(ed25519_unsupported());
        }
        self.sign_digest(key, &Sha256::digest(message))
    }

    fn sign_digest(&self, key: &SigningKeyRef, digest: &[u8]) -> Result<Vec<u8>, RootError> {
        if key.alg == SignAlg::Ed25519 {
            return Err(ed25519_unsupported());
        }
        if digest.len() != 32 {
            return Err(RootError::Config("a SHA-256 digest is 32 bytes".into()));
        }
        let blob = parse_signing_key(key)?;
        let scheme = match key.alg {
            SignAlg::RsaPss3072Sha256 => {
                rsa3072_public(&blob.public)?;
                SignatureScheme::RsaPss {
                    hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                }
            }
            _ => {
                p256_point(&blob.public)?;
                SignatureScheme::EcDsa {
                    hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                }
            }
        };
        let uses_auth = !blob.public.object_attributes().no_da();
        let auth = if uses_auth {
            Some(self.auth()?.ok_or_else(|| {
                RootError::Auth(
                    "this signing key was created with an auth value but root.tpm.auth_value is not set"
                        .into(),
                )
            })?)
        } else {
            None
        };
        let digest = Digest::try_from(digest.to_vec())
            .map_err(|e| RootError::Device(format!("message digest: {e}")))?;
        let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(|e| RootError::Device(format!("null hashcheck ticket: {e}")))?;
        let signature = self.with_conn(|conn, _| {
            let handle = conn.load(PrimaryId::Signing, &blob, "loading a TPM signing key")?;
            conn.with_loaded(handle, |conn| {
                if let Some(a) = auth.clone() {
                    conn.ctx
                        .tr_set_auth(handle.into(), a)
                        .map_err(|e| conn.err("setting the signing key auth value", e))?;
                }
                conn.ctx
                    .execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.sign(handle, digest.clone(), scheme, validation.clone())
                    })
                    .map_err(|e| conn.err("signing with a TPM key", e))
            })
        })?;
        match (key.alg, signature) {
            (SignAlg::EcdsaP256Sha256, Signature::EcDsa(sig)) => {
                let mut raw = Vec::with_capacity(64);
                raw.extend(left_pad32(sig.signature_r().value())?);
                raw.extend(left_pad32(sig.signature_s().value())?);
                ecdsa_raw_to_der(&raw)
            }
            (SignAlg::RsaPss3072Sha256, Signature::RsaPss(sig)) => {
                let v = sig.signature().value();
                if v.len() != RSA3072_LEN {
                    return Err(RootError::Device(format!(
                        "the TPM returned an RSA-PSS signature of {} bytes (expected {RSA3072_LEN})",
                        v.len()
                    )));
                }
                Ok(v.to_vec())
            }
            (alg, _) => Err(RootError::Device(format!(
                "the TPM returned a signature of another kind than {}",
                alg.as_str()
            ))),
        }
    }

    fn destroy_signing_key(&self, _key: &SigningKeyRef) -> Result<(), RootError> {
        // Nothing lives on the TPM: the key exists only as the caller's
        // stored blob, which the caller deletes.
        Ok(())
    }
}

/// Left-pads a big-endian integer to 32 bytes.
fn left_pad32(v: &[u8]) -> Result<[u8; 32], RootError> {
    let v = match v.iter().position(|&b| b != 0) {
        Some(i) => &v[i..],
        None => &[],
    };
    if v.len() > 32 {
        return Err(RootError::Device(format!(
            "P-256 value of {} bytes from the TPM",
            v.len()
        )));
    }
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    Ok(out)
}

/// Parses a TPM signing key reference.
fn parse_signing_key(key: &SigningKeyRef) -> Result<ObjectBlob, RootError> {
    parse_object(&key.handle, TAG_SIGNING_KEY, "signing key reference")
}

/// Modulus and public exponent (big-endian) of an RSA-3072 signing key's
/// public area. An exponent of 0 in TPMT_PUBLIC means 65537.
fn rsa3072_public(public: &Public) -> Result<(Vec<u8>, Vec<u8>), RootError> {
    let Public::Rsa {
        parameters, unique, ..
    } = public
    else {
        return Err(RootError::Integrity(
            "signing key reference is malformed: not an RSA key".into(),
        ));
    };
    if parameters.key_bits() != RsaKeyBits::Rsa3072 || unique.value().len() != RSA3072_LEN {
        return Err(RootError::Integrity(
            "signing key reference is malformed: not an RSA-3072 key".into(),
        ));
    }
    let exponent = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    Ok((unique.value().to_vec(), exponent.to_be_bytes().to_vec()))
}

/// `0x04 || X || Y` of a P-256 ECDSA public area.
fn p256_point(public: &Public) -> Result<Vec<u8>, RootError> {
    let Public::Ecc {
        parameters, unique, ..
    } = public
    else {
        return Err(RootError::Integrity(
            "signing key reference is malformed: not an ECC key".into(),
        ));
    };
    if parameters.ecc_curve() != EccCurve::NistP256 {
        return Err(RootError::Integrity(
            "signing key reference is malformed: not a P-256 key".into(),
        ));
    }
    let bad = |_| RootError::Integrity("signing key reference has a bad EC point".into());
    let mut point = Vec::with_capacity(65);
    point.push(0x04);
    point.extend(left_pad32(unique.x().value()).map_err(bad)?);
    point.extend(left_pad32(unique.y().value()).map_err(bad)?);
    Ok(point)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn root_is_send_sync() {
        assert_send_sync::<TpmRoot>();
    }

    #[test]
    fn config_debug_masks_auth() {
        let cfg = TpmConfig {
            tcti: "device:/dev/tpmrm0".into(),
            auth_value: Some(Zeroizing::new(b"hunter2".to_vec())),
            pcrs: vec![7],
        };
        let s = format!("{cfg:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("***"), "{s}");
    }

    #[test]
    fn pcr_mask_validation() {
        assert_eq!(pcr_mask_from(&[0, 7, 23]).unwrap(), 1 | 1 << 7 | 1 << 23);
        assert!(matches!(pcr_mask_from(&[24]), Err(RootError::Config(_))));
        assert_eq!(pcr_indices(1 << 7 | 1), vec![0, 7]);
    }

    #[test]
    fn blob_parser_rejects_garbage() {
        for b in [
            &[][..],
            &[0x01],
            &[0x09, 0, 0, 0, 0],
            &[0x01, 0, 0, 0, 0, 0, 0, 0, 9],
        ] {
            assert!(matches!(
                parse_object(b, TAG_SEALED_DEK, "x"),
                Err(RootError::Integrity(_))
            ));
        }
        assert!(matches!(
            parse_object(&[0x01, 0xff, 0, 0, 0], TAG_SEALED_DEK, "x"),
            Err(RootError::Integrity(_))
        ));
    }

    fn rc(raw: u32) -> tss_esapi::Error {
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(raw))
    }

    #[test]
    fn classify_response_codes() {
        // TCTI IO error, ESYS bad sequence / IO error: the link.
        assert_eq!(classify(&rc(0x000a_000a)), Class::Link);
        assert_eq!(classify(&rc(0x0007_0007)), Class::Link);
        assert_eq!(classify(&rc(0x0007_000a)), Class::Link);
        // TPM_RC_INTEGRITY on parameter 1 (format one).
        assert_eq!(
            classify(&rc(0x1df)),
            Class::Tpm {
                kind: Some(Tss2ResponseCodeKind::Integrity),
                format_one: true,
                warning: false
            }
        );
        // TPM_RC_OBJECT_MEMORY and TPM_RC_REFERENCE_H0 are warnings.
        assert!(Conn::is_object_memory(&rc(0x902)));
        assert!(matches!(
            classify(&rc(0x910)),
            Class::Tpm { kind: Some(k), warning: true, .. } if is_reference_kind(k)
        ));
        // TPM_RC_POLICY_FAIL in session 1.
        assert!(matches!(
            classify(&rc(0x99d)),
            Class::Tpm {
                kind: Some(Tss2ResponseCodeKind::PolicyFail),
                ..
            }
        ));
        // An MU (marshalling) error and a wrapper error are local.
        assert_eq!(classify(&rc(0x0009_000b)), Class::Local);
        assert_eq!(
            classify(&tss_esapi::Error::WrapperError(
                tss_esapi::WrapperErrorKind::InvalidParam
            )),
            Class::Local
        );
    }

    #[test]
    fn left_pad() {
        assert_eq!(left_pad32(&[1]).unwrap()[31], 1);
        assert_eq!(left_pad32(&[0, 0, 5]).unwrap()[31], 5);
        assert!(left_pad32(&[1; 33]).is_err());
        assert_eq!(left_pad32(&[]).unwrap(), [0u8; 32]);
    }

    #[test]
    fn rsa_public_area_to_spki() {
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(signing_attributes(false).unwrap())
            .with_rsa_parameters(rsa3072_parameters().unwrap())
            .with_rsa_unique_identifier(PublicKeyRsa::try_from(vec![0xc5; RSA3072_LEN]).unwrap())
            .build()
            .unwrap();
        let (n, e) = rsa3072_public(&public).unwrap();
        assert_eq!(n.len(), RSA3072_LEN);
        // Exponent 0 in TPMT_PUBLIC means 65537.
        assert_eq!(e, 65537u32.to_be_bytes());
        assert!(rsa3072_spki(&n, &e).is_ok());
        // An ECC public area is not an RSA key.
        let ecc = signing_template(false).unwrap();
        assert!(matches!(rsa3072_public(&ecc), Err(RootError::Integrity(_))));
        assert!(matches!(p256_point(&public), Err(RootError::Integrity(_))));
    }

    #[test]
    fn unparseable_tcti_is_config_error() {
        let cfg = TpmConfig {
            tcti: "nonsense".into(),
            auth_value: None,
            pcrs: vec![],
        };
        assert!(matches!(TpmRoot::open(&cfg), Err(RootError::Config(_))));
        let cfg = TpmConfig {
            tcti: "swtpm:path=/tmp/x".into(),
            auth_value: None,
            pcrs: vec![],
        };
        assert!(matches!(TpmRoot::open(&cfg), Err(RootError::Config(_))));
    }
}
