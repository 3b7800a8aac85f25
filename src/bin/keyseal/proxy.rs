//! `keyseal target|proxy|rule ...`: the credential-injecting proxy's
//! targets, target credentials (values from stdin or a file, never argv,
//! never printed), proxies, rules, rule tests and the request log.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use keyseal::api::pb::{self, proxy_client::ProxyClient};
use keyseal::exit;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::{json_out, table, ts, Failure, Res};

#[derive(Subcommand, Debug)]
pub enum TargetCmd {
    /// Create or replace a target (upstream).
    Put {
        name: String,
        /// Base URL: https://host[:port][/base] (a bare host means https).
        #[arg(long)]
        url: String,
        /// PEM CA bundle to trust instead of the system roots (absolute path).
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long, default_value_t = 5000)]
        connect_timeout_ms: u64,
        #[arg(long, default_value_t = 30000)]
        response_timeout_ms: u64,
        #[arg(long, default_value_t = 90000)]
        idle_timeout_ms: u64,
        /// Accept an http:// base URL (plain text upstream).
        #[arg(long)]
        allow_http: bool,
        /// Client certificate chain (PEM file) presented to the upstream (mTLS).
        #[arg(long, requires = "client_key_file")]
        client_cert: Option<PathBuf>,
        /// Its private key (PEM file; sealed by keyseald, never shown again).
        #[arg(long, requires = "client_cert")]
        client_key_file: Option<PathBuf>,
    },
    /// List targets.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Delete a target no credential or proxy uses.
    Rm { name: String },
    /// Target credentials: sealed, injected, never returned.
    #[command(subcommand)]
    Cred(CredCmd),
}

