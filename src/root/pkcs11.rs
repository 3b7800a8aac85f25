//! PKCS#11 backend (`cryptoki`): root keys are AES-256 token objects that are
//! sensitive and non-extractable; DEKs are wrapped with CKM_AES_GCM inside
//! the token, with the DEK id as AAD.
//!
//! Concurrency: a `Session` is `Send` but not `Sync`, and opening + logging
//! in costs milliseconds, so logged-in sessions are kept in a pool and lent
//! out one per call: concurrent callers use different sessions and the token
//! runs them in parallel. SoftHSM2 2.6.1 can fail on concurrent object
//! creation, so key creation and destruction take `create_lock`.
//! A session that the token invalidated (token removed, sessions closed from
//! another handle) is dropped and the call retried once on a fresh session.
//! A cached object handle that turned stale (`CKR_OBJECT_HANDLE_INVALID`,
//! e.g. the token's storage changed under the process) is forgotten and the
//! key looked up once more; a key that is gone is UNAVAILABLE, never DATA_LOSS.
//!
//! Signing keys are token key pairs labelled (and CKA_ID'd) with the caller's
//! label; the private half is private, sensitive, non-extractable and
//! sign-only. ECDSA P-256 (CKM_ECDSA over the SHA-256 digest, DER output),
//! Ed25519 (CKM_EC_EDWARDS_KEY_PAIR_GEN with CKA_EC_PARAMS = OID 1.3.101.112;
//! CKM_EDDSA over the whole message, so no `sign_digest`) and RSA-3072
//! (exponent 65537; CKM_SHA256_RSA_PKCS_PSS over the message,
//! CKM_RSA_PKCS_PSS over a digest; MGF1-SHA-256, 32-byte salt). The
//! reference's `alg` picks the mechanism; the key type on the token is
//! checked first, because SoftHSM2 answers a mismatched mechanism with
//! CKR_GENERAL_ERROR.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use parking_lot::Mutex;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{
    der_octet_string, ecdsa_raw_to_der, ed25519_spki, p256_spki_from_point, rsa3072_spki,
    BackendKind, Dek, RootError, RootOfTrust, SignAlg, SigningKeyRef, WrappedDek, ED25519_SIG_LEN,
    OID_ED25519, PSS_SALT_LEN, RSA3072_BITS, RSA3072_LEN,
};

/// Label prefix of root key objects: version N is `keyseal-root-vN`.
pub const ROOT_LABEL_PREFIX: &str = "keyseal-root-v";
/// DER OID of prime256v1, the CKA_EC_PARAMS of P-256 keys.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// CKA_EC_PARAMS of Ed25519 keys: the DER OID 1.3.101.112 (RFC 8410).
const ED25519_PARAMS: [u8; 5] = OID_ED25519;
/// RSA public exponent 65537, big-endian.
const RSA_F4: [u8; 3] = [0x01, 0x00, 0x01];
const GCM_IV_LEN: usize = 12;
const GCM_TAG_BITS: u64 = 128;
/// Most sessions kept open in the pool; more concurrent callers open
/// short-lived extra sessions.
const MAX_POOLED_SESSIONS: usize = 16;

/// Settings of the PKCS#11 backend, resolved (the PIN is already read).
#[derive(Clone)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).
    pub module: PathBuf,
    /// Label of the token holding the root keys.
    pub token_label: String,
    /// The user PIN.
    pub pin: Zeroizing<String>,
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"***")
            .finish()
    }
}

/// Reads a PIN from a file, refusing a file that group or others may read.
pub fn read_pin_file(path: &Path) -> Result<Zeroizing<String>, RootError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        RootError::Config(format!(
            "cannot read PIN file {}: {e}; set root.pkcs11.pin_file to a readable file",
            path.display()
        ))
    })?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(RootError::Config(format!(
            "PIN file {} is accessible by group or others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    let raw =
        Zeroizing::new(std::fs::read(path).map_err(|e| {
            RootError::Config(format!("cannot read PIN file {}: {e}", path.display()))
        })?);
    let text = std::str::from_utf8(&raw)
        .map_err(|_| RootError::Config(format!("PIN file {} is not UTF-8", path.display())))?;
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(RootError::Config(format!(
            "PIN file {} is empty",
            path.display()
        )));
    }
    Ok(Zeroizing::new(pin.to_owned()))
}

/// The PKCS#11 root of trust.
pub struct Pkcs11Root {
    ctx: Pkcs11,
    slot: Slot,
    token_label: String,
    pin: Zeroizing<String>,
    pool: Mutex<Vec<Session>>,
    /// Serialises object creation/destruction (SoftHSM2 2.6.1 is not safe there).
    create_lock: Mutex<()>,
    /// label -> object handle; handles are valid across sessions of this process.
    handles: Mutex<HashMap<String, ObjectHandle>>,
    /// Private-key label -> its checked CKA_KEY_TYPE, so a signature costs
    /// one C_Sign and not a C_GetAttributeValue too. Cleared with `handles`.
    key_types: Mutex<HashMap<String, KeyType>>,
}

impl fmt::Debug for Pkcs11Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Root")
            .field("token_label", &self.token_label)
            .finish_non_exhaustive()
    }
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Errors that mean the session (not the operation) is gone.
fn session_lost(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::DeviceError
                | RvError::CryptokiNotInitialized
        )
    )
}

