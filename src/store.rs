//! The sled store: one tree per record kind, big-endian integer keys, and a
//! `meta` tree holding the schema version and the root key state.
//!
//! Trees: `meta`, `secrets` (name -> [`crate::secrets::SecretMeta`]),
//! `versions` (name || 0x00 || version BE -> [`crate::secrets::VersionRecord`]),
//! `sealed` (kind || 0x00 || name -> [`crate::envelope::Sealed`], the
//! daemon's own sealed singletons). Other layers add their own trees.
//! Records are `postcard`-encoded. Every acknowledged write is flushed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The schema this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

const META_SCHEMA: &[u8] = b"schema";
const META_ROOT: &[u8] = b"root";

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store at {path} has schema version {found}, newer than this keyseal understands ({SCHEMA_VERSION}); upgrade keyseal (the store was not changed)")]
    SchemaTooNew { path: String, found: u32 },
    #[error("cannot open store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store is out of space: {0}; free disk space, then retry")]
    NoSpace(String),
    #[error("storage error: {0}")]
    Io(String),
    #[error("corrupt record in tree '{tree}': {reason}")]
    Corrupt { tree: &'static str, reason: String },
}

/// Set when sled reported an I/O error in this process (see [`io_failed`]).
static SLED_IO_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether sled reported an I/O error (e.g. a full disk) since start. sled
/// 0.34 stops writing after one and its iterators spin, so store work is
/// refused up front until keyseald restarts (`DaemonState::store_failed`).
pub fn io_failed() -> bool {
    SLED_IO_FAILED.load(std::sync::atomic::Ordering::SeqCst)
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        if matches!(e, sled::Error::Io(_)) {
            SLED_IO_FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        match e {
            // sled hands out clones of the error that stopped it, which
            // keep the kind and the original's Debug text but not the OS
            // code (`ErrorKind::StorageFull` is newer than our MSRV).
            sled::Error::Io(io)
                if io.raw_os_error() == Some(28) || format!("{io:?}").contains("code: 28,") =>
            {
                StoreError::NoSpace(io.to_string())
            }
            other => StoreError::Io(other.to_string()),
        }
    }
}

/// Root key state, persisted in `meta`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootState {
    /// The version new DEKs are wrapped under.
    pub active: u32,
    /// Versions retired after a completed rotation.
    pub retired: Vec<u32>,
    /// Set while a rotation is under way: the version being rotated to.
    pub rotating_to: Option<u32>,
}

/// Default cap of sled's page cache (`store.cache_bytes`): 64 MiB, where
/// sled's own default is 1 GiB. Pages beyond it are re-read through the
/// kernel's page cache; the DEK cache keeps hot reads off the root device.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Free-space thresholds of the store's file system (`[store]`
/// `min_free_bytes`, `audit_reserve_bytes`). Both 0: no guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskLimits {
    /// Below this many free bytes every store write except audit appends
    /// is refused ([`StoreError::NoSpace`], RESOURCE_EXHAUSTED).
    pub min_free_bytes: u64,
    /// Below this many free bytes audit appends are refused too (requests
    /// then fail with UNAVAILABLE). Smaller than `min_free_bytes`: the
    /// space between the two is the reserve that reads and their audit
    /// events keep working in.
    pub audit_reserve_bytes: u64,
}

impl DiskLimits {
    pub const DEFAULT_MIN_FREE: u64 = 64 * 1024 * 1024;
    pub const DEFAULT_AUDIT_RESERVE: u64 = 8 * 1024 * 1024;
    /// No guard (library use, tests of other layers).
    pub const NONE: DiskLimits = DiskLimits {
        min_free_bytes: 0,
        audit_reserve_bytes: 0,
    };

    /// Checks the pair: both 0 (guard off), or `0 < audit_reserve_bytes <
    /// min_free_bytes <= 1 TiB`.
    pub fn validate(&self) -> Result<(), String> {
        if *self == Self::NONE {
            return Ok(());
        }
        if self.audit_reserve_bytes == 0 || self.audit_reserve_bytes >= self.min_free_bytes {
            return Err(format!(
                "store.audit_reserve_bytes ({}) must be at least 1 and smaller than store.min_free_bytes ({}) (set both to 0 to turn the free-space guard off)",
                self.audit_reserve_bytes, self.min_free_bytes
            ));
        }
        if self.min_free_bytes > 1 << 40 {
            return Err(format!(
                "store.min_free_bytes ({}) must be at most 1 TiB",
                self.min_free_bytes
            ));
        }
        Ok(())
    }
}

