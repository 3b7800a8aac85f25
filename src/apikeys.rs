//! API keys: issue, verify, rotate (with overlap), revoke, revoke-by-owner.
//!
//! A key is `<prefix>_<env>_<random><checksum>`: the prefix (`ks` unless
//! configured), the environment (`live`, `test` or a custom `[a-z0-9]{1,16}`),
//! 33 base62 characters of 192 random bits, and 6 base62 characters of the
//! CRC32 of everything before them. [`ApiKeyToken::parse`] rejects a typo
//! (wrong length, a character outside base62, a bad checksum) before any
//! lookup. The full key is returned once by [`ApiKeys::issue`] and never
//! stored: the store keeps `HMAC-SHA256(pepper, key)`, where the 32-byte
//! pepper is a sealed singleton under the root of trust (`apikey/pepper`),
//! so a copy of the store without the root device cannot test guesses
//! offline.
//!
//! Trees: `apikeys` (id -> [`ApiKeyRecord`], postcard, versioned),
//! `apikey_by_hash` (HMAC -> id: the O(1) verify lookup) and
//! `apikey_by_owner` (owner || 0x00 || id -> ()). Every write is one sled
//! transaction over the trees it touches, serialised by one writer lock and
//! flushed before returning. Verify reads the record every time (no cache),
//! so a revocation applies to the very next verify.
//!
//! Verify distinguishes malformed, bad-checksum, unknown, expired, revoked,
//! wrong-source and not-permitted keys ([`InvalidReason`], logged for the
//! operator with the key id or last 4 characters, never the key) while the
//! gRPC layer answers all of them the same way. Failed verifies are charged
//! to the caller (uid and system unit) per customer network (the source
//! address when given) and over all networks; past the configured rates the
//! caller is throttled ([`ApiKeyError::Throttled`]) before any lookup.
//! Rate plans ([`crate::ratelimit`]) are charged per key lineage, so a key
//! and its rotated successor share one budget.
//!
//! Time is always a parameter (`now`), so tests move it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::name::SecretName;
use crate::ratelimit::{Limiter, RateDecision, RatePlan, RatePlanError, Window};
use crate::secrets::{SecretStore, SecretsError};
use crate::store::{decode, encode, StoreError};

/// Kind and name of the sealed pepper singleton.
pub const PEPPER_KIND: &str = "apikey";
pub const PEPPER_NAME: &str = "pepper";

/// Plan name that means "no rate plan" (overrides `default_plan`).
pub const UNLIMITED: &str = "unlimited";

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "ks";
/// Random bytes per key (192 bits).
pub const RANDOM_BYTES: usize = 24;
/// Base62 characters of the random part (62^33 > 2^192).
pub const RANDOM_CHARS: usize = 33;
/// Base62 characters of the checksum (62^6 > 2^32).
pub const CHECKSUM_CHARS: usize = 6;
/// Characters after `<prefix>_<env>_`.
pub const BODY_CHARS: usize = RANDOM_CHARS + CHECKSUM_CHARS;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

const MAX_SCOPES: usize = 64;
const MAX_CIDRS: usize = 64;
const MAX_LABELS: usize = 64;

// ---------------------------------------------------------------------------
// Base62, checksum, the token type
// ---------------------------------------------------------------------------

/// Big-endian `bytes` as exactly `len` base62 digits (leading zeros kept).
/// `len` must be large enough for the value (it is for our fixed sizes).
fn base62_fixed(bytes: &[u8], len: usize) -> Zeroizing<String> {
    let mut num = Zeroizing::new(bytes.to_vec());
    let mut out = Zeroizing::new(vec![b'0'; len]);
    for slot in out.iter_mut().rev() {
        let mut rem: u32 = 0;
        for b in num.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 62) as u8;
            rem = cur % 62;
        }
        *slot = BASE62[rem as usize];
    }
    // Sized up front so no reallocation leaves a copy behind.
    let mut s = Zeroizing::new(String::with_capacity(len));
    s.extend(out.iter().map(|b| char::from(*b)));
    s
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// The 6-character checksum of `head` (everything before the checksum).
pub fn checksum(head: &str) -> String {
    let crc = crc32fast::hash(head.as_bytes());
    base62_fixed(&crc.to_be_bytes(), CHECKSUM_CHARS).to_string()
}

/// Why a string is not a well-formed API key. Never echoes the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not an API key: expected <prefix>_<env>_ followed by {BODY_CHARS} base62 characters")]
    Malformed,
    #[error("API key checksum does not match (a typo, or a truncated key)")]
    BadChecksum,
}

