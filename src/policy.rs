//! Access policy: a declarative TOML file of rules, default deny.
//!
//! A rule grants capabilities on name patterns to the callers that match
//! *all* of its selectors. A request is allowed when at least one rule
//! grants it; nothing is allowed otherwise (an empty file, or
//! [`Policy::empty`], denies everything). Rules only grant: there are no
//! deny rules, so their order matters only for which rule an explanation
//! names (the first that grants).
//!
//! ```toml
//! # Rules grant capabilities on name globs to callers matching ALL selectors.
//! [[rule]]
//! name = "app-a reads its secrets"        # required, unique; shown in explanations
//! capabilities = ["secret:read"]
//! names = ["app/a/*", "shared/**"]
//! [rule.match]                            # at least one selector is required
//! user = "svc-a"                          # user name of the caller's uid
//! # uid = 1001
//! # group = "keyseal-readers"             # primary or supplementary group name
//! # gid = 1000                            # primary or supplementary gid
//! # unit = "app-a.service"                # systemd *system* unit (.service or .scope)
//! # exe = "/usr/bin/app-a"                # absolute path of the executable
//! # exe_sha256 = "ab12..."                # SHA-256 of the executable (64 hex digits)
//!
//! [[rule]]
//! name = "ops can write everything"
//! capabilities = ["secret:read", "secret:write", "secret:delete"]
//! names = ["**"]
//! [rule.match]
//! group = "keyseal-admin"
//!
//! # System capabilities are not scoped to names: such a rule has no `names`.
//! [[rule]]
//! name = "ops administer the daemon"
//! capabilities = ["system:admin", "audit:read"]
//! [rule.match]
//! group = "keyseal-admin"
//!
//! [[rule]]
//! name = "anyone may verify API keys"
//! capabilities = ["apikey:verify"]
//! names = ["**"]
//! [rule.match]
//! any = true                              # matches every caller; must stand alone
//!
//! # systemd LoadCredential mapping: (unit, credential id) -> secret name.
//! # The entry itself is the grant for the LoadCredential socket.
//! [[credential]]
//! unit = "app-a.service"
//! id = "db-password"
//! secret = "app/a/db-password"
//! ```
//!
//! # Capabilities
//!
//! `secret:read`, `secret:write`, `secret:delete`, `secret:destroy`,
//! `key:sign`, `key:admin`, `apikey:verify`, `apikey:admin`, `proxy:use`,
//! `proxy:admin` are scoped to names and need `names`. `system:admin`,
//! `audit:read` and `audit:prune` are *system* capabilities: they concern the daemon as a
//! whole, a rule granting them must not have `names`, and it may not mix
//! them with name-scoped capabilities (split such a rule in two).
//! [`Policy::check`] ignores the name for them.
//!
//! # Name patterns
//!
//! Patterns are `/`-separated like names. In a segment, `*` matches any run
//! of characters (never `/`) and `?` exactly one; a segment that is exactly
//! `**` matches zero or more whole segments. Everything else is literal.
//! So `app/a/*` matches `app/a/x` but not `app/a/x/y`; `app/**` matches
//! `app`, `app/x` and `app/x/y` (use `app/*/**` for strictly below `app`);
//! `**` matches every name. `**` inside a segment (`app/a**`) is refused,
//! as are empty segments and characters outside `[A-Za-z0-9._-*?]`.
//! Matching is linear-time in practice (no backtracking blow-up).
//!
//! # Selectors
//!
//! A rule matches a caller when every selector given matches. `unit` only
//! matches system units: units of a user's own systemd (`user@UID.service`)
//! are named by that user and never match. `any = true` matches every
//! caller and cannot be combined with other selectors; there is no implicit
//! match-all (a rule without selectors is refused).
//!
//! # Errors
//!
//! Loading fails with a [`PolicyError`] that names the rule (1-based index,
//! name and line) and the key, and says how to fix it; TOML syntax errors
//! carry line and column. [`PolicyHandle::reload_from`] keeps the old policy
//! when the new file is invalid.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use parking_lot::RwLock;
use serde::Deserialize;