impl Default for DiskLimits {
    fn default() -> Self {
        DiskLimits {
            min_free_bytes: Self::DEFAULT_MIN_FREE,
            audit_reserve_bytes: Self::DEFAULT_AUDIT_RESERVE,
        }
    }
}

/// Where [`DiskGuard`] reads the free bytes from.
pub type FreeSpaceSource = Box<dyn Fn() -> std::io::Result<u64> + Send + Sync>;

/// What [`DiskGuard::state`] reports (for `keyseal status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskState {
    /// Free bytes for unprivileged users; `None` when unknown (guard off,
    /// or `statvfs` failed).
    pub free_bytes: Option<u64>,
    pub limits: DiskLimits,
    /// Store writes are refused for want of space.
    pub writes_refused: bool,
    /// Audit appends are refused too (requests fail with UNAVAILABLE).
    pub audit_refused: bool,
}

/// Keeps a free-space reserve on the store's file system so that sled
/// never runs into ENOSPC from keyseal's own writes: sled stops all I/O
/// after a failed write until the database is reopened. Every layer that
/// writes to the store asks [`DiskGuard::check_write`] (or, for audit
/// appends, [`DiskGuard::check_audit`]) before touching sled. The free
/// bytes (`statvfs` `f_bavail`) are cached for [`DiskGuard::TTL`].
pub struct DiskGuard {
    path: PathBuf,
    limits: DiskLimits,
    ttl: Duration,
    source: FreeSpaceSource,
    cached: parking_lot::Mutex<Option<(Instant, Option<u64>)>>,
}

impl std::fmt::Debug for DiskGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskGuard")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl DiskGuard {
    /// How long a free-space reading is reused.
    pub const TTL: Duration = Duration::from_millis(200);

    /// A guard over the file system holding `path`, read with `statvfs`.
    pub fn statvfs(path: &Path, limits: DiskLimits) -> DiskGuard {
        let p = path.to_path_buf();
        Self::with_source(
            path,
            limits,
            Self::TTL,
            Box::new(move || {
                let s = nix::sys::statvfs::statvfs(&p).map_err(std::io::Error::from)?;
                Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
            }),
        )
    }

    /// A guard with its own free-space source (tests, drills).
    pub fn with_source(
        path: &Path,
        limits: DiskLimits,
        ttl: Duration,
        source: FreeSpaceSource,
    ) -> DiskGuard {
        DiskGuard {
            path: path.to_path_buf(),
            limits,
            ttl,
            source,
            cached: parking_lot::Mutex::new(None),
        }
    }

    /// A guard that never refuses.
    pub fn unlimited() -> DiskGuard {
        Self::with_source(
            Path::new(""),
            DiskLimits::NONE,
            Self::TTL,
            Box::new(|| Ok(0)),
        )
    }

    /// The path whose file system is watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn limits(&self) -> DiskLimits {
        self.limits
    }

    pub fn enabled(&self) -> bool {
        self.limits != DiskLimits::NONE
    }

    /// The free bytes (cached reading); `None` when the guard is off or
    /// the file system cannot be asked (then nothing is refused: sled's
    /// own I/O-error detection still applies).
    pub fn free_bytes(&self) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        let mut c = self.cached.lock();
        let now = Instant::now();
        if let Some((at, v)) = *c {
            if now.duration_since(at) < self.ttl {
                return v;
            }
        }
        let v = match (self.source)() {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "cannot read the free space of the store's file system; not enforcing the reserve");
                None
            }
        };
        *c = Some((now, v));
        v
    }

    fn refuse(&self, free: u64, setting: &str, limit: u64, what: &str) -> StoreError {
        StoreError::NoSpace(format!(
            "{free} bytes free on the file system of {} (statvfs), below store.{setting} = {limit}; {what}",
            self.path.display()
        ))
    }

    /// Ok when a store write (anything but an audit append) may go ahead.
    pub fn check_write(&self) -> Result<(), StoreError> {
        match self.free_bytes() {
            Some(free) if free < self.limits.min_free_bytes => Err(self.refuse(
                free,
                "min_free_bytes",
                self.limits.min_free_bytes,
                "writes are refused to keep a reserve for reads and the audit log",
            )),
            _ => Ok(()),
        }
    }

    /// Ok when an audit append (or another write of the audit log) may go
    /// ahead: above `audit_reserve_bytes`.
    pub fn check_audit(&self) -> Result<(), StoreError> {
        match self.free_bytes() {
            Some(free) if free < self.limits.audit_reserve_bytes => Err(self.refuse(
                free,
                "audit_reserve_bytes",
                self.limits.audit_reserve_bytes,
                "audit events cannot be written, so requests are refused",
            )),
            _ => Ok(()),
        }
    }

    pub fn state(&self) -> DiskState {
        let free_bytes = self.free_bytes();
        DiskState {
            free_bytes,
            limits: self.limits,
            writes_refused: free_bytes.is_some_and(|f| f < self.limits.min_free_bytes),
            audit_refused: free_bytes.is_some_and(|f| f < self.limits.audit_reserve_bytes),
        }
    }
}