/// Errors that mean a cached object handle no longer names an object of
/// this process's view of the token (the token's storage changed under it).
fn handle_stale(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
    )
}

fn device_err(what: &str, e: CkError) -> RootError {
    if handle_stale(&e) {
        RootError::Unavailable(format!(
            "{what}: the key object is no longer on the token ({e}); was the token's storage moved or changed (SoftHSM2: its token directory)? Restore it; if this persists after that, restart keyseald"
        ))
    } else if session_lost(&e) {
        RootError::Unavailable(format!(
            "{what}: token session lost ({e}); keyseal reconnects on the next request"
        ))
    } else {
        RootError::Device(format!("{what}: {e}"))
    }
}

/// RSASSA-PSS parameters: SHA-256, MGF1-SHA-256, 32-byte salt.
fn pss_params() -> PkcsPssParams {
    PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: (PSS_SALT_LEN as u64).into(),
    }
}

/// The PKCS#11 key type a signing key of `alg` has.
fn key_type_of(alg: SignAlg) -> KeyType {
    match alg {
        SignAlg::EcdsaP256Sha256 => KeyType::EC,
        SignAlg::Ed25519 => KeyType::EC_EDWARDS,
        SignAlg::RsaPss3072Sha256 => KeyType::RSA,
    }
}

/// Refuses a key whose type on the token is not what the reference says.
fn check_key_type(label: &str, alg: SignAlg, actual: Option<KeyType>) -> Result<(), RootError> {
    match actual {
        Some(t) if t == key_type_of(alg) => Ok(()),
        _ => Err(key_type_mismatch(label, alg, actual)),
    }
}

fn key_type_mismatch(label: &str, alg: SignAlg, actual: Option<KeyType>) -> RootError {
    match actual {
        Some(t) => RootError::Integrity(format!(
            "signing key '{label}' is referenced as {} but the token holds a {t} key",
            alg.as_str()
        )),
        None => RootError::Device(format!(
            "token returned no key type for signing key '{label}'"
        )),
    }
}

/// Checks the length of a signature the token returned.
fn expect_len(sig: Vec<u8>, len: usize, what: &str) -> Result<Vec<u8>, RootError> {
    if sig.len() != len {
        return Err(RootError::Device(format!(
            "unexpected {what} signature length {} (expected {len})",
            sig.len()
        )));
    }
    Ok(sig)
}

fn root_label(version: u32) -> String {
    format!("{ROOT_LABEL_PREFIX}{version}")
}

