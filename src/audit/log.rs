//! [`AuditLog`]: the audit Merkle log, written by one group-commit writer
//! thread, with checkpoints signed by the audit key on the root device.
//!
//! Events, their leaf hashes and the stored subtree hashes live in the
//! log's own append-only files under `<store>/audit/` ([`super::segment`]):
//! completed subtrees of at least 2^[`STORED_NODE_MIN_LEVEL`] leaves are
//! stored (one hash per 16 events; smaller subtrees are rehashed from at
//! most 16 leaves), so any tree head or proof is O(log n) reads (O(log² n)
//! for a proof). In the store's sled database:
//!
//! - `audit_checkpoints`: tree size (u64 BE) → signed checkpoint note.
//! - `audit_meta`: `origin`, `signing_key` (the [`SigningKeyRef`]), `tree`
//!   (size, right-edge compact range and last event time of a prefix whose
//!   derived files are synced: saved with every checkpoint), `pruned` (size
//!   and compact range of the pruned prefix), `exported` (largest tree size
//!   of an exported checkpoint).
//!
//! Group commit: [`AuditLog::append`] queues the event; the writer takes
//! every event waiting (up to `max_batch`), assigns consecutive sequence
//! numbers, appends their records to the segment file with ONE write and
//! ONE `fdatasync`, and only then answers each caller. A caller that hears
//! nothing within the deadline gets [`AuditError::Deadline`]; its event may
//! still be written later (the log then records an attempt whose request
//! failed — never the reverse). A failed batch is cut off the file before
//! the next one. At open, records after the saved tree state are read
//! back, checked (sequence, CRC) and replayed into the tree; the first bad
//! or incomplete record ends the log. Checkpoints only ever cover durable
//! events.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::event::{AuditEvent, EventFilter, NewEvent};
use super::key::AuditKey;
use super::merkle::{
    self, consistency_proof, inclusion_proof, leaf_hash, range_nodes, subtree_hash, CompactRange,
    Hash, MerkleError, NodeId,
};
use super::note::{signature_line, valid_key_name, AuditPublicKey, Checkpoint};
use super::segment::{Segments, Tail};
use super::{AuditConfig, AuditError, SIGNING_KEY_LABEL};
use crate::root::{RootOfTrust, SignAlg, SigningKeyRef};
use crate::secrets::SecretStore;
use crate::store::{decode, encode, Store};

const META_ORIGIN: &[u8] = b"origin";
const META_KEY: &[u8] = b"signing_key";
const META_TREE: &[u8] = b"tree";
const META_PRUNED: &[u8] = b"pruned";
const META_EXPORTED: &[u8] = b"exported";

/// Completed subtrees of at least 2^this leaves are stored in `audit_nodes`.
pub const STORED_NODE_MIN_LEVEL: u8 = 4;

/// The state of the tree: the writer's (every durable event) and, in
/// `audit_meta/tree`, that of a prefix whose derived files are synced.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct TreeMeta {
    size: u64,
    /// Right-edge compact range, largest subtree first.
    compact: Vec<Hash>,
    /// Time of the last event (events never go back in time).
    last_time: u64,
}

impl TreeMeta {
    /// Size and root hash (from the compact range).
    fn tree_head(&self) -> Result<TreeHead, MerkleError> {
        let root = CompactRange::from_parts(self.size, self.compact.clone())?.root();
        Ok(TreeHead {
            size: self.size,
            root,
        })
    }
}

/// The pruned prefix: events `1..=size` are gone; these subtree hashes
/// (the compact range of `[0, size)`) stand in for them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Pruned {
    size: u64,
    nodes: Vec<(NodeId, Hash)>,
}

/// A tree head: size and root hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeHead {
    pub size: u64,
    pub root: Hash,
}

/// A signed checkpoint as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub checkpoint: Checkpoint,
    /// The signed note text.
    pub note: String,
}

/// Counters for `keyseal status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Events made durable since open.
    pub appended: u64,
    /// Group commits (flushes) since open.
    pub batches: u64,
    /// Appends that returned an error to their caller (each failed its request).
    pub failures: u64,
    /// ... of which because the deadline passed.
    pub deadline_exceeded: u64,
    /// Batches whose write or flush failed.
    pub write_errors: u64,
    /// Total time spent writing batches (sled transaction), microseconds.
    pub write_micros: u64,
    /// Total time spent in flushes, microseconds.
    pub flush_micros: u64,
    /// Checkpoints signed since open.
    pub checkpoints: u64,
    /// Checkpoints that could not be signed or stored.
    pub checkpoint_errors: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Appends queued, not yet taken by the writer.
    pub queued: u64,
    /// Durable events in the tree.
    pub tree_size: u64,
    pub last_checkpoint_size: u64,
    pub exported_size: u64,
    /// Events `1..=pruned` were pruned.
    pub pruned: u64,
    /// A write to the store failed with an I/O error (e.g. a full disk).
    /// sled then refuses every write until the database is reopened:
    /// keyseald must be restarted (after freeing space).
    pub store_failed: bool,
}

/// Injected faults, for tests and failure drills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The writer blocks before writing (a stuck disk) until cleared.
    StallWrites,
    /// Every batch write fails.
    FailWrites,
}

impl Fault {
    fn to_u8(self) -> u8 {
        match self {
            Fault::None => 0,
            Fault::StallWrites => 1,
            Fault::FailWrites => 2,
        }
    }
    fn from_u8(v: u8) -> Fault {
        match v {
            1 => Fault::StallWrites,
            2 => Fault::FailWrites,
            _ => Fault::None,
        }
    }
}

/// Which events an export or a query covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventRange {
    /// Every event not pruned.
    All,
    /// Sequence numbers `first..=last` (`last` is capped at the tree size).
    Seqs { first: u64, last: u64 },
    /// Events with `since <= time <= until` (unix millis; open ends when `None`).
    Time {
        since: Option<u64>,
        until: Option<u64>,
    },
}

