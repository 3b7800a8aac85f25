//! Proxy telemetry and anomaly detection.
//!
//! **Telemetry** is aggregated incrementally when a request-log entry is
//! written ([`Telemetry::record`], called by `ProxyStore::log`), into
//! buckets per proxy and per minute, hour and day (UTC): requests, status
//! classes, refusals by decision, and a log-linear latency histogram (8
//! sub-buckets per power of two, so p50/p95 are within 12.5 %). The open
//! buckets live in memory and are written to the sled tree
//! `proxy_telemetry` (proxy ‖ 0 ‖ interval tag ‖ start secs BE →
//! [`Bucket`]) every `flush_secs` and at shutdown, as whole records, so a
//! query costs O(buckets asked), never a scan of the request log, and the
//! counts survive a restart (a crash loses at most the last flush period,
//! like the request log, which is not flushed per request either). A bucket
//! no longer in memory is read back before it is updated, so late entries
//! land in the right bucket. Old buckets are pruned: minutes after 2 days,
//! hours after 90 days, days after 3 years.
//!
//! **Anomalies** (per proxy and caller; the caller is `key:<id>` or the
//! kernel identity `uid=N[ unit=U]`, never a key):
//! - `volume_spike`: the caller's requests in the current minute are at
//!   least `spike_min_count` and more than `spike_factor` × the mean of the
//!   previous `spike_window_minutes` minutes;
//! - `first_seen_path`: a path pattern (numeric, UUID, long hex and long
//!   token segments replaced) the caller never used on this proxy, once the
//!   caller has made `path_learning_requests` requests there (the learning
//!   count and the seen set, at most `max_paths_per_caller`, are persisted in
//!   `proxy_callers` and `proxy_paths`);
//! - `error_surge`: at least `error_min_count` requests this minute and a
//!   4xx/5xx share of at least `error_share`.
//!
//! Each is raised at most once per (proxy, caller, kind, minute), counted in
//! the buckets, and recorded as an audit event `proxy.anomaly`. With the
//! proxy's `on_anomaly = suspend` the caller is also suspended on that proxy
//! (tree `proxy_suspended`, kept across restarts) until an operator clears
//! it with `Unsuspend`; the gateway answers a suspended caller 403
//! `{"error":"suspended"}`. Per-caller minute counts are in memory (at most
//! `max_callers`); at start they are rebuilt from the last window of the
//! request log, so a restart neither forgets a baseline nor flags one.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::model::{invalid, OnAnomaly, ProxyError};
use super::store::{LogEntry, ProxyStore};
use crate::store::{decode, encode};

const T_BUCKETS: &str = "proxy_telemetry";
const T_CALLERS: &str = "proxy_callers";
const T_PATHS: &str = "proxy_paths";
const T_SUSPENDED: &str = "proxy_suspended";

/// Longest path pattern kept (bytes).
const MAX_PATTERN: usize = 256;
/// Path segments kept in a pattern.
const MAX_SEGMENTS: usize = 16;
/// Log entries read at start to rebuild the per-caller minute counts.
const WARM_MAX_ENTRIES: usize = 200_000;

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// `[proxy.anomaly]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAnomalyConfig {
    spike_factor: Option<f64>,
    spike_window_minutes: Option<u32>,
    spike_min_count: Option<u64>,
    error_share: Option<f64>,
    error_min_count: Option<u64>,
    path_learning_requests: Option<u64>,
    max_paths_per_caller: Option<usize>,
    max_callers: Option<usize>,
    flush_secs: Option<u64>,
}

/// Anomaly thresholds and telemetry settings.
///
/// ```toml
/// [proxy.anomaly]
/// spike_factor = 5.0            # current minute > 5 x the trailing mean
/// spike_window_minutes = 10     # the trailing mean's window
/// spike_min_count = 60          # quieter minutes never spike
/// error_share = 0.5             # 4xx/5xx share of a caller's minute
/// error_min_count = 20
/// path_learning_requests = 100  # first requests of a caller only learn paths
/// max_paths_per_caller = 1000
/// max_callers = 10000
/// flush_secs = 2                # telemetry buckets written every N s
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyConfig {
    pub spike_factor: f64,
    pub spike_window_minutes: u32,
    pub spike_min_count: u64,
    pub error_share: f64,
    pub error_min_count: u64,
    pub path_learning_requests: u64,
    pub max_paths_per_caller: usize,
    pub max_callers: usize,
    pub flush_secs: u64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            spike_factor: 5.0,
            spike_window_minutes: 10,
            spike_min_count: 60,
            error_share: 0.5,
            error_min_count: 20,
            path_learning_requests: 100,
            max_paths_per_caller: 1000,
            max_callers: 10_000,
            flush_secs: 2,
        }
    }
}

impl AnomalyConfig {
    /// Resolves `[proxy.anomaly]`; every bad value is named.
    pub fn from_raw(r: RawAnomalyConfig) -> Result<AnomalyConfig, String> {
        let mut c = AnomalyConfig::default();
        if let Some(v) = r.spike_factor {
            if !(v.is_finite() && (1.0..=1000.0).contains(&v)) {
                return Err("proxy.anomaly.spike_factor must be 1.0..=1000.0".into());
            }
            c.spike_factor = v;
        }
        if let Some(v) = r.spike_window_minutes {
            if v == 0 || v > 1440 {
                return Err("proxy.anomaly.spike_window_minutes must be 1..=1440".into());
            }
            c.spike_window_minutes = v;
        }
        if let Some(v) = r.spike_min_count {
            if v == 0 {
                return Err("proxy.anomaly.spike_min_count must be at least 1".into());
            }
            c.spike_min_count = v;
        }
        if let Some(v) = r.error_share {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                return Err("proxy.anomaly.error_share must be in (0, 1]".into());
            }
            c.error_share = v;
        }
        if let Some(v) = r.error_min_count {
            if v == 0 {
                return Err("proxy.anomaly.error_min_count must be at least 1".into());
            }
            c.error_min_count = v;
        }
        if let Some(v) = r.path_learning_requests {
            c.path_learning_requests = v;
        }
        if let Some(v) = r.max_paths_per_caller {
            if v == 0 || v > 100_000 {
                return Err("proxy.anomaly.max_paths_per_caller must be 1..=100000".into());
            }
            c.max_paths_per_caller = v;
        }
        if let Some(v) = r.max_callers {
            if v == 0 || v > 1_000_000 {
                return Err("proxy.anomaly.max_callers must be 1..=1000000".into());
            }
            c.max_callers = v;
        }
        if let Some(v) = r.flush_secs {
            if v == 0 || v > 3600 {
                return Err("proxy.anomaly.flush_secs must be 1..=3600".into());
            }
            c.flush_secs = v;
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------------------
// Buckets
// ---------------------------------------------------------------------------

/// Width of a telemetry bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Interval {
    Minute,
    Hour,
    Day,
}

impl Interval {
    pub const ALL: [Interval; 3] = [Interval::Minute, Interval::Hour, Interval::Day];