use crate::identity::{Attributes, PeerIdentity};
use crate::name::{NameError, SecretName};

/// Largest policy file accepted by [`Policy::load`].
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Capabilities
// ---------------------------------------------------------------------------

/// What a rule can grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    SecretRead,
    SecretWrite,
    SecretDelete,
    SecretDestroy,
    SystemAdmin,
    AuditRead,
    KeySign,
    KeyAdmin,
    ApiKeyVerify,
    ApiKeyAdmin,
    ProxyUse,
    ProxyAdmin,
    AuditPrune,
}

impl Capability {
    /// Every capability, in documentation order.
    pub const ALL: [Capability; 13] = [
        Capability::SecretRead,
        Capability::SecretWrite,
        Capability::SecretDelete,
        Capability::SecretDestroy,
        Capability::SystemAdmin,
        Capability::AuditRead,
        Capability::AuditPrune,
        Capability::KeySign,
        Capability::KeyAdmin,
        Capability::ApiKeyVerify,
        Capability::ApiKeyAdmin,
        Capability::ProxyUse,
        Capability::ProxyAdmin,
    ];

    /// The policy-file spelling, e.g. `secret:read`.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::SecretRead => "secret:read",
            Capability::SecretWrite => "secret:write",
            Capability::SecretDelete => "secret:delete",
            Capability::SecretDestroy => "secret:destroy",
            Capability::SystemAdmin => "system:admin",
            Capability::AuditRead => "audit:read",
            Capability::AuditPrune => "audit:prune",
            Capability::KeySign => "key:sign",
            Capability::KeyAdmin => "key:admin",
            Capability::ApiKeyVerify => "apikey:verify",
            Capability::ApiKeyAdmin => "apikey:admin",
            Capability::ProxyUse => "proxy:use",
            Capability::ProxyAdmin => "proxy:admin",
        }
    }

    /// True for capabilities on the daemon as a whole (`system:admin`,
    /// `audit:read`, `audit:prune`), which are not scoped to names.
    pub fn is_system(self) -> bool {
        matches!(
            self,
            Capability::SystemAdmin | Capability::AuditRead | Capability::AuditPrune
        )
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A capability string that is not one of [`Capability::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown capability {0:?} (valid: {valid})", valid = valid_capabilities())]
pub struct UnknownCapability(pub String);

fn valid_capabilities() -> String {
    Capability::ALL
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCapability(s.to_owned()))
    }
}

/// The message for a denied request. It is computed from the request alone,
/// before any lookup, so it never reveals whether `name` exists.
pub fn denial_message(cap: Capability, name: &str) -> String {
    if cap.is_system() {
        format!("permission denied: missing capability {cap}")
    } else {
        format!("permission denied: missing capability {cap} on {name:?}")
    }
}

// ---------------------------------------------------------------------------
// Globs
// ---------------------------------------------------------------------------

/// Longest accepted name pattern, in bytes.
pub const MAX_GLOB_LEN: usize = 1024;

/// A validated name pattern (see the module documentation for the syntax).
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    segs: Vec<Seg>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    /// `**`: zero or more whole segments.
    AnyDepth,
    /// A segment pattern with `*` and `?`.
    Pattern(Box<[u8]>),
}

/// Why a name pattern was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GlobError {
    #[error("pattern is empty; write \"**\" to match every name")]
    Empty,
    #[error("pattern is longer than {MAX_GLOB_LEN} bytes")]
    TooLong,
    #[error(
        "pattern has an empty segment (leading, trailing or doubled '/'); remove the extra '/'"
    )]
    EmptySegment,
    #[error(
        "`**` must be a whole segment (segment {0}); use `*` within a segment, or put `**` between slashes"
    )]
    PartialDoubleStar(usize),
    #[error("pattern has a character outside [A-Za-z0-9._-/*?] at byte {0}")]
    BadChar(usize),
}

impl Glob {
    /// Parses and validates a name pattern.
    pub fn parse(pattern: &str) -> Result<Glob, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.len() > MAX_GLOB_LEN {
            return Err(GlobError::TooLong);
        }
        if let Some(pos) = pattern.bytes().position(|b| {
            !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b'*' | b'?'))
        }) {
            return Err(GlobError::BadChar(pos));
        }
        let mut segs = Vec::new();
        for (i, seg) in pattern.split('/').enumerate() {
            if seg.is_empty() {
                return Err(GlobError::EmptySegment);
            }
            if seg == "**" {
                // `a/**/**/b` is the same as `a/**/b`.
                if segs.last() != Some(&Seg::AnyDepth) {
                    segs.push(Seg::AnyDepth);
                }
            } else if seg.contains("**") {
                return Err(GlobError::PartialDoubleStar(i + 1));
            } else {
                segs.push(Seg::Pattern(seg.as_bytes().into()));
            }
        }
        Ok(Glob {
            text: pattern.to_owned(),
            segs,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when `name` matches. Total: any string is accepted (names are
    /// compared bytewise, segments split on `/`). Runs in O(pattern × name)
    /// steps at worst: no backtracking explosion.
    pub fn matches(&self, name: &str) -> bool {
        let segs: Vec<&[u8]> = name.split('/').map(str::as_bytes).collect();
        wildcard_match(
            &self.segs,
            &segs,
            |p| matches!(p, Seg::AnyDepth),
            |p, n| match p {
                Seg::AnyDepth => false,
                Seg::Pattern(pat) => segment_match(pat, n),
            },
        )
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.text)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Matches one segment pattern (`*`, `?`, literals) against one segment.
fn segment_match(pat: &[u8], name: &[u8]) -> bool {
    wildcard_match(pat, name, |p| *p == b'*', |p, n| *p == b'?' || p == n)
}

/// The classic iterative wildcard matcher over any element type: `is_star`
/// elements match any run of elements, others match one element when `one`
/// says so. Only the most recent star is ever retried, which is enough
/// because a later star can absorb anything an earlier one could; the work
/// is bounded by `pattern.len() * text.len()` calls to `one`.
fn wildcard_match<P, T>(
    pattern: &[P],
    text: &[T],
    is_star: impl Fn(&P) -> bool,
    one: impl Fn(&P, &T) -> bool,
) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    // (pattern index after the last star, text index the star resumes at)
    let mut retry: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(pe) if is_star(pe) => {
                p += 1;
                retry = Some((p, t));
                continue;
            }
            Some(pe) if one(pe, &text[t]) => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match retry {
            Some((rp, rt)) => {
                p = rp;
                t = rt + 1;
                retry = Some((rp, rt + 1));
            }
            None => return false,
        }
    }
    pattern.get(p..).unwrap_or(&[]).iter().all(is_star)
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a policy was refused. Messages name the rule and the key and say
/// what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("cannot read policy file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("policy file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("policy file {} is larger than {MAX_POLICY_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error(
        "policy file {} is writable by group or others (mode {mode:04o}); fix: chmod go-w {}",
        path.display(),
        path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "policy file {} is owned by uid {owner}, not by root or the daemon's uid {daemon}; fix: chown root {}",
        path.display(),
        path.display()
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        daemon: u32,
    },
    /// A parse error of the file at `path`.
    #[error("policy file {}: {error}", path.display())]
    InFile {
        path: PathBuf,
        error: Box<PolicyError>,
    },
    /// Not valid TOML, or a wrong top-level key; the message has line and column.
    #[error("policy is not valid: {0}")]
    Syntax(toml::de::Error),
    #[error("rule {index} ({}) at line {line}: {problem}", name.as_deref().map_or_else(|| "no name".to_owned(), |n| format!("{n:?}")))]
    Rule {
        index: usize,
        name: Option<String>,
        line: usize,
        problem: RuleProblem,
    },
    #[error("credential {index} at line {line}: {problem}")]
    Credential {
        index: usize,
        line: usize,
        problem: CredentialProblem,
    },
}

/// What is wrong with one `[[rule]]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleProblem {
    /// Unknown, missing or mistyped key (the message names it).
    #[error("{0}")]
    Shape(String),
    #[error("`name` is empty; give the rule a short description")]
    EmptyName,
    #[error("`name` is already used by rule {first}; rule names must be unique")]
    DuplicateName { first: usize },
    #[error("`capabilities` is empty; list at least one, e.g. [\"secret:read\"]")]
    NoCapabilities,
    #[error("in `capabilities`: {0}")]
    UnknownCapability(UnknownCapability),
    #[error(
        "`capabilities` mixes {system}, which is not scoped to names, with {scoped}; split this into two rules"
    )]
    MixedCapabilities {
        system: Capability,
        scoped: Capability,
    },
    #[error(
        "`names` is missing or empty but {cap} is scoped to names; add e.g. names = [\"app/**\"]"
    )]
    NamesRequired { cap: Capability },
    #[error("`names` has no meaning for {cap}, which is not scoped to names; remove `names` from this rule")]
    NamesNotAllowed { cap: Capability },
    #[error("`names` entry {pattern:?}: {error}")]
    BadGlob { pattern: String, error: GlobError },
    #[error(
        "no selector: add a [rule.match] table with at least one of user, uid, group, gid, unit, exe, exe_sha256 (or `any = true` to match every caller)"
    )]
    NoSelector,
    #[error(
        "`match.any = true` cannot be combined with other selectors; remove `any` or the others"
    )]
    AnyWithOthers,
    #[error("`match.any = false` means nothing; remove it")]
    AnyFalse,
    #[error("`match.{key}`: {problem}")]
    BadSelector { key: &'static str, problem: String },
}

