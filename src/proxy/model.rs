//! The proxy model: targets, target credentials (sealed, egress-only),
//! proxies, rules, and the pure rule evaluation with its explanation.
//!
//! Persistence is in [`super::store`]; this file has the types, their
//! validation (parse, don't validate) and [`evaluate`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::{Attributes, PeerIdentity};

/// Longest name of a target, credential, proxy or rule id.
pub const MAX_NAME: usize = 64;
/// Rules per proxy.
pub const MAX_RULES: usize = 1000;
/// Largest compiled regex program (bytes), so a rule cannot exhaust memory.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Errors of the proxy model and store. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
}

impl From<crate::store::StoreError> for ProxyError {
    fn from(e: crate::store::StoreError) -> Self {
        ProxyError::Secrets(crate::secrets::SecretsError::Store(e))
    }
}

impl From<sled::Error> for ProxyError {
    fn from(e: sled::Error) -> Self {
        ProxyError::Secrets(crate::secrets::SecretsError::Store(e.into()))
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> ProxyError {
    ProxyError::InvalidArgument(msg.into())
}

/// Checks a name of a target, credential, proxy or rule: 1..=64 characters
/// of `[a-z0-9._-]`, starting with a letter or digit (so it is also a valid
/// policy name segment and a URL path segment).
pub fn check_name(what: &str, s: &str) -> Result<(), ProxyError> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} name {s:?} must be 1..={MAX_NAME} characters of [a-z0-9._-], starting with a letter or digit"
        )))
    }
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

/// An upstream: base URL, trust roots and timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    /// `https://host[:port][/base/path]`, normalised (no trailing `/`).
    pub base_url: String,
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_bundle: Option<String>,
    /// TCP connect timeout, milliseconds.
    pub connect_timeout_ms: u64,
    /// Time to the upstream's response headers, milliseconds.
    pub response_timeout_ms: u64,
    /// Idle pooled connections are closed after this, milliseconds.
    pub idle_timeout_ms: u64,
    pub created_at: u64,
    pub updated_at: u64,
    /// Client certificate chain (PEM) presented to the upstream (mTLS);
    /// its private key is sealed under the root (kind
    /// [`super::tls::CLIENT_KEY_KIND`], name = target name), never returned.
    pub client_cert: Option<String>,
}

/// A parsed base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// `""` or `/a/b` (no trailing slash).
    pub path: String,
}

impl BaseUrl {
    /// Parses `[https://]host[:port][/path]`. `http://` only with
    /// `allow_http` (plain text to the upstream is refused by default).
    pub fn parse(s: &str, allow_http: bool) -> Result<BaseUrl, ProxyError> {
        let s = s.trim();
        let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            if !allow_http {
                return Err(invalid(
                    "base URL is http://; upstreams are https (pass --allow-http to accept plain text)",
                ));
            }
            (false, r)
        } else if s.contains("://") {
            return Err(invalid("base URL scheme must be https"));
        } else {
            (true, s)
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(invalid(
                "base URL needs a host (and no user info), e.g. https://api.example.com",
            ));
        }
        if path.contains(['?', '#']) {
            return Err(invalid("base URL must not have a query or fragment"));
        }
        let auth: http::uri::Authority = authority
            .parse()
            .map_err(|_| invalid(format!("base URL host {authority:?} is not valid")))?;
        let host = auth.host();
        // `Authority` takes any port text (and `port_u16` is then `None`):
        // a port that is not a number must not quietly become the default.
        let default = if https { 443 } else { 80 };
        let port = match auth
            .as_str()
            .get(host.len()..)
            .and_then(|r| r.strip_prefix(':'))
        {
            None | Some("") => default,
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u16>()
                .map_err(|_| invalid(format!("base URL port {p:?} is not 0..=65535")))?,
            Some(p) => return Err(invalid(format!("base URL port {p:?} is not a number"))),
        };
        let host = match host.strip_prefix('[') {
            Some(v6) => {
                let v6 = v6.strip_suffix(']').unwrap_or(v6);
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(invalid(format!(
                        "base URL host {host:?} is not an IPv6 address"
                    )));
                }
                v6
            }
            None => host,
        };
        Ok(BaseUrl {
            https,
            host: host.to_ascii_lowercase(),
            port,
            path: path.trim_end_matches('/').to_owned(),
        })
    }

    /// The normalised text form.
    pub fn to_text(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            format!("{scheme}://{host}{}", self.path)
        } else {
            format!("{scheme}://{host}:{}{}", self.port, self.path)
        }
    }

    /// `host[:port]` for the `Host` header and the request URI.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl Target {
    pub fn base(&self) -> Result<BaseUrl, ProxyError> {
        BaseUrl::parse(&self.base_url, true)
    }
}

