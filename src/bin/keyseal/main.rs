//! `keyseal`: the admin CLI. Talks to `keyseald` over its Unix socket,
//! except `init`, which sets up the root device and store before the daemon
//! can start.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

mod apikey;

mod audit;
mod key;

mod proxy;

use clap::{CommandFactory, Parser, Subcommand};
use keyseal::api::pb;
use keyseal::client::{Client, SOCKET_ENV};
use keyseal::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_SOCKET};
use keyseal::exit;
use tonic::Code;
use zeroize::Zeroizing;

#[derive(Parser, Debug)]
#[command(
    name = "keyseal",
    version,
    about = "Admin CLI for keyseald (secrets sealed under a hardware root of trust)"
)]
struct Cli {
    /// Daemon socket.
    #[arg(long, global = true, env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Secrets: put, get, ls, history, rm, undelete, destroy, watch.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// The signed audit log: export, verify (offline), tail, query, hash.
    #[command(subcommand)]
    Audit(audit::Cmd),
    /// Signing keys held in the root device: create, sign, verify, rotate, jwks.
    #[command(subcommand)]
    Key(key::Cmd),
    /// API keys: issue, ls, show, rotate, revoke, verify.
    #[command(subcommand)]
    Apikey(apikey::Cmd),
    /// Proxy targets (upstreams) and their sealed credentials.
    #[command(subcommand)]
    Target(proxy::TargetCmd),
    /// Credential-injecting proxies: put, ls, show, rm, test, requests.
    #[command(subcommand)]
    Proxy(proxy::ProxyCmd),
    /// Rules of a proxy: add, ls, rm.
    #[command(subcommand)]
    Rule(proxy::RuleCmd),
    /// Find keyseal API keys in files; exits 1 when one is live or unknown (pre-commit hook).
    Scan(apikey::ScanArgs),
    /// Daemon status: root backend and key version, counts, cache.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Root key operations.
    #[command(subcommand)]
    Root(RootCmd),
    /// Run a command with secrets in its environment; its exit code is passed through.
    Run {
        /// VAR=SECRET_NAME (repeatable).
        #[arg(long = "env", value_name = "VAR=NAME", required = true)]
        env: Vec<String>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// First-time setup: create root key version 1 on the device and initialise the store (explicit; never implicit).
    Init {
        /// keyseald config file (the daemon must not be running).
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

#[derive(Subcommand, Debug)]
enum SecretCmd {
    /// Store a new version; the value comes from stdin or --from-file, never argv.
    Put {
        name: String,
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// Check-and-set: the version expected to be current (0: must not exist).
        #[arg(long)]
        cas: Option<u64>,
        /// Replace labels: key=value (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[arg(long)]
        max_versions: Option<u32>,
        /// Seconds after which a version is due for rotation.
        #[arg(long)]
        rotate_after: Option<u64>,
        /// Unix time after which reads fail.
        #[arg(long)]
        expires_at: Option<u64>,
    },
    /// Print a value (raw bytes) to stdout, nothing else.
    Get {
        name: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// List secrets under a prefix.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long)]
        json: bool,
    },
    /// Versions of a secret.
    History {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Soft-delete versions (default: the newest active one).
    Rm {
        name: String,
        #[arg(long, value_delimiter = ',')]
        versions: Vec<u64>,
    },
    /// Restore soft-deleted versions.
    Undelete {
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    /// Erase versions for good (ciphertext and wrapped key).
    Destroy {
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    /// Print an event line each time a watched secret changes (Ctrl-C to stop).
    Watch {
        /// Names, or prefixes ending in '/'; none: all readable.
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RootCmd {
    /// Create a new root key version, rewrap every DEK under it, retire the old one.
    Rotate,
}

/// A CLI failure: one line, a hint, an exit code.
struct Failure {
    code: i32,
    msg: String,
    hint: Option<String>,
}

impl Failure {
    fn new(code: i32, msg: impl Into<String>, hint: Option<&str>) -> Self {
        Failure {
            code,
            msg: msg.into(),
            hint: hint.map(str::to_owned),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let (code, hint) = match s.code() {
            Code::NotFound => (
                exit::NOT_FOUND,
                Some("check the name with `keyseal secret ls`"),
            ),
            Code::PermissionDenied => (
                exit::NO_PERM,
                Some("ask an admin to grant the capability in the policy file"),
            ),
            Code::Unauthenticated => (exit::NO_PERM, None),
            Code::InvalidArgument => (exit::DATA, None),
            Code::FailedPrecondition => (exit::DATA, None),
            Code::Unavailable | Code::DeadlineExceeded => (
                exit::UNAVAILABLE,
                Some("the daemon or its root device is unavailable; see `journalctl -u keyseald`"),
            ),
            Code::ResourceExhausted => (exit::IO, Some("the daemon's store is out of space")),
            Code::DataLoss => (
                exit::DATA,
                Some("the stored record failed its integrity check; restore it from backup"),
            ),
            _ => (exit::FAILURE, None),
        };
        Failure::new(code, s.message().to_owned(), hint)
    }
}

type Res = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return report(Failure::new(
                exit::FAILURE,
                format!("cannot start runtime: {e}"),
                None,
            ))
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => report(f),
    }
}

fn report(f: Failure) -> ExitCode {
    match &f.hint {
        Some(h) => eprintln!("keyseal: error: {} (hint: {h})", f.msg),
        None => eprintln!("keyseal: error: {}", f.msg),
    }
    ExitCode::from(f.code as u8)
}

async fn client(socket: &std::path::Path) -> Result<Client, Failure> {
    Client::connect(socket).await.map_err(|e| {
        // tonic's Display says only "transport error"; the cause is below it.
        let mut cause = String::new();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        let denied = cause.to_lowercase().contains("permission denied");
        Failure::new(
            exit::UNAVAILABLE,
            format!(
                "cannot connect to keyseald at {}: {}",
                socket.display(),
                if cause.is_empty() { e.to_string() } else { cause }
            ),
            Some(if denied {
                "you may not open the socket: ask an admin to add you to the socket's group (api.group)"
            } else {
                "is keyseald running? set --socket or KEYSEAL_SOCKET"
            }),
        )
    })
}

async fn dispatch(cli: Cli) -> Res {
    match cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "keyseal",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Man => {
            let man = clap_mangen::Man::new(Cli::command());
            let mut out = Vec::new();
            man.render(&mut out)
                .map_err(|e| Failure::new(exit::FAILURE, e.to_string(), None))?;
            std::io::stdout()
                .write_all(&out)
                .map_err(|e| Failure::new(exit::FAILURE, e.to_string(), None))
        }
        Cmd::Init { config } => init(&config),
        Cmd::Status { json } => status(&cli.socket, json).await,
        Cmd::Root(RootCmd::Rotate) => rotate(&cli.socket).await,
        Cmd::Run { env, command } => run(&cli.socket, env, command).await,
        Cmd::Secret(c) => secret(&cli.socket, c).await,
        Cmd::Apikey(c) => apikey::run(&cli.socket, c).await,
        Cmd::Scan(a) => apikey::scan(&cli.socket, a).await,
        Cmd::Key(c) => key::run(&cli.socket, c).await,
        Cmd::Audit(c) => audit::run(&cli.socket, c).await,
        Cmd::Target(c) => proxy::target(&cli.socket, c).await,
        Cmd::Proxy(c) => proxy::proxy(&cli.socket, c).await,
        Cmd::Rule(c) => proxy::rule(&cli.socket, c).await,
    }
}

fn init(config: &std::path::Path) -> Res {
    let cfg = Config::load(config).map_err(|e| Failure::new(exit::CONFIG, e.to_string(), None))?;
    let root = cfg
        .root
        .open()
        .map_err(|e| Failure::new(exit::of_root(&e), e.to_string(), None))?;
    let store =
        keyseal::store::Store::open_tuned(&cfg.store_path, cfg.disk_limits, cfg.store_cache_bytes)
            .map_err(|e| {
                Failure::new(
                    exit::IO,
                    e.to_string(),
                    Some("stop keyseald before running init"),
                )
            })?;
    let existed = store
        .root_state()
        .map_err(|e| Failure::new(exit::IO, e.to_string(), None))?
        .is_some();
    let st = keyseal::secrets::SecretStore::init(&store, root.as_ref())
        .map_err(|e| Failure::new(exit::of_secrets(&e), e.to_string(), None))?;
    if existed {
        println!(
            "already initialised: root key version {} on {} ({})",
            st.active,
            root.kind(),
            cfg.store_path.display()
        );
    } else {
        println!(
            "initialised: root key version {} on {}; store {}",
            st.active,
            root.kind(),
            cfg.store_path.display()
        );
    }
    Ok(())
}

fn read_value(from_file: Option<PathBuf>) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let mut buf = Zeroizing::new(Vec::new());
    match from_file {
        Some(p) => {
            *buf = std::fs::read(&p).map_err(|e| {
                Failure::new(
                    exit::DATA,
                    format!("cannot read {}: {e}", p.display()),
                    None,
                )
            })?;
        }
        None => {
            use std::io::IsTerminal;
            if std::io::stdin().is_terminal() {
                eprintln!("keyseal: reading the value from stdin (end with Ctrl-D)");
            }
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::new(exit::DATA, format!("cannot read stdin: {e}"), None))?;
        }
    }
    Ok(buf)
}

fn parse_kv(items: &[String], what: &str) -> Result<Vec<(String, String)>, Failure> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Failure::new(exit::USAGE, format!("{what} must be KEY=VALUE"), None))
        })
        .collect()
}

