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
//! secrets (16 concurrent puts) and reports RSS and disk size after it;
//! `KEYSEAL_BENCH_AUDIT=off` runs keyseald with `audit.unsafe_disable = true`
//! (default: the audit log on, as shipped) to separate the audit's cost.
//!
//! The echo server is this binary re-executed with `KEYSEAL_BENCH_ROLE=echo`.
//! Both children are stopped at the end (SIGTERM, bounded wait, SIGKILL),
//! also on Ctrl-C, on a panic, and when the whole run exceeds its budget.

use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use keyseal::api::pb::{
    self,
    secrets_client::SecretsClient,
    secrets_server::{Secrets, SecretsServer},
    system_client::SystemClient,
};
use keyseal::testkit_hsm::{init_softhsm_token, softhsm_module, write_softhsm_conf};

const ROLE_ENV: &str = "KEYSEAL_BENCH_ROLE";
const ECHO_SOCKET_ENV: &str = "KEYSEAL_BENCH_ECHO_SOCKET";
const PARENT_ENV: &str = "KEYSEAL_BENCH_PARENT";
const SECS_ENV: &str = "KEYSEAL_BENCH_SECS";
const FILL_ENV: &str = "KEYSEAL_BENCH_100K";
const PIN_ENV: &str = "KEYSEAL_BENCH_PIN";
const BIN_DIR_ENV: &str = "KEYSEAL_BENCH_BIN_DIR";
const AUDIT_ENV: &str = "KEYSEAL_BENCH_AUDIT";

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
/// Per-request deadline, so a hung server cannot hang the bench.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// USER_HZ: /proc/<pid>/stat counts CPU time in 1/100 s on Linux.
const CLK_TCK: f64 = 100.0;

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
    keyseal: PathBuf,
    keyseald: PathBuf,
    module: PathBuf,
    measure: Duration,
    fill: bool,
    pin: bool,
    audit: bool,
    cpus: usize,
}

impl Setup {
    fn from_env() -> Result<Setup, String> {
        let bin_dir = match (
            std::env::var_os(BIN_DIR_ENV),
            std::env::var_os("CARGO_TARGET_DIR"),
        ) {
            (Some(d), _) => PathBuf::from(d),
            (None, Some(t)) => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(t)
                .join("release"),
            (None, None) => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release"),
        };
        let keyseal = bin_dir.join("keyseal");
        let keyseald = bin_dir.join("keyseald");
        for b in [&keyseal, &keyseald] {
            if !b.is_file() {
                return Err(format!(
                    "{} not found: run `cargo build --release --bins` first \
                     (the command is `cargo build --release --bins && cargo bench --bench grpc_load`)",
                    b.display()
                ));
            }
        }
        warn_if_stale(&keyseald);
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
        let pin = std::env::var(PIN_ENV).as_deref() != Ok("0")
            && cpus >= 2
            && Command::new("taskset")
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        Ok(Setup {
            keyseal,
            keyseald,
            module,
            measure: Duration::from_secs_f64(secs),
            fill: std::env::var(FILL_ENV).as_deref() == Ok("1"),
            pin,
            audit: std::env::var(AUDIT_ENV).as_deref() != Ok("off"),
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
        Duration::from_secs(180) + phase * (get_phases + 2) + fill
    }

    /// A command for a server binary, pinned to CPU 1 when pinning.
    fn server_command(&self, program: &Path) -> Command {
        if self.pin {
            let mut c = Command::new("taskset");
            c.arg("-c").arg("1").arg(program);
            c
        } else {
            Command::new(program)
        }
    }
}

/// Warns when keyseald is older than the sources it is built from.
fn warn_if_stale(bin: &Path) {
    fn newest(dir: &Path, acc: &mut Option<std::time::SystemTime>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                newest(&p, acc);
            } else if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                *acc = Some(acc.map_or(t, |a| a.max(t)));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut src = None;
    newest(&root.join("src"), &mut src);
    newest(&root.join("proto"), &mut src);
    if let (Ok(bin_t), Some(src_t)) = (std::fs::metadata(bin).and_then(|m| m.modified()), src) {
        if src_t > bin_t {
            eprintln!(
                "grpc_load: warning: {} is older than src/ or proto/; \
                 run `cargo build --release --bins` to measure the current code",
                bin.display()
            );
        }
    }
}

fn pin_self_to_cpu0() {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", "0"])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset could not pin the load generator to CPU 0");
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

// ------------------------------------------------------- child processes

/// A server child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct ChildGuard {
    name: &'static str,
    child: Option<Child>,
    log: Option<PathBuf>,
}

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// SIGTERM, up to 10 s for a clean exit, then SIGKILL. Says how it ended.
    fn stop(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "not running".into();
        };
        if let Ok(Some(st)) = child.try_wait() {
            return format!("had already exited ({st})");
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return format!("stopped by SIGTERM ({st})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        "did not stop within 10 s of SIGTERM; killed".into()
    }

    fn check_alive(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!(
                    "{} exited early ({st}); log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            let how = self.stop();
            eprintln!("grpc_load: {}: {how}", self.name);
        }
    }
}

/// A channel with a per-request deadline (one HTTP/2 connection).
async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(REQUEST_TIMEOUT)
        .connect()
        .await
}