/// Checks a key prefix: `[a-z][a-z0-9]{1,15}`.
pub fn check_prefix(p: &str) -> bool {
    let b = p.as_bytes();
    (2..=16).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// Checks an environment name: `[a-z0-9]{1,16}`.
pub fn check_env(e: &str) -> bool {
    (1..=16).contains(&e.len())
        && e.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// A well-formed API key (structure and checksum verified). Holds the full
/// key in zeroizing memory; `Debug` shows only prefix, env and last 4.
/// There is deliberately no `Display`: use [`ApiKeyToken::expose`].
#[derive(Clone)]
pub struct ApiKeyToken {
    text: Zeroizing<String>,
    prefix_len: usize,
    env_len: usize,
}

impl ApiKeyToken {
    /// Parses `s`: structure, character set and checksum, no lookup.
    pub fn parse(s: &str) -> Result<ApiKeyToken, TokenError> {
        if s.len() > 16 + 1 + 16 + 1 + BODY_CHARS {
            return Err(TokenError::Malformed);
        }
        let (prefix, rest) = s.split_once('_').ok_or(TokenError::Malformed)?;
        let (env, body) = rest.split_once('_').ok_or(TokenError::Malformed)?;
        if !check_prefix(prefix)
            || !check_env(env)
            || body.len() != BODY_CHARS
            || !body.bytes().all(is_base62)
        {
            return Err(TokenError::Malformed);
        }
        let split = s.len() - CHECKSUM_CHARS;
        let (head, sum) = s.split_at(split);
        if checksum(head) != sum {
            return Err(TokenError::BadChecksum);
        }
        Ok(ApiKeyToken {
            text: Zeroizing::new(s.to_owned()),
            prefix_len: prefix.len(),
            env_len: env.len(),
        })
    }

    /// A fresh key with 192 bits from the OS RNG.
    pub fn generate(prefix: &str, env: &str) -> Result<ApiKeyToken, TokenError> {
        if !check_prefix(prefix) || !check_env(env) {
            return Err(TokenError::Malformed);
        }
        let mut raw = Zeroizing::new([0u8; RANDOM_BYTES]);
        rand::rngs::OsRng.fill_bytes(raw.as_mut());
        let random = base62_fixed(raw.as_ref(), RANDOM_CHARS);
        let mut text = Zeroizing::new(String::with_capacity(
            prefix.len() + env.len() + 2 + BODY_CHARS,
        ));
        text.push_str(prefix);
        text.push('_');
        text.push_str(env);
        text.push('_');
        text.push_str(&random);
        let sum = checksum(&text);
        text.push_str(&sum);
        Ok(ApiKeyToken {
            text,
            prefix_len: prefix.len(),
            env_len: env.len(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.text[..self.prefix_len]
    }

    pub fn env(&self) -> &str {
        &self.text[self.prefix_len + 1..self.prefix_len + 1 + self.env_len]
    }

    /// The last 4 characters (safe to show and log).
    pub fn last4(&self) -> &str {
        &self.text[self.text.len() - 4..]
    }

    /// `ks_live_…WXYZ`: what may be shown to people.
    pub fn masked(&self) -> String {
        format!("{}_{}_…{}", self.prefix(), self.env(), self.last4())
    }

    /// The full key. Only for handing it to its holder once, or hashing.
    pub fn expose(&self) -> &str {
        &self.text
    }
}

/// Constant-time comparison of the full key.
impl PartialEq for ApiKeyToken {
    fn eq(&self, other: &Self) -> bool {
        self.text.as_bytes().ct_eq(other.text.as_bytes()).into()
    }
}

impl Eq for ApiKeyToken {}

impl fmt::Debug for ApiKeyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyToken({})", self.masked())
    }
}

/// The last 4 characters of an arbitrary presented string, for logs; `****`
/// when it is too short for 4 characters to be harmless.
pub fn last4_of(s: &str) -> String {
    if s.len() < 16 || !s.is_char_boundary(s.len() - 4) {
        "****".into()
    } else {
        s[s.len() - 4..].escape_debug().to_string()
    }
}

/// A candidate key found by [`find_tokens`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column (bytes).
    pub column: usize,
    /// The parsed key, or why the look-alike is not one.
    pub token: Result<ApiKeyToken, TokenError>,
}

/// Finds candidate keys with `prefix` in `text`: every `prefix_` that does
/// not continue an alphanumeric word, extended over `[A-Za-z0-9_]`. Keys
/// with a valid checksum come back `Ok`; look-alikes with a well-formed
/// shape but a bad checksum come back `Err(BadChecksum)`; other shapes
/// (`ks_foo`) are not reported at all.
pub fn find_tokens(text: &str, prefix: &str) -> Vec<Found> {
    let mut out = Vec::new();
    let needle = format!("{prefix}_");
    for (ln, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut from = 0;
        while let Some(pos) = line[from..].find(&needle) {
            let start = from + pos;
            from = start + needle.len();
            if start > 0 && bytes[start - 1].is_ascii_alphanumeric() {
                continue;
            }
            let end = bytes[start..]
                .iter()
                .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
                .map_or(bytes.len(), |p| start + p);
            let cand = &line[start..end];
            match ApiKeyToken::parse(cand) {
                Err(TokenError::Malformed) => {}
                token => {
                    out.push(Found {
                        line: ln + 1,
                        column: start + 1,
                        token,
                    });
                    from = end;
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Small value types: CIDR, durations
// ---------------------------------------------------------------------------

/// An allowed source network, e.g. `10.0.0.0/8`, `2001:db8::/32`; a bare
/// address is a single host. Host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

fn v4_mapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn mask_bits(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR like 10.0.0.0/8"))?;
        let addr = v4_mapped(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        let net = mask_bits(addr, prefix);
        if net != addr {
            return Err(format!(
                "{s:?} has host bits set; did you mean {net}/{prefix}?"
            ));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` (IPv4-mapped IPv6 counts as IPv4) is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = v4_mapped(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask_bits(ip, self.prefix) == self.addr
    }
}

/// Parses `90d`, `24h`, `1h30m`, `45s`, `2w` (units s, m, h, d, w).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration like 30s, 15m, 24h, 90d or 1h30m");
    if s.is_empty() {
        return Err(err());
    }
    let mut total: u64 = 0;
    let mut num: Option<u64> = None;
    for c in s.chars() {
        if let Some(d) = c.to_digit(10) {
            num = Some(
                num.unwrap_or(0)
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d)))
                    .ok_or_else(err)?,
            );
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(err()),
        };
        let n = num.take().ok_or_else(err)?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(err)?;
    }
    if num.is_some() {
        return Err(err());
    }
    Ok(Duration::from_secs(total))
}

/// `90d`, `1d2h`, `45s`: the inverse of [`parse_duration`].
pub fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if rest >= n {
            out.push_str(&format!("{}{unit}", rest / n));
            rest %= n;
        }
    }
    out
}

/// Now as a duration since the Unix epoch.
pub fn now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// `[apikeys]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKeys {
    prefix: Option<String>,
    rotation_overlap: Option<String>,
    rotate_after_live: Option<String>,
    rotate_after_test: Option<String>,
    default_plan: Option<String>,
    failed_verifies_per_minute: Option<u64>,
    caller_failed_verifies_per_minute: Option<u64>,
    guard_capacity: Option<usize>,
    limiter_capacity: Option<usize>,
}

/// `[rate_plans.NAME]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRatePlan {
    per_second: Option<u64>,
    per_minute: Option<u64>,
    per_day: Option<u64>,
    burst: Option<u64>,
}

/// Settings of the API-key service.
#[derive(Debug, Clone)]
pub struct ApiKeysConfig {
    /// Key prefix (`ks`).
    pub prefix: String,
    /// Default overlap of a rotation (24 h).
    pub rotation_overlap: Duration,
    /// Default `rotate_after` of `live` keys (90 days).
    pub rotate_after_live: Duration,
    /// Default `rotate_after` of every other environment (30 days).
    pub rotate_after_test: Duration,
    /// Rate plans by name.
    pub plans: BTreeMap<String, RatePlan>,
    /// Plan of keys issued without one (`None`: unlimited).
    pub default_plan: Option<String>,
    /// Failed verifies per minute (burst the same) of one caller for one
    /// customer source (or without a source) before it is throttled.
    pub failed_verifies_per_minute: u64,
    /// Failed verifies per minute of one caller over all sources (default
    /// ten times `failed_verifies_per_minute`).
    pub caller_failed_verifies_per_minute: u64,
    /// Callers remembered by the brute-force guard (LRU).
    pub guard_capacity: usize,
    /// Key lineages remembered by the rate limiter (LRU).
    pub limiter_capacity: usize,
}

impl Default for ApiKeysConfig {
    fn default() -> Self {
        ApiKeysConfig {
            prefix: DEFAULT_PREFIX.into(),
            rotation_overlap: Duration::from_secs(86_400),
            rotate_after_live: Duration::from_secs(90 * 86_400),
            rotate_after_test: Duration::from_secs(30 * 86_400),
            plans: BTreeMap::new(),
            default_plan: None,
            failed_verifies_per_minute: 20,
            caller_failed_verifies_per_minute: 200,
            guard_capacity: 10_000,
            limiter_capacity: 100_000,
        }
    }
}

impl ApiKeysConfig {
    /// Resolves the raw sections; the message names the key that is wrong.
    pub fn from_raw(
        raw: RawApiKeys,
        plans: BTreeMap<String, RawRatePlan>,
    ) -> Result<ApiKeysConfig, String> {
        let mut c = ApiKeysConfig::default();
        if let Some(p) = raw.prefix {
            if !check_prefix(&p) {
                return Err(format!(
                    "apikeys.prefix = {p:?}: use 2..=16 characters of [a-z0-9] starting with a letter"
                ));
            }
            c.prefix = p;
        }
        let dur = |key: &str, v: Option<String>, default: Duration| -> Result<Duration, String> {
            match v {
                None => Ok(default),
                Some(s) => parse_duration(&s).map_err(|e| format!("apikeys.{key}: {e}")),
            }
        };
        c.rotation_overlap = dur("rotation_overlap", raw.rotation_overlap, c.rotation_overlap)?;
        c.rotate_after_live = dur(
            "rotate_after_live",
            raw.rotate_after_live,
            c.rotate_after_live,
        )?;
        c.rotate_after_test = dur(
            "rotate_after_test",
            raw.rotate_after_test,
            c.rotate_after_test,
        )?;
        for (name, p) in plans {
            if name == UNLIMITED {
                return Err(format!(
                    "rate_plans.{UNLIMITED}: the name is reserved for keys without a plan"
                ));
            }
            let plan = RatePlan::new(&name, p.per_second, p.per_minute, p.per_day, p.burst)
                .map_err(|e: RatePlanError| format!("rate_plans.{name}: {e}"))?;
            c.plans.insert(name, plan);
        }
        if let Some(d) = raw.default_plan {
            if !c.plans.contains_key(&d) {
                return Err(format!(
                    "apikeys.default_plan = {d:?} is not defined; add a [rate_plans.{d}] section"
                ));
            }
            c.default_plan = Some(d);
        }
        if let Some(n) = raw.failed_verifies_per_minute {
            if n == 0 || n > 1_000_000 {
                return Err("apikeys.failed_verifies_per_minute must be 1..=1000000".into());
            }
            c.failed_verifies_per_minute = n;
        }
        c.caller_failed_verifies_per_minute = match raw.caller_failed_verifies_per_minute {
            None => c.failed_verifies_per_minute.saturating_mul(10),
            Some(n) if n == 0 || n > 10_000_000 => {
                return Err("apikeys.caller_failed_verifies_per_minute must be 1..=10000000".into())
            }
            Some(n) => n,
        };
        if let Some(n) = raw.guard_capacity {
            if n == 0 {
                return Err("apikeys.guard_capacity must be at least 1".into());
            }
            c.guard_capacity = n;
        }
        if let Some(n) = raw.limiter_capacity {
            if n == 0 {
                return Err("apikeys.limiter_capacity must be at least 1".into());
            }
            c.limiter_capacity = n;
        }
        Ok(c)
    }

    fn default_rotate_after(&self, env: &str) -> Duration {
        if env == "live" {
            self.rotate_after_live
        } else {
            self.rotate_after_test
        }
    }
}

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

/// HMAC-SHA256 of a key under the pepper. `Debug` does not print it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHash(pub [u8; 32]);

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

/// Metadata of one API key. Never holds the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub prefix: String,
    pub env: String,
    pub created_at: u64,
    pub created_by: String,
    /// Unix time from which verifies fail.
    pub expires_at: Option<u64>,
    /// Lifetime given at issue, inherited by successors.
    pub ttl: Option<u64>,
    pub revoked_at: Option<u64>,
    pub revoked_by: Option<String>,
    /// Allowed customer source networks (empty: any).
    pub cidrs: Vec<Cidr>,
    /// Rate plan name (`None`: unlimited).
    pub plan: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Last 4 characters of the key.
    pub last4: String,
    /// Seconds after creation when the key is due for rotation.
    pub rotate_after: u64,
    pub predecessor: Option<String>,
    pub successor: Option<String>,
    /// Id of the first key of the rotation chain (rate budget key).
    pub lineage: String,
    pub hash: KeyHash,
}

/// State of a key at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Expired,
    Revoked,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Expired => "expired",
            KeyState::Revoked => "revoked",
        }
    }
}

impl ApiKeyRecord {
    pub fn state(&self, now: u64) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if self.expires_at.is_some_and(|e| now >= e) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }

    /// Active, not yet rotated, and past `created_at + rotate_after`.
    pub fn rotation_due(&self, now: u64) -> bool {
        self.state(now) == KeyState::Active
            && self.successor.is_none()
            && self.created_at.saturating_add(self.rotate_after) <= now
    }

    /// `ks_live_…WXYZ`.
    pub fn masked(&self) -> String {
        format!("{}_{}_…{}", self.prefix, self.env, self.last4)
    }
}

/// The stored form: versioned, so later schemas can add fields.
#[derive(Serialize, Deserialize)]
enum Stored {
    V1(ApiKeyRecord),
}

const TREE_KEYS: &str = "apikeys";
const TREE_BY_HASH: &str = "apikey_by_hash";
const TREE_BY_OWNER: &str = "apikey_by_owner";

fn decode_record(b: &[u8]) -> Result<ApiKeyRecord, StoreError> {
    match decode::<Stored>(TREE_KEYS, b)? {
        Stored::V1(r) => Ok(r),
    }
}

fn encode_record(r: &ApiKeyRecord) -> Result<Vec<u8>, StoreError> {
    encode(&Stored::V1(r.clone()))
}

fn owner_key(owner: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + id.len() + 1);
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn new_id() -> String {
    let mut b = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("ak_{}", hex::encode(b))
}

/// Checks a key id's shape (`ak_` + 24 hex digits).
pub fn check_id(id: &str) -> bool {
    id.strip_prefix("ak_")
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

// ---------------------------------------------------------------------------
// Errors, requests, answers
// ---------------------------------------------------------------------------

/// Errors of the API-key service. Messages never contain keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiKeyError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("API key not found")]
    NotFound,
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("too many failed API key verifies from this caller; retry in {retry_after_secs} s")]
    Throttled { retry_after_secs: u64 },
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

impl From<StoreError> for ApiKeyError {
    fn from(e: StoreError) -> Self {
        ApiKeyError::Secrets(SecretsError::Store(e))
    }
}

impl From<sled::Error> for ApiKeyError {
    fn from(e: sled::Error) -> Self {
        ApiKeyError::Secrets(SecretsError::Store(e.into()))
    }
}

impl From<TransactionError<ApiKeyError>> for ApiKeyError {
    fn from(e: TransactionError<ApiKeyError>) -> Self {
        match e {
            TransactionError::Abort(a) => a,
            TransactionError::Storage(s) => s.into(),
        }
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<ApiKeyError>>;

fn abort<T>(e: ApiKeyError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_get(t: &TransactionalTree, id: &str) -> TxResult<Option<ApiKeyRecord>> {
    match t.get(id.as_bytes())? {
        None => Ok(None),
        Some(b) => match decode_record(&b) {
            Ok(r) => Ok(Some(r)),
            Err(e) => abort(e.into()),
        },
    }
}

fn tx_put(t: &TransactionalTree, r: &ApiKeyRecord) -> TxResult<()> {
    match encode_record(r) {
        Ok(b) => {
            t.insert(r.id.as_bytes(), b)?;
            Ok(())
        }
        Err(e) => abort(e.into()),
    }
}

/// What to issue.
#[derive(Debug, Clone, Default)]
pub struct IssueRequest {
    pub owner: String,
    pub scopes: Vec<String>,
    /// Empty: `live`.
    pub env: String,
    pub expires_in: Option<Duration>,
    /// CIDR strings (validated).
    pub cidrs: Vec<String>,
    /// Empty: the configured default plan (if any).
    pub plan: String,
    pub labels: BTreeMap<String, String>,
    /// `None`: 90 days for `live`, 30 for others (configurable).
    pub rotate_after: Option<Duration>,
}

/// A freshly issued key: the only time the full key exists outside its holder.
#[derive(Debug)]
pub struct Issued {
    pub token: ApiKeyToken,
    pub record: ApiKeyRecord,
}

/// A rotation's result.
#[derive(Debug)]
pub struct Rotated {
    pub token: ApiKeyToken,
    pub record: ApiKeyRecord,
    pub predecessor: ApiKeyRecord,
}

/// Filter and page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub owner: Option<String>,
    /// Only keys due for rotation.
    pub due: bool,
    /// Include revoked and expired keys.
    pub include_inactive: bool,
    /// Start after this id (exclusive).
    pub after: Option<String>,
    /// At most this many (0: 100).
    pub limit: usize,
}

/// Who verifies (the brute-force guard's key) and how to log them.
#[derive(Debug, Clone)]
pub struct VerifyCaller {
    pub uid: u32,
    pub unit: Option<String>,
    pub actor: String,
}

/// What to verify. `Debug` masks the key.
#[derive(Clone, Copy)]
pub struct VerifyRequest<'a> {
    pub key: &'a str,
    /// The customer's source address, as the calling service saw it.
    pub source: Option<IpAddr>,
    pub required_scopes: &'a [String],
    /// Report the rate decision without charging it (e.g. `keyseal scan`).
    pub dry_run: bool,
}

impl fmt::Debug for VerifyRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("key", &format_args!("…{}", last4_of(self.key)))
            .field("source", &self.source)
            .field("required_scopes", &self.required_scopes)
            .field("dry_run", &self.dry_run)
            .finish()
    }
}

/// Why a key was refused. For the operator only: callers get one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// Not the shape of a key (or another prefix than ours).
    Malformed,
    BadChecksum,
    Unknown,
    Expired,
    Revoked,
    WrongSource,
    /// The caller may not verify keys of this owner.
    NotPermitted,
}

impl InvalidReason {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::Malformed => "malformed",
            InvalidReason::BadChecksum => "bad_checksum",
            InvalidReason::Unknown => "unknown",
            InvalidReason::Expired => "expired",
            InvalidReason::Revoked => "revoked",
            InvalidReason::WrongSource => "wrong_source",
            InvalidReason::NotPermitted => "not_permitted",
        }
    }
}

