//! Benchmark of the secret store and the envelope over real SoftHSM2 and
//! real swtpm: put, warm get, cold get, raw root wrap/unwrap, and software
//! baselines (AES-256-GCM open, sled insert + flush). Prints a table.
//!
//! Run: `cargo bench --bench store`. Each phase runs for
//! `KEYSEAL_BENCH_SECS` seconds (default 3). Each backend runs in a child
//! process of this binary (selected by `KEYSEAL_BENCH_BACKEND`), because
//! SoftHSM2 reads `SOFTHSM2_CONF` once per process and two PKCS#11 contexts
//! must not coexist in one process; the parent runs the software baselines,
//! collects the children's rows and prints one table.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use keyseal::envelope::Binding;
use keyseal::name::SecretName;
use keyseal::root::pkcs11::Pkcs11Root;
use keyseal::root::tpm::{TpmConfig, TpmRoot};
use keyseal::root::{Dek, RootOfTrust};
use keyseal::secrets::{OpCtx, PutOptions, SecretStore, SecretsConfig};
use keyseal::store::Store;
use keyseal::testkit::Swtpm;
use keyseal::testkit_hsm::SoftHsm;

const VALUE_LEN: usize = 1024;
const ENV_BACKEND: &str = "KEYSEAL_BENCH_BACKEND";
const ENV_SECS: &str = "KEYSEAL_BENCH_SECS";
const DEFAULT_SECS: f64 = 3.0;
/// Secrets read in the get phases (all fit the default DEK cache).
const READ_SET: usize = 512;
const ROW_TAG: &str = "ROW";
const NOTE_TAG: &str = "NOTE";

/// One measured phase.
struct Row {
    backend: String,
    op: String,
    threads: usize,
    ops: usize,
    wall: Duration,
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

impl Row {
    fn new(backend: &str, op: &str, threads: usize, wall: Duration, mut lat: Vec<Duration>) -> Row {
        lat.sort_unstable();
        let ops = lat.len();
        let total: Duration = lat.iter().sum();
        Row {
            backend: backend.to_owned(),
            op: op.to_owned(),
            threads,
            ops,
            wall,
            mean: if ops == 0 {
                Duration::ZERO
            } else {
                total / ops as u32
            },
            p50: percentile(&lat, 0.50),
            p99: percentile(&lat, 0.99),
        }
    }

    /// Tab-separated line a child prints for the parent.
    fn encode(&self) -> String {
        format!(
            "{ROW_TAG}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.backend,
            self.op,
            self.threads,
            self.ops,
            self.wall.as_nanos(),
            self.mean.as_nanos(),
            self.p50.as_nanos(),
            self.p99.as_nanos()
        )
    }

    fn decode(line: &str) -> Option<Row> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 9 || f[0] != ROW_TAG {
            return None;
        }
        let ns = |s: &str| s.parse::<u64>().ok().map(Duration::from_nanos);
        Some(Row {
            backend: f[1].to_owned(),
            op: f[2].to_owned(),
            threads: f[3].parse().ok()?,
            ops: f[4].parse().ok()?,
            wall: ns(f[5])?,
            mean: ns(f[6])?,
            p50: ns(f[7])?,
            p99: ns(f[8])?,
        })
    }

    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }
}

/// Nearest-rank percentile of an ascending slice (`q` in 0..=1).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1.0 {
        format!("{:.0} ns", d.as_nanos())
    } else if us < 1000.0 {
        format!("{us:.1} us")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<8} {:<40} {:>3} {:>9} {:>11} {:>10} {:>10} {:>10}",
        "backend", "operation", "thr", "ops", "ops/s", "mean", "p50", "p99"
    );
    println!("{}", "-".repeat(108));
    for r in rows {
        println!(
            "{:<8} {:<40} {:>3} {:>9} {:>11.0} {:>10} {:>10} {:>10}",
            r.backend,
            r.op,
            r.threads,
            r.ops,
            r.ops_per_sec(),
            fmt_dur(r.mean),
            fmt_dur(r.p50),
            fmt_dur(r.p99)
        );
    }
}

fn phase_duration() -> Duration {
    let secs = std::env::var(ENV_SECS)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(DEFAULT_SECS);
    Duration::from_secs_f64(secs)
}