/// The opened store.
#[derive(Clone)]
pub struct Store {
    /// The free-space guard of the store's file system: ask it before
    /// every write (see [`DiskGuard`]).
    pub disk: Arc<DiskGuard>,
    pub db: sled::Db,
    pub meta: sled::Tree,
    pub secrets: sled::Tree,
    pub versions: sled::Tree,
    /// Singleton sealed values of the daemon itself (e.g. the API-key
    /// pepper, the audit HMAC key): `kind || 0x00 || name` -> `Sealed`.
    pub sealed: sled::Tree,
    /// The directory it was opened from (`None` for [`Store::from_db`]);
    /// the audit log keeps its files under `<dir>/audit/`.
    pub dir: Option<PathBuf>,
}

impl Store {
    /// Opens (creating if needed) the store at `path`, checking its
    /// schema, with the default free-space limits.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, DiskLimits::default())
    }

    /// [`Store::open`] with the free-space limits of `[store]` and the
    /// default page cache ([`DEFAULT_CACHE_BYTES`]).
    pub fn open_with(path: &Path, limits: DiskLimits) -> Result<Store, StoreError> {
        Self::open_tuned(path, limits, DEFAULT_CACHE_BYTES)
    }

    /// [`Store::open_with`] with sled's page cache capped at `cache_bytes`
    /// (`store.cache_bytes`): the bound on the memory the store's pages
    /// take, whatever the store's size on disk.
    pub fn open_tuned(
        path: &Path,
        limits: DiskLimits,
        cache_bytes: u64,
    ) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: match &e {
                    // sled wraps the flock failure as ErrorKind::Other.
                    sled::Error::Io(io)
                        if io.kind() == std::io::ErrorKind::WouldBlock
                            || io.to_string().contains("could not acquire lock") =>
                    {
                        "it is locked by another process (is keyseald running? stop it first)"
                            .into()
                    }
                    other => other.to_string(),
                },
            })?;
        let meta = db.open_tree("meta")?;
        match meta.get(META_SCHEMA)? {
            Some(v) => {
                let found =
                    u32::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                        tree: "meta",
                        reason: "schema version is not 4 bytes".into(),
                    })?);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        path: path.display().to_string(),
                        found,
                    });
                }
            }
            None => {
                meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
        }
        let mut s = Self::from_db(db)?;
        s.disk = Arc::new(DiskGuard::statvfs(path, limits));
        s.dir = Some(path.to_path_buf());
        Ok(s)
    }

    /// Wraps an already opened sled database (schema not checked, no
    /// free-space guard).
    pub fn from_db(db: sled::Db) -> Result<Store, StoreError> {
        Ok(Store {
            disk: Arc::new(DiskGuard::unlimited()),
            meta: db.open_tree("meta")?,
            secrets: db.open_tree("secrets")?,
            versions: db.open_tree("versions")?,
            sealed: db.open_tree("sealed")?,
            db,
            dir: None,
        })
    }

    /// The root key state, if the store was initialised.
    pub fn root_state(&self) -> Result<Option<RootState>, StoreError> {
        match self.meta.get(META_ROOT)? {
            Some(v) => Ok(Some(decode("meta", &v)?)),
            None => Ok(None),
        }
    }

    /// Persists the root key state and flushes.
    pub fn set_root_state(&self, s: &RootState) -> Result<(), StoreError> {
        self.disk.check_write()?;
        self.meta.insert(META_ROOT, encode(s)?)?;
        self.flush()
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(v).map_err(|e| StoreError::Io(format!("encode: {e}")))
}