/// A genuine, active key from an allowed source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub id: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub env: String,
    /// Required scopes the key lacks (non-empty: answer 403).
    pub missing_scopes: Vec<String>,
    /// `None`: no rate plan.
    pub rate: Option<RateDecision>,
}

/// The outcome of a verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid(Verified),
    Invalid {
        reason: InvalidReason,
        /// Known once the key was found.
        key_id: Option<String>,
    },
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid(_))
    }
}

/// Counters for tests and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApiKeyStats {
    /// Lookups of the hash index (a typo never gets here).
    pub lookups: u64,
    pub verifies: u64,
    pub throttled: u64,
}

/// What a brute-force guard bucket counts for one caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum GuardScope {
    /// Failures for one customer network (IPv4 address, IPv6 /64).
    Source(IpAddr),
    /// Failures of requests that named no source.
    NoSource,
    /// Every failure of the caller (bounds callers that vary `source`).
    Caller,
}

/// Key of the brute-force guard: the caller as the kernel identified it
/// (uid and system unit) and the scope counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GuardKey {
    uid: u32,
    unit: Option<String>,
    scope: GuardScope,
}

fn guard_source(ip: IpAddr) -> IpAddr {
    match v4_mapped(ip) {
        IpAddr::V6(_) => mask_bits(ip, 64),
        v4 => v4,
    }
}

