//! The audit log's own files: events and leaf hashes in append-only
//! segment files, stored subtree hashes in one file per level. Kept out of
//! sled so that an append costs one buffered write per batch and one
//! `fdatasync`, not several B-tree inserts per event.
//!
//! In `<store>/audit/`:
//!
//! - `NNNNNNNNNNNN.log`: segment `N` holds events `N·2^16 + 1 ..= (N+1)·2^16`
//!   as records `len (u32 LE) ‖ crc32 (u32 LE, of seq ‖ bytes) ‖ seq (u64
//!   LE) ‖ canonical event bytes`, in sequence order, back to back.
//! - `NNNNNNNNNNNN.idx`: one 48-byte entry per event of the segment, at
//!   `(seq - 1) mod 2^16`: `offset (u64 LE) ‖ len (u32 LE) ‖ crc (u32 LE) ‖
//!   leaf hash (32)`.
//! - `nodes-LL.bin`: the hash of the perfect subtree `(LL, i)` at `32·i`, for
//!   levels ≥ [`super::log::STORED_NODE_MIN_LEVEL`].
//!
//! Only the `.log` files are synced before an append is acknowledged; the
//! index and node files are derived from them, synced before the tree
//! state that covers them is saved (at checkpoints), and rebuilt from the
//! log at open for everything after that state ([`Segments::replay`]).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::merkle::{leaf_hash, Hash, NodeId};
use super::AuditError;

/// Events per segment: 2^SEG_BITS (a smaller value only in tests).
pub(crate) const SEG_BITS: u32 = 16;
const IDX_ENTRY: u64 = 48;
const REC_HEADER: u64 = 16;
/// No event is this large (events are validated far below it); a longer
/// length field is a torn or foreign record.
const MAX_RECORD: u32 = 16 << 20;
/// Segments kept open for readers besides the one being written.
const OPEN_SEGMENTS: usize = 8;
/// Index entries read per call when streaming a range.
const CHUNK: u64 = 4096;

fn crc_of(seq: u64, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(bytes);
    h.finalize()
}

/// `f(seq, bytes, stored leaf)`: `Ok(false)` stops the walk.
pub(crate) type EventVisitor<'a> = dyn FnMut(u64, &[u8], &Hash) -> Result<bool, AuditError> + 'a;

/// `f(seq, bytes, leaf)` → the subtree hashes the event completed.
pub(crate) type Replayer<'a> =
    dyn FnMut(u64, &[u8], Hash) -> Result<Vec<(NodeId, Hash)>, AuditError> + 'a;

/// A record header: `(len, crc, seq)`.
fn header(h: &[u8; REC_HEADER as usize]) -> (u32, u32, u64) {
    let mut w4 = [0u8; 4];
    w4.copy_from_slice(&h[0..4]);
    let len = u32::from_le_bytes(w4);
    w4.copy_from_slice(&h[4..8]);
    let crc = u32::from_le_bytes(w4);
    let mut w8 = [0u8; 8];
    w8.copy_from_slice(&h[8..16]);
    (len, crc, u64::from_le_bytes(w8))
}

/// Where the next record goes: segment and byte offset in its `.log`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tail {
    pub(crate) seg: u64,
    pub(crate) off: u64,
}

/// One index entry.
#[derive(Clone, Copy, Debug)]
struct Entry {
    off: u64,
    len: u32,
    crc: u32,
    leaf: Hash,
}

impl Entry {
    fn encode(&self) -> [u8; IDX_ENTRY as usize] {
        let mut b = [0u8; IDX_ENTRY as usize];
        b[..8].copy_from_slice(&self.off.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b[16..].copy_from_slice(&self.leaf);
        b
    }

    fn decode(b: &[u8]) -> Entry {
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&b[8..12]);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&b[12..16]);
        let mut leaf = [0u8; 32];
        leaf.copy_from_slice(&b[16..48]);
        Entry {
            off: u64::from_le_bytes(off),
            len: u32::from_le_bytes(len),
            crc: u32::from_le_bytes(crc),
            leaf,
        }
    }
}

struct Seg {
    log: File,
    idx: File,
}

