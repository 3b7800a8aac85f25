//! Root-device faults on the real `keyseald` binary (issue 7, "Hardware and
//! disk faults"): swtpm killed and restarted, swtpm paused (a slow device)
//! under concurrent load and while signing, the SoftHSM2 token hidden under
//! the daemon, and
//! start-up faults against an initialised store. Figures go to stderr
//! (`--nocapture`) and are recorded in docs/reliability.md.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{TestDaemon, ROOT_POLICY};
use common::{Backend, Device};
use keyseal::api::pb;
use keyseal::client::Client;
use keyseal::testkit::Swtpm;
use tonic::Code;

/// Bound on any single answer in these tests: a request that takes longer
/// is counted as hung (the daemon's own bound is `request_timeout`).
const HANG: Duration = Duration::from_secs(15);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn swtpm(d: &mut TestDaemon) -> &mut Swtpm {
    match &mut d.device {
        Device::Tpm(t) => t,
        Device::SoftHsm(_) => panic!("not a TPM daemon"),
    }
}

/// Restarts keyseald with `line` added to the `[api]` section.
fn restart_with_api(d: &mut TestDaemon, line: &str) {
    d.stop();
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        cfg.replacen("[api]\n", &format!("[api]\n{line}\n"), 1),
    )
    .unwrap();
    d.spawn();
}