/// What is wrong with one `[[credential]]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialProblem {
    /// Unknown, missing or mistyped key (the message names it).
    #[error("{0}")]
    Shape(String),
    #[error("`unit` {0:?} is not a service name; write e.g. \"app-a.service\"")]
    BadUnit(String),
    #[error(
        "`id` {0:?} is not a credential name; use 1 to 255 characters, no '/', not \".\" or \"..\""
    )]
    BadId(String),
    #[error("`secret` {secret:?} is not a valid secret name: {error}")]
    BadSecret { secret: String, error: NameError },
    #[error("unit {unit:?} id {id:?} is already mapped by credential {first}; keep one")]
    Duplicate {
        unit: String,
        id: String,
        first: usize,
    },
}

// ---------------------------------------------------------------------------
// Raw file format
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    rule: Vec<toml::Spanned<toml::Table>>,
    #[serde(default)]
    credential: Vec<toml::Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    capabilities: Vec<String>,
    #[serde(default)]
    names: Vec<String>,
    #[serde(rename = "match", default)]
    selectors: RawMatch,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    any: Option<bool>,
    user: Option<String>,
    uid: Option<u32>,
    group: Option<String>,
    gid: Option<u32>,
    unit: Option<String>,
    exe: Option<PathBuf>,
    exe_sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    unit: String,
    id: String,
    secret: String,
}