/// The audit files of one store.
pub(crate) struct Segments {
    dir: PathBuf,
    bits: u32,
    open: Mutex<HashMap<u64, Arc<Seg>>>,
    nodes: Mutex<HashMap<u8, Arc<File>>>,
    /// Index segments and node levels written since the last [`Segments::sync_derived`].
    dirty: Mutex<(BTreeSet<u64>, BTreeSet<u8>)>,
}

fn io(path: &Path, e: std::io::Error) -> AuditError {
    if e.raw_os_error() == Some(nix::libc::ENOSPC) {
        return AuditError::NoSpace(format!("{}: {e}", path.display()));
    }
    AuditError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Reads exactly `buf.len()` bytes at `off`; `Ok(false)` when the file ends first.
fn read_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<bool> {
    match f.read_exact_at(buf, off) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl Segments {
    /// Opens (creating) the directory.
    pub(crate) fn open(dir: PathBuf, bits: u32) -> Result<Segments, AuditError> {
        fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        Ok(Segments {
            dir,
            bits: bits.clamp(1, 30),
            open: Mutex::new(HashMap::new()),
            nodes: Mutex::new(HashMap::new()),
            dirty: Mutex::new((BTreeSet::new(), BTreeSet::new())),
        })
    }

    /// The segment holding event `seq` (≥ 1).
    pub(crate) fn seg_of(&self, seq: u64) -> u64 {
        (seq - 1) >> self.bits
    }

    fn slot_of(&self, seq: u64) -> u64 {
        (seq - 1) & ((1 << self.bits) - 1)
    }

    fn log_path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{seg:012}.log"))
    }

    fn idx_path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{seg:012}.idx"))
    }

    fn node_path(&self, level: u8) -> PathBuf {
        self.dir.join(format!("nodes-{level:02}.bin"))
    }

    /// Segment numbers present, ascending.
    pub(crate) fn list(&self) -> Result<Vec<u64>, AuditError> {
        let mut out = Vec::new();
        for ent in fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let ent = ent.map_err(|e| io(&self.dir, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(n) = name.strip_suffix(".log") {
                if let Ok(n) = n.parse::<u64>() {
                    out.push(n);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn sync_dir(&self) -> Result<(), AuditError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))
    }

    /// The files of `seg`; created when `create`, else `None` when absent.
    fn seg(&self, seg: u64, create: bool) -> Result<Option<Arc<Seg>>, AuditError> {
        let mut open = self.open.lock();
        if let Some(s) = open.get(&seg) {
            return Ok(Some(s.clone()));
        }
        let (lp, ip) = (self.log_path(seg), self.idx_path(seg));
        let existed = lp.exists();
        if !existed && !create {
            return Ok(None);
        }
        let opts = |create: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true).create(create);
            o
        };
        let log = opts(create).open(&lp).map_err(|e| io(&lp, e))?;
        // The index is derived: (re)created whenever its log exists.
        let idx = opts(true).open(&ip).map_err(|e| io(&ip, e))?;
        if !existed {
            self.sync_dir()?;
        }
        if open.len() >= OPEN_SEGMENTS {
            // Evict the lowest other segment (readers holding it keep their Arc).
            if let Some(k) = open.keys().copied().filter(|k| *k != seg).min() {
                open.remove(&k);
            }
        }
        let s = Arc::new(Seg { log, idx });
        open.insert(seg, s.clone());
        Ok(Some(s))
    }

    fn node_file(&self, level: u8, create: bool) -> Result<Option<Arc<File>>, AuditError> {
        let mut nodes = self.nodes.lock();
        if let Some(f) = nodes.get(&level) {
            return Ok(Some(f.clone()));
        }
        let p = self.node_path(level);
        let existed = p.exists();
        if !existed && !create {
            return Ok(None);
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(&p)
            .map_err(|e| io(&p, e))?;
        if !existed {
            self.sync_dir()?;
        }
        let f = Arc::new(f);
        nodes.insert(level, f.clone());
        Ok(Some(f))
    }

    /// Writes a batch of consecutive events `(seq, bytes, leaf)` at `tail`
    /// and the subtree hashes they completed, then syncs the `.log` files
    /// written. On success `tail` points past the batch; on error it is
    /// unchanged and [`Segments::truncate_log`] must run before the next
    /// batch.
    pub(crate) fn append(
        &self,
        tail: &mut Tail,
        rows: &[(u64, Vec<u8>, Hash)],
        nodes: &[(NodeId, Hash)],
    ) -> Result<(), AuditError> {
        let mut t = *tail;
        let mut i = 0;
        while i < rows.len() {
            let seg = self.seg_of(rows[i].0);
            if seg != t.seg {
                t = Tail { seg, off: 0 };
            }
            let mut j = i;
            let mut log_buf = Vec::new();
            let mut idx_buf = Vec::new();
            let mut off = t.off;
            while j < rows.len() && self.seg_of(rows[j].0) == seg {
                let (seq, bytes, leaf) = &rows[j];
                let len = u32::try_from(bytes.len())
                    .ok()
                    .filter(|l| *l <= MAX_RECORD)
                    .ok_or_else(|| AuditError::InvalidEvent("event too large".into()))?;
                let crc = crc_of(*seq, bytes);
                log_buf.extend_from_slice(&len.to_le_bytes());
                log_buf.extend_from_slice(&crc.to_le_bytes());
                log_buf.extend_from_slice(&seq.to_le_bytes());
                log_buf.extend_from_slice(bytes);
                idx_buf.extend_from_slice(
                    &Entry {
                        off,
                        len,
                        crc,
                        leaf: *leaf,
                    }
                    .encode(),
                );
                off += REC_HEADER + u64::from(len);
                j += 1;
            }
            let s = self
                .seg(seg, true)?
                .ok_or_else(|| AuditError::Corrupt("segment vanished".into()))?;
            s.log
                .write_all_at(&log_buf, t.off)
                .map_err(|e| io(&self.log_path(seg), e))?;
            s.idx
                .write_all_at(&idx_buf, self.slot_of(rows[i].0) * IDX_ENTRY)
                .map_err(|e| io(&self.idx_path(seg), e))?;
            s.log.sync_data().map_err(|e| io(&self.log_path(seg), e))?;
            self.dirty.lock().0.insert(seg);
            t.off = off;
            i = j;
        }
        for (id, h) in nodes {
            let f = self
                .node_file(id.level, true)?
                .ok_or_else(|| AuditError::Corrupt("node file vanished".into()))?;
            f.write_all_at(h, id.index * 32)
                .map_err(|e| io(&self.node_path(id.level), e))?;
            self.dirty.lock().1.insert(id.level);
        }
        *tail = t;
        Ok(())
    }

    /// Cuts the `.log` of `tail` back to `tail.off` (after a failed batch:
    /// nothing after the last acknowledged record may stay behind).
    pub(crate) fn truncate_log(&self, tail: &Tail) -> Result<(), AuditError> {
        if let Some(s) = self.seg(tail.seg, false)? {
            s.log
                .set_len(tail.off)
                .and_then(|()| s.log.sync_data())
                .map_err(|e| io(&self.log_path(tail.seg), e))?;
        }
        // A batch may have spilled into the next segment: nothing there
        // was acknowledged.
        let next = tail.seg + 1;
        if self.log_path(next).exists() {
            self.remove_segment(next)?;
        }
        Ok(())
    }

    /// Syncs the index and node files written since the last call (before
    /// a tree state covering them is saved).
    pub(crate) fn sync_derived(&self) -> Result<(), AuditError> {
        let (segs, levels) = std::mem::take(&mut *self.dirty.lock());
        for seg in segs {
            if let Some(s) = self.seg(seg, false)? {
                s.idx.sync_data().map_err(|e| io(&self.idx_path(seg), e))?;
            }
        }
        for level in levels {
            if let Some(f) = self.node_file(level, false)? {
                f.sync_data().map_err(|e| io(&self.node_path(level), e))?;
            }
        }
        Ok(())
    }

    fn entry(&self, seq: u64) -> Result<Option<(Arc<Seg>, Entry)>, AuditError> {
        let seg = self.seg_of(seq);
        let Some(s) = self.seg(seg, false)? else {
            return Ok(None);
        };
        let mut b = [0u8; IDX_ENTRY as usize];
        if !read_at(&s.idx, &mut b, self.slot_of(seq) * IDX_ENTRY)
            .map_err(|e| io(&self.idx_path(seg), e))?
        {
            return Ok(None);
        }
        Ok(Some((s, Entry::decode(&b))))
    }

    /// The leaf hash of `seq` (the caller checks `seq` is in the tree).
    pub(crate) fn leaf(&self, seq: u64) -> Result<Option<Hash>, AuditError> {
        Ok(self.entry(seq)?.map(|(_, e)| e.leaf))
    }

    /// A stored subtree hash (level ≥ the stored minimum).
    pub(crate) fn node(&self, id: NodeId) -> Result<Option<Hash>, AuditError> {
        let Some(f) = self.node_file(id.level, false)? else {
            return Ok(None);
        };
        let mut h = [0u8; 32];
        let got =
            read_at(&f, &mut h, id.index * 32).map_err(|e| io(&self.node_path(id.level), e))?;
        Ok(got.then_some(h))
    }

    /// The bytes of event `seq`, checked against its CRC.
    pub(crate) fn event(&self, seq: u64) -> Result<Option<Vec<u8>>, AuditError> {
        let mut out = None;
        self.range(seq, seq, &mut |_, b, _| {
            out = Some(b.to_vec());
            Ok(false)
        })?;
        Ok(out)
    }

    /// Calls `f(seq, bytes, stored leaf)` for events `a..=b` in order until
    /// it returns `false`. Reads in chunks: one read of index entries, one
    /// of the records they point at. A missing or damaged event is an error
    /// naming it.
    pub(crate) fn range(&self, a: u64, b: u64, f: &mut EventVisitor<'_>) -> Result<(), AuditError> {
        let mut seq = a;
        while seq <= b && seq > 0 {
            let seg = self.seg_of(seq);
            let seg_last = (seg + 1) << self.bits;
            let last = b.min(seg_last).min(seq + CHUNK - 1);
            let n = last - seq + 1;
            let missing =
                || AuditError::Corrupt(format!("event {seq} is missing from the audit files"));
            let s = self.seg(seg, false)?.ok_or_else(missing)?;
            let mut idx = vec![0u8; (n * IDX_ENTRY) as usize];
            if !read_at(&s.idx, &mut idx, self.slot_of(seq) * IDX_ENTRY)
                .map_err(|e| io(&self.idx_path(seg), e))?
            {
                return Err(missing());
            }
            let entries: Vec<Entry> = idx
                .chunks_exact(IDX_ENTRY as usize)
                .map(Entry::decode)
                .collect();
            let (first, lastent) = match (entries.first(), entries.last()) {
                (Some(x), Some(y)) => (*x, *y),
                _ => return Err(missing()),
            };
            let end = lastent.off + REC_HEADER + u64::from(lastent.len);
            if end < first.off || end - first.off > (n + 1) * (u64::from(MAX_RECORD) + REC_HEADER) {
                return Err(AuditError::Corrupt(format!(
                    "the audit index of events {seq}..={last} is damaged"
                )));
            }
            let mut buf = vec![0u8; (end - first.off) as usize];
            if !read_at(&s.log, &mut buf, first.off).map_err(|e| io(&self.log_path(seg), e))? {
                return Err(missing());
            }
            for (k, e) in entries.iter().enumerate() {
                let q = seq + k as u64;
                let bad = |what: &str| {
                    AuditError::Corrupt(format!("event {q} in the audit files: {what}"))
                };
                let start = e
                    .off
                    .checked_sub(first.off)
                    .ok_or_else(|| bad("index out of order"))? as usize;
                let hdr: &[u8; REC_HEADER as usize] = buf
                    .get(start..start + REC_HEADER as usize)
                    .and_then(|h| h.try_into().ok())
                    .ok_or_else(|| bad("record beyond the index"))?;
                let (len, crc, seq) = header(hdr);
                if seq != q {
                    return Err(bad("record has another sequence number"));
                }
                if len != e.len || crc != e.crc {
                    return Err(bad("record header does not match its index entry"));
                }
                let body = buf
                    .get(start + REC_HEADER as usize..start + REC_HEADER as usize + e.len as usize)
                    .ok_or_else(|| bad("record shorter than its index entry"))?;
                if crc_of(q, body) != e.crc {
                    return Err(bad("checksum mismatch"));
                }
                if !f(q, body, &e.leaf)? {
                    return Ok(());
                }
            }
            seq = last + 1;
        }
        Ok(())
    }

    /// At open: reads records after event `size` (the last event covered by
    /// the saved tree state), checks each (sequence, length, CRC), rewrites
    /// its index entry and hands it to `f(seq, bytes, leaf)`, which appends
    /// it to the tree and returns the subtree hashes completed (written
    /// here). Stops at the first record that is incomplete or not the next
    /// one, cuts the files there and removes later segments. Returns the
    /// tail and how many events were replayed.
    pub(crate) fn replay(
        &self,
        size: u64,
        f: &mut Replayer<'_>,
    ) -> Result<(Tail, u64), AuditError> {
        // Where event size + 1 starts.
        let mut t = if size == 0 || self.slot_of(size + 1) == 0 {
            Tail {
                seg: self.seg_of(size + 1),
                off: 0,
            }
        } else {
            let (_, e) = self.entry(size)?.ok_or_else(|| {
                AuditError::Corrupt(format!(
                    "event {size}, the last one the saved audit tree state covers, is missing from {}",
                    self.dir.display()
                ))
            })?;
            Tail {
                seg: self.seg_of(size),
                off: e.off + REC_HEADER + u64::from(e.len),
            }
        };
        let mut seq = size + 1;
        let mut replayed = 0u64;
        loop {
            if self.seg_of(seq) != t.seg {
                t = Tail {
                    seg: self.seg_of(seq),
                    off: 0,
                };
            }
            let Some(s) = self.seg(t.seg, false)? else {
                break;
            };
            let mut hdr = [0u8; REC_HEADER as usize];
            if !read_at(&s.log, &mut hdr, t.off).map_err(|e| io(&self.log_path(t.seg), e))? {
                break;
            }
            let (len, crc, rec_seq) = header(&hdr);
            if rec_seq != seq || len > MAX_RECORD {
                break;
            }
            let mut body = vec![0u8; len as usize];
            if !read_at(&s.log, &mut body, t.off + REC_HEADER)
                .map_err(|e| io(&self.log_path(t.seg), e))?
            {
                break;
            }
            if crc_of(seq, &body) != crc {
                break;
            }
            let leaf = leaf_hash(&body);
            let e = Entry {
                off: t.off,
                len,
                crc,
                leaf,
            };
            s.idx
                .write_all_at(&e.encode(), self.slot_of(seq) * IDX_ENTRY)
                .map_err(|e| io(&self.idx_path(t.seg), e))?;
            self.dirty.lock().0.insert(t.seg);
            for (id, h) in f(seq, &body, leaf)? {
                let nf = self
                    .node_file(id.level, true)?
                    .ok_or_else(|| AuditError::Corrupt("node file vanished".into()))?;
                nf.write_all_at(&h, id.index * 32)
                    .map_err(|e| io(&self.node_path(id.level), e))?;
                self.dirty.lock().1.insert(id.level);
            }
            t.off += REC_HEADER + u64::from(len);
            seq += 1;
            replayed += 1;
        }
        // Cut what follows the last good record (t.seg is seq's segment).
        if let Some(s) = self.seg(t.seg, false)? {
            s.log
                .set_len(t.off)
                .and_then(|()| s.idx.set_len(self.slot_of(seq) * IDX_ENTRY))
                .and_then(|()| s.log.sync_all())
                .and_then(|()| s.idx.sync_all())
                .map_err(|e| io(&self.log_path(t.seg), e))?;
        }
        for seg in self.list()? {
            if seg > t.seg {
                tracing::warn!(
                    segment = seg,
                    "audit log: removing a segment after the last complete event"
                );
                self.remove_segment(seg)?;
            }
        }
        self.sync_derived()?;
        Ok((t, replayed))
    }

    pub(crate) fn remove_segment(&self, seg: u64) -> Result<(), AuditError> {
        self.open.lock().remove(&seg);
        for p in [self.log_path(seg), self.idx_path(seg)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io(&p, e)),
            }
        }
        self.sync_dir()
    }

    /// Removes the segments whose events are all `<= upto` (pruned);
    /// returns how many.
    pub(crate) fn remove_through(&self, upto: u64) -> Result<u64, AuditError> {
        let mut n = 0;
        for seg in self.list()? {
            if (seg + 1) << self.bits <= upto {
                self.remove_segment(seg)?;
                n += 1;
            }
        }
        Ok(n)
    }
}