#[derive(Subcommand, Debug)]
pub enum CredCmd {
    /// Seal a credential (value from stdin or --from-file) with its injection recipe.
    Put {
        id: String,
        #[arg(long)]
        target: String,
        /// Header recipe, e.g. 'Authorization: Bearer {}' or 'x-api-key: {}'.
        #[arg(long, conflicts_with_all = ["basic_user", "query_param"])]
        header: Option<String>,
        /// Authorization: Basic from this user and the secret.
        #[arg(long, conflicts_with = "query_param")]
        basic_user: Option<String>,
        /// Query parameter (discouraged: URLs end up in logs).
        #[arg(long)]
        query_param: Option<String>,
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// List credentials (recipes only; values are never shown).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Delete a credential; proxies using it refuse requests from now on.
    Rm { id: String },
}

#[derive(Subcommand, Debug)]
pub enum ProxyCmd {
    /// Create or replace a proxy.
    Put {
        name: String,
        #[arg(long)]
        target: String,
        /// Target credential injected (none: nothing injected).
        #[arg(long)]
        credential: Option<String>,
        /// Effect when no rule matches.
        #[arg(long = "default", default_value = "deny")]
        default_effect: String,
        /// A [rate_plans.NAME] of the daemon config, charged per caller.
        #[arg(long)]
        rate_plan: Option<String>,
        /// Kernel-identified callers, e.g. 'uid=1000' or 'unit=app.service' (repeatable).
        #[arg(long = "caller")]
        callers: Vec<String>,
        /// API key ids allowed as proxy keys (repeatable).
        #[arg(long = "key-id")]
        key_ids: Vec<String>,
        /// API key owners whose keys are allowed (repeatable).
        #[arg(long = "key-owner")]
        key_owners: Vec<String>,
        /// On a caller's anomaly: flag (audit event, telemetry flag) or
        /// suspend (also refuse the caller until `proxy unsuspend`).
        #[arg(long, default_value = "flag", value_parser = ["flag", "suspend"])]
        on_anomaly: String,
    },
    /// List proxies.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a proxy and its rules.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a proxy and its rules.
    Rm { name: String },
    /// Explain which rule decides METHOD PATH and why.
    Test {
        name: String,
        method: String,
        /// Path after /p/<proxy> (may include ?query).
        path: String,
        /// Request header NAME=VALUE (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// The request log of a proxy.
    Requests {
        name: String,
        /// Unix seconds (inclusive).
        #[arg(long)]
        processed_after: Option<u64>,
        /// Unix seconds (exclusive).
        #[arg(long)]
        processed_before: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Telemetry of a proxy per minute, hour or day (newest first), with
    /// anomaly flags and suspended callers.
    Telemetry {
        name: String,
        #[arg(long, default_value = "hour", value_parser = ["minute", "hour", "day"])]
        interval: String,
        #[arg(long, default_value_t = 24)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Clear a caller's suspension on a proxy (audited).
    Unsuspend {
        name: String,
        /// key:<id> or uid=N[ unit=U], as shown by `proxy telemetry`.
        #[arg(long)]
        caller: String,
    },
    /// Print the TLS interception CA certificate (PEM) for clients to
    /// trust, e.g. `keyseal proxy ca > keyseal-proxy-ca.pem`. The CA key is
    /// in the root device; the CA is created on the first call.
    Ca,
}

#[derive(Subcommand, Debug)]
pub enum RuleCmd {
    /// Add or replace rule ID of PROXY.
    Add {
        proxy: String,
        id: String,
        /// Lowest first.
        #[arg(long, default_value_t = 100)]
        priority: u32,
        #[arg(long, conflicts_with = "deny", required_unless_present = "deny")]
        allow: bool,
        #[arg(long)]
        deny: bool,
        /// Methods (repeatable; none: any).
        #[arg(long = "method")]
        methods: Vec<String>,
        /// Path regex, anchored at both ends (default: any path).
        #[arg(long, default_value = ".*")]
        path: String,
        /// Header condition NAME=REGEX (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Query condition NAME=REGEX (repeatable).
        #[arg(long = "query")]
        query: Vec<String>,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// List rules in evaluation order.
    Ls {
        proxy: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a rule.
    Rm { proxy: String, id: String },
}

async fn connect(socket: &Path) -> Result<ProxyClient<Channel>, Failure> {
    keyseal::client::connect(socket)
        .await
        .map(ProxyClient::new)
        .map_err(|e| {
            Failure::new(
                exit::UNAVAILABLE,
                format!("cannot connect to keyseald at {}: {e}", socket.display()),
                Some("is keyseald running? set --socket or KEYSEAL_SOCKET"),
            )
        })
}

fn conds(items: &[String], what: &str) -> Result<Vec<pb::ProxyCondition>, Failure> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| pb::ProxyCondition {
                    name: k.to_owned(),
                    regex: v.to_owned(),
                })
                .ok_or_else(|| {
                    Failure::new(exit::USAGE, format!("{what} must be NAME=VALUE"), None)
                })
        })
        .collect()
}

/// A credential from a file or stdin (`read_value`), without the trailing
/// newline `echo` adds.
fn read_secret(from_file: Option<PathBuf>) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let mut buf = crate::read_value(from_file)?;
    // A trailing newline from `echo` is not part of the credential.
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(buf)
}

fn target_json(t: &pb::ProxyTarget) -> serde_json::Value {
    serde_json::json!({
        "name": t.name, "base_url": t.base_url, "ca_bundle": t.ca_bundle,
        "connect_timeout_ms": t.connect_timeout_ms, "response_timeout_ms": t.response_timeout_ms,
        "idle_timeout_ms": t.idle_timeout_ms, "created_at": t.created_at, "updated_at": t.updated_at,
        "client_cert": !t.client_cert_pem.is_empty(),
    })
}

fn cred_json(c: &pb::TargetCredential) -> serde_json::Value {
    serde_json::json!({
        "id": c.id, "target": c.target, "kind": c.kind, "recipe": c.description,
        "created_at": c.created_at, "created_by": c.created_by, "updated_at": c.updated_at,
    })
}

fn proxy_json(p: &pb::ProxyInfo) -> serde_json::Value {
    serde_json::json!({
        "name": p.name, "target": p.target, "credential": p.credential,
        "default_effect": p.default_effect, "rate_plan": p.rate_plan, "callers": p.callers,
        "key_ids": p.key_ids, "key_owners": p.key_owners,
        "created_at": p.created_at, "updated_at": p.updated_at, "on_anomaly": p.on_anomaly,
    })
}

fn rule_json(r: &pb::ProxyRule) -> serde_json::Value {
    let c = |v: &[pb::ProxyCondition]| {
        v.iter()
            .map(|c| serde_json::json!({"name": c.name, "regex": c.regex}))
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "proxy": r.proxy, "id": r.id, "priority": r.priority, "effect": r.effect,
        "methods": r.methods, "path": r.path, "headers": c(&r.headers), "query": c(&r.query),
        "notes": r.notes, "created_at": r.created_at,
    })
}

