//! The audit log's guarantees under faults, on the real daemon and CLI:
//!
//! - `kill_9_under_load`: keyseald is SIGKILLed at a random moment while 16
//!   clients write and read secrets, three times on the same store. After
//!   each restart every acknowledged put reads back exactly, every
//!   acknowledged request has its event in the log, and an export of the
//!   whole log verifies.
//! - `full_store_disk`: the store sits on a small tmpfs (64 MiB) with
//!   `store.min_free_bytes` = 8 MiB and `store.audit_reserve_bytes` = 2 MiB.
//!   Filled down to 5 MiB free: writes fail promptly with
//!   RESOURCE_EXHAUSTED naming the path and the setting, reads keep working
//!   and are audited. Filled below 2 MiB: every audited request fails
//!   promptly (UNAVAILABLE), the daemon stays up and answers status. Space
//!   freed: writes succeed again without a restart, everything acknowledged
//!   reads back, the audit log exports and verifies (also after a restart).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{audit_events, runtime, TestDaemon, ROOT_POLICY};
use common::Backend;
use keyseal::api::pb;
use keyseal::client::Client;
use rand::Rng;

const CLIENTS: usize = 16;
const ROUNDS: usize = 3;

#[derive(Default)]
struct Acked {
    /// name -> value of every put answered OK.
    puts: BTreeMap<String, Vec<u8>>,
    /// names of gets answered OK (with the right value).
    gets: Vec<String>,
    /// The first failure this client saw (expected: the daemon went away).
    first_error: Option<String>,
}

/// One client: puts unique names until `stop`, and reads back every fourth.
async fn client_loop(
    socket: PathBuf,
    round: usize,
    id: usize,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
) -> (Acked, u64) {
    let mut acked = Acked::default();
    let mut failed = 0u64;
    let Ok(mut c) = Client::connect(&socket).await else {
        return (acked, 1);
    };
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let name = format!("load/r{round}/c{id}/s{n}");
        let value = format!("value-{round}-{id}-{n}-{}", rand::random::<u64>()).into_bytes();
        let put = tokio::time::timeout(
            Duration::from_secs(10),
            c.secrets.put(pb::PutRequest {
                name: name.clone(),
                value: value.clone(),
                ..Default::default()
            }),
        )
        .await;
        match put {
            Ok(Ok(_)) => {
                acked.puts.insert(name.clone(), value.clone());
                acks.fetch_add(1, Ordering::SeqCst);
            }
            other => {
                if acked.first_error.is_none() {
                    acked.first_error = Some(match other {
                        Ok(Err(s)) => format!("{}: {}", s.code(), s.message()),
                        Ok(Ok(_)) => String::new(),
                        Err(_) => "no answer within 10 s".into(),
                    });
                }
                failed += 1;
                // the daemon is gone: do not spin
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        if n % 4 == 0 {
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                c.secrets.get(pb::GetRequest {
                    name: name.clone(),
                    version: 0,
                }),
            )
            .await;
            match got {
                Ok(Ok(r)) => {
                    assert_eq!(
                        r.get_ref().value,
                        value,
                        "get {name} returned another value"
                    );
                    acked.gets.push(name);
                }
                _ => failed += 1,
            }
        }
    }
    (acked, failed)
}

