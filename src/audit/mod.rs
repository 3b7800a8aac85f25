//! The tamper-evident audit log: events in an append-only RFC 6962 Merkle
//! tree, group-committed to the store's sled database, with checkpoints
//! signed by an audit key held in the root device, signed exports and an
//! offline verifier.
//!
//! - [`event`]: [`AuditEvent`], its canonical JSON encoding, [`NewEvent`].
//! - [`merkle`]: RFC 6962 hashing, compact range, proofs and their checks.
//! - [`note`]: C2SP checkpoints as signed notes, the audit public key.
//! - [`key`]: the audit HMAC key for sensitive identifiers.
//! - [`log`]: [`AuditLog`]: group-commit writer, checkpoints, queries,
//!   proofs, retention.
//! - [`bundle`]: the export bundle ([`AuditLog::export`]) and its offline
//!   verification ([`verify_bundle`]).
//!
//! Formats and the auditor's procedure: `docs/auditing.md`.

pub mod bundle;
pub mod event;
pub mod key;
pub mod log;
pub mod merkle;
pub mod note;
mod segment;

use std::time::Duration;

pub use bundle::{
    verify_bundle, verify_bundle_with, EventProblem, ExportOptions, ExportSummary, Report,
    VerifyError, VerifyOptions,
};
pub use event::{Actor, ActorKind, AuditEvent, EventFilter, NewEvent, Outcome};
pub use key::AuditKey;
pub use log::{
    AuditLog, AuditStats, EventRange, Expected, Fault, PruneSummary, StoredCheckpoint, TreeHead,
};
pub use note::{AuditPublicKey, Checkpoint};

use crate::root::RootError;
use crate::secrets::SecretsError;
use crate::store::StoreError;

/// Label of the audit signing key on the root device.
pub const SIGNING_KEY_LABEL: &str = "keyseal-audit-v1";

/// Settings of the audit log.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The log's identity in checkpoints (and the note key name). `None`:
    /// `keyseal.audit/<random log id>`, chosen when the log is created. Fixed
    /// at creation: a different value later is ignored with a warning.
    pub origin: Option<String>,
    /// Sign a checkpoint once this many events were added since the last.
    pub checkpoint_every_events: u64,
    /// ... or once this much time passed with new events.
    pub checkpoint_interval: Duration,
    /// An append not durable within this time fails (UNAVAILABLE).
    pub deadline: Duration,
    /// Most events per group commit.
    pub max_batch: usize,
    /// Appends waiting for the writer; beyond it appends fail at once.
    pub queue_capacity: usize,
    /// Group-commit linger: when appends are arriving concurrently (events
    /// came in while the previous batch was being written), the writer
    /// waits up to this long — in 100 µs steps, stopping early once a step
    /// brings nothing new — so that one sync covers more events. Never
    /// applied to a lone append (no added latency for a single caller).
    /// Zero disables it.
    pub commit_linger: Duration,
    /// Events per segment file, as a power of two (16: 65,536). Smaller
    /// only to exercise segment boundaries in tests.
    #[doc(hidden)]
    pub segment_bits: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            origin: None,
            checkpoint_every_events: 10_000,
            checkpoint_interval: Duration::from_secs(60),
            deadline: Duration::from_secs(2),
            max_batch: 4096,
            queue_capacity: 16_384,
            commit_linger: Duration::from_millis(1),
            segment_bits: segment::SEG_BITS,
        }
    }
}

/// Errors of the audit log. Messages never carry event contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The event was not durable within the deadline (UNAVAILABLE).
    #[error("audit log write did not complete within {0:?}; the request was not performed")]
    Deadline(Duration),
    /// Too many appends are waiting (UNAVAILABLE).
    #[error("audit log queue is full ({0} waiting); the request was not performed")]
    QueueFull(usize),
    /// The log is shut down (UNAVAILABLE).
    #[error("audit log is closed")]
    Closed,
    /// Writing or flushing the batch failed (UNAVAILABLE).
    #[error("audit log write failed: {0}")]
    Write(String),
    /// The store's disk is full (RESOURCE_EXHAUSTED). sled stops writing
    /// after an I/O error until the database is reopened, so keyseald must
    /// be restarted once space was freed.
    #[error("audit log write failed: the store is out of space ({0}); free disk space, then restart keyseald")]
    NoSpace(String),
    /// The store's file system is below `store.audit_reserve_bytes`: the
    /// event was not written, so sled never runs out of space (UNAVAILABLE;
    /// works again as soon as space is freed, no restart).
    #[error("audit log write refused: {0}; free disk space on the store's file system")]
    LowSpace(String),
    /// A caller built an invalid event (INVALID_ARGUMENT; a bug in the caller).
    #[error("invalid audit event: {0}")]
    InvalidEvent(String),
    /// Bad export / prune / proof arguments (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// Pruning past what was exported (FAILED_PRECONDITION).
    #[error("cannot prune through seq {}: only events up to seq {exported} were exported (in a bundle, with a signed checkpoint covering them); export first", .requested.saturating_sub(1))]
    NotExported { requested: u64, exported: u64 },
    /// The events asked for were pruned (FAILED_PRECONDITION).
    #[error("events before seq {0} were pruned")]
    Pruned(u64),
    /// The stored log does not match itself (DATA_LOSS).
    #[error("audit log is corrupt: {0}")]
    Corrupt(String),
    /// Writing the export bundle failed.
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error(transparent)]
    Root(#[from] RootError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Store(e.into())
    }
}

impl AuditError {
    /// [`AuditError::LowSpace`] from a refusal of the store's free-space
    /// guard; other store errors as they are.
    pub fn from_guard(e: StoreError) -> AuditError {
        match e {
            StoreError::NoSpace(m) => AuditError::LowSpace(m),
            other => AuditError::Store(other),
        }
    }

    /// Whether the request that produced the event must fail with
    /// UNAVAILABLE (the event could not be made durable).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            AuditError::Deadline(_)
                | AuditError::QueueFull(_)
                | AuditError::Closed
                | AuditError::Write(_)
                | AuditError::NoSpace(_)
                | AuditError::LowSpace(_)
        )
    }

    /// Whether the event could not be written because the disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self,
            AuditError::NoSpace(_) | AuditError::Store(StoreError::NoSpace(_))
        )
    }
}
