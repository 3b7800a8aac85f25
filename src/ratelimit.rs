//! Rate limiting: layered GCRA buckets (per-second, per-minute with a
//! burst, per-day) keyed by anything hashable, with time as a parameter.
//!
//! GCRA (the generic cell rate algorithm) is a token bucket stored as one
//! number per layer, the *theoretical arrival time* (TAT). A layer that
//! admits `limit` requests per `period` with capacity `burst` has the
//! emission interval `T = period / limit` and the tolerance `tau = burst * T`.
//! A request at `now` is admitted when `max(TAT, now) + T - tau <= now`; then
//! `TAT = max(TAT, now) + T`. Remaining capacity is `(tau - (TAT - now)) / T`,
//! the bucket is full again at `TAT` (the `reset`), and a refused request may
//! retry after `max(TAT, now) + T - tau - now`.
//!
//! A request is admitted only when every layer of its plan admits it; only
//! then are all layers charged (a refusal charges nothing). The decision
//! reports the most restrictive layer: when refused, the layer with the
//! longest wait; when admitted, the layer with the least remaining capacity.
//!
//! Time is always an argument (`now`, a [`Duration`] since the Unix epoch),
//! so tests drive the clock. State lives in sharded, bounded LRU maps: an
//! evicted key starts again with a full bucket (more permissive, never
//! stricter), so the capacity should exceed the number of active keys.
//!
//! We implement GCRA here instead of using `governor` because callers need
//! the exact `remaining`/`reset`/`retry_after` figures for `X-RateLimit-*`
//! headers across several layers at once, atomically, with an explicit clock;
//! the algorithm is a few lines of integer arithmetic.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::time::Duration;

use lru::LruCache;
use parking_lot::Mutex;

const NANOS_PER_SEC: u128 = 1_000_000_000;
const SHARDS: usize = 16;

/// Which window a layer limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Second,
    Minute,
    Day,
}

impl Window {
    /// Length of the window.
    pub fn period(self) -> Duration {
        match self {
            Window::Second => Duration::from_secs(1),
            Window::Minute => Duration::from_secs(60),
            Window::Day => Duration::from_secs(86_400),
        }
    }

    fn index(self) -> usize {
        match self {
            Window::Second => 0,
            Window::Minute => 1,
            Window::Day => 2,
        }
    }

    /// `second`, `minute` or `day`.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Second => "second",
            Window::Minute => "minute",
            Window::Day => "day",
        }
    }
}

/// One GCRA layer: `limit` requests per window, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    pub window: Window,
    pub limit: u64,
    pub burst: u64,
}

impl Layer {
    /// Emission interval in nanoseconds (rounded up: never more permissive).
    fn t(&self) -> u128 {
        let p = self.window.period().as_nanos();
        let l = u128::from(self.limit.max(1));
        p.div_ceil(l)
    }

    fn tau(&self) -> u128 {
        u128::from(self.burst) * self.t()
    }
}

/// Why a rate plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RatePlanError {
    #[error("rate plan {0:?} sets no limit; set per_second, per_minute or per_day")]
    NoLimit(String),
    #[error("rate plan {plan:?}: {field} must be between 1 and 1000000000")]
    OutOfRange { plan: String, field: &'static str },
    #[error("rate plan {0:?}: burst needs per_minute (or per_second) to apply to")]
    BurstWithoutRate(String),
    #[error("rate plan name {0:?} must be 1..=64 characters of [a-z0-9_-]")]
    BadName(String),
}

/// A named, layered rate plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatePlan {
    pub name: String,
    layers: Vec<Layer>,
}

const MAX_FIGURE: u64 = 1_000_000_000;

