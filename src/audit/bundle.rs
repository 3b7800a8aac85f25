//! The auditor's export bundle: [`AuditLog::export`] writes it,
//! [`verify_bundle`] checks it offline (no daemon, no root device).
//!
//! Files of a bundle directory:
//!
//! - `events.jsonl`: the events of the range, one canonical encoding per
//!   line (the leaf bytes), each line ending in `\n`.
//! - `leaves.txt`: `<seq> <leaf hash hex>` per event: the leaf hashes the
//!   export signed (through the manifest), used to name the first bad event.
//! - `checkpoints.txt`: signed checkpoints, separated by an empty line: the
//!   fresh one made by this export first (tree size N), then the stored
//!   ones whose size falls inside the range.
//! - `proofs.json`: the subtree hashes left of the range (`prefix`, the
//!   compact range of leaves before it) and right of it up to N (`suffix`),
//!   so the root of size N is recomputed from them and the events; RFC 6962
//!   inclusion proofs of the first and last event; the consistency proof from
//!   the `after` checkpoint to N when one was named.
//! - `audit-key.pem`: the audit public key (SPKI PEM).
//! - `manifest.json`: range, counts, origin, key, checkpoint, sha256 and size
//!   of every other file.
//! - `manifest.sig`: DER ECDSA P-256/SHA-256 signature of `manifest.json` by
//!   the audit key (`openssl dgst -sha256 -verify audit-key.pem -signature
//!   manifest.sig manifest.json`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::event::AuditEvent;
use super::log::{AuditLog, EventRange, StoredCheckpoint};
use super::merkle::{
    leaf_hash, range_nodes, verify_consistency, verify_inclusion, CompactRange, Hash, NodeId,
};
use super::note::{split_notes, AuditPublicKey, Checkpoint, NoteError};
use super::AuditError;

/// `format` of `manifest.json`.
pub const BUNDLE_FORMAT: &str = "keyseal-audit-export/1";

pub const EVENTS_FILE: &str = "events.jsonl";
pub const LEAVES_FILE: &str = "leaves.txt";
pub const CHECKPOINTS_FILE: &str = "checkpoints.txt";
pub const PROOFS_FILE: &str = "proofs.json";
pub const KEY_FILE: &str = "audit-key.pem";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_SIG_FILE: &str = "manifest.sig";

/// What to export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub range: EventRange,
    /// The checkpoint of the previous export (signed note text): the bundle
    /// then proves the log consistent with it.
    pub after: Option<String>,
    /// Unix seconds, for the export's checkpoint and manifest.
    pub now: u64,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    pub dir: PathBuf,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub count: u64,
    pub tree_size: u64,
    /// The checkpoint made for this export (pass it as `after` next time).
    pub checkpoint: StoredCheckpoint,
    /// Whether the log still matches the `after` checkpoint (the daemon's
    /// own check; the bundle lets the auditor check it too).
    pub after_consistent: Option<bool>,
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub origin: String,
    /// Unix seconds.
    pub created: u64,
    /// Signed-note key ID of the audit key (8 hex digits).
    pub key_id: String,
    /// SHA-256 of the audit key's DER SPKI, hex.
    pub key_fingerprint: String,
    /// The note verifier key (`<origin>+<key id>+<base64(0x02 || SPKI)>`).
    pub note_verifier_key: String,
    /// What was asked for (`all`, `seq A..=B`, `time A..=B`).
    pub selection: String,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub count: u64,
    pub first_time: Option<u64>,
    pub last_time: Option<u64>,
    /// Events `1..=pruned` were pruned from the log before this export.
    pub pruned: u64,
    pub tree_size: u64,
    /// Root hash at `tree_size`, hex.
    pub root: String,
    /// The export's signed checkpoint (also first in `checkpoints.txt`).
    pub checkpoint: String,
    pub checkpoints: u64,
    pub after: Option<AfterRef>,
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AfterRef {
    pub size: u64,
    /// hex
    pub root: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// `proofs.json`. Hashes are lowercase hex.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proofs {
    pub tree_size: u64,
    pub root: String,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The compact range of leaves `[0, first_seq - 1)`, largest first.
    pub prefix: Vec<NodeHash>,
    /// The maximal subtrees covering leaves `[last_seq, tree_size)`, left to right.
    pub suffix: Vec<NodeHash>,
    pub inclusion: Vec<Inclusion>,
    pub consistency: Option<Consistency>,
}

/// The hash of leaves `[index << level, (index + 1) << level)`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeHash {
    pub level: u8,
    pub index: u64,
    pub hash: String,
}

/// RFC 6962 audit path of one event (leaf index = seq − 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inclusion {
    pub seq: u64,
    pub leaf_index: u64,
    pub leaf_hash: String,
    pub tree_size: u64,
    pub path: Vec<String>,
}