fn ts(t: u64) -> String {
    if t == 0 {
        return "-".into();
    }
    // UTC, no timezone database needed.
    let days = t / 86_400;
    let secs = t % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn json_out(v: &serde_json::Value) -> Res {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| Failure::new(
            exit::FAILURE,
            e.to_string(),
            None
        ))?
    );
    Ok(())
}

fn meta_json(m: &pb::SecretMeta) -> serde_json::Value {
    serde_json::json!({
        "name": m.name, "current_version": m.current_version, "created_at": m.created_at,
        "updated_at": m.updated_at, "created_by": m.created_by, "labels": m.labels,
        "rotate_after_secs": m.rotate_after_secs, "expires_at": m.expires_at, "max_versions": m.max_versions,
    })
}

async fn secret(socket: &std::path::Path, c: SecretCmd) -> Res {
    let mut cl = client(socket).await?;
    match c {
        SecretCmd::Put {
            name,
            from_file,
            cas,
            labels,
            max_versions,
            rotate_after,
            expires_at,
        } => {
            let value = read_value(from_file)?;
            let labels = parse_kv(&labels, "--label")?;
            let set_labels = !labels.is_empty();
            let r = cl
                .secrets
                .put(pb::PutRequest {
                    name,
                    value: value.to_vec(),
                    cas,
                    labels: labels.into_iter().collect(),
                    set_labels,
                    rotate_after_secs: rotate_after,
                    expires_at,
                    max_versions,
                })
                .await?
                .into_inner();
            eprintln!("stored {} version {}", r.name, r.version);
            Ok(())
        }
        SecretCmd::Get { name, version } => {
            let r = cl
                .secrets
                .get(pb::GetRequest {
                    name,
                    version: version.unwrap_or(0),
                })
                .await?
                .into_inner();
            let value = Zeroizing::new(r.value);
            let mut out = std::io::stdout().lock();
            out.write_all(&value)
                .and_then(|_| out.flush())
                .map_err(|e| Failure::new(exit::IO, format!("cannot write stdout: {e}"), None))
        }
        SecretCmd::Ls { prefix, json } => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let r = cl
                    .secrets
                    .list(pb::ListRequest {
                        prefix: prefix.clone(),
                        page_size: 1000,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(r.secrets);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            if json {
                return json_out(&serde_json::Value::Array(
                    all.iter().map(meta_json).collect(),
                ));
            }
            table(
                &["NAME", "VERSION", "UPDATED", "CREATED_BY"],
                all.iter()
                    .map(|m| {
                        vec![
                            m.name.clone(),
                            m.current_version.to_string(),
                            ts(m.updated_at),
                            m.created_by.clone(),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        SecretCmd::History { name, json } => {
            let r = cl
                .secrets
                .history(pb::HistoryRequest { name })
                .await?
                .into_inner();
            if json {
                return json_out(&serde_json::json!({
                    "meta": r.meta.as_ref().map(meta_json),
                    "versions": r.versions.iter().map(|v| serde_json::json!({
                        "version": v.version, "created_at": v.created_at, "created_by": v.created_by,
                        "state": v.state, "state_changed_at": v.state_changed_at, "root_version": v.root_version,
                    })).collect::<Vec<_>>(),
                }));
            }
            table(
                &["VERSION", "STATE", "CREATED", "CREATED_BY", "ROOT_KEY"],
                r.versions
                    .iter()
                    .map(|v| {
                        vec![
                            v.version.to_string(),
                            v.state.clone(),
                            ts(v.created_at),
                            v.created_by.clone(),
                            if v.root_version == 0 {
                                "-".into()
                            } else {
                                format!("v{}", v.root_version)
                            },
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        SecretCmd::Rm { name, versions } => {
            let r = cl
                .secrets
                .delete(pb::VersionsRequest {
                    name: name.clone(),
                    versions,
                })
                .await?
                .into_inner();
            eprintln!(
                "deleted {name} versions {:?} (undelete with `keyseal secret undelete`)",
                r.versions
            );
            Ok(())
        }
        SecretCmd::Undelete { name, versions } => {
            let r = cl
                .secrets
                .undelete(pb::VersionsRequest {
                    name: name.clone(),
                    versions,
                })
                .await?
                .into_inner();
            eprintln!("restored {name} versions {:?}", r.versions);
            Ok(())
        }
        SecretCmd::Destroy { name, versions } => {
            let r = cl
                .secrets
                .destroy(pb::VersionsRequest {
                    name: name.clone(),
                    versions,
                })
                .await?
                .into_inner();
            eprintln!(
                "destroyed {name} versions {:?} (cannot be undone)",
                r.versions
            );
            Ok(())
        }
        SecretCmd::Watch { names, json } => {
            let mut s = cl
                .secrets
                .watch(pb::WatchRequest { names })
                .await?
                .into_inner();
            while let Some(ev) = s.message().await? {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"name": ev.name, "version": ev.version, "kind": ev.kind})
                    );
                } else {
                    println!("{} {} v{}", ev.kind, ev.name, ev.version);
                }
                let _ = std::io::stdout().flush();
            }
            Ok(())
        }
    }
}

async fn status(socket: &std::path::Path, json: bool) -> Res {
    let mut cl = client(socket).await?;
    let s = cl.system.status(pb::StatusRequest {}).await?.into_inner();
    let c = s.cache.unwrap_or_default();
    if json {
        return json_out(&serde_json::json!({
            "version": s.version, "root_backend": s.root_backend, "root_key_version": s.root_key_version,
            "retired_root_versions": s.retired_root_versions, "rotating_to": s.rotating_to,
            "secrets": s.secrets, "uptime_secs": s.uptime_secs, "policy_rules": s.policy_rules,
            "memory_locked": s.memory_locked, "caller": s.caller,
            "audit": {"enabled": s.audit_enabled, "appended": s.audit_appended, "failures": s.audit_failures,
                      "batches": s.audit_batches, "tree_size": s.audit_tree_size, "last_error": s.audit_last_error},
            "disk": {"path": s.store_path, "free_bytes": s.disk_free_known.then_some(s.disk_free_bytes),
                     "min_free_bytes": s.disk_min_free_bytes, "audit_reserve_bytes": s.disk_audit_reserve_bytes,
                     "writes_refused": s.disk_writes_refused, "audit_refused": s.disk_audit_refused},
            "cache": {"entries": c.entries, "capacity": c.capacity, "hits": c.hits, "misses": c.misses,
                      "evictions": c.evictions, "root_calls": c.root_calls},
        }));
    }
    println!("keyseald {}  up {}s", s.version, s.uptime_secs);
    println!(
        "root:     {} key v{}{}",
        s.root_backend,
        s.root_key_version,
        if s.rotating_to != 0 {
            format!(" (rotating to v{})", s.rotating_to)
        } else {
            String::new()
        }
    );
    println!("secrets:  {}", s.secrets);
    println!(
        "cache:    {}/{} DEKs, {} hits, {} misses, {} evictions, {} root calls",
        c.entries, c.capacity, c.hits, c.misses, c.evictions, c.root_calls
    );
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
    if s.disk_min_free_bytes == 0 {
        println!("disk:     free-space guard off (store.min_free_bytes = 0)");
    } else if !s.disk_free_known {
        println!("disk:     free space of {} unknown", s.store_path);
    } else {
        println!(
            "disk:     {} free on {} (writes need {}, audit needs {}){}",
            mib(s.disk_free_bytes),
            s.store_path,
            mib(s.disk_min_free_bytes),
            mib(s.disk_audit_reserve_bytes),
            if s.disk_audit_refused {
                " -- WRITES AND REQUESTS REFUSED: below the audit reserve"
            } else if s.disk_writes_refused {
                " -- WRITES REFUSED: below store.min_free_bytes"
            } else {
                ""
            }
        );
    }
    println!("policy:   {} rules", s.policy_rules);
    println!(
        "memory:   {}",
        if s.memory_locked {
            "locked"
        } else {
            "not locked"
        }
    );
    if s.audit_enabled {
        println!(
            "audit:    {} events durable in {} group commits, tree size {}, {} requests failed for want of an audit record{}",
            s.audit_appended,
            s.audit_batches,
            s.audit_tree_size,
            s.audit_failures,
            if s.audit_last_error.is_empty() {
                String::new()
            } else {
                format!(" (last error: {})", s.audit_last_error)
            }
        );
    } else {
        println!("audit:    DISABLED (audit.unsafe_disable)");
    }
    println!("you:      {}", s.caller);
    Ok(())
}

async fn rotate(socket: &std::path::Path) -> Res {
    use std::io::IsTerminal;
    let mut cl = client(socket).await?;
    let mut s = cl
        .system
        .rotate_root(pb::RotateRootRequest {})
        .await?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let mut last = None;
    while let Some(p) = s.message().await? {
        // The final verification pass repeats the last figures; show them once.
        let key = (
            p.from_version,
            p.to_version,
            p.done,
            p.total,
            p.rewrapped,
            p.completed,
        );
        if last == Some(key) {
            continue;
        }
        last = Some(key);
        if p.completed {
            if tty {
                eprintln!();
            }
            eprintln!(
                "root key rotated: v{} -> v{}, {} keys rewrapped; old versions retired",
                p.from_version, p.to_version, p.rewrapped
            );
            return Ok(());
        }
        let pct = (p.done * 100).checked_div(p.total).unwrap_or(100).min(100);
        let bar = "#".repeat((pct / 5) as usize) + &" ".repeat(20 - (pct / 5) as usize);
        if tty {
            eprint!(
                "\rrotating v{} -> v{} [{bar}] {}/{} ({} rewrapped)",
                p.from_version, p.to_version, p.done, p.total, p.rewrapped
            );
        } else {
            eprintln!(
                "rotating v{} -> v{} {pct}% {}/{} ({} rewrapped)",
                p.from_version, p.to_version, p.done, p.total, p.rewrapped
            );
        }
    }
    Err(Failure::new(
        exit::FAILURE,
        "the daemon closed the rotation stream early",
        Some("run `keyseal root rotate` again to resume"),
    ))
}

async fn run(socket: &std::path::Path, env: Vec<String>, command: Vec<String>) -> Res {
    let pairs = parse_kv(&env, "--env")?;
    let mut cl = client(socket).await?;
    let mut vars: Vec<(String, Zeroizing<String>)> = Vec::new();
    for (var, name) in pairs {
        if var.is_empty() || var.contains('\0') {
            return Err(Failure::new(
                exit::USAGE,
                "--env VAR must be a non-empty variable name",
                None,
            ));
        }
        let r = cl
            .secrets
            .get(pb::GetRequest {
                name: name.clone(),
                version: 0,
            })
            .await?
            .into_inner();
        let value = Zeroizing::new(r.value);
        let text = std::str::from_utf8(&value).map_err(|_| {
            Failure::new(
                exit::DATA,
                format!(
                    "secret {name} is not UTF-8 text and cannot go into an environment variable"
                ),
                None,
            )
        })?;
        if text.contains('\0') {
            return Err(Failure::new(
                exit::DATA,
                format!("secret {name} contains a NUL byte"),
                None,
            ));
        }
        vars.push((var, Zeroizing::new(text.to_owned())));
    }
    let (prog, args) = command
        .split_first()
        .ok_or_else(|| Failure::new(exit::USAGE, "no command given", None))?;
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args);
    for (k, v) in &vars {
        cmd.env(k, v.as_str());
    }
    let status = cmd
        .status()
        .map_err(|e| Failure::new(127, format!("cannot run {prog}: {e}"), None))?;
    drop(vars);
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    if code == 0 {
        Ok(())
    } else {
        // Pass the child's exit code through without printing anything.
        std::process::exit(code)
    }
}