/// A serde error from a `toml::Value`, on one line.
fn shape(e: toml::de::Error) -> String {
    e.to_string().trim().replace('\n', " ")
}

// ---------------------------------------------------------------------------
// Typed policy
// ---------------------------------------------------------------------------

/// A loaded, validated policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    /// unit -> credential id -> secret
    credentials: HashMap<String, HashMap<String, SecretName>>,
}

#[derive(Clone, Debug)]
struct Rule {
    name: String,
    caps: u16,
    names: Vec<Glob>,
    selector: Selector,
}

/// Selectors of one rule; `None` fields are not checked.
#[derive(Clone, Debug, Default)]
struct Selector {
    any: bool,
    user: Option<String>,
    uid: Option<u32>,
    group: Option<String>,
    gid: Option<u32>,
    unit: Option<String>,
    exe: Option<PathBuf>,
    exe_sha256: Option<String>,
}

impl Selector {
    fn matches(&self, who: &PeerIdentity) -> bool {
        self.any
            || Attributes {
                uid: self.uid,
                user: self.user.as_deref(),
                gid: self.gid,
                group: self.group.as_deref(),
                unit: self.unit.as_deref(),
                exe: self.exe.as_deref(),
                exe_sha256: self.exe_sha256.as_deref(),
            }
            .matches(who)
    }
}