impl Pkcs11Root {
    /// Loads the module, finds the token by label and logs in.
    pub fn open(cfg: &Pkcs11Config) -> Result<Self, RootError> {
        if !cfg.module.exists() {
            return Err(RootError::Unavailable(format!(
                "PKCS#11 module {} does not exist; install it (Debian: `apt-get install softhsm2`) or fix root.pkcs11.module",
                cfg.module.display()
            )));
        }
        let ctx = Pkcs11::new(&cfg.module).map_err(|e| {
            RootError::Unavailable(format!(
                "cannot load PKCS#11 module {}: {e}; check root.pkcs11.module",
                cfg.module.display()
            ))
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| {
                RootError::Unavailable(format!(
                    "PKCS#11 module {} failed to initialise: {e}; for SoftHSM2 check SOFTHSM2_CONF and that its tokendir exists and is readable",
                    cfg.module.display()
                ))
            })?;
        let slots = ctx
            .get_slots_with_initialized_token()
            .map_err(|e| RootError::Unavailable(format!("cannot list PKCS#11 slots: {e}")))?;
        let mut found = None;
        let mut labels = Vec::new();
        for slot in slots {
            if let Ok(info) = ctx.get_token_info(slot) {
                let label = info.label().trim_end().to_owned();
                if label == cfg.token_label {
                    found = Some(slot);
                    break;
                }
                labels.push(label);
            }
        }
        let slot = found.ok_or_else(|| {
            RootError::NotInitialised(format!(
                "no PKCS#11 token labelled '{}' (tokens present: {}); create one (SoftHSM2: `softhsm/setup-token.sh` or `softhsm2-util --init-token --free --label {}`) or fix root.pkcs11.token_label",
                cfg.token_label,
                if labels.is_empty() { "none".to_owned() } else { labels.join(", ") },
                cfg.token_label
            ))
        })?;
        let root = Pkcs11Root {
            ctx,
            slot,
            token_label: cfg.token_label.clone(),
            pin: cfg.pin.clone(),
            pool: Mutex::new(Vec::new()),
            create_lock: Mutex::new(()),
            handles: Mutex::new(HashMap::new()),
            key_types: Mutex::new(HashMap::new()),
        };
        // Open one session now so a wrong PIN is reported at start.
        let s = root.new_session()?;
        root.pool.lock().push(s);
        Ok(root)
    }

    fn new_session(&self) -> Result<Session, RootError> {
        let s = self.ctx.open_rw_session(self.slot).map_err(|e| {
            RootError::Unavailable(format!(
                "cannot open a session on token '{}': {e}",
                self.token_label
            ))
        })?;
        let pin = AuthPin::from(self.pin.as_str().to_owned());
        match s.login(UserType::User, Some(&pin)) {
            Ok(()) => Ok(s),
            Err(e) if rv(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(s),
            Err(e) => match rv(&e) {
                Some(RvError::PinIncorrect) | Some(RvError::PinInvalid) | Some(RvError::PinLenRange) => {
                    Err(RootError::Auth(format!(
                        "wrong user PIN for token '{}'; check root.pkcs11.pin_file or KEYSEAL_PKCS11_PIN",
                        self.token_label
                    )))
                }
                Some(RvError::PinLocked) => Err(RootError::Auth(format!(
                    "the user PIN of token '{}' is locked; the token's security officer must reset it",
                    self.token_label
                ))),
                _ => Err(RootError::Unavailable(format!(
                    "cannot log in to token '{}': {e}",
                    self.token_label
                ))),
            },
        }
    }

    /// Runs `f` on a pooled logged-in session; on a lost session, drops it,
    /// forgets cached handles and retries once on a fresh one.
    fn with_session<T>(
        &self,
        f: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<Result<T, CkError>, RootError> {
        for attempt in 0..2 {
            let pooled = self.pool.lock().pop();
            let s = match pooled {
                Some(s) => s,
                None => self.new_session()?,
            };
            let out = f(&s);
            match &out {
                Err(e) if session_lost(e) => {
                    drop(s);
                    self.pool.lock().clear();
                    self.handles.lock().clear();
                    self.key_types.lock().clear();
                    if attempt == 0 {
                        continue;
                    }
                    return Ok(out);
                }
                _ => {
                    let mut pool = self.pool.lock();
                    if pool.len() < MAX_POOLED_SESSIONS {
                        pool.push(s);
                    }
                    return Ok(out);
                }
            }
        }
        Err(RootError::Unavailable(
            "token session lost twice in a row".into(),
        ))
    }

    /// Runs `op` with the handle `key` finds, on a pooled session; when the
    /// cached handle turned stale, forgets cached handles and retries once
    /// with a fresh lookup.
    fn with_key<T>(
        &self,
        key: impl Fn() -> Result<ObjectHandle, RootError>,
        op: impl Fn(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<Result<T, CkError>, RootError> {
        let h = key()?;
        let out = self.with_session(|s| op(s, h))?;
        match &out {
            Err(e) if handle_stale(e) => {
                self.handles.lock().clear();
                self.key_types.lock().clear();
                let h = key()?;
                self.with_session(|s| op(s, h))
            }
            _ => Ok(out),
        }
    }

    fn find(&self, label: &str, class: ObjectClass) -> Result<Option<ObjectHandle>, RootError> {
        let cache_key = format!("{class}/{label}");
        if let Some(h) = self.handles.lock().get(&cache_key) {
            return Ok(Some(*h));
        }
        let template = vec![
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        let found = self
            .with_session(|s| s.find_objects(&template))?
            .map_err(|e| device_err("find object", e))?;
        match found.as_slice() {
            [] => Ok(None),
            [h] => {
                self.handles.lock().insert(cache_key, *h);
                Ok(Some(*h))
            }
            _ => Err(RootError::Device(format!(
                "token holds {} objects labelled '{label}'; remove the duplicates",
                found.len()
            ))),
        }
    }

    fn root_key(&self, version: u32) -> Result<ObjectHandle, RootError> {
        self.find(&root_label(version), ObjectClass::SECRET_KEY)?
            .ok_or_else(|| {
                RootError::NotInitialised(format!(
                    "root key version {version} ('{}') is not on token '{}'; run `keyseal init` for a new token, or restore the token (if its storage was restored while keyseald ran, restart keyseald)",
                    root_label(version),
                    self.token_label
                ))
            })
    }

    fn private_key(&self, key: &SigningKeyRef) -> Result<(String, ObjectHandle), RootError> {
        let label = String::from_utf8(key.handle.clone())
            .map_err(|_| RootError::Integrity("signing key reference is not a label".into()))?;
        let h = self
            .find(&label, ObjectClass::PRIVATE_KEY)?
            .ok_or_else(|| {
                RootError::NotInitialised(format!("signing key '{label}' is not on the token"))
            })?;
        Ok((label, h))
    }

    /// Signs `data` with the private key of `key` under `mechanism`, after
    /// checking that the key on the token is of the type `key.alg` needs
    /// (SoftHSM2 answers a mismatched mechanism with CKR_GENERAL_ERROR).
    fn sign_with(
        &self,
        key: &SigningKeyRef,
        mechanism: &Mechanism,
        data: &[u8],
    ) -> Result<Vec<u8>, RootError> {
        let (label, h) = self.private_key(key)?;
        let wanted = key_type_of(key.alg);
        let checked = self.key_types.lock().get(&label) == Some(&wanted);
        let out = self
            .with_session(|s| {
                if !checked {
                    let actual = s
                        .get_attributes(h, &[AttributeType::KeyType])?
                        .into_iter()
                        .find_map(|a| match a {
                            Attribute::KeyType(t) => Some(t),
                            _ => None,
                        });
                    if actual != Some(wanted) {
                        return Ok(Err(actual));
                    }
                }
                s.sign(mechanism, h, data).map(Ok)
            })?
            .map_err(|e| device_err(&format!("sign ({})", key.alg.as_str()), e))?;
        match out {
            Ok(sig) => {
                if !checked {
                    self.key_types.lock().insert(label, wanted);
                }
                Ok(sig)
            }
            Err(actual) => Err(key_type_mismatch(&label, key.alg, actual)),
        }
    }
}

impl RootOfTrust for Pkcs11Root {
    fn kind(&self) -> BackendKind {
        BackendKind::Pkcs11
    }

    fn has_version(&self, version: u32) -> Result<bool, RootError> {
        Ok(self
            .find(&root_label(version), ObjectClass::SECRET_KEY)?
            .is_some())
    }

    fn create_version(&self, version: u32) -> Result<(), RootError> {
        let _g = self.create_lock.lock();
        let label = root_label(version);
        if self.find(&label, ObjectClass::SECRET_KEY)?.is_some() {
            return Err(RootError::Device(format!(
                "root key '{label}' already exists on token '{}'",
                self.token_label
            )));
        }
        let template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(label.as_bytes().to_vec()),
        ];
        let h = self
            .with_session(|s| s.generate_key(&Mechanism::AesKeyGen, &template))?
            .map_err(|e| device_err("generate root key", e))?;
        self.handles
            .lock()
            .insert(format!("{}/{label}", ObjectClass::SECRET_KEY), h);
        Ok(())
    }

    fn retire_version(&self, version: u32) -> Result<(), RootError> {
        let _g = self.create_lock.lock();
        let label = root_label(version);
        if let Some(h) = self.find(&label, ObjectClass::SECRET_KEY)? {
            self.with_session(|s| s.destroy_object(h))?
                .map_err(|e| device_err("destroy retired root key", e))?;
        }
        self.handles
            .lock()
            .remove(&format!("{}/{label}", ObjectClass::SECRET_KEY));
        Ok(())
    }

    fn wrap(&self, version: u32, dek: &Dek, binding: &[u8]) -> Result<WrappedDek, RootError> {
        if binding.is_empty() {
            return Err(RootError::Config(
                "a DEK binding (AAD) must not be empty".into(),
            ));
        }
        let mut iv = [0u8; GCM_IV_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let ct = self
            .with_key(
                || self.root_key(version),
                |s, key| {
                    let mut iv_buf = iv;
                    let params = GcmParams::new(&mut iv_buf, binding, GCM_TAG_BITS.into())?;
                    s.encrypt(&Mechanism::AesGcm(params), key, dek.expose())
                },
            )?
            .map_err(|e| device_err("wrap DEK", e))?;
        let mut blob = Vec::with_capacity(GCM_IV_LEN + ct.len());
        blob.extend_from_slice(&iv);
        blob.extend_from_slice(&ct);
        Ok(WrappedDek {
            root_version: version,
            blob,
        })
    }

    fn unwrap(&self, wrapped: &WrappedDek, binding: &[u8]) -> Result<Dek, RootError> {
        if wrapped.blob.len() != GCM_IV_LEN + super::DEK_LEN + 16 {
            return Err(RootError::Integrity(
                "wrapped key has the wrong length".into(),
            ));
        }
        let (iv, ct) = wrapped.blob.split_at(GCM_IV_LEN);
        let out = self.with_key(
            || self.root_key(wrapped.root_version),
            |s, key| {
                let mut iv_buf = [0u8; GCM_IV_LEN];
                iv_buf.copy_from_slice(iv);
                let params = GcmParams::new(&mut iv_buf, binding, GCM_TAG_BITS.into())?;
                s.decrypt(&Mechanism::AesGcm(params), key, ct)
            },
        )?;
        match out {
            Ok(pt) => {
                let pt = Zeroizing::new(pt);
                Dek::from_slice(&pt)
            }
            Err(e) if session_lost(&e) || handle_stale(&e) => Err(device_err("unwrap DEK", e)),
            Err(e) => Err(RootError::Integrity(format!(
                "wrapped key did not authenticate under root key v{} ({})",
                wrapped.root_version,
                rv(&e)
                    .map(|r| format!("{r:?}"))
                    .unwrap_or_else(|| "error".into())
            ))),
        }
    }

    fn create_signing_key(&self, label: &str, alg: SignAlg) -> Result<SigningKeyRef, RootError> {
        let (mechanism, mut public) = match alg {
            SignAlg::EcdsaP256Sha256 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(P256_PARAMS.to_vec())],
            ),
            SignAlg::Ed25519 => (
                Mechanism::EccEdwardsKeyPairGen,
                vec![Attribute::EcParams(ED25519_PARAMS.to_vec())],
            ),
            SignAlg::RsaPss3072Sha256 => (
                Mechanism::RsaPkcsKeyPairGen,
                vec![
                    Attribute::ModulusBits((RSA3072_BITS as u64).into()),
                    Attribute::PublicExponent(RSA_F4.to_vec()),
                ],
            ),
        };
        public.extend([
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(label.as_bytes().to_vec()),
        ]);
        // Sign only: no decrypt / unwrap / derive, never leaves the token.
        let private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(label.as_bytes().to_vec()),
        ];
        let _g = self.create_lock.lock();
        if self.find(label, ObjectClass::PRIVATE_KEY)?.is_some() {
            return Err(RootError::Device(format!(
                "signing key '{label}' already exists"
            )));
        }
        let res = self
            .with_session(|s| s.generate_key_pair(&mechanism, &public, &private))?
            .map_err(|e| match rv(&e) {
                Some(RvError::MechanismInvalid | RvError::CurveNotSupported) => {
                    RootError::Unsupported(format!(
                        "{}: token '{}' cannot generate such keys ({e})",
                        alg.as_str(),
                        self.token_label
                    ))
                }
                _ => device_err(&format!("generate {} signing key", alg.as_str()), e),
            });
        let (public_h, private_h) = res?;
        let mut handles = self.handles.lock();
        handles.insert(format!("{}/{label}", ObjectClass::PUBLIC_KEY), public_h);
        handles.insert(format!("{}/{label}", ObjectClass::PRIVATE_KEY), private_h);
        Ok(SigningKeyRef {
            alg,
            handle: label.as_bytes().to_vec(),
        })
    }

    fn public_key_spki(&self, key: &SigningKeyRef) -> Result<Vec<u8>, RootError> {
        let label = String::from_utf8(key.handle.clone())
            .map_err(|_| RootError::Integrity("signing key reference is not a label".into()))?;
        let h = self.find(&label, ObjectClass::PUBLIC_KEY)?.ok_or_else(|| {
            RootError::NotInitialised(format!("public key '{label}' is not on the token"))
        })?;
        let wanted: &[AttributeType] = match key.alg {
            SignAlg::EcdsaP256Sha256 | SignAlg::Ed25519 => {
                &[AttributeType::KeyType, AttributeType::EcPoint]
            }
            SignAlg::RsaPss3072Sha256 => &[
                AttributeType::KeyType,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
            ],
        };
        let attrs = self
            .with_session(|s| s.get_attributes(h, wanted))?
            .map_err(|e| device_err("read public key", e))?;
        let mut key_type = None;
        let mut point = None;
        let mut modulus = None;
        let mut exponent = None;
        for a in attrs {
            match a {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Modulus(m) => modulus = Some(m),
                Attribute::PublicExponent(e) => exponent = Some(e),
                _ => {}
            }
        }
        check_key_type(&label, key.alg, key_type)?;
        match key.alg {
            SignAlg::EcdsaP256Sha256 => {
                let p =
                    point.ok_or_else(|| RootError::Device("token returned no EC point".into()))?;
                // CKA_EC_POINT is a DER OCTET STRING holding the point.
                let point = match der_octet_string(&p) {
                    Some(inner) if inner.len() == 65 => inner.to_vec(),
                    _ => p,
                };
                p256_spki_from_point(&point)
            }
            SignAlg::Ed25519 => {
                let p =
                    point.ok_or_else(|| RootError::Device("token returned no EC point".into()))?;
                // A DER OCTET STRING holding the 32-byte key (PKCS#11 3.0);
                // accept the raw key too.
                let raw = match der_octet_string(&p) {
                    Some(inner) => inner,
                    None => p.as_slice(),
                };
                ed25519_spki(raw)
            }
            SignAlg::RsaPss3072Sha256 => {
                let (Some(n), Some(e)) = (modulus, exponent) else {
                    return Err(RootError::Device(
                        "token returned no RSA modulus / public exponent".into(),
                    ));
                };
                rsa3072_spki(&n, &e)
            }
        }
    }

    fn sign(&self, key: &SigningKeyRef, message: &[u8]) -> Result<Vec<u8>, RootError> {
        match key.alg {
            SignAlg::EcdsaP256Sha256 => self.sign_digest(key, &Sha256::digest(message)),
            SignAlg::Ed25519 => {
                let sig = self.sign_with(
                    key,
                    &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                    message,
                )?;
                expect_len(sig, ED25519_SIG_LEN, "Ed25519")
            }
            SignAlg::RsaPss3072Sha256 => {
                let sig =
                    self.sign_with(key, &Mechanism::Sha256RsaPkcsPss(pss_params()), message)?;
                expect_len(sig, RSA3072_LEN, "RSA-PSS")
            }
        }
    }

    fn sign_digest(&self, key: &SigningKeyRef, digest: &[u8]) -> Result<Vec<u8>, RootError> {
        let mechanism = match key.alg {
            SignAlg::Ed25519 => {
                return Err(RootError::Unsupported(
                    "ed25519: Ed25519 signs whole messages; use sign".into(),
                ))
            }
            SignAlg::EcdsaP256Sha256 => Mechanism::Ecdsa,
            SignAlg::RsaPss3072Sha256 => Mechanism::RsaPkcsPss(pss_params()),
        };
        if digest.len() != 32 {
            return Err(RootError::Config("a SHA-256 digest is 32 bytes".into()));
        }
        let sig = self.sign_with(key, &mechanism, digest)?;
        if key.alg == SignAlg::RsaPss3072Sha256 {
            expect_len(sig, RSA3072_LEN, "RSA-PSS")
        } else {
            ecdsa_raw_to_der(&sig)
        }
    }

    fn destroy_signing_key(&self, key: &SigningKeyRef) -> Result<(), RootError> {
        let label = String::from_utf8(key.handle.clone())
            .map_err(|_| RootError::Integrity("signing key reference is not a label".into()))?;
        let _g = self.create_lock.lock();
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            if let Some(h) = self.find(&label, class)? {
                self.with_session(|s| s.destroy_object(h))?
                    .map_err(|e| device_err("destroy signing key", e))?;
            }
        }
        self.key_types.lock().remove(&label);
        let mut handles = self.handles.lock();
        handles.remove(&format!("{}/{label}", ObjectClass::PRIVATE_KEY));
        handles.remove(&format!("{}/{label}", ObjectClass::PUBLIC_KEY));
        Ok(())
    }
}