/// RFC 6962 consistency proof from the `after` checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consistency {
    /// The `after` checkpoint as given (signed note).
    pub from_checkpoint: String,
    pub from_size: u64,
    pub to_size: u64,
    pub path: Vec<String>,
}

fn io_err(path: &Path, e: impl fmt::Display) -> AuditError {
    AuditError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A file writer that hashes and counts what it writes.
struct HashingFile {
    path: PathBuf,
    w: BufWriter<fs::File>,
    h: Sha256,
    n: u64,
}

impl HashingFile {
    fn create(path: PathBuf) -> Result<HashingFile, AuditError> {
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        Ok(HashingFile {
            path,
            w: BufWriter::with_capacity(1 << 20, f),
            h: Sha256::new(),
            n: 0,
        })
    }

    fn write(&mut self, b: &[u8]) -> Result<(), AuditError> {
        self.h.update(b);
        self.n += b.len() as u64;
        self.w.write_all(b).map_err(|e| io_err(&self.path, e))
    }

    fn finish(mut self) -> Result<FileEntry, AuditError> {
        self.w.flush().map_err(|e| io_err(&self.path, e))?;
        self.w
            .get_ref()
            .sync_all()
            .map_err(|e| io_err(&self.path, e))?;
        Ok(FileEntry {
            sha256: hex::encode(self.h.finalize()),
            bytes: self.n,
        })
    }
}

fn write_file(dir: &Path, name: &str, b: &[u8]) -> Result<FileEntry, AuditError> {
    let mut f = HashingFile::create(dir.join(name))?;
    f.write(b)?;
    f.finish()
}

fn node_json(id: NodeId, h: &Hash) -> NodeHash {
    NodeHash {
        level: id.level,
        index: id.index,
        hash: hex::encode(h),
    }
}

fn selection(r: &EventRange) -> String {
    let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
    match r {
        EventRange::All => "all".into(),
        EventRange::Seqs { first, last } => format!("seq {first}..={last}"),
        EventRange::Time { since, until } => format!("time {}..={}", opt(*since), opt(*until)),
    }
}

impl AuditLog {
    /// Writes an export bundle into `out` (created; must not exist or be
    /// empty). Makes a fresh checkpoint, and records what the bundle
    /// covered as exported (which allows pruning up to it: see
    /// [`AuditLog::exported_size`]). Blocking: call from `spawn_blocking`.
    pub fn export(&self, opts: &ExportOptions, out: &Path) -> Result<ExportSummary, AuditError> {
        let sh = self.shared();
        if out.exists() {
            let mut entries = fs::read_dir(out).map_err(|e| io_err(out, e))?;
            if entries.next().is_some() {
                return Err(AuditError::InvalidArgument(format!(
                    "{} is not empty; export into a new directory",
                    out.display()
                )));
            }
        }
        let after = match &opts.after {
            Some(note) => Some((
                note.clone(),
                sh.public
                    .verify_checkpoint(note, Some(&sh.origin))
                    .map_err(|e| {
                        AuditError::InvalidArgument(format!(
                            "the `after` checkpoint is not a checkpoint of this log: {e}"
                        ))
                    })?,
            )),
            None => None,
        };
        fs::create_dir_all(out).map_err(|e| io_err(out, e))?;

        let cp = self.checkpoint_now(opts.now)?;
        let n = cp.checkpoint.size;
        let root = cp.checkpoint.root;
        if let Some((_, a)) = &after {
            if a.size > n {
                return Err(AuditError::InvalidArgument(format!(
                    "the `after` checkpoint has size {}, larger than the log ({n})",
                    a.size
                )));
            }
        }
        let range = sh.resolve(&opts.range, n)?;

        // Events and leaves, streamed.
        let mut events = HashingFile::create(out.join(EVENTS_FILE))?;
        let mut leaves = HashingFile::create(out.join(LEAVES_FILE))?;
        let mut count = 0u64;
        let (mut first_time, mut last_time) = (None, None);
        if let Some((a, b)) = range {
            if a <= sh.pruned_size() {
                return Err(AuditError::Pruned(sh.pruned_size() + 1));
            }
            let mut expect = a;
            let read = sh.seg.range(a, b, &mut |seq, bytes, stored| {
                let leaf = leaf_hash(bytes);
                if *stored != leaf {
                    return Err(AuditError::Corrupt(format!(
                        "stored event {seq} does not match its leaf hash (modified in the store)"
                    )));
                }
                if seq == a || seq == b {
                    let t = AuditEvent::decode(bytes)
                        .map_err(|e| AuditError::Corrupt(format!("event {seq}: {e}")))?
                        .time;
                    if seq == a {
                        first_time = Some(t);
                    }
                    if seq == b {
                        last_time = Some(t);
                    }
                }
                events.write(bytes)?;
                events.write(b"\n")?;
                leaves.write(format!("{seq} {}\n", hex::encode(leaf)).as_bytes())?;
                count += 1;
                expect += 1;
                Ok(true)
            });
            if let Err(e) = read {
                // Pruned while this export ran.
                return Err(if a <= sh.pruned_size() {
                    AuditError::Pruned(sh.pruned_size() + 1)
                } else {
                    e
                });
            }
            if expect != b + 1 {
                return Err(if a <= sh.pruned_size() {
                    AuditError::Pruned(sh.pruned_size() + 1)
                } else {
                    AuditError::Corrupt(format!("event {expect} is missing from the store"))
                });
            }
        }
        let events_entry = events.finish()?;
        let leaves_entry = leaves.finish()?;

        // Proofs.
        let mut proofs = Proofs {
            tree_size: n,
            root: hex::encode(root),
            first_seq: range.map(|r| r.0),
            last_seq: range.map(|r| r.1),
            prefix: vec![],
            suffix: vec![],
            inclusion: vec![],
            consistency: None,
        };
        let mut others = Vec::new();
        if let Some((a, b)) = range {
            for id in range_nodes(0, a - 1) {
                proofs
                    .prefix
                    .push(node_json(id, &sh.subtree(id.start(), id.end())?));
            }
            for id in range_nodes(b, n) {
                proofs
                    .suffix
                    .push(node_json(id, &sh.subtree(id.start(), id.end())?));
            }
            let ends = if a == b { vec![a] } else { vec![a, b] };
            for seq in ends {
                let leaf = sh
                    .leaf(seq)?
                    .ok_or_else(|| AuditError::Corrupt(format!("leaf {seq} is missing")))?;
                proofs.inclusion.push(Inclusion {
                    seq,
                    leaf_index: seq - 1,
                    leaf_hash: hex::encode(leaf),
                    tree_size: n,
                    path: self
                        .inclusion_proof(seq, n)?
                        .iter()
                        .map(hex::encode)
                        .collect(),
                });
            }
            others = self
                .checkpoints(a - 1, b)?
                .into_iter()
                .filter(|c| c.checkpoint.size != n)
                .collect();
        }
        let mut after_consistent = None;
        if let Some((note, a)) = &after {
            after_consistent = Some(self.root_at(a.size)? == a.root);
            proofs.consistency = Some(Consistency {
                from_checkpoint: note.clone(),
                from_size: a.size,
                to_size: n,
                path: self
                    .consistency_proof(a.size, n)?
                    .iter()
                    .map(hex::encode)
                    .collect(),
            });
        }

        let mut cps = cp.note.clone();
        for c in &others {
            cps.push('\n');
            cps.push_str(&c.note);
        }
        let proofs_bytes = serde_json::to_vec_pretty(&proofs)
            .map_err(|e| AuditError::Corrupt(format!("encoding proofs: {e}")))?;
        let mut files = BTreeMap::new();
        files.insert(EVENTS_FILE.to_owned(), events_entry);
        files.insert(LEAVES_FILE.to_owned(), leaves_entry);
        files.insert(
            CHECKPOINTS_FILE.to_owned(),
            write_file(out, CHECKPOINTS_FILE, cps.as_bytes())?,
        );
        files.insert(
            PROOFS_FILE.to_owned(),
            write_file(out, PROOFS_FILE, &proofs_bytes)?,
        );
        files.insert(
            KEY_FILE.to_owned(),
            write_file(out, KEY_FILE, sh.public.to_pem().as_bytes())?,
        );
        let manifest = Manifest {
            format: BUNDLE_FORMAT.into(),
            origin: sh.origin.clone(),
            created: opts.now,
            key_id: format!("{:08x}", sh.public.key_id()),
            key_fingerprint: sh.public.fingerprint(),
            note_verifier_key: sh.public.verifier_key(&sh.origin),
            selection: selection(&opts.range),
            first_seq: range.map(|r| r.0),
            last_seq: range.map(|r| r.1),
            count,
            first_time,
            last_time,
            pruned: sh.pruned_size(),
            tree_size: n,
            root: hex::encode(root),
            checkpoint: cp.note.clone(),
            checkpoints: 1 + others.len() as u64,
            after: after.as_ref().map(|(_, a)| AfterRef {
                size: a.size,
                root: hex::encode(a.root),
            }),
            files,
        };
        let mut manifest_bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| AuditError::Corrupt(format!("encoding manifest: {e}")))?;
        manifest_bytes.push(b'\n');
        let sig = sh.sign(&manifest_bytes)?;
        write_file(out, MANIFEST_FILE, &manifest_bytes)?;
        write_file(out, MANIFEST_SIG_FILE, &sig)?;
        sh.mark_exported(range, n)?;
        Ok(ExportSummary {
            dir: out.to_path_buf(),
            first_seq: range.map(|r| r.0),
            last_seq: range.map(|r| r.1),
            count,
            tree_size: n,
            checkpoint: cp,
            after_consistent,
        })
    }
}

