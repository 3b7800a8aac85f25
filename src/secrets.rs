//! Versioned secrets on the sealed store: put (with CAS), get, list,
//! history, soft delete/undelete, destroy, `max_versions` pruning, and root
//! key rotation (rewrap of every wrapped DEK, resumable after a crash).
//!
//! Writers to one name are serialised by a striped lock; the record update
//! is one sled transaction over `secrets` and `versions`, flushed before the
//! call returns, so a failure at any step leaves nothing partial behind.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::ControlFlow;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use zeroize::Zeroizing;

use crate::envelope::{Binding, DekCache, Envelope, EnvelopeError, Sealed};
use crate::name::{check_prefix, NameError, SecretName};
use crate::root::{RootError, RootOfTrust};
use crate::store::{decode, encode, RootState, Store, StoreError};

/// Record kind of secrets in bindings.
const KIND_SECRET: &str = "secret";
const LOCK_STRIPES: usize = 64;

/// Limits and defaults of the secret store.
#[derive(Debug, Clone)]
pub struct SecretsConfig {
    /// Largest accepted value, in bytes (default 1 MiB).
    pub max_value_len: usize,
    /// Versions kept per secret when the secret does not say (default 10).
    pub default_max_versions: u32,
    /// DEK cache entries (0 disables the cache).
    pub cache_capacity: usize,
    /// How long a plaintext DEK may stay cached.
    pub cache_ttl: std::time::Duration,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        SecretsConfig {
            max_value_len: 1024 * 1024,
            default_max_versions: 10,
            cache_capacity: 10_000,
            cache_ttl: std::time::Duration::from_secs(300),
        }
    }
}

/// Who acts and when (unix seconds). `now` is a parameter so tests move time.
#[derive(Debug, Clone)]
pub struct OpCtx {
    pub actor: String,
    pub now: u64,
}

impl OpCtx {
    pub fn new(actor: impl Into<String>) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        OpCtx {
            actor: actor.into(),
            now,
        }
    }
}

/// Metadata of one secret (never holds a value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMeta {
    pub name: String,
    /// Highest version ever written (versions are never reused).
    pub current_version: u64,
    pub created_at: u64,
    pub updated_at: u64,
    pub created_by: String,
    pub labels: BTreeMap<String, String>,
    /// Seconds after a version's creation when it is due for rotation.
    pub rotate_after: Option<u64>,
    /// Unix time after which reads fail with [`SecretsError::Expired`].
    pub expires_at: Option<u64>,
    /// Versions kept; older ones are erased on put. `None`: the store default.
    pub max_versions: Option<u32>,
}

/// State of one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionState {
    Active,
    /// Soft-deleted at the given time; can be undeleted.
    Deleted(u64),
    /// Destroyed at the given time: ciphertext and wrapped DEK are erased.
    Destroyed(u64),
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u64,
    pub created_at: u64,
    pub created_by: String,
    pub state: VersionState,
    /// `None` once destroyed.
    pub sealed: Option<Sealed>,
}

/// Version metadata as shown by `history` (no ciphertext).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    pub version: u64,
    pub created_at: u64,
    pub created_by: String,
    pub state: VersionState,
    pub root_version: Option<u32>,
}

/// A secret value read back. `Debug` masks the value.
pub struct SecretValue {
    pub name: SecretName,
    pub version: u64,
    pub value: Zeroizing<Vec<u8>>,
    pub created_at: u64,
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SecretValue({} v{}, {} bytes ***)",
            self.name,
            self.version,
            self.value.len()
        )
    }
}

/// Options of a put. Fields left `None` keep the secret's current setting.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// Check-and-set: the version the caller expects to be current (0: the
    /// secret must not exist yet).
    pub cas: Option<u64>,
    pub labels: Option<BTreeMap<String, String>>,
    pub rotate_after: Option<u64>,
    pub expires_at: Option<u64>,
    pub max_versions: Option<u32>,
}

/// A page of a listing.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub items: Vec<SecretMeta>,
    /// Pass as `after` to get the next page; `None` at the end.
    pub next: Option<String>,
}

/// Progress of a root rotation, given to the caller's callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationProgress {
    pub from: u32,
    pub to: u32,
    /// Records examined in this pass.
    pub done: u64,
    /// Records in the store when the pass started.
    pub total: u64,
    /// Wrapped DEKs rewrapped so far.
    pub rewrapped: u64,
}