fn rule_rows(rules: &[pb::ProxyRule]) {
    table(
        &[
            "PRIORITY",
            "ID",
            "EFFECT",
            "METHODS",
            "PATH",
            "CONDITIONS",
            "NOTES",
        ],
        rules
            .iter()
            .map(|r| {
                let mut conds: Vec<String> = r
                    .headers
                    .iter()
                    .map(|c| format!("header {}~{}", c.name, c.regex))
                    .collect();
                conds.extend(
                    r.query
                        .iter()
                        .map(|c| format!("query {}~{}", c.name, c.regex)),
                );
                vec![
                    r.priority.to_string(),
                    r.id.clone(),
                    r.effect.clone(),
                    if r.methods.is_empty() {
                        "*".into()
                    } else {
                        r.methods.join(",")
                    },
                    r.path.clone(),
                    conds.join(" "),
                    r.notes.clone(),
                ]
            })
            .collect(),
    );
}

pub async fn target(socket: &Path, c: TargetCmd) -> Res {
    let mut cl = connect(socket).await?;
    match c {
        TargetCmd::Put {
            name,
            url,
            ca,
            connect_timeout_ms,
            response_timeout_ms,
            idle_timeout_ms,
            allow_http,
            client_cert,
            client_key_file,
        } => {
            let read = |p: &Path, what: &str| {
                std::fs::read(p).map(Zeroizing::new).map_err(|e| {
                    Failure::new(
                        exit::DATA,
                        format!("cannot read {what} {}: {e}", p.display()),
                        None,
                    )
                })
            };
            let client_cert_pem = match &client_cert {
                Some(p) => String::from_utf8(read(p, "--client-cert")?.to_vec()).map_err(|_| {
                    Failure::new(exit::DATA, "--client-cert is not a PEM text file", None)
                })?,
                None => String::new(),
            };
            let client_key_pem = match &client_key_file {
                Some(p) => read(p, "--client-key-file")?,
                None => Zeroizing::new(Vec::new()),
            };
            let ca_bundle = match ca {
                Some(p) => std::path::absolute(&p)
                    .map_err(|e| Failure::new(exit::USAGE, format!("--ca: {e}"), None))?
                    .display()
                    .to_string(),
                None => String::new(),
            };
            let t = cl
                .put_target(pb::PutTargetRequest {
                    target: Some(pb::ProxyTarget {
                        name,
                        base_url: url,
                        ca_bundle,
                        connect_timeout_ms,
                        response_timeout_ms,
                        idle_timeout_ms,
                        created_at: 0,
                        updated_at: 0,
                        allow_http,
                        client_cert_pem,
                    }),
                    client_key_pem: client_key_pem.to_vec(),
                })
                .await?
                .into_inner();
            eprintln!("target {} -> {}", t.name, t.base_url);
            Ok(())
        }
        TargetCmd::Ls { json } => {
            let r = cl.list_targets(pb::ProxyListRequest {}).await?.into_inner();
            if json {
                return json_out(&serde_json::Value::Array(
                    r.targets.iter().map(target_json).collect(),
                ));
            }
            table(
                &["NAME", "BASE_URL", "CA", "CLIENT_CERT", "UPDATED"],
                r.targets
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.base_url.clone(),
                            if t.ca_bundle.is_empty() {
                                "system".into()
                            } else {
                                t.ca_bundle.clone()
                            },
                            if t.client_cert_pem.is_empty() {
                                "-".into()
                            } else {
                                "yes".into()
                            },
                            ts(t.updated_at),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        TargetCmd::Rm { name } => {
            cl.delete_target(pb::ProxyNameRequest { name: name.clone() })
                .await?;
            eprintln!("deleted target {name}");
            Ok(())
        }
        TargetCmd::Cred(c) => cred(&mut cl, c).await,
    }
}

async fn cred(cl: &mut ProxyClient<Channel>, c: CredCmd) -> Res {
    match c {
        CredCmd::Put {
            id,
            target,
            header,
            basic_user,
            query_param,
            from_file,
        } => {
            let (kind, header, basic_user, query_param) = match (header, basic_user, query_param) {
                (_, Some(u), _) => ("basic", String::new(), u, String::new()),
                (_, _, Some(q)) => ("query", String::new(), String::new(), q),
                (h, None, None) => (
                    "header",
                    h.unwrap_or_else(|| "Authorization: Bearer {}".into()),
                    String::new(),
                    String::new(),
                ),
            };
            let value = read_secret(from_file)?;
            if value.is_empty() {
                return Err(Failure::new(
                    exit::USAGE,
                    "no credential value on stdin",
                    Some("pipe the value in, or use --from-file"),
                ));
            }
            let c = cl
                .put_credential(pb::PutCredentialRequest {
                    credential: Some(pb::TargetCredential {
                        id,
                        target,
                        kind: kind.into(),
                        header,
                        basic_user,
                        query_param,
                        ..Default::default()
                    }),
                    value: value.to_vec(),
                })
                .await?
                .into_inner();
            if c.kind == "query" {
                eprintln!("warning: query-parameter credentials are discouraged (URLs end up in upstream logs)");
            }
            eprintln!(
                "sealed credential {} for target {} ({})",
                c.id, c.target, c.description
            );
            Ok(())
        }
        CredCmd::Ls { json } => {
            let r = cl
                .list_credentials(pb::ProxyListRequest {})
                .await?
                .into_inner();
            if json {
                return json_out(&serde_json::Value::Array(
                    r.credentials.iter().map(cred_json).collect(),
                ));
            }
            table(
                &["ID", "TARGET", "RECIPE", "UPDATED", "CREATED_BY"],
                r.credentials
                    .iter()
                    .map(|c| {
                        vec![
                            c.id.clone(),
                            c.target.clone(),
                            c.description.clone(),
                            ts(c.updated_at),
                            c.created_by.clone(),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        CredCmd::Rm { id } => {
            cl.delete_credential(pb::ProxyNameRequest { name: id.clone() })
                .await?;
            eprintln!("deleted credential {id}; proxies using it now refuse requests");
            Ok(())
        }
    }
}

pub async fn proxy(socket: &Path, c: ProxyCmd) -> Res {
    let mut cl = connect(socket).await?;
    match c {
        ProxyCmd::Put {
            name,
            target,
            credential,
            default_effect,
            rate_plan,
            callers,
            key_ids,
            key_owners,
            on_anomaly,
        } => {
            let p = cl
                .put_proxy(pb::PutProxyRequest {
                    proxy: Some(pb::ProxyInfo {
                        name,
                        target,
                        credential: credential.unwrap_or_default(),
                        default_effect,
                        rate_plan: rate_plan.unwrap_or_default(),
                        callers,
                        key_ids,
                        key_owners,
                        created_at: 0,
                        updated_at: 0,
                        on_anomaly,
                    }),
                })
                .await?
                .into_inner();
            eprintln!(
                "proxy {} -> target {} (credential {}, default {})",
                p.name,
                p.target,
                if p.credential.is_empty() {
                    "none"
                } else {
                    &p.credential
                },
                p.default_effect
            );
            if p.on_anomaly == "suspend" {
                eprintln!("anomalies suspend the caller on this proxy");
            }
            Ok(())
        }
        ProxyCmd::Ls { json } => {
            let r = cl.list_proxies(pb::ProxyListRequest {}).await?.into_inner();
            if json {
                return json_out(&serde_json::Value::Array(
                    r.proxies.iter().map(proxy_json).collect(),
                ));
            }
            table(
                &[
                    "NAME",
                    "TARGET",
                    "CREDENTIAL",
                    "DEFAULT",
                    "RATE_PLAN",
                    "CALLERS",
                ],
                r.proxies
                    .iter()
                    .map(|p| {
                        let mut callers = p.callers.clone();
                        callers.extend(p.key_ids.iter().map(|k| format!("key {k}")));
                        callers.extend(p.key_owners.iter().map(|o| format!("owner {o}")));
                        vec![
                            p.name.clone(),
                            p.target.clone(),
                            p.credential.clone(),
                            p.default_effect.clone(),
                            p.rate_plan.clone(),
                            callers.join(" "),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        ProxyCmd::Show { name, json } => {
            let p = cl
                .get_proxy(pb::ProxyNameRequest { name: name.clone() })
                .await?
                .into_inner();
            let rules = cl
                .list_rules(pb::ProxyNameRequest { name })
                .await?
                .into_inner()
                .rules;
            if json {
                let mut v = proxy_json(&p);
                v["rules"] = serde_json::Value::Array(rules.iter().map(rule_json).collect());
                return json_out(&v);
            }
            println!("proxy:       {}", p.name);
            println!("target:      {}", p.target);
            println!("credential:  {}", p.credential);
            println!("default:     {}", p.default_effect);
            println!("rate plan:   {}", p.rate_plan);
            println!("callers:     {}", p.callers.join(" "));
            println!("key ids:     {}", p.key_ids.join(" "));
            println!("key owners:  {}", p.key_owners.join(" "));
            println!("on anomaly:  {}", p.on_anomaly);
            rule_rows(&rules);
            Ok(())
        }
        ProxyCmd::Rm { name } => {
            cl.delete_proxy(pb::ProxyNameRequest { name: name.clone() })
                .await?;
            eprintln!("deleted proxy {name} and its rules");
            Ok(())
        }
        ProxyCmd::Test {
            name,
            method,
            path,
            headers,
            json,
        } => {
            let r = cl
                .test(pb::ProxyTestRequest {
                    proxy: name,
                    method,
                    path,
                    headers: conds(&headers, "--header")?,
                    query: String::new(),
                })
                .await?
                .into_inner();
            if json {
                return json_out(&serde_json::json!({
                    "effect": r.effect, "rule": r.rule, "reason": r.reason,
                    "trace": r.trace.iter().map(|t| serde_json::json!({
                        "id": t.id, "priority": t.priority, "effect": t.effect,
                        "matched": t.matched, "why_not": t.why_not,
                    })).collect::<Vec<_>>(),
                }));
            }
            println!(
                "{} ({})",
                r.effect.to_uppercase(),
                if r.rule.is_empty() {
                    "default".to_owned()
                } else {
                    format!("rule {}", r.rule)
                }
            );
            println!("{}", r.reason);
            for t in &r.trace {
                println!(
                    "  {:>5} {:<24} {:<5} {}",
                    t.priority,
                    t.id,
                    t.effect,
                    if t.matched {
                        "matched".to_owned()
                    } else {
                        format!("no: {}", t.why_not)
                    }
                );
            }
            Ok(())
        }
        ProxyCmd::Requests {
            name,
            processed_after,
            processed_before,
            limit,
            json,
        } => {
            let r = cl
                .requests(pb::RequestsQuery {
                    proxy: name,
                    processed_after: processed_after.unwrap_or(0),
                    processed_before: processed_before.unwrap_or(0),
                    limit,
                })
                .await?
                .into_inner();
            if json {
                return json_out(&serde_json::Value::Array(
                    r.entries
                        .iter()
                        .map(|e| {
                            serde_json::json!({
                                "time_us": e.time_us, "proxy": e.proxy, "caller": e.caller,
                                "method": e.method, "path": e.path, "status": e.status,
                                "latency_us": e.latency_us, "bytes_in": e.bytes_in,
                                "bytes_out": e.bytes_out, "decision": e.decision, "rule": e.rule,
                            })
                        })
                        .collect(),
                ));
            }
            table(
                &[
                    "TIME",
                    "CALLER",
                    "METHOD",
                    "PATH",
                    "STATUS",
                    "DECISION",
                    "RULE",
                    "LATENCY_MS",
                ],
                r.entries
                    .iter()
                    .map(|e| {
                        vec![
                            ts(e.time_us / 1_000_000),
                            e.caller.clone(),
                            e.method.clone(),
                            e.path.clone(),
                            e.status.to_string(),
                            e.decision.clone(),
                            e.rule.clone(),
                            format!("{:.1}", e.latency_us as f64 / 1000.0),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        ProxyCmd::Telemetry {
            name,
            interval,
            limit,
            json,
        } => {
            let r = cl
                .telemetry(pb::TelemetryRequest {
                    proxy: name,
                    interval,
                    limit,
                })
                .await?
                .into_inner();
            let anomalies = |b: &pb::TelemetryBucket| {
                let mut v: Vec<String> = b
                    .anomalies
                    .iter()
                    .map(|(k, n)| format!("{k}={n}"))
                    .collect();
                v.sort();
                v.join(",")
            };
            if json {
                return json_out(&serde_json::json!({
                    "proxy": r.proxy,
                    "interval": r.interval,
                    "buckets": r.buckets.iter().map(|b| {
                        let an: serde_json::Map<String, serde_json::Value> = b
                            .anomalies
                            .iter()
                            .map(|(k, n)| (k.clone(), serde_json::Value::from(*n)))
                            .collect();
                        serde_json::json!({
                            "start": b.start, "requests": b.requests,
                            "status_2xx": b.status_2xx, "status_3xx": b.status_3xx,
                            "status_4xx": b.status_4xx, "status_5xx": b.status_5xx,
                            "denied": b.denied, "rate_limited": b.rate_limited,
                            "unauthenticated": b.unauthenticated, "errors": b.errors,
                            "suspended": b.suspended,
                            "p50_latency_us": b.p50_latency_us, "p95_latency_us": b.p95_latency_us,
                            "anomalies": an,
                        })
                    }).collect::<Vec<_>>(),
                    "suspended": r.suspended.iter().map(|s| serde_json::json!({
                        "caller": s.caller, "since_us": s.since_us, "kind": s.kind,
                    })).collect::<Vec<_>>(),
                }));
            }
            table(
                &[
                    "START",
                    "REQ",
                    "2XX",
                    "3XX",
                    "4XX",
                    "5XX",
                    "DENIED",
                    "LIMITED",
                    "UNAUTH",
                    "ERRORS",
                    "SUSP",
                    "P50_MS",
                    "P95_MS",
                    "ANOMALIES",
                ],
                r.buckets
                    .iter()
                    .map(|b| {
                        vec![
                            ts(b.start),
                            b.requests.to_string(),
                            b.status_2xx.to_string(),
                            b.status_3xx.to_string(),
                            b.status_4xx.to_string(),
                            b.status_5xx.to_string(),
                            b.denied.to_string(),
                            b.rate_limited.to_string(),
                            b.unauthenticated.to_string(),
                            b.errors.to_string(),
                            b.suspended.to_string(),
                            format!("{:.1}", b.p50_latency_us as f64 / 1000.0),
                            format!("{:.1}", b.p95_latency_us as f64 / 1000.0),
                            anomalies(b),
                        ]
                    })
                    .collect(),
            );
            for s in &r.suspended {
                println!(
                    "suspended: {} since {} ({})",
                    s.caller,
                    ts(s.since_us / 1_000_000),
                    s.kind
                );
            }
            Ok(())
        }
        ProxyCmd::Unsuspend { name, caller } => {
            cl.unsuspend(pb::UnsuspendRequest {
                proxy: name.clone(),
                caller: caller.clone(),
            })
            .await?;
            eprintln!("cleared the suspension of {caller} on proxy {name}");
            Ok(())
        }
        ProxyCmd::Ca => {
            let r = cl
                .ca_certificate(pb::ProxyListRequest {})
                .await?
                .into_inner();
            print!("{}", r.pem);
            Ok(())
        }
    }
}

pub async fn rule(socket: &Path, c: RuleCmd) -> Res {
    let mut cl = connect(socket).await?;
    match c {
        RuleCmd::Add {
            proxy,
            id,
            priority,
            allow,
            deny: _,
            methods,
            path,
            headers,
            query,
            note,
        } => {
            let r = cl
                .put_rule(pb::PutRuleRequest {
                    rule: Some(pb::ProxyRule {
                        proxy,
                        id,
                        priority,
                        effect: if allow { "allow" } else { "deny" }.into(),
                        methods,
                        path,
                        headers: conds(&headers, "--header")?,
                        query: conds(&query, "--query")?,
                        notes: note,
                        created_at: 0,
                    }),
                })
                .await?
                .into_inner();
            eprintln!(
                "rule {} of proxy {}: priority {} {} {}",
                r.id, r.proxy, r.priority, r.effect, r.path
            );
            Ok(())
        }
        RuleCmd::Ls { proxy, json } => {
            let rules = cl
                .list_rules(pb::ProxyNameRequest { name: proxy })
                .await?
                .into_inner()
                .rules;
            if json {
                return json_out(&serde_json::Value::Array(
                    rules.iter().map(rule_json).collect(),
                ));
            }
            rule_rows(&rules);
            Ok(())
        }
        RuleCmd::Rm { proxy, id } => {
            cl.delete_rule(pb::ProxyRuleRef {
                proxy: proxy.clone(),
                id: id.clone(),
            })
            .await?;
            eprintln!("deleted rule {id} of proxy {proxy}");
            Ok(())
        }
    }
}