// ---------------------------------------------------------------------------
// Offline verification.

/// What is wrong with one event line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventProblem {
    /// Its bytes differ from the event the export signed.
    Modified,
    /// The event is not in the file.
    Missing,
    /// Another event of the export stands in its place.
    Reordered,
    /// A line that is not (or no longer) this export's event stands before
    /// it; `claimed_seq` is the seq that line claims.
    Inserted { claimed_seq: Option<u64> },
    /// The line is not a canonical event.
    Malformed(String),
    /// The line claims another sequence number.
    OutOfSequence { found: u64 },
    /// Its time is before the previous event's.
    TimeOrder,
}

impl fmt::Display for EventProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventProblem::Modified => {
                f.write_str("modified (its bytes differ from the event the export signed)")
            }
            EventProblem::Missing => f.write_str("missing (deleted from the file)"),
            EventProblem::Reordered => {
                f.write_str("reordered (another event of the export stands in its place)")
            }
            EventProblem::Inserted { claimed_seq } => {
                f.write_str("inserted: a line that is not in the log stands before it")?;
                match claimed_seq {
                    Some(s) => write!(f, " (claiming seq {s})"),
                    None => Ok(()),
                }
            }
            EventProblem::Malformed(m) => write!(f, "malformed: {m}"),
            EventProblem::OutOfSequence { found } => {
                write!(f, "out of sequence (the line claims seq {found})")
            }
            EventProblem::TimeOrder => f.write_str("time goes backwards"),
        }
    }
}

