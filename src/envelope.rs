//! Envelope encryption: a fresh 256-bit DEK per sealed value, AES-256-GCM
//! with AAD that binds the value to where it lives, the DEK wrapped by the
//! root, and plaintext DEKs only in a bounded, TTL-limited cache.
//!
//! The DEK id (the binding passed to the root) and the AEAD's AAD are the
//! same canonical encoding of (record kind, name, version), so a blob or a
//! wrapped key moved elsewhere in the store fails to open.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use lru::LruCache;
use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::root::{Dek, RootError, RootOfTrust, WrappedDek};

const NONCE_LEN: usize = 12;

/// Where a sealed value lives: its canonical encoding is both the AEAD's AAD
/// and the DEK id given to the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding(Vec<u8>);

impl Binding {
    /// `kind` is the record kind (e.g. `secret`), `name` its name, `version`
    /// its version. Length-prefixed, so no two triples encode alike.
    pub fn new(kind: &str, name: &str, version: u64) -> Self {
        let mut b = Vec::with_capacity(16 + kind.len() + name.len());
        b.extend_from_slice(b"keyseal.v1");
        for part in [kind.as_bytes(), name.as_bytes()] {
            b.extend_from_slice(&(part.len() as u32).to_be_bytes());
            b.extend_from_slice(part);
        }
        b.extend_from_slice(&version.to_be_bytes());
        Binding(b)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A sealed value: the wrapped DEK beside the nonce and ciphertext+tag.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub wrapped: WrappedDek,
    pub nonce: [u8; NONCE_LEN],
    /// As bytes, not a sequence of u8 (same postcard encoding, decoded in
    /// one copy instead of byte by byte).
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sealed({:?}, {} bytes)",
            self.wrapped,
            self.ciphertext.len()
        )
    }
}

/// Errors of the envelope layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    #[error(transparent)]
    Root(#[from] RootError),
    #[error("integrity check failed: sealed value does not authenticate at this location")]
    Integrity,
}

/// Counters of the DEK cache, for status output and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    pub entries: u64,
    pub capacity: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Calls that reached the root device (wrap + unwrap).
    pub root_calls: u64,
}