/// Runs `op(thread, i)` on `threads` threads until `dur` has passed; returns
/// the wall time and every op's latency, plus the op count per thread.
fn run<F>(threads: usize, dur: Duration, op: F) -> (Duration, Vec<Duration>, Vec<usize>)
where
    F: Fn(usize, usize) + Sync,
{
    let barrier = std::sync::Barrier::new(threads + 1);
    let (wall, per_thread) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let op = &op;
                let barrier = &barrier;
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(1 << 14);
                    barrier.wait();
                    let deadline = Instant::now() + dur;
                    let mut i = 0;
                    loop {
                        let t0 = Instant::now();
                        if t0 >= deadline {
                            break;
                        }
                        op(t, i);
                        lat.push(t0.elapsed());
                        i += 1;
                    }
                    lat
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let per_thread: Vec<Vec<Duration>> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        (start.elapsed(), per_thread)
    });
    let counts = per_thread.iter().map(Vec::len).collect();
    (wall, per_thread.into_iter().flatten().collect(), counts)
}

fn note(msg: impl AsRef<str>) {
    println!("{NOTE_TAG}\t{}", msg.as_ref());
}

fn progress(backend: &str, what: &str) {
    eprintln!("[bench {backend}] {what}");
}

// ---------------------------------------------------------------- children

fn bench_backend(kind: &str) {
    let dur = phase_duration();
    match kind {
        "softhsm" => {
            let hsm = SoftHsm::new().unwrap();
            let root: Arc<dyn RootOfTrust> = Arc::new(Pkcs11Root::open(&hsm.config()).unwrap());
            bench_root(kind, root, dur);
            // `root` was moved and dropped inside; the token goes last.
            drop(hsm);
        }
        "swtpm" => {
            let tpm = Swtpm::start().unwrap();
            let root: Arc<dyn RootOfTrust> = Arc::new(
                TpmRoot::open(&TpmConfig {
                    tcti: tpm.tcti(),
                    auth_value: None,
                    pcrs: vec![],
                })
                .unwrap(),
            );
            bench_root(kind, root, dur);
            drop(tpm);
        }
        other => panic!("unknown {ENV_BACKEND}={other} (softhsm | swtpm)"),
    }
}

fn put_name(threads: usize, t: usize, i: usize) -> String {
    format!("bench/put-{threads}t/w{t}/s{i:08}")
}