/// Waits (at most 20 s) until `socket` answers `probe`.
async fn wait_ready<F, Fut>(guard: &mut ChildGuard, socket: &Path, probe: F) -> Channel
where
    F: Fn(Channel) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        guard.check_alive();
        if socket.exists() {
            if let Ok(ch) = connect(socket).await {
                if probe(ch.clone()).await {
                    return ch;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not become ready within 20 s; log:\n{}",
            guard.name,
            guard.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------ /proc

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, Threads…).
fn proc_status_field(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn rss_mib(pid: u32) -> f64 {
    proc_status_field(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
}

/// User + system CPU seconds of a whole process (all threads, dead ones included).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command (which may contain spaces) start at field 3.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime is field 14, stime field 15 (1-based); `rest` starts at field 3.
    (ticks(11) + ticks(12)) as f64 / CLK_TCK
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

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// One measured Get phase.
struct GetRow {
    server: &'static str,
    conc: usize,
    channels: usize,
    requests: usize,
    errors: u64,
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// Server CPU during the window, in cores (1.0 = one core busy).
    server_cores: f64,
    /// This process's CPU during the window, in cores.
    loadgen_cores: f64,
}

impl GetRow {
    /// Which side ran out of CPU: the one using ≥ 90% of a core. "neither"
    /// means both waited (on each other, on I/O, or on other processes).
    fn saturated(&self) -> &'static str {
        match (self.server_cores >= 0.9, self.loadgen_cores >= 0.9) {
            (true, true) => "both",
            (true, false) => "server",
            (false, true) => "load generator",
            (false, false) => "neither",
        }
    }

    fn server_cpu_per_req(&self, window: Duration) -> Duration {
        if self.requests == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.server_cores * window.as_secs_f64() / self.requests as f64)
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
    let warm_end = Instant::now() + WARMUP;
    let end = warm_end + measure;
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conc);
    for i in 0..conc {
        let mut client = SecretsClient::new(chans[i * channels / conc].clone());
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(64 * 1024);
            loop {
                let start = Instant::now();
                if start >= end {
                    break;
                }
                let r = client
                    .get(pb::GetRequest {
                        name: SECRET_NAME.to_owned(),
                        version: 0,
                    })
                    .await;
                let done = Instant::now();
                match r {
                    Ok(resp) if resp.get_ref().value.len() == VALUE_LEN => {
                        if done >= warm_end && done < end {
                            lat.push(done - start);
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            lat
        }));
    }
    let me = std::process::id();
    tokio::time::sleep_until(warm_end.into()).await;
    let (s0, c0) = (cpu_secs(server_pid), cpu_secs(me));
    tokio::time::sleep_until(end.into()).await;
    let (s1, c1) = (cpu_secs(server_pid), cpu_secs(me));
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat.sort_unstable();
    let w = measure.as_secs_f64();
    GetRow {
        server,
        conc,
        channels,
        requests: lat.len(),
        errors: errors.load(Ordering::Relaxed),
        rps: lat.len() as f64 / w,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        server_cores: (s1 - s0) / w,
        loadgen_cores: (c1 - c0) / w,
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
    let _ = writeln!(
        s,
        "keyseald audit log: {}",
        if setup.audit {
            "on (as shipped)"
        } else {
            "OFF (audit.unsafe_disable = true, measurement only)"
        }
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
    let dir = tempfile::Builder::new()
        .prefix("keyseal-bench-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let hsm_conf = write_softhsm_conf(&d.join("softhsm")).unwrap();
    let pin = "bench-pin-1234";
    init_softhsm_token(&hsm_conf, "keyseal-bench", pin, "bench-so-pin-5678").unwrap();
    std::fs::write(d.join("pin"), pin).unwrap();
    std::fs::set_permissions(d.join("pin"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let uid = nix::unistd::getuid().as_raw();
    std::fs::write(
        d.join("policy.toml"),
        POLICY.replace("UID", &uid.to_string()),
    )
    .unwrap();
    let config = d.join("keyseald.toml");
    let socket = d.join("keyseal.sock");
    std::fs::write(
        &config,
        format!(
            "[root]\nbackend = \"pkcs11\"\n[root.pkcs11]\nmodule = \"{}\"\ntoken_label = \"keyseal-bench\"\npin_file = \"pin\"\n\n\
             [store]\npath = \"store\"\n\n[api]\nsocket = \"keyseal.sock\"\nmode = \"0600\"\n\n[policy]\npath = \"policy.toml\"\n{}",
            setup.module.display(),
            if setup.audit {
                ""
            } else {
                "\n[audit]\nunsafe_disable = true\n"
            }
        ),
    )
    .unwrap();
    let init = Command::new(&setup.keyseal)
        .arg("init")
        .arg("--config")
        .arg(&config)
        .env("SOFTHSM2_CONF", &hsm_conf)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "keyseal init failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let log = d.join("keyseald.log");
    let mut daemon = ChildGuard {
        name: "keyseald",
        child: Some(
            setup
                .server_command(&setup.keyseald)
                .arg("--config")
                .arg(&config)
                .env("KEYSEAL_WORKERS", SERVER_WORKERS.to_string())
                .env("SOFTHSM2_CONF", &hsm_conf)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ),
        log: Some(log.clone()),
    };
    let ks = wait_ready(&mut daemon, &socket, |ch| async move {
        SystemClient::new(ch)
            .status(pb::StatusRequest {})
            .await
            .is_ok()
    })
    .await;

    // --- the echo ceiling: this binary, re-executed
    let echo_socket = d.join("echo.sock");
    let mut echo = ChildGuard {
        name: "echo",
        child: Some(
            setup
                .server_command(&std::env::current_exe().unwrap())
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
            r.rps,
            fmt_dur(r.p50),
            fmt_dur(r.p99),
            r.server_cores,
            r.server_cpu_per_req(setup.measure).as_secs_f64() * 1e6,
            r.loadgen_cores,
            r.saturated(),
            r.errors
        );
    }
    println!();
    println!("| concurrency | channels | keyseald/echo requests/s | echo/keyseald server CPU per request | keyseald/echo p50 | keyseald/echo p99 |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut goal = None;
    for pair in rows.chunks(2) {
        let (k, e) = (&pair[0], &pair[1]);
        let ratio = k.rps / e.rps.max(1e-9);
        // What the throughput ratio would be with both servers CPU-bound on
        // one core; steadier than `ratio` when the load generator or other
        // processes limit the echo phase.
        let cpu_ratio = e.server_cpu_per_req(setup.measure).as_secs_f64()
            / k.server_cpu_per_req(setup.measure).as_secs_f64().max(1e-12);
        if k.conc == 64 && k.channels == 1 {
            goal = Some((ratio, cpu_ratio));
        }
        println!(
            "| {} | {} | {:.0}% | {:.0}% | {:.2}× | {:.2}× |",
            k.conc,
            k.channels,
            ratio * 100.0,
            cpu_ratio * 100.0,
            k.p50.as_secs_f64() / e.p50.as_secs_f64().max(1e-12),
            k.p99.as_secs_f64() / e.p99.as_secs_f64().max(1e-12),
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
    if setup.audit {
        println!();
        println!(
            "(the audit log lives in the store's sled database: the store size and RSS include it)"
        );
    }
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