    pub fn secs(self) -> u64 {
        match self {
            Interval::Minute => 60,
            Interval::Hour => 3600,
            Interval::Day => 86_400,
        }
    }

    pub fn parse(s: &str) -> Result<Interval, ProxyError> {
        match s {
            "minute" | "m" => Ok(Interval::Minute),
            "hour" | "h" | "" => Ok(Interval::Hour),
            "day" | "d" => Ok(Interval::Day),
            o => Err(invalid(format!(
                "interval {o:?}: use \"minute\", \"hour\" or \"day\""
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Minute => "minute",
            Interval::Hour => "hour",
            Interval::Day => "day",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Interval::Minute => b'm',
            Interval::Hour => b'h',
            Interval::Day => b'd',
        }
    }

    fn from_tag(t: u8) -> Option<Interval> {
        match t {
            b'm' => Some(Interval::Minute),
            b'h' => Some(Interval::Hour),
            b'd' => Some(Interval::Day),
            _ => None,
        }
    }

    /// How long buckets of this width are kept (seconds).
    fn retention_secs(self) -> u64 {
        match self {
            Interval::Minute => 2 * 86_400,
            Interval::Hour => 90 * 86_400,
            Interval::Day => 3 * 365 * 86_400,
        }
    }

    /// Start (unix seconds) of the bucket holding `time_us`.
    pub fn start_of(self, time_us: u64) -> u64 {
        let s = time_us / 1_000_000;
        s - s % self.secs()
    }
}

/// One telemetry bucket of a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Unix seconds.
    pub start: u64,
    pub requests: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
    pub denied: u64,
    pub rate_limited: u64,
    pub unauthenticated: u64,
    pub errors: u64,
    pub suspended: u64,
    /// Latency histogram: [`hist_index`] → count.
    pub latency: BTreeMap<u16, u64>,
    /// Anomalies raised in this bucket: kind → count.
    pub anomalies: BTreeMap<String, u64>,
}

/// Histogram slot of a latency (µs): exact below 8, then 8 slots per
/// power of two.
pub fn hist_index(v: u64) -> u16 {
    if v < 8 {
        return v as u16;
    }
    let e = 63 - v.leading_zeros(); // >= 3
    let sub = (v >> (e - 3)) & 7;
    ((e - 2) * 8 + sub as u32) as u16
}

/// The middle of slot `i`'s range.
pub fn hist_value(i: u16) -> u64 {
    if i < 8 {
        return u64::from(i);
    }
    let e = u32::from(i / 8) + 2;
    let sub = u64::from(i % 8);
    let lower = (8 + sub) << (e - 3);
    let width = 1u64 << (e - 3);
    lower + width / 2
}

impl Bucket {
    /// The `p`-quantile (0 < p <= 1) of the latency, µs; 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        let n: u64 = self.latency.values().sum();
        if n == 0 {
            return 0;
        }
        let rank = ((p * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, c) in &self.latency {
            seen += c;
            if seen >= rank {
                return hist_value(*i);
            }
        }
        0
    }

    fn add(&mut self, e: &LogEntry) {
        self.requests += 1;
        match e.status / 100 {
            2 => self.status_2xx += 1,
            3 => self.status_3xx += 1,
            4 => self.status_4xx += 1,
            5 => self.status_5xx += 1,
            _ => {}
        }
        match e.decision.as_str() {
            "deny" => self.denied += 1,
            "rate_limited" => self.rate_limited += 1,
            "unauthenticated" => self.unauthenticated += 1,
            "error" => self.errors += 1,
            "suspended" => self.suspended += 1,
            _ => {}
        }
        *self.latency.entry(hist_index(e.latency_us)).or_insert(0) += 1;
    }
}

fn bucket_key(proxy: &str, iv: Interval, start: u64) -> Vec<u8> {
    let mut k = proxy.as_bytes().to_vec();
    k.push(0);
    k.push(iv.tag());
    k.extend_from_slice(&start.to_be_bytes());
    k
}

// ---------------------------------------------------------------------------
// Callers and paths
// ---------------------------------------------------------------------------

/// The stable identity of a caller from its log label: `key:<id>` as is;
/// a kernel identity (`uid=0(root) gid=0 pid=.. unit=.. exe=..`) becomes
/// `uid=N` or `uid=N unit=U` (pid and exe change from process to process).
/// `None` for an unknown caller (`-`).
pub fn caller_id(label: &str) -> Option<String> {
    if label.is_empty() || label == "-" {
        return None;
    }
    if label.starts_with("key:") {
        return Some(label.to_owned());
    }
    let head = label.split(" exe=").next().unwrap_or(label);
    let mut uid = None;
    let mut unit = None;
    for tok in head.split(' ') {
        if let Some(v) = tok.strip_prefix("uid=") {
            uid = Some(v.split('(').next().unwrap_or(v));
        } else if let Some(v) = tok.strip_prefix("unit=") {
            unit = Some(v);
        }
    }
    let uid = uid.filter(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_digit()))?;
    Some(match unit {
        Some(u) => format!("uid={uid} unit={u}"),
        None => format!("uid={uid}"),
    })
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn norm_segment(s: &str) -> &str {
    if s.is_empty() {
        return s;
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return "{n}";
    }
    if is_uuid(s) {
        return "{uuid}";
    }
    if s.len() >= 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return "{hex}";
    }
    if s.len() > 64 {
        return "{long}";
    }
    if s.len() >= 20
        && s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes().any(|b| b.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return "{id}";
    }
    s
}

/// The pattern of a path for first-seen detection: numeric, UUID, long
/// hex and long token segments replaced (`/v1/users/42` →
/// `/v1/users/{n}`), at most 16 segments and 256 bytes.
pub fn path_pattern(path: &str) -> String {
    let mut out = String::new();
    for (i, seg) in path.trim_start_matches('/').split('/').enumerate() {
        if i >= MAX_SEGMENTS {
            out.push_str("/{more}");
            break;
        }
        out.push('/');
        out.push_str(norm_segment(seg));
    }
    if out.len() > MAX_PATTERN {
        let mut cut = MAX_PATTERN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// Kind of anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnomalyKind {
    VolumeSpike,
    FirstSeenPath,
    ErrorSurge,
}

impl AnomalyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::VolumeSpike => "volume_spike",
            AnomalyKind::FirstSeenPath => "first_seen_path",
            AnomalyKind::ErrorSurge => "error_surge",
        }
    }