/// A bounded LRU of plaintext DEKs with a TTL. Entries are [`Dek`]s, which
/// zeroize themselves when evicted, expired, replaced or dropped.
pub struct DekCache {
    inner: Mutex<LruCache<Vec<u8>, (Instant, Dek)>>,
    ttl: Duration,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl DekCache {
    /// `capacity` 0 disables caching.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        DekCache {
            inner: Mutex::new(LruCache::new(cap)),
            ttl,
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The cached DEK for `id`, unless absent or older than the TTL at `now`.
    pub fn get(&self, id: &[u8], now: Instant) -> Option<Dek> {
        let mut c = self.inner.lock();
        let fresh = match c.get(id) {
            Some((at, dek)) if now.saturating_duration_since(*at) < self.ttl => Some(dek.clone()),
            Some(_) => None,
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        match fresh {
            Some(d) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(d)
            }
            None => {
                c.pop(id); // expired: dropped, hence zeroized
                self.evictions.fetch_add(1, Ordering::Relaxed);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn insert(&self, id: &[u8], dek: Dek, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        let mut c = self.inner.lock();
        if let Some((k, _old)) = c.push(id.to_vec(), (now, dek)) {
            if k != id {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn remove(&self, id: &[u8]) {
        self.inner.lock().pop(id);
    }

    pub fn clear(&self) {
        self.inner.lock().clear();
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.inner.lock().len() as u64,
            capacity: self.capacity as u64,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            root_calls: 0,
        }
    }
}

/// Seals and opens values under the root, with the DEK cache in front.
pub struct Envelope {
    root: Arc<dyn RootOfTrust>,
    cache: DekCache,
    active: AtomicU32,
    root_calls: AtomicU64,
}

impl Envelope {
    /// `active` is the root key version new DEKs are wrapped under.
    pub fn new(root: Arc<dyn RootOfTrust>, active: u32, cache: DekCache) -> Self {
        Envelope {
            root,
            cache,
            active: AtomicU32::new(active),
            root_calls: AtomicU64::new(0),
        }
    }

    pub fn root(&self) -> &Arc<dyn RootOfTrust> {
        &self.root
    }

    pub fn active_version(&self) -> u32 {
        self.active.load(Ordering::SeqCst)
    }

    pub fn set_active_version(&self, v: u32) {
        self.active.store(v, Ordering::SeqCst);
    }

    pub fn stats(&self) -> CacheStats {
        let mut s = self.cache.stats();
        s.root_calls = self.root_calls.load(Ordering::Relaxed);
        s
    }

    pub fn cache(&self) -> &DekCache {
        &self.cache
    }

    /// Seals `plaintext` at `binding` under a fresh DEK.
    pub fn seal(&self, binding: &Binding, plaintext: &[u8]) -> Result<Sealed, EnvelopeError> {
        let dek = Dek::generate();
        self.root_calls.fetch_add(1, Ordering::Relaxed);
        let wrapped = self
            .root
            .wrap(self.active_version(), &dek, binding.as_bytes())?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = aead(&dek)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: binding.as_bytes(),
                },
            )
            .map_err(|_| EnvelopeError::Integrity)?;
        self.cache.insert(binding.as_bytes(), dek, Instant::now());
        Ok(Sealed {
            wrapped,
            nonce,
            ciphertext,
        })
    }

    /// Opens a sealed value stored at `binding`.
    pub fn open(
        &self,
        binding: &Binding,
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let dek = self.dek(binding, &sealed.wrapped)?;
        Self::decrypt(&dek, binding, sealed)
    }

    /// Opens a sealed value only when its DEK is in the cache: `Ok(None)`
    /// when that would take a root-device call (which may block), so a
    /// caller on an async thread can try this first.
    pub fn open_cached(
        &self,
        binding: &Binding,
        sealed: &Sealed,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, EnvelopeError> {
        match self.cache.get(binding.as_bytes(), Instant::now()) {
            Some(dek) => Self::decrypt(&dek, binding, sealed).map(Some),
            None => Ok(None),
        }
    }

    fn decrypt(
        dek: &Dek,
        binding: &Binding,
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        match aead(dek).decrypt(
            Nonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: binding.as_bytes(),
            },
        ) {
            Ok(pt) => Ok(Zeroizing::new(pt)),
            Err(_) => Err(EnvelopeError::Integrity),
        }
    }

    /// The plaintext DEK of a sealed value, from the cache or the root.
    fn dek(&self, binding: &Binding, wrapped: &WrappedDek) -> Result<Dek, EnvelopeError> {
        let now = Instant::now();
        if let Some(d) = self.cache.get(binding.as_bytes(), now) {
            return Ok(d);
        }
        self.root_calls.fetch_add(1, Ordering::Relaxed);
        let dek = self.root.unwrap(wrapped, binding.as_bytes())?;
        self.cache.insert(binding.as_bytes(), dek.clone(), now);
        Ok(dek)
    }

    /// Re-wraps a sealed value's DEK under root key `to` (the ciphertext is
    /// unchanged). Used by root rotation.
    pub fn rewrap(
        &self,
        binding: &Binding,
        wrapped: &WrappedDek,
        to: u32,
    ) -> Result<WrappedDek, EnvelopeError> {
        let dek = self.dek(binding, wrapped)?;
        self.root_calls.fetch_add(1, Ordering::Relaxed);
        Ok(self.root.wrap(to, &dek, binding.as_bytes())?)
    }

    /// Forgets the cached DEK of a destroyed value.
    pub fn forget(&self, binding: &Binding) {
        self.cache.remove(binding.as_bytes());
    }
}

fn aead(dek: &Dek) -> Aes256Gcm {
    Aes256Gcm::new(dek.expose().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serde_bytes` on `Sealed` must not change what stores already hold.
    #[test]
    fn sealed_encoding_is_unchanged_by_serde_bytes() {
        #[derive(Serialize)]
        struct OldWrapped {
            root_version: u32,
            blob: Vec<u8>,
        }
        #[derive(Serialize)]
        struct OldSealed {
            wrapped: OldWrapped,
            nonce: [u8; NONCE_LEN],
            ciphertext: Vec<u8>,
        }
        let blob: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let ct: Vec<u8> = (0..1100u32).map(|i| (i * 13) as u8).collect();
        let old = OldSealed {
            wrapped: OldWrapped {
                root_version: 3,
                blob: blob.clone(),
            },
            nonce: [9; NONCE_LEN],
            ciphertext: ct.clone(),
        };
        let new = Sealed {
            wrapped: WrappedDek {
                root_version: 3,
                blob,
            },
            nonce: [9; NONCE_LEN],
            ciphertext: ct,
        };
        let old_bytes = postcard::to_stdvec(&old).unwrap();
        assert_eq!(postcard::to_stdvec(&new).unwrap(), old_bytes);
        let back: Sealed = postcard::from_bytes(&old_bytes).unwrap();
        assert!(back == new);
    }

    #[test]
    fn cache_ttl_and_lru() {
        let c = DekCache::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        c.insert(b"a", Dek::generate(), t0);
        c.insert(b"b", Dek::generate(), t0);
        assert!(c.get(b"a", t0).is_some());
        c.insert(b"c", Dek::generate(), t0); // evicts b (least recently used)
        assert!(c.get(b"b", t0).is_none());
        assert!(c.get(b"a", t0 + Duration::from_secs(11)).is_none()); // expired
        let s = c.stats();
        assert_eq!(s.entries, 1);
        assert_eq!(s.evictions, 2);
    }

    #[test]
    fn bindings_are_unambiguous() {
        assert_ne!(
            Binding::new("secret", "ab", 1),
            Binding::new("secreta", "b", 1)
        );
        assert_ne!(
            Binding::new("secret", "a", 1),
            Binding::new("secret", "a", 2)
        );
    }
}