/// Why a bundle does not verify. The first problem found is reported, in
/// this order of precedence: key, manifest signature, checkpoint
/// signatures, events (by sequence number), roots and proofs, consistency
/// with `after`, file hashes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("{file}: {reason}")]
    Io { file: String, reason: String },
    #[error("{file}: malformed: {reason}")]
    Malformed { file: String, reason: String },
    #[error("audit-key.pem is not the audit key you trust (fingerprint {found})")]
    UntrustedKey { found: String },
    #[error("bad signature: manifest.sig does not verify manifest.json with audit-key.pem")]
    ManifestSignature,
    #[error("bad signature: checkpoint {which}: {reason}")]
    CheckpointSignature { which: String, reason: String },
    #[error("seq {seq}: {problem}{}", line.map(|l| format!(" (events.jsonl line {l})")).unwrap_or_default())]
    Event {
        seq: u64,
        line: Option<usize>,
        problem: EventProblem,
    },
    #[error("events.jsonl has {found} events, the manifest says {expected}")]
    Count { expected: u64, found: u64 },
    #[error("the events do not hash to the signed root of tree size {size}")]
    RootMismatch { size: u64 },
    #[error("proofs.json: {0}")]
    Proof(String),
    #[error("inconsistent: the log at size {to_size} does not extend the `after` checkpoint of size {from_size} (rewritten or forked)")]
    Inconsistent { from_size: u64, to_size: u64 },
    #[error(
        "the bundle proves consistency with another checkpoint than the `after` you gave ({0})"
    )]
    AfterMismatch(String),
    #[error("file hash mismatch: {file} is not the file the manifest signed")]
    FileHash { file: String },
}

/// Options of [`verify_bundle_with`].
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The audit public key (PEM) you trust; `audit-key.pem` must be it.
    /// Without it the bundle is only checked against the key it carries.
    pub trusted_key_pem: Option<String>,
    /// Your copy of the previous export's checkpoint: the bundle must prove
    /// consistency from it.
    pub after: Option<String>,
}

/// What a verified bundle holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub origin: String,
    pub key_id: String,
    pub key_fingerprint: String,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub events: u64,
    pub first_time: Option<u64>,
    pub last_time: Option<u64>,
    pub tree_size: u64,
    /// hex
    pub root: String,
    /// Signed checkpoints verified (the export's and those inside the range).
    pub checkpoints: usize,
    /// The `after` checkpoint size the log was proven consistent with.
    pub consistent_from: Option<u64>,
}

/// Verifies a bundle against the key it carries. See [`verify_bundle_with`].
pub fn verify_bundle(dir: &Path) -> Result<Report, VerifyError> {
    verify_bundle_with(dir, &VerifyOptions::default())
}

