//! `keyseald`: the keyseal daemon. Serves the gRPC API on a Unix socket.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use keyseal::api::DaemonState;
use keyseal::config::{Config, LogFormat, DEFAULT_CONFIG_PATH};
use keyseal::daemon::{bind_socket, sd_notify, serve, serve_credentials};
use keyseal::exit;
use keyseal::policy::{Policy, PolicyHandle};
use keyseal::secrets::SecretStore;
use keyseal::store::Store;

// Opt-in (`--features mimalloc`): glibc malloc is ~12% of keyseald's CPU
// under gRPC load, but mimalloc kept ~4x the resident memory in the soak
// (333 vs 81 MiB), so the default stays glibc (docs/performance.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "keyseald",
    version,
    about = "keyseal daemon: secrets sealed under a hardware root of trust"
)]
struct Args {
    /// Path of the TOML config file.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: std::path::PathBuf,
    /// Check the config and policy, open the root device and the store, then exit.
    #[arg(long)]
    check: bool,
}

fn fail(code: i32, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("keyseald: {msg}");
    ExitCode::from(code as u8)
}

fn init_logging(cfg: &Config) {
    // tss_esapi logs expected TPM failures at ERROR; keyseald reports them
    // itself in one line, so it is silenced unless KEYSEAL_LOG asks for it.
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYSEAL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{},tss_esapi=off", cfg.log_level))
    });
    // No colour escapes in journald or a log file, only on a terminal.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => b.json().with_current_span(true).init(),
        LogFormat::Human => b.init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // tpm2-tss logs expected failures (e.g. integrity errors) to stderr;
    // keyseal reports them itself.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+NONE");
    }
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(exit::CONFIG, e),
    };
    // The PIN is in memory now; take it out of /proc/<pid>/environ while
    // this process still has one thread.
    if let Some(var) = &cfg.pin_env_var {
        keyseal::hardening::scrub_env_var(var);
    }
    init_logging(&cfg);
    let hardening = match keyseal::hardening::harden(cfg.lock_memory) {
        Ok(h) => h,
        Err(e) => return fail(exit::CONFIG, e),
    };
    if let Some(note) = &hardening.memory_lock_note {
        tracing::warn!(note = %note, "memory not locked");
    }
    let policy = match &cfg.policy_path {
        Some(p) => match Policy::load(p) {
            Ok(p) => p,
            Err(e) => return fail(exit::CONFIG, format!("policy: {e}")),
        },
        None => {
            tracing::warn!("no policy.path configured: every request is denied");
            Policy::empty()
        }
    };
    let root = match cfg.root.open() {
        Ok(r) => r,
        Err(e) => return fail(exit::of_root(&e), e),
    };
    if !cfg.store_path.exists() {
        // Never create a store implicitly: that is `keyseal init`'s job.
        return fail(
            exit::CONFIG,
            format!(
                "store {} does not exist: run `keyseal init --config {}` first (or fix store.path)",
                cfg.store_path.display(),
                args.config.display()
            ),
        );
    }
    let store = match Store::open_tuned(&cfg.store_path, cfg.disk_limits, cfg.store_cache_bytes) {
        Ok(s) => s,
        Err(e) => {
            let code = match e {
                keyseal::store::StoreError::SchemaTooNew { .. } => exit::CONFIG,
                _ => exit::IO,
            };
            return fail(code, e);
        }
    };
    let secrets = match SecretStore::open(store, root, cfg.secrets_config()) {
        Ok(s) => Arc::new(s),
        Err(keyseal::secrets::SecretsError::NotInitialised) => {
            return fail(
                exit::CONFIG,
                format!(
                    "store {} is not initialised: run `keyseal init --config {}` first",
                    cfg.store_path.display(),
                    args.config.display()
                ),
            )
        }
        Err(e) => return fail(exit::of_secrets(&e), e),
    };
    let apikeys = match keyseal::apikeys::ApiKeys::open(&secrets, cfg.apikeys.clone()) {
        Ok(a) => Arc::new(a),
        Err(keyseal::apikeys::ApiKeyError::Secrets(e)) => {
            return fail(exit::of_secrets(&e), format!("api keys: {e}"))
        }
        Err(e) => return fail(exit::FAILURE, format!("api keys: {e}")),
    };
    if args.check {
        println!("keyseald: config, policy, root device and store are OK");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("KEYSEAL_WORKERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(2)
                }),
        )
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(exit::FAILURE, format!("cannot start the runtime: {e}")),
    };
    rt.block_on(run(
        cfg,
        args.config,
        secrets,
        PolicyHandle::new(policy),
        hardening,
        apikeys,
    ))
}