/// What [`AuditLog::prune_before`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneSummary {
    /// Events `1..=pruned` are gone now.
    pub pruned: u64,
    pub events_removed: u64,
    pub nodes_removed: u64,
}

enum Reply {
    Async(oneshot::Sender<Result<u64, AuditError>>),
    Blocking(SyncSender<Result<u64, AuditError>>),
}

impl Reply {
    fn send(self, r: Result<u64, AuditError>) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
            Reply::Blocking(tx) => {
                let _ = tx.try_send(r);
            }
        }
    }
}

struct Request {
    event: NewEvent,
    reply: Reply,
}

enum Ctl {
    Nudge,
    Stop,
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
    batches: AtomicU64,
    failures: AtomicU64,
    deadline_exceeded: AtomicU64,
    write_errors: AtomicU64,
    write_micros: AtomicU64,
    flush_micros: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_errors: AtomicU64,
    queued: AtomicU64,
}

/// The sled trees of the audit log.
pub(crate) struct Trees {
    pub(crate) checkpoints: sled::Tree,
    pub(crate) meta: sled::Tree,
}

/// State shared by the handle, the writer and the checkpointer.
pub(crate) struct Shared {
    db: sled::Db,
    /// The store's free-space guard: the log writes only above its
    /// `audit_reserve_bytes`.
    disk: Arc<crate::store::DiskGuard>,
    pub(crate) t: Trees,
    pub(crate) seg: Segments,
    root: Arc<dyn RootOfTrust>,
    key_ref: SigningKeyRef,
    pub(crate) public: AuditPublicKey,
    pub(crate) origin: String,
    hmac: AuditKey,
    cfg: AuditConfig,
    head: Mutex<TreeMeta>,
    pruned: RwLock<Pruned>,
    counters: Counters,
    last_error: Mutex<Option<String>>,
    fault: AtomicU8,
    closing: AtomicBool,
    last_checkpoint_size: AtomicU64,
    checkpoint_lock: Mutex<()>,
    prune_lock: Mutex<()>,
    size_tx: watch::Sender<u64>,
    /// Requests being handled that will append an event ([`Expected`]):
    /// the writer lingers for more events only while this is non-zero.
    expected: AtomicU64,
}

/// A request in progress that will append an audit event (see
/// [`AuditLog::expect`]). Drop it once the event is queued, or when the
/// request ends without one.
pub struct Expected(Arc<Shared>);

impl Drop for Expected {
    fn drop(&mut self) {
        self.0.expected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The audit log. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct AuditLog {
    shared: Arc<Shared>,
    tx: RwLock<Option<SyncSender<Box<Request>>>>,
    ctl: Mutex<Option<mpsc::Sender<Ctl>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hash_from(v: &[u8], what: &str) -> Result<Hash, AuditError> {
    v.try_into()
        .map_err(|_| AuditError::Corrupt(format!("{what} is not a 32-byte hash")))
}

fn merkle_err(e: MerkleError) -> AuditError {
    match e {
        MerkleError::Missing(id) => AuditError::Pruned(id.end() + 1),
        MerkleError::Storage(m) => AuditError::Corrupt(m),
        MerkleError::Range(m) => AuditError::InvalidArgument(m),
    }
}

/// Creates the audit signing key. The first choice of label is
/// [`SIGNING_KEY_LABEL`]; if the device refuses it (e.g. a key of that label
/// left by an earlier store), a suffixed label is tried once.
fn create_signing_key(root: &dyn RootOfTrust) -> Result<SigningKeyRef, AuditError> {
    match root.create_signing_key(SIGNING_KEY_LABEL, SignAlg::EcdsaP256Sha256) {
        Ok(k) => Ok(k),
        Err(first) => {
            let mut r = [0u8; 6];
            rand::rngs::OsRng.fill_bytes(&mut r);
            let label = format!("{SIGNING_KEY_LABEL}-{}", hex::encode(r));
            root.create_signing_key(&label, SignAlg::EcdsaP256Sha256)
                .map_err(|_| AuditError::Root(first))
        }
    }
}

impl AuditLog {
    /// Opens the audit log in the secret store's database, with the audit
    /// HMAC key from the store's sealed singletons and the signing key on
    /// its root device (both created on first open).
    pub fn open(secrets: &SecretStore, cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        let hmac = AuditKey::load_or_create(secrets)?;
        Self::open_with(
            secrets.store(),
            secrets.envelope().root().clone(),
            hmac,
            cfg,
        )
    }

    /// Opens the audit log with explicit parts.
    pub fn open_with(
        store: &Store,
        root: Arc<dyn RootOfTrust>,
        hmac: AuditKey,
        cfg: AuditConfig,
    ) -> Result<AuditLog, AuditError> {
        let db = store.db.clone();
        let dir = store.dir.as_ref().ok_or_else(|| {
            AuditError::InvalidArgument("the audit log needs a store opened from a path".into())
        })?;
        let seg = Segments::open(dir.join("audit"), cfg.segment_bits)?;
        let t = Trees {
            checkpoints: db.open_tree("audit_checkpoints")?,
            meta: db.open_tree("audit_meta")?,
        };
        let origin = match t.meta.get(META_ORIGIN)? {
            Some(v) => {
                let o = String::from_utf8(v.to_vec())
                    .map_err(|_| AuditError::Corrupt("stored origin is not UTF-8".into()))?;
                if let Some(want) = &cfg.origin {
                    if *want != o {
                        tracing::warn!(stored = %o, configured = %want,
                            "audit origin is fixed when the log is created; keeping the stored one");
                    }
                }
                o
            }
            None => {
                let o = match &cfg.origin {
                    Some(o) => o.clone(),
                    None => {
                        let mut id = [0u8; 8];
                        rand::rngs::OsRng.fill_bytes(&mut id);
                        format!("keyseal.audit/{}", hex::encode(id))
                    }
                };
                if !valid_key_name(&o) {
                    return Err(AuditError::InvalidArgument(format!(
                        "audit origin {o:?} must be non-empty, without spaces or '+'"
                    )));
                }
                t.meta.insert(META_ORIGIN, o.as_bytes())?;
                o
            }
        };
        let key_ref: SigningKeyRef = match t.meta.get(META_KEY)? {
            Some(v) => decode("audit_meta", &v)?,
            None => {
                let k = create_signing_key(root.as_ref())?;
                t.meta.insert(META_KEY, encode(&k)?)?;
                k
            }
        };
        db.flush()?;
        let spki = root.public_key_spki(&key_ref)?;
        let public = AuditPublicKey::from_spki(&spki)
            .map_err(|e| AuditError::Corrupt(format!("audit signing key: {e}")))?;
        let tree: TreeMeta = match t.meta.get(META_TREE)? {
            Some(v) => decode("audit_meta", &v)?,
            None => TreeMeta::default(),
        };
        if tree.compact.len() != tree.size.count_ones() as usize {
            return Err(AuditError::Corrupt(
                "stored tree state has a wrong compact range".into(),
            ));
        }
        let pruned: Pruned = match t.meta.get(META_PRUNED)? {
            Some(v) => decode("audit_meta", &v)?,
            None => Pruned::default(),
        };
        if db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == b"audit_events")
        {
            migrate(&db, &seg, &tree, &pruned)?;
        }
        let (tail, tree) = recover(&seg, &t, &db, tree)?;
        let last_checkpoint_size = match t.checkpoints.last()? {
            Some((k, _)) => u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8])),
            None => 0,
        };
        let (size_tx, _) = watch::channel(tree.size);
        let shared = Arc::new(Shared {
            db,
            disk: store.disk.clone(),
            t,
            seg,
            root,
            key_ref,
            public,
            origin,
            hmac,
            head: Mutex::new(tree.clone()),
            pruned: RwLock::new(pruned),
            counters: Counters::default(),
            last_error: Mutex::new(None),
            fault: AtomicU8::new(0),
            closing: AtomicBool::new(false),
            last_checkpoint_size: AtomicU64::new(last_checkpoint_size),
            checkpoint_lock: Mutex::new(()),
            prune_lock: Mutex::new(()),
            size_tx,
            expected: AtomicU64::new(0),
            cfg,
        });

