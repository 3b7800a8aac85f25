//! Pieces shared by the gRPC benches (`grpc_load`, `sign_verify`): finding
//! the release binaries, child-process guards, a keyseald on a throwaway
//! SoftHSM2 token, /proc readings and a closed-loop load driver.
#![allow(dead_code)] // each bench uses a different subset

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use keyseal::api::pb::{self, system_client::SystemClient};
use keyseal::testkit_hsm::{init_softhsm_token, write_softhsm_conf};

/// Per-request deadline of every bench channel.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Clock ticks per second of /proc/<pid>/stat (USER_HZ on Linux).
const CLK_TCK: f64 = 100.0;

/// The release binaries the benches run, checked to exist.
pub struct Bins {
    pub keyseal: PathBuf,
    pub keyseald: PathBuf,
}

impl Bins {
    /// `$KEYSEAL_BENCH_BIN_DIR`, else `$CARGO_TARGET_DIR/release`, else
    /// `target/release`; `bench` names the bench in the error message.
    pub fn find(bench: &str) -> Result<Bins, String> {
        let bin_dir = match (
            std::env::var_os("KEYSEAL_BENCH_BIN_DIR"),
            std::env::var_os("CARGO_TARGET_DIR"),
        ) {
            (Some(d), _) => PathBuf::from(d),
            (None, Some(t)) => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(t)
                .join("release"),
            (None, None) => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release"),
        };
        let bins = Bins {
            keyseal: bin_dir.join("keyseal"),
            keyseald: bin_dir.join("keyseald"),
        };
        for b in [&bins.keyseal, &bins.keyseald] {
            if !b.is_file() {
                return Err(format!(
                    "{} not found: run `cargo build --release --bins` first \
                     (the command is `cargo build --release --bins && cargo bench --bench {bench}`)",
                    b.display()
                ));
            }
        }
        warn_if_stale(&bins.keyseald, bench);
        Ok(bins)
    }
}

/// Warns when keyseald is older than the sources it is built from.
fn warn_if_stale(bin: &Path, bench: &str) {
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
                "{bench}: warning: {} is older than src/ or proto/; \
                 run `cargo build --release --bins` to measure the current code",
                bin.display()
            );
        }
    }
}

/// Whether `taskset` works here (util-linux).
pub fn have_taskset() -> bool {
    Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pins every thread of this process to CPU 0 (call before building a runtime).
pub fn pin_self_to_cpu0() {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", "0"])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset could not pin the load generator to CPU 0");
}

/// A command for `program`, pinned to `cpus` (a taskset list) when given.
pub fn command_on(program: &Path, cpus: Option<&str>) -> Command {
    match cpus {
        Some(list) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(list).arg(program);
            c
        }
        None => Command::new(program),
    }
}

// ------------------------------------------------------- child processes

/// A server child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct ChildGuard {
    pub name: &'static str,
    pub child: Option<Child>,
    pub log: Option<PathBuf>,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// SIGTERM, up to 10 s for a clean exit, then SIGKILL. Says how it ended.
    pub fn stop(&mut self) -> String {
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

    pub fn check_alive(&mut self) {
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

    /// Warning and error lines of the log (for the end-of-run summary).
    pub fn log_problems(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains(" WARN "))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            let how = self.stop();
            eprintln!("bench: {}: {how}", self.name);
        }
    }
}

/// A channel with a per-request deadline (one HTTP/2 connection).
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(REQUEST_TIMEOUT)
        .connect()
        .await
}

/// Waits (at most 20 s) until `socket` answers `probe`.
pub async fn wait_ready<F, Fut>(guard: &mut ChildGuard, socket: &Path, probe: F) -> Channel
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

// ------------------------------------------------ keyseald on SoftHSM2

/// A throwaway directory with a fresh SoftHSM2 token, a policy for this
/// uid, a config and an initialised store: everything keyseald needs.
pub struct BenchHome {
    pub dir: tempfile::TempDir,
    pub hsm_conf: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub token_label: &'static str,
    pub pin: &'static str,
}