// ---------------------------------------------------------------------------
// Target credentials
// ---------------------------------------------------------------------------

/// How a credential is put on the upstream request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Injection {
    /// Header `name: template` with `{}` replaced by the secret.
    Header { name: String, template: String },
    /// `Authorization: Basic base64(user:secret)`.
    Basic { user: String },
    /// Query parameter `param=secret` (discouraged: URLs end up in logs).
    Query { param: String },
}

impl Injection {
    /// Parses a header recipe `Name: template` (the template must contain
    /// `{}` exactly once).
    pub fn header(spec: &str) -> Result<Injection, ProxyError> {
        let (name, template) = spec.split_once(':').ok_or_else(|| {
            invalid("header recipe must be `Name: template`, e.g. `Authorization: Bearer {}`")
        })?;
        let name = name.trim().to_ascii_lowercase();
        let template = template.trim().to_owned();
        http::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("{name:?} is not a valid header name")))?;
        if is_hop_by_hop(&name) || name == "host" || name == "content-length" {
            return Err(invalid(format!("cannot inject into header {name:?}")));
        }
        if template.matches("{}").count() != 1 {
            return Err(invalid("header template must contain `{}` exactly once"));
        }
        http::HeaderValue::from_str(&template.replace("{}", "x"))
            .map_err(|_| invalid("header template has characters not allowed in a header"))?;
        Ok(Injection::Header { name, template })
    }

    pub fn basic(user: &str) -> Result<Injection, ProxyError> {
        if user.contains(':') || user.chars().any(char::is_control) {
            return Err(invalid(
                "basic user must not contain ':' or control characters",
            ));
        }
        Ok(Injection::Basic {
            user: user.to_owned(),
        })
    }

    pub fn query(param: &str) -> Result<Injection, ProxyError> {
        if param.is_empty()
            || !param
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(invalid("query parameter must be [A-Za-z0-9_.-]+"));
        }
        Ok(Injection::Query {
            param: param.to_owned(),
        })
    }

    /// One line for listings (never the secret).
    pub fn describe(&self) -> String {
        match self {
            Injection::Header { name, template } => format!("header {name}: {template}"),
            Injection::Basic { user } => format!("basic user={user}"),
            Injection::Query { param } => format!("query {param}={{}} (discouraged)"),
        }
    }
}

/// A target credential's record. The value is sealed apart
/// ([`super::store::CRED_KIND`]) and never leaves the daemon except injected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub id: String,
    pub target: String,
    pub injection: Injection,
    pub created_at: u64,
    pub created_by: String,
    pub updated_at: u64,
}

// ---------------------------------------------------------------------------
// Proxies
// ---------------------------------------------------------------------------

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    pub fn parse(s: &str) -> Result<Effect, ProxyError> {
        match s {
            "allow" => Ok(Effect::Allow),
            "deny" | "" => Ok(Effect::Deny),
            o => Err(invalid(format!("effect {o:?}: use \"allow\" or \"deny\""))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }
}

/// A caller selector, as in the policy: every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerSelector {
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub gid: Option<u32>,
    pub group: Option<String>,
    pub unit: Option<String>,
    pub exe: Option<String>,
    pub exe_sha256: Option<String>,
}