    fn bit(self) -> u8 {
        match self {
            AnomalyKind::VolumeSpike => 1,
            AnomalyKind::FirstSeenPath => 2,
            AnomalyKind::ErrorSurge => 4,
        }
    }
}

/// A raised anomaly.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub proxy: String,
    /// [`caller_id`] form; never a key.
    pub caller: String,
    /// Start of the minute (unix seconds).
    pub minute: u64,
    /// The values that tripped it.
    pub values: Vec<(&'static str, String)>,
    /// The caller was suspended by it (the proxy's `on_anomaly = suspend`).
    pub suspended: bool,
}

/// A suspended caller of a proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    pub proxy: String,
    pub caller: String,
    /// Unix time, microseconds.
    pub since_us: u64,
    /// The anomaly kind that caused it.
    pub kind: String,
}

#[derive(Debug, Default)]
struct CallerState {
    /// Current minute (unix seconds).
    minute: u64,
    count: u64,
    errors: u64,
    /// Earlier minutes: (minute, count).
    history: VecDeque<(u64, u64)>,
    /// Kinds raised in `minute`.
    raised: u8,
    /// Requests counted toward path learning (persisted while learning).
    learned: u64,
    paths: HashSet<String>,
    full_warned: bool,
    last_seen_us: u64,
}

impl CallerState {
    /// Moves to the minute of `time_us` (never backwards: a late entry
    /// counts in the current minute).
    fn roll(&mut self, minute: u64, window: u32) {
        if minute > self.minute {
            if self.count > 0 {
                self.history.push_back((self.minute, self.count));
            }
            self.minute = minute;
            self.count = 0;
            self.errors = 0;
            self.raised = 0;
        }
        let oldest = self.minute.saturating_sub(u64::from(window) * 60);
        while self.history.front().is_some_and(|(m, _)| *m < oldest) {
            self.history.pop_front();
        }
    }

    /// The mean count per minute of the trailing window (empty minutes
    /// count as 0).
    fn baseline(&self, window: u32) -> f64 {
        let sum: u64 = self.history.iter().map(|(_, c)| c).sum();
        sum as f64 / f64::from(window.max(1))
    }
}

fn caller_key(proxy: &str, caller: &str) -> Vec<u8> {
    let mut k = proxy.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(caller.as_bytes());
    k
}

// ---------------------------------------------------------------------------
// Telemetry
// ---------------------------------------------------------------------------

struct Open {
    b: Bucket,
    dirty: bool,
}

