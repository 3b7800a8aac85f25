//! gRPC load benchmark: `Get` of one 1 KiB secret from the real `keyseald`
//! (SoftHSM2 root, warm DEK cache) over its Unix socket, against an "echo"
//! ceiling — a bare tonic server implementing the same `Secrets` service
//! whose `Get` returns a fixed 1 KiB response with no policy, store or
//! crypto — at concurrency 1, 16 and 64; then the put rate and keyseald's
//! RSS idle and (optionally) holding 100,000 secrets. Prints markdown tables.
//!
//! Run: `cargo build --release --bins && cargo bench --bench grpc_load`.
//! The bench does not build the binaries: it runs `keyseal` and `keyseald`
//! from `target/release/` (`$CARGO_TARGET_DIR/release/` when that is set,
//! `$KEYSEAL_BENCH_BIN_DIR/` to override) and stops if they are missing.
//!
//! CPU budget: keyseald runs with `KEYSEAL_WORKERS=1` and the echo server
//! with a 1-worker tokio runtime, both as child processes; the load
//! generator is a 1-worker tokio runtime in this process. With 2 or more
//! CPUs and `taskset` available, the servers are pinned to CPU 1 and this
//! process to CPU 0 (`KEYSEAL_BENCH_PIN=0` leaves placement to the kernel).
//!
//! Env: `KEYSEAL_BENCH_SECS` measured seconds per phase (default 5, after
//! 1 s of warm-up); `KEYSEAL_BENCH_100K=1` also fills the store to 100,000
//! secrets (16 concurrent puts) and reports RSS and disk size after it.
//!
//! Audit cost: the main keyseald runs as shipped (every request audited,
//! group commit); a second keyseald on its own token with
//! `audit.unsafe_disable = true` (measurement only) serves the same Get at
//! concurrency 1 and 64, interleaved with the first, in the same run.
//!
//! The echo server is this binary re-executed with `KEYSEAL_BENCH_ROLE=echo`.
//! Both children are stopped at the end (SIGTERM, bounded wait, SIGKILL),
//! also on Ctrl-C, on a panic, and when the whole run exceeds its budget.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use keyseal::api::pb::{
    self,
    secrets_client::SecretsClient,
    secrets_server::{Secrets, SecretsServer},
    system_client::SystemClient,
};
use keyseal::testkit_hsm::softhsm_module;

mod common;
use common::*;

const ROLE_ENV: &str = "KEYSEAL_BENCH_ROLE";
const ECHO_SOCKET_ENV: &str = "KEYSEAL_BENCH_ECHO_SOCKET";
const PARENT_ENV: &str = "KEYSEAL_BENCH_PARENT";
const SECS_ENV: &str = "KEYSEAL_BENCH_SECS";
const FILL_ENV: &str = "KEYSEAL_BENCH_100K";
const PIN_ENV: &str = "KEYSEAL_BENCH_PIN";

const VALUE_LEN: usize = 1024;
const SECRET_NAME: &str = "bench/get-1k";
const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// The extra multi-channel phase: one channel per this many tasks.
const TASKS_PER_CHANNEL: usize = 16;
const LOADGEN_WORKERS: usize = 1;
const SERVER_WORKERS: usize = 1;
const WARMUP: Duration = Duration::from_secs(1);
const DEFAULT_SECS: f64 = 5.0;
const FILL_TARGET: u64 = 100_000;
const FILL_CONCURRENCY: usize = 16;
/// Upper bound of the 100k fill phase; the bench reports how far it got.
const FILL_MAX: Duration = Duration::from_secs(20 * 60);