async fn run(
    cfg: Config,
    config_path: std::path::PathBuf,
    secrets: Arc<SecretStore>,
    policy: PolicyHandle,
    hardening: keyseal::hardening::HardeningReport,
    apikeys: Arc<keyseal::apikeys::ApiKeys>,
) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = match keyseal::daemon::listener_from_env_or_bind(
        &cfg.socket,
        cfg.socket_mode,
        cfg.socket_group.as_deref(),
    ) {
        Ok(l) => l,
        Err(e) => {
            return fail(
                exit::CANT_CREATE,
                format!("cannot listen on {}: {e}", cfg.socket.display()),
            )
        }
    };
    let creds = match &cfg.credentials_socket {
        Some(p) => match bind_socket(p, 0o600, None).and_then(tokio::net::UnixListener::from_std) {
            Ok(l) => Some(l),
            Err(e) => {
                return fail(
                    exit::CANT_CREATE,
                    format!("cannot listen on {}: {e}", p.display()),
                )
            }
        },
        None => None,
    };
    let keys = match keyseal::keys::Keys::open(secrets.envelope().root().clone(), secrets.store()) {
        Ok(k) => Arc::new(k),
        Err(e) => return fail(exit::IO, format!("cannot open the key registry: {e}")),
    };
    let proxies = match keyseal::proxy::ProxyStore::open(secrets.clone()) {
        Ok(p) => Arc::new(p),
        Err(e) => return fail(exit::IO, format!("cannot open the proxy store: {e}")),
    };
    let audit = if cfg.audit_unsafe_disable {
        tracing::warn!("audit.unsafe_disable = true: NOTHING IS AUDITED (for measurement only; never in production)");
        None
    } else {
        match keyseal::audit::AuditLog::open(&secrets, cfg.audit.clone()) {
            Ok(a) => Some(Arc::new(a)),
            Err(e) => return fail(exit::IO, format!("cannot open the audit log: {e}")),
        }
    };
    let device = match keyseal::api::device::DevicePool::for_this_machine() {
        Ok(d) => Arc::new(d),
        Err(e) => {
            return fail(
                exit::FAILURE,
                format!("cannot start the device threads: {e}"),
            )
        }
    };
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state = Arc::new(DaemonState {
        secrets: secrets.clone(),
        policy: policy.clone(),
        started: Instant::now(),
        hardening,
        events,
        request_timeout: cfg.request_timeout,
        apikeys,
        keys,
        shutdown: stop_rx.clone(),
        proxies: proxies.clone(),
        audit: audit.clone(),
        device,
    });
    state
        .audit_lifecycle(
            "daemon.start",
            keyseal::audit::Outcome::Ok,
            &[("version", env!("CARGO_PKG_VERSION").to_owned())],
        )
        .await;
    // An interrupted root rotation resumes in the background.
    if let Ok(Some(to)) = secrets.pending_rotation() {
        tracing::warn!(to, "resuming an interrupted root rotation");
        let s = secrets.clone();
        let st = state.clone();
        tokio::spawn(async move {
            let out = tokio::task::spawn_blocking(move || {
                s.rotate_root(&mut |_| std::ops::ControlFlow::Continue(()))
            })
            .await;
            match out {
                Ok(Ok(o)) => {
                    tracing::info!(outcome = ?o, "resumed root rotation finished");
                    if let keyseal::secrets::RotationOutcome::Completed {
                        from,
                        to,
                        rewrapped,
                    } = o
                    {
                        st.audit_rotation_completed(from, to, rewrapped, true).await;
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "resumed root rotation failed; run `keyseal root rotate`")
                }
                Err(_) => tracing::error!("the resumed root rotation's worker failed"),
            }
        });
    }
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => return fail(exit::FAILURE, "cannot install signal handlers"),
    };
    let policy_path = cfg.policy_path.clone();
    let sig_state = state.clone();
    let signals = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    match &policy_path {
                        Some(p) => match policy.reload_from(p) {
                            Ok(()) => {
                                tracing::info!(rules = policy.current().rule_count(), "policy reloaded");
                                sd_notify("STATUS=policy reloaded");
                                sig_state.audit_lifecycle("policy.reload", keyseal::audit::Outcome::Ok,
                                    &[("rules", policy.current().rule_count().to_string())]).await;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "policy reload rejected; keeping the old policy");
                                sig_state.audit_lifecycle("policy.reload", keyseal::audit::Outcome::Error,
                                    &[("kept", "old policy".to_owned())]).await;
                            }
                        },
                        None => tracing::warn!("SIGHUP: no policy.path configured"),
                    }
                }
            }
        }
        tracing::info!("shutting down: finishing in-flight requests");
        sd_notify("STOPPING=1");
        let _ = stop_tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let gateway = Arc::new(keyseal::proxy::server::Gateway::new(
        state.clone(),
        proxies,
        cfg.proxy.clone(),
    ));
    if let Err(e) = keyseal::proxy::server::run(gateway, stop_rx.clone()).await {
        return fail(exit::CANT_CREATE, e);
    }
    if let Some(l) = creds {
        tokio::spawn(serve_credentials(
            state.clone(),
            l,
            vec![0],
            wait(stop_rx.clone()),
        ));
    }
    tracing::info!(
        socket = %cfg.socket.display(),
        backend = %secrets.envelope().root().kind(),
        root_version = secrets.envelope().active_version(),
        config = %config_path.display(),
        "keyseald ready"
    );
    sd_notify(&format!(
        "READY=1\nSTATUS=serving on {}",
        cfg.socket.display()
    ));
    let res = serve(state.clone(), listener, wait(stop_rx)).await;
    signals.abort();
    let flush_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    if let Err(e) = state.proxies.telemetry().flush(flush_at) {
        tracing::warn!(error = %e, "final telemetry flush failed");
    }
    state
        .audit_lifecycle("daemon.stop", keyseal::audit::Outcome::Ok, &[])
        .await;
    if let Some(a) = &audit {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Err(e) = a.close(now) {
            tracing::error!(error = %e, "final audit checkpoint failed");
        }
    }
    match res {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(exit::FAILURE, format!("server error: {e}")),
    }
}
