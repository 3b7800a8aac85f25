//! The audit log's guarantees under faults, on the real daemon and CLI:
//!
//! - `kill_9_under_load`: keyseald is SIGKILLed at a random moment while 16
//!   clients write and read secrets, three times on the same store. After
//!   each restart every acknowledged put reads back exactly, every
//!   acknowledged request has its event in the log, and an export of the
//!   whole log verifies.
//! - `full_store_disk`: the store sits on a small tmpfs that is then filled.
//!   Requests fail promptly with a typed status (never hang, never INTERNAL),
//!   the daemon stays up and reports the audit failures. sled refuses
//!   writes after an I/O error until reopened, so requests keep failing
//!   (as promptly) after space is freed, until keyseald is restarted; then
//!   everything works and the log verifies.

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

/// Fills the file system holding `path` with one file; returns its size.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0x5au8; chunk];
        while f.write_all(&buf).is_ok() {
            written += chunk as u64;
        }
    }
    let _ = f.sync_all();
    written
}

/// A put and a get with a bound: (result code, how long it took).
fn timed_put(rt: &tokio::runtime::Runtime, c: &mut Client, name: &str) -> (tonic::Code, Duration) {
    let t = Instant::now();
    let r = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(30),
            c.secrets.put(pb::PutRequest {
                name: name.into(),
                value: b"some value".to_vec(),
                ..Default::default()
            }),
        )
        .await
    });
    let code = match r {
        Ok(Ok(_)) => tonic::Code::Ok,
        Ok(Err(s)) => {
            println!("  put {name}: {:?}: {}", s.code(), s.message());
            s.code()
        }
        Err(_) => tonic::Code::DeadlineExceeded,
    };
    (code, t.elapsed())
}

fn timed_get(rt: &tokio::runtime::Runtime, c: &mut Client, name: &str) -> (tonic::Code, Duration) {
    let t = Instant::now();
    let r = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(30),
            c.secrets.get(pb::GetRequest {
                name: name.into(),
                version: 0,
            }),
        )
        .await
    });
    let code = match r {
        Ok(Ok(_)) => tonic::Code::Ok,
        Ok(Err(s)) => {
            println!("  get {name}: {:?}: {}", s.code(), s.message());
            s.code()
        }
        Err(_) => tonic::Code::DeadlineExceeded,
    };
    (code, t.elapsed())
}

fn status_json(d: &TestDaemon) -> serde_json::Value {
    let out = d.cli(&["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "keyseal status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
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
    let _mount = match TmpfsMount::mount(&store, "32m") {
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
    d.spawn();
    d.put("app/a", b"v1");
    let rt = runtime();
    let mut c = rt.block_on(Client::connect(&d.socket)).unwrap();

    let filler = store.join("filler");
    let filled = fill(&filler);
    println!("filled the store's tmpfs with {filled} bytes");
    // Requests until the store runs out of space (sled may still have room
    // in segments it already holds).
    let mut first_fail = None;
    for i in 0..2000 {
        let (code, took) = timed_put(&rt, &mut c, &format!("fill/s{i}"));
        assert!(
            took < Duration::from_secs(10),
            "put took {took:?} on a full disk"
        );
        if code != tonic::Code::Ok {
            first_fail = Some((i, code));
            break;
        }
    }
    let (n, code) = first_fail.expect("2000 puts succeeded on a full disk");
    println!("first failure after {n} puts on the full disk: {code:?}");
    let full_codes = [tonic::Code::ResourceExhausted];
    assert!(full_codes.contains(&code), "{code:?}");
    for i in 0..3 {
        let (code, took) = timed_put(&rt, &mut c, &format!("full/p{i}"));
        println!("  full disk: put -> {code:?} in {took:?}");
        assert!(took < Duration::from_secs(10), "put hung: {took:?}");
        assert!(full_codes.contains(&code), "{code:?}");
        let (code, took) = timed_get(&rt, &mut c, "app/before");
        println!("  full disk: get -> {code:?} in {took:?}");
        assert!(took < Duration::from_secs(10), "get hung: {took:?}");
        assert!(full_codes.contains(&code), "{code:?}");
    }
    // listing the store or reading the log: refused up front, promptly
    // (sled's iterators would spin on the failed database)
    let t = Instant::now();
    let list = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(30),
            c.secrets.list(pb::ListRequest {
                prefix: "app".into(),
                ..Default::default()
            }),
        )
        .await
    });
    let took = t.elapsed();
    let code = match list {
        Ok(Ok(_)) => tonic::Code::Ok,
        Ok(Err(s)) => s.code(),
        Err(_) => tonic::Code::DeadlineExceeded,
    };
    println!("  full disk: list -> {code:?} in {took:?}");
    assert!(took < Duration::from_secs(10) && code == tonic::Code::ResourceExhausted);
    let t = Instant::now();
    let q = d
        .cli(&["audit", "query", "--op", "secret.put", "--json"])
        .output()
        .unwrap();
    println!(
        "  full disk: audit query -> exit {:?} in {:?}",
        q.status.code(),
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "audit query hung");
    assert!(
        String::from_utf8_lossy(&q.stderr).contains("restart keyseald"),
        "{}",
        String::from_utf8_lossy(&q.stderr)
    );
    let st = status_json(&d);
    println!("status on a full disk: {}", st["audit"]);
    assert!(st["audit"]["failures"].as_u64().unwrap() >= 6, "{st}");
    assert!(
        st["audit"]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("out of space"),
        "{st}"
    );

    // Space comes back. sled stops writing after an I/O error until the
    // database is reopened, so requests keep failing, just as promptly and
    // with the same typed answer, until keyseald is restarted.
    std::fs::remove_file(&filler).unwrap();
    for i in 0..2 {
        let (code, took) = timed_put(&rt, &mut c, &format!("freed/p{i}"));
        println!("  space freed, before restart: put -> {code:?} in {took:?}");
        assert!(took < Duration::from_secs(10), "put hung: {took:?}");
        assert_eq!(code, tonic::Code::ResourceExhausted);
    }
    let st = status_json(&d);
    assert!(
        st["audit"]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("restart keyseald"),
        "{st}"
    );
    drop(c);
    let stopped = d.stop();
    println!("keyseald stopped on SIGTERM: {stopped}");
    d.spawn();
    assert_eq!(d.get("app/before"), b"v0");
    assert_eq!(d.get("app/a"), b"v1");
    d.put("after/restart", b"v2");
    let st = status_json(&d);
    assert_eq!(st["audit"]["failures"], 0, "{st}");
    let report = d.export_and_verify("export-full");
    println!("after restart: {report}");
    // the requests answered before the disk filled and after the restart
    // are in the log
    let q = d
        .cli(&[
            "audit",
            "query",
            "--op",
            "secret.put",
            "--json",
            "--limit",
            "1000",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&q.stdout);
    assert!(text.contains("\"target\":\"app/a\""), "{text}");
    assert!(text.contains("\"target\":\"after/restart\""), "{text}");
    d.stop();
}
