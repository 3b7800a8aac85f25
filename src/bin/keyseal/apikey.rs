//! `keyseal apikey ...` (issue, ls, show, rotate, revoke, verify) and
//! `keyseal scan PATH...` (find keyseal API keys in files).
//!
//! A key is printed exactly once, by `issue` and `rotate`, alone on stdout
//! (metadata goes to stderr). Listings show only the last 4 characters.
//! `verify` reads the key from stdin, never from argv.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use keyseal::api::pb::{self, api_keys_client::ApiKeysClient};
use keyseal::apikeys::{find_tokens, format_duration, parse_duration, TokenError, DEFAULT_PREFIX};
use keyseal::exit;
use tonic::transport::Channel;
use tonic::Code;
use zeroize::Zeroizing;

use super::{json_out, parse_kv, table, ts, Failure, Res};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Issue a key: printed once on stdout (store it now), metadata on stderr.
    Issue {
        /// Owner (name grammar, e.g. team-a/customer-42); policy `names` match it.
        #[arg(long)]
        owner: String,
        /// Scope granted to the key (repeatable).
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Environment: live, test or a custom [a-z0-9]{1,16}.
        #[arg(long, default_value = "live")]
        env: String,
        /// Lifetime, e.g. 90d, 12h (default: no expiry).
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        /// Allowed customer source network (repeatable), e.g. 10.0.0.0/8.
        #[arg(long = "cidr", value_name = "CIDR")]
        cidrs: Vec<String>,
        /// Rate plan from the daemon config, or `unlimited` (default: the configured default).
        #[arg(long)]
        plan: Option<String>,
        /// Label KEY=VALUE (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Due for rotation after this (default 90d live, 30d otherwise).
        #[arg(long, value_name = "DURATION")]
        rotate_after: Option<String>,
        /// Metadata as JSON on stderr.
        #[arg(long)]
        json: bool,
    },
    /// List keys (last 4 characters only).
    Ls {
        #[arg(long)]
        owner: Option<String>,
        /// Only keys due for rotation.
        #[arg(long)]
        due: bool,
        /// Include revoked and expired keys.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one key's metadata.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Issue a successor (printed once on stdout); the old key stays valid for the overlap.
    Rotate {
        id: String,
        /// How long the old key keeps working (default: the daemon's, 24h).
        #[arg(long, value_name = "DURATION")]
        overlap: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke one key, or every key of an owner (--owner): effective for the next verify.
    Revoke {
        #[arg(required_unless_present = "owner", conflicts_with = "owner")]
        id: Option<String>,
        #[arg(long)]
        owner: Option<String>,
    },
    /// Check a key read from stdin (never argv); exit 0 when valid and allowed.
    Verify {
        /// The customer's source address.
        #[arg(long)]
        source_ip: Option<String>,
        /// Required scope (repeatable).
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Do not charge the key's rate plan.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

/// `keyseal scan`.
#[derive(Args, Debug)]
pub struct ScanArgs {
    /// Files or directories (searched recursively, `.git` skipped).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Key prefix to look for.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// Do not ask the daemon: every key found counts as possibly live.
    #[arg(long)]
    offline: bool,
    /// Also report look-alikes whose checksum is wrong (never counted).
    #[arg(long)]
    verbose: bool,
    /// Findings as a JSON array on stdout.
    #[arg(long)]
    json: bool,
}

fn status(s: tonic::Status) -> Failure {
    match s.code() {
        Code::NotFound => Failure::new(
            exit::NOT_FOUND,
            s.message().to_owned(),
            Some("check the id with `keyseal apikey ls`"),
        ),
        Code::ResourceExhausted => Failure::new(exit::UNAVAILABLE, s.message().to_owned(), None),
        _ => s.into(),
    }
}

async fn connect(socket: &Path) -> Result<ApiKeysClient<Channel>, Failure> {
    keyseal::client::connect(socket)
        .await
        .map(ApiKeysClient::new)
        .map_err(|e| {
            Failure::new(
                exit::UNAVAILABLE,
                format!("cannot connect to keyseald at {}: {e}", socket.display()),
                Some("is keyseald running? set --socket or KEYSEAL_SOCKET"),
            )
        })
}

fn dur(s: &Option<String>, what: &str) -> Result<Option<u64>, Failure> {
    match s {
        None => Ok(None),
        Some(s) => parse_duration(s)
            .map(|d| Some(d.as_secs()))
            .map_err(|e| Failure::new(exit::USAGE, format!("{what}: {e}"), None)),
    }
}

fn masked(m: &pb::ApiKeyMeta) -> String {
    format!("{}_{}_…{}", m.prefix, m.env, m.last4)
}

fn opt_ts(t: Option<u64>) -> String {
    t.map_or_else(|| "-".into(), ts)
}

fn meta_json(m: &pb::ApiKeyMeta) -> serde_json::Value {
    serde_json::json!({
        "id": m.id, "owner": m.owner, "scopes": m.scopes, "env": m.env,
        "key": masked(m), "last4": m.last4, "state": m.state,
        "created_at": m.created_at, "created_by": m.created_by,
        "expires_at": m.expires_at, "revoked_at": m.revoked_at, "revoked_by": m.revoked_by,
        "allowed_cidrs": m.allowed_cidrs, "rate_plan": m.rate_plan, "labels": m.labels,
        "rotate_after_secs": m.rotate_after_secs, "rotation_due": m.rotation_due,
        "predecessor_id": m.predecessor_id, "successor_id": m.successor_id,
    })
}

fn describe(m: &pb::ApiKeyMeta) -> Vec<(&'static str, String)> {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let mut labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    vec![
        ("id", m.id.clone()),
        ("key", masked(m)),
        ("owner", m.owner.clone()),
        ("env", m.env.clone()),
        ("state", m.state.clone()),
        ("scopes", or_dash(&m.scopes.join(","))),
        (
            "created",
            format!("{} by {}", ts(m.created_at), m.created_by),
        ),
        ("expires", opt_ts(m.expires_at)),
        (
            "revoked",
            match m.revoked_at {
                Some(t) => format!("{} by {}", ts(t), m.revoked_by),
                None => "-".into(),
            },
        ),
        ("cidrs", or_dash(&m.allowed_cidrs.join(","))),
        (
            "rate plan",
            if m.rate_plan.is_empty() {
                "unlimited".into()
            } else {
                m.rate_plan.clone()
            },
        ),
        ("labels", or_dash(&labels.join(","))),
        (
            "rotate after",
            format!(
                "{}{}",
                format_duration(m.rotate_after_secs),
                if m.rotation_due { " (due now)" } else { "" }
            ),
        ),
        ("predecessor", or_dash(&m.predecessor_id)),
        ("successor", or_dash(&m.successor_id)),
    ]
}

fn print_describe(m: &pb::ApiKeyMeta, to_stderr: bool) {
    for (k, v) in describe(m) {
        if to_stderr {
            eprintln!("{k:<13} {v}");
        } else {
            println!("{k:<13} {v}");
        }
    }
}

/// Prints a key alone on stdout: the one time it is shown.
fn print_key_once(key: Zeroizing<String>) -> Res {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", key.as_str())
        .and_then(|_| out.flush())
        .map_err(|e| Failure::new(exit::IO, format!("cannot write stdout: {e}"), None))
}

fn meta_err() -> Failure {
    Failure::new(exit::FAILURE, "the daemon answered without metadata", None)
}

pub async fn run(socket: &Path, c: Cmd) -> Res {
    let mut cl = connect(socket).await?;
    match c {
        Cmd::Issue {
            owner,
            scopes,
            env,
            expires_in,
            cidrs,
            plan,
            labels,
            rotate_after,
            json,
        } => {
            let labels = parse_kv(&labels, "--label")?;
            let r = cl
                .issue(pb::IssueApiKeyRequest {
                    owner,
                    scopes,
                    env,
                    expires_in_secs: dur(&expires_in, "--expires-in")?,
                    allowed_cidrs: cidrs,
                    rate_plan: plan.unwrap_or_default(),
                    labels: labels.into_iter().collect(),
                    rotate_after_secs: dur(&rotate_after, "--rotate-after")?,
                })
                .await
                .map_err(status)?
                .into_inner();
            let key = Zeroizing::new(r.key.clone());
            let meta = r.meta.clone().ok_or_else(meta_err)?;
            drop(r);
            if json {
                eprintln!("{}", meta_json(&meta));
            } else {
                eprintln!("issued API key {} for {}:", meta.id, meta.owner);
                print_describe(&meta, true);
                eprintln!("the key is printed once, on stdout: store it now; keyseal cannot show it again");
            }
            print_key_once(key)
        }
        Cmd::Ls {
            owner,
            due,
            all,
            json,
        } => {
            let mut keys = Vec::new();
            let mut token = String::new();
            loop {
                let r = cl
                    .list(pb::ListApiKeysRequest {
                        owner: owner.clone().unwrap_or_default(),
                        due,
                        include_inactive: all,
                        page_size: 1000,
                        page_token: token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                keys.extend(r.keys);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            if json {
                return json_out(&serde_json::Value::Array(
                    keys.iter().map(meta_json).collect(),
                ));
            }
            table(
                &[
                    "ID", "KEY", "OWNER", "STATE", "SCOPES", "PLAN", "CREATED", "EXPIRES", "DUE",
                ],
                keys.iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            masked(m),
                            m.owner.clone(),
                            m.state.clone(),
                            if m.scopes.is_empty() {
                                "-".into()
                            } else {
                                m.scopes.join(",")
                            },
                            if m.rate_plan.is_empty() {
                                "-".into()
                            } else {
                                m.rate_plan.clone()
                            },
                            ts(m.created_at),
                            opt_ts(m.expires_at),
                            if m.rotation_due { "yes" } else { "" }.into(),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        Cmd::Show { id, json } => {
            let m = cl
                .get(pb::GetApiKeyRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                return json_out(&meta_json(&m));
            }
            print_describe(&m, false);
            Ok(())
        }
        Cmd::Rotate { id, overlap, json } => {
            let r = cl
                .rotate(pb::RotateApiKeyRequest {
                    id,
                    overlap_secs: dur(&overlap, "--overlap")?,
                })
                .await
                .map_err(status)?
                .into_inner();
            let key = Zeroizing::new(r.key.clone());
            let meta = r.meta.clone().ok_or_else(meta_err)?;
            let pred = r.predecessor.clone().ok_or_else(meta_err)?;
            drop(r);
            if json {
                eprintln!(
                    "{}",
                    serde_json::json!({"key": meta_json(&meta), "predecessor": meta_json(&pred)})
                );
            } else {
                eprintln!(
                    "rotated {} -> {}; {} stays valid until {}",
                    pred.id,
                    meta.id,
                    masked(&pred),
                    opt_ts(pred.expires_at)
                );
                eprintln!("the new key is printed once, on stdout: store it now");
            }
            print_key_once(key)
        }
        Cmd::Revoke { id, owner } => match (id, owner) {
            (_, Some(owner)) => {
                let r = cl
                    .revoke_owner(pb::RevokeOwnerApiKeysRequest {
                        owner: owner.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                eprintln!("revoked {} keys of {owner}", r.revoked);
                for id in r.ids {
                    println!("{id}");
                }
                Ok(())
            }
            (Some(id), None) => {
                let r = cl
                    .revoke(pb::RevokeApiKeyRequest { id: id.clone() })
                    .await
                    .map_err(status)?
                    .into_inner();
                let m = r.meta.ok_or_else(meta_err)?;
                if r.already_revoked {
                    eprintln!(
                        "{id} ({}) was already revoked at {}",
                        masked(&m),
                        opt_ts(m.revoked_at)
                    );
                } else {
                    eprintln!("revoked {id} ({}, owner {})", masked(&m), m.owner);
                }
                Ok(())
            }
            (None, None) => Err(Failure::new(
                exit::USAGE,
                "give a key id, or --owner OWNER",
                None,
            )),
        },
        Cmd::Verify {
            source_ip,
            scopes,
            dry_run,
            json,
        } => {
            if std::io::stdin().is_terminal() {
                eprintln!("keyseal: reading the key from stdin (end with Enter and Ctrl-D)");
            }
            let mut buf = Zeroizing::new(String::new());
            std::io::stdin()
                .take(4096)
                .read_to_string(&mut buf)
                .map_err(|e| Failure::new(exit::DATA, format!("cannot read stdin: {e}"), None))?;
            let key = Zeroizing::new(buf.trim().to_owned());
            let r = cl
                .verify(pb::VerifyApiKeyRequest {
                    key: key.to_string(),
                    source_ip: source_ip.unwrap_or_default(),
                    required_scopes: scopes,
                    dry_run,
                })
                .await
                .map_err(status)?
                .into_inner();
            let ok = r.valid
                && r.missing_scopes.is_empty()
                && r.rate.as_ref().map_or(true, |d| d.allowed);
            if json {
                json_out(&serde_json::json!({
                    "valid": r.valid, "key_id": r.key_id, "owner": r.owner, "scopes": r.scopes,
                    "env": r.env, "missing_scopes": r.missing_scopes,
                    "rate": r.rate.as_ref().map(|d| serde_json::json!({
                        "allowed": d.allowed, "limit": d.limit, "remaining": d.remaining,
                        "reset_secs": d.reset_secs, "retry_after_secs": d.retry_after_secs,
                        "window": d.window,
                    })),
                }))?;
            } else if !r.valid {
                println!("invalid");
            } else {
                println!(
                    "valid: {} owner {} env {} scopes {}",
                    r.key_id,
                    r.owner,
                    r.env,
                    if r.scopes.is_empty() {
                        "-".into()
                    } else {
                        r.scopes.join(",")
                    }
                );
                if !r.missing_scopes.is_empty() {
                    println!("missing scopes: {}", r.missing_scopes.join(","));
                }
                match &r.rate {
                    None => println!("rate: unlimited"),
                    Some(d) => println!(
                        "rate: {} (limit {} per {}, remaining {}, reset {}s, retry after {}s)",
                        if d.allowed { "allowed" } else { "LIMITED" },
                        d.limit,
                        d.window,
                        d.remaining,
                        d.reset_secs,
                        d.retry_after_secs
                    ),
                }
            }
            if ok {
                Ok(())
            } else {
                std::process::exit(exit::FAILURE)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// scan
// ---------------------------------------------------------------------------

/// Largest file scanned.
const MAX_SCAN_BYTES: u64 = 16 * 1024 * 1024;

/// Files under `path`. Paths given on the command line are followed when
/// they are symlinks; symlinks found inside directories are not.
fn collect(path: &Path, top: bool, out: &mut Vec<PathBuf>, skipped: &mut Vec<String>) {
    let meta = if top {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    let meta = match meta {
        Ok(m) => m,
        Err(e) => {
            skipped.push(format!("{}: {e}", path.display()));
            return;
        }
    };
    if meta.is_dir() {
        if path.file_name().is_some_and(|n| n == ".git") {
            return;
        }
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                skipped.push(format!("{}: {e}", path.display()));
                return;
            }
        };
        entries.sort();
        for e in entries {
            collect(&e, false, out, skipped);
        }
    } else if meta.is_file() {
        if meta.len() > MAX_SCAN_BYTES {
            skipped.push(format!("{}: larger than 16 MiB", path.display()));
        } else {
            out.push(path.to_path_buf());
        }
    }
    // Symlinks and special files are not followed.
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Live,
    NotLive,
    Unknown,
}

pub async fn scan(socket: &Path, a: ScanArgs) -> Res {
    if !keyseal::apikeys::check_prefix(&a.prefix) {
        return Err(Failure::new(
            exit::USAGE,
            "--prefix must be 2..=16 characters of [a-z0-9] starting with a letter",
            None,
        ));
    }
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for p in &a.paths {
        collect(p, true, &mut files, &mut skipped);
    }
    for s in &skipped {
        eprintln!("keyseal: skipped {s}");
    }
    let mut client = None;
    let mut unknown_reason = String::new();
    if a.offline {
        unknown_reason = "offline".into();
    } else {
        match connect(socket).await {
            Ok(c) => client = Some(c),
            Err(f) => {
                unknown_reason = "daemon unreachable".into();
                eprintln!(
                    "keyseal: {} (liveness unknown; any key found fails the scan)",
                    f.msg
                );
            }
        }
    }
    let (mut live, mut not_live, mut unknown, mut lookalikes) = (0u64, 0u64, 0u64, 0u64);
    let mut json_rows = Vec::new();
    for f in &files {
        let Ok(bytes) = std::fs::read(f) else {
            eprintln!("keyseal: skipped {}: unreadable", f.display());
            continue;
        };
        if !bytes
            .windows(a.prefix.len() + 1)
            .any(|w| w.ends_with(b"_") && w[..a.prefix.len()] == *a.prefix.as_bytes())
        {
            continue;
        }
        let text = String::from_utf8_lossy(&bytes);
        for found in find_tokens(&text, &a.prefix) {
            let loc = format!("{}:{}:{}", f.display(), found.line, found.column);
            let token = match found.token {
                Ok(t) => t,
                Err(TokenError::BadChecksum) | Err(TokenError::Malformed) => {
                    lookalikes += 1;
                    if a.verbose {
                        eprintln!("{loc}: look-alike with a bad checksum, ignored");
                    }
                    continue;
                }
            };
            let (state, detail) = match client.as_mut() {
                None => (Liveness::Unknown, unknown_reason.clone()),
                Some(c) => match c
                    .verify(pb::VerifyApiKeyRequest {
                        key: token.expose().to_owned(),
                        source_ip: String::new(),
                        required_scopes: vec![],
                        dry_run: true,
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.valid {
                            (Liveness::Live, format!("{} owner {}", r.key_id, r.owner))
                        } else {
                            (Liveness::NotLive, String::new())
                        }
                    }
                    Err(s) => (Liveness::Unknown, s.message().to_owned()),
                },
            };
            match state {
                Liveness::Live => live += 1,
                Liveness::NotLive => not_live += 1,
                Liveness::Unknown => unknown += 1,
            }
            let word = match state {
                Liveness::Live => "LIVE",
                Liveness::NotLive => "not live",
                Liveness::Unknown => "unknown",
            };
            if a.json {
                json_rows.push(serde_json::json!({
                    "path": f.display().to_string(), "line": found.line, "column": found.column,
                    "key": token.masked(),
                    "status": match state { Liveness::Live => "live", Liveness::NotLive => "not_live", Liveness::Unknown => "unknown" },
                    "detail": detail,
                }));
            } else if detail.is_empty() {
                println!("{loc}: {} {word}", token.masked());
            } else {
                println!("{loc}: {} {word} ({detail})", token.masked());
            }
        }
    }
    if a.json {
        json_out(&serde_json::Value::Array(json_rows))?;
    }
    eprintln!(
        "keyseal scan: {} files, {} keys found ({live} live, {unknown} unknown, {not_live} not live), {lookalikes} look-alikes ignored",
        files.len(),
        live + unknown + not_live
    );
    if live + unknown > 0 {
        eprintln!("keyseal scan: remove the keys above (and revoke live ones: `keyseal apikey revoke ID`)");
        std::process::exit(exit::FAILURE);
    }
    Ok(())
}