impl CallerSelector {
    /// Parses `key=value[,key=value...]` with keys uid, user, gid, group,
    /// unit, exe, exe_sha256.
    pub fn parse(s: &str) -> Result<CallerSelector, ProxyError> {
        let mut c = CallerSelector::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| invalid(format!("caller selector {part:?} must be key=value")))?;
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| invalid(format!("{k}={v}: not a number")))
            };
            match k {
                "uid" => c.uid = Some(num(v)?),
                // (gid_t)-1 stands for "gid unknown" (loopback TCP callers).
                "gid" => {
                    let g = num(v)?;
                    if g == u32::MAX {
                        return Err(invalid(format!("gid={v}: not a valid gid")));
                    }
                    c.gid = Some(g);
                }
                "user" => c.user = Some(v.to_owned()),
                "group" => c.group = Some(v.to_owned()),
                "unit" => c.unit = Some(v.to_owned()),
                "exe" if v.starts_with('/') => c.exe = Some(v.to_owned()),
                "exe" => return Err(invalid("exe must be an absolute path")),
                "exe_sha256" if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    c.exe_sha256 = Some(v.to_ascii_lowercase())
                }
                "exe_sha256" => return Err(invalid("exe_sha256 must be 64 hex digits")),
                o => {
                    return Err(invalid(format!(
                        "unknown selector {o:?} (uid, user, gid, group, unit, exe, exe_sha256)"
                    )))
                }
            }
        }
        if c == CallerSelector::default() {
            return Err(invalid("a caller selector needs at least one key=value"));
        }
        Ok(c)
    }

    pub fn matches(&self, who: &PeerIdentity) -> bool {
        Attributes {
            uid: self.uid,
            user: self.user.as_deref(),
            gid: self.gid,
            group: self.group.as_deref(),
            unit: self.unit.as_deref(),
            exe: self.exe.as_deref().map(std::path::Path::new),
            exe_sha256: self.exe_sha256.as_deref(),
        }
        .matches(who)
    }
}

impl fmt::Display for CallerSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(v) = self.uid {
            parts.push(format!("uid={v}"));
        }
        if let Some(v) = &self.user {
            parts.push(format!("user={v}"));
        }
        if let Some(v) = self.gid {
            parts.push(format!("gid={v}"));
        }
        if let Some(v) = &self.group {
            parts.push(format!("group={v}"));
        }
        if let Some(v) = &self.unit {
            parts.push(format!("unit={v}"));
        }
        if let Some(v) = &self.exe {
            parts.push(format!("exe={v}"));
        }
        if let Some(v) = &self.exe_sha256 {
            parts.push(format!("exe_sha256={v}"));
        }
        f.write_str(&parts.join(","))
    }
}

/// A proxy: a target, the credential injected, rules' default, rate plan
/// and who may call it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proxy {
    pub name: String,
    pub target: String,
    /// `None`: nothing is injected.
    pub credential: Option<String>,
    pub default_effect: Effect,
    /// A `[rate_plans.NAME]` of the config, charged per caller.
    pub rate_plan: Option<String>,
    /// Kernel-identified callers (Unix socket) allowed.
    pub callers: Vec<CallerSelector>,
    /// API key ids allowed as proxy keys.
    pub key_ids: Vec<String>,
    /// API key owners whose keys are allowed as proxy keys.
    pub key_owners: Vec<String>,
    pub created_at: u64,
    pub updated_at: u64,
    /// What an anomaly of a caller does (see [`super::telemetry`]).
    pub on_anomaly: OnAnomaly,
}

/// What a proxy does when a caller's traffic is anomalous.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnAnomaly {
    /// Audit event and a flag in the telemetry bucket.
    #[default]
    Flag,
    /// As `Flag`, and the caller is refused on this proxy (403
    /// `suspended`) until an operator clears it.
    Suspend,
}

