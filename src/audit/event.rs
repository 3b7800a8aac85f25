//! Audit events and their canonical encoding (the bytes the Merkle leaves
//! hash and the lines of `events.jsonl`).
//!
//! Canonical encoding: one JSON object, keys sorted by byte value at every
//! level, no whitespace, absent optional fields omitted (never `null`),
//! integers in plain decimal, strings escaped as RFC 8785 (JCS) does (`"`,
//! `\` and U+0000–U+001F escaped — `\b \t \n \f \r` short forms, others
//! `\u00xx` lowercase —, everything else raw UTF-8). For this schema (ASCII
//! keys, integers below 2^53) the encoding is exactly RFC 8785. A line that
//! does not re-encode to itself is not canonical and is refused.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::PeerIdentity;

/// Version of the event schema written in every event (`"v"`).
pub const EVENT_SCHEMA: u32 = 1;

/// Longest accepted string field, in bytes.
pub const MAX_FIELD_LEN: usize = 4096;
/// Most entries in `detail`.
pub const MAX_DETAIL_ENTRIES: usize = 32;

/// How the caller was identified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// A local process known by the kernel (socket peer credentials).
    #[default]
    Peer,
    /// A caller known by a keyseal-issued API key.
    ApiKey,
    /// keyseald itself (lifecycle events, background work).
    Daemon,
}

/// Who did it. Fields are serialized in key order; absent ones are omitted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    pub kind: ActorKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl Actor {
    /// A socket peer, from its kernel identity.
    pub fn peer(id: &PeerIdentity) -> Actor {
        Actor {
            kind: ActorKind::Peer,
            uid: Some(id.uid),
            user: id.user.clone(),
            pid: id.pid,
            exe: id.exe.as_ref().map(|p| p.to_string_lossy().into_owned()),
            unit: id.unit.clone(),
            api_key_id: None,
        }
    }

    /// A caller identified by an API key (its id, never the key).
    pub fn api_key(id: impl Into<String>) -> Actor {
        Actor {
            kind: ActorKind::ApiKey,
            api_key_id: Some(id.into()),
            ..Actor::default()
        }
    }

    /// keyseald itself.
    pub fn daemon() -> Actor {
        Actor {
            kind: ActorKind::Daemon,
            ..Actor::default()
        }
    }
}

/// How the operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Refused by policy (or authentication).
    Denied,
    /// Failed for another reason (see `code`).
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "ok" => Some(Outcome::Ok),
            "denied" => Some(Outcome::Denied),
            "error" => Some(Outcome::Error),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One logged event. Field order is the key order of the canonical
/// encoding (checked by a test): do not reorder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    pub actor: Actor,
    /// gRPC status code name when `result` is not `ok` (e.g. `PERMISSION_DENIED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Extra facts (never secrets); keys `[a-z0-9_.]`, sorted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub detail: BTreeMap<String, String>,
    /// What was done, e.g. `secret.get`.
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub result: Outcome,
    /// Position in the log, from 1, no gaps.
    pub seq: u64,
    /// Name or id acted on; `hmac-sha256:<hex>` when the name is sensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Unix time in milliseconds; never decreases along the log.
    pub time: u64,
    /// Schema version ([`EVENT_SCHEMA`]).
    pub v: u32,
}

/// Why a line is not a valid event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    #[error("not a valid event: {0}")]
    Parse(String),
    #[error("not in canonical form (keys sorted, no whitespace, no nulls)")]
    NotCanonical,
    #[error("invalid event: {0}")]
    Invalid(String),
}

impl AuditEvent {
    /// The canonical encoding (no trailing newline).
    pub fn encode(&self) -> Result<Vec<u8>, EventError> {
        serde_json::to_vec(self).map_err(|e| EventError::Invalid(e.to_string()))
    }

    /// Parses one canonical line (without its newline) and checks that it is
    /// canonical.
    pub fn decode(line: &[u8]) -> Result<AuditEvent, EventError> {
        let ev: AuditEvent =
            serde_json::from_slice(line).map_err(|e| EventError::Parse(e.to_string()))?;
        if ev.encode()? != line {
            return Err(EventError::NotCanonical);
        }
        Ok(ev)
    }
}

/// An event as a caller hands it in: everything but the sequence number,
/// which the log assigns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// Unix time in milliseconds (the log raises it to the previous event's
    /// time if a concurrent caller's event got in first).
    pub time: u64,
    pub actor: Actor,
    pub op: String,
    pub target: Option<String>,
    pub result: Outcome,
    pub code: Option<String>,
    pub request_id: Option<String>,
    pub detail: BTreeMap<String, String>,
}

