//! The proxy request log in its own append-only files, out of sled.
//!
//! Every proxied request appends one entry. In sled that was a B-tree
//! insert on the request path (12% of keyseald's samples under gateway
//! load) into a tree that only ever grows until the retention prunes it,
//! and sled's memory grows with it (about 80 bytes per request in the
//! soak). Here the request path only hands the entry to a writer thread,
//! which appends batches to segment files; pruning deletes whole files.
//!
//! In `<store>/proxy-log/`:
//!
//! - `NNNNNNNNNNNN.rlog`: records `len (u32 LE) ‖ crc32 (u32 LE, of the
//!   payload) ‖ payload (postcard [`LogEntry`])`, back to back, in the order
//!   the requests ended (so only roughly in time order: a record's time is
//!   when its request started).
//! - `NNNNNNNNNNNN.meta`: written when a segment is sealed: its time range,
//!   entry count, length and the proxies it holds, so queries skip
//!   segments without reading them. A segment without a valid one is
//!   scanned at open (and cut at its first torn record).
//!
//! The request path pushes its entry into a shared buffer and, as a rule,
//! wakes nobody: the writer drains the buffer at most [`LINGER`] after the
//! first entry of a batch arrived (or at once when [`BATCH`] entries wait,
//! a query asks, or the log closes). Handing each entry to the writer
//! through a channel woke the writer thread for almost every request (a
//! futex wake on the request path and a context switch, ~12% of
//! keyseald's samples under gateway load).
//!
//! The log is operational data, not an audit record (the audit log has
//! every decision): appends are written to the OS per batch but not
//! synced, as sled's were not, so a crash loses at most the last
//! [`LINGER`] of entries. A query first waits until every entry handed
//! over before it is written, so a caller reads its own requests.
//! Below the store's free-space reserve entries are dropped (logged at
//! debug), as before.

use std::collections::{BTreeSet, BinaryHeap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::store::LogEntry;
use super::ProxyError;
use crate::store::{DiskGuard, StoreError};

/// A segment is sealed at this size ...
const SEG_BYTES: u64 = 8 << 20;
/// ... or when it has been open this long, so that pruning (whole
/// segments) is never far behind the retention.
const SEG_SPAN: Duration = Duration::from_secs(3600);
/// No entry is this large (paths are bounded far below it); a longer
/// length field is a torn record.
const MAX_RECORD: u32 = 1 << 20;
const HEADER: usize = 8;
/// Entries waiting for the writer before `log` blocks (backpressure
/// instead of loss).
const QUEUE: usize = 16 * 1024;
/// Entries waiting that wake the writer at once (one `write` to the OS
/// per batch).
const BATCH: usize = 4096;
/// The longest an entry waits in the buffer before the writer takes it.
const LINGER: Duration = Duration::from_millis(10);
/// How long a query waits for the writer to catch up.
const SYNC_WAIT: Duration = Duration::from_secs(10);

fn io(what: &str, path: &Path, e: std::io::Error) -> ProxyError {
    ProxyError::from(StoreError::Io(format!(
        "request log: {what} {}: {e}",
        path.display()
    )))
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SegMeta {
    id: u64,
    min_us: u64,
    max_us: u64,
    count: u64,
    /// Length of the valid records (what readers may read).
    bytes: u64,
    proxies: BTreeSet<String>,
}

impl SegMeta {
    fn new(id: u64) -> SegMeta {
        SegMeta {
            id,
            min_us: u64::MAX,
            ..SegMeta::default()
        }
    }

    fn add(&mut self, e: &LogEntry, len: u64) {
        self.min_us = self.min_us.min(e.time_us);
        self.max_us = self.max_us.max(e.time_us);
        self.count += 1;
        self.bytes += len;
        if !self.proxies.contains(&e.proxy) {
            self.proxies.insert(e.proxy.clone());
        }
    }

    fn encode(&self) -> String {
        let mut s = format!(
            "keyseal-reqlog-meta 1\n{} {} {} {}\n",
            self.min_us, self.max_us, self.count, self.bytes
        );
        for p in &self.proxies {
            s.push_str(p);
            s.push('\n');
        }
        s
    }

    fn decode(id: u64, s: &str) -> Option<SegMeta> {
        let mut lines = s.lines();
        if lines.next()? != "keyseal-reqlog-meta 1" {
            return None;
        }
        let nums: Vec<u64> = lines
            .next()?
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let [min_us, max_us, count, bytes] = nums[..] else {
            return None;
        };
        Some(SegMeta {
            id,
            min_us,
            max_us,
            count,
            bytes,
            proxies: lines.map(str::to_owned).collect(),
        })
    }
}

fn seg_path(dir: &Path, id: u64, ext: &str) -> PathBuf {
    dir.join(format!("{id:012}.{ext}"))
}

fn encode_record(e: &LogEntry, out: &mut Vec<u8>) -> Result<(), ProxyError> {
    let payload = crate::store::encode(e)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_RECORD)
        .ok_or_else(|| ProxyError::from(StoreError::Io("request log entry too large".into())))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Reads the records of `path` up to `limit` bytes, calling `f` for each.
/// Returns the length of the valid records: a torn, oversized or corrupt
/// record (or the end of the file) ends the walk there.
fn scan(
    path: &Path,
    limit: u64,
    f: &mut dyn FnMut(LogEntry, u64, u64),
) -> Result<u64, std::io::Error> {
    let file = File::open(path)?;
    let mut r = BufReader::with_capacity(256 * 1024, file.take(limit));
    let mut off = 0u64;
    let mut payload = Vec::new();
    loop {
        let mut h = [0u8; HEADER];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(off),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if len > MAX_RECORD {
            return Ok(off);
        }
        payload.resize(len as usize, 0);
        match r.read_exact(&mut payload) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(off),
            Err(e) => return Err(e),
        }
        if crc32fast::hash(&payload) != crc {
            return Ok(off);
        }
        let Ok(e) = crate::store::decode::<LogEntry>("proxy_log", &payload) else {
            return Ok(off);
        };
        let rec = (HEADER + payload.len()) as u64;
        f(e, off, rec);
        off += rec;
    }
}

impl Shared {
    /// Reads the published records of segment `m` (see [`scan`]); a
    /// segment deleted meanwhile (pruned) reads as empty.
    fn read_segment(
        &self,
        m: &SegMeta,
        f: &mut dyn FnMut(LogEntry, u64, u64),
    ) -> Result<(), ProxyError> {
        let path = seg_path(&self.dir, m.id, "rlog");
        match scan(&path, m.bytes, f) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("read", &path, e)),
        }
    }
}