impl RatePlan {
    /// Builds a plan. `burst` is the capacity of the per-minute layer (or of
    /// the per-second layer when there is no per-minute one); it defaults to
    /// the layer's own limit. The per-second and per-day layers hold exactly
    /// their limit.
    pub fn new(
        name: &str,
        per_second: Option<u64>,
        per_minute: Option<u64>,
        per_day: Option<u64>,
        burst: Option<u64>,
    ) -> Result<RatePlan, RatePlanError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(RatePlanError::BadName(name.to_owned()));
        }
        let check = |field: &'static str, v: Option<u64>| match v {
            Some(n) if n == 0 || n > MAX_FIGURE => Err(RatePlanError::OutOfRange {
                plan: name.to_owned(),
                field,
            }),
            _ => Ok(v),
        };
        let per_second = check("per_second", per_second)?;
        let per_minute = check("per_minute", per_minute)?;
        let per_day = check("per_day", per_day)?;
        let burst = check("burst", burst)?;
        if per_second.is_none() && per_minute.is_none() && per_day.is_none() {
            return Err(RatePlanError::NoLimit(name.to_owned()));
        }
        if burst.is_some() && per_second.is_none() && per_minute.is_none() {
            return Err(RatePlanError::BurstWithoutRate(name.to_owned()));
        }
        let mut layers = Vec::with_capacity(3);
        if let Some(l) = per_second {
            layers.push(Layer {
                window: Window::Second,
                limit: l,
                burst: if per_minute.is_none() {
                    burst.unwrap_or(l)
                } else {
                    l
                },
            });
        }
        if let Some(l) = per_minute {
            layers.push(Layer {
                window: Window::Minute,
                limit: l,
                burst: burst.unwrap_or(l),
            });
        }
        if let Some(l) = per_day {
            layers.push(Layer {
                window: Window::Day,
                limit: l,
                burst: l,
            });
        }
        Ok(RatePlan {
            name: name.to_owned(),
            layers,
        })
    }

    /// A single-layer plan (used by the brute-force guard).
    pub fn single(name: &str, window: Window, limit: u64, burst: u64) -> RatePlan {
        RatePlan {
            name: name.to_owned(),
            layers: vec![Layer {
                window,
                limit: limit.clamp(1, MAX_FIGURE),
                burst: burst.clamp(1, MAX_FIGURE),
            }],
        }
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }
}

/// The answer for one request, ready for `X-RateLimit-*` and `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Capacity of the reported layer (`X-RateLimit-Limit`).
    pub limit: u64,
    /// Requests left in the reported layer after this one (`X-RateLimit-Remaining`).
    pub remaining: u64,
    /// Until the reported layer is full again (`X-RateLimit-Reset`, seconds rounded up).
    pub reset: Duration,
    /// Zero when allowed; else how long to wait (`Retry-After`, seconds rounded up).
    pub retry_after: Duration,
    /// The layer reported.
    pub window: Window,
}

fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs();
    if d.subsec_nanos() > 0 {
        s + 1
    } else {
        s
    }
}

impl RateDecision {
    /// `reset` in whole seconds, rounded up.
    pub fn reset_secs(&self) -> u64 {
        ceil_secs(self.reset)
    }

    /// `retry_after` in whole seconds, rounded up (at least 1 when refused).
    pub fn retry_after_secs(&self) -> u64 {
        if self.allowed {
            0
        } else {
            ceil_secs(self.retry_after).max(1)
        }
    }
}

fn dur(ns: u128) -> Duration {
    let secs = (ns / NANOS_PER_SEC).min(u128::from(u64::MAX)) as u64;
    Duration::new(secs, (ns % NANOS_PER_SEC) as u32)
}

/// Per-key state: the TAT of each window (nanoseconds since the epoch).
type State = [u128; 3];

/// Evaluates `plan` at `now` against `state`; charges it when `consume` and
/// the request is admitted.
fn evaluate(state: &mut State, plan: &RatePlan, now: u128, consume: bool) -> Option<RateDecision> {
    let mut refused: Option<RateDecision> = None;
    let mut admitted: Option<(RateDecision, u128)> = None;
    let mut new_tats = *state;
    for layer in &plan.layers {
        let i = layer.window.index();
        let (t, tau) = (layer.t(), layer.tau());
        let tat = state[i].max(now);
        let new_tat = tat + t;
        let allow_at = new_tat.saturating_sub(tau);
        if allow_at > now {
            let d = RateDecision {
                allowed: false,
                limit: layer.burst,
                remaining: 0,
                reset: dur(tat - now),
                retry_after: dur(allow_at - now),
                window: layer.window,
            };
            if refused.map_or(true, |r| d.retry_after > r.retry_after) {
                refused = Some(d);
            }
            continue;
        }
        new_tats[i] = new_tat;
        let used = new_tat - now;
        let remaining = ((tau - used) / t).min(u128::from(u64::MAX)) as u64;
        let d = RateDecision {
            allowed: true,
            limit: layer.burst,
            remaining,
            reset: dur(used),
            retry_after: Duration::ZERO,
            window: layer.window,
        };
        let tighter = match admitted {
            None => true,
            Some((a, _)) => {
                d.remaining < a.remaining || (d.remaining == a.remaining && d.reset > a.reset)
            }
        };
        if tighter {
            admitted = Some((d, used));
        }
    }
    if let Some(r) = refused {
        return Some(r);
    }
    if consume {
        *state = new_tats;
    }
    admitted.map(|(d, _)| d)
}