impl BenchHome {
    /// `policy` may say `UID` for this process's uid; `extra_config` is
    /// appended to the config file (e.g. an `[audit]` section).
    /// `$KEYSEAL_BENCH_EXTRA_CONFIG`, when set, is appended to the config
    /// (e.g. `[audit]` settings to compare; the figures are then not the
    /// shipped defaults').
    pub fn new(bins: &Bins, module: &Path, policy: &str, extra_config: &str) -> BenchHome {
        let extra_config = format!(
            "{extra_config}\n{}",
            std::env::var("KEYSEAL_BENCH_EXTRA_CONFIG").unwrap_or_default()
        );
        let dir = tempfile::Builder::new()
            .prefix("keyseal-bench-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let hsm_conf = write_softhsm_conf(&d.join("softhsm")).unwrap();
        let (token_label, pin) = ("keyseal-bench", "bench-pin-1234");
        init_softhsm_token(&hsm_conf, token_label, pin, "bench-so-pin-5678").unwrap();
        std::fs::write(d.join("pin"), pin).unwrap();
        std::fs::set_permissions(d.join("pin"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        std::fs::write(
            d.join("policy.toml"),
            policy.replace("UID", &uid.to_string()),
        )
        .unwrap();
        let config = d.join("keyseald.toml");
        std::fs::write(
            &config,
            format!(
                "[root]\nbackend = \"pkcs11\"\n[root.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{token_label}\"\npin_file = \"pin\"\n\n\
                 [store]\npath = \"store\"\n\n[api]\nsocket = \"keyseal.sock\"\nmode = \"0600\"\n\n[policy]\npath = \"policy.toml\"\n{extra_config}",
                module.display(),
            ),
        )
        .unwrap();
        let init = Command::new(&bins.keyseal)
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
        let socket = d.join("keyseal.sock");
        BenchHome {
            dir,
            hsm_conf,
            config,
            socket,
            token_label,
            pin,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts keyseald with `workers` tokio workers (on `cpus` when given),
    /// logging to `log_name` in the directory, and waits until it answers.
    pub async fn start(
        &self,
        bins: &Bins,
        workers: usize,
        cpus: Option<&str>,
        log_name: &str,
    ) -> (ChildGuard, Channel) {
        let log = self.path().join(log_name);
        let mut daemon = ChildGuard {
            name: "keyseald",
            child: Some(
                command_on(&bins.keyseald, cpus)
                    .arg("--config")
                    .arg(&self.config)
                    .env("KEYSEAL_WORKERS", workers.to_string())
                    .env("SOFTHSM2_CONF", &self.hsm_conf)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap(),
            ),
            log: Some(log),
        };
        let ch = wait_ready(&mut daemon, &self.socket, |ch| async move {
            SystemClient::new(ch)
                .status(pb::StatusRequest {})
                .await
                .is_ok()
        })
        .await;
        (daemon, ch)
    }
}

// ------------------------------------------------------------ /proc

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, Threads…).
pub fn proc_status_field(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn rss_mib(pid: u32) -> f64 {
    proc_status_field(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
}

/// User + system CPU seconds of a whole process (all threads, dead ones included).
pub fn cpu_secs(pid: u32) -> f64 {
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

/// The 1-minute load average, for the figures' conditions.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

// ----------------------------------------------------------- measurement

pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// One measured closed-loop phase.
pub struct Phase {
    pub requests: usize,
    pub errors: u64,
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Server CPU during the window, in cores (1.0 = one core busy).
    pub server_cores: f64,
    /// This process's CPU during the window, in cores.
    pub loadgen_cores: f64,
    pub window: Duration,
}

impl Phase {
    pub fn server_cpu_per_req(&self) -> Duration {
        if self.requests == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(
            self.server_cores * self.window.as_secs_f64() / self.requests as f64,
        )
    }
}

/// `conc` tasks call `op(task)` in a loop for `warmup` and then `measure`;
/// an op counts when it completes inside the measured window and returns
/// true. `server_pid` is read for CPU time over the window.
pub async fn closed_loop<F, Fut>(
    conc: usize,
    warmup: Duration,
    measure: Duration,
    server_pid: u32,
    op: F,
) -> Phase
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let warm_end = Instant::now() + warmup;
    let end = warm_end + measure;
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conc);
    for i in 0..conc {
        let (op, errors) = (op.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(64 * 1024);
            loop {
                let start = Instant::now();
                if start >= end {
                    break;
                }
                let ok = op(i).await;
                let done = Instant::now();
                if ok {
                    if done >= warm_end && done < end {
                        lat.push(done - start);
                    }
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
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
    Phase {
        requests: lat.len(),
        errors: errors.load(Ordering::Relaxed),
        rps: lat.len() as f64 / w,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        server_cores: (s1 - s0) / w,
        loadgen_cores: (c1 - c0) / w,
        window: measure,
    }
}
