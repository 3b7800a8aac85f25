//! `keyseal audit ...`: export signed bundles, verify them offline, tail,
//! query, look up the audit HMAC of a sensitive identifier, and prune
//! exported events.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::Subcommand;
use keyseal::api::pb;
use keyseal::exit;

use super::{client, Failure, Res};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Export events with checkpoints, proofs, the audit public key and a signed manifest.
    Export {
        /// Start (RFC 3339 like 2026-11-22T00:00:00Z, or unix seconds).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// The checkpoint file of the previous export: prove consistency with it.
        #[arg(long)]
        after: Option<PathBuf>,
        /// Output directory (created; must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify an exported bundle offline (no daemon, no root device).
    Verify {
        dir: PathBuf,
        /// The audit public key (PEM) you trust; the bundle's key must be it.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Your copy of the previous export's checkpoint: the bundle must prove consistency with it.
        #[arg(long)]
        after: Option<PathBuf>,
    },
    /// Show the newest events; -f keeps following.
    Tail {
        #[arg(short = 'n', long, default_value_t = 10)]
        last: u32,
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Query events.
    Query {
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        op: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// ok, denied or error.
        #[arg(long)]
        result: Option<String>,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Print the audit HMAC of a value read from stdin (to find it in the log).
    Hash,
    /// Delete the oldest events, up to what was already exported (needs audit:prune).
    Prune {
        /// Delete events 1..=SIZE (a tree size; at most the exported size).
        /// Default: everything already exported.
        #[arg(long, value_name = "SIZE")]
        through: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

/// Parses unix seconds or an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SSZ) to unix millis.
fn parse_time(s: &str) -> Result<u64, Failure> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs.saturating_mul(1000));
    }
    let bad = || {
        Failure::new(
            exit::USAGE,
            format!("bad time {s:?}: use unix seconds or YYYY-MM-DDTHH:MM:SSZ"),
            None,
        )
    };
    let s2 = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = s2.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let t: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if d.len() != 3 || t.len() != 3 {
        return Err(bad());
    }
    let (y, m, dd) = (d[0], d[1], d[2]);
    // days from civil (Howard Hinnant)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    u64::try_from(secs).map(|s| s * 1000).map_err(|_| bad())
}

fn print_event(line: &str, json: bool) {
    if json {
        println!("{line}");
        return;
    }
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or(serde_json::Value::Null);
    let actor = &v["actor"];
    let who = actor["user"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| actor["uid"].as_u64().map(|u| format!("uid:{u}")))
        .or_else(|| actor["api_key_id"].as_str().map(|k| format!("key:{k}")))
        .unwrap_or_else(|| actor["kind"].as_str().unwrap_or("?").to_owned());
    println!(
        "{:>8} {} {:<22} {:<8} {:<10} {} {}",
        v["seq"].as_u64().unwrap_or(0),
        super::ts(v["time"].as_u64().unwrap_or(0) / 1000),
        v["op"].as_str().unwrap_or(""),
        v["result"].as_str().unwrap_or(""),
        who,
        v["target"].as_str().unwrap_or("-"),
        v["code"].as_str().unwrap_or(""),
    );
}

pub async fn run(socket: &std::path::Path, c: Cmd) -> Res {
    if let Cmd::Verify { dir, key, after } = c {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|e| {
                Failure::new(
                    exit::DATA,
                    format!("cannot read {}: {e}", p.display()),
                    None,
                )
            })
        };
        let opts = keyseal::audit::VerifyOptions {
            trusted_key_pem: key.as_ref().map(read).transpose()?,
            after: after.as_ref().map(read).transpose()?,
        };
        return match keyseal::audit::verify_bundle_with(&dir, &opts) {
            Ok(r) => {
                println!(
                    "OK: {} events (seq {}..{}), tree size {}, root {}, {} checkpoint signature(s) verified{}",
                    r.events,
                    r.first_seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    r.last_seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    r.tree_size,
                    r.root,
                    r.checkpoints,
                    r.consistent_from.map(|s| format!(", consistent with the earlier checkpoint of size {s}")).unwrap_or_default()
                );
                println!(
                    "origin {}; audit key {} ({})",
                    r.origin, r.key_id, r.key_fingerprint
                );
                Ok(())
            }
            Err(e) => Err(Failure::new(
                exit::DATA,
                format!("verification FAILED: {e}"),
                None,
            )),
        };
    }
    let mut cl = client(socket).await?;
    let a = &mut cl.audit;
    match c {
        Cmd::Verify { .. } => Ok(()),
        Cmd::Export {
            since,
            until,
            after,
            out,
        } => {
            let after_checkpoint = match after {
                Some(p) => std::fs::read_to_string(&p).map_err(|e| {
                    Failure::new(
                        exit::DATA,
                        format!("cannot read {}: {e}", p.display()),
                        None,
                    )
                })?,
                None => String::new(),
            };
            if out.exists()
                && std::fs::read_dir(&out)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(true)
            {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("{} exists and is not empty", out.display()),
                    None,
                ));
            }
            let req = pb::AuditExportRequest {
                since_ms: since.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                until_ms: until.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                after_checkpoint,
            };
            let mut s = a.export(req).await?.into_inner();
            std::fs::create_dir_all(&out).map_err(|e| {
                Failure::new(
                    exit::IO,
                    format!("cannot create {}: {e}", out.display()),
                    None,
                )
            })?;
            let mut files = 0;
            let mut current: Option<(String, std::fs::File)> = None;
            while let Some(ch) = s.message().await? {
                if ch.file.is_empty() || ch.file.contains('/') || ch.file.starts_with('.') {
                    return Err(Failure::new(
                        exit::DATA,
                        "daemon sent a bad file name",
                        None,
                    ));
                }
                if current.as_ref().map(|(n, _)| n != &ch.file).unwrap_or(true) {
                    let f = std::fs::File::create(out.join(&ch.file)).map_err(|e| {
                        Failure::new(exit::IO, format!("cannot write {}: {e}", ch.file), None)
                    })?;
                    current = Some((ch.file.clone(), f));
                    files += 1;
                }
                if let Some((_, f)) = current.as_mut() {
                    f.write_all(&ch.data)
                        .map_err(|e| Failure::new(exit::IO, format!("write: {e}"), None))?;
                }
            }
            eprintln!(
                "exported {files} files to {}; verify with `keyseal audit verify {}`",
                out.display(),
                out.display()
            );
            Ok(())
        }
        Cmd::Tail { last, follow, json } => {
            let mut s = a
                .tail(pb::AuditTailRequest { last, follow })
                .await?
                .into_inner();
            while let Some(l) = s.message().await? {
                print_event(&l.json, json);
                let _ = std::io::stdout().flush();
            }
            Ok(())
        }
        Cmd::Query {
            actor,
            op,
            target,
            result,
            since,
            until,
            limit,
            json,
        } => {
            let mut req = pb::AuditQueryRequest {
                actor: actor.unwrap_or_default(),
                op: op.unwrap_or_default(),
                target: target.unwrap_or_default(),
                result: result.unwrap_or_default(),
                since_ms: since.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                until_ms: until.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                after_seq: 0,
                limit: limit.min(1000),
            };
            let mut shown = 0u32;
            loop {
                let r = a.query(req.clone()).await?.into_inner();
                for e in &r.events {
                    print_event(e, json);
                    shown += 1;
                }
                if r.next_seq == 0 || shown >= limit {
                    break;
                }
                req.after_seq = r.next_seq;
            }
            Ok(())
        }
        Cmd::Prune { through, json } => {
            if through == Some(0) {
                return Err(Failure::new(
                    exit::USAGE,
                    "--through must be at least 1 (omit it to prune everything exported)",
                    None,
                ));
            }
            let r = a
                .prune(pb::AuditPruneRequest {
                    through_size: through.unwrap_or(0),
                })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "pruned": r.pruned,
                        "events_removed": r.events_removed,
                        "first_seq": r.first_seq,
                        "exported_size": r.exported_size,
                        "tree_size": r.tree_size,
                    })
                );
            } else {
                println!(
                    "pruned events 1..={} ({} removed now); the log keeps seq {}..{} (exported through {})",
                    r.pruned, r.events_removed, r.first_seq, r.tree_size, r.exported_size
                );
            }
            Ok(())
        }
        Cmd::Hash => {
            let mut v = zeroize::Zeroizing::new(Vec::new());
            std::io::stdin()
                .read_to_end(&mut v)
                .map_err(|e| Failure::new(exit::DATA, format!("cannot read stdin: {e}"), None))?;
            let r = a
                .hash(pb::AuditHashRequest { value: v.to_vec() })
                .await?
                .into_inner();
            println!("{}", r.hash);
            Ok(())
        }
    }
}