/// Bounded, sharded per-key GCRA state.
pub struct Limiter<K> {
    shards: Vec<Mutex<LruCache<K, State>>>,
}

impl<K: Hash + Eq> Limiter<K> {
    /// A limiter remembering about `capacity` keys (at least one per shard).
    pub fn new(capacity: usize) -> Self {
        let per = NonZeroUsize::new(capacity.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        Limiter {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per)))
                .collect(),
        }
    }

    fn shard(&self, key: &K) -> &Mutex<LruCache<K, State>> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Decides a request of `key` under `plan` at `now` and charges it when
    /// admitted. `None` only for a plan without layers.
    pub fn check(&self, key: K, plan: &RatePlan, now: Duration) -> Option<RateDecision> {
        let now = now.as_nanos();
        let mut shard = self.shard(&key).lock();
        match shard.get_mut(&key) {
            Some(st) => evaluate(st, plan, now, true),
            None => {
                let mut st = [0u128; 3];
                let d = evaluate(&mut st, plan, now, true);
                if d.is_some_and(|d| d.allowed) {
                    shard.put(key, st);
                }
                d
            }
        }
    }

    /// What [`Limiter::check`] would answer, without charging anything.
    pub fn peek(&self, key: &K, plan: &RatePlan, now: Duration) -> Option<RateDecision> {
        let now = now.as_nanos();
        let mut st = self
            .shard(key)
            .lock()
            .peek(key)
            .copied()
            .unwrap_or([0u128; 3]);
        evaluate(&mut st, plan, now, false)
    }

    /// Charges one request unconditionally (a refusal still records it):
    /// used to count failures, which must not be forgiven by being refused.
    pub fn charge(&self, key: K, plan: &RatePlan, now: Duration) {
        let now = now.as_nanos();
        let mut shard = self.shard(&key).lock();
        let st = shard.get_or_insert_mut(key, || [0u128; 3]);
        for layer in &plan.layers {
            let i = layer.window.index();
            // Never more than one tolerance ahead, so a flood of failures
            // does not lock a caller out for longer than one full window.
            let cap = now + layer.tau();
            st[i] = (st[i].max(now) + layer.t()).min(cap);
        }
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets `key` (e.g. a revoked API key).
    pub fn forget(&self, key: &K) {
        self.shard(key).lock().pop(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn free() -> RatePlan {
        RatePlan::new("free", None, Some(10), Some(1000), Some(20)).unwrap()
    }

    #[test]
    fn burst_then_per_minute() {
        let l = Limiter::new(16);
        let p = free();
        let t0 = s(1_700_000_000);
        for i in 0..20u64 {
            let d = l.check("k", &p, t0).unwrap();
            assert!(d.allowed, "request {i}");
            assert_eq!(d.limit, 20);
            assert_eq!(d.remaining, 19 - i);
            assert_eq!(d.window, Window::Minute);
            // the minute bucket refills one request per 6 s
            assert_eq!(d.reset, s(6 * (i + 1)));
            assert_eq!(d.retry_after_secs(), 0);
        }
        let d = l.check("k", &p, t0).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.limit, 20);
        assert_eq!(d.retry_after, s(6));
        assert_eq!(d.retry_after_secs(), 6);
        assert_eq!(d.reset_secs(), 120);
        // a refusal charges nothing: still 6 s to wait 1 s later
        let d = l.check("k", &p, t0 + s(1)).unwrap();
        assert_eq!(d.retry_after, s(5));
        // 6 s after the burst exactly one more is admitted
        let d = l.check("k", &p, t0 + s(6)).unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert!(!l.check("k", &p, t0 + s(6)).unwrap().allowed);
        // sub-second waits round up
        let d = l.check("k", &p, t0 + Duration::from_millis(6500)).unwrap();
        assert_eq!(d.retry_after, Duration::from_millis(5500));
        assert_eq!(d.retry_after_secs(), 6);
        // another key is independent
        assert!(l.check("other", &p, t0).unwrap().allowed);
    }

    #[test]
    fn then_per_day() {
        let l = Limiter::new(16);
        let p = RatePlan::new("small", None, Some(10), Some(30), Some(20)).unwrap();
        let t0 = s(1_000_000);
        // burst of 20 (minute bucket), day bucket 30 -> 10 left
        for _ in 0..20 {
            assert!(l.check(1u8, &p, t0).unwrap().allowed);
        }
        let d = l.check(1u8, &p, t0).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.window, Window::Minute);
        // one minute later the minute bucket has 10 again; the day bucket
        // (30/day: one per 2880 s) has 10 left, so the day layer is the one
        // reported once it is the tighter
        let t1 = t0 + s(60);
        for i in 0..10u64 {
            let d = l.check(1u8, &p, t1).unwrap();
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 9 - i);
        }
        let d = l.check(1u8, &p, t1).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.window, Window::Day);
        assert_eq!(d.limit, 30);
        // the day bucket admits the next request 2880 s after t0
        assert_eq!(d.retry_after, s(2880 - 60));
        assert_eq!(d.reset, s(30 * 2880 - 60));
        // two minutes later the minute bucket is full but the day is not
        let d = l.check(1u8, &p, t1 + s(120)).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.window, Window::Day);
        assert_eq!(d.retry_after, s(2880 - 180));
        let d = l.check(1u8, &p, t0 + s(2880)).unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.window, Window::Day);
    }

    #[test]
    fn per_second_layer_and_refusal_charges_nothing() {
        let l = Limiter::new(16);
        let p = RatePlan::new("ent", Some(5), Some(1000), None, Some(2000)).unwrap();
        let t0 = s(50);
        for _ in 0..5 {
            assert!(l.check(7u32, &p, t0).unwrap().allowed);
        }
        let d = l.check(7u32, &p, t0).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.window, Window::Second);
        assert_eq!(d.retry_after, Duration::from_millis(200));
        assert_eq!(d.retry_after_secs(), 1);
        // the minute layer was charged 5, not 6
        let d = l.check(7u32, &p, t0 + s(1)).unwrap();
        assert!(d.allowed);
        assert_eq!(d.window, Window::Second);
        assert_eq!(d.remaining, 4);
        let ms = p
            .layers()
            .iter()
            .find(|x| x.window == Window::Minute)
            .unwrap();
        assert_eq!(ms.burst, 2000);
    }

    #[test]
    fn enterprise_burst() {
        let l = Limiter::new(16);
        let p = RatePlan::new("enterprise", None, Some(1000), None, Some(2000)).unwrap();
        let t0 = s(10);
        for _ in 0..2000 {
            assert!(l.check("e", &p, t0).unwrap().allowed);
        }
        let d = l.check("e", &p, t0).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_millis(60));
        assert_eq!(d.reset, s(120));
    }

    #[test]
    fn plan_validation() {
        assert!(matches!(
            RatePlan::new("x", None, None, None, None),
            Err(RatePlanError::NoLimit(_))
        ));
        assert!(matches!(
            RatePlan::new("x", None, Some(0), None, None),
            Err(RatePlanError::OutOfRange { .. })
        ));
        assert!(matches!(
            RatePlan::new("x", None, None, Some(5), Some(3)),
            Err(RatePlanError::BurstWithoutRate(_))
        ));
        assert!(matches!(
            RatePlan::new("Bad Name", None, Some(1), None, None),
            Err(RatePlanError::BadName(_))
        ));
    }

    #[test]
    fn peek_and_charge_for_failures() {
        let l = Limiter::new(4);
        let g = RatePlan::single("guard", Window::Minute, 20, 20);
        let t0 = s(100);
        for _ in 0..20 {
            assert!(l.peek(&"caller", &g, t0).unwrap().allowed);
            l.charge("caller", &g, t0);
        }
        let d = l.peek(&"caller", &g, t0).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, s(3));
        // more charges do not push the lockout beyond one window
        for _ in 0..1000 {
            l.charge("caller", &g, t0);
        }
        assert!(l.peek(&"caller", &g, t0 + s(3)).unwrap().allowed);
    }

    #[test]
    fn bounded_memory() {
        let l = Limiter::new(32);
        let p = RatePlan::single("g", Window::Second, 1, 1);
        for i in 0..10_000u32 {
            l.check(i, &p, s(1));
        }
        assert!(l.len() <= 32, "{}", l.len());
    }
}