fn main() {
    if std::env::var(ROLE_ENV).as_deref() == Ok("echo") {
        echo_main();
        return;
    }
    let setup = match Setup::from_env() {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("grpc_load: {msg}");
            std::process::exit(2);
        }
    };
    // Pin before the runtime exists, so every thread of this process
    // (the load generator) inherits CPU 0.
    if setup.pin {
        pin_self_to_cpu0();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(LOADGEN_WORKERS)
        .enable_all()
        .build()
        .unwrap();
    let budget = setup.time_budget();
    let code = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).unwrap();
        let mut term = signal(SignalKind::terminate()).unwrap();
        // Dropping `run` (any arm but the first) drops its child guards,
        // which stop keyseald and the echo server.
        tokio::select! {
            () = run(&setup) => 0,
            _ = int.recv() => { eprintln!("grpc_load: interrupted; stopping the servers"); 130 }
            _ = term.recv() => { eprintln!("grpc_load: terminated; stopping the servers"); 143 }
            () = tokio::time::sleep(budget) => {
                eprintln!("grpc_load: exceeded its time budget of {} s; stopping the servers", budget.as_secs());
                1
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

/// What the run needs from its environment, checked before anything starts.
struct Setup {
    bins: Bins,
    module: PathBuf,
    measure: Duration,
    fill: bool,
    pin: bool,
    cpus: usize,
}

impl Setup {
    fn from_env() -> Result<Setup, String> {
        let bins = Bins::find("grpc_load")?;
        let module = softhsm_module().ok_or(
            "libsofthsm2.so not found: apt-get install softhsm2 (the bench needs a SoftHSM2 token)",
        )?;
        let secs = match std::env::var(SECS_ENV) {
            Ok(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && *s <= 600.0)
                .ok_or(format!("{SECS_ENV}={v}: expected seconds in (0, 600]"))?,
            Err(_) => DEFAULT_SECS,
        };
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let pin = std::env::var(PIN_ENV).as_deref() != Ok("0") && cpus >= 2 && have_taskset();
        Ok(Setup {
            bins,
            module,
            measure: Duration::from_secs_f64(secs),
            fill: std::env::var(FILL_ENV).as_deref() == Ok("1"),
            pin,
            cpus,
        })
    }

    /// Hard bound of the whole run: setup, the Get phases, the put-rate
    /// phases and (when enabled) the fill, each with generous slack.
    fn time_budget(&self) -> Duration {
        let phase = WARMUP + self.measure + REQUEST_TIMEOUT;
        let get_phases = 2 * (CONCURRENCY.len() as u32 + 1);
        let fill = if self.fill {
            FILL_MAX + REQUEST_TIMEOUT
        } else {
            Duration::ZERO
        };
        Duration::from_secs(180) + phase * (get_phases + 6) + fill
    }

    /// CPU list for the servers: CPU 1 when pinning.
    fn server_cpus(&self) -> Option<&'static str> {
        self.pin.then_some("1")
    }
}

// ---------------------------------------------------------------- echo role

/// The ceiling: the same generated service, a fixed response, nothing else.
struct Echo {
    resp: pb::GetResponse,
}

#[tonic::async_trait]
impl Secrets for Echo {
    async fn get(
        &self,
        _req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        Ok(Response::new(self.resp.clone()))
    }
    async fn put(&self, _: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn history(
        &self,
        _: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn delete(
        &self,
        _: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn undelete(
        &self,
        _: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn destroy(
        &self,
        _: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type WatchStream = tokio_stream::Empty<Result<pb::WatchEvent, Status>>;
    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

/// The echo server process: serves until SIGTERM or until the bench dies.
fn echo_main() {
    // Never outlive the bench, even when it is killed.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    if std::env::var(PARENT_ENV).ok() != Some(std::os::unix::process::parent_id().to_string()) {
        return; // the parent died before the death signal was armed
    }
    let path = PathBuf::from(std::env::var_os(ECHO_SOCKET_ENV).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(SERVER_WORKERS)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let echo = Echo {
            resp: pb::GetResponse {
                name: SECRET_NAME.to_owned(),
                version: 1,
                value: value_1k(),
                created_at: 1_700_000_000,
            },
        };
        let mut term = signal(SignalKind::terminate()).unwrap();
        tonic::transport::Server::builder()
            .add_service(SecretsServer::new(echo))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async move {
                    term.recv().await;
                },
            )
            .await
            .unwrap();
    });
}

fn value_1k() -> Vec<u8> {
    (0..VALUE_LEN).map(|i| (i % 251) as u8).collect()
}

/// Apparent and allocated bytes of everything under `dir`.
fn disk_usage(dir: &Path) -> (u64, u64) {
    let mut apparent = 0;
    let mut allocated = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                let (a, b) = disk_usage(&e.path());
                apparent += a;
                allocated += b;
            } else {
                apparent += m.len();
                allocated += m.blocks() * 512;
            }
        }
    }
    (apparent, allocated)
}

// ----------------------------------------------------------- measurement

/// One measured Get phase.
struct GetRow {
    server: &'static str,
    conc: usize,
    channels: usize,
    m: Phase,
}

impl GetRow {
    /// Which side ran out of CPU: the one using ≥ 90% of a core. "neither"
    /// means both waited (on each other, on I/O, or on other processes).
    fn saturated(&self) -> &'static str {
        match (self.m.server_cores >= 0.9, self.m.loadgen_cores >= 0.9) {
            (true, true) => "both",
            (true, false) => "server",
            (false, true) => "load generator",
            (false, false) => "neither",
        }
    }
}