/// What the request path hands to the writer.
#[derive(Default)]
struct Queue {
    entries: Vec<LogEntry>,
    /// Sync requests: each is answered (its generation written) once
    /// everything handed over before it is written.
    sync_asked: u64,
    sync_done: u64,
    /// The writer waits with no deadline (the buffer was empty): the next
    /// entry must wake it.
    idle: bool,
    /// Set on close: the writer takes what is buffered and ends.
    stop: bool,
    /// The writer thread has ended (closed or panicked): appends are lost,
    /// with a warning, and syncs return, instead of waiting for it.
    gone: bool,
}

struct Shared {
    dir: PathBuf,
    disk: Arc<DiskGuard>,
    /// Sealed segments, then the one being written (if any), by id.
    segs: Mutex<Vec<SegMeta>>,
    /// Entries older than this were pruned (whole files go later).
    hidden_before: AtomicU64,
    queue: Mutex<Queue>,
    /// Wakes the writer (an entry into an idle buffer, a full batch, a
    /// sync, the stop).
    wake: Condvar,
    /// Wakes appenders blocked on a full buffer, and syncs.
    drained: Condvar,
}

/// The request log: see the module documentation.
pub struct RequestLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl RequestLog {
    /// Opens (creating) the log in `dir`: seals what an earlier run left
    /// (cutting a torn tail), and starts the writer thread, which writes
    /// into a new segment.
    pub fn open(dir: PathBuf, disk: Arc<DiskGuard>) -> Result<RequestLog, ProxyError> {
        {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| io("create", &dir, e))?;
        }
        let mut ids = Vec::new();
        for ent in fs::read_dir(&dir).map_err(|e| io("read", &dir, e))? {
            let ent = ent.map_err(|e| io("read", &dir, e))?;
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(".rlog")
                .and_then(|s| s.parse::<u64>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut segs = Vec::new();
        for id in ids {
            if let Some(m) = Self::seal_existing(&dir, id)? {
                segs.push(m);
            }
        }
        let next = segs.last().map_or(1, |m: &SegMeta| m.id + 1);
        let shared = Arc::new(Shared {
            dir,
            disk,
            segs: Mutex::new(segs),
            hidden_before: AtomicU64::new(0),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            drained: Condvar::new(),
        });
        let w = Writer {
            shared: shared.clone(),
            next,
            cur: None,
            buf: Vec::with_capacity(256 * 1024),
        };
        let writer = std::thread::Builder::new()
            .name("request-log".into())
            .spawn(move || w.run())
            .map_err(|e| ProxyError::from(StoreError::Io(format!("request log writer: {e}"))))?;
        Ok(RequestLog {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The metadata of segment `id` from its `.meta` file when that matches
    /// the file, else from a scan (cutting a torn tail, writing `.meta`).
    /// Empty segments are removed (`None`).
    fn seal_existing(dir: &Path, id: u64) -> Result<Option<SegMeta>, ProxyError> {
        let log = seg_path(dir, id, "rlog");
        let meta = seg_path(dir, id, "meta");
        let len = fs::metadata(&log).map_err(|e| io("stat", &log, e))?.len();
        if let Ok(s) = fs::read_to_string(&meta) {
            if let Some(m) = SegMeta::decode(id, &s) {
                if m.bytes == len {
                    return Ok(Some(m));
                }
            }
        }
        let mut m = SegMeta::new(id);
        let valid = scan(&log, u64::MAX, &mut |e, _, rec| m.add(&e, rec))
            .map_err(|e| io("read", &log, e))?;
        if valid < len {
            tracing::warn!(
                segment = %log.display(), kept = valid, cut = len - valid,
                "request log: a torn or corrupt tail was cut (an unclean stop)"
            );
            let f = OpenOptions::new()
                .write(true)
                .open(&log)
                .map_err(|e| io("open", &log, e))?;
            f.set_len(valid).map_err(|e| io("truncate", &log, e))?;
        }
        m.bytes = valid;
        if m.count == 0 {
            let _ = fs::remove_file(&meta);
            fs::remove_file(&log).map_err(|e| io("remove", &log, e))?;
            return Ok(None);
        }
        fs::write(&meta, m.encode()).map_err(|e| io("write", &meta, e))?;
        Ok(Some(m))
    }

    /// Hands `e` to the writer. Blocks only while the writer is a full
    /// buffer behind (backpressure, not loss).
    pub fn append(&self, e: LogEntry) {
        let sh = &*self.shared;
        let mut q = sh.queue.lock();
        while q.entries.len() >= QUEUE && !q.gone {
            sh.drained.wait(&mut q);
        }
        if q.gone || q.stop {
            drop(q);
            tracing::warn!("request log entry lost: the writer has stopped");
            return;
        }
        q.entries.push(e);
        if (q.idle && q.entries.len() == 1) || q.entries.len() == BATCH {
            sh.wake.notify_one();
        }
    }

    /// Waits until every entry handed over before this call is written.
    pub fn sync(&self) -> Result<(), ProxyError> {
        let sh = &*self.shared;
        let mut q = sh.queue.lock();
        q.sync_asked += 1;
        let mine = q.sync_asked;
        sh.wake.notify_one();
        let deadline = Instant::now() + SYNC_WAIT;
        while q.sync_done < mine && !q.gone {
            if sh.drained.wait_until(&mut q, deadline).timed_out() {
                return Err(ProxyError::from(StoreError::Io(
                    "request log: the writer did not catch up in time".into(),
                )));
            }
        }
        Ok(()) // done, or the writer has gone: everything it took is written
    }

    /// Entries of `proxy` with `after_us <= time < before_us` (0: open),
    /// oldest first (by time, then by append order), at most `limit`.
    pub fn query(
        &self,
        proxy: &str,
        after_us: u64,
        before_us: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, ProxyError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.sync()?;
        let after = after_us.max(self.shared.hidden_before.load(Ordering::SeqCst));
        let before = if before_us == 0 { u64::MAX } else { before_us };
        let segs: Vec<SegMeta> = self.shared.segs.lock().clone();
        // The `limit` smallest (time, segment, offset) seen: a max-heap.
        let mut best: BinaryHeap<Found> = BinaryHeap::new();
        for m in segs {
            if m.count == 0 || m.max_us < after || m.min_us >= before {
                continue;
            }
            if !m.proxies.contains(proxy) {
                continue;
            }
            if best.len() >= limit && best.peek().is_some_and(|w| m.min_us > w.time) {
                continue;
            }
            self.shared.read_segment(&m, &mut |e, off, _| {
                if e.proxy != proxy || e.time_us < after || e.time_us >= before {
                    return;
                }
                let f = Found {
                    time: e.time_us,
                    seg: m.id,
                    off,
                    entry: e,
                };
                if best.len() < limit {
                    best.push(f);
                } else if best.peek().is_some_and(|w| f < *w) {
                    best.pop();
                    best.push(f);
                }
            })?;
        }
        Ok(best
            .into_sorted_vec()
            .into_iter()
            .map(|f| f.entry)
            .collect())
    }

    /// Hides every entry older than `before_us` and deletes the sealed
    /// segments that hold only such entries; returns how many entries were
    /// visible before and are not now.
    pub fn prune(&self, before_us: u64) -> Result<u64, ProxyError> {
        self.sync()?;
        let was = self
            .shared
            .hidden_before
            .fetch_max(before_us, Ordering::SeqCst);
        if before_us <= was {
            return Ok(0);
        }
        let (gone, straddling): (Vec<SegMeta>, Vec<SegMeta>) = {
            let mut segs = self.shared.segs.lock();
            // The last segment may be the one being written: never deleted
            // here (its entries are hidden; it goes once sealed).
            let keep_last = segs.len().saturating_sub(1);
            let mut gone = Vec::new();
            let mut i = 0;
            segs.retain(|m| {
                let drop = i < keep_last && m.max_us < before_us;
                i += 1;
                if drop {
                    gone.push(m.clone());
                }
                !drop
            });
            let straddling = segs
                .iter()
                .filter(|m| m.count > 0 && m.min_us < before_us && m.max_us >= was)
                .cloned()
                .collect();
            (gone, straddling)
        };
        let mut hidden = 0;
        // Entries newly hidden: count them where a file holds some in
        // `was..before_us` and some outside it.
        for m in gone.iter().chain(&straddling) {
            if m.min_us >= was && m.max_us < before_us {
                hidden += m.count;
                continue;
            }
            self.shared.read_segment(m, &mut |e, _, _| {
                if e.time_us >= was && e.time_us < before_us {
                    hidden += 1;
                }
            })?;
        }
        for m in gone {
            let log = seg_path(&self.shared.dir, m.id, "rlog");
            match fs::remove_file(&log) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &log, e)),
            }
            let _ = fs::remove_file(seg_path(&self.shared.dir, m.id, "meta"));
        }
        Ok(hidden)
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }
}

struct Found {
    time: u64,
    seg: u64,
    off: u64,
    entry: LogEntry,
}

impl Found {
    fn key(&self) -> (u64, u64, u64) {
        (self.time, self.seg, self.off)
    }
}

impl PartialEq for Found {
    fn eq(&self, o: &Self) -> bool {
        self.key() == o.key()
    }
}
impl Eq for Found {}
impl PartialOrd for Found {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Found {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.key().cmp(&o.key())
    }
}

struct Current {
    file: BufWriter<File>,
    opened: Instant,
}

struct Writer {
    shared: Arc<Shared>,
    next: u64,
    cur: Option<Current>,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        /// Marks the writer gone however it ends (a panic included), so
        /// appenders and syncs never wait for it.
        struct Gone(Arc<Shared>);
        impl Drop for Gone {
            fn drop(&mut self) {
                self.0.queue.lock().gone = true;
                self.0.drained.notify_all();
            }
        }
        let sh = Arc::clone(&self.shared);
        let _gone = Gone(Arc::clone(&sh));
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let mut q = sh.queue.lock();
            Self::wait_for_work(&sh, &mut q);
            std::mem::swap(&mut batch, &mut q.entries);
            let asked = (q.sync_asked > q.sync_done).then_some(q.sync_asked);
            let stop = q.stop;
            drop(q);
            sh.drained.notify_all();
            if !batch.is_empty() {
                self.write_batch(&mut batch);
            }
            if let Some(asked) = asked {
                let mut q = sh.queue.lock();
                q.sync_done = asked;
                drop(q);
                sh.drained.notify_all();
            }
            if stop {
                break;
            }
        }
        if let Some(c) = self.cur.as_mut() {
            let _ = c.file.flush();
            let _ = c.file.get_ref().sync_data();
        }
    }

    /// Returns when there is something to do: a full batch, a sync asked
    /// for, the stop, or entries that have lingered [`LINGER`].
    fn wait_for_work(sh: &Shared, q: &mut MutexGuard<'_, Queue>) {
        let mut linger_until = None;
        loop {
            if q.stop || q.sync_asked > q.sync_done || q.entries.len() >= BATCH {
                return;
            }
            if q.entries.is_empty() {
                q.idle = true;
                sh.wake.wait(q);
                q.idle = false;
                continue;
            }
            let until = *linger_until.get_or_insert_with(|| Instant::now() + LINGER);
            if sh.wake.wait_until(q, until).timed_out() {
                return;
            }
        }
    }

    fn write_batch(&mut self, batch: &mut Vec<LogEntry>) {
        let n = batch.len() as u64;
        if let Err(e) = self.shared.disk.check_write() {
            tracing::debug!(entries = n, error = %e, "request log entries dropped");
            batch.clear();
            return;
        }
        if let Err(e) = self.try_write(batch) {
            tracing::warn!(entries = n, error = %e, "request log write failed; entries dropped");
            // Whatever part reached the file is past the published length
            // (readers never see it) and is cut at the next open; the next
            // batch goes to a new segment.
            self.cur = None;
        }
        batch.clear();
    }

    fn try_write(&mut self, batch: &[LogEntry]) -> Result<(), ProxyError> {
        let rolled = self.cur.as_ref().is_some_and(|c| {
            c.opened.elapsed() >= SEG_SPAN
                || self
                    .shared
                    .segs
                    .lock()
                    .last()
                    .is_some_and(|m| m.bytes >= SEG_BYTES)
        });
        if rolled {
            self.seal()?;
        }
        if self.cur.is_none() {
            self.start()?;
        }
        self.buf.clear();
        let mut added = Vec::with_capacity(batch.len());
        for e in batch {
            let at = self.buf.len();
            encode_record(e, &mut self.buf)?;
            added.push((self.buf.len() - at) as u64);
        }
        let Some(c) = self.cur.as_mut() else {
            return Ok(());
        };
        let path = seg_path(&self.shared.dir, self.next - 1, "rlog");
        c.file
            .write_all(&self.buf)
            .and_then(|_| c.file.flush())
            .map_err(|e| io("write", &path, e))?;
        let mut segs = self.shared.segs.lock();
        if let Some(m) = segs.last_mut() {
            for (e, len) in batch.iter().zip(added) {
                m.add(e, len);
            }
        }
        Ok(())
    }

    /// Starts segment `next` (a new file) and publishes it, empty.
    fn start(&mut self) -> Result<(), ProxyError> {
        let id = self.next;
        let path = seg_path(&self.shared.dir, id, "rlog");
        let f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| io("create", &path, e))?;
        self.next += 1;
        self.cur = Some(Current {
            file: BufWriter::with_capacity(64 * 1024, f),
            opened: Instant::now(),
        });
        self.shared.segs.lock().push(SegMeta::new(id));
        Ok(())
    }

    /// Closes the current segment and writes its `.meta`.
    fn seal(&mut self) -> Result<(), ProxyError> {
        let Some(mut c) = self.cur.take() else {
            return Ok(());
        };
        let _ = c.file.flush();
        let m = self.shared.segs.lock().last().cloned();
        if let Some(m) = m {
            let meta = seg_path(&self.shared.dir, m.id, "meta");
            fs::write(&meta, m.encode()).map_err(|e| io("write", &meta, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(proxy: &str, t: u64) -> LogEntry {
        LogEntry {
            time_us: t,
            proxy: proxy.into(),
            caller: "uid=0".into(),
            method: "GET".into(),
            path: format!("/p/{t}"),
            status: 200,
            latency_us: 5,
            bytes_in: 1,
            bytes_out: 2,
            decision: "allow".into(),
            rule: None,
        }
    }

    fn open(dir: &Path) -> RequestLog {
        RequestLog::open(dir.join("proxy-log"), Arc::new(DiskGuard::unlimited())).unwrap()
    }

    #[test]
    fn query_orders_filters_and_limits() {
        let d = tempfile::tempdir().unwrap();
        let l = open(d.path());
        // Out of time order, as concurrent requests end.
        for t in [30, 10, 20, 50, 40] {
            l.append(entry("a", t));
            l.append(entry("b", t + 1));
        }
        let times = |v: Vec<LogEntry>| v.into_iter().map(|e| e.time_us).collect::<Vec<_>>();
        assert_eq!(
            times(l.query("a", 0, 0, 100).unwrap()),
            [10, 20, 30, 40, 50]
        );
        assert_eq!(times(l.query("a", 20, 50, 100).unwrap()), [20, 30, 40]);
        assert_eq!(times(l.query("a", 0, 0, 2).unwrap()), [10, 20]);
        assert_eq!(times(l.query("b", 0, 0, 1).unwrap()), [11]);
        assert!(l.query("c", 0, 0, 10).unwrap().is_empty());
        assert!(l.query("a", 0, 0, 0).unwrap().is_empty());
    }

    /// The writer takes entries by itself within `LINGER` (no query
    /// needed), at once for a full batch, and never loses one when the
    /// appenders outrun it (the buffer blocks them instead).
    #[test]
    fn the_writer_drains_by_itself_and_loses_nothing() {
        let d = tempfile::tempdir().unwrap();
        let l = open(d.path());
        let written = |l: &RequestLog| l.shared.segs.lock().iter().map(|m| m.count).sum::<u64>();
        l.append(entry("a", 1));
        let t = Instant::now();
        while written(&l) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "never written without a query"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // Four threads append past the buffer's bound.
        let n = (QUEUE + BATCH) as u64;
        std::thread::scope(|s| {
            for k in 0..4u64 {
                let l = &l;
                s.spawn(move || {
                    for i in 0..n {
                        l.append(entry("b", k * n + i));
                    }
                });
            }
        });
        let all = l.query("b", 0, 0, usize::MAX).unwrap();
        assert_eq!(all.len() as u64, 4 * n);
        assert!(all.windows(2).all(|w| w[0].time_us < w[1].time_us));
        assert_eq!(written(&l), 1 + 4 * n);
        // Closing writes what is still buffered.
        l.append(entry("c", 7));
        drop(l);
        let l = open(d.path());
        assert_eq!(l.query("c", 0, 0, 10).unwrap().len(), 1);
    }

    #[test]
    fn reopen_keeps_entries_and_cuts_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        {
            let l = open(d.path());
            for t in 1..=100 {
                l.append(entry("a", t));
            }
            l.sync().unwrap();
        }
        // A torn record at the end of the last segment (a crash mid-write).
        let dir = d.path().join("proxy-log");
        let seg = seg_path(&dir, 1, "rlog");
        let good = fs::metadata(&seg).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
        drop(f);
        let _ = fs::remove_file(seg_path(&dir, 1, "meta"));
        let l = open(d.path());
        assert_eq!(fs::metadata(&seg).unwrap().len(), good);
        assert_eq!(l.query("a", 0, 0, 1000).unwrap().len(), 100);
        // New entries go to a new segment; both are read.
        l.append(entry("a", 0));
        let v = l.query("a", 0, 0, 1000).unwrap();
        assert_eq!((v.len(), v[0].time_us, v[100].time_us), (101, 0, 100));
        assert!(seg_path(&dir, 2, "rlog").exists());
        // A corrupt byte inside a sealed segment without its meta: the
        // records before it survive, the rest of that segment is cut.
        drop(l);
        let mut bytes = fs::read(&seg).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        let _ = fs::remove_file(seg_path(&dir, 1, "meta"));
        let l = open(d.path());
        let n = l.query("a", 1, 0, 1000).unwrap().len();
        assert!(n > 0 && n < 100, "{n}");
    }

    #[test]
    fn prune_hides_then_deletes_whole_segments() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("proxy-log");
        {
            let l = open(d.path());
            for t in 1..=10 {
                l.append(entry("a", t));
            }
        }
        let l = open(d.path()); // segment 1 is sealed now
        for t in 11..=20 {
            l.append(entry("a", t));
        }
        assert_eq!(l.query("a", 0, 0, 100).unwrap().len(), 20);
        // Cut inside the written segment: 1..=14 hidden, segment 1 deleted.
        assert_eq!(l.prune(15).unwrap(), 14);
        assert!(!seg_path(&dir, 1, "rlog").exists());
        assert!(seg_path(&dir, 2, "rlog").exists());
        let v = l.query("a", 0, 0, 100).unwrap();
        assert_eq!(v.first().map(|e| e.time_us), Some(15));
        assert_eq!(v.len(), 6);
        assert_eq!(l.prune(15).unwrap(), 0);
        assert_eq!(l.prune(1000).unwrap(), 6);
        assert!(l.query("a", 0, 0, 100).unwrap().is_empty());
    }

    #[test]
    fn meta_round_trips_and_rejects_garbage() {
        let mut m = SegMeta::new(7);
        m.add(&entry("x.y", 5), 40);
        m.add(&entry("z", 9), 41);
        assert_eq!(SegMeta::decode(7, &m.encode()), Some(m));
        for bad in [
            "",
            "keyseal-reqlog-meta 1\n1 2 3\n",
            "other\n1 2 3 4\n",
            "keyseal-reqlog-meta 1\n1 2 x 4\n",
        ] {
            assert_eq!(SegMeta::decode(7, bad), None, "{bad:?}");
        }
    }
}