// ---------------------------------------------------------------------------
// Validation helpers
// ---------------------------------------------------------------------------

fn check_scope(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'_' | b'/' | b'-' | b'*')
        })
}

fn invalid(msg: impl Into<String>) -> ApiKeyError {
    ApiKeyError::InvalidArgument(msg.into())
}

/// Validates an owner name (the secret-name grammar, so policy globs apply).
pub fn check_owner(owner: &str) -> Result<(), ApiKeyError> {
    SecretName::parse(owner)
        .map(|_| ())
        .map_err(|e| invalid(format!("invalid owner: {e}")))
}

fn check_scopes(scopes: &[String]) -> Result<Vec<String>, ApiKeyError> {
    if scopes.len() > MAX_SCOPES {
        return Err(invalid(format!("at most {MAX_SCOPES} scopes")));
    }
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for s in scopes {
        if !check_scope(s) {
            return Err(invalid(
                "scopes are 1..=128 characters of [A-Za-z0-9:._/*-]",
            ));
        }
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiKeyError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > 128 || v.len() > 1024 {
            return Err(invalid(
                "label keys must be 1..=128 bytes and values at most 1024 bytes",
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------

/// API keys over the sealed store.
pub struct ApiKeys {
    keys: sled::Tree,
    by_hash: sled::Tree,
    by_owner: sled::Tree,
    store: crate::store::Store,
    cfg: ApiKeysConfig,
    limiter: Limiter<String>,
    guard: Limiter<GuardKey>,
    guard_plan: RatePlan,
    caller_guard_plan: RatePlan,
    write: Mutex<()>,
    /// HMAC-SHA256 keyed with the pepper (the keyed state, computed once;
    /// ring's SHA-256 is ~1.8x the `sha2` crate's portable code on CPUs
    /// without SHA extensions).
    mac: ring::hmac::Key,
    /// Records found by key hash, each valid for the write generation it
    /// was read in: every write bumps the generation (see [`WriteGuard`]),
    /// so a revoke or rotate is seen by the very next verify.
    cache: parking_lot::RwLock<RecordCache>,
    generation: AtomicU64,
    lookups: AtomicU64,
    verifies: AtomicU64,
    throttled: AtomicU64,
}

/// Key hash -> (write generation it was read in, record).
type RecordCache = HashMap<[u8; 32], (u64, Arc<ApiKeyRecord>)>;

/// Records kept in [`ApiKeys`]' verify cache before it is emptied.
const RECORD_CACHE: usize = 16 * 1024;

/// Held for every write of the key trees; when dropped (after the write
/// is committed) it moves to a new generation, which invalidates every
/// cached record.
struct WriteGuard<'a> {
    _lock: parking_lot::MutexGuard<'a, ()>,
    keys: &'a ApiKeys,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.keys.generation.fetch_add(1, Ordering::SeqCst);
        self.keys.cache.write().clear();
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("prefix", &self.cfg.prefix)
            .field("pepper", &"***")
            .finish_non_exhaustive()
    }
}

impl ApiKeys {
    /// Opens the API-key trees of `secrets`' store and unseals the pepper,
    /// creating it (32 random bytes, sealed under the root) on first use.
    pub fn open(secrets: &SecretStore, cfg: ApiKeysConfig) -> Result<ApiKeys, ApiKeyError> {
        let raw = secrets.open_or_create_value(PEPPER_KIND, PEPPER_NAME, || {
            let mut p = Zeroizing::new(vec![0u8; 32]);
            rand::rngs::OsRng.fill_bytes(&mut p);
            p
        })?;
        let mut pepper = Zeroizing::new([0u8; 32]);
        if raw.len() != 32 {
            return Err(ApiKeyError::Secrets(SecretsError::Integrity(
                "sealed apikey/pepper has the wrong length".into(),
            )));
        }
        pepper.copy_from_slice(&raw);
        let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, pepper.as_ref());
        let store = secrets.store().clone();
        let db = &store.db;
        let guard_plan = RatePlan::single(
            "failed-verifies",
            Window::Minute,
            cfg.failed_verifies_per_minute,
            cfg.failed_verifies_per_minute,
        );
        let caller_guard_plan = RatePlan::single(
            "failed-verifies-caller",
            Window::Minute,
            cfg.caller_failed_verifies_per_minute,
            cfg.caller_failed_verifies_per_minute,
        );
        Ok(ApiKeys {
            keys: db.open_tree(TREE_KEYS)?,
            by_hash: db.open_tree(TREE_BY_HASH)?,
            by_owner: db.open_tree(TREE_BY_OWNER)?,
            limiter: Limiter::new(cfg.limiter_capacity),
            guard: Limiter::new(cfg.guard_capacity),
            guard_plan,
            caller_guard_plan,
            store,
            cfg,
            write: Mutex::new(()),
            mac,
            cache: parking_lot::RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
            verifies: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &ApiKeysConfig {
        &self.cfg
    }

    pub fn stats(&self) -> ApiKeyStats {
        ApiKeyStats {
            lookups: self.lookups.load(Ordering::Relaxed),
            verifies: self.verifies.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
        }
    }

    /// Number of keys stored (any state).
    pub fn count(&self) -> usize {
        self.keys.len()
    }

    /// `HMAC-SHA256(pepper, key)`.
    fn hash(&self, token: &ApiKeyToken) -> Result<KeyHash, ApiKeyError> {
        let tag = ring::hmac::sign(&self.mac, token.expose().as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        Ok(KeyHash(out))
    }

    fn write_lock(&self) -> WriteGuard<'_> {
        WriteGuard {
            _lock: self.write.lock(),
            keys: self,
        }
    }

    /// The record whose hash is `hash`: from the cache when it was read in
    /// the current write generation, else from the store (and cached).
    fn record_by_hash(&self, hash: &KeyHash) -> Result<Option<Arc<ApiKeyRecord>>, ApiKeyError> {
        let gen = self.generation.load(Ordering::SeqCst);
        if let Some((g, r)) = self.cache.read().get(&hash.0) {
            if *g == gen {
                return Ok(Some(r.clone()));
            }
        }
        let id = match self.by_hash.get(hash.0)? {
            Some(id) => String::from_utf8_lossy(&id).into_owned(),
            None => return Ok(None),
        };
        let Some(r) = self.record(&id)? else {
            return Ok(None);
        };
        // The index could only be wrong through corruption; never trust it
        // alone.
        let same: bool = r.hash.0.ct_eq(&hash.0).into();
        if !same {
            tracing::error!(key_id = %id, "api key hash index points at a record with another hash");
            return Ok(None);
        }
        let r = Arc::new(r);
        let mut c = self.cache.write();
        // Not when a write committed since `gen` was read: `r` may be older.
        if self.generation.load(Ordering::SeqCst) == gen {
            if c.len() >= RECORD_CACHE {
                c.clear();
            }
            c.insert(hash.0, (gen, r.clone()));
        }
        Ok(Some(r))
    }

    fn record(&self, id: &str) -> Result<Option<ApiKeyRecord>, ApiKeyError> {
        match self.keys.get(id.as_bytes())? {
            Some(b) => Ok(Some(decode_record(&b)?)),
            None => Ok(None),
        }
    }

    fn plan_for(&self, requested: &str) -> Result<Option<String>, ApiKeyError> {
        if requested.is_empty() {
            return Ok(self.cfg.default_plan.clone());
        }
        if requested == UNLIMITED {
            return Ok(None);
        }
        if self.cfg.plans.contains_key(requested) {
            Ok(Some(requested.to_owned()))
        } else {
            let known: Vec<&str> = self.cfg.plans.keys().map(String::as_str).collect();
            Err(invalid(format!(
                "rate plan {requested:?} is not configured (configured: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )))
        }
    }

    /// Issues a key. The full key is in the answer only.
    pub fn issue(&self, actor: &str, req: &IssueRequest, now: u64) -> Result<Issued, ApiKeyError> {
        check_owner(&req.owner)?;
        let scopes = check_scopes(&req.scopes)?;
        let env = if req.env.is_empty() {
            "live"
        } else {
            req.env.as_str()
        };
        if !check_env(env) {
            return Err(invalid("env must be 1..=16 characters of [a-z0-9]"));
        }
        if req.cidrs.len() > MAX_CIDRS {
            return Err(invalid(format!("at most {MAX_CIDRS} CIDRs")));
        }
        let cidrs = req
            .cidrs
            .iter()
            .map(|c| c.parse::<Cidr>().map_err(invalid))
            .collect::<Result<Vec<_>, _>>()?;
        check_labels(&req.labels)?;
        let plan = self.plan_for(&req.plan)?;
        let ttl = match req.expires_in {
            Some(d) if d.as_secs() == 0 => {
                return Err(invalid("expires_in must be at least 1 second"))
            }
            Some(d) => Some(d.as_secs()),
            None => None,
        };
        let rotate_after = match req.rotate_after {
            Some(d) if d.as_secs() == 0 => {
                return Err(invalid("rotate_after must be at least 1 second"))
            }
            Some(d) => d.as_secs(),
            None => self.cfg.default_rotate_after(env).as_secs(),
        };
        let token = ApiKeyToken::generate(&self.cfg.prefix, env)
            .map_err(|_| invalid("bad prefix or env"))?;
        let id = new_id();
        let record = ApiKeyRecord {
            id: id.clone(),
            owner: req.owner.clone(),
            scopes,
            prefix: self.cfg.prefix.clone(),
            env: env.to_owned(),
            created_at: now,
            created_by: actor.to_owned(),
            expires_at: ttl.map(|t| now.saturating_add(t)),
            ttl,
            revoked_at: None,
            revoked_by: None,
            cidrs,
            plan,
            labels: req.labels.clone(),
            last4: token.last4().to_owned(),
            rotate_after,
            predecessor: None,
            successor: None,
            lineage: id,
            hash: self.hash(&token)?,
        };
        let _w = self.write_lock();
        self.store.disk.check_write()?;
        (&self.keys, &self.by_hash, &self.by_owner).transaction(|(k, h, o)| {
            insert_new(k, h, o, &record)?;
            Ok(())
        })?;
        self.store.flush()?;
        tracing::info!(
            key_id = %record.id,
            owner = %record.owner,
            env = %record.env,
            key = %record.masked(),
            actor,
            "api key issued"
        );
        Ok(Issued { token, record })
    }

    /// Metadata of key `id` when `may(owner)`; else (or unknown) `NotFound`.
    pub fn get(&self, id: &str, may: &dyn Fn(&str) -> bool) -> Result<ApiKeyRecord, ApiKeyError> {
        if !check_id(id) {
            return Err(invalid("a key id is ak_ followed by 24 hex digits"));
        }
        match self.record(id)? {
            Some(r) if may(&r.owner) => Ok(r),
            Some(r) => {
                tracing::info!(key_id = id, owner = %r.owner, "api key admin denied: not permitted for owner");
                Err(ApiKeyError::NotFound)
            }
            None => Err(ApiKeyError::NotFound),
        }
    }

    /// Lists keys matching `f` that `may(owner)` allows, in id order (by
    /// owner, then id, with an owner filter). Returns the next page token.
    pub fn list(
        &self,
        f: &ListFilter,
        now: u64,
        may: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<ApiKeyRecord>, Option<String>), ApiKeyError> {
        let limit = match f.limit {
            0 => 100,
            n => n.min(1000),
        };
        if let Some(a) = &f.after {
            if !check_id(a) {
                return Err(invalid("invalid page token"));
            }
        }
        let keep = |r: &ApiKeyRecord| {
            (f.include_inactive || r.state(now) == KeyState::Active)
                && (!f.due || r.rotation_due(now))
                && may(&r.owner)
        };
        let mut out = Vec::new();
        let mut push = |r: ApiKeyRecord| -> bool {
            if keep(&r) {
                out.push(r);
            }
            out.len() >= limit
        };
        let mut last: Option<String> = None;
        let mut full = false;
        match &f.owner {
            Some(owner) => {
                check_owner(owner)?;
                let prefix = owner_key(owner, "");
                let start = match &f.after {
                    Some(a) => {
                        let mut k = owner_key(owner, a);
                        k.push(0);
                        k
                    }
                    None => prefix.clone(),
                };
                for kv in self.by_owner.range(start..) {
                    let (k, _) = kv?;
                    if !k.starts_with(&prefix) {
                        break;
                    }
                    let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                    if let Some(r) = self.record(&id)? {
                        last = Some(id);
                        if push(r) {
                            full = true;
                            break;
                        }
                    }
                }
            }
            None => {
                let start = match &f.after {
                    Some(a) => {
                        let mut k = a.as_bytes().to_vec();
                        k.push(0);
                        k
                    }
                    None => Vec::new(),
                };
                for kv in self.keys.range(start..) {
                    let (_, v) = kv?;
                    let r = decode_record(&v)?;
                    last = Some(r.id.clone());
                    if push(r) {
                        full = true;
                        break;
                    }
                }
            }
        }
        Ok((out, if full { last } else { None }))
    }

    /// Issues the successor of `id`, inheriting its metadata, and sets the
    /// predecessor to expire at `now + overlap` (or earlier if it already
    /// expires earlier). `overlap` `None`: the configured default.
    pub fn rotate(
        &self,
        actor: &str,
        id: &str,
        overlap: Option<Duration>,
        now: u64,
        may: &dyn Fn(&str) -> bool,
    ) -> Result<Rotated, ApiKeyError> {
        if !check_id(id) {
            return Err(invalid("a key id is ak_ followed by 24 hex digits"));
        }
        let overlap = overlap.unwrap_or(self.cfg.rotation_overlap).as_secs();
        let _w = self.write_lock();
        self.store.disk.check_write()?;
        // The record decides the new key's env; read it first (writers are
        // serialised, so it cannot change before the transaction).
        let pred = match self.record(id)? {
            Some(r) if may(&r.owner) => r,
            Some(r) => {
                tracing::info!(key_id = id, owner = %r.owner, actor, "api key rotate denied: not permitted for owner");
                return Err(ApiKeyError::NotFound);
            }
            None => return Err(ApiKeyError::NotFound),
        };
        match pred.state(now) {
            KeyState::Active => {}
            s => {
                return Err(ApiKeyError::FailedPrecondition(format!(
                    "API key {id} is {}: issue a new key instead of rotating it",
                    s.as_str()
                )))
            }
        }
        if let Some(s) = &pred.successor {
            return Err(ApiKeyError::FailedPrecondition(format!(
                "API key {id} was already rotated to {s}; rotate {s} instead"
            )));
        }
        let token = ApiKeyToken::generate(&pred.prefix, &pred.env)
            .map_err(|_| invalid("bad prefix or env"))?;
        let new_id = new_id();
        let record = ApiKeyRecord {
            id: new_id.clone(),
            created_at: now,
            created_by: actor.to_owned(),
            expires_at: pred.ttl.map(|t| now.saturating_add(t)),
            revoked_at: None,
            revoked_by: None,
            last4: token.last4().to_owned(),
            predecessor: Some(pred.id.clone()),
            successor: None,
            hash: self.hash(&token)?,
            ..pred.clone()
        };
        let mut old = pred.clone();
        let until = now.saturating_add(overlap);
        old.expires_at = Some(old.expires_at.map_or(until, |e| e.min(until)));
        old.successor = Some(new_id);
        (&self.keys, &self.by_hash, &self.by_owner).transaction(|(k, h, o)| {
            // Unchanged since read (we hold the writer lock); re-checked anyway.
            if tx_get(k, &old.id)?.as_ref() != Some(&pred) {
                return abort(ApiKeyError::FailedPrecondition(format!(
                    "API key {id} changed during rotation; retry"
                )));
            }
            insert_new(k, h, o, &record)?;
            tx_put(k, &old)?;
            Ok(())
        })?;
        self.store.flush()?;
        tracing::info!(
            key_id = %old.id,
            successor = %record.id,
            owner = %record.owner,
            overlap_secs = overlap,
            actor,
            "api key rotated"
        );
        Ok(Rotated {
            token,
            record,
            predecessor: old,
        })
    }

    /// Revokes `id` (idempotent: a revoked key keeps its first revocation).
    /// Returns the record and whether it was already revoked.
    pub fn revoke(
        &self,
        actor: &str,
        id: &str,
        now: u64,
        may: &dyn Fn(&str) -> bool,
    ) -> Result<(ApiKeyRecord, bool), ApiKeyError> {
        if !check_id(id) {
            return Err(invalid("a key id is ak_ followed by 24 hex digits"));
        }
        let _w = self.write_lock();
        self.store.disk.check_write()?;
        let (rec, already) = self.keys.transaction(|k| {
            let Some(mut r) = tx_get(k, id)? else {
                return abort(ApiKeyError::NotFound);
            };
            if !may(&r.owner) {
                return abort(ApiKeyError::NotFound);
            }
            if r.revoked_at.is_some() {
                return Ok((r, true));
            }
            r.revoked_at = Some(now);
            r.revoked_by = Some(actor.to_owned());
            tx_put(k, &r)?;
            Ok((r, false))
        })?;
        self.store.flush()?;
        if !already {
            tracing::info!(key_id = id, owner = %rec.owner, actor, "api key revoked");
        }
        Ok((rec, already))
    }

    /// Revokes every key of `owner` that is not revoked yet, in one
    /// transaction. Returns the ids revoked now.
    pub fn revoke_owner(
        &self,
        actor: &str,
        owner: &str,
        now: u64,
    ) -> Result<Vec<String>, ApiKeyError> {
        check_owner(owner)?;
        let _w = self.write_lock();
        self.store.disk.check_write()?;
        // Writers are serialised: no key of `owner` can appear meanwhile.
        let prefix = owner_key(owner, "");
        let mut ids = Vec::new();
        for kv in self.by_owner.scan_prefix(&prefix) {
            let (k, _) = kv?;
            ids.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        let done = self.keys.transaction(|k| {
            let mut done = Vec::new();
            for id in &ids {
                let Some(mut r) = tx_get(k, id)? else {
                    continue;
                };
                if r.revoked_at.is_some() {
                    continue;
                }
                r.revoked_at = Some(now);
                r.revoked_by = Some(actor.to_owned());
                tx_put(k, &r)?;
                done.push(id.clone());
            }
            Ok(done)
        })?;
        self.store.flush()?;
        tracing::warn!(
            owner,
            revoked = done.len(),
            actor,
            "all api keys of owner revoked"
        );
        Ok(done)
    }

    /// Verifies a presented key. `may(owner)` says whether the caller may
    /// verify keys of that owner. Throttled callers get
    /// [`ApiKeyError::Throttled`] before anything is looked at.
    pub fn verify(
        &self,
        caller: &VerifyCaller,
        req: VerifyRequest<'_>,
        now: Duration,
        may: &dyn Fn(&str) -> bool,
    ) -> Result<Verdict, ApiKeyError> {
        self.verifies.fetch_add(1, Ordering::Relaxed);
        let narrow = GuardKey {
            uid: caller.uid,
            unit: caller.unit.clone(),
            scope: match req.source {
                Some(ip) => GuardScope::Source(guard_source(ip)),
                None => GuardScope::NoSource,
            },
        };
        let wide = GuardKey {
            uid: caller.uid,
            unit: caller.unit.clone(),
            scope: GuardScope::Caller,
        };
        let buckets = [(narrow, &self.guard_plan), (wide, &self.caller_guard_plan)];
        let wait = buckets
            .iter()
            .filter_map(|(k, plan)| self.guard.peek(k, plan, now))
            .filter(|d| !d.allowed)
            .map(|d| d.retry_after_secs())
            .max();
        if let Some(retry_after_secs) = wait {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(caller = %caller.actor, "api key verify throttled");
            return Err(ApiKeyError::Throttled { retry_after_secs });
        }
        let verdict = self.evaluate(req, now, may)?;
        match &verdict {
            Verdict::Valid(v) => {
                tracing::debug!(key_id = %v.id, owner = %v.owner, caller = %caller.actor, "api key verified");
            }
            Verdict::Invalid { reason, key_id } => {
                for (k, plan) in buckets {
                    self.guard.charge(k, plan, now);
                }
                tracing::info!(
                    reason = reason.as_str(),
                    key_id = key_id.as_deref().unwrap_or("-"),
                    key_last4 = %last4_of(req.key),
                    source = ?req.source,
                    caller = %caller.actor,
                    "api key verify refused"
                );
            }
        }
        Ok(verdict)
    }

    fn evaluate(
        &self,
        req: VerifyRequest<'_>,
        now: Duration,
        may: &dyn Fn(&str) -> bool,
    ) -> Result<Verdict, ApiKeyError> {
        let bad = |reason, key_id: Option<&str>| {
            Ok(Verdict::Invalid {
                reason,
                key_id: key_id.map(str::to_owned),
            })
        };
        let token = match ApiKeyToken::parse(req.key) {
            Ok(t) => t,
            Err(TokenError::Malformed) => return bad(InvalidReason::Malformed, None),
            Err(TokenError::BadChecksum) => return bad(InvalidReason::BadChecksum, None),
        };
        // Any prefix is looked up: the hash covers it, and keys issued
        // before a change of `apikeys.prefix` keep working.
        let hash = self.hash(&token)?;
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let Some(r) = self.record_by_hash(&hash)? else {
            return bad(InvalidReason::Unknown, None);
        };
        let id = r.id.as_str();
        let secs = now.as_secs();
        match r.state(secs) {
            KeyState::Revoked => return bad(InvalidReason::Revoked, Some(id)),
            KeyState::Expired => return bad(InvalidReason::Expired, Some(id)),
            KeyState::Active => {}
        }
        if !r.cidrs.is_empty() {
            let ok = req
                .source
                .is_some_and(|ip| r.cidrs.iter().any(|c| c.contains(ip)));
            if !ok {
                return bad(InvalidReason::WrongSource, Some(id));
            }
        }
        if !may(&r.owner) {
            return bad(InvalidReason::NotPermitted, Some(id));
        }
        let missing_scopes: Vec<String> = req
            .required_scopes
            .iter()
            .filter(|s| !r.scopes.contains(s))
            .cloned()
            .collect();
        let rate = match &r.plan {
            None => None,
            Some(name) => match self.cfg.plans.get(name) {
                Some(plan) => {
                    if req.dry_run {
                        self.limiter.peek(&r.lineage, plan, now)
                    } else {
                        self.limiter.check(r.lineage.clone(), plan, now)
                    }
                }
                None => {
                    // Fail closed: a key whose plan disappeared from the
                    // config is refused service until the plan is back.
                    tracing::error!(key_id = %id, plan = %name, "api key's rate plan is not configured; refusing (add the plan back to the config)");
                    Some(RateDecision {
                        allowed: false,
                        limit: 0,
                        remaining: 0,
                        reset: Duration::from_secs(60),
                        retry_after: Duration::from_secs(60),
                        window: Window::Minute,
                    })
                }
            },
        };
        Ok(Verdict::Valid(Verified {
            id: r.id.clone(),
            owner: r.owner.clone(),
            scopes: r.scopes.clone(),
            env: r.env.clone(),
            missing_scopes,
            rate,
        }))
    }
}

/// Inserts a new record with its indexes; refuses to overwrite anything.
fn insert_new(
    k: &TransactionalTree,
    h: &TransactionalTree,
    o: &TransactionalTree,
    r: &ApiKeyRecord,
) -> TxResult<()> {
    if k.get(r.id.as_bytes())?.is_some() || h.get(r.hash.0)?.is_some() {
        return abort(ApiKeyError::FailedPrecondition(
            "key id or hash collision; retry".into(),
        ));
    }
    tx_put(k, r)?;
    h.insert(&r.hash.0[..], r.id.as_bytes())?;
    o.insert(owner_key(&r.owner, &r.id), &[][..])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_roundtrip_and_shape() {
        let t = ApiKeyToken::generate("ks", "live").unwrap();
        let s = t.expose().to_owned();
        assert!(s.starts_with("ks_live_"));
        assert_eq!(s.len(), 8 + BODY_CHARS);
        let p = ApiKeyToken::parse(&s).unwrap();
        assert_eq!(p, t);
        assert_eq!(p.env(), "live");
        assert_eq!(p.prefix(), "ks");
        assert_eq!(p.last4(), &s[s.len() - 4..]);
        let dbg = format!("{p:?}");
        assert!(!dbg.contains(&s[8..s.len() - 4]), "{dbg}");
        assert!(dbg.ends_with(&format!("{})", p.last4())), "{dbg}");
    }

    #[test]
    fn every_single_typo_is_caught() {
        let t = ApiKeyToken::generate("ks", "test").unwrap();
        let s = t.expose().to_owned();
        let body_start = 8;
        for i in body_start..s.len() {
            for c in [b'0', b'a', b'Z', b'9'] {
                let mut b = s.clone().into_bytes();
                if b[i] == c {
                    continue;
                }
                b[i] = c;
                let typo = String::from_utf8(b).unwrap();
                assert_eq!(
                    ApiKeyToken::parse(&typo),
                    Err(TokenError::BadChecksum),
                    "position {i}"
                );
            }
        }
        // transposition of two different neighbours
        let mut b = s.clone().into_bytes();
        let i = (body_start..s.len() - 1)
            .find(|&i| b[i] != b[i + 1])
            .unwrap();
        b.swap(i, i + 1);
        assert_eq!(
            ApiKeyToken::parse(&String::from_utf8(b).unwrap()),
            Err(TokenError::BadChecksum)
        );
        // truncation, extension, bad characters, bad env/prefix
        assert_eq!(
            ApiKeyToken::parse(&s[..s.len() - 1]),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            ApiKeyToken::parse(&format!("{s}x")),
            Err(TokenError::Malformed)
        );
        let bad_char = format!("{}-{}", &s[..20], &s[21..]);
        assert_eq!(ApiKeyToken::parse(&bad_char), Err(TokenError::Malformed));
        assert_eq!(
            ApiKeyToken::parse(&s.replace("ks_test_", "ks_TEST_")),
            Err(TokenError::Malformed)
        );
        assert_eq!(ApiKeyToken::parse(""), Err(TokenError::Malformed));
        assert_eq!(ApiKeyToken::parse("ks_live_"), Err(TokenError::Malformed));
    }

    #[test]
    fn base62_fixed_width() {
        assert_eq!(&*base62_fixed(&[0; 4], 6), "000000");
        assert_eq!(&*base62_fixed(&[0, 0, 0, 61], 6), "00000z");
        assert_eq!(&*base62_fixed(&[0, 0, 0, 62], 6), "000010");
        assert_eq!(&*base62_fixed(&[0xff; 4], 6), "4gfFC3");
        assert_eq!(base62_fixed(&[0xff; 24], 33).len(), 33);
    }

    #[test]
    fn finder_finds_keys_and_look_alikes() {
        let k = ApiKeyToken::generate("ks", "live").unwrap();
        let s = k.expose();
        let mut typo = s.to_owned().into_bytes();
        typo[12] = if typo[12] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        let text = format!(
            "line one\nAPI_KEY={s}\n\"{typo}\" x\nks_foo and mks_live_{rest} and {s}x\n  key: '{s}'\n",
            rest = &s[8..]
        );
        let f = find_tokens(&text, "ks");
        assert_eq!(f.len(), 3, "{f:?}");
        assert_eq!((f[0].line, f[0].column), (2, 9));
        assert_eq!(f[0].token.as_ref().unwrap(), &k);
        assert_eq!(f[1].line, 3);
        assert_eq!(f[1].token, Err(TokenError::BadChecksum));
        assert_eq!(f[2].line, 5);
        assert!(f[2].token.is_ok());
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let h: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(h.to_string(), "192.0.2.7/32");
        assert!(h.contains("192.0.2.7".parse().unwrap()));
        assert!(!h.contains("192.0.2.8".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        assert!("10.1.0.0/8"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("10.0.0.0/8"));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }

    fn cfg(apikeys: &str, plans: &str) -> Result<ApiKeysConfig, String> {
        let raw: RawApiKeys = toml::from_str(apikeys).map_err(|e| e.to_string())?;
        let plans: BTreeMap<String, RawRatePlan> =
            toml::from_str(plans).map_err(|e| e.to_string())?;
        ApiKeysConfig::from_raw(raw, plans)
    }

    #[test]
    fn config_sections() {
        let c = cfg(
            "prefix = \"acme\"\nrotation_overlap = \"48h\"\nrotate_after_live = \"60d\"\ndefault_plan = \"free\"\nfailed_verifies_per_minute = 5",
            "[free]\nper_minute = 10\nper_day = 1000\nburst = 20\n[enterprise]\nper_minute = 1000\nburst = 2000",
        )
        .unwrap();
        assert_eq!(c.prefix, "acme");
        assert_eq!(c.rotation_overlap, Duration::from_secs(48 * 3600));
        assert_eq!(c.rotate_after_live, Duration::from_secs(60 * 86_400));
        assert_eq!(c.rotate_after_test, Duration::from_secs(30 * 86_400));
        assert_eq!(c.default_plan.as_deref(), Some("free"));
        assert_eq!(c.failed_verifies_per_minute, 5);
        assert_eq!(c.caller_failed_verifies_per_minute, 50);
        assert_eq!(c.plans.len(), 2);
        let d = cfg("", "").unwrap();
        assert_eq!(d.prefix, "ks");
        assert_eq!(d.rotation_overlap, Duration::from_secs(86_400));
        for (a, p, needle) in [
            ("prefix = \"KS\"", "", "apikeys.prefix"),
            (
                "rotation_overlap = \"1 day\"",
                "",
                "apikeys.rotation_overlap",
            ),
            ("default_plan = \"gold\"", "", "rate_plans.gold"),
            ("", "[unlimited]\nper_minute = 1", "reserved"),
            ("", "[free]\nburst = 3", "free"),
            ("", "[free]\nper_minute = 0", "per_minute"),
            ("typo = 1", "", "unknown field"),
            ("", "[free]\nper_hour = 1", "unknown field"),
        ] {
            let e = cfg(a, p).unwrap_err();
            assert!(e.contains(needle), "{a} / {p}: {e}");
        }
    }

    #[test]
    fn verify_request_debug_masks_the_key() {
        let t = ApiKeyToken::generate("ks", "live").unwrap();
        let k = t.expose();
        let r = VerifyRequest {
            key: k,
            source: None,
            required_scopes: &[],
            dry_run: false,
        };
        let d = format!("{r:?}");
        assert!(!d.contains(&k[8..k.len() - 4]), "{d}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(1_209_600)
        );
        for bad in ["", "h", "10", "5x", "1.5h", "-1h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(86_400 * 2 + 3600), "2d1h");
        assert_eq!(format_duration(48 * 3600), "2d");
        assert_eq!(format_duration(0), "0s");
    }
}