impl OnAnomaly {
    pub fn parse(s: &str) -> Result<OnAnomaly, ProxyError> {
        match s {
            "" | "flag" => Ok(OnAnomaly::Flag),
            "suspend" => Ok(OnAnomaly::Suspend),
            o => Err(invalid(format!(
                "on_anomaly {o:?}: use \"flag\" or \"suspend\""
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnAnomaly::Flag => "flag",
            OnAnomaly::Suspend => "suspend",
        }
    }
}

/// A proxy record as written before `on_anomaly` existed.
#[derive(Deserialize)]
struct ProxyV1 {
    name: String,
    target: String,
    credential: Option<String>,
    default_effect: Effect,
    rate_plan: Option<String>,
    callers: Vec<CallerSelector>,
    key_ids: Vec<String>,
    key_owners: Vec<String>,
    created_at: u64,
    updated_at: u64,
}

impl Proxy {
    /// Decodes a stored proxy, current layout or the one before
    /// `on_anomaly` (read as `flag`).
    pub fn decode(tree: &'static str, b: &[u8]) -> Result<Proxy, crate::store::StoreError> {
        match crate::store::decode::<Proxy>(tree, b) {
            Ok(p) => Ok(p),
            Err(e) => match crate::store::decode::<ProxyV1>(tree, b) {
                Ok(o) => Ok(Proxy {
                    name: o.name,
                    target: o.target,
                    credential: o.credential,
                    default_effect: o.default_effect,
                    rate_plan: o.rate_plan,
                    callers: o.callers,
                    key_ids: o.key_ids,
                    key_owners: o.key_owners,
                    created_at: o.created_at,
                    updated_at: o.updated_at,
                    on_anomaly: OnAnomaly::Flag,
                }),
                Err(_) => Err(e),
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------

/// A condition on a header or query parameter: the value must fully match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    pub name: String,
    pub regex: String,
}

/// One rule of a proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub proxy: String,
    pub id: String,
    /// Lowest first.
    pub priority: u32,
    pub effect: Effect,
    /// Upper-case methods; empty: any.
    pub methods: Vec<String>,
    /// Regex on the path (after `/p/<proxy>`), anchored at both ends.
    pub path: String,
    pub headers: Vec<Condition>,
    pub query: Vec<Condition>,
    pub notes: String,
    pub created_at: u64,
}

/// A compiled rule regex: regex-automata's meta engine with the same
/// syntax as the `regex` crate, but without a fully compiled DFA. The
/// `regex` crate builds one for small patterns (regex-automata's
/// `dfa-build` is on in this tree through tracing-subscriber), which made
/// a rule 1.1–6× slower to compile (release, e.g. 475 µs vs 79 µs for
/// `/v1/charges(/[a-z0-9_]+)?`) for no measurable gain per match (both
/// 30–230 ns against a request path); the lazy DFA serves matching.
type RuleRegex = regex_automata::meta::Regex;

fn compile(what: &str, re: &str) -> Result<RuleRegex, ProxyError> {
    regex_automata::meta::Builder::new()
        .configure(
            regex_automata::meta::Config::new()
                .dfa(false)
                .nfa_size_limit(Some(REGEX_SIZE_LIMIT)),
        )
        .build(&format!("^(?:{re})$"))
        .map_err(|e| {
            invalid(format!(
                "{what} regex {re:?}: {}",
                e.to_string().replace('\n', " ")
            ))
        })
}

/// A rule with its regexes compiled.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub rule: Rule,
    path: RuleRegex,
    headers: Vec<(String, RuleRegex)>,
    query: Vec<(String, RuleRegex)>,
}

impl CompiledRule {
    /// Validates and compiles a rule.
    pub fn new(mut rule: Rule) -> Result<CompiledRule, ProxyError> {
        check_name("rule", &rule.id)?;
        for m in rule.methods.iter_mut() {
            *m = m.to_ascii_uppercase();
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) || m.len() > 16 {
                return Err(invalid(format!("method {m:?} is not an HTTP method")));
            }
        }
        if rule.notes.len() > 1024 {
            return Err(invalid("notes are at most 1024 bytes"));
        }
        let path = compile("path", &rule.path)?;
        let mut headers = Vec::new();
        for c in rule.headers.iter_mut() {
            c.name = c.name.to_ascii_lowercase();
            http::header::HeaderName::from_bytes(c.name.as_bytes())
                .map_err(|_| invalid(format!("{:?} is not a header name", c.name)))?;
            headers.push((c.name.clone(), compile("header", &c.regex)?));
        }
        let mut query = Vec::new();
        for c in &rule.query {
            if c.name.is_empty() {
                return Err(invalid("query condition needs a parameter name"));
            }
            query.push((c.name.clone(), compile("query", &c.regex)?));
        }
        Ok(CompiledRule {
            rule,
            path,
            headers,
            query,
        })
    }

    /// The first condition of this rule the request fails, or `None` when
    /// the rule matches. Allocates nothing: the gateway asks this per rule
    /// per request.
    fn first_mismatch(&self, req: &RequestFacts<'_>) -> Option<Mismatch<'_>> {
        if !self.rule.methods.is_empty() && !self.rule.methods.iter().any(|m| m == req.method) {
            return Some(Mismatch::Method);
        }
        if !self.path.is_match(req.path) {
            return Some(Mismatch::Path);
        }
        for (name, re) in &self.headers {
            let ok = req
                .headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case(name) && re.is_match(v));
            if !ok {
                return Some(Mismatch::Header(name));
            }
        }
        for (name, re) in &self.query {
            let ok = query_pairs(req.query).any(|(k, v)| k == *name && re.is_match(&v));
            if !ok {
                return Some(Mismatch::Query(name));
            }
        }
        None
    }

    /// Why this rule does not match, in words, or `None` when it does.
    fn mismatch(&self, req: &RequestFacts<'_>) -> Option<String> {
        Some(match self.first_mismatch(req)? {
            Mismatch::Method => format!("method {} not in {:?}", req.method, self.rule.methods),
            Mismatch::Path => format!("path does not match {:?}", self.rule.path),
            Mismatch::Header(name) => format!("header {name} absent or not matching"),
            Mismatch::Query(name) => format!("query parameter {name} absent or not matching"),
        })
    }
}

/// The condition a request fails first (see `CompiledRule::first_mismatch`).
enum Mismatch<'r> {
    Method,
    Path,
    Header(&'r str),
    Query(&'r str),
}

/// Percent-decodes (lossy UTF-8); `+` is a space.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decoded `(name, value)` pairs of a query string.
pub fn query_pairs(q: Option<&str>) -> impl Iterator<Item = (String, String)> + '_ {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
}

/// What a rule sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// Starts with `/`.
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    pub query: Option<&'a str>,
}

/// How one rule fared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleTrace {
    pub id: String,
    pub priority: u32,
    pub effect: Effect,
    pub matched: bool,
    /// Why not, when it did not match.
    pub why_not: Option<String>,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explain {
    pub effect: Effect,
    /// The deciding rule; `None`: the proxy's default.
    pub rule: Option<String>,
    pub reason: String,
    /// Every rule in evaluation order, up to the deciding priority.
    pub trace: Vec<RuleTrace>,
}

/// Rules sorted for evaluation: priority ascending, deny before allow,
/// then id.
pub fn sort_rules(rules: &mut [CompiledRule]) {
    rules.sort_by(|a, b| {
        (a.rule.priority, a.rule.effect == Effect::Allow, &a.rule.id).cmp(&(
            b.rule.priority,
            b.rule.effect == Effect::Allow,
            &b.rule.id,
        ))
    });
}

/// Decides a request: the lowest priority that has a matching rule
/// decides; within it a matching deny wins over matching allows; no match
/// gives `default`. `rules` must be sorted with [`sort_rules`]. Pure.
pub fn evaluate(default: Effect, rules: &[CompiledRule], req: &RequestFacts<'_>) -> Explain {
    let mut trace = Vec::new();
    let mut decided: Option<&CompiledRule> = None;
    for r in rules {
        if let Some(d) = decided {
            if r.rule.priority != d.rule.priority {
                break;
            }
        }
        let why_not = r.mismatch(req);
        let matched = why_not.is_none();
        trace.push(RuleTrace {
            id: r.rule.id.clone(),
            priority: r.rule.priority,
            effect: r.rule.effect,
            matched,
            why_not,
        });
        if matched && decided.is_none() {
            // Sorted deny-first within a priority, so the first match of
            // the lowest matching priority is the winner.
            decided = Some(r);
        }
    }
    Explain {
        effect: decided.map_or(default, |r| r.rule.effect),
        rule: decided.map(|r| r.rule.id.clone()),
        reason: decision_reason(default, decided),
        trace,
    }
}

/// The rule that decides a request, or `None` for the proxy's default:
/// [`evaluate`]'s decision without its trace (no reasons formatted, no
/// allocation), for the gateway's per-request path. In sorted order the
/// first matching rule has the lowest matching priority and, denies coming
/// first within a priority, is a deny whenever one matches there.
pub fn decide<'r>(rules: &'r [CompiledRule], req: &RequestFacts<'_>) -> Option<&'r CompiledRule> {
    rules.iter().find(|r| r.first_mismatch(req).is_none())
}

/// [`Explain::reason`] for a decision by `rule` (or the default).
pub fn decision_reason(default: Effect, rule: Option<&CompiledRule>) -> String {
    match rule {
        Some(r) => format!(
            "rule {} (priority {}) matches: {}",
            r.rule.id,
            r.rule.priority,
            r.rule.effect.as_str()
        ),
        None => format!(
            "no rule matches: the proxy's default ({})",
            default.as_str()
        ),
    }
}

/// Header names that are hop-by-hop (RFC 9110 §7.6.1) and never forwarded.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Labels of a listing, sorted.
pub type Labels = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_minus_one_is_not_a_selector() {
        // It stands for "gid unknown" on loopback TCP callers.
        assert!(CallerSelector::parse("gid=4294967295").is_err());
        let mut tcp = PeerIdentity::new(0, u32::MAX);
        tcp.user = Some("root".into());
        assert!(CallerSelector::parse("gid=0")
            .unwrap()
            .matches(&PeerIdentity::new(0, 0)));
        assert!(!CallerSelector::parse("gid=0").unwrap().matches(&tcp));
        assert!(CallerSelector::parse("user=root").unwrap().matches(&tcp));
    }

    fn rule(id: &str, prio: u32, effect: Effect, methods: &[&str], path: &str) -> CompiledRule {
        CompiledRule::new(Rule {
            proxy: "p".into(),
            id: id.into(),
            priority: prio,
            effect,
            methods: methods.iter().map(|m| m.to_string()).collect(),
            path: path.into(),
            headers: vec![],
            query: vec![],
            notes: String::new(),
            created_at: 0,
        })
        .unwrap()
    }

    #[test]
    fn decide_agrees_with_evaluate() {
        let mut rules = vec![
            rule("a-allow", 10, Effect::Allow, &["GET"], "/v1/.*"),
            rule("a-deny", 10, Effect::Deny, &[], "/v1/admin/.*"),
            rule("b-allow", 5, Effect::Allow, &["POST"], "/v1/charges"),
            rule("c-deny", 20, Effect::Deny, &[], ".*"),
        ];
        sort_rules(&mut rules);
        for (m, p) in [
            ("GET", "/v1/x"),
            ("GET", "/v1/admin/x"),
            ("POST", "/v1/charges"),
            ("POST", "/v1/x"),
            ("DELETE", "/other"),
        ] {
            for default in [Effect::Allow, Effect::Deny] {
                let ex = evaluate(default, &rules, &facts(m, p));
                let won = decide(&rules, &facts(m, p));
                assert_eq!(won.map(|r| r.rule.id.clone()), ex.rule, "{m} {p}");
                assert_eq!(won.map_or(default, |r| r.rule.effect), ex.effect);
                assert_eq!(decision_reason(default, won), ex.reason);
            }
        }
        assert_eq!(decide(&[], &facts("GET", "/")).map(|r| &r.rule.id), None);
    }

    #[test]
    fn rule_regexes_are_anchored_unicode_and_bounded() {
        let r = rule(
            "r1",
            1,
            Effect::Allow,
            &[],
            "/v1/(charges|refunds)/[a-z0-9_]+",
        );
        let decide = |path| evaluate(Effect::Deny, std::slice::from_ref(&r), &facts("GET", path));
        assert_eq!(decide("/v1/charges/ch_1").effect, Effect::Allow);
        // Anchored at both ends: no match on a prefix or a suffix.
        assert_eq!(decide("/v1/charges/ch_1/x").effect, Effect::Deny);
        assert_eq!(decide("/x/v1/charges/ch_1").effect, Effect::Deny);
        // The `regex` crate's syntax: Unicode classes, `|` kept inside.
        let u = rule("r2", 1, Effect::Allow, &[], r"/\w+|/admin");
        let ok =
            |path| evaluate(Effect::Deny, std::slice::from_ref(&u), &facts("GET", path)).effect;
        assert_eq!(ok("/grüße"), Effect::Allow);
        assert_eq!(ok("/admin"), Effect::Allow);
        assert_eq!(ok("/a/b"), Effect::Deny);
        let bad = |path: &str| {
            CompiledRule::new(Rule {
                path: path.into(),
                ..r.rule.clone()
            })
            .unwrap_err()
            .to_string()
        };
        let e = bad("(unclosed");
        assert!(
            e.contains("path regex \"(unclosed\"") && !e.contains('\n'),
            "{e}"
        );
        // Over the compiled-size bound: refused, not built.
        let e = bad(r"\w{1000}\w{1000}");
        assert!(e.contains("path regex"), "{e}");
    }

    fn facts<'a>(method: &'a str, path: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            method,
            path,
            headers: &[],
            query: None,
        }
    }

    #[test]
    fn matrix() {
        let mut rules = vec![
            rule("allow-get", 10, Effect::Allow, &["GET"], "/v1/.*"),
            rule("deny-admin", 10, Effect::Deny, &[], "/v1/admin.*"),
            rule("allow-admin-early", 20, Effect::Allow, &[], "/v1/admin/ok"),
            rule("allow-post", 5, Effect::Allow, &["post"], "/v1/items"),
        ];
        sort_rules(&mut rules);
        let e = evaluate(Effect::Deny, &rules, &facts("GET", "/v1/x"));
        assert_eq!(
            (e.effect, e.rule.as_deref()),
            (Effect::Allow, Some("allow-get"))
        );
        // deny wins at equal priority
        let e = evaluate(Effect::Deny, &rules, &facts("GET", "/v1/admin/ok"));
        assert_eq!(
            (e.effect, e.rule.as_deref()),
            (Effect::Deny, Some("deny-admin"))
        );
        // lower priority decides first
        let e = evaluate(Effect::Deny, &rules, &facts("POST", "/v1/items"));
        assert_eq!(
            (e.effect, e.rule.as_deref()),
            (Effect::Allow, Some("allow-post"))
        );
        // default
        let e = evaluate(Effect::Deny, &rules, &facts("PUT", "/v2"));
        assert_eq!((e.effect, e.rule), (Effect::Deny, None));
        let e = evaluate(Effect::Allow, &rules, &facts("PUT", "/v2"));
        assert_eq!(e.effect, Effect::Allow);
        // anchored
        let e = evaluate(Effect::Deny, &rules, &facts("GET", "/x/v1/y"));
        assert_eq!(e.rule, None);
    }

    #[test]
    fn conditions() {
        let mut r = rule("h", 1, Effect::Allow, &[], "/.*");
        r = CompiledRule::new(Rule {
            headers: vec![Condition {
                name: "X-Tenant".into(),
                regex: "a|b".into(),
            }],
            query: vec![Condition {
                name: "q".into(),
                regex: "[0-9]+".into(),
            }],
            ..r.rule
        })
        .unwrap();
        let h = vec![("x-tenant".to_string(), "a".to_string())];
        let f = RequestFacts {
            method: "GET",
            path: "/",
            headers: &h,
            query: Some("q=12&z=1"),
        };
        assert_eq!(
            evaluate(Effect::Deny, &[r.clone()], &f).effect,
            Effect::Allow
        );
        let f2 = RequestFacts {
            query: Some("q=x"),
            ..f
        };
        assert_eq!(evaluate(Effect::Deny, &[r], &f2).effect, Effect::Deny);
    }

    #[test]
    fn base_url() {
        let b = BaseUrl::parse("api.example.com/v1/", false).unwrap();
        assert_eq!(b.to_text(), "https://api.example.com/v1");
        assert!(BaseUrl::parse("http://x", false).is_err());
        let b = BaseUrl::parse("https://127.0.0.1:8443", false).unwrap();
        assert_eq!((b.port, b.authority()), (8443, "127.0.0.1:8443".into()));
        let b = BaseUrl::parse("https://[::1]:8443/x", false).unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 8443));
        assert_eq!(BaseUrl::parse("https://h:/x", false).unwrap().port, 443);
    }

    /// Found by the `proxy_request` fuzz target: `Authority` parses any
    /// port text, and a port that was not a number became the default
    /// one (`https://api.example.com:8443x` was port 443), and a bracketed
    /// host that is not an IPv6 address was taken as a name.
    #[test]
    fn base_url_ports_are_numbers_and_brackets_ipv6() {
        for bad in [
            "https://api.example.com:8443x",
            "https://api.example.com:abc/v1",
            "https://api.example.com:70000",
            "http://[*:1]:80",
            "https://[api.example.com]",
        ] {
            assert!(BaseUrl::parse(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn injection_recipes() {
        assert!(Injection::header("Authorization: Bearer {}").is_ok());
        assert!(Injection::header("x-api-key {}").is_err());
        assert!(Injection::header("connection: {}").is_err());
        assert!(Injection::header("x: {} {}").is_err());
        assert!(Injection::query("api_key").is_ok());
        assert!(Injection::basic("a:b").is_err());
    }

    #[test]
    fn proxy_record_before_on_anomaly_still_reads() {
        #[derive(Serialize)]
        struct Old<'a> {
            name: &'a str,
            target: &'a str,
            credential: Option<&'a str>,
            default_effect: Effect,
            rate_plan: Option<&'a str>,
            callers: Vec<CallerSelector>,
            key_ids: Vec<&'a str>,
            key_owners: Vec<&'a str>,
            created_at: u64,
            updated_at: u64,
        }
        let b = crate::store::encode(&Old {
            name: "p",
            target: "t",
            credential: None,
            default_effect: Effect::Allow,
            rate_plan: Some("r"),
            callers: vec![],
            key_ids: vec!["ak_1"],
            key_owners: vec![],
            created_at: 1,
            updated_at: 2,
        })
        .unwrap();
        let p = Proxy::decode("t", &b).unwrap();
        assert_eq!(
            (
                p.name.as_str(),
                p.rate_plan.as_deref(),
                p.updated_at,
                p.on_anomaly
            ),
            ("p", Some("r"), 2, OnAnomaly::Flag)
        );
        let mut n = p.clone();
        n.on_anomaly = OnAnomaly::Suspend;
        let again = Proxy::decode("t", &crate::store::encode(&n).unwrap()).unwrap();
        assert_eq!(again, n);
        assert!(Proxy::decode("t", b"\x01").is_err());
    }

    #[test]
    fn decode() {
        assert_eq!(percent_decode("a%2Fb+c%zz"), "a/b c%zz");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