fn kill_9_under_load(b: Backend) {
    let mut d = TestDaemon::start(b, ROOT_POLICY);
    let rt = runtime();
    let mut all = Acked::default();
    let mut rng = rand::thread_rng();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|id| {
                rt.spawn(client_loop(
                    d.socket.clone(),
                    round,
                    id,
                    stop.clone(),
                    acks.clone(),
                ))
            })
            .collect();
        // the load is under way (bounded wait), then a random moment later
        let started = Instant::now();
        while acks.load(Ordering::SeqCst) < CLIENTS as u64
            && started.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(1000..2000)));
        d.kill9();
        // let the clients see the dead socket for a moment, then stop them
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
        let mut round_puts = 0usize;
        let mut round_gets = 0usize;
        let mut round_failed = 0u64;
        let mut errors = std::collections::BTreeSet::new();
        for t in tasks {
            let (a, f) = rt.block_on(t).unwrap();
            errors.extend(a.first_error);
            round_puts += a.puts.len();
            round_gets += a.gets.len();
            round_failed += f;
            all.puts.extend(a.puts);
            all.gets.extend(a.gets);
        }
        println!(
            "round {}: {round_puts} puts and {round_gets} gets acknowledged, {round_failed} requests failed (daemon killed)",
            round + 1
        );
        println!("  first failures seen: {errors:?}");
        assert!(round_puts > 0, "no put was acknowledged in round {round}");

        d.spawn();
        let (lost_puts, lost_events, events) = rt.block_on(async {
            let mut c = Client::connect(&d.socket).await.unwrap();
            let mut lost_puts = Vec::new();
            for (name, value) in &all.puts {
                let r = c
                    .secrets
                    .get(pb::GetRequest {
                        name: name.clone(),
                        version: 0,
                    })
                    .await;
                match r {
                    Ok(r) if &r.get_ref().value == value => {}
                    Ok(_) => lost_puts.push(format!("{name}: another value")),
                    Err(s) => lost_puts.push(format!("{name}: {}", s.code())),
                }
            }
            let events = audit_events(&mut c, "").await;
            let ok: HashSet<(String, String)> = events
                .iter()
                .filter(|e| e["result"] == "ok")
                .map(|e| {
                    (
                        e["op"].as_str().unwrap_or("").to_owned(),
                        e["target"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            let mut lost_events = Vec::new();
            for name in all.puts.keys() {
                if !ok.contains(&("secret.put".to_owned(), name.clone())) {
                    lost_events.push(format!("secret.put {name}"));
                }
            }
            for name in &all.gets {
                if !ok.contains(&("secret.get".to_owned(), name.clone())) {
                    lost_events.push(format!("secret.get {name}"));
                }
            }
            (lost_puts, lost_events, events.len())
        });
        let report = d.export_and_verify(&format!("export-{round}"));
        println!(
            "after restart {}: {} acknowledged puts and {} gets so far; lost puts: {}, acknowledged requests without an event: {}; {events} events; {}",
            round + 1,
            all.puts.len(),
            all.gets.len(),
            lost_puts.len(),
            lost_events.len(),
            report.lines().next().unwrap_or("")
        );
        assert!(
            lost_puts.is_empty(),
            "acknowledged puts lost: {lost_puts:?}"
        );
        assert!(
            lost_events.is_empty(),
            "acknowledged requests without an audit event: {lost_events:?}"
        );
    }
    println!(
        "kill -9 x{ROUNDS} ({b:?}): {} acknowledged ops ({} puts, {} gets), lost ops: 0",
        all.puts.len() + all.gets.len(),
        all.puts.len(),
        all.gets.len()
    );
}

/// ROOT_POLICY plus `audit:prune` for root.
fn prune_policy() -> String {
    format!(
        "{ROOT_POLICY}\n[[rule]]\nname = \"root: prune\"\ncapabilities = [\"audit:prune\"]\n[rule.match]\nuid = 0\n"
    )
}

fn out_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `keyseal audit prune` against the daemon: refused before an export and
/// beyond it (FAILED_PRECONDITION, exit 65), allowed up to it; the rest
/// still exports and verifies, consistent with the pruned-through export's
/// checkpoint; the prune is itself an audited event; without `audit:prune`
/// it is denied.
fn prune_via_cli(b: Backend) {
    let d = TestDaemon::start(b, &prune_policy());
    for i in 0..5 {
        d.put(&format!("app/p{i}"), b"v");
    }
    let o = d.cli(&["audit", "prune"]).output().unwrap();
    assert!(o.status.success(), "{}", out_text(&o)); // nothing exported: nothing pruned
    assert!(
        out_text(&o).contains("pruned events 1..=0"),
        "{}",
        out_text(&o)
    );
    let o = d
        .cli(&["audit", "prune", "--through", "3"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(65), "{}", out_text(&o));
    assert!(out_text(&o).contains("export first"), "{}", out_text(&o));

    d.export_and_verify("export-1");
    let m1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.dir().join("export-1/manifest.json")).unwrap())
            .unwrap();
    let n1 = m1["tree_size"].as_u64().unwrap();
    assert_eq!(m1["last_seq"].as_u64(), Some(n1));
    let cp1 = d.dir().join("checkpoint-1.txt");
    std::fs::write(&cp1, m1["checkpoint"].as_str().unwrap()).unwrap();
    for i in 5..10 {
        d.put(&format!("app/p{i}"), b"v");
    }
    // beyond the exported checkpoint: refused, nothing changes
    let beyond = (n1 + 3).to_string();
    let o = d
        .cli(&["audit", "prune", "--through", &beyond])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(65), "{}", out_text(&o));
    assert!(
        out_text(&o).contains(&format!("only events up to seq {n1}")),
        "{}",
        out_text(&o)
    );
    // up to it: allowed
    let o = d.cli(&["audit", "prune", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    println!("prune: {r}");
    assert_eq!(r["pruned"].as_u64(), Some(n1), "{r}");
    assert_eq!(r["events_removed"].as_u64(), Some(n1), "{r}");
    assert_eq!(r["first_seq"].as_u64(), Some(n1 + 1), "{r}");
    // again: nothing more to do
    let o = d.cli(&["audit", "prune", "--json"]).output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["events_removed"].as_u64(), Some(0), "{r}");

    // the pruned events are gone; the prune is in the log
    let q = d
        .cli(&["audit", "query", "--json", "--limit", "1000"])
        .output()
        .unwrap();
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["seq"].as_u64(), Some(n1 + 1));
    assert!(!events
        .iter()
        .any(|e| e["op"] == "secret.put" && e["target"] == "app/p0"));
    assert!(
        events.iter().any(|e| e["op"] == "audit.prune"
            && e["result"] == "ok"
            && e["detail"]["pruned"].as_str() == Some(n1.to_string().as_str())),
        "{events:?}"
    );
    assert!(events
        .iter()
        .any(|e| e["op"] == "audit.prune" && e["code"] == "FAILED_PRECONDITION"));

    // what remains exports and verifies, consistent with the kept checkpoint
    let dir2 = d.dir().join("export-2");
    let o = d
        .cli(&[
            "audit",
            "export",
            "--out",
            dir2.to_str().unwrap(),
            "--after",
            cp1.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let v = d
        .cli(&[
            "audit",
            "verify",
            dir2.to_str().unwrap(),
            "--key",
            d.dir().join("export-1/audit-key.pem").to_str().unwrap(),
            "--after",
            cp1.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", out_text(&v));
    let text = out_text(&v);
    println!("{text}");
    assert!(text.contains(&format!("(seq {}..", n1 + 1)), "{text}");
    assert!(
        text.contains(&format!(
            "consistent with the earlier checkpoint of size {n1}"
        )),
        "{text}"
    );

    // without audit:prune (audit:read is not enough): denied
    std::fs::write(&d.policy, ROOT_POLICY).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = d.cli(&["audit", "prune"]).output().unwrap();
        if o.status.code() == Some(77) {
            assert!(out_text(&o).contains("audit:prune"), "{}", out_text(&o));
            break;
        }
        assert!(Instant::now() < deadline, "policy reload: {}", out_text(&o));
        std::thread::sleep(Duration::from_millis(100));
    }
}

both_backends!(kill_9_under_load, prune_via_cli);

/// A tmpfs mounted for a test; unmounted (lazily, so a still-open file
/// cannot keep it) when dropped.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn mount(dir: &Path, size: &str) -> Result<TmpfsMount, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(TmpfsMount(dir.to_owned()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Free bytes for unprivileged users on the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Appends to `filler` until the file system holding it has at most
/// `target` bytes free; returns the free bytes then.
fn fill_to(filler: &Path, target: u64) -> u64 {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .unwrap();
    let buf = vec![0x5au8; 1 << 20];
    loop {
        let free = free_bytes(filler);
        if free <= target {
            f.sync_all().unwrap();
            return free;
        }
        let n = (free - target).min(buf.len() as u64) as usize;
        f.write_all(&buf[..n.max(4096)]).unwrap();
        f.flush().unwrap();
    }
}

/// Longer than the disk guard's cache of the free space (200 ms).
const GUARD_TTL_WAIT: Duration = Duration::from_millis(500);

fn status_json(d: &TestDaemon) -> serde_json::Value {
    let out = d.cli(&["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "keyseal status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const MIB: u64 = 1024 * 1024;

fn timed_code<T>(
    rt: &tokio::runtime::Runtime,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> (tonic::Code, String, Duration) {
    let t = Instant::now();
    let r = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), f).await });
    match r {
        Ok(Ok(_)) => (tonic::Code::Ok, String::new(), t.elapsed()),
        Ok(Err(s)) => (s.code(), s.message().to_owned(), t.elapsed()),
        Err(_) => (
            tonic::Code::DeadlineExceeded,
            "no answer".into(),
            t.elapsed(),
        ),
    }
}

#[test]
fn full_store_disk() {
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/before", b"v0");
    d.stop();
    let store = d.dir().join("store");
    let saved = d.dir().join("store.saved");
    std::fs::rename(&store, &saved).unwrap();
    std::fs::create_dir(&store).unwrap();
    let _mount = match TmpfsMount::mount(&store, "64m") {
        Ok(m) => m,
        Err(e) => {
            println!("SKIP full_store_disk: cannot mount a tmpfs for the store (needs root): {e}");
            return;
        }
    };
    let cp = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", saved.display()))
        .arg(&store)
        .status()
        .unwrap();
    assert!(cp.success());
    // small thresholds for the small file system
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let cfg = cfg.replacen(
        "[store]\n",
        &format!(
            "[store]\nmin_free_bytes = {}\naudit_reserve_bytes = {}\n",
            8 * MIB,
            2 * MIB
        ),
        1,
    );
    std::fs::write(&d.config, cfg).unwrap();
    d.spawn();
    d.put("app/a", b"v1");
    let rt = runtime();
    let mut c = rt.block_on(Client::connect(&d.socket)).unwrap();
    let st = status_json(&d);
    println!("status on the tmpfs: {}", st["disk"]);
    assert_eq!(st["disk"]["writes_refused"], false, "{st}");
    assert!(st["disk"]["free_bytes"].as_u64().unwrap() > 8 * MIB, "{st}");
    assert_eq!(st["disk"]["min_free_bytes"].as_u64(), Some(8 * MIB), "{st}");

    // 1. Between the thresholds: writes refused, reads work and are audited.
    let filler = store.join("filler");
    let free = fill_to(&filler, 5 * MIB);
    println!("filled the store's tmpfs down to {free} bytes free");
    assert!(free > 2 * MIB && free < 8 * MIB);
    std::thread::sleep(GUARD_TTL_WAIT);
    for i in 0..5 {
        let (code, msg, took) = timed_code(
            &rt,
            c.secrets.put(pb::PutRequest {
                name: format!("low/p{i}"),
                value: b"some value".to_vec(),
                ..Default::default()
            }),
        );
        println!("  below min_free: put -> {code:?} in {took:?}: {msg}");
        assert!(took < Duration::from_secs(10), "put took {took:?}");
        assert_eq!(code, tonic::Code::ResourceExhausted, "{msg}");
        assert!(
            msg.contains("store.min_free_bytes") && msg.contains(store.to_str().unwrap()),
            "{msg}"
        );
    }
    // other writes too: delete, API key issue
    let (code, msg, _) = timed_code(
        &rt,
        c.secrets.delete(pb::VersionsRequest {
            name: "app/a".into(),
            ..Default::default()
        }),
    );
    assert_eq!(code, tonic::Code::ResourceExhausted, "delete: {msg}");
    let o = d.run(&["apikey", "issue", "--owner", "team-a/acme"], b"");
    assert!(!o.status.success(), "apikey issue succeeded below min_free");
    assert!(out_text(&o).contains("min_free_bytes"), "{}", out_text(&o));
    for i in 0..5 {
        for (name, want) in [("app/before", &b"v0"[..]), ("app/a", &b"v1"[..])] {
            let t = Instant::now();
            let r = rt
                .block_on(c.secrets.get(pb::GetRequest {
                    name: name.into(),
                    version: 0,
                }))
                .unwrap_or_else(|s| panic!("get {name} below min_free (round {i}): {s}"));
            assert_eq!(r.get_ref().value, want);
            assert!(t.elapsed() < Duration::from_secs(10));
        }
    }
    let (code, msg, _) = timed_code(
        &rt,
        c.secrets.list(pb::ListRequest {
            prefix: "app".into(),
            ..Default::default()
        }),
    );
    assert_eq!(code, tonic::Code::Ok, "list: {msg}");
    let st = status_json(&d);
    println!("status between the thresholds: {}", st["disk"]);
    assert_eq!(st["disk"]["writes_refused"], true, "{st}");
    assert_eq!(st["disk"]["audit_refused"], false, "{st}");
    let o = d.cli(&["status"]).output().unwrap();
    println!("{}", out_text(&o));
    assert!(out_text(&o).contains("WRITES REFUSED"), "{}", out_text(&o));
    // the reads (and the refused puts) are in the log
    let events = audit_events(&mut c, "");
    let events = rt.block_on(events);
    let gets = events
        .iter()
        .filter(|e| e["op"] == "secret.get" && e["target"] == "app/before" && e["result"] == "ok")
        .count();
    assert!(gets >= 5, "gets below min_free audited: {gets}");
    assert!(
        events
            .iter()
            .any(|e| e["op"] == "secret.put" && e["code"] == "RESOURCE_EXHAUSTED"),
        "refused puts are audited"
    );

    // 2. Below the audit reserve: every audited request fails fast; the
    //    daemon stays up and answers status.
    let free = fill_to(&filler, MIB);
    println!("filled the store's tmpfs down to {free} bytes free");
    assert!(free < 2 * MIB);
    std::thread::sleep(GUARD_TTL_WAIT);
    let below_codes = [tonic::Code::Unavailable, tonic::Code::ResourceExhausted];
    for i in 0..3 {
        let (code, msg, took) = timed_code(
            &rt,
            c.secrets.put(pb::PutRequest {
                name: format!("floor/p{i}"),
                value: b"some value".to_vec(),
                ..Default::default()
            }),
        );
        println!("  below the audit reserve: put -> {code:?} in {took:?}: {msg}");
        assert!(took < Duration::from_secs(10), "put took {took:?}");
        assert!(below_codes.contains(&code), "{code:?} {msg}");
        let (code, msg, took) = timed_code(
            &rt,
            c.secrets.get(pb::GetRequest {
                name: "app/before".into(),
                version: 0,
            }),
        );
        println!("  below the audit reserve: get -> {code:?} in {took:?}: {msg}");
        assert!(took < Duration::from_secs(10), "get took {took:?}");
        assert!(below_codes.contains(&code), "{code:?} {msg}");
        assert!(msg.contains("audit_reserve_bytes"), "{msg}");
    }
    let st = status_json(&d);
    println!(
        "status below the audit reserve: {} {}",
        st["disk"], st["audit"]
    );
    assert_eq!(st["disk"]["audit_refused"], true, "{st}");
    assert!(st["audit"]["failures"].as_u64().unwrap() >= 6, "{st}");

    // 3. Space comes back: writes succeed again without a restart.
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(GUARD_TTL_WAIT);
    let mut acked = vec![
        ("app/before".to_owned(), b"v0".to_vec()),
        ("app/a".to_owned(), b"v1".to_vec()),
    ];
    for i in 0..5 {
        let name = format!("freed/p{i}");
        let value = format!("value {i}").into_bytes();
        let (code, msg, took) = timed_code(
            &rt,
            c.secrets.put(pb::PutRequest {
                name: name.clone(),
                value: value.clone(),
                ..Default::default()
            }),
        );
        println!("  space freed, no restart: put -> {code:?} in {took:?}");
        assert_eq!(code, tonic::Code::Ok, "{msg}");
        acked.push((name, value));
    }
    let st = status_json(&d);
    assert_eq!(st["disk"]["writes_refused"], false, "{st}");
    for (name, value) in &acked {
        let r = rt
            .block_on(c.secrets.get(pb::GetRequest {
                name: name.clone(),
                version: 0,
            }))
            .unwrap_or_else(|s| panic!("get {name} after space came back: {s}"));
        assert_eq!(&r.get_ref().value, value, "{name}");
    }
    let report = d.export_and_verify("export-full");
    println!("space freed, no restart: {report}");

    // Nothing corrupted: after a restart everything reads back and verifies.
    drop(c);
    d.stop();
    d.spawn();
    for (name, value) in &acked {
        assert_eq!(&d.get(name), value, "{name} after restart");
    }
    let report = d.export_and_verify("export-restart");
    println!("after restart: {report}");
    d.stop();
}