fn malformed(file: &str, reason: impl fmt::Display) -> VerifyError {
    VerifyError::Malformed {
        file: file.to_owned(),
        reason: reason.to_string(),
    }
}

fn read(dir: &Path, file: &str) -> Result<Vec<u8>, VerifyError> {
    fs::read(dir.join(file)).map_err(|e| VerifyError::Io {
        file: file.to_owned(),
        reason: e.to_string(),
    })
}

fn read_text(dir: &Path, file: &str) -> Result<String, VerifyError> {
    String::from_utf8(read(dir, file)?).map_err(|_| malformed(file, "not UTF-8"))
}

fn parse_hash(file: &str, s: &str) -> Result<Hash, VerifyError> {
    hex::decode(s)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| malformed(file, format!("{s:?} is not a 32-byte hex hash")))
}

fn checkpoint_err(which: String, e: NoteError) -> VerifyError {
    VerifyError::CheckpointSignature {
        which,
        reason: e.to_string(),
    }
}

/// Verifies an export bundle offline: the manifest signature and file
/// hashes, every checkpoint signature, each event's bytes against the
/// signed leaf hashes (naming the first bad sequence number: modified,
/// missing, reordered, inserted), sequence continuity and time order, the
/// Merkle root recomputed from the prefix subtrees + the events + the
/// suffix subtrees against every signed checkpoint, the inclusion proofs of
/// the first and last events, and the consistency proof from `after`.
pub fn verify_bundle_with(dir: &Path, opts: &VerifyOptions) -> Result<Report, VerifyError> {
    // Key and manifest signature.
    let pem = read_text(dir, KEY_FILE)?;
    let key = AuditPublicKey::from_pem(&pem).map_err(|e| malformed(KEY_FILE, e))?;
    if let Some(t) = &opts.trusted_key_pem {
        let trusted = AuditPublicKey::from_pem(t).map_err(|e| malformed("trusted key", e))?;
        if trusted.spki() != key.spki() {
            return Err(VerifyError::UntrustedKey {
                found: key.fingerprint(),
            });
        }
    }
    let manifest_bytes = read(dir, MANIFEST_FILE)?;
    let sig = read(dir, MANIFEST_SIG_FILE)?;
    if !key.verify(&manifest_bytes, &sig) {
        return Err(VerifyError::ManifestSignature);
    }
    let m: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| malformed(MANIFEST_FILE, e))?;
    if m.format != BUNDLE_FORMAT {
        return Err(malformed(
            MANIFEST_FILE,
            format!("format {:?}, expected {BUNDLE_FORMAT:?}", m.format),
        ));
    }
    if m.key_id != format!("{:08x}", key.key_id()) {
        return Err(malformed(MANIFEST_FILE, "names another audit key"));
    }

    // File hashes: mismatches are reported last, after the more specific
    // checks below had a chance to say what was changed.
    let mut bad_files = Vec::new();
    let mut contents: HashMap<&str, Vec<u8>> = HashMap::new();
    for name in [
        EVENTS_FILE,
        LEAVES_FILE,
        CHECKPOINTS_FILE,
        PROOFS_FILE,
        KEY_FILE,
    ] {
        let entry = m
            .files
            .get(name)
            .ok_or_else(|| malformed(MANIFEST_FILE, format!("does not list {name}")))?;
        let b = read(dir, name)?;
        if hex::encode(Sha256::digest(&b)) != entry.sha256 || b.len() as u64 != entry.bytes {
            bad_files.push(name.to_owned());
        }
        contents.insert(name, b);
    }
    let take = |contents: &mut HashMap<&str, Vec<u8>>, name: &str| {
        contents.remove(name).unwrap_or_default()
    };

    // Checkpoints.
    let cps_text = String::from_utf8(take(&mut contents, CHECKPOINTS_FILE))
        .map_err(|_| malformed(CHECKPOINTS_FILE, "not UTF-8"))?;
    let notes = split_notes(&cps_text).map_err(|e| malformed(CHECKPOINTS_FILE, e))?;
    let mut cps: Vec<Checkpoint> = Vec::with_capacity(notes.len());
    for (i, note) in notes.iter().enumerate() {
        let c = key
            .verify_checkpoint(note, Some(&m.origin))
            .map_err(|e| checkpoint_err(format!("{} in {CHECKPOINTS_FILE}", i + 1), e))?;
        cps.push(c);
    }
    let Some(main) = cps.first().cloned() else {
        return Err(malformed(CHECKPOINTS_FILE, "no checkpoint"));
    };
    if m.checkpoints != cps.len() as u64 {
        return Err(malformed(
            CHECKPOINTS_FILE,
            format!(
                "{} checkpoints, the manifest says {}",
                cps.len(),
                m.checkpoints
            ),
        ));
    }
    if notes.first() != Some(&m.checkpoint) {
        return Err(malformed(
            CHECKPOINTS_FILE,
            "the first checkpoint is not the one the manifest signed",
        ));
    }
    let n = main.size;
    if m.tree_size != n || m.root != hex::encode(main.root) {
        return Err(malformed(
            MANIFEST_FILE,
            "tree size or root differs from its checkpoint",
        ));
    }

    // Proofs.
    let proofs: Proofs = serde_json::from_slice(&take(&mut contents, PROOFS_FILE))
        .map_err(|e| malformed(PROOFS_FILE, e))?;
    if proofs.tree_size != n || proofs.root != m.root {
        return Err(VerifyError::Proof(
            "tree size or root differs from the checkpoint".into(),
        ));
    }
    if proofs.first_seq != m.first_seq || proofs.last_seq != m.last_seq {
        return Err(VerifyError::Proof("range differs from the manifest".into()));
    }

    // Events.
    let events = take(&mut contents, EVENTS_FILE);
    let mut lines: Vec<&[u8]> = events.split(|b| *b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let leaves: Vec<Hash> = lines.iter().map(|l| leaf_hash(l)).collect();
    // The seq a line claims, read leniently (only to describe a bad line).
    let claimed = |j: usize| -> Option<u64> {
        serde_json::from_slice::<serde_json::Value>(lines.get(j)?)
            .ok()?
            .get("seq")?
            .as_u64()
    };
    let first_seq = m.first_seq.unwrap_or(1);
    if m.count > 0 && (m.first_seq.is_none() || m.last_seq.is_none()) {
        return Err(malformed(MANIFEST_FILE, "events without a range"));
    }
    if let (Some(a), Some(b)) = (m.first_seq, m.last_seq) {
        if a == 0 || b < a || b - a + 1 != m.count || b > n {
            return Err(malformed(MANIFEST_FILE, "inconsistent range and count"));
        }
    }

    // 1. Against the signed leaf hashes (when leaves.txt is intact).
    if !bad_files.iter().any(|f| f == LEAVES_FILE) {
        let text = String::from_utf8(take(&mut contents, LEAVES_FILE))
            .map_err(|_| malformed(LEAVES_FILE, "not UTF-8"))?;
        let mut expected: Vec<(u64, Hash)> = Vec::with_capacity(m.count.min(1 << 16) as usize);
        for (i, line) in text.lines().enumerate() {
            let (s, h) = line
                .split_once(' ')
                .ok_or_else(|| malformed(LEAVES_FILE, format!("line {}", i + 1)))?;
            let seq: u64 = s
                .parse()
                .map_err(|_| malformed(LEAVES_FILE, format!("line {}", i + 1)))?;
            if seq != first_seq.saturating_add(i as u64) {
                return Err(malformed(
                    LEAVES_FILE,
                    format!("line {} is out of order", i + 1),
                ));
            }
            expected.push((seq, parse_hash(LEAVES_FILE, h)?));
        }
        if expected.len() as u64 != m.count {
            return Err(malformed(LEAVES_FILE, "count differs from the manifest"));
        }
        if let Some((seq, line, problem)) = localize(&expected, &leaves, &claimed) {
            return Err(VerifyError::Event {
                seq,
                line: Some(line),
                problem,
            });
        }
    }

    // 2. Each line on its own: canonical, consecutive, time never backwards.
    let (mut first_time, mut last_time) = (None, None);
    for (i, line) in lines.iter().enumerate() {
        let want = first_seq.saturating_add(i as u64);
        let ev = AuditEvent::decode(line).map_err(|e| VerifyError::Event {
            seq: want,
            line: Some(i + 1),
            problem: EventProblem::Malformed(e.to_string()),
        })?;
        if ev.seq != want {
            return Err(VerifyError::Event {
                seq: want,
                line: Some(i + 1),
                problem: if ev.seq > want {
                    EventProblem::Missing
                } else {
                    EventProblem::OutOfSequence { found: ev.seq }
                },
            });
        }
        if last_time.is_some_and(|t| ev.time < t) {
            return Err(VerifyError::Event {
                seq: want,
                line: Some(i + 1),
                problem: EventProblem::TimeOrder,
            });
        }
        first_time = first_time.or(Some(ev.time));
        last_time = Some(ev.time);
    }
    if lines.len() as u64 != m.count {
        return Err(VerifyError::Count {
            expected: m.count,
            found: lines.len() as u64,
        });
    }
    if first_time != m.first_time || last_time != m.last_time {
        return Err(malformed(
            MANIFEST_FILE,
            "event times differ from the events",
        ));
    }

    // 3. Roots: prefix compact range + events (+ checkpoints inside the
    // range) + suffix subtrees = the signed root.
    if let (Some(a), Some(b)) = (m.first_seq, m.last_seq) {
        let mut others: HashMap<u64, Vec<&Checkpoint>> = HashMap::new();
        for c in &cps[1..] {
            if c.size.saturating_add(1) < a || c.size > b {
                return Err(VerifyError::Proof(format!(
                    "checkpoint of size {} is outside the exported range",
                    c.size
                )));
            }
            others.entry(c.size).or_default().push(c);
        }
        let want_prefix = range_nodes(0, a - 1);
        if proofs.prefix.len() != want_prefix.len()
            || proofs
                .prefix
                .iter()
                .zip(&want_prefix)
                .any(|(p, w)| p.level != w.level || p.index != w.index)
        {
            return Err(VerifyError::Proof(
                "prefix is not the compact range before the first event".into(),
            ));
        }
        let prefix: Vec<Hash> = proofs
            .prefix
            .iter()
            .map(|p| parse_hash(PROOFS_FILE, &p.hash))
            .collect::<Result<_, _>>()?;
        let mut cr = CompactRange::from_parts(a - 1, prefix)
            .map_err(|e| VerifyError::Proof(e.to_string()))?;
        let check_at = |cr: &CompactRange| -> Result<(), VerifyError> {
            for c in others.get(&cr.size()).into_iter().flatten() {
                if cr.root() != c.root {
                    return Err(VerifyError::RootMismatch { size: c.size });
                }
            }
            Ok(())
        };
        check_at(&cr)?;
        for l in &leaves {
            cr.append(*l, |_, _| {});
            check_at(&cr)?;
        }
        let want_suffix = range_nodes(b, n);
        if proofs.suffix.len() != want_suffix.len() {
            return Err(VerifyError::Proof(
                "suffix does not cover the events after the range".into(),
            ));
        }
        for (p, w) in proofs.suffix.iter().zip(&want_suffix) {
            if p.level != w.level || p.index != w.index {
                return Err(VerifyError::Proof(
                    "suffix does not cover the events after the range".into(),
                ));
            }
            cr.append_subtree(p.level, parse_hash(PROOFS_FILE, &p.hash)?, |_, _| {})
                .map_err(|e| VerifyError::Proof(e.to_string()))?;
        }
        if cr.root() != main.root {
            return Err(VerifyError::RootMismatch { size: n });
        }
        // Inclusion proofs of the first and last events.
        for seq in [a, b] {
            let inc = proofs
                .inclusion
                .iter()
                .find(|i| i.seq == seq)
                .ok_or_else(|| VerifyError::Proof(format!("no inclusion proof for seq {seq}")))?;
            let leaf = leaves[(seq - a) as usize];
            let path: Vec<Hash> = inc
                .path
                .iter()
                .map(|h| parse_hash(PROOFS_FILE, h))
                .collect::<Result<_, _>>()?;
            if inc.leaf_index != seq - 1
                || inc.tree_size != n
                || parse_hash(PROOFS_FILE, &inc.leaf_hash)? != leaf
                || !verify_inclusion(seq - 1, n, &leaf, &path, &main.root)
            {
                return Err(VerifyError::Proof(format!(
                    "the inclusion proof of seq {seq} does not verify against the checkpoint"
                )));
            }
        }
    } else if cps.len() > 1 {
        return Err(VerifyError::Proof(
            "checkpoints besides the export's in an empty export".into(),
        ));
    }

    // 4. Consistency with the previous export.
    let mut consistent_from = None;
    match (&proofs.consistency, &m.after) {
        (Some(c), Some(after)) => {
            let prev = key
                .verify_checkpoint(&c.from_checkpoint, Some(&m.origin))
                .map_err(|e| checkpoint_err("`after`".into(), e))?;
            if after.size != prev.size || after.root != hex::encode(prev.root) {
                return Err(malformed(
                    MANIFEST_FILE,
                    "`after` differs from the checkpoint in proofs.json",
                ));
            }
            if c.from_size != prev.size || c.to_size != n {
                return Err(VerifyError::Proof("consistency proof sizes".into()));
            }
            let path: Vec<Hash> = c
                .path
                .iter()
                .map(|h| parse_hash(PROOFS_FILE, h))
                .collect::<Result<_, _>>()?;
            if !verify_consistency(prev.size, n, &prev.root, &main.root, &path) {
                return Err(VerifyError::Inconsistent {
                    from_size: prev.size,
                    to_size: n,
                });
            }
            if let Some(mine) = &opts.after {
                let mine = key
                    .verify_checkpoint(mine, Some(&m.origin))
                    .map_err(|e| checkpoint_err("`after` (yours)".into(), e))?;
                if mine.size != prev.size || mine.root != prev.root {
                    return Err(VerifyError::AfterMismatch(format!(
                        "yours has size {}, the bundle's {}",
                        mine.size, prev.size
                    )));
                }
            }
            consistent_from = Some(prev.size);
        }
        (None, None) => {
            if opts.after.is_some() {
                return Err(VerifyError::AfterMismatch(
                    "the bundle has no consistency proof".into(),
                ));
            }
        }
        _ => {
            return Err(malformed(
                MANIFEST_FILE,
                "`after` and proofs.json disagree on the consistency proof",
            ))
        }
    }

    if let Some(file) = bad_files.into_iter().next() {
        return Err(VerifyError::FileHash { file });
    }
    Ok(Report {
        origin: m.origin,
        key_id: m.key_id,
        key_fingerprint: key.fingerprint(),
        first_seq: m.first_seq,
        last_seq: m.last_seq,
        events: m.count,
        first_time,
        last_time,
        tree_size: n,
        root: m.root,
        checkpoints: cps.len(),
        consistent_from,
    })
}