/// Telemetry buckets, anomaly detection and suspensions of the proxies.
pub struct Telemetry {
    buckets: sled::Tree,
    callers_tree: sled::Tree,
    paths_tree: sled::Tree,
    suspended_tree: sled::Tree,
    /// The store's free-space guard: below its reserve nothing is written
    /// (buckets stay in memory, learning and suspensions are not persisted).
    disk: Arc<crate::store::DiskGuard>,
    cfg: RwLock<AnomalyConfig>,
    open: Mutex<HashMap<(String, Interval, u64), Open>>,
    flush_lock: Mutex<u64>,
    callers: Mutex<HashMap<(String, String), CallerState>>,
    suspended: RwLock<HashMap<(String, String), Suspension>>,
    any_suspended: AtomicBool,
    raised_tx: Mutex<Option<tokio::sync::mpsc::Sender<Anomaly>>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Opens the telemetry trees of `db` and loads the suspensions (no
    /// free-space guard).
    pub fn open(db: &sled::Db) -> Result<Telemetry, ProxyError> {
        Self::open_guarded(db, Arc::new(crate::store::DiskGuard::unlimited()))
    }

    /// [`Telemetry::open`] writing only while `disk` allows store writes.
    pub fn open_guarded(
        db: &sled::Db,
        disk: Arc<crate::store::DiskGuard>,
    ) -> Result<Telemetry, ProxyError> {
        let suspended_tree = db.open_tree(T_SUSPENDED)?;
        let mut suspended = HashMap::new();
        for kv in suspended_tree.iter() {
            let (_, v) = kv?;
            let s: Suspension = decode(T_SUSPENDED, &v)?;
            suspended.insert((s.proxy.clone(), s.caller.clone()), s);
        }
        Ok(Telemetry {
            buckets: db.open_tree(T_BUCKETS)?,
            callers_tree: db.open_tree(T_CALLERS)?,
            paths_tree: db.open_tree(T_PATHS)?,
            suspended_tree,
            disk,
            cfg: RwLock::new(AnomalyConfig::default()),
            open: Mutex::new(HashMap::new()),
            flush_lock: Mutex::new(0),
            callers: Mutex::new(HashMap::new()),
            any_suspended: AtomicBool::new(!suspended.is_empty()),
            suspended: RwLock::new(suspended),
            raised_tx: Mutex::new(None),
        })
    }

    /// Replaces the thresholds.
    pub fn configure(&self, cfg: AnomalyConfig) {
        *self.cfg.write() = cfg;
    }

    /// Counts `e` into its proxy's buckets and runs the anomaly detectors;
    /// returns the anomalies raised (already counted, queued for the audit
    /// log, and acted on per `on_anomaly`). `e.time_us` is the clock.
    pub fn record(&self, e: &LogEntry, on_anomaly: OnAnomaly) -> Vec<Anomaly> {
        let mut raised = if e.decision == "suspended" {
            Vec::new()
        } else {
            self.detect(e)
        };
        if on_anomaly == OnAnomaly::Suspend && !raised.is_empty() {
            if let Some(a) = raised.first() {
                let s = Suspension {
                    proxy: a.proxy.clone(),
                    caller: a.caller.clone(),
                    since_us: e.time_us,
                    kind: a.kind.as_str().to_owned(),
                };
                if self.suspend(s) {
                    for a in raised.iter_mut() {
                        a.suspended = true;
                    }
                }
            }
        }
        self.aggregate(e, &raised);
        if !raised.is_empty() {
            let tx = self.raised_tx.lock().clone();
            for a in &raised {
                tracing::warn!(
                    proxy = %a.proxy, caller = %a.caller, kind = a.kind.as_str(),
                    suspended = a.suspended, "proxy anomaly"
                );
                if let Some(tx) = &tx {
                    if tx.try_send(a.clone()).is_err() {
                        tracing::error!(proxy = %a.proxy, kind = a.kind.as_str(), "anomaly queue full; audit event dropped");
                    }
                }
            }
        }
        raised
    }

    fn aggregate(&self, e: &LogEntry, raised: &[Anomaly]) {
        let mut open = self.open.lock();
        for iv in Interval::ALL {
            let start = iv.start_of(e.time_us);
            let key = (e.proxy.clone(), iv, start);
            let slot = match open.entry(key) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let b = match self.buckets.get(bucket_key(&e.proxy, iv, start)) {
                        Ok(Some(raw)) => decode(T_BUCKETS, &raw).unwrap_or_else(|err| {
                            tracing::warn!(error = %err, "telemetry bucket unreadable; starting it again");
                            Bucket::default()
                        }),
                        Ok(None) => Bucket::default(),
                        Err(err) => {
                            tracing::warn!(error = %err, "telemetry bucket read failed");
                            Bucket::default()
                        }
                    };
                    v.insert(Open { b, dirty: false })
                }
            };
            slot.b.start = start;
            slot.b.add(e);
            for a in raised {
                *slot
                    .b
                    .anomalies
                    .entry(a.kind.as_str().to_owned())
                    .or_insert(0) += 1;
            }
            slot.dirty = true;
        }
    }

    fn load_caller(&self, proxy: &str, caller: &str, max_paths: usize) -> CallerState {
        let key = caller_key(proxy, caller);
        let learned = match self.callers_tree.get(&key) {
            Ok(Some(v)) if v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                u64::from_be_bytes(b)
            }
            _ => 0,
        };
        let mut prefix = key;
        prefix.push(0);
        let mut paths = HashSet::new();
        for k in self.paths_tree.scan_prefix(&prefix).keys().flatten() {
            if paths.len() >= max_paths {
                break;
            }
            if let Ok(p) = std::str::from_utf8(&k[prefix.len()..]) {
                paths.insert(p.to_owned());
            }
        }
        CallerState {
            learned,
            paths,
            ..CallerState::default()
        }
    }

    fn detect(&self, e: &LogEntry) -> Vec<Anomaly> {
        let Some(caller) = caller_id(&e.caller) else {
            return Vec::new();
        };
        let cfg = self.cfg.read().clone();
        let minute = Interval::Minute.start_of(e.time_us);
        let mut out = Vec::new();
        let mut callers = self.callers.lock();
        let key = (e.proxy.clone(), caller.clone());
        if !callers.contains_key(&key) {
            if callers.len() >= cfg.max_callers {
                if let Some(oldest) = callers
                    .iter()
                    .min_by_key(|(_, s)| s.last_seen_us)
                    .map(|(k, _)| k.clone())
                {
                    callers.remove(&oldest);
                }
            }
            let st = self.load_caller(&e.proxy, &caller, cfg.max_paths_per_caller);
            callers.insert(key.clone(), st);
        }
        let Some(st) = callers.get_mut(&key) else {
            return out;
        };
        st.last_seen_us = st.last_seen_us.max(e.time_us);
        st.roll(minute, cfg.spike_window_minutes);
        st.count += 1;
        if e.status >= 400 {
            st.errors += 1;
        }
        let mut raise = |st: &mut CallerState, kind: AnomalyKind, values| {
            if st.raised & kind.bit() == 0 {
                st.raised |= kind.bit();
                out.push(Anomaly {
                    kind,
                    proxy: e.proxy.clone(),
                    caller: caller.clone(),
                    minute: st.minute,
                    values,
                    suspended: false,
                });
            }
        };

        // Volume spike.
        let baseline = st.baseline(cfg.spike_window_minutes);
        if st.count >= cfg.spike_min_count && st.count as f64 > cfg.spike_factor * baseline {
            let values = vec![
                ("count", st.count.to_string()),
                ("baseline", format!("{baseline:.2}")),
                ("factor", cfg.spike_factor.to_string()),
                ("window_minutes", cfg.spike_window_minutes.to_string()),
            ];
            raise(st, AnomalyKind::VolumeSpike, values);
        }

        // Error surge.
        let share = st.errors as f64 / st.count as f64;
        if st.count >= cfg.error_min_count && share >= cfg.error_share {
            let values = vec![
                ("count", st.count.to_string()),
                ("errors", st.errors.to_string()),
                ("share", format!("{share:.2}")),
            ];
            raise(st, AnomalyKind::ErrorSurge, values);
        }

        // First-seen path.
        let learning = st.learned < cfg.path_learning_requests;
        let pattern = path_pattern(&e.path);
        if !st.paths.contains(&pattern) {
            if st.paths.len() < cfg.max_paths_per_caller {
                let mut k = caller_key(&e.proxy, &caller);
                k.push(0);
                k.extend_from_slice(pattern.as_bytes());
                if self.disk.check_write().is_err() {
                    // below the free-space reserve: remembered in memory only
                } else if let Err(err) = self.paths_tree.insert(k, &[][..]) {
                    tracing::warn!(error = %err, "seen-path write failed");
                }
                st.paths.insert(pattern.clone());
                if !learning {
                    let values = vec![("path", pattern), ("method", e.method.clone())];
                    raise(st, AnomalyKind::FirstSeenPath, values);
                }
            } else if !st.full_warned {
                st.full_warned = true;
                tracing::warn!(proxy = %e.proxy, caller = %caller, max = cfg.max_paths_per_caller,
                    "caller's seen-path set is full; new paths are no longer flagged");
            }
        }
        if learning {
            st.learned += 1;
            if self.disk.check_write().is_err() {
                // below the free-space reserve: counted in memory only
            } else if let Err(err) = self
                .callers_tree
                .insert(caller_key(&e.proxy, &caller), &st.learned.to_be_bytes()[..])
            {
                tracing::warn!(error = %err, "caller learning count write failed");
            }
        }
        out
    }

    /// Rebuilds per-caller minute counts from recent log entries (oldest
    /// first) without raising anything; the current minute is treated as
    /// already flagged.
    pub fn warm(&self, entries: impl IntoIterator<Item = LogEntry>, now_us: u64) {
        let cfg = self.cfg.read().clone();
        let now_minute = Interval::Minute.start_of(now_us);
        let mut callers = self.callers.lock();
        for e in entries {
            if e.decision == "suspended" {
                continue;
            }
            let Some(caller) = caller_id(&e.caller) else {
                continue;
            };
            let key = (e.proxy.clone(), caller.clone());
            if !callers.contains_key(&key) {
                if callers.len() >= cfg.max_callers {
                    break;
                }
                let st = self.load_caller(&e.proxy, &caller, cfg.max_paths_per_caller);
                callers.insert(key.clone(), st);
            }
            if let Some(st) = callers.get_mut(&key) {
                st.last_seen_us = st.last_seen_us.max(e.time_us);
                st.roll(
                    Interval::Minute.start_of(e.time_us),
                    cfg.spike_window_minutes,
                );
                st.count += 1;
                if e.status >= 400 {
                    st.errors += 1;
                }
            }
        }
        for st in callers.values_mut() {
            if st.minute == now_minute {
                st.raised = u8::MAX;
            }
        }
    }

    // ---- suspensions ------------------------------------------------------

    /// Suspends a caller (memory now; the record is written at once and
    /// flushed by the anomaly worker). `false` when already suspended.
    fn suspend(&self, s: Suspension) -> bool {
        let key = (s.proxy.clone(), s.caller.clone());
        let mut w = self.suspended.write();
        if w.contains_key(&key) {
            return false;
        }
        match encode(&s) {
            Ok(_) if self.disk.check_write().is_err() => {
                tracing::error!("suspension not persisted: the store is below its free-space reserve (kept in memory)");
            }
            Ok(v) => {
                if let Err(err) = self
                    .suspended_tree
                    .insert(caller_key(&s.proxy, &s.caller), v)
                {
                    tracing::error!(error = %err, "suspension write failed (kept in memory)");
                }
            }
            Err(err) => tracing::error!(error = %err, "suspension encode failed"),
        }
        w.insert(key, s);
        self.any_suspended.store(true, Ordering::SeqCst);
        true
    }

    /// The suspension of the caller labelled `label` on `proxy`, if any.
    /// Cheap when nothing is suspended.
    pub fn suspended(&self, proxy: &str, label: &str) -> Option<Suspension> {
        if !self.any_suspended.load(Ordering::SeqCst) {
            return None;
        }
        let caller = caller_id(label)?;
        self.suspended
            .read()
            .get(&(proxy.to_owned(), caller))
            .cloned()
    }

    /// Suspended callers of `proxy`.
    pub fn suspensions(&self, proxy: &str) -> Vec<Suspension> {
        let mut v: Vec<Suspension> = self
            .suspended
            .read()
            .values()
            .filter(|s| s.proxy == proxy)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.caller.cmp(&b.caller));
        v
    }

    /// Clears a suspension (durably: flushed before returning).
    pub fn unsuspend(&self, proxy: &str, caller: &str) -> Result<Suspension, ProxyError> {
        let caller = caller_id(caller)
            .ok_or_else(|| invalid("caller must be key:<id> or uid=N[ unit=U]"))?;
        let key = (proxy.to_owned(), caller.clone());
        let mut w = self.suspended.write();
        let Some(s) = w.get(&key).cloned() else {
            return Err(ProxyError::NotFound(format!(
                "suspension of {caller} on proxy {proxy:?}"
            )));
        };
        self.disk.check_write()?;
        self.suspended_tree.remove(caller_key(proxy, &caller))?;
        self.suspended_tree.flush()?;
        w.remove(&key);
        self.any_suspended.store(!w.is_empty(), Ordering::SeqCst);
        Ok(s)
    }

    /// Forgets a deleted proxy's suspensions, seen paths and learning
    /// counts (its telemetry buckets stay until pruned), so a new proxy of
    /// the same name starts clean.
    pub fn forget_proxy(&self, proxy: &str) -> Result<(), ProxyError> {
        self.disk.check_write()?;
        let mut prefix = proxy.as_bytes().to_vec();
        prefix.push(0);
        let mut w = self.suspended.write();
        for tree in [&self.suspended_tree, &self.paths_tree, &self.callers_tree] {
            let mut batch = sled::Batch::default();
            for k in tree.scan_prefix(&prefix).keys() {
                batch.remove(k?);
            }
            tree.apply_batch(batch)?;
        }
        self.suspended_tree.flush()?;
        w.retain(|(p, _), _| p != proxy);
        self.any_suspended.store(!w.is_empty(), Ordering::SeqCst);
        drop(w);
        self.callers.lock().retain(|(p, _), _| p != proxy);
        Ok(())
    }

    // ---- persistence and queries -----------------------------------------

    /// Writes the dirty buckets, forgets closed clean ones, prunes expired
    /// ones (at most hourly). `now_us` is the clock.
    pub fn flush(&self, now_us: u64) -> Result<(), ProxyError> {
        let mut last_prune = self.flush_lock.lock();
        if self.disk.check_write().is_err() {
            // Below the free-space reserve: the buckets stay dirty in
            // memory and are written once space is back.
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut n = 0usize;
        {
            let mut open = self.open.lock();
            for ((proxy, iv, start), o) in open.iter_mut() {
                if o.dirty {
                    batch.insert(bucket_key(proxy, *iv, *start), encode(&o.b)?);
                    o.dirty = false;
                    n += 1;
                }
            }
            open.retain(|(_, iv, start), o| o.dirty || *start >= iv.start_of(now_us));
        }
        if n > 0 {
            self.buckets.apply_batch(batch)?;
        }
        let now = now_us / 1_000_000;
        if now >= *last_prune + 3600 {
            *last_prune = now;
            self.prune(now)?;
        }
        Ok(())
    }

    fn prune(&self, now: u64) -> Result<(), ProxyError> {
        let mut batch = sled::Batch::default();
        for k in self.buckets.iter().keys() {
            let k = k?;
            if k.len() < 10 {
                continue;
            }
            let (tag, start) = (k[k.len() - 9], &k[k.len() - 8..]);
            let mut b = [0u8; 8];
            b.copy_from_slice(start);
            let start = u64::from_be_bytes(b);
            if let Some(iv) = Interval::from_tag(tag) {
                if start + iv.retention_secs() < now {
                    batch.remove(k);
                }
            }
        }
        self.buckets.apply_batch(batch)?;
        Ok(())
    }

    /// The newest `limit` buckets of `proxy` at `iv`, newest first (after
    /// writing the open ones).
    pub fn query(
        &self,
        proxy: &str,
        iv: Interval,
        limit: usize,
        now_us: u64,
    ) -> Result<Vec<Bucket>, ProxyError> {
        self.flush(now_us)?;
        let lo = bucket_key(proxy, iv, 0);
        let hi = bucket_key(proxy, iv, u64::MAX);
        let mut out = Vec::new();
        for kv in self.buckets.range(lo..=hi).rev() {
            let (_, v) = kv?;
            out.push(decode(T_BUCKETS, &v)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Starts the background work: the periodic flush (and one at
    /// shutdown) and the anomaly worker that flushes suspensions and
    /// appends `proxy.anomaly` audit events. Call inside the runtime.
    pub fn start(
        self: &Arc<Self>,
        audit: Option<Arc<crate::audit::AuditLog>>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Anomaly>(1024);
        *self.raised_tx.lock() = Some(tx);
        let me = self.clone();
        let every = Duration::from_secs(self.cfg.read().flush_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stop = tokio::select! {
                    _ = tick.tick() => false,
                    _ = shutdown.wait_for(|v| *v) => true,
                };
                let m = me.clone();
                let r = tokio::task::spawn_blocking(move || m.flush(now_us())).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "telemetry flush failed");
                }
                if stop {
                    break;
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(a) = rx.recv().await {
                if a.suspended {
                    let t = me.suspended_tree.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || t.flush()).await {
                        tracing::error!(error = %e, "suspension flush failed");
                    }
                }
                let Some(audit) = &audit else { continue };
                let mut ev = crate::audit::NewEvent::new(
                    now_us() / 1000,
                    crate::audit::Actor::daemon(),
                    "proxy.anomaly",
                )
                .target(a.proxy.clone())
                .detail("kind", a.kind.as_str())
                .detail("proxy", a.proxy.clone())
                .detail("caller", a.caller.clone())
                .detail("minute", a.minute.to_string())
                .detail("action", if a.suspended { "suspend" } else { "flag" });
                for (k, v) in a.values {
                    ev = ev.detail(k, v);
                }
                if let Err(e) = audit.append(ev).await {
                    tracing::error!(error = %e, "audit append of a proxy anomaly failed");
                }
            }
        });
    }
}

/// The gateway's answer to a suspended caller: 403
/// `{"error":"suspended", ...}`, logged as decision `suspended`.
pub(crate) fn suspended_refusal(s: &Suspension) -> super::server::Refusal {
    super::server::Refusal::json(
        http::StatusCode::FORBIDDEN,
        serde_json::json!({
            "error": "suspended",
            "reason": format!("this caller is suspended on proxy {} after a {} anomaly; an operator must clear it (keyseal proxy unsuspend)", s.proxy, s.kind),
            "proxy": s.proxy,
            "caller": s.caller,
            "since_us": s.since_us,
            "kind": s.kind,
        }),
        "suspended",
    )
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl ProxyStore {
    /// Starts telemetry with `cfg`: rebuilds the per-caller minute counts
    /// from the last window of the request log, then starts the flusher and
    /// the anomaly worker.
    pub fn start_telemetry(
        &self,
        cfg: AnomalyConfig,
        audit: Option<Arc<crate::audit::AuditLog>>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let now = now_us();
        let from = now.saturating_sub(u64::from(cfg.spike_window_minutes + 1) * 60_000_000);
        let t = self.telemetry().clone();
        t.configure(cfg);
        let mut recent = Vec::new();
        match self.list_proxies() {
            Ok(ps) => {
                let names = ps
                    .into_iter()
                    .map(|p| p.name)
                    .chain([super::store::CONNECT_LOG_NAME.to_owned()]);
                for name in names {
                    let left = WARM_MAX_ENTRIES.saturating_sub(recent.len());
                    if left == 0 {
                        break;
                    }
                    match self.query_log(&name, from, 0, left) {
                        Ok(mut v) => recent.append(&mut v),
                        Err(e) => tracing::warn!(error = %e, "telemetry warm-up read failed"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "telemetry warm-up read failed"),
        }
        recent.sort_by_key(|e| e.time_us);
        t.warm(recent, now);
        t.start(audit, shutdown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000_000;

    fn tele(cfg: AnomalyConfig) -> Telemetry {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = Telemetry::open(&db).unwrap();
        t.configure(cfg);
        t
    }

    fn entry(t_us: u64, caller: &str, path: &str, status: u16, decision: &str) -> LogEntry {
        LogEntry {
            time_us: t_us,
            proxy: "p".into(),
            caller: caller.into(),
            method: "GET".into(),
            path: path.into(),
            status,
            latency_us: 1000,
            bytes_in: 0,
            bytes_out: 0,
            decision: decision.into(),
            rule: None,
        }
    }

    fn quiet() -> AnomalyConfig {
        AnomalyConfig {
            spike_min_count: 1_000_000,
            error_min_count: 1_000_000,
            path_learning_requests: 1_000_000,
            ..AnomalyConfig::default()
        }
    }

    #[test]
    fn bucket_arithmetic() {
        let t = tele(quiet());
        // 2026-01-01T00:00:00Z = 1767225600; a day boundary.
        let day = 1_767_225_600u64 * 1_000_000;
        let times = [
            day - 1,             // previous day, previous hour, previous minute
            day,                 // minute 0
            day + 59_999_999,    // still minute 0
            day + MIN,           // minute 1
            day + 3_600_000_000, // next hour
        ];
        for (i, tm) in times.iter().enumerate() {
            let (status, dec) = if i == 2 {
                (403, "deny")
            } else {
                (200, "allow")
            };
            t.record(
                &entry(*tm, "key:ak_a", "/v1/x", status, dec),
                OnAnomaly::Flag,
            );
        }
        let now = day + 2 * 3_600_000_000;
        let m = t.query("p", Interval::Minute, 10, now).unwrap();
        let starts: Vec<u64> = m.iter().map(|b| b.start).collect();
        let d = day / 1_000_000;
        assert_eq!(starts, vec![d + 3600, d + 60, d, d - 60]);
        assert_eq!(m[2].requests, 2);
        assert_eq!((m[2].status_2xx, m[2].status_4xx, m[2].denied), (1, 1, 1));
        let h = t.query("p", Interval::Hour, 10, now).unwrap();
        assert_eq!(
            h.iter().map(|b| (b.start, b.requests)).collect::<Vec<_>>(),
            vec![(d + 3600, 1), (d, 3), (d - 3600, 1)]
        );
        let dd = t.query("p", Interval::Day, 1, now).unwrap();
        assert_eq!((dd.len(), dd[0].start, dd[0].requests), (1, d, 4));
        // A late entry for a bucket already flushed and forgotten is added
        // to it, not written over it.
        t.record(
            &entry(day + 1, "key:ak_a", "/v1/x", 500, "allow"),
            OnAnomaly::Flag,
        );
        let m = t.query("p", Interval::Minute, 10, now).unwrap();
        assert_eq!((m[2].requests, m[2].status_5xx), (3, 1));
    }

    #[test]
    fn percentiles() {
        let mut b = Bucket::default();
        for v in 1..=100u64 {
            let mut e = entry(0, "-", "/", 200, "allow");
            e.latency_us = v * 1000;
            b.add(&e);
        }
        let p50 = b.percentile(0.5);
        let p95 = b.percentile(0.95);
        assert!((44_000..=57_000).contains(&p50), "{p50}");
        assert!((84_000..=108_000).contains(&p95), "{p95}");
        for v in [0u64, 7, 8, 9, 100, 1_000_000, u64::MAX / 2] {
            let i = hist_index(v);
            let r = hist_value(i);
            let err = (r as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 0.125, "{v} -> {i} -> {r}");
        }
    }

    #[test]
    fn volume_spike_once_per_minute() {
        let t = tele(AnomalyConfig {
            spike_factor: 3.0,
            spike_window_minutes: 5,
            spike_min_count: 10,
            ..quiet()
        });
        let t0 = 1_767_225_600u64 * 1_000_000;
        // Baseline: 5 per minute for 5 minutes.
        for m in 0..5 {
            for i in 0..5 {
                let a = t.record(
                    &entry(t0 + m * MIN + i, "key:ak_a", "/v1/x", 200, "allow"),
                    OnAnomaly::Flag,
                );
                assert!(a.is_empty(), "minute {m}: {a:?}");
            }
        }
        // Minute 5: 15 requests = 3 x baseline 5: not over; the 16th is.
        let mut raised = Vec::new();
        for i in 0..30 {
            raised.extend(t.record(
                &entry(t0 + 5 * MIN + i, "key:ak_a", "/v1/x", 200, "allow"),
                OnAnomaly::Flag,
            ));
            if i == 14 {
                assert!(raised.is_empty());
            }
        }
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert_eq!(raised[0].kind, AnomalyKind::VolumeSpike);
        assert_eq!(raised[0].caller, "key:ak_a");
        // Another caller is not affected; the bucket carries the flag.
        let m = t
            .query("p", Interval::Minute, 1, t0 + 6 * MIN)
            .unwrap()
            .remove(0);
        assert_eq!(m.anomalies.get("volume_spike"), Some(&1));
        // Quiet new caller under the minimum: nothing.
        for i in 0..9 {
            assert!(t
                .record(
                    &entry(t0 + 5 * MIN + 100 + i, "key:ak_b", "/v1/x", 200, "allow"),
                    OnAnomaly::Flag
                )
                .is_empty());
        }
    }

    #[test]
    fn first_seen_paths_and_errors() {
        let t = tele(AnomalyConfig {
            path_learning_requests: 2,
            error_min_count: 4,
            error_share: 0.5,
            ..quiet()
        });
        let t0 = 1_767_225_600u64 * 1_000_000;
        let k = "uid=1000(alice) gid=1000 pid=42 unit=app.service exe=/usr/bin/app";
        let mut kinds = Vec::new();
        let mut rec = |i: u64, path: &str, status: u16| {
            for a in t.record(&entry(t0 + i, k, path, status, "allow"), OnAnomaly::Flag) {
                kinds.push((i, a.kind, a.caller));
            }
        };
        rec(0, "/v1/a", 200); // learning
        rec(1, "/v1/b/1", 200); // learning
        rec(2, "/v1/b/2", 200); // same pattern
        rec(3, "/v1/c", 200); // new: raised
        rec(4, "/v1/d", 200); // new, same minute: not again
        rec(MIN, "/v1/e", 500); // next minute: raised
        rec(MIN + 1, "/v1/a", 500);
        rec(MIN + 2, "/v1/a", 500);
        rec(MIN + 3, "/v1/a", 404); // 4 of 4 errors: surge
        rec(MIN + 4, "/v1/a", 404);
        let id = "uid=1000 unit=app.service".to_string();
        assert_eq!(
            kinds,
            vec![
                (3, AnomalyKind::FirstSeenPath, id.clone()),
                (MIN, AnomalyKind::FirstSeenPath, id.clone()),
                (MIN + 3, AnomalyKind::ErrorSurge, id),
            ]
        );
    }

    #[test]
    fn suspension_persists_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AnomalyConfig {
            spike_min_count: 3,
            ..quiet()
        };
        {
            let db = sled::open(dir.path()).unwrap();
            let t = Telemetry::open(&db).unwrap();
            t.configure(cfg.clone());
            for i in 0..3 {
                t.record(&entry(i, "key:ak_x", "/", 200, "allow"), OnAnomaly::Suspend);
            }
            assert_eq!(
                t.suspended("p", "key:ak_x").map(|s| s.kind),
                Some("volume_spike".to_owned())
            );
            assert!(t.suspended("p", "key:ak_y").is_none());
            db.flush().unwrap();
        }
        // sled releases its file lock when its last background thread lets
        // go of the database, a moment after the drop above: on a loaded
        // machine the reopen can come first, so retry that case briefly.
        let reopened = std::time::Instant::now();
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && reopened.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        let t = Telemetry::open(&db).unwrap();
        assert!(t.suspended("p", "key:ak_x").is_some());
        assert!(matches!(
            t.unsuspend("p", "key:ak_y"),
            Err(ProxyError::NotFound(_))
        ));
        assert!(t.unsuspend("p", "bogus").is_err());
        t.unsuspend("p", "key:ak_x").unwrap();
        assert!(t.suspended("p", "key:ak_x").is_none());
    }

    #[test]
    fn forgetting_a_proxy_clears_its_callers() {
        let t = tele(AnomalyConfig {
            spike_min_count: 2,
            path_learning_requests: 1,
            ..quiet()
        });
        for i in 0..2 {
            t.record(
                &entry(i, "key:ak_x", "/a", 200, "allow"),
                OnAnomaly::Suspend,
            );
        }
        assert!(t.suspended("p", "key:ak_x").is_some());
        t.forget_proxy("p").unwrap();
        assert!(t.suspended("p", "key:ak_x").is_none());
        // Paths are learnt again (learning count reset too).
        let a = t.record(&entry(MIN, "key:ak_x", "/b", 200, "allow"), OnAnomaly::Flag);
        assert!(a.is_empty(), "{a:?}");
        let a = t.record(
            &entry(MIN + 1, "key:ak_x", "/c", 200, "allow"),
            OnAnomaly::Flag,
        );
        let kinds: Vec<AnomalyKind> = a.iter().map(|a| a.kind).collect();
        assert!(kinds.contains(&AnomalyKind::FirstSeenPath), "{a:?}");
    }

    /// Rough per-entry cost of `record` (run with `--ignored`; prints).
    #[test]
    #[ignore]
    fn record_cost() {
        let t = tele(AnomalyConfig::default());
        let t0 = 1_767_225_600u64 * 1_000_000;
        let n = 100_000u64;
        let start = std::time::Instant::now();
        for i in 0..n {
            let caller = format!("key:ak_{}", i % 50);
            let path = format!("/v1/items/{}/part{}", i, i % 20);
            t.record(
                &entry(t0 + i * 1000, &caller, &path, 200, "allow"),
                OnAnomaly::Flag,
            );
        }
        let per = start.elapsed().as_nanos() as u64 / n;
        let f = std::time::Instant::now();
        t.flush(t0 + n * 1000).unwrap();
        println!(
            "record: {per} ns/entry over {n} entries; flush {:?}",
            f.elapsed()
        );
    }

    #[test]
    fn patterns_and_callers() {
        assert_eq!(path_pattern("/v1/users/42/x"), "/v1/users/{n}/x");
        assert_eq!(
            path_pattern("/o/123e4567-e89b-12d3-a456-426614174000"),
            "/o/{uuid}"
        );
        assert_eq!(path_pattern("/h/deadbeefdeadbeef00"), "/h/{hex}");
        assert_eq!(path_pattern("/t/tok_9aZbq8Xy7Wv6Ut5Sr4Qp"), "/t/{id}");
        assert_eq!(path_pattern("/"), "/");
        assert!(path_pattern(&"/a".repeat(40)).ends_with("/{more}"));
        assert_eq!(caller_id("key:ak_1").as_deref(), Some("key:ak_1"));
        assert_eq!(
            caller_id("uid=0(root) gid=0 pid=9 exe=/x unit=evil").as_deref(),
            Some("uid=0")
        );
        assert_eq!(caller_id("-"), None);
        assert_eq!(caller_id("uid=x gid=1"), None);
    }
}