/// The answer of [`Policy::check`].
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Name of the granting rule (the first in file order), when allowed.
    pub rule: Option<String>,
}

impl Policy {
    /// The policy that denies everything.
    pub fn empty() -> Policy {
        Policy::default()
    }

    /// Parses and validates policy text.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(PolicyError::Syntax)?;
        let line_of = |span: std::ops::Range<usize>| {
            1 + text.as_bytes()[..span.start.min(text.len())]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
        };

        let mut rules: Vec<Rule> = Vec::with_capacity(raw.rule.len());
        for (i, spanned) in raw.rule.into_iter().enumerate() {
            let line = line_of(spanned.span());
            let table = spanned.into_inner();
            let label_name = table
                .get("name")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            let err = |problem| PolicyError::Rule {
                index: i + 1,
                name: label_name.clone(),
                line,
                problem,
            };
            let raw_rule: RawRule = toml::Value::Table(table)
                .try_into()
                .map_err(|e| err(RuleProblem::Shape(shape(e))))?;
            if let Some(first) = rules.iter().position(|r| r.name == raw_rule.name) {
                return Err(err(RuleProblem::DuplicateName { first: first + 1 }));
            }
            rules.push(resolve_rule(raw_rule).map_err(err)?);
        }

        let mut credentials: HashMap<String, HashMap<String, SecretName>> = HashMap::new();
        let mut first_seen: HashMap<(String, String), usize> = HashMap::new();
        for (i, spanned) in raw.credential.into_iter().enumerate() {
            let line = line_of(spanned.span());
            let err = |problem| PolicyError::Credential {
                index: i + 1,
                line,
                problem,
            };
            let c: RawCredential = toml::Value::Table(spanned.into_inner())
                .try_into()
                .map_err(|e| err(CredentialProblem::Shape(shape(e))))?;
            if !is_unit_name(&c.unit, &[".service"]) {
                return Err(err(CredentialProblem::BadUnit(c.unit)));
            }
            if c.id.is_empty()
                || c.id.len() > 255
                || c.id.contains('/')
                || c.id == "."
                || c.id == ".."
            {
                return Err(err(CredentialProblem::BadId(c.id)));
            }
            let secret = SecretName::parse(&c.secret).map_err(|error| {
                err(CredentialProblem::BadSecret {
                    secret: c.secret.clone(),
                    error,
                })
            })?;
            let key = (c.unit.clone(), c.id.clone());
            if let Some(first) = first_seen.get(&key) {
                return Err(err(CredentialProblem::Duplicate {
                    unit: c.unit,
                    id: c.id,
                    first: *first,
                }));
            }
            first_seen.insert(key, i + 1);
            credentials.entry(c.unit).or_default().insert(c.id, secret);
        }