        let (tx, rx) = mpsc::sync_channel::<Box<Request>>(shared.cfg.queue_capacity.max(1));
        let (ctl_tx, ctl_rx) = mpsc::channel::<Ctl>();
        let spawn_err = |e: std::io::Error| AuditError::Io {
            path: "audit threads".into(),
            reason: e.to_string(),
        };
        let w = {
            let shared = shared.clone();
            let nudge = ctl_tx.clone();
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || writer_loop(&shared, tree, tail, &rx, &nudge))
                .map_err(spawn_err)?
        };
        let c = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("audit-checkpoint".into())
                .spawn(move || checkpointer_loop(&shared, &ctl_rx))
                .map_err(spawn_err)?
        };
        // Events past the last checkpoint (e.g. after a crash) get one soon.
        let _ = ctl_tx.send(Ctl::Nudge);
        Ok(AuditLog {
            shared,
            tx: RwLock::new(Some(tx)),
            ctl: Mutex::new(Some(ctl_tx)),
            threads: Mutex::new(vec![w, c]),
        })
    }

    /// The log's origin (first line of its checkpoints, note key name).
    pub fn origin(&self) -> &str {
        &self.shared.origin
    }

    /// The audit public key (to verify checkpoints and export manifests).
    pub fn public_key(&self) -> &AuditPublicKey {
        &self.shared.public
    }

    /// The audit HMAC key.
    pub fn hmac_key(&self) -> &AuditKey {
        &self.shared.hmac
    }

    /// `hmac-sha256:<hex>` of a sensitive identifier (what the log stores in
    /// its place; `keyseal audit hash VALUE`).
    pub fn hash(&self, value: &[u8]) -> String {
        self.shared.hmac.hash(value)
    }

    pub fn config(&self) -> &AuditConfig {
        &self.shared.cfg
    }

    /// Announces a request that will append an event. While any such
    /// request is in progress, the writer may linger (up to
    /// `commit_linger`) so that one sync covers its event too; when none
    /// is, a batch is committed at once (a lingering writer would only
    /// leave the CPU idle).
    pub fn expect(&self) -> Expected {
        self.shared.expected.fetch_add(1, Ordering::Relaxed);
        Expected(self.shared.clone())
    }

    fn submit(&self, event: NewEvent, reply: Reply) -> Result<(), AuditError> {
        event
            .validate()
            .map_err(|e| AuditError::InvalidEvent(e.to_string()))?;
        // Refused up front below the reserve: never queued, never near sled.
        self.shared
            .disk
            .check_audit()
            .map_err(AuditError::from_guard)?;
        let guard = self.tx.read();
        let tx = guard.as_ref().ok_or(AuditError::Closed)?;
        self.shared.counters.queued.fetch_add(1, Ordering::Relaxed);
        tx.try_send(Box::new(Request { event, reply }))
            .map_err(|e| {
                self.shared.counters.queued.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => AuditError::QueueFull(self.shared.cfg.queue_capacity),
                    TrySendError::Disconnected(_) => AuditError::Closed,
                }
            })
    }

    /// Appends an event; resolves to its sequence number once it is durable
    /// (flushed), or to an error when it is not within the deadline
    /// ([`AuditError::is_unavailable`]: fail the request with UNAVAILABLE).
    /// The event is queued when this is called, not when the future is first
    /// polled. Needs a tokio runtime with time enabled to be awaited.
    pub fn append(
        &self,
        event: NewEvent,
    ) -> impl Future<Output = Result<u64, AuditError>> + Send + 'static {
        let shared = self.shared.clone();
        let deadline = tokio::time::Instant::now() + shared.cfg.deadline;
        let (tx, rx) = oneshot::channel();
        let submitted = self.submit(event, Reply::Async(tx));
        async move {
            let r = match submitted {
                Err(e) => Err(e),
                Ok(()) => match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(AuditError::Closed),
                    Err(_) => Err(AuditError::Deadline(shared.cfg.deadline)),
                },
            };
            shared.finish(r)
        }
    }

    /// [`AuditLog::append`] for synchronous callers: blocks the thread until
    /// the event is durable or the deadline passes. Not for async code.
    pub fn append_blocking(&self, event: NewEvent) -> Result<u64, AuditError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let deadline = self.shared.cfg.deadline;
        let r = self.submit(event, Reply::Blocking(tx)).and_then(|()| {
            match rx.recv_timeout(deadline) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => Err(AuditError::Deadline(deadline)),
                Err(RecvTimeoutError::Disconnected) => Err(AuditError::Closed),
            }
        });
        self.shared.finish(r)
    }

    /// The durable tree head.
    pub fn head(&self) -> TreeHead {
        self.shared.head()
    }

    /// The durable tree size, updated after every group commit (for `tail -f`).
    pub fn watch_size(&self) -> watch::Receiver<u64> {
        self.shared.size_tx.subscribe()
    }

    /// The first sequence number still stored (1 unless pruned).
    pub fn first_seq(&self) -> u64 {
        self.shared.pruned.read().size + 1
    }

    pub fn stats(&self) -> AuditStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AuditStats {
            appended: l(&c.appended),
            batches: l(&c.batches),
            failures: l(&c.failures),
            deadline_exceeded: l(&c.deadline_exceeded),
            write_errors: l(&c.write_errors),
            write_micros: l(&c.write_micros),
            flush_micros: l(&c.flush_micros),
            checkpoints: l(&c.checkpoints),
            checkpoint_errors: l(&c.checkpoint_errors),
            last_error: self.shared.last_error.lock().clone(),
            queued: l(&c.queued),
            tree_size: self.shared.head.lock().size,
            last_checkpoint_size: self.shared.last_checkpoint_size.load(Ordering::Relaxed),
            exported_size: self.shared.exported_size().unwrap_or(0),
            pruned: self.shared.pruned.read().size,
            store_failed: self.store_failed(),
        }
    }

    /// Whether a write to the store failed with an I/O error since open
    /// (see [`AuditStats::store_failed`]): the store's database is then
    /// unusable until keyseald restarts, and iterating it must be avoided
    /// (sled 0.34 iterators spin on a failed database).
    pub fn store_failed(&self) -> bool {
        crate::store::io_failed()
    }

    /// Signs and stores a checkpoint of the current durable tree (`now`:
    /// unix seconds, written in its `time` line).
    pub fn checkpoint_now(&self, now: u64) -> Result<StoredCheckpoint, AuditError> {
        self.shared.checkpoint(now)
    }

    /// The most recent stored checkpoint.
    pub fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, AuditError> {
        match self.shared.t.checkpoints.last()? {
            Some((_, v)) => Ok(Some(self.shared.parse_stored(&v)?)),
            None => Ok(None),
        }
    }

    /// Stored checkpoints with `from <= size <= to`, smallest first.
    pub fn checkpoints(&self, from: u64, to: u64) -> Result<Vec<StoredCheckpoint>, AuditError> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        for kv in self
            .shared
            .t
            .checkpoints
            .range(from.to_be_bytes()..=to.to_be_bytes())
        {
            let (_, v) = kv?;
            out.push(self.shared.parse_stored(&v)?);
        }
        Ok(out)
    }

    /// The event at `seq`, if stored.
    pub fn event(&self, seq: u64) -> Result<Option<AuditEvent>, AuditError> {
        match self.shared.event_bytes(seq)? {
            Some(b) => {
                Ok(Some(AuditEvent::decode(&b).map_err(|e| {
                    AuditError::Corrupt(format!("event {seq}: {e}"))
                })?))
            }
            None => Ok(None),
        }
    }

    /// Up to `limit` events from `from_seq` on, matching `filter`; also the
    /// sequence number to continue from when the limit was reached. Starts
    /// at the first event at or after `filter.since` when that is later.
    pub fn query(
        &self,
        filter: &EventFilter,
        from_seq: u64,
        limit: usize,
    ) -> Result<(Vec<AuditEvent>, Option<u64>), AuditError> {
        let size = self.head().size;
        let mut start = from_seq.max(self.first_seq());
        if let Some(since) = filter.since {
            start = start.max(self.shared.first_seq_at_or_after(since, size)?);
        }
        let mut out = Vec::new();
        let mut next = None;
        self.shared.seg.range(start, size, &mut |seq, v, _| {
            if out.len() >= limit {
                next = Some(seq);
                return Ok(false);
            }
            let ev = AuditEvent::decode(v)
                .map_err(|e| AuditError::Corrupt(format!("event {seq}: {e}")))?;
            if filter.until.is_some_and(|u| ev.time > u) {
                return Ok(false);
            }
            if filter.matches(&ev) {
                out.push(ev);
            }
            Ok(true)
        })?;
        Ok((out, next))
    }

    /// The root hash of the tree at an earlier (or the current) size.
    pub fn root_at(&self, size: u64) -> Result<Hash, AuditError> {
        self.shared.check_size(size)?;
        self.shared.subtree(0, size)
    }

    /// The inclusion proof of event `seq` in the tree of size `size`.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        self.shared.check_size(size)?;
        if seq == 0 {
            return Err(AuditError::InvalidArgument(
                "sequence numbers start at 1".into(),
            ));
        }
        inclusion_proof(&mut |id| self.shared.node(id), seq - 1, size).map_err(merkle_err)
    }

    /// The consistency proof from tree size `old` to `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, AuditError> {
        self.shared.check_size(new)?;
        consistency_proof(&mut |id| self.shared.node(id), old, new).map_err(merkle_err)
    }

    /// Events `1..=n` have all been in some export bundle (with a signed
    /// checkpoint covering them): pruning may go up to `n`.
    pub fn exported_size(&self) -> Result<u64, AuditError> {
        self.shared.exported_size()
    }

    /// Deletes events `1..seq` (exclusive), keeping the compact range of
    /// the pruned prefix so every remaining event still verifies against
    /// every checkpoint. Only up to an exported checkpoint: the events must
    /// be in an auditor's hands before they go.
    pub fn prune_before(&self, seq: u64) -> Result<PruneSummary, AuditError> {
        let sh = &self.shared;
        let _g = sh.prune_lock.lock();
        let target = seq.saturating_sub(1);
        let exported = sh.exported_size()?;
        if target > exported {
            return Err(AuditError::NotExported {
                requested: seq,
                exported,
            });
        }
        sh.disk.check_audit().map_err(AuditError::from_guard)?;
        let current = sh.pruned.read().size;
        if target <= current {
            return Ok(PruneSummary {
                pruned: current,
                events_removed: 0,
                nodes_removed: 0,
            });
        }
        let mut nodes = Vec::new();
        for id in range_nodes(0, target) {
            nodes.push((id, sh.subtree(id.start(), id.end())?));
        }
        let p = Pruned {
            size: target,
            nodes,
        };
        sh.t.meta.insert(META_PRUNED, encode(&p)?)?;
        sh.db.flush()?;
        *sh.pruned.write() = p;
        // Whole segments go; the rest of a partly pruned one stays on disk
        // (unreadable through the log) until its last event is pruned.
        let segments = sh.seg.remove_through(target)?;
        tracing::info!(pruned = target, segments, "audit log pruned");
        Ok(PruneSummary {
            pruned: target,
            events_removed: target - current,
            nodes_removed: 0,
        })
    }

    /// Injects a fault into the writer (tests and failure drills).
    #[doc(hidden)]
    pub fn set_fault(&self, fault: Fault) {
        self.shared.fault.store(fault.to_u8(), Ordering::SeqCst);
    }

    /// Stops accepting events, writes the ones queued, stops the background
    /// threads and signs a final checkpoint when events were added since the
    /// last one (`now`: unix seconds). Appends afterwards fail with `Closed`.
    pub fn close(&self, now: u64) -> Result<Option<StoredCheckpoint>, AuditError> {
        self.stop_threads();
        let size = self.shared.head.lock().size;
        if size > self.shared.last_checkpoint_size.load(Ordering::SeqCst) {
            return self.shared.checkpoint(now).map(Some);
        }
        Ok(None)
    }

    fn stop_threads(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        drop(self.tx.write().take());
        if let Some(c) = self.ctl.lock().take() {
            let _ = c.send(Ctl::Stop);
        }
        for h in self.threads.lock().drain(..) {
            let _ = h.join();
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

impl Shared {
    fn finish(&self, r: Result<u64, AuditError>) -> Result<u64, AuditError> {
        if let Err(e) = &r {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            if matches!(e, AuditError::Deadline(_)) {
                self.counters
                    .deadline_exceeded
                    .fetch_add(1, Ordering::Relaxed);
            }
            *self.last_error.lock() = Some(e.to_string());
        }
        r
    }

    fn record_error(&self, msg: String) {
        tracing::error!(error = %msg, "audit log");
        *self.last_error.lock() = Some(msg);
    }

    pub(crate) fn head(&self) -> TreeHead {
        let h = self.head.lock();
        h.tree_head().unwrap_or(TreeHead {
            size: h.size,
            root: merkle::empty_root(),
        })
    }

    fn check_size(&self, size: u64) -> Result<(), AuditError> {
        let cur = self.head.lock().size;
        if size > cur {
            return Err(AuditError::InvalidArgument(format!(
                "tree size {size} is larger than the log ({cur} events)"
            )));
        }
        Ok(())
    }

    pub(crate) fn pruned_size(&self) -> u64 {
        self.pruned.read().size
    }

    /// A stored subtree hash, or `None` when it must be computed. Callers
    /// only ask for subtrees of the durable tree.
    pub(crate) fn node(&self, id: NodeId) -> Result<Option<Hash>, MerkleError> {
        stored_node(&self.seg, &self.pruned.read(), id)
    }

    pub(crate) fn subtree(&self, lo: u64, hi: u64) -> Result<Hash, AuditError> {
        subtree_hash(&mut |id| self.node(id), lo, hi).map_err(merkle_err)
    }

    /// The stored leaf hash of a durable, unpruned event.
    pub(crate) fn leaf(&self, seq: u64) -> Result<Option<Hash>, AuditError> {
        if seq <= self.pruned_size() || seq > self.head.lock().size {
            return Ok(None);
        }
        self.seg.leaf(seq)
    }

    pub(crate) fn exported_size(&self) -> Result<u64, AuditError> {
        Ok(match self.t.meta.get(META_EXPORTED)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| AuditError::Corrupt("exported size is not 8 bytes".into()))?,
            ),
            None => 0,
        })
    }

    /// Records what an export bundle covered: events `range` (inclusive)
    /// with a signed checkpoint of `size`. The exported size grows to the
    /// bundle's last event only when the bundle starts at or before the
    /// first event not yet exported, so that events `1..=exported size` have
    /// all been in some bundle, each with a checkpoint that covers them. A
    /// bundle of a later time range alone allows no pruning.
    pub(crate) fn mark_exported(
        &self,
        range: Option<(u64, u64)>,
        size: u64,
    ) -> Result<(), AuditError> {
        let Some((first, last)) = range else {
            return Ok(());
        };
        let last = last.min(size);
        self.disk.check_audit().map_err(AuditError::from_guard)?;
        self.t.meta.update_and_fetch(META_EXPORTED, |old| {
            let cur = old
                .and_then(|v| v.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            let next = if first <= cur.saturating_add(1) {
                cur.max(last)
            } else {
                cur
            };
            Some(next.to_be_bytes().to_vec())
        })?;
        self.db.flush()?;
        Ok(())
    }

    fn parse_stored(&self, note: &[u8]) -> Result<StoredCheckpoint, AuditError> {
        let note = String::from_utf8(note.to_vec())
            .map_err(|_| AuditError::Corrupt("stored checkpoint is not UTF-8".into()))?;
        let checkpoint = self
            .public
            .verify_checkpoint(&note, Some(&self.origin))
            .map_err(|e| AuditError::Corrupt(format!("stored checkpoint: {e}")))?;
        Ok(StoredCheckpoint { checkpoint, note })
    }

    /// Signs `msg` with the audit key (ECDSA P-256, SHA-256, DER) and checks
    /// the signature before handing it out.
    pub(crate) fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, AuditError> {
        let sig = self.root.sign(&self.key_ref, msg)?;
        if !self.public.verify(msg, &sig) {
            return Err(AuditError::Corrupt(
                "the root device returned an audit signature that does not verify".into(),
            ));
        }
        Ok(sig)
    }

    /// Signs, stores and flushes a checkpoint of the durable tree.
    pub(crate) fn checkpoint(&self, now: u64) -> Result<StoredCheckpoint, AuditError> {
        let _g = self.checkpoint_lock.lock();
        let r = (|| {
            self.disk.check_audit().map_err(AuditError::from_guard)?;
            // One snapshot for the checkpoint and the saved tree state.
            let state = self.head.lock().clone();
            let head = state.tree_head().map_err(merkle_err)?;
            let checkpoint = Checkpoint {
                origin: self.origin.clone(),
                size: head.size,
                root: head.root,
                time: Some(now),
            };
            let body = checkpoint.body();
            let sig = self.sign(body.as_bytes())?;
            let note = format!(
                "{body}\n{}",
                signature_line(&self.origin, self.public.key_id(), &sig)
            );
            // The tree state saved beside the checkpoint covers it: its
            // derived files are synced first, so open replays only later
            // records.
            self.seg.sync_derived()?;
            if state.size > 0 {
                self.t.meta.insert(META_TREE, encode(&state)?)?;
            }
            self.t
                .checkpoints
                .insert(head.size.to_be_bytes(), note.as_bytes())?;
            self.db.flush()?;
            self.last_checkpoint_size
                .fetch_max(head.size, Ordering::SeqCst);
            self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
            Ok(StoredCheckpoint { checkpoint, note })
        })();
        if let Err(e) = &r {
            self.counters
                .checkpoint_errors
                .fetch_add(1, Ordering::Relaxed);
            self.record_error(format!("checkpoint: {e}"));
        }
        r
    }

    /// The bytes of a durable, unpruned event.
    pub(crate) fn event_bytes(&self, seq: u64) -> Result<Option<Vec<u8>>, AuditError> {
        if seq == 0 || seq <= self.pruned_size() || seq > self.head.lock().size {
            return Ok(None);
        }
        self.seg.event(seq)
    }

    fn event_time(&self, seq: u64) -> Result<u64, AuditError> {
        let b = self
            .event_bytes(seq)?
            .ok_or_else(|| AuditError::Corrupt(format!("event {seq} is missing")))?;
        Ok(AuditEvent::decode(&b)
            .map_err(|e| AuditError::Corrupt(format!("event {seq}: {e}")))?
            .time)
    }

    /// The first stored seq with `time >= t` (size + 1 when none), by binary
    /// search: times never decrease along the log.
    pub(crate) fn first_seq_at_or_after(&self, t: u64, size: u64) -> Result<u64, AuditError> {
        let (mut lo, mut hi) = (self.pruned_size() + 1, size + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.event_time(mid)? >= t {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }

    /// The sequence numbers a range covers within `[first stored, size]`,
    /// `None` when it covers nothing.
    pub(crate) fn resolve(
        &self,
        range: &EventRange,
        size: u64,
    ) -> Result<Option<(u64, u64)>, AuditError> {
        let first = self.pruned_size() + 1;
        let (a, b) = match *range {
            EventRange::All => (first, size),
            EventRange::Seqs { first: a, last: b } => {
                if a == 0 || a > b {
                    return Err(AuditError::InvalidArgument(format!(
                        "invalid sequence range {a}..={b}"
                    )));
                }
                if a < first {
                    return Err(AuditError::Pruned(first));
                }
                (a, b.min(size))
            }
            EventRange::Time { since, until } => {
                let a = match since {
                    Some(t) => self.first_seq_at_or_after(t, size)?,
                    None => first,
                };
                let b = match until {
                    Some(t) => match t.checked_add(1) {
                        Some(t1) => self.first_seq_at_or_after(t1, size)? - 1,
                        None => size,
                    },
                    None => size,
                };
                (a, b)
            }
        };
        Ok((a <= b && b >= 1).then_some((a, b)))
    }
}

/// A stored subtree hash from the audit files, or `None` when it must be
/// computed from its children: in the pruned prefix only the kept compact
/// range answers; leaves and subtrees of ≥ 2^[`STORED_NODE_MIN_LEVEL`]
/// leaves are in the files; smaller subtrees are never stored.
fn stored_node(seg: &Segments, pruned: &Pruned, id: NodeId) -> Result<Option<Hash>, MerkleError> {
    if id.end() <= pruned.size {
        return Ok(pruned.nodes.iter().find(|(n, _)| *n == id).map(|(_, h)| *h));
    }
    let r = if id.level == 0 {
        seg.leaf(id.index + 1)
    } else if id.level >= STORED_NODE_MIN_LEVEL {
        seg.node(id)
    } else {
        Ok(None)
    };
    r.map_err(|e| MerkleError::Storage(e.to_string()))
}

/// At open: replays the records written after the saved tree state
/// (events acknowledged since the last checkpoint, and any written but not
/// acknowledged before a crash), cutting the files after the last good one,
/// and saves the resulting state.
fn recover(
    seg: &Segments,
    t: &Trees,
    db: &sled::Db,
    saved: TreeMeta,
) -> Result<(Tail, TreeMeta), AuditError> {
    let mut cr = CompactRange::from_parts(saved.size, saved.compact.clone()).map_err(merkle_err)?;
    let mut last_body: Option<Vec<u8>> = None;
    let (tail, replayed) = seg.replay(saved.size, &mut |_, body, leaf| {
        let mut done = Vec::new();
        cr.append(leaf, |id, h| {
            if id.level >= STORED_NODE_MIN_LEVEL {
                done.push((id, *h));
            }
        });
        last_body = Some(body.to_vec());
        Ok(done)
    })?;
    if replayed == 0 {
        return Ok((tail, saved));
    }
    let last_time = match &last_body {
        Some(b) => AuditEvent::decode(b)
            .map_err(|e| AuditError::Corrupt(format!("event {}: {e}", cr.size())))?
            .time
            .max(saved.last_time),
        None => saved.last_time,
    };
    let tree = TreeMeta {
        size: cr.size(),
        compact: cr.nodes().into_iter().map(|(_, h)| h).collect(),
        last_time,
    };
    t.meta.insert(META_TREE, encode(&tree)?)?;
    db.flush()?;
    tracing::info!(
        replayed,
        size = tree.size,
        "audit log: replayed the events written after the last saved tree state"
    );
    Ok((tail, tree))
}

/// Moves a log kept in sled by an earlier keyseal (trees `audit_events`,
/// `audit_leaves`, `audit_nodes`) into the audit files, checks that the
/// files give the saved root, then drops the old trees. Interrupted, it
/// starts over at the next open.
fn migrate(
    db: &sled::Db,
    seg: &Segments,
    tree: &TreeMeta,
    pruned: &Pruned,
) -> Result<(), AuditError> {
    for n in seg.list()? {
        seg.remove_segment(n)?;
    }
    let events = db.open_tree("audit_events")?;
    let old_nodes = db.open_tree("audit_nodes")?;
    let mut tail = Tail {
        seg: seg.seg_of(pruned.size + 1),
        off: 0,
    };
    let mut rows: Vec<(u64, Vec<u8>, Hash)> = Vec::new();
    let mut expect = pruned.size + 1;
    for kv in events.range((pruned.size + 1).to_be_bytes()..=tree.size.to_be_bytes()) {
        let (k, v) = kv?;
        let seq = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
        if seq != expect {
            return Err(AuditError::Corrupt(format!(
                "migrating the audit log: event {expect} is missing"
            )));
        }
        expect += 1;
        rows.push((seq, v.to_vec(), leaf_hash(&v)));
        if rows.len() >= 4096 {
            seg.append(&mut tail, &rows, &[])?;
            rows.clear();
        }
    }
    if expect != tree.size + 1 {
        return Err(AuditError::Corrupt(format!(
            "migrating the audit log: event {expect} is missing"
        )));
    }
    let mut nodes = Vec::new();
    for kv in old_nodes.iter() {
        let (k, v) = kv?;
        if let Some(id) = NodeId::from_key(&k) {
            if id.level >= STORED_NODE_MIN_LEVEL && id.end() <= tree.size {
                nodes.push((id, hash_from(&v, "node")?));
            }
        }
    }
    seg.append(&mut tail, &rows, &nodes)?;
    seg.sync_derived()?;
    let want = tree.tree_head().map_err(merkle_err)?.root;
    let mut src = |id: NodeId| stored_node(seg, pruned, id);
    let got = if tree.size == 0 {
        merkle::empty_root()
    } else {
        subtree_hash(&mut src, 0, tree.size).map_err(merkle_err)?
    };
    if got != want {
        return Err(AuditError::Corrupt(
            "migrating the audit log: the moved events do not give the saved root hash".into(),
        ));
    }
    for name in ["audit_events", "audit_leaves", "audit_nodes"] {
        db.drop_tree(name)?;
    }
    db.flush()?;
    tracing::info!(
        events = tree.size - pruned.size,
        "audit log moved from sled into its own files"
    );
    Ok(())
}

/// One step of the group-commit linger.
const LINGER_STEP: Duration = Duration::from_micros(100);

/// The group-commit writer: one batch at a time, one sync per batch.
fn writer_loop(
    sh: &Shared,
    mut tree: TreeMeta,
    mut tail: Tail,
    rx: &Receiver<Box<Request>>,
    nudge: &mpsc::Sender<Ctl>,
) {
    let max_batch = sh.cfg.max_batch.max(1);
    // Whether a failed batch may have left bytes after `tail`.
    let mut dirty_tail = false;
    let drain = |batch: &mut Vec<Box<Request>>| {
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
    };
    loop {
        // Concurrent appenders: events arrived while the last batch was
        // being written.
        let (first, busy) = match rx.try_recv() {
            Ok(r) => (r, true),
            Err(_) => match rx.recv() {
                Ok(r) => (r, false),
                Err(_) => break,
            },
        };
        let mut batch = vec![first];
        drain(&mut batch);
        if busy && !sh.cfg.commit_linger.is_zero() {
            let until = Instant::now() + sh.cfg.commit_linger;
            while batch.len() < max_batch
                && Instant::now() < until
                && sh.expected.load(Ordering::Relaxed) > 0
            {
                std::thread::sleep(LINGER_STEP);
                let before = batch.len();
                drain(&mut batch);
                if batch.len() == before {
                    break;
                }
            }
        }
        sh.counters
            .queued
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        if dirty_tail {
            match sh.seg.truncate_log(&tail) {
                Ok(()) => dirty_tail = false,
                Err(e) => {
                    fail_batch(
                        sh,
                        batch,
                        &format!("cannot cut a failed write off the audit log: {e}"),
                    );
                    continue;
                }
            }
        }
        commit(sh, &mut tree, &mut tail, &mut dirty_tail, batch);
        let last = sh.last_checkpoint_size.load(Ordering::SeqCst);
        if tree.size >= last + sh.cfg.checkpoint_every_events.max(1) {
            let _ = nudge.send(Ctl::Nudge);
        }
    }
}

// Requests are boxed where they are queued (small channel slots); the
// batch keeps them boxed rather than moving each out.
#[allow(clippy::vec_box)]
fn commit(
    sh: &Shared,
    tree: &mut TreeMeta,
    tail: &mut Tail,
    dirty_tail: &mut bool,
    batch: Vec<Box<Request>>,
) {
    // Injected faults.
    loop {
        match Fault::from_u8(sh.fault.load(Ordering::SeqCst)) {
            Fault::StallWrites if !sh.closing.load(Ordering::SeqCst) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Fault::FailWrites => {
                fail_batch(sh, batch, "injected write failure");
                return;
            }
            _ => break,
        }
    }
    // Events queued just before the file system went below the reserve.
    if let Err(e) = sh.disk.check_audit() {
        let e = AuditError::from_guard(e);
        fail_replies_with(
            sh,
            batch.into_iter().map(|r| (r.reply, 0)).collect(),
            &|| match &e {
                AuditError::LowSpace(m) => AuditError::LowSpace(m.clone()),
                other => AuditError::Write(other.to_string()),
            },
        );
        return;
    }
    let mut cr = match CompactRange::from_parts(tree.size, tree.compact.clone()) {
        Ok(c) => c,
        Err(e) => {
            fail_batch(sh, batch, &e.to_string());
            return;
        }
    };
    let mut last_time = tree.last_time;
    let mut rows: Vec<(u64, Vec<u8>, Hash)> = Vec::with_capacity(batch.len());
    let mut nodes: Vec<(NodeId, Hash)> = Vec::new();
    let mut replies: Vec<(Reply, u64)> = Vec::with_capacity(batch.len());
    for req in batch {
        let seq = cr.size() + 1;
        let mut ev = req.event;
        ev.time = ev.time.max(last_time);
        let bytes = match ev.clone().into_event(seq).encode() {
            Ok(b) => b,
            Err(e) => {
                req.reply.send(Err(AuditError::InvalidEvent(e.to_string())));
                continue;
            }
        };
        last_time = ev.time;
        let leaf = leaf_hash(&bytes);
        cr.append(leaf, |id, h| {
            if id.level >= STORED_NODE_MIN_LEVEL {
                nodes.push((id, *h));
            }
        });
        rows.push((seq, bytes, leaf));
        replies.push((req.reply, seq));
    }
    if rows.is_empty() {
        return;
    }
    let new_tree = TreeMeta {
        size: cr.size(),
        compact: cr.nodes().into_iter().map(|(_, h)| h).collect(),
        last_time,
    };
    let started = Instant::now();
    let written = sh.seg.append(tail, &rows, &nodes);
    sh.counters
        .flush_micros
        .fetch_add(micros(started.elapsed()), Ordering::Relaxed);
    if let Err(e) = written {
        *dirty_tail = true;
        let (no_space, msg) = match &e {
            AuditError::NoSpace(m) => (true, m.clone()),
            other => (false, other.to_string()),
        };
        fail_replies_with(sh, replies, &|| {
            if no_space {
                AuditError::NoSpace(msg.clone())
            } else {
                AuditError::Write(msg.clone())
            }
        });
        return;
    }
    *tree = new_tree;
    *sh.head.lock() = tree.clone();
    sh.size_tx.send_replace(tree.size);
    sh.counters
        .appended
        .fetch_add(rows.len() as u64, Ordering::Relaxed);
    sh.counters.batches.fetch_add(1, Ordering::Relaxed);
    for (reply, seq) in replies {
        reply.send(Ok(seq));
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

// Requests are boxed where they are queued (small channel slots); the
// batch keeps them boxed rather than moving each out.
#[allow(clippy::vec_box)]
fn fail_batch(sh: &Shared, batch: Vec<Box<Request>>, msg: &str) {
    fail_replies(sh, batch.into_iter().map(|r| (r.reply, 0)).collect(), msg);
}

fn fail_replies(sh: &Shared, replies: Vec<(Reply, u64)>, msg: &str) {
    fail_replies_with(sh, replies, &|| AuditError::Write(msg.to_owned()));
}

fn fail_replies_with(sh: &Shared, replies: Vec<(Reply, u64)>, err: &dyn Fn() -> AuditError) {
    sh.counters.write_errors.fetch_add(1, Ordering::Relaxed);
    sh.record_error(err().to_string());
    for (reply, _) in replies {
        reply.send(Err(err()));
    }
}

/// Signs a checkpoint every `checkpoint_interval` when events were added,
/// and when the writer reports `checkpoint_every_events` new events.
fn checkpointer_loop(sh: &Shared, rx: &Receiver<Ctl>) {
    loop {
        match rx.recv_timeout(sh.cfg.checkpoint_interval) {
            Ok(Ctl::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Ctl::Nudge) | Err(RecvTimeoutError::Timeout) => {}
        }
        if sh.closing.load(Ordering::SeqCst) {
            return;
        }
        let size = sh.head.lock().size;
        if size > sh.last_checkpoint_size.load(Ordering::SeqCst) {
            // Errors are counted and recorded by `checkpoint`.
            let _ = sh.checkpoint(now_secs());
        }
    }
}