/// How a rotation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationOutcome {
    /// Every DEK is under `to`; the old versions are retired.
    Completed { from: u32, to: u32, rewrapped: u64 },
    /// The callback asked to stop; the next rotation call resumes.
    Interrupted { to: u32, rewrapped: u64 },
}

/// Opens a sealed value at its binding; `Ok(None)`: declined (not cached).
type Opener<'a> =
    dyn Fn(&Binding, &Sealed) -> Result<Option<Zeroizing<Vec<u8>>>, EnvelopeError> + 'a;

/// Errors of the secret store. Messages never contain values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretsError {
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    #[error("value is {len} bytes, more than the maximum of {max} bytes")]
    ValueTooLarge { len: usize, max: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("secret not found")]
    NotFound,
    #[error("version {0} not found")]
    VersionNotFound(u64),
    #[error("version {0} is deleted (undelete it to read it)")]
    VersionDeleted(u64),
    #[error("version {0} is destroyed")]
    VersionDestroyed(u64),
    #[error("secret has expired")]
    Expired,
    #[error("check-and-set failed: expected current version {expected}, found {actual}")]
    CasConflict { expected: u64, actual: u64 },
    #[error("store is not initialised: run `keyseal init` first")]
    NotInitialised,
    #[error("a root rotation is already running")]
    RotationBusy,
    #[error("integrity check failed for {0}: the stored record was tampered with or moved")]
    Integrity(String),
    #[error(transparent)]
    Root(RootError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RootError> for SecretsError {
    fn from(e: RootError) -> Self {
        match e {
            RootError::Integrity(m) => SecretsError::Integrity(m),
            other => SecretsError::Root(other),
        }
    }
}

impl From<sled::Error> for SecretsError {
    fn from(e: sled::Error) -> Self {
        SecretsError::Store(e.into())
    }
}

fn version_key(name: &str, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn versions_prefix(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k
}

fn split_version_key(k: &[u8]) -> Option<(&str, u64)> {
    if k.len() < 10 {
        return None;
    }
    let (name, rest) = k.split_at(k.len() - 9);
    if rest[0] != 0 {
        return None;
    }
    let v = u64::from_be_bytes(rest[1..].try_into().ok()?);
    Some((std::str::from_utf8(name).ok()?, v))
}

fn sealed_key(kind: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(kind.len() + name.len() + 1);
    k.extend_from_slice(kind.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

fn split_sealed_key(k: &[u8]) -> Option<(&str, &str)> {
    let i = k.iter().position(|b| *b == 0)?;
    Some((
        std::str::from_utf8(&k[..i]).ok()?,
        std::str::from_utf8(&k[i + 1..]).ok()?,
    ))
}

fn binding(name: &str, version: u64) -> Binding {
    Binding::new(KIND_SECRET, name, version)
}

/// The secret store: sled records sealed through the envelope.
pub struct SecretStore {
    store: Store,
    envelope: Envelope,
    cfg: SecretsConfig,
    stripes: Vec<Mutex<()>>,
    /// Writers hold it shared from seal to commit; rotation takes it
    /// exclusively to switch the active root version, so no write sealed
    /// under the old version can land after the rewrap pass.
    seal_gate: RwLock<()>,
    rotation: Mutex<()>,
    singleton_lock: Mutex<()>,
}

impl SecretStore {
    /// First-time setup: creates root key version 1 on the device (unless
    /// the device already has it) and records it. Explicit, never implicit.
    pub fn init(store: &Store, root: &dyn RootOfTrust) -> Result<RootState, SecretsError> {
        if let Some(s) = store.root_state()? {
            return Ok(s);
        }
        if !root.has_version(1)? {
            root.create_version(1)?;
        }
        let s = RootState {
            active: 1,
            retired: vec![],
            rotating_to: None,
        };
        store.set_root_state(&s)?;
        Ok(s)
    }

    /// Opens an initialised store over `root`.
    pub fn open(
        store: Store,
        root: Arc<dyn RootOfTrust>,
        cfg: SecretsConfig,
    ) -> Result<Self, SecretsError> {
        let state = store.root_state()?.ok_or(SecretsError::NotInitialised)?;
        for v in &state.retired {
            root.retire_version(*v)?;
        }
        if !root.has_version(state.active)? {
            return Err(SecretsError::Root(RootError::NotInitialised(format!(
                "the store's active root key version {} is not on the root device; point the config at the device that holds it, or restore it",
                state.active
            ))));
        }
        let cache = DekCache::new(cfg.cache_capacity, cfg.cache_ttl);
        Ok(SecretStore {
            envelope: Envelope::new(root, state.active, cache),
            store,
            cfg,
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            seal_gate: RwLock::new(()),
            rotation: Mutex::new(()),
            singleton_lock: Mutex::new(()),
        })
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &SecretsConfig {
        &self.cfg
    }

    /// Number of secrets (names) stored.
    pub fn count(&self) -> usize {
        self.store.secrets.len()
    }

    fn stripe(&self, name: &SecretName) -> &Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        &self.stripes[(h.finish() as usize) % LOCK_STRIPES]
    }

    fn meta(&self, name: &str) -> Result<Option<SecretMeta>, SecretsError> {
        match self.store.secrets.get(name.as_bytes())? {
            Some(b) => Ok(Some(decode("secrets", &b)?)),
            None => Ok(None),
        }
    }

    fn record(&self, name: &str, version: u64) -> Result<Option<VersionRecord>, SecretsError> {
        match self.store.versions.get(version_key(name, version))? {
            Some(b) => Ok(Some(decode("versions", &b)?)),
            None => Ok(None),
        }
    }

    fn records(&self, name: &str) -> Result<Vec<VersionRecord>, SecretsError> {
        let mut out = Vec::new();
        for kv in self.store.versions.scan_prefix(versions_prefix(name)) {
            let (_, v) = kv?;
            out.push(decode("versions", &v)?);
        }
        Ok(out)
    }

    /// The newest active version, scanning from the newest down (a warm
    /// get decodes one record, not the whole history).
    fn latest_active(&self, name: &str) -> Result<Option<VersionRecord>, SecretsError> {
        for kv in self.store.versions.scan_prefix(versions_prefix(name)).rev() {
            let (_, v) = kv?;
            let r: VersionRecord = decode("versions", &v)?;
            if r.state == VersionState::Active {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Version numbers stored for `name`, oldest first (keys only, no decoding).
    fn version_numbers(&self, name: &str) -> Result<Vec<u64>, SecretsError> {
        let mut out = Vec::new();
        for k in self
            .store
            .versions
            .scan_prefix(versions_prefix(name))
            .keys()
        {
            let k = k?;
            let (_, v) = split_version_key(&k).ok_or_else(|| StoreError::Corrupt {
                tree: "versions",
                reason: "bad key".into(),
            })?;
            out.push(v);
        }
        Ok(out)
    }

    /// Stores a new version of `name`; returns its version number.
    pub fn put(
        &self,
        ctx: &OpCtx,
        name: &SecretName,
        value: &[u8],
        opts: &PutOptions,
    ) -> Result<u64, SecretsError> {
        if value.len() > self.cfg.max_value_len {
            return Err(SecretsError::ValueTooLarge {
                len: value.len(),
                max: self.cfg.max_value_len,
            });
        }
        if opts.max_versions == Some(0) {
            return Err(SecretsError::InvalidArgument(
                "max_versions must be at least 1".into(),
            ));
        }
        // Before sealing and before sled: keep the free-space reserve.
        self.store.disk.check_write()?;
        let _w = self.stripe(name).lock();
        let n = name.as_str();
        let old = self.meta(n)?;
        let current = old.as_ref().map(|m| m.current_version).unwrap_or(0);
        if let Some(expected) = opts.cas {
            if expected != current {
                return Err(SecretsError::CasConflict {
                    expected,
                    actual: current,
                });
            }
        }
        let version = current
            .checked_add(1)
            .ok_or_else(|| SecretsError::InvalidArgument("version counter exhausted".into()))?;
        let mut meta = old.unwrap_or_else(|| SecretMeta {
            name: n.to_owned(),
            current_version: 0,
            created_at: ctx.now,
            updated_at: ctx.now,
            created_by: ctx.actor.clone(),
            labels: BTreeMap::new(),
            rotate_after: None,
            expires_at: None,
            max_versions: None,
        });
        meta.current_version = version;
        meta.updated_at = ctx.now;
        if let Some(l) = &opts.labels {
            meta.labels = l.clone();
        }
        if opts.rotate_after.is_some() {
            meta.rotate_after = opts.rotate_after;
        }
        if opts.expires_at.is_some() {
            meta.expires_at = opts.expires_at;
        }
        if opts.max_versions.is_some() {
            meta.max_versions = opts.max_versions;
        }
        let keep = meta
            .max_versions
            .unwrap_or(self.cfg.default_max_versions)
            .max(1) as usize;
        let existing = self.version_numbers(n)?;
        let prune: Vec<u64> = if existing.len() + 1 > keep {
            existing[..existing.len() + 1 - keep].to_vec()
        } else {
            vec![]
        };

        let gate = self.seal_gate.read();
        let b = binding(n, version);
        let sealed = self.envelope.seal(&b, value).map_err(env_err)?;
        let rec = VersionRecord {
            version,
            created_at: ctx.now,
            created_by: ctx.actor.clone(),
            state: VersionState::Active,
            sealed: Some(sealed),
        };
        let meta_bytes = encode(&meta)?;
        let rec_bytes = encode(&rec)?;
        let res = (&self.store.secrets, &self.store.versions).transaction(|(s, v)| {
            s.insert(n.as_bytes(), meta_bytes.as_slice())?;
            v.insert(version_key(n, version), rec_bytes.as_slice())?;
            for p in &prune {
                v.remove(version_key(n, *p))?;
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        drop(gate);
        if let Err(e) = res {
            self.envelope.forget(&b);
            return Err(tx_err(e));
        }
        self.store.flush()?;
        for p in prune {
            self.envelope.forget(&binding(n, p));
        }
        Ok(version)
    }

    /// Reads `version` of `name`, or the newest active version.
    pub fn get(
        &self,
        ctx: &OpCtx,
        name: &SecretName,
        version: Option<u64>,
    ) -> Result<SecretValue, SecretsError> {
        match self.get_with(ctx, name, version, &|b, s| {
            self.envelope.open(b, s).map(Some)
        })? {
            Some(v) => Ok(v),
            // `open` never declines; kept total rather than panicking.
            None => Err(SecretsError::Root(RootError::Unavailable(
                "the value could not be opened".into(),
            ))),
        }
    }

    /// [`SecretStore::get`] without the root device: `Ok(None)` when the
    /// value's DEK is not cached (then call `get` from a blocking thread).
    /// Only store reads and in-memory crypto: fit for an async thread.
    pub fn get_cached(
        &self,
        ctx: &OpCtx,
        name: &SecretName,
        version: Option<u64>,
    ) -> Result<Option<SecretValue>, SecretsError> {
        self.get_with(ctx, name, version, &|b, s| self.envelope.open_cached(b, s))
    }

    fn get_with(
        &self,
        ctx: &OpCtx,
        name: &SecretName,
        version: Option<u64>,
        open: &Opener<'_>,
    ) -> Result<Option<SecretValue>, SecretsError> {
        let n = name.as_str();
        let meta = self.meta(n)?.ok_or(SecretsError::NotFound)?;
        if let Some(exp) = meta.expires_at {
            if ctx.now >= exp {
                return Err(SecretsError::Expired);
            }
        }
        let rec = match version {
            Some(0) => return Err(SecretsError::InvalidArgument("versions start at 1".into())),
            Some(v) => self.record(n, v)?.ok_or(SecretsError::VersionNotFound(v))?,
            None => {
                // Usually the newest version is the active one: one point
                // read instead of a reverse scan.
                match self.record(n, meta.current_version)? {
                    Some(r) if r.state == VersionState::Active => r,
                    _ => self.latest_active(n)?.ok_or(SecretsError::NotFound)?,
                }
            }
        };
        match rec.state {
            VersionState::Deleted(_) => return Err(SecretsError::VersionDeleted(rec.version)),
            VersionState::Destroyed(_) => return Err(SecretsError::VersionDestroyed(rec.version)),
            VersionState::Active => {}
        }
        let sealed = rec
            .sealed
            .as_ref()
            .ok_or(SecretsError::VersionDestroyed(rec.version))?;
        let value = open(&binding(n, rec.version), sealed).map_err(|e| match e {
            EnvelopeError::Integrity => SecretsError::Integrity(format!("{n} v{}", rec.version)),
            other => env_err(other),
        })?;
        Ok(value.map(|value| SecretValue {
            name: name.clone(),
            version: rec.version,
            value,
            created_at: rec.created_at,
        }))
    }

    /// Metadata of one secret.
    pub fn describe(&self, name: &SecretName) -> Result<SecretMeta, SecretsError> {
        self.meta(name.as_str())?.ok_or(SecretsError::NotFound)
    }

    /// Lists secrets whose name starts with `prefix`, after the cursor `after`.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, SecretsError> {
        check_prefix(prefix)?;
        let limit = limit.clamp(1, 10_000);
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.as_bytes().to_vec()),
            None => std::ops::Bound::Included(prefix.as_bytes().to_vec()),
        };
        let mut items = Vec::new();
        let mut next = None;
        for kv in self
            .store
            .secrets
            .range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded))
        {
            let (k, v) = kv?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            if items.len() == limit {
                next = items.last().map(|m: &SecretMeta| m.name.clone());
                break;
            }
            items.push(decode("secrets", &v)?);
        }
        Ok(ListPage { items, next })
    }

    /// Every stored version of `name`, oldest first.
    pub fn history(&self, name: &SecretName) -> Result<Vec<VersionInfo>, SecretsError> {
        let n = name.as_str();
        self.meta(n)?.ok_or(SecretsError::NotFound)?;
        Ok(self
            .records(n)?
            .into_iter()
            .map(|r| VersionInfo {
                version: r.version,
                created_at: r.created_at,
                created_by: r.created_by,
                state: r.state,
                root_version: r.sealed.map(|s| s.wrapped.root_version),
            })
            .collect())
    }

    /// Changes the state of some versions in one transaction. Every version
    /// must exist and allow the transition, or nothing changes.
    fn transition(
        &self,
        ctx: &OpCtx,
        name: &SecretName,
        versions: &[u64],
        f: impl Fn(&mut VersionRecord) -> Result<(), SecretsError>,
    ) -> Result<Vec<u64>, SecretsError> {
        self.store.disk.check_write()?;
        let _w = self.stripe(name).lock();
        let n = name.as_str();
        let mut meta = self.meta(n)?.ok_or(SecretsError::NotFound)?;
        let targets: Vec<u64> = if versions.is_empty() {
            let latest = self.latest_active(n)?.ok_or(SecretsError::NotFound)?;
            vec![latest.version]
        } else {
            versions.to_vec()
        };
        let mut updates = Vec::new();
        for v in &targets {
            let mut rec = self
                .record(n, *v)?
                .ok_or(SecretsError::VersionNotFound(*v))?;
            f(&mut rec)?;
            updates.push((version_key(n, *v), encode(&rec)?));
        }
        meta.updated_at = ctx.now;
        let meta_bytes = encode(&meta)?;
        (&self.store.secrets, &self.store.versions)
            .transaction(|(s, v)| {
                s.insert(n.as_bytes(), meta_bytes.as_slice())?;
                for (k, val) in &updates {
                    v.insert(k.as_slice(), val.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(tx_err)?;
        self.store.flush()?;
        Ok(targets)
    }

    /// Soft-deletes versions (none given: the newest active one).
    pub fn delete(
        &self,
        ctx: &OpCtx,
        name: &SecretName,
        versions: &[u64],
    ) -> Result<Vec<u64>, SecretsError> {
        let now = ctx.now;
        self.transition(ctx, name, versions, |r| match r.state {
            VersionState::Destroyed(_) => Err(SecretsError::VersionDestroyed(r.version)),
            _ => {
                if r.state == VersionState::Active {
                    r.state = VersionState::Deleted(now);
                }
                Ok(())
            }
        })
    }

    /// Restores soft-deleted versions.
    pub fn undelete(
        &self,
        ctx: &OpCtx,
        name: &SecretName,
        versions: &[u64],
    ) -> Result<Vec<u64>, SecretsError> {
        if versions.is_empty() {
            return Err(SecretsError::InvalidArgument(
                "name the versions to undelete".into(),
            ));
        }
        self.transition(ctx, name, versions, |r| match r.state {
            VersionState::Destroyed(_) => Err(SecretsError::VersionDestroyed(r.version)),
            _ => {
                r.state = VersionState::Active;
                Ok(())
            }
        })
    }

    /// Destroys versions: ciphertext and wrapped DEK are erased for good.
    pub fn destroy(
        &self,
        ctx: &OpCtx,
        name: &SecretName,
        versions: &[u64],
    ) -> Result<Vec<u64>, SecretsError> {
        if versions.is_empty() {
            return Err(SecretsError::InvalidArgument(
                "name the versions to destroy".into(),
            ));
        }
        let now = ctx.now;
        let done = self.transition(ctx, name, versions, |r| {
            r.state = VersionState::Destroyed(now);
            r.sealed = None;
            Ok(())
        })?;
        for v in &done {
            self.envelope.forget(&binding(name.as_str(), *v));
        }
        Ok(done)
    }

    /// Seals a singleton value of the daemon itself (kind, name) — e.g. the
    /// API-key pepper — replacing any previous one. Root rotation rewraps it
    /// like every secret.
    pub fn seal_value(&self, kind: &str, name: &str, plaintext: &[u8]) -> Result<(), SecretsError> {
        self.store.disk.check_write()?;
        let _g = self.seal_gate.read();
        let b = Binding::new(kind, name, 0);
        let sealed = self.envelope.seal(&b, plaintext).map_err(env_err)?;
        self.store
            .sealed
            .insert(sealed_key(kind, name), encode(&sealed)?)?;
        self.store.flush()?;
        Ok(())
    }

    /// Opens a singleton sealed with [`SecretStore::seal_value`], if present.
    pub fn open_value(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, SecretsError> {
        let Some(raw) = self.store.sealed.get(sealed_key(kind, name))? else {
            return Ok(None);
        };
        let sealed: Sealed = decode("sealed", &raw)?;
        let b = Binding::new(kind, name, 0);
        self.envelope
            .open(&b, &sealed)
            .map(Some)
            .map_err(|e| match e {
                EnvelopeError::Integrity => {
                    SecretsError::Integrity(format!("sealed {kind}/{name}"))
                }
                other => env_err(other),
            })
    }

    /// Opens the singleton (kind, name), creating it with `make` first when
    /// absent. Serialised, so two callers never create two different values.
    pub fn open_or_create_value(
        &self,
        kind: &str,
        name: &str,
        make: impl FnOnce() -> Zeroizing<Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, SecretsError> {
        let _l = self.singleton_lock.lock();
        if let Some(v) = self.open_value(kind, name)? {
            return Ok(v);
        }
        let v = make();
        self.seal_value(kind, name, &v)?;
        Ok(v)
    }

    /// The version a pending (interrupted) rotation is heading to, if any.
    pub fn pending_rotation(&self) -> Result<Option<u32>, SecretsError> {
        Ok(self.store.root_state()?.and_then(|s| s.rotating_to))
    }

    /// Rotates the root key: creates a new version, makes it active, rewraps
    /// every wrapped DEK under it, then retires the old versions. Resumes an
    /// interrupted rotation instead of starting a new one. Reads and writes
    /// keep working meanwhile. `progress` may return `Break` to stop early
    /// (the state stays, the next call resumes).
    pub fn rotate_root(
        &self,
        progress: &mut dyn FnMut(RotationProgress) -> ControlFlow<()>,
    ) -> Result<RotationOutcome, SecretsError> {
        let _r = self.rotation.try_lock().ok_or(SecretsError::RotationBusy)?;
        self.store.disk.check_write()?;
        let mut st = self
            .store
            .root_state()?
            .ok_or(SecretsError::NotInitialised)?;
        let from = st.active;
        let to = match st.rotating_to {
            Some(t) => t,
            None => {
                let t = st
                    .retired
                    .iter()
                    .copied()
                    .chain([st.active])
                    .max()
                    .unwrap_or(0)
                    + 1;
                st.rotating_to = Some(t);
                self.store.set_root_state(&st)?;
                t
            }
        };
        if !self.envelope.root().has_version(to)? {
            self.envelope.root().create_version(to)?;
        }
        {
            let _g = self.seal_gate.write();
            st.active = to;
            self.store.set_root_state(&st)?;
            self.envelope.set_active_version(to);
        }
        let mut rewrapped = 0u64;
        loop {
            let total = (self.store.versions.len() + self.store.sealed.len()) as u64;
            let mut changed = 0u64;
            let records = self
                .store
                .versions
                .iter()
                .map(|kv| kv.map(|(k, _)| (false, k)));
            let singletons = self
                .store
                .sealed
                .iter()
                .map(|kv| kv.map(|(k, _)| (true, k)));
            for (i, kv) in records.chain(singletons).enumerate() {
                let (singleton, k) = kv?;
                let done = i as u64 + 1;
                let did = if singleton {
                    self.rewrap_singleton(&k, to)?
                } else {
                    self.rewrap_one(&k, to)?
                };
                if did {
                    changed += 1;
                    rewrapped += 1;
                }
                if progress(RotationProgress {
                    from,
                    to,
                    done,
                    total,
                    rewrapped,
                })
                .is_break()
                {
                    self.store.flush()?;
                    return Ok(RotationOutcome::Interrupted { to, rewrapped });
                }
            }
            self.store.flush()?;
            if changed == 0 {
                break;
            }
        }
        let root = self.envelope.root();
        // A set: `retired` holds every version ever retired, so looking each
        // candidate up in the Vec made a rotation cost O(to²) — half of a
        // grpc_messages fuzz process's time once it had rotated thousands
        // of times.
        let retired: std::collections::HashSet<u32> = st.retired.iter().copied().collect();
        let mut old: Vec<u32> = (1..to).filter(|v| !retired.contains(v)).collect();
        for v in &old {
            root.retire_version(*v)?;
        }
        st.retired.append(&mut old);
        st.rotating_to = None;
        self.store.set_root_state(&st)?;
        Ok(RotationOutcome::Completed {
            from,
            to,
            rewrapped,
        })
    }

    /// Rewraps a sealed singleton's DEK under `to` if needed (CAS).
    fn rewrap_singleton(&self, k: &[u8], to: u32) -> Result<bool, SecretsError> {
        let (kind, name) = split_sealed_key(k).ok_or_else(|| StoreError::Corrupt {
            tree: "sealed",
            reason: "bad key".into(),
        })?;
        for _ in 0..16 {
            self.store.disk.check_write()?;
            let Some(cur) = self.store.sealed.get(k)? else {
                return Ok(false);
            };
            let mut sealed: Sealed = decode("sealed", &cur)?;
            if sealed.wrapped.root_version == to {
                return Ok(false);
            }
            let b = Binding::new(kind, name, 0);
            sealed.wrapped =
                self.envelope
                    .rewrap(&b, &sealed.wrapped, to)
                    .map_err(|e| match e {
                        EnvelopeError::Integrity => {
                            SecretsError::Integrity(format!("sealed {kind}/{name}"))
                        }
                        other => env_err(other),
                    })?;
            if self
                .store
                .sealed
                .compare_and_swap(k, Some(cur), Some(encode(&sealed)?))?
                .is_ok()
            {
                return Ok(true);
            }
        }
        Err(SecretsError::Store(StoreError::Io(format!(
            "sealed {kind}/{name} kept changing during rewrap; run the rotation again"
        ))))
    }

    /// Rewraps the DEK of the record at key `k` under `to` if needed;
    /// compare-and-swap so a concurrent delete/destroy/prune is never undone.
    fn rewrap_one(&self, k: &[u8], to: u32) -> Result<bool, SecretsError> {
        let (name, version) = split_version_key(k).ok_or_else(|| StoreError::Corrupt {
            tree: "versions",
            reason: "bad key".into(),
        })?;
        for _ in 0..16 {
            self.store.disk.check_write()?;
            let Some(cur) = self.store.versions.get(k)? else {
                return Ok(false);
            };
            let mut rec: VersionRecord = decode("versions", &cur)?;
            let Some(sealed) = rec.sealed.as_mut() else {
                return Ok(false);
            };
            if sealed.wrapped.root_version == to {
                return Ok(false);
            }
            let b = binding(name, version);
            sealed.wrapped =
                self.envelope
                    .rewrap(&b, &sealed.wrapped, to)
                    .map_err(|e| match e {
                        EnvelopeError::Integrity => {
                            SecretsError::Integrity(format!("{name} v{version}"))
                        }
                        other => env_err(other),
                    })?;
            let new = encode(&rec)?;
            if self
                .store
                .versions
                .compare_and_swap(k, Some(cur), Some(new))?
                .is_ok()
            {
                return Ok(true);
            }
        }
        Err(SecretsError::Store(StoreError::Io(format!(
            "record {name} v{version} kept changing during rewrap; run the rotation again"
        ))))
    }
}

fn env_err(e: EnvelopeError) -> SecretsError {
    match e {
        EnvelopeError::Root(r) => r.into(),
        EnvelopeError::Integrity => SecretsError::Integrity("sealed value".into()),
    }
}

fn tx_err(e: TransactionError<()>) -> SecretsError {
    match e {
        TransactionError::Abort(()) => {
            SecretsError::Store(StoreError::Io("transaction aborted".into()))
        }
        TransactionError::Storage(s) => SecretsError::Store(s.into()),
    }
}