        Ok(Policy { rules, credentials })
    }

    /// Reads and parses the policy file at `path`. Refuses a file that is
    /// not regular, is writable by group or others, is owned by someone
    /// other than root or the daemon's user, or is over [`MAX_POLICY_BYTES`].
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let io_err = |source| PolicyError::Io {
            path: path.to_owned(),
            source,
        };
        use crate::smallfile::{open_regular, read_bounded, SmallFileError};
        let small_err = |e| match e {
            SmallFileError::Io(source) => io_err(source),
            SmallFileError::NotAFile => PolicyError::NotAFile {
                path: path.to_owned(),
            },
            SmallFileError::TooLarge => PolicyError::TooLarge {
                path: path.to_owned(),
            },
        };
        let (file, meta) = open_regular(path).map_err(small_err)?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(PolicyError::Writable {
                path: path.to_owned(),
                mode,
            });
        }
        let daemon = nix::unistd::geteuid().as_raw();
        if meta.uid() != 0 && meta.uid() != daemon {
            return Err(PolicyError::Owner {
                path: path.to_owned(),
                owner: meta.uid(),
                daemon,
            });
        }
        let bytes = read_bounded(file, MAX_POLICY_BYTES).map_err(small_err)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            io_err(io::Error::new(
                io::ErrorKind::InvalidData,
                "stream did not contain valid UTF-8",
            ))
        })?;
        Policy::parse(&text).map_err(|e| PolicyError::InFile {
            path: path.to_owned(),
            error: Box::new(e),
        })
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Whether `who` holds `cap` on `name`. For system capabilities
    /// ([`Capability::is_system`]) `name` is ignored.
    pub fn check(&self, who: &PeerIdentity, cap: Capability, name: &str) -> Decision {
        let granted = self.rules.iter().find(|r| {
            r.caps & cap.bit() != 0
                && (cap.is_system() || r.names.iter().any(|g| g.matches(name)))
                && r.selector.matches(who)
        });
        Decision {
            allowed: granted.is_some(),
            rule: granted.map(|r| r.name.clone()),
        }
    }

    /// Whether some rule grants `cap` to `who`, on any name. Lets a service
    /// refuse a caller that holds `cap` nowhere before any lookup (API-key
    /// Verify, whose name, the key's owner, is known only after the lookup).
    pub fn grants_any(&self, who: &PeerIdentity, cap: Capability) -> bool {
        self.rules
            .iter()
            .any(|r| r.caps & cap.bit() != 0 && r.selector.matches(who))
    }

    /// The secret a systemd `LoadCredential` request of `unit` for `id`
    /// maps to, if any.
    pub fn credential(&self, unit: &str, id: &str) -> Option<&str> {
        self.credentials.get(unit)?.get(id).map(SecretName::as_str)
    }
}

/// `unit` is `<something><suffix>` for one of `suffixes`, with no `/`.
fn is_unit_name(unit: &str, suffixes: &[&str]) -> bool {
    !unit.contains('/')
        && !unit.chars().any(char::is_whitespace)
        && suffixes
            .iter()
            .any(|s| unit.len() > s.len() && unit.ends_with(s))
}