/// `conc` tasks loop `Get` over `channels` channels (task i uses channel
/// i·channels/conc) for the warm-up and then the measured window; a request
/// counts when it completes inside the window.
async fn get_phase(
    server: &'static str,
    socket: &Path,
    server_pid: u32,
    conc: usize,
    channels: usize,
    measure: Duration,
) -> GetRow {
    let mut chans = Vec::with_capacity(channels);
    for _ in 0..channels {
        chans.push(connect(socket).await.unwrap());
    }
    let clients: Arc<Vec<SecretsClient<Channel>>> = Arc::new(
        (0..conc)
            .map(|i| SecretsClient::new(chans[i * channels / conc].clone()))
            .collect(),
    );
    let m = closed_loop(conc, WARMUP, measure, server_pid, move |i| {
        let mut client = clients[i].clone();
        async move {
            let r = client
                .get(pb::GetRequest {
                    name: SECRET_NAME.to_owned(),
                    version: 0,
                })
                .await;
            matches!(r, Ok(resp) if resp.get_ref().value.len() == VALUE_LEN)
        }
    })
    .await;
    GetRow {
        server,
        conc,
        channels,
        m,
    }
}

/// Result of a put phase.
struct PutStats {
    puts: usize,
    errors: u64,
    wall: Duration,
    p50: Duration,
    p99: Duration,
}

impl PutStats {
    fn rate(&self) -> f64 {
        self.puts as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// `conc` tasks put new secrets `bench/fill/NNNNNN` (1 KiB) with indices
/// from `next` until `limit` or `max` elapses; progress every 15 s if asked.
async fn put_phase(
    ch: &Channel,
    conc: usize,
    next: &Arc<AtomicU64>,
    limit: u64,
    max: Duration,
    progress: bool,
) -> PutStats {
    let start = Instant::now();
    let deadline = start + max;
    let errors = Arc::new(AtomicU64::new(0));
    let value = value_1k();
    let mut tasks = Vec::with_capacity(conc);
    for _ in 0..conc {
        let mut client = SecretsClient::new(ch.clone());
        let (next, errors, value) = (next.clone(), errors.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let t = Instant::now();
                let r = client
                    .put(pb::PutRequest {
                        name: format!("bench/fill/{i:06}"),
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("grpc_load: put failed: {e}");
                        }
                    }
                }
            }
            lat
        }));
    }
    let reporter = progress.then(|| {
        let next = next.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                let n = next.load(Ordering::Relaxed).min(limit);
                eprintln!(
                    "grpc_load:   … {n} secrets after {:.0} s",
                    start.elapsed().as_secs_f64()
                );
            }
        })
    });
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let wall = start.elapsed();
    if let Some(r) = reporter {
        r.abort();
    }
    lat.sort_unstable();
    PutStats {
        puts: lat.len(),
        errors: errors.load(Ordering::Relaxed),
        wall,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
    }
}

async fn status(ch: &Channel) -> pb::StatusResponse {
    SystemClient::new(ch.clone())
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn cache(s: &pb::StatusResponse) -> pb::CacheStats {
    s.cache.unwrap_or_default()
}

// ----------------------------------------------------------------- run

const POLICY: &str = r#"
[[rule]]
name = "bench: secrets"
capabilities = ["secret:read", "secret:write"]
names = ["**"]
[rule.match]
uid = UID

[[rule]]
name = "bench: admin"
capabilities = ["system:admin"]
[rule.match]
uid = UID
"#;

fn machine_facts(setup: &Setup) -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "machine: {} CPUs ({model}), Linux {}, load average {}",
        setup.cpus,
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        s,
        "workers: keyseald KEYSEAL_WORKERS={SERVER_WORKERS}, echo {SERVER_WORKERS} worker, load generator {LOADGEN_WORKERS} worker (tokio multi_thread runtimes)"
    );
    let _ = write!(
        s,
        "placement: {}",
        if setup.pin {
            "servers pinned to CPU 1, load generator to CPU 0 (taskset)"
        } else {
            "not pinned (kernel scheduler)"
        }
    );
    s
}