pub fn decode<T: DeserializeOwned>(tree: &'static str, b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Corrupt {
        tree,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const MIB: u64 = 1024 * 1024;

    /// A guard over a free-space value the test sets; counts readings.
    fn guard(ttl: Duration) -> (DiskGuard, Arc<AtomicU64>, Arc<AtomicU64>) {
        let free = Arc::new(AtomicU64::new(100 * MIB));
        let reads = Arc::new(AtomicU64::new(0));
        let (f, r) = (free.clone(), reads.clone());
        let g = DiskGuard::with_source(
            Path::new("/srv/keyseal/store"),
            DiskLimits {
                min_free_bytes: 8 * MIB,
                audit_reserve_bytes: 2 * MIB,
            },
            ttl,
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(f.load(Ordering::SeqCst))
            }),
        );
        (g, free, reads)
    }

    #[test]
    fn thresholds() {
        let (g, free, _) = guard(Duration::ZERO);
        // plenty of space: everything allowed
        assert!(g.check_write().is_ok() && g.check_audit().is_ok());
        let st = g.state();
        assert_eq!(st.free_bytes, Some(100 * MIB));
        assert!(!st.writes_refused && !st.audit_refused);

        // exactly at min_free: still allowed; one byte below: writes refused
        free.store(8 * MIB, Ordering::SeqCst);
        assert!(g.check_write().is_ok());
        free.store(8 * MIB - 1, Ordering::SeqCst);
        match g.check_write() {
            Err(StoreError::NoSpace(m)) => {
                assert!(m.contains("/srv/keyseal/store"), "{m}");
                assert!(m.contains(&(8 * MIB - 1).to_string()), "{m}");
                assert!(m.contains("store.min_free_bytes"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        // between the thresholds: audit appends still allowed
        free.store(5 * MIB, Ordering::SeqCst);
        assert!(g.check_write().is_err());
        assert!(g.check_audit().is_ok());
        let st = g.state();
        assert!(st.writes_refused && !st.audit_refused);

        // below the floor: both refused, naming the audit setting
        free.store(2 * MIB - 1, Ordering::SeqCst);
        assert!(g.check_write().is_err());
        match g.check_audit() {
            Err(StoreError::NoSpace(m)) => assert!(m.contains("store.audit_reserve_bytes"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(g.state().audit_refused);

        // space comes back: allowed again, no reopen
        free.store(50 * MIB, Ordering::SeqCst);
        assert!(g.check_write().is_ok() && g.check_audit().is_ok());
    }

    #[test]
    fn readings_are_cached() {
        let (g, free, reads) = guard(Duration::from_secs(3600));
        for _ in 0..100 {
            assert!(g.check_write().is_ok());
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        // a change is not seen before the reading expires
        free.store(MIB, Ordering::SeqCst);
        assert!(g.check_write().is_ok());

        let (g, free, reads) = guard(Duration::from_millis(20));
        assert!(g.check_write().is_ok());
        free.store(MIB, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert!(g.check_write().is_err());
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn unknown_free_space_and_no_guard_refuse_nothing() {
        let g = DiskGuard::with_source(
            Path::new("/x"),
            DiskLimits::default(),
            Duration::ZERO,
            Box::new(|| Err(std::io::Error::other("no statvfs"))),
        );
        assert!(g.check_write().is_ok() && g.check_audit().is_ok());
        assert_eq!(g.state().free_bytes, None);
        let g = DiskGuard::unlimited();
        assert!(g.check_write().is_ok() && g.check_audit().is_ok());
        assert!(!g.enabled());
    }

    #[test]
    fn statvfs_reads_the_real_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::statvfs(dir.path(), DiskLimits::default());
        assert!(g.free_bytes().is_some());
    }

    #[test]
    fn limits_validate() {
        assert!(DiskLimits::default().validate().is_ok());
        assert!(DiskLimits::NONE.validate().is_ok());
        let l = |m, a| DiskLimits {
            min_free_bytes: m,
            audit_reserve_bytes: a,
        };
        assert!(l(8 * MIB, 2 * MIB).validate().is_ok());
        let e = l(8 * MIB, 8 * MIB).validate().unwrap_err();
        assert!(e.contains("store.audit_reserve_bytes"), "{e}");
        assert!(l(8 * MIB, 0).validate().is_err());
        assert!(l(0, MIB).validate().is_err());
        assert!(l(2 << 40, MIB).validate().is_err());
    }
}