fn bench_root(backend: &str, root: Arc<dyn RootOfTrust>, dur: Duration) {
    let dir = tempfile::Builder::new()
        .prefix("keyseal-bench-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("store");
    let warm_cfg = SecretsConfig {
        // Longer than any phase, so the warm phases never see an expiry.
        cache_ttl: Duration::from_secs(3600),
        ..SecretsConfig::default()
    };
    let store = Store::open(&path).unwrap();
    SecretStore::init(&store, root.as_ref()).unwrap();
    let ss = SecretStore::open(store, root.clone(), warm_cfg.clone()).unwrap();
    let ctx = OpCtx::new("bench");
    let mut value = vec![0u8; VALUE_LEN];
    rand::thread_rng().fill_bytes(&mut value);
    let opts = PutOptions::default();
    let mut rows = Vec::new();

    // 1. put: each op creates a new secret (one root wrap, one sled
    //    transaction, one flush).
    let mut written: Vec<SecretName> = Vec::new();
    for threads in [1, 4] {
        progress(backend, &format!("put, {threads} thread(s)"));
        let calls0 = ss.envelope().stats().root_calls;
        let (wall, lat, counts) = run(threads, dur, |t, i| {
            let name = SecretName::parse(&put_name(threads, t, i)).unwrap();
            ss.put(&ctx, &name, &value, &opts).unwrap();
        });
        let calls = ss.envelope().stats().root_calls - calls0;
        note(format!(
            "{backend}: put x{threads}: {} puts, {calls} root calls",
            lat.len()
        ));
        assert_eq!(calls as usize, lat.len(), "one wrap per put");
        for (t, n) in counts.iter().enumerate() {
            for i in 0..*n {
                written.push(SecretName::parse(&put_name(threads, t, i)).unwrap());
            }
        }
        rows.push(Row::new(
            backend,
            "put 1 KiB (new secret)",
            threads,
            wall,
            lat,
        ));
    }
    note(format!(
        "{backend}: store holds {} secrets after the put phases",
        ss.count()
    ));

    // The read set: up to READ_SET of the secrets just written (one version
    // of 1 KiB each), read round-robin.
    let read: Vec<SecretName> = written.iter().rev().take(READ_SET).cloned().collect();
    assert!(!read.is_empty(), "no puts completed");
    let pick = |t: usize, i: usize| &read[(t * 131 + i) % read.len()];

    // 2. get, warm DEK cache: no root call allowed.
    progress(backend, "get warm-up pass");
    for n in &read {
        assert_eq!(ss.get(&ctx, n, None).unwrap().value.len(), VALUE_LEN);
    }
    for threads in [1, 4] {
        progress(backend, &format!("get (warm cache), {threads} thread(s)"));
        let calls0 = ss.envelope().stats().root_calls;
        let (wall, lat, _) = run(threads, dur, |t, i| {
            let v = ss.get(&ctx, pick(t, i), None).unwrap();
            assert_eq!(v.value.len(), VALUE_LEN);
        });
        let calls = ss.envelope().stats().root_calls - calls0;
        note(format!(
            "{backend}: warm get x{threads}: {} gets, {calls} root calls",
            lat.len()
        ));
        assert_eq!(calls, 0, "a warm get reached the root");
        rows.push(Row::new(
            backend,
            "get 1 KiB, warm DEK cache",
            threads,
            wall,
            lat,
        ));
    }

    // 3. get, cold: reopen the same store with the DEK cache disabled, so
    //    every get unwraps through the root.
    drop(ss);
    let cold_cfg = SecretsConfig {
        cache_capacity: 0,
        ..SecretsConfig::default()
    };
    let ss = SecretStore::open(Store::open(&path).unwrap(), root.clone(), cold_cfg).unwrap();
    for threads in [1, 4] {
        progress(
            backend,
            &format!("get (cold, cache off), {threads} thread(s)"),
        );
        let calls0 = ss.envelope().stats().root_calls;
        let (wall, lat, _) = run(threads, dur, |t, i| {
            let v = ss.get(&ctx, pick(t, i), None).unwrap();
            assert_eq!(v.value.len(), VALUE_LEN);
        });
        let calls = ss.envelope().stats().root_calls - calls0;
        note(format!(
            "{backend}: cold get x{threads}: {} gets, {calls} root calls",
            lat.len()
        ));
        assert_eq!(calls as usize, lat.len(), "one unwrap per cold get");
        rows.push(Row::new(
            backend,
            "get 1 KiB, cold (1 unwrap/get)",
            threads,
            wall,
            lat,
        ));
    }
    drop(ss);

    // 4. the root alone, in-process.
    let binding = Binding::new("secret", "bench/raw/secret", 1);
    let dek = Dek::generate();
    let active = 1;
    progress(backend, "raw root wrap");
    let (wall, lat, _) = run(1, dur, |_, _| {
        root.wrap(active, &dek, binding.as_bytes()).unwrap();
    });
    rows.push(Row::new(backend, "root.wrap (raw)", 1, wall, lat));
    let wrapped = root.wrap(active, &dek, binding.as_bytes()).unwrap();
    progress(backend, "raw root unwrap");
    for threads in [1, 4] {
        let (wall, lat, _) = run(threads, dur, |_, _| {
            let d = root.unwrap(&wrapped, binding.as_bytes()).unwrap();
            assert_eq!(d.expose(), dek.expose());
        });
        rows.push(Row::new(backend, "root.unwrap (raw)", threads, wall, lat));
    }
    drop(root);

    for r in &rows {
        println!("{}", r.encode());
    }
    std::io::stdout().flush().unwrap();
}

// ------------------------------------------------------------------ parent

fn cmd_out(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

fn machine_facts() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let tmp = std::env::temp_dir();
    let profile = if cfg!(debug_assertions) {
        "debug (debug_assertions on) -- numbers are not meaningful"
    } else {
        "release/bench (optimised, debug_assertions off)"
    };
    println!("keyseal store benchmark");
    println!(
        "  date (UTC):   {}",
        cmd_out("date", &["-u", "+%Y-%m-%d %H:%M:%S"])
    );
    println!("  nproc:        {}", cmd_out("nproc", &[]));
    println!("  cpu:          {cpu}");
    println!("  kernel:       {}", cmd_out("uname", &["-r"]));
    println!("  profile:      {profile}");
    println!(
        "  load avg:     {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "  temp dir:     {} ({})",
        tmp.display(),
        cmd_out(
            "findmnt",
            &["-n", "-o", "FSTYPE", "-T", &tmp.display().to_string()]
        )
    );
    println!("  swtpm:        {}", cmd_out("swtpm", &["--version"]));
    println!(
        "  softhsm2:     {}",
        cmd_out("softhsm2-util", &["--version"])
    );
    println!(
        "  phase length: {:?} ({ENV_SECS} to change)",
        phase_duration()
    );
    println!("  value size:   {VALUE_LEN} B");
    println!();
}

/// Software baselines: AES-256-GCM open of 1 KiB; a sled insert of one
/// ~1.2 KiB record followed by a flush; and what a put writes (a small meta
/// record and a ~1.2 KiB version record in one transaction over two trees)
/// followed by a flush. No root involved. Note that sled 0.34's flush on
/// Linux issues `sync_file_range`, not `fsync`.
fn software_baselines(dur: Duration) -> Vec<Row> {
    let mut rows = Vec::new();
    let dek = Dek::generate();
    let binding = Binding::new("secret", "bench/raw/secret", 1);
    let aead = Aes256Gcm::new(dek.expose().into());
    let mut value = vec![0u8; VALUE_LEN];
    rand::thread_rng().fill_bytes(&mut value);
    let nonce = [7u8; 12];
    let ct = aead
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &value,
                aad: binding.as_bytes(),
            },
        )
        .unwrap();
    progress("sw", "AES-256-GCM open");
    let (wall, lat, _) = run(1, dur.min(Duration::from_secs(1)), |_, _| {
        // A fresh cipher per op, as Envelope::open does.
        let pt = Aes256Gcm::new(dek.expose().into())
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: binding.as_bytes(),
                },
            )
            .unwrap();
        std::hint::black_box(pt);
    });
    rows.push(Row::new("sw", "AES-256-GCM open 1 KiB", 1, wall, lat));

    progress("sw", "sled insert + flush");
    let dir = tempfile::Builder::new()
        .prefix("keyseal-bench-sled-")
        .tempdir()
        .unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .open()
        .unwrap();
    let secrets = db.open_tree("secrets").unwrap();
    let versions = db.open_tree("versions").unwrap();
    let rec = vec![0x5au8; VALUE_LEN + 200];
    let meta = vec![0xa5u8; 120];
    let (wall, lat, _) = run(1, dur, |_, i| {
        versions
            .insert(format!("bench/sled/a{i:08}"), rec.as_slice())
            .unwrap();
        db.flush().unwrap();
    });
    rows.push(Row::new("sw", "sled insert ~1.2 KiB + flush", 1, wall, lat));
    progress("sw", "sled 2-tree transaction + flush");
    let (wall, lat, _) = run(1, dur, |_, i| {
        let k = format!("bench/sled/b{i:08}");
        (&secrets, &versions)
            .transaction(|(s, v)| {
                s.insert(k.as_bytes(), meta.as_slice())?;
                v.insert(k.as_bytes(), rec.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .unwrap();
        db.flush().unwrap();
    });
    rows.push(Row::new(
        "sw",
        "sled 2-tree tx ~1.3 KiB + flush",
        1,
        wall,
        lat,
    ));
    rows
}

fn main() {
    if let Ok(kind) = std::env::var(ENV_BACKEND) {
        bench_backend(&kind);
        return;
    }
    machine_facts();
    let dur = phase_duration();
    let mut rows = software_baselines(dur);
    let mut notes = Vec::new();
    let mut failed = Vec::new();
    let exe = std::env::current_exe().unwrap();
    for kind in ["softhsm", "swtpm"] {
        progress(kind, "starting child process");
        let out = Command::new(&exe)
            .env(ENV_BACKEND, kind)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(r) = Row::decode(line) {
                rows.push(r);
            } else if let Some(n) = line.strip_prefix(NOTE_TAG) {
                notes.push(n.trim_start().to_owned());
            } else if !line.trim().is_empty() {
                notes.push(format!("{kind}: {line}"));
            }
        }
        if !out.status.success() {
            failed.push(format!("{kind} ({})", out.status));
        }
    }
    print_table(&rows);
    println!();
    for n in &notes {
        println!("  {n}");
    }
    if !failed.is_empty() {
        eprintln!("FAILED backends: {}", failed.join(", "));
        std::process::exit(1);
    }
}