async fn run(setup: &Setup) {
    println!("grpc_load: Get of a 1 KiB secret over the Unix socket, keyseald vs echo ceiling");
    println!("{}", machine_facts(setup));
    println!(
        "phases: {} s warm-up + {} s measured; Get over one shared tonic channel per phase, plus c=64 over one channel per {TASKS_PER_CHANNEL} tasks",
        WARMUP.as_secs(),
        setup.measure.as_secs_f64()
    );

    // --- keyseald on a throwaway SoftHSM2 token
    let home = BenchHome::new(&setup.bins, &setup.module, POLICY, "");
    let d = home.path();
    let socket = home.socket.clone();
    let (mut daemon, ks) = home
        .start(
            &setup.bins,
            SERVER_WORKERS,
            setup.server_cpus(),
            "keyseald.log",
        )
        .await;
    let log = d.join("keyseald.log");

    // --- the echo ceiling: this binary, re-executed
    let echo_socket = d.join("echo.sock");
    let mut echo = ChildGuard {
        name: "echo",
        child: Some(
            command_on(&std::env::current_exe().unwrap(), setup.server_cpus())
                .env(ROLE_ENV, "echo")
                .env(ECHO_SOCKET_ENV, &echo_socket)
                .env(PARENT_ENV, std::process::id().to_string())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        ),
        log: None,
    };
    wait_ready(&mut echo, &echo_socket, |ch| async move {
        SecretsClient::new(ch)
            .get(pb::GetRequest {
                name: SECRET_NAME.into(),
                version: 0,
            })
            .await
            .is_ok()
    })
    .await;
    println!(
        "keyseald pid {} (log {}), echo pid {}",
        daemon.pid(),
        log.display(),
        echo.pid()
    );

    // --- idle RSS, then one secret read once (warms the DEK cache)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = rss_mib(daemon.pid());
    let echo_rss = rss_mib(echo.pid());
    let mut sc = SecretsClient::new(ks.clone());
    let value = value_1k();
    sc.put(pb::PutRequest {
        name: SECRET_NAME.into(),
        value: value.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = sc
        .get(pb::GetRequest {
            name: SECRET_NAME.into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, value, "keyseald returned a different value");
    let before = status(&ks).await;
    println!(
        "keyseald: backend {}, memory locked: {}, DEK cache capacity {}",
        before.root_backend,
        before.memory_locked,
        cache(&before).capacity
    );

    // --- Get phases, keyseald and echo interleaved per concurrency
    let mut rows = Vec::new();
    let plan: Vec<(usize, usize)> = CONCURRENCY
        .iter()
        .map(|&c| (c, 1))
        .chain([(64, 64 / TASKS_PER_CHANNEL)])
        .collect();
    for &(conc, channels) in &plan {
        for (name, sock, pid) in [
            ("keyseald", &socket, daemon.pid()),
            ("echo", &echo_socket, echo.pid()),
        ] {
            daemon.check_alive();
            echo.check_alive();
            eprintln!("grpc_load: Get {name} c={conc} channels={channels}");
            rows.push(get_phase(name, sock, pid, conc, channels, setup.measure).await);
        }
    }
    let after = status(&ks).await;
    let (cb, ca) = (cache(&before), cache(&after));
    let rss_after_get = rss_mib(daemon.pid());
    let threads = proc_status_field(daemon.pid(), "Threads").unwrap_or(0);

    println!();
    println!("### Get (1 KiB value)");
    println!();
    println!("| server | concurrency | channels | requests/s | p50 | p99 | server CPU (cores) | server CPU/request | load-gen CPU (cores) | saturated | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {:.2} | {:.1} µs | {:.2} | {} | {} |",
            r.server,
            r.conc,
            r.channels,
            r.m.rps,
            fmt_dur(r.m.p50),
            fmt_dur(r.m.p99),
            r.m.server_cores,
            r.m.server_cpu_per_req().as_secs_f64() * 1e6,
            r.m.loadgen_cores,
            r.saturated(),
            r.m.errors
        );
    }
    println!();
    println!("| concurrency | channels | keyseald/echo requests/s | echo/keyseald server CPU per request | keyseald/echo p50 | keyseald/echo p99 |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut goal = None;
    for pair in rows.chunks(2) {
        let (k, e) = (&pair[0], &pair[1]);
        let ratio = k.m.rps / e.m.rps.max(1e-9);
        // What the throughput ratio would be with both servers CPU-bound on
        // one core; steadier than `ratio` when the load generator or other
        // processes limit the echo phase.
        let cpu_ratio = e.m.server_cpu_per_req().as_secs_f64()
            / k.m.server_cpu_per_req().as_secs_f64().max(1e-12);
        if k.conc == 64 && k.channels == 1 {
            goal = Some((ratio, cpu_ratio));
        }
        println!(
            "| {} | {} | {:.0}% | {:.0}% | {:.2}× | {:.2}× |",
            k.conc,
            k.channels,
            ratio * 100.0,
            cpu_ratio * 100.0,
            k.m.p50.as_secs_f64() / e.m.p50.as_secs_f64().max(1e-12),
            k.m.p99.as_secs_f64() / e.m.p99.as_secs_f64().max(1e-12),
        );
    }
    println!();
    if let Some((g, c)) = goal {
        println!(
            "goal (Get at c=64 ≥ 60% of echo requests/s): {:.0}% — {} (server-CPU ratio {:.0}%)",
            g * 100.0,
            if g >= 0.60 { "met" } else { "MISSED" },
            c * 100.0
        );
    }
    println!(
        "DEK cache across the Get phases: root_calls {} -> {} (delta {}), hits +{}, misses +{}",
        cb.root_calls,
        ca.root_calls,
        ca.root_calls - cb.root_calls,
        ca.hits - cb.hits,
        ca.misses - cb.misses
    );
    println!(
        "keyseald threads after the Get phases: {threads} (1 worker + main + blocking pool + sled/SoftHSM threads)"
    );

    // --- audit cost: the same Get against a keyseald with no audit sink
    audit_cost(setup, &socket, &mut daemon).await;

    // --- put rate, then (optionally) fill to 100,000 secrets
    println!();
    println!("### Put (1 KiB value, new name each)");
    println!();
    println!("| concurrency | puts | puts/s | p50 | p99 | errors |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let next = Arc::new(AtomicU64::new(0));
    let mut rate16 = 0.0;
    for conc in [1, FILL_CONCURRENCY] {
        daemon.check_alive();
        eprintln!("grpc_load: Put c={conc}");
        let p = put_phase(&ks, conc, &next, FILL_TARGET, setup.measure, false).await;
        println!(
            "| {conc} | {} | {:.0} | {} | {} | {} |",
            p.puts,
            p.rate(),
            fmt_dur(p.p50),
            fmt_dur(p.p99),
            p.errors
        );
        rate16 = p.rate();
    }
    let done = next.load(Ordering::Relaxed).min(FILL_TARGET);
    let estimate = (FILL_TARGET - done) as f64 / rate16.max(1e-9);
    println!();
    println!(
        "estimated time to reach {FILL_TARGET} secrets at c={FILL_CONCURRENCY}: {estimate:.0} s{}",
        if estimate > 180.0 {
            " (more than 3 minutes)"
        } else {
            ""
        }
    );

    println!();
    println!("### keyseald memory and store size");
    println!();
    println!("| when | secrets | VmRSS | VmHWM | store on disk (apparent / allocated) |");
    println!("|---|---:|---:|---:|---:|");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let store_dir = d.join("store");
    let kpid = daemon.pid();
    let mem_row = |when: &str, secrets: u64| {
        let (app, alloc) = disk_usage(&store_dir);
        println!(
            "| {when} | {secrets} | {:.1} MiB | {:.1} MiB | {:.1} MiB / {:.1} MiB |",
            rss_mib(kpid),
            proc_status_field(kpid, "VmHWM").unwrap_or(0) as f64 / 1024.0,
            mib(app),
            mib(alloc)
        );
    };
    println!("| idle, after start (before any secret) | 0 | {rss_idle:.1} MiB | | |");
    println!("| after the Get phases | 1 | {rss_after_get:.1} MiB | | |");
    let s = status(&ks).await;
    mem_row("after the put-rate phases", s.secrets);
    if setup.fill {
        daemon.check_alive();
        eprintln!("grpc_load: filling to {FILL_TARGET} secrets at c={FILL_CONCURRENCY}");
        let p = put_phase(&ks, FILL_CONCURRENCY, &next, FILL_TARGET, FILL_MAX, true).await;
        let s = status(&ks).await;
        mem_row(
            &format!(
                "after filling to {FILL_TARGET} ({} puts at c={FILL_CONCURRENCY} in {:.0} s, {:.0}/s)",
                p.puts,
                p.wall.as_secs_f64(),
                p.rate()
            ),
            s.secrets,
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        mem_row("5 s later, idle", s.secrets);
        if p.errors > 0 {
            println!("fill: {} puts failed", p.errors);
        }
    } else {
        println!();
        println!(
            "(set {FILL_ENV}=1 to fill the store to {FILL_TARGET} secrets and measure RSS then)"
        );
    }
    println!();
    println!(
        "(the audit log lives in the store's sled database: the store size and RSS include it)"
    );
    println!();
    println!("echo server RSS idle: {echo_rss:.1} MiB");

    // --- stop both children
    drop(ks);
    let e = echo.stop();
    let k = daemon.stop();
    println!("stopping: echo {e}; keyseald {k}");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let bad: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains(" WARN "))
        .collect();
    if !bad.is_empty() {
        println!("keyseald logged {} warning/error lines, first:", bad.len());
        for l in bad.iter().take(5) {
            println!("  {l}");
        }
    }
}

/// Get at concurrency 1 and 64 against `daemon` (audit on, as shipped) and
/// a second keyseald with `audit.unsafe_disable = true`, interleaved.
async fn audit_cost(setup: &Setup, socket: &Path, daemon: &mut ChildGuard) {
    let home = BenchHome::new(
        &setup.bins,
        &setup.module,
        POLICY,
        "\n[audit]\nunsafe_disable = true\n",
    );
    let (mut off, ch) = home
        .start(
            &setup.bins,
            SERVER_WORKERS,
            setup.server_cpus(),
            "keyseald-noaudit.log",
        )
        .await;
    let mut sc = SecretsClient::new(ch.clone());
    sc.put(pb::PutRequest {
        name: SECRET_NAME.into(),
        value: value_1k(),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(ch);
    println!();
    println!("### Audit cost: Get (1 KiB) with the audit log on (as shipped) vs `audit.unsafe_disable = true`");
    println!();
    println!("| concurrency | audit on requests/s | p50 / p99 | audit off requests/s | p50 / p99 | on/off | on/off server CPU per request | errors (on/off) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut group_commits = Vec::new();
    for conc in [1, 64] {
        daemon.check_alive();
        off.check_alive();
        eprintln!("grpc_load: audit on/off c={conc}");
        let on_ch = connect(socket).await.unwrap();
        let st0 = status(&on_ch).await;
        let on_row = get_phase("audit on", socket, daemon.pid(), conc, 1, setup.measure).await;
        let st1 = status(&on_ch).await;
        let (events, batches) = (
            st1.audit_appended - st0.audit_appended,
            st1.audit_batches - st0.audit_batches,
        );
        group_commits.push(format!(
            "c={conc}: {events} audit events in {batches} group commits ({:.1} events per sync)",
            events as f64 / batches.max(1) as f64
        ));
        let off_row = get_phase("audit off", &home.socket, off.pid(), conc, 1, setup.measure).await;
        let (a, b) = (&on_row.m, &off_row.m);
        let ratio = a.rps / b.rps.max(1e-9);
        println!(
            "| {conc} | {:.0} | {} / {} | {:.0} | {} / {} | {:.0}% | {:.2}× | {}/{} |",
            a.rps,
            fmt_dur(a.p50),
            fmt_dur(a.p99),
            b.rps,
            fmt_dur(b.p50),
            fmt_dur(b.p99),
            ratio * 100.0,
            a.server_cpu_per_req().as_secs_f64() / b.server_cpu_per_req().as_secs_f64().max(1e-12),
            a.errors,
            b.errors
        );
        if conc == 64 {
            println!();
            println!(
                "goal (auditing costs ≤ 30% of Get throughput at c=64): cost {:.0}% — {}",
                (1.0 - ratio) * 100.0,
                if ratio >= 0.70 { "met" } else { "MISSED" }
            );
        }
    }
    println!();
    for g in group_commits {
        println!("- audit on, {g} (the status calls around the phase included)");
    }
    let how = off.stop();
    eprintln!("grpc_load: keyseald (audit off): {how}");
}