/// VmRSS and thread count of a process, from /proc.
fn rss_kib_and_threads(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

async fn get(c: &mut Client, name: &str) -> Result<Vec<u8>, tonic::Status> {
    let r = tokio::time::timeout(
        HANG,
        c.secrets.get(pb::GetRequest {
            name: name.into(),
            version: 0,
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("get {name} hung for {HANG:?}"))?;
    Ok(r.into_inner().value)
}

async fn put(c: &mut Client, name: &str, value: &[u8]) -> Result<u64, tonic::Status> {
    let r = tokio::time::timeout(
        HANG,
        c.secrets.put(pb::PutRequest {
            name: name.into(),
            value: value.to_vec(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("put {name} hung for {HANG:?}"))?;
    Ok(r.into_inner().version)
}

fn assert_unavailable<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needles: &[&str]) {
    match r {
        Err(s) if s.code() == Code::Unavailable => {
            for n in needles {
                assert!(
                    s.message().contains(n),
                    "{n:?} missing from: {}",
                    s.message()
                );
            }
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 1. swtpm killed, then restarted on the same state and port
// ---------------------------------------------------------------------------

const WARM: usize = 4;
const COLD: usize = 6;

/// Reads the warm set, so that with `[cache] capacity = WARM` the cache
/// holds exactly those DEKs and every other secret is cold.
async fn fill_cache(c: &mut Client) {
    for i in 0..WARM {
        assert_eq!(
            get(c, &format!("warm/{i}")).await.unwrap(),
            format!("w{i}").as_bytes()
        );
    }
}

#[test]
fn swtpm_killed_then_restarted() {
    let mut d = TestDaemon::start_with(
        Backend::Tpm,
        ROOT_POLICY,
        &format!("[cache]\ncapacity = {WARM}\nttl_secs = 3600\n"),
    );
    let pid = d.pid().unwrap();
    let rt = rt();
    let socket = d.socket.clone();
    let mut c = rt.block_on(Client::connect(&socket)).unwrap();
    rt.block_on(async {
        for i in 0..COLD {
            put(&mut c, &format!("cold/{i}"), format!("c{i}").as_bytes())
                .await
                .unwrap();
        }
        for i in 0..WARM {
            put(&mut c, &format!("warm/{i}"), format!("w{i}").as_bytes())
                .await
                .unwrap();
        }
    });

    // (a) In-flight requests: 4 clients write and read cold secrets in a
    // loop; swtpm dies under them. Every answer is OK or UNAVAILABLE, none
    // hangs, and every client sees UNAVAILABLE soon after the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at = Arc::new(parking_lot::Mutex::new(None::<Instant>));
    let loaders: Vec<_> = (0..4)
        .map(|w| {
            let socket = socket.clone();
            let stop = stop.clone();
            let killed_at = killed_at.clone();
            rt.spawn(async move {
                let mut c = Client::connect(&socket).await.unwrap();
                let mut codes = BTreeMap::<String, u64>::new();
                let mut first_unavailable_after_kill = None;
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let r = if n % 2 == 0 {
                        put(&mut c, &format!("inflight/{w}"), &n.to_be_bytes())
                            .await
                            .map(|_| ())
                    } else {
                        get(&mut c, &format!("cold/{}", n as usize % COLD))
                            .await
                            .map(|_| ())
                    };
                    let code = match &r {
                        Ok(()) => "OK".to_owned(),
                        Err(s) => format!("{:?}", s.code()),
                    };
                    assert!(
                        code == "OK" || code == "Unavailable",
                        "client {w}: unexpected answer {r:?}"
                    );
                    if code == "Unavailable" && first_unavailable_after_kill.is_none() {
                        if let Some(k) = *killed_at.lock() {
                            first_unavailable_after_kill = Some(k.elapsed());
                        }
                    }
                    *codes.entry(code).or_default() += 1;
                }
                (codes, first_unavailable_after_kill)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    *killed_at.lock() = Some(Instant::now());
    swtpm(&mut d).kill();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    for (w, l) in loaders.into_iter().enumerate() {
        let (codes, first) = rt.block_on(l).unwrap();
        eprintln!(
            "in-flight client {w}: answers {codes:?}, first UNAVAILABLE {first:?} after the kill"
        );
        assert!(
            codes.get("OK").is_some_and(|n| *n > 0),
            "client {w} never succeeded before the kill"
        );
        assert!(
            first.is_some(),
            "client {w} saw no UNAVAILABLE after the kill: {codes:?}"
        );
    }

    // swtpm back; keyseald recovers on its own.
    let t = Instant::now();
    swtpm(&mut d).restart().unwrap();
    rt.block_on(async {
        assert_eq!(get(&mut c, "cold/0").await.unwrap(), b"c0");
    });
    eprintln!(
        "after swtpm restart #1: first cold read succeeded {:?} after restart began",
        t.elapsed()
    );

    // (b) The outage seen request by request: cold reads and writes fail
    // with UNAVAILABLE naming the TPM and the fix, within a bounded time;
    // warm-cache reads keep working.
    rt.block_on(fill_cache(&mut c));
    swtpm(&mut d).kill();
    rt.block_on(async {
        let mut worst = Duration::ZERO;
        for i in 0..COLD {
            let t = Instant::now();
            assert_unavailable(get(&mut c, &format!("cold/{i}")).await, &["TPM", "swtpm"]);
            worst = worst.max(t.elapsed());
            let t = Instant::now();
            assert_unavailable(
                put(&mut c, &format!("new/{i}"), b"x").await,
                &["TPM", "tcti"],
            );
            worst = worst.max(t.elapsed());
        }
        eprintln!("swtpm down: slowest UNAVAILABLE answer {worst:?}");
        assert!(worst < Duration::from_secs(5), "failing took {worst:?}");
        for _ in 0..3 {
            for i in 0..WARM {
                assert_eq!(
                    get(&mut c, &format!("warm/{i}"))
                        .await
                        .expect("warm read during the outage"),
                    format!("w{i}").as_bytes()
                );
            }
        }
        let err = get(&mut c, "cold/0").await.unwrap_err();
        eprintln!("UNAVAILABLE message while swtpm is down: {}", err.message());
    });

    let t = Instant::now();
    swtpm(&mut d).restart().unwrap();
    let restarted = t.elapsed();
    rt.block_on(async {
        let t = Instant::now();
        let v = put(&mut c, "new/0", b"after")
            .await
            .expect("first write after swtpm came back");
        assert_eq!(v, 1);
        eprintln!(
            "after swtpm restart #2 (took {restarted:?}): first write answered in {:?}",
            t.elapsed()
        );
        for i in 0..COLD {
            assert_eq!(
                get(&mut c, &format!("cold/{i}")).await.unwrap(),
                format!("c{i}").as_bytes()
            );
        }
        assert_eq!(get(&mut c, "new/0").await.unwrap(), b"after");
    });

    // (c) swtpm restarted between two requests (no request saw it down):
    // the first request afterwards succeeds.
    rt.block_on(fill_cache(&mut c));
    swtpm(&mut d).restart().unwrap();
    rt.block_on(async {
        assert_eq!(
            get(&mut c, "cold/3")
                .await
                .expect("first cold read after a quiet swtpm restart"),
            b"c3"
        );
        put(&mut c, "new/1", b"y")
            .await
            .expect("write after a quiet swtpm restart");
    });
    let log = d.log_text();
    assert!(
        log.contains("reconnected to the TPM"),
        "no reconnect logged"
    );
    assert!(!log.contains("panicked"), "keyseald panicked:\n{log}");
    // the same keyseald process throughout
    assert_eq!(d.pid(), Some(pid));
    assert!(Path::new(&format!("/proc/{pid}")).exists());
}

// ---------------------------------------------------------------------------
// 2. A slow root device: swtpm paused (SIGSTOP) under 32 concurrent clients
// ---------------------------------------------------------------------------

const CLIENTS: usize = 32;
const PAUSE: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default, Debug)]
struct ClientRun {
    codes: BTreeMap<String, u64>,
    slowest: Duration,
    /// From SIGCONT to this client's first success.
    recovered_after: Option<Duration>,
}

#[test]
fn swtpm_paused_under_concurrent_load() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // no DEK cache: every read is a TPM unseal
    let mut d = TestDaemon::start_with(Backend::Tpm, ROOT_POLICY, "[cache]\ncapacity = 0\n");
    restart_with_api(
        &mut d,
        &format!("request_timeout_secs = {}", REQUEST_TIMEOUT.as_secs()),
    );
    let pid = d.pid().unwrap();
    let tpm_pid = Pid::from_raw(swtpm(&mut d).pid() as i32);
    let rt = rt();
    let socket = d.socket.clone();
    rt.block_on(async {
        let mut c = Client::connect(&socket).await.unwrap();
        for i in 0..CLIENTS {
            put(&mut c, &format!("load/{i}"), format!("v{i}").as_bytes())
                .await
                .unwrap();
            get(&mut c, &format!("load/{i}")).await.unwrap();
        }
    });
    let (rss0, threads0) = rss_kib_and_threads(pid);

    // sample the daemon's RSS and thread count throughout
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let (mut rss, mut threads) = (0u64, 0u64);
            while sampling.load(Ordering::SeqCst) {
                let (r, t) = rss_kib_and_threads(pid);
                rss = rss.max(r);
                threads = threads.max(t);
                std::thread::sleep(Duration::from_millis(50));
            }
            (rss, threads)
        })
    };

    let resumed_at = Arc::new(parking_lot::Mutex::new(None::<Instant>));
    kill(tpm_pid, Signal::SIGSTOP).unwrap();
    let paused_at = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let socket = socket.clone();
            let resumed_at = resumed_at.clone();
            rt.spawn(async move {
                let mut c = Client::connect(&socket).await.unwrap();
                let mut run = ClientRun::default();
                let name = format!("load/{i}");
                loop {
                    let t = Instant::now();
                    let r = get(&mut c, &name).await;
                    let took = t.elapsed();
                    run.slowest = run.slowest.max(took);
                    assert!(
                        took < REQUEST_TIMEOUT + Duration::from_secs(3),
                        "client {i}: an answer took {took:?} (request timeout {REQUEST_TIMEOUT:?})"
                    );
                    let code = match &r {
                        Ok(v) => {
                            assert_eq!(v, format!("v{i}").as_bytes());
                            "OK".to_owned()
                        }
                        Err(s) => {
                            assert!(
                                matches!(s.code(), Code::DeadlineExceeded | Code::Unavailable),
                                "client {i}: unexpected answer {s:?}"
                            );
                            if s.code() == Code::Unavailable {
                                assert!(
                                    s.message().contains("still busy"),
                                    "client {i}: {}",
                                    s.message()
                                );
                            }
                            format!("{:?}", s.code())
                        }
                    };
                    *run.codes.entry(code).or_default() += 1;
                    let resumed = *resumed_at.lock();
                    if let (Ok(_), Some(at)) = (&r, resumed) {
                        // a success after SIGCONT: recovered
                        if t >= at || Instant::now() > at {
                            run.recovered_after = Some(at.elapsed());
                            return run;
                        }
                    }
                    if resumed.is_some_and(|at| at.elapsed() > Duration::from_secs(60)) {
                        return run;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(PAUSE);
    let (rss_paused, threads_paused) = rss_kib_and_threads(pid);
    *resumed_at.lock() = Some(Instant::now());
    kill(tpm_pid, Signal::SIGCONT).unwrap();
    let mut total = BTreeMap::<String, u64>::new();
    let mut slowest = Duration::ZERO;
    let mut recovery = Duration::ZERO;
    for (i, c) in clients.into_iter().enumerate() {
        let run = rt.block_on(c).unwrap();
        let rec = run
            .recovered_after
            .unwrap_or_else(|| panic!("client {i} never succeeded after SIGCONT: {run:?}"));
        recovery = recovery.max(rec);
        slowest = slowest.max(run.slowest);
        for (k, v) in run.codes {
            *total.entry(k).or_default() += v;
        }
    }
    sampling.store(false, Ordering::SeqCst);
    let (rss_max, threads_max) = sampler.join().unwrap();
    eprintln!(
        "swtpm paused {PAUSE:?} under {CLIENTS} clients: answers {total:?}; slowest answer {slowest:?}; every client succeeded within {recovery:?} of SIGCONT (from pause start: {:?})",
        paused_at.elapsed()
    );
    eprintln!(
        "keyseald RSS {rss0} KiB before, {rss_paused} KiB at the end of the pause, max {rss_max} KiB; threads {threads0} before, {threads_paused} at the end of the pause, max {threads_max}"
    );
    let failed: u64 = total
        .iter()
        .filter(|(k, _)| *k != "OK")
        .map(|(_, v)| *v)
        .sum();
    assert!(
        failed >= CLIENTS as u64,
        "the pause must have made requests hit their deadline: {total:?}"
    );
    // Requests waiting for the paused TPM give up at their deadline, so
    // blocked workers stay about one or two per client instead of growing
    // with the length of the pause (~PAUSE / REQUEST_TIMEOUT per client).
    assert!(
        threads_max <= threads0 + 2 * CLIENTS as u64 + 8,
        "keyseald grew from {threads0} to {threads_max} threads during the pause"
    );
    assert!(
        rss_max < 256 * 1024,
        "keyseald RSS grew to {rss_max} KiB during the pause"
    );
    // everything works again, writes included
    rt.block_on(async {
        let mut c = Client::connect(&socket).await.unwrap();
        for i in 0..CLIENTS {
            assert_eq!(
                get(&mut c, &format!("load/{i}")).await.unwrap(),
                format!("v{i}").as_bytes()
            );
        }
        put(&mut c, "load/after", b"x").await.unwrap();
    });
    assert_eq!(d.pid(), Some(pid));
}

/// Signing goes through keyseald's few device threads, not tokio's
/// blocking pool: with swtpm paused, more concurrent Sign requests than
/// there are device threads all answer by their deadline, the thread count
/// stays put (queued jobs wait in a queue, not on threads of their own),
/// and jobs that waited past their deadline are dropped rather than run
/// once the TPM answers again, so signing works at once after SIGCONT.
#[test]
fn swtpm_paused_while_signing() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    const SIGNERS: usize = 24;
    let mut d = TestDaemon::start(Backend::Tpm, ROOT_POLICY);
    restart_with_api(
        &mut d,
        &format!("request_timeout_secs = {}", REQUEST_TIMEOUT.as_secs()),
    );
    let pid = d.pid().unwrap();
    let tpm_pid = Pid::from_raw(swtpm(&mut d).pid() as i32);
    let socket = d.socket.clone();
    let rt = rt();
    let sign = |c: Client| async move {
        let mut c = c;
        let t = Instant::now();
        let r = tokio::time::timeout(
            HANG,
            c.keys.sign(pb::SignRequest {
                name: "paused/k".into(),
                input: Some(pb::sign_request::Input::Message(b"m".to_vec())),
                hash: String::new(),
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("a Sign hung for {HANG:?}"));
        (r.map(|r| r.into_inner().signature), t.elapsed(), c)
    };
    // Connect every signer and sign once, one after another, before the
    // pause: a connection's identity is looked up on a blocking thread at
    // accept, and idle blocking threads linger, so connecting during the
    // pause would count threads that have nothing to do with signing.
    let clients = rt.block_on(async {
        let mut c = Client::connect(&socket).await.unwrap();
        create_key(&mut c, "paused/k").await.unwrap();
        let mut clients = Vec::new();
        for _ in 0..SIGNERS {
            let c = Client::connect(&socket).await.unwrap();
            let (r, _, c) = sign(c).await;
            assert!(!r.unwrap().is_empty());
            clients.push(c);
        }
        clients
    });
    let (_, threads0) = rss_kib_and_threads(pid);
    kill(tpm_pid, Signal::SIGSTOP).unwrap();
    let (answers, threads_paused) = rt.block_on(async {
        let tasks: Vec<_> = clients.into_iter().map(|c| tokio::spawn(sign(c))).collect();
        tokio::time::sleep(REQUEST_TIMEOUT / 2).await;
        let (_, threads_paused) = rss_kib_and_threads(pid);
        let mut answers = Vec::new();
        for t in tasks {
            let (r, took, _) = t.await.unwrap();
            answers.push((r, took));
        }
        (answers, threads_paused)
    });
    kill(tpm_pid, Signal::SIGCONT).unwrap();
    let resumed = Instant::now();
    for (r, took) in &answers {
        let e = r
            .as_ref()
            .expect_err("a Sign succeeded while the TPM was paused");
        assert!(
            matches!(e.code(), Code::DeadlineExceeded | Code::Unavailable),
            "unexpected answer {e:?}"
        );
        assert!(
            *took < REQUEST_TIMEOUT + Duration::from_secs(3),
            "a Sign took {took:?} (request timeout {REQUEST_TIMEOUT:?})"
        );
    }
    eprintln!(
        "swtpm paused under {SIGNERS} concurrent Sign requests: threads {threads0} before, {threads_paused} during"
    );
    assert!(
        threads_paused < threads0 + SIGNERS as u64 / 2,
        "keyseald grew from {threads0} to {threads_paused} threads for {SIGNERS} paused signs"
    );
    rt.block_on(async {
        let c = Client::connect(&socket).await.unwrap();
        let (r, took, _) = sign(c).await;
        assert!(!r.expect("sign after SIGCONT").is_empty());
        eprintln!(
            "first Sign after SIGCONT answered in {took:?} ({:?} after SIGCONT)",
            resumed.elapsed()
        );
    });
    assert_eq!(d.pid(), Some(pid));
}

// ---------------------------------------------------------------------------
// 3. PKCS#11: sessions closed from another handle, token directory hidden
// ---------------------------------------------------------------------------

/// The daemon's token, for a `pkcs11-tool` of our own.
struct Token {
    conf: PathBuf,
    module: PathBuf,
    label: String,
    pin: String,
    dir: PathBuf,
}

/// Objects on the token (kind and label), listed by a fresh `pkcs11-tool`
/// process: its own SoftHSM2 instance reads the token directory anew.
fn token_objects(t: &Token) -> Vec<String> {
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &t.conf)
        .arg("--module")
        .arg(&t.module)
        .args(["--token-label", &t.label, "--login", "--pin", &t.pin])
        .arg("--list-objects")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pkcs11-tool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut objs = Vec::new();
    let mut kind = String::new();
    for l in text.lines() {
        if l.contains(" Object;") {
            kind = l.split(';').next().unwrap_or("").trim().to_owned();
        } else if let Some(label) = l.trim().strip_prefix("label:") {
            objs.push(format!("{kind}: {}", label.trim()));
        }
    }
    objs.sort();
    objs
}

fn code_of<T>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "OK".into(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

async fn create_key(c: &mut Client, name: &str) -> Result<(), tonic::Status> {
    tokio::time::timeout(
        HANG,
        c.keys.create(pb::CreateKeyRequest {
            name: name.into(),
            algorithm: "ecdsa-p256".into(),
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("key create {name} hung for {HANG:?}"))
    .map(|_| ())
}

#[test]
fn pkcs11_sessions_closed_and_token_hidden() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let mut d = TestDaemon::start_with(Backend::SoftHsm, ROOT_POLICY, "[cache]\ncapacity = 0\n");
    let pid = d.pid().unwrap();
    let t = match &d.device {
        Device::SoftHsm(h) => Token {
            conf: h.conf.clone(),
            module: h.module.clone(),
            label: h.token_label.clone(),
            pin: h.pin.clone(),
            dir: h.dir().to_owned(),
        },
        Device::Tpm(_) => unreachable!(),
    };
    let rt = rt();
    let mut c = rt.block_on(Client::connect(&d.socket)).unwrap();
    rt.block_on(async {
        put(&mut c, "p/0", b"v0").await.unwrap();
        create_key(&mut c, "k0").await.unwrap();
    });
    let before = token_objects(&t);
    assert_eq!(
        before.len(),
        5,
        "root key, audit key pair, k0 pair: {before:?}"
    );

    // (a) Another process logs in to the same token, logs out and closes
    // its sessions. SOFTHSM2_CONF of this process already names the
    // daemon's token directory (SoftHsm::new). PKCS#11 login state and
    // sessions belong to the application (C_CloseAllSessions too; cryptoki
    // 0.12 does not expose it), and SoftHSM2 lives inside each process, so
    // this must not disturb the daemon.
    let p11 = Pkcs11::new(&t.module).unwrap();
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = p11
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| p11.get_token_info(*s).unwrap().label().trim_end() == t.label)
        .unwrap();
    for _ in 0..3 {
        let s = p11.open_rw_session(slot).unwrap();
        s.login(UserType::User, Some(&AuthPin::from(t.pin.clone())))
            .unwrap();
        s.logout().unwrap();
        s.close().unwrap();
    }
    p11.finalize().unwrap();
    rt.block_on(async {
        let r = get(&mut c, "p/0").await;
        assert_eq!(
            r.unwrap(),
            b"v0",
            "another process's logout disturbed the daemon"
        );
        put(&mut c, "p/1", b"v1").await.unwrap();
    });

    // (b) The token directory disappears under the daemon (as root, chmod
    // would not stop it), then comes back. Every request answers
    // UNAVAILABLE at once, naming the token and the fix; nothing is half
    // created on the token.
    let tokens = t.dir.join("tokens");
    let away = t.dir.join("tokens.away");
    let check_unavailable = |c: &mut Client, phase: &str| {
        rt.block_on(async {
            for round in 0..3 {
                let started = Instant::now();
                let g = get(c, "p/0").await.map(|_| ());
                let p = put(c, &format!("p/{phase}{round}"), b"x").await.map(|_| ());
                let k = create_key(c, &format!("k{phase}{round}")).await;
                let took = started.elapsed();
                if round == 0 {
                    eprintln!(
                        "token {phase}: 3 requests answered in {took:?}: get {} | put {} | key create {}",
                        code_of(&g),
                        code_of(&p),
                        code_of(&k)
                    );
                }
                for (what, r) in [("get", &g), ("put", &p), ("key create", &k)] {
                    match r {
                        Err(s) if s.code() == Code::Unavailable => {}
                        other => panic!("token {phase}: {what} answered {}", code_of(other)),
                    }
                }
                for r in [&g, &p] {
                    let m = r.as_ref().unwrap_err().message();
                    assert!(
                        m.contains("keyseal-root-v1") && m.contains("restore the token"),
                        "token {phase}: {m}"
                    );
                }
                assert!(took < Duration::from_secs(5), "token {phase}: took {took:?}");
            }
        })
    };
    std::fs::rename(&tokens, &away).unwrap();
    check_unavailable(&mut c, "hidden");
    std::fs::rename(&away, &tokens).unwrap();
    // SoftHSM2 2.6.1 inside keyseald dropped the token's objects from its
    // index when the directory vanished and does not pick them up again:
    // still UNAVAILABLE, and the message says to restart keyseald.
    check_unavailable(&mut c, "restored");
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "keyseald died");
    assert_eq!(d.pid(), Some(pid));
    let after = token_objects(&t);
    assert_eq!(
        after, before,
        "the failed requests left objects on the token"
    );

    // A restart of keyseald (the documented fix) brings everything back.
    d.stop();
    d.spawn();
    let mut c = rt.block_on(Client::connect(&d.socket)).unwrap();
    rt.block_on(async {
        assert_eq!(get(&mut c, "p/0").await.unwrap(), b"v0");
        assert_eq!(get(&mut c, "p/1").await.unwrap(), b"v1");
        put(&mut c, "p/2", b"v2").await.unwrap();
        create_key(&mut c, "k1").await.unwrap();
    });
    let last = token_objects(&t);
    assert_eq!(last.len(), before.len() + 2, "{last:?}");
    assert!(log_ok(&d));
}

fn log_ok(d: &TestDaemon) -> bool {
    let log = d.log_text();
    assert!(!log.contains("panicked"), "keyseald panicked:\n{log}");
    true
}

// ---------------------------------------------------------------------------
// 4. Start-up faults against an initialised store: nothing written
// ---------------------------------------------------------------------------

/// Every file under `dir` with its length and sha256.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, Vec<u8>)> {
    use sha2::Digest;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(
                    p.strip_prefix(dir).unwrap().to_owned(),
                    (bytes.len() as u64, sha2::Sha256::digest(&bytes).to_vec()),
                );
            }
        }
    }
    out
}

/// Runs keyseald on `d`'s config (bounded); asserts exit `code`, one
/// `keyseald: ` line holding every needle, no socket, and the store
/// byte-for-byte unchanged. Returns the fatal line.
fn start_fails(d: &TestDaemon, code: i32, needles: &[&str]) -> String {
    let store = d.dir().join("store");
    let before = snapshot(&store);
    assert!(!before.is_empty());
    // the stopped daemon's stale sockets, if any, so that a new one shows
    for s in [&d.socket, &d.creds_socket] {
        let _ = std::fs::remove_file(s);
    }
    let err_path = d.dir().join("failed-start.stderr");
    let mut child = std::process::Command::new(common::daemon::KEYSEALD)
        .arg("--config")
        .arg(&d.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyseald did not exit within {HANG:?} on a start-up fault");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(status.code(), Some(code), "stderr:\n{err}");
    let fatal: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("keyseald: "))
        .collect();
    assert_eq!(fatal.len(), 1, "one `keyseald: ` line expected:\n{err}");
    for n in needles {
        assert!(fatal[0].contains(n), "{n:?} missing from: {}", fatal[0]);
    }
    assert!(!d.socket.exists(), "a socket was created");
    assert!(!d.creds_socket.exists(), "a credentials socket was created");
    assert_eq!(snapshot(&store), before, "the store changed");
    eprintln!("exit {code} after {took:?}: {}", fatal[0]);
    fatal[0].to_owned()
}

#[test]
fn startup_faults_leave_an_initialised_store_untouched() {
    use keyseal::exit;
    let mut codes = Vec::new();

    // PKCS#11: wrong PIN, then a token label that does not exist
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("s/1", b"one");
    d.stop();
    let pin_path = d.dir().join("pin");
    let pin = std::fs::read(&pin_path).unwrap();
    std::fs::write(&pin_path, "not-the-pin").unwrap();
    let line = start_fails(&d, exit::NO_PERM, &["wrong user PIN", "pin_file"]);
    assert!(!line.contains("not-the-pin"));
    codes.push(exit::NO_PERM);
    std::fs::write(&pin_path, &pin).unwrap();
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        cfg.replace("token_label = \"keyseal-test\"", "token_label = \"gone\""),
    )
    .unwrap();
    start_fails(&d, exit::CONFIG, &["'gone'", "fix root.pkcs11.token_label"]);
    codes.push(exit::CONFIG);
    std::fs::write(&d.config, cfg).unwrap();
    d.spawn();
    assert_eq!(d.get("s/1"), b"one");
    d.stop();

    // TPM: nothing listens on the configured port
    let mut d = TestDaemon::start(Backend::Tpm, ROOT_POLICY);
    d.put("s/1", b"one");
    d.stop();
    swtpm(&mut d).kill();
    let tcti = swtpm(&mut d).tcti();
    start_fails(
        &d,
        exit::UNAVAILABLE,
        &["cannot reach TPM", &tcti, "[root.tpm]"],
    );
    codes.push(exit::UNAVAILABLE);
    swtpm(&mut d).restart().unwrap();
    d.spawn();
    assert_eq!(d.get("s/1"), b"one");

    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), 3, "each fault has its own exit code");
}
