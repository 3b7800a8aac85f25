//! The sled store: one tree per record kind, big-endian integer keys, and a
//! `meta` tree holding the schema version and the root key state.
//!
//! Trees: `meta`, `secrets` (name -> [`crate::secrets::SecretMeta`]),
//! `versions` (name || 0x00 || version BE -> [`crate::secrets::VersionRecord`]),
//! `sealed` (kind || 0x00 || name -> [`crate::envelope::Sealed`], the
//! daemon's own sealed singletons). Other layers add their own trees.
//! Records are `postcard`-encoded. Every acknowledged write is flushed.

use std::path::Path;

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

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
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

/// The opened store.
#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    pub meta: sled::Tree,
    pub secrets: sled::Tree,
    pub versions: sled::Tree,
    /// Singleton sealed values of the daemon itself (e.g. the API-key
    /// pepper, the audit HMAC key): `kind || 0x00 || name` -> `Sealed`.
    pub sealed: sled::Tree,
}

impl Store {
    /// Opens (creating if needed) the store at `path`, checking its schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
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
        Self::from_db(db)
    }

    /// Wraps an already opened sled database (schema not checked).
    pub fn from_db(db: sled::Db) -> Result<Store, StoreError> {
        Ok(Store {
            meta: db.open_tree("meta")?,
            secrets: db.open_tree("secrets")?,
            versions: db.open_tree("versions")?,
            sealed: db.open_tree("sealed")?,
            db,
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