/// Compares the lines' leaf hashes with the signed ones; returns the first
/// bad (expected seq, 1-based line, problem).
fn localize(
    expected: &[(u64, Hash)],
    actual: &[Hash],
    claimed: &dyn Fn(usize) -> Option<u64>,
) -> Option<(u64, usize, EventProblem)> {
    let (mut i, mut j) = (0usize, 0usize);
    while i < expected.len() && j < actual.len() {
        if actual[j] == expected[i].1 {
            i += 1;
            j += 1;
            continue;
        }
        let seq = expected[i].0;
        let index: HashMap<&Hash, usize> = expected
            .iter()
            .enumerate()
            .map(|(k, (_, h))| (h, k))
            .collect();
        let problem = match index.get(&actual[j]) {
            Some(&k) if k > i => {
                let present: HashSet<&Hash> = actual[j..].iter().collect();
                if present.contains(&expected[i].1) {
                    EventProblem::Reordered
                } else {
                    EventProblem::Missing
                }
            }
            Some(_) => EventProblem::Inserted {
                claimed_seq: claimed(j),
            },
            None => {
                if actual.get(j + 1) == Some(&expected[i].1) {
                    EventProblem::Inserted {
                        claimed_seq: claimed(j),
                    }
                } else {
                    EventProblem::Modified
                }
            }
        };
        return Some((seq, j + 1, problem));
    }
    if i < expected.len() {
        return Some((expected[i].0, j + 1, EventProblem::Missing));
    }
    if j < actual.len() {
        let next = expected.last().map_or(1, |e| e.0.saturating_add(1));
        return Some((
            next,
            j + 1,
            EventProblem::Inserted {
                claimed_seq: claimed(j),
            },
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> Hash {
        [i; 32]
    }

    fn exp(n: u8) -> Vec<(u64, Hash)> {
        (1..=n).map(|i| (u64::from(i), h(i))).collect()
    }

    fn run(actual: &[u8]) -> Option<(u64, usize, EventProblem)> {
        let a: Vec<Hash> = actual.iter().map(|i| h(*i)).collect();
        let claimed = |j: usize| actual.get(j).map(|i| u64::from(*i));
        localize(&exp(6), &a, &claimed)
    }

    #[test]
    fn localize_names_the_first_bad_seq() {
        assert_eq!(run(&[1, 2, 3, 4, 5, 6]), None);
        assert_eq!(
            run(&[1, 2, 99, 4, 5, 6]),
            Some((3, 3, EventProblem::Modified))
        );
        assert_eq!(run(&[1, 2, 4, 5, 6]), Some((3, 3, EventProblem::Missing)));
        assert_eq!(
            run(&[1, 2, 4, 3, 5, 6]),
            Some((3, 3, EventProblem::Reordered))
        );
        assert_eq!(
            run(&[1, 6, 3, 4, 5, 2]),
            Some((2, 2, EventProblem::Reordered))
        );
        assert_eq!(
            run(&[1, 2, 77, 3, 4, 5, 6]),
            Some((
                3,
                3,
                EventProblem::Inserted {
                    claimed_seq: Some(77)
                }
            ))
        );
        assert_eq!(
            run(&[1, 2, 2, 3, 4, 5, 6]),
            Some((
                3,
                3,
                EventProblem::Inserted {
                    claimed_seq: Some(2)
                }
            ))
        );
        assert_eq!(run(&[1, 2, 3, 4, 5]), Some((6, 6, EventProblem::Missing)));
        assert_eq!(
            run(&[1, 2, 3, 4, 5, 6, 9]),
            Some((
                7,
                7,
                EventProblem::Inserted {
                    claimed_seq: Some(9)
                }
            ))
        );
    }
}