impl NewEvent {
    /// A successful `op` by `actor` at `time_ms`.
    pub fn new(time_ms: u64, actor: Actor, op: impl Into<String>) -> NewEvent {
        NewEvent {
            time: time_ms,
            actor,
            op: op.into(),
            target: None,
            result: Outcome::Ok,
            code: None,
            request_id: None,
            detail: BTreeMap::new(),
        }
    }

    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Sets the outcome and, unless it is `Ok`, the gRPC code name.
    pub fn outcome(mut self, result: Outcome, code: Option<&str>) -> Self {
        self.result = result;
        self.code = code.map(str::to_owned);
        self
    }

    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    pub fn detail(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.detail.insert(key.into(), value.into());
        self
    }

    /// Checks the limits: `op` is `[a-z0-9_.-]+`, detail keys `[a-z0-9_.]+`,
    /// strings at most [`MAX_FIELD_LEN`] bytes, at most
    /// [`MAX_DETAIL_ENTRIES`] details.
    pub fn validate(&self) -> Result<(), EventError> {
        fn name_ok(s: &str, extra: &[u8]) -> bool {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
        }
        if !name_ok(&self.op, b"_.-") {
            return Err(EventError::Invalid(format!(
                "op {:?} must be 1-64 characters of [a-z0-9_.-]",
                self.op
            )));
        }
        if self.detail.len() > MAX_DETAIL_ENTRIES {
            return Err(EventError::Invalid(format!(
                "more than {MAX_DETAIL_ENTRIES} detail entries"
            )));
        }
        for k in self.detail.keys() {
            if !name_ok(k, b"_.") {
                return Err(EventError::Invalid(format!(
                    "detail key {k:?} must be 1-64 characters of [a-z0-9_.]"
                )));
            }
        }
        let a = &self.actor;
        let strings = [
            self.target.as_deref(),
            self.code.as_deref(),
            self.request_id.as_deref(),
            a.api_key_id.as_deref(),
            a.exe.as_deref(),
            a.unit.as_deref(),
            a.user.as_deref(),
        ];
        if strings
            .into_iter()
            .flatten()
            .chain(self.detail.values().map(String::as_str))
            .any(|s| s.len() > MAX_FIELD_LEN)
        {
            return Err(EventError::Invalid(format!(
                "a field is longer than {MAX_FIELD_LEN} bytes"
            )));
        }
        Ok(())
    }

    /// The stored event at `seq` (with `time` as given).
    pub fn into_event(self, seq: u64) -> AuditEvent {
        AuditEvent {
            actor: self.actor,
            code: self.code,
            detail: self.detail,
            op: self.op,
            request_id: self.request_id,
            result: self.result,
            seq,
            target: self.target,
            time: self.time,
            v: EVENT_SCHEMA,
        }
    }
}

/// A filter for `query`: every field given must match.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Matches the actor's uid (decimal), user, unit, exe or API key id.
    pub actor: Option<String>,
    /// Exact op, or a prefix when it ends with `*` (`secret.*`).
    pub op: Option<String>,
    pub target: Option<String>,
    pub result: Option<Outcome>,
    /// Unix millis, inclusive.
    pub since: Option<u64>,
    /// Unix millis, inclusive.
    pub until: Option<u64>,
}