fn resolve_rule(raw: RawRule) -> Result<Rule, RuleProblem> {
    if raw.name.trim().is_empty() {
        return Err(RuleProblem::EmptyName);
    }
    if raw.capabilities.is_empty() {
        return Err(RuleProblem::NoCapabilities);
    }
    let caps = raw
        .capabilities
        .iter()
        .map(|c| c.parse::<Capability>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(RuleProblem::UnknownCapability)?;
    let system = caps.iter().copied().find(|c| c.is_system());
    let scoped = caps.iter().copied().find(|c| !c.is_system());
    match (system, scoped) {
        (Some(system), Some(scoped)) => {
            return Err(RuleProblem::MixedCapabilities { system, scoped })
        }
        (Some(cap), None) if !raw.names.is_empty() => {
            return Err(RuleProblem::NamesNotAllowed { cap })
        }
        (None, Some(cap)) if raw.names.is_empty() => {
            return Err(RuleProblem::NamesRequired { cap })
        }
        _ => {}
    }
    let names = raw
        .names
        .iter()
        .map(|p| {
            Glob::parse(p).map_err(|error| RuleProblem::BadGlob {
                pattern: p.clone(),
                error,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule {
        name: raw.name,
        caps: caps.iter().fold(0, |acc, c| acc | c.bit()),
        names,
        selector: resolve_selector(raw.selectors)?,
    })
}

fn resolve_selector(m: RawMatch) -> Result<Selector, RuleProblem> {
    let bad = |key: &'static str, problem: &str| RuleProblem::BadSelector {
        key,
        problem: problem.to_owned(),
    };
    let others = m.user.is_some()
        || m.uid.is_some()
        || m.group.is_some()
        || m.gid.is_some()
        || m.unit.is_some()
        || m.exe.is_some()
        || m.exe_sha256.is_some();
    match m.any {
        Some(true) if others => return Err(RuleProblem::AnyWithOthers),
        Some(true) => {
            return Ok(Selector {
                any: true,
                ..Selector::default()
            })
        }
        Some(false) => return Err(RuleProblem::AnyFalse),
        None if !others => return Err(RuleProblem::NoSelector),
        None => {}
    }
    if m.user.as_deref().is_some_and(|u| u.trim().is_empty()) {
        return Err(bad("user", "is empty; write a user name or use `uid`"));
    }
    if m.group.as_deref().is_some_and(|g| g.trim().is_empty()) {
        return Err(bad("group", "is empty; write a group name or use `gid`"));
    }
    if m.gid == Some(u32::MAX) {
        // (gid_t)-1 is no process's gid; it stands for "gid unknown" (a
        // loopback TCP proxy caller) and must never match.
        return Err(bad("gid", "4294967295 is not a valid gid"));
    }
    if let Some(u) = &m.unit {
        if !is_unit_name(u, &[".service", ".scope"]) {
            return Err(bad(
                "unit",
                &format!(
                    "{u:?} is not a unit name; write e.g. \"app-a.service\" (a .service or .scope)"
                ),
            ));
        }
    }
    if let Some(e) = &m.exe {
        if !e.is_absolute() {
            return Err(bad(
                "exe",
                &format!(
                    "{:?} is not an absolute path; write e.g. \"/usr/bin/app\"",
                    e.display()
                ),
            ));
        }
    }
    let exe_sha256 = match m.exe_sha256 {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(h.to_ascii_lowercase())
        }
        Some(_) => {
            return Err(bad(
                "exe_sha256",
                "must be 64 hex digits (the output of `sha256sum /path/to/exe`)",
            ))
        }
        None => None,
    };
    Ok(Selector {
        any: false,
        user: m.user,
        uid: m.uid,
        group: m.group,
        gid: m.gid,
        unit: m.unit,
        exe: m.exe,
        exe_sha256,
    })
}

// ---------------------------------------------------------------------------
// Shared, reloadable handle
// ---------------------------------------------------------------------------

/// The daemon's current policy, shared by every connection; cheap to clone.
/// Readers take an `Arc<Policy>` snapshot, so a reload never changes a
/// policy under a request that is using it.
#[derive(Clone, Debug)]
pub struct PolicyHandle(Arc<RwLock<Arc<Policy>>>);

impl PolicyHandle {
    /// A handle holding `policy`.
    pub fn new(policy: Policy) -> Self {
        PolicyHandle(Arc::new(RwLock::new(Arc::new(policy))))
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        self.0.read().clone()
    }

    /// Replaces the policy.
    pub fn replace(&self, policy: Policy) {
        *self.0.write() = Arc::new(policy);
    }

    /// Loads `path` and puts it in force. When the file is invalid, the old
    /// policy stays in force and the error says why.
    pub fn reload_from(&self, path: &Path) -> Result<(), PolicyError> {
        let policy = Policy::load(path)?;
        self.replace(policy);
        Ok(())
    }
}

impl Default for PolicyHandle {
    fn default() -> Self {
        PolicyHandle::new(Policy::empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_round_trip() {
        for c in Capability::ALL {
            assert_eq!(c.as_str().parse::<Capability>(), Ok(c));
            assert_eq!(c.to_string(), c.as_str());
        }
    }

    #[test]
    fn gid_minus_one_is_refused() {
        let text = "[[rule]]\nname = \"x\"\ncapabilities = [\"proxy:use\"]\nnames = [\"**\"]\n[rule.match]\ngid = 4294967295\n";
        assert!(Policy::parse(text).is_err());
        assert!(Policy::parse(&text.replace("4294967295", "1000")).is_ok());
    }

    #[test]
    fn double_star_segments_collapse() {
        let g = Glob::parse("a/**/**/b").unwrap();
        assert_eq!(g.segs.len(), 3);
        assert!(g.matches("a/b"));
        assert!(g.matches("a/x/y/b"));
    }
}