impl EventFilter {
    pub fn matches(&self, ev: &AuditEvent) -> bool {
        if let Some(a) = &self.actor {
            let x = &ev.actor;
            let hit = x.uid.map(|u| u.to_string()).as_deref() == Some(a.as_str())
                || x.user.as_deref() == Some(a)
                || x.unit.as_deref() == Some(a)
                || x.exe.as_deref() == Some(a)
                || x.api_key_id.as_deref() == Some(a);
            if !hit {
                return false;
            }
        }
        if let Some(op) = &self.op {
            let hit = match op.strip_suffix('*') {
                Some(prefix) => ev.op.starts_with(prefix),
                None => ev.op == *op,
            };
            if !hit {
                return false;
            }
        }
        if self.target.is_some() && ev.target != self.target {
            return false;
        }
        if self.result.is_some_and(|r| r != ev.result) {
            return false;
        }
        if self.since.is_some_and(|s| ev.time < s) || self.until.is_some_and(|u| ev.time > u) {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> AuditEvent {
        NewEvent::new(
            1_700_000_000_123,
            Actor {
                api_key_id: Some("k1".into()),
                exe: Some("/usr/bin/app \"q\"\n".into()),
                kind: ActorKind::Peer,
                pid: Some(42),
                uid: Some(1000),
                unit: Some("app.service".into()),
                user: Some("älice".into()),
            },
            "secret.get",
        )
        .target("db/password")
        .outcome(Outcome::Denied, Some("PERMISSION_DENIED"))
        .request_id("r-1")
        .detail("version", "3")
        .detail("cap", "read")
        .into_event(7)
    }

    #[test]
    fn keys_are_sorted_at_every_level() {
        let v: serde_json::Value = serde_json::from_slice(&full().encode().unwrap()).unwrap();
        fn check(v: &serde_json::Value, line: &str) {
            if let serde_json::Value::Object(m) = v {
                let keys: Vec<&String> = m.keys().collect();
                // Key order in the text equals sorted order.
                let mut pos: Vec<usize> = keys
                    .iter()
                    .map(|k| line.find(&format!("\"{k}\":")).unwrap())
                    .collect();
                let sorted = pos.clone();
                pos.sort();
                assert_eq!(pos, sorted);
                m.values().for_each(|x| check(x, line));
            }
        }
        let line = String::from_utf8(full().encode().unwrap()).unwrap();
        check(&v, &line);
        assert_eq!(
            line,
            "{\"actor\":{\"api_key_id\":\"k1\",\"exe\":\"/usr/bin/app \\\"q\\\"\\n\",\"kind\":\"peer\",\"pid\":42,\"uid\":1000,\"unit\":\"app.service\",\"user\":\"älice\"},\"code\":\"PERMISSION_DENIED\",\"detail\":{\"cap\":\"read\",\"version\":\"3\"},\"op\":\"secret.get\",\"request_id\":\"r-1\",\"result\":\"denied\",\"seq\":7,\"target\":\"db/password\",\"time\":1700000000123,\"v\":1}"
        );
    }

    #[test]
    fn minimal_event_omits_absent_fields() {
        let ev = NewEvent::new(5, Actor::daemon(), "daemon.start").into_event(1);
        assert_eq!(
            String::from_utf8(ev.encode().unwrap()).unwrap(),
            r#"{"actor":{"kind":"daemon"},"op":"daemon.start","result":"ok","seq":1,"time":5,"v":1}"#
        );
    }

    #[test]
    fn decode_round_trips_and_refuses_non_canonical() {
        let ev = full();
        let line = ev.encode().unwrap();
        assert_eq!(AuditEvent::decode(&line).unwrap(), ev);
        let spaced = String::from_utf8(line.clone())
            .unwrap()
            .replacen(":", ": ", 1);
        assert_eq!(
            AuditEvent::decode(spaced.as_bytes()),
            Err(EventError::NotCanonical)
        );
        let nulled = br#"{"actor":{"kind":"daemon"},"code":null,"op":"a","result":"ok","seq":1,"time":5,"v":1}"#;
        assert_eq!(AuditEvent::decode(nulled), Err(EventError::NotCanonical));
        let extra = br#"{"actor":{"kind":"daemon"},"op":"a","result":"ok","secret":"x","seq":1,"time":5,"v":1}"#;
        assert!(matches!(
            AuditEvent::decode(extra),
            Err(EventError::Parse(_))
        ));
    }

    #[test]
    fn validation() {
        let ok = NewEvent::new(1, Actor::daemon(), "secret.get");
        assert!(ok.validate().is_ok());
        assert!(NewEvent::new(1, Actor::daemon(), "Secret Get")
            .validate()
            .is_err());
        assert!(ok.clone().detail("Bad Key", "x").validate().is_err());
        assert!(ok
            .clone()
            .target("x".repeat(MAX_FIELD_LEN + 1))
            .validate()
            .is_err());
    }

    #[test]
    fn filter() {
        let ev = full();
        assert!(EventFilter::default().matches(&ev));
        let f = |f: EventFilter| f.matches(&ev);
        assert!(f(EventFilter {
            actor: Some("1000".into()),
            ..Default::default()
        }));
        assert!(f(EventFilter {
            actor: Some("app.service".into()),
            op: Some("secret.*".into()),
            result: Some(Outcome::Denied),
            ..Default::default()
        }));
        assert!(!f(EventFilter {
            op: Some("secret.put".into()),
            ..Default::default()
        }));
        assert!(!f(EventFilter {
            since: Some(1_700_000_000_124),
            ..Default::default()
        }));
    }
}
