//! End-to-end tests of the daemon's process life: signals (SIGHUP policy
//! reload, SIGTERM under load), socket handling (stale, live, not a socket,
//! mode), systemd socket activation, sd_notify, the systemd credential
//! protocol, startup faults and `keyseal secret watch`. Real keyseald, real
//! keyseal CLI, real SoftHSM2 or swtpm.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{TestDaemon, KEYSEAL, KEYSEALD, ROOT_POLICY};
use common::Backend;
use keyseal::api::pb;
use keyseal::client::Client;
use keyseal::testkit_hsm::SoftHsm;
use nix::sys::signal::Signal;

/// Bound for anything that should happen "promptly".
const PROMPT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Removes ANSI colour sequences (the human log format may colour fields).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_of(d: &TestDaemon) -> String {
    strip_ansi(&d.log_text())
}

/// Polls `f` every 20 ms until it holds; panics with `what` after `within`.
fn wait_for(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the daemon log holds at least `n` lines containing `needle`.
fn wait_log_lines(d: &TestDaemon, needle: &str, n: usize) {
    let deadline = Instant::now() + PROMPT;
    loop {
        let log = log_of(d);
        if log.lines().filter(|l| l.contains(needle)).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "log never got {n} line(s) with {needle:?}; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count_log_lines(d: &TestDaemon, needle: &str) -> usize {
    log_of(d).lines().filter(|l| l.contains(needle)).count()
}

/// Runs `cmd` to completion with a deadline (the child is killed and the
/// test fails when it is exceeded); stdout and stderr are captured.
fn run_bounded(mut cmd: Command, within: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_child(&mut child, within) {
        Some(st) => st,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {within:?}");
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Waits for `child` to exit, at most `within`.
fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal_child(child: &Child, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// A child process killed (and reaped) when the test ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A keyseald started by the test itself (custom env or wrapper), with its
/// stderr in `log`.
fn spawn_keyseald(mut cmd: Command, log: &Path) -> Guard {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    Guard(cmd.spawn().unwrap())
}

fn keyseald(config: &Path) -> Command {
    let mut c = Command::new(KEYSEALD);
    c.arg("--config").arg(config);
    c
}

/// `keyseal --socket SOCKET args...` with a deadline.
fn cli_at(socket: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(KEYSEAL);
    c.arg("--socket").arg(socket).args(args);
    run_bounded(c, PROMPT)
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// Root may write (and administer) but no longer read.
const POLICY_NO_READ: &str = r#"
[[rule]]
name = "root: write only"
capabilities = ["secret:write", "secret:delete"]
names = ["**"]
[rule.match]
uid = 0

[[rule]]
name = "root: admin"
capabilities = ["system:admin", "audit:read"]
[rule.match]
uid = 0
"#;

// ---------------------------------------------------------------------------
// 1. Signals
// ---------------------------------------------------------------------------

#[test]
fn sighup_applies_a_valid_changed_policy() {
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"v1");
    assert_eq!(d.get("app/x"), b"v1");
    let reloaded = count_log_lines(&d, "policy reloaded");
    std::fs::write(&d.policy, POLICY_NO_READ).unwrap();
    assert_eq!(mode_of(&d.policy), 0o644);
    d.signal(Signal::SIGHUP);
    wait_log_lines(&d, "policy reloaded", reloaded + 1);

    let out = d.cli(&["secret", "get", "app/x"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(77),
        "read must be denied after the reload: {}",
        stderr_of(&out)
    );
    assert!(out.stdout.is_empty(), "a denied get printed a value");
    let err = stderr_of(&out);
    assert!(
        err.contains("permission denied") && err.contains("secret:read"),
        "the denial names the capability: {err}"
    );
    // what the new policy still grants keeps working
    d.put("app/x", b"v2");
    let out = d.cli(&["status"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[test]
fn sighup_with_a_syntax_error_keeps_the_old_policy() {
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"v1");
    let rejected = count_log_lines(&d, "policy reload rejected");
    // would deny everything if it were (mis)read as an empty policy
    std::fs::write(&d.policy, "[[rule]\nname = \"broken\n").unwrap();
    d.signal(Signal::SIGHUP);
    wait_log_lines(&d, "policy reload rejected", rejected + 1);
    let log = log_of(&d);
    let line = log
        .lines()
        .rfind(|l| l.contains("policy reload rejected"))
        .unwrap();
    assert!(
        line.contains("keeping the old policy") && line.contains(&d.policy.display().to_string()),
        "the rejection names the file and says the old policy stays: {line}"
    );
    assert_eq!(d.get("app/x"), b"v1", "old policy must still allow reads");
    d.put("app/x", b"v2");

    // a later valid file is still picked up: a failed reload breaks nothing
    let reloaded = count_log_lines(&d, "policy reloaded");
    std::fs::write(&d.policy, POLICY_NO_READ).unwrap();
    d.signal(Signal::SIGHUP);
    wait_log_lines(&d, "policy reloaded", reloaded + 1);
    let out = d.cli(&["secret", "get", "app/x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(77), "{}", stderr_of(&out));
}

#[test]
fn sighup_with_a_group_writable_policy_keeps_the_old_policy() {
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"v1");
    let rejected = count_log_lines(&d, "policy reload rejected");
    // valid content that would deny reads, but anyone in the group could
    // have written it
    std::fs::write(&d.policy, POLICY_NO_READ).unwrap();
    std::fs::set_permissions(&d.policy, std::fs::Permissions::from_mode(0o664)).unwrap();
    d.signal(Signal::SIGHUP);
    wait_log_lines(&d, "policy reload rejected", rejected + 1);
    let log = log_of(&d);
    let line = log
        .lines()
        .rfind(|l| l.contains("policy reload rejected"))
        .unwrap();
    assert!(
        line.contains("writable by group or others") && line.contains("chmod go-w"),
        "the rejection says why and how to fix it: {line}"
    );
    assert_eq!(d.get("app/x"), b"v1", "old policy must still allow reads");
}

/// What one writer saw.
#[derive(Default)]
struct Ledger {
    /// (name, version) -> value, for every put the daemon acknowledged.
    acked: BTreeMap<(String, u64), Vec<u8>>,
    /// name -> every value a put was attempted with (acknowledged or not).
    attempted: HashMap<String, HashSet<Vec<u8>>>,
    /// how each writer ended
    endings: Vec<String>,
}

fn sigterm_under_load_loses_no_acknowledged_write(b: Backend) {
    const NAMES: usize = 4;
    const WRITERS_PER_NAME: usize = 3;
    const ACKS_BEFORE_SIGTERM: usize = 30;
    let mut d = TestDaemon::start(b, ROOT_POLICY);
    let rt = tokio_rt();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let acks = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..NAMES * WRITERS_PER_NAME {
        let name = format!("load/n{}", w % NAMES);
        let socket = d.socket.clone();
        let ledger = ledger.clone();
        let acks = acks.clone();
        writers.push(rt.spawn(async move {
            let mut cl = match Client::connect(&socket).await {
                Ok(c) => c,
                Err(e) => {
                    ledger.lock().unwrap().endings.push(format!("connect: {e}"));
                    return;
                }
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut i = 0u64;
            let ending = loop {
                if Instant::now() > deadline {
                    break "still writing after 20 s".to_owned();
                }
                i += 1;
                // unique per attempt, with some bulk so a torn write would show
                let mut value = format!("{name}|w{w}|{i}|").into_bytes();
                value.extend_from_slice(&[b'a' + (i % 26) as u8; 512]);
                ledger
                    .lock()
                    .unwrap()
                    .attempted
                    .entry(name.clone())
                    .or_default()
                    .insert(value.clone());
                let req = pb::PutRequest {
                    name: name.clone(),
                    value: value.clone(),
                    max_versions: Some(100_000),
                    ..Default::default()
                };
                match tokio::time::timeout(PROMPT, cl.secrets.put(req)).await {
                    Ok(Ok(r)) => {
                        let v = r.into_inner().version;
                        let prev = ledger
                            .lock()
                            .unwrap()
                            .acked
                            .insert((name.clone(), v), value);
                        assert!(prev.is_none(), "{name} v{v} acknowledged twice");
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Err(s)) => break format!("{:?}: {}", s.code(), s.message()),
                    Err(_) => break "put hung for 5 s".to_owned(),
                }
            };
            ledger.lock().unwrap().endings.push(ending);
        }));
    }
    wait_for(
        Duration::from_secs(30),
        "writers to get puts acknowledged",
        || acks.load(Ordering::SeqCst) >= ACKS_BEFORE_SIGTERM,
    );
    let at_sigterm = acks.load(Ordering::SeqCst);
    let t0 = Instant::now();
    let status = d.stop(); // SIGTERM while the writers keep going
    let took = t0.elapsed();
    assert!(
        status.success(),
        "keyseald must exit 0 on SIGTERM, got {status}; log:\n{}",
        d.log_text()
    );
    assert!(
        took < PROMPT,
        "keyseald took {took:?} to stop under load (bound {PROMPT:?})"
    );
    rt.block_on(async {
        for w in writers {
            tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("a writer did not stop after the daemon exited")
                .expect("a writer panicked");
        }
    });
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert_eq!(ledger.endings.len(), NAMES * WRITERS_PER_NAME);
    for e in &ledger.endings {
        assert!(
            !e.contains("hung") && !e.contains("still writing"),
            "writer ending: {e}"
        );
    }
    assert!(ledger.acked.len() >= at_sigterm);
    eprintln!(
        "acked {} puts ({at_sigterm} before SIGTERM); writers ended with: {:?}",
        ledger.acked.len(),
        ledger.endings
    );

    // restart on the same store and audit everything
    d.spawn();
    rt.block_on(async {
        let mut cl = Client::connect(&d.socket).await.unwrap();
        for n in 0..NAMES {
            let name = format!("load/n{n}");
            let h = match cl
                .secrets
                .history(pb::HistoryRequest { name: name.clone() })
                .await
            {
                Ok(h) => h.into_inner(),
                // On a loaded machine a name's writers may all have been cut
                // off before their first put was acknowledged: then the name
                // may not exist, and that loses nothing.
                Err(s) if s.code() == tonic::Code::NotFound => {
                    let acked: Vec<u64> = ledger
                        .acked
                        .keys()
                        .filter(|(n2, _)| *n2 == name)
                        .map(|(_, v)| *v)
                        .collect();
                    assert!(
                        acked.is_empty(),
                        "{name}: versions {acked:?} were acknowledged but the secret is gone"
                    );
                    eprintln!("{name}: no put was acknowledged and the secret does not exist");
                    continue;
                }
                Err(s) => panic!("{name}: history after restart: {s:?}"),
            };
            let current = h.meta.as_ref().unwrap().current_version;
            let versions: Vec<u64> = h.versions.iter().map(|v| v.version).collect();
            assert_eq!(
                versions,
                (1..=current).collect::<Vec<_>>(),
                "{name}: versions must be contiguous 1..={current}"
            );
            for v in &h.versions {
                assert_eq!(v.state, "active", "{name} v{}: {}", v.version, v.state);
            }
            let attempted = &ledger.attempted[&name];
            let mut seen = HashSet::new();
            for v in 1..=current {
                let got = cl
                    .secrets
                    .get(pb::GetRequest {
                        name: name.clone(),
                        version: v,
                    })
                    .await
                    .unwrap_or_else(|s| panic!("{name} v{v} unreadable after restart: {s:?}"))
                    .into_inner();
                assert_eq!(got.version, v);
                assert!(
                    attempted.contains(&got.value),
                    "{name} v{v} holds a value no writer sent"
                );
                assert!(
                    seen.insert(got.value.clone()),
                    "{name} v{v}: one put stored twice"
                );
                if let Some(want) = ledger.acked.get(&(name.clone(), v)) {
                    assert_eq!(&got.value, want, "{name} v{v}: acknowledged value changed");
                }
            }
            // every acknowledged version of this name is within 1..=current
            for ((n2, v), _) in ledger.acked.iter().filter(|((n2, _), _)| *n2 == name) {
                assert!(*v <= current, "{n2} v{v} was acknowledged but is gone");
            }
        }
    });
}

both_backends!(sigterm_under_load_loses_no_acknowledged_write);

// ---------------------------------------------------------------------------
// 2. Socket handling
// ---------------------------------------------------------------------------

#[test]
fn sockets_have_restrictive_modes() {
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    assert!(is_socket(&d.socket));
    assert_eq!(mode_of(&d.socket), 0o660, "api.mode = \"0660\"");
    assert!(is_socket(&d.creds_socket));
    assert_eq!(
        mode_of(&d.creds_socket),
        0o600,
        "the credentials socket is for PID 1 only"
    );
}

#[test]
fn stale_socket_from_a_killed_daemon_is_replaced() {
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"before the crash");
    let mut child = d.take_daemon_child().unwrap();
    signal_child(&child, Signal::SIGKILL);
    wait_child(&mut child, PROMPT).expect("SIGKILLed keyseald did not die");
    assert!(is_socket(&d.socket), "the killed daemon left its socket");
    assert!(
        UnixStream::connect(&d.socket).is_err(),
        "nobody should answer on the stale socket"
    );
    d.spawn();
    assert!(is_socket(&d.socket));
    assert_eq!(mode_of(&d.socket), 0o660);
    assert_eq!(d.get("app/x"), b"before the crash");
    d.put("app/x", b"after");
    assert_eq!(d.get("app/x"), b"after");
}

/// Starts a second keyseald on `d`'s own config while `d` runs.
fn second_daemon_on_same_config(d: &TestDaemon) -> Output {
    d.put("app/x", b"one");
    let out = run_bounded(keyseald(&d.config), Duration::from_secs(15));
    assert!(is_socket(&d.socket), "the second daemon removed the socket");
    assert_eq!(d.get("app/x"), b"one", "the first daemon keeps serving");
    d.put("app/x", b"two");
    assert_eq!(d.get("app/x"), b"two");
    out
}

#[test]
fn second_daemon_on_the_same_config_is_refused() {
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    let out = second_daemon_on_same_config(&d);
    let err = stderr_of(&out);
    // the sled store lock trips before the socket check: "store locked" is
    // an IO failure (exit.rs)
    assert_eq!(out.status.code(), Some(74), "{err}");
    let store = d.dir().join("store").display().to_string();
    assert!(
        err.lines()
            .any(|l| l.starts_with("keyseald: ") && l.contains(&store)),
        "the refusal names the store: {err}"
    );
}

#[test]

fn second_daemon_on_the_same_config_says_another_daemon_runs() {
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    let out = second_daemon_on_same_config(&d);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("another daemon is listening")
            || err.contains("locked by another process (is keyseald running?"),
        "the refusal says another daemon runs: {err}"
    );
}

#[test]
fn second_daemon_on_the_same_socket_is_refused() {
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"one");
    // same socket and device, but its own store (so no store lock stops it
    // first) and its own credentials socket
    let config2 = d.dir().join("second.toml");
    let text = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("path = \"store\"", "path = \"store2\"")
        .replace("credentials.sock", "credentials2.sock");
    assert!(text.contains("store2") && text.contains("credentials2.sock"));
    std::fs::write(&config2, text).unwrap();
    let mut init = Command::new(KEYSEAL);
    init.arg("init").arg("--config").arg(&config2);
    let out = run_bounded(init, Duration::from_secs(15));
    assert!(out.status.success(), "init store2: {}", stderr_of(&out));

    let out = run_bounded(keyseald(&config2), Duration::from_secs(15));
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(73), "{err}");
    assert!(
        err.contains("another daemon is listening") && err.contains("stop it first"),
        "{err}"
    );
    assert!(is_socket(&d.socket), "the live socket was removed");
    assert_eq!(d.get("app/x"), b"one", "the first daemon keeps serving");
}

#[test]
fn regular_file_at_the_socket_path_is_not_replaced() {
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"kept");
    assert!(d.stop().success());
    let _ = std::fs::remove_file(&d.socket);
    std::fs::write(&d.socket, b"precious data, not a socket").unwrap();
    let out = run_bounded(keyseald(&d.config), Duration::from_secs(15));
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(73), "{err}");
    assert!(
        err.contains("is not a socket") && err.contains(&d.socket.display().to_string()),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&d.socket).unwrap(),
        b"precious data, not a socket",
        "the regular file was touched"
    );
    // nothing else broke: once the file is moved away the daemon starts
    std::fs::remove_file(&d.socket).unwrap();
    d.spawn();
    assert_eq!(d.get("app/x"), b"kept");
}

// ---------------------------------------------------------------------------
// 3. systemd socket activation
// ---------------------------------------------------------------------------

#[test]
fn systemd_socket_activation_uses_the_passed_socket() {
    const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"via activation");
    assert!(d.stop().success());
    std::fs::remove_file(&d.socket).unwrap();
    let activated = d.dir().join("activated.sock");
    let log = d.dir().join("activate.log");
    let mut cmd = Command::new(ACTIVATE);
    // systemd-socket-activate passes on only the variables named with -E
    cmd.arg("-l")
        .arg(&activated)
        .arg("-E")
        .arg("SOFTHSM2_CONF")
        .arg("--")
        .arg(KEYSEALD)
        .arg("--config")
        .arg(&d.config);
    let mut g = spawn_keyseald(cmd, &log);
    wait_for(PROMPT, "systemd-socket-activate to listen", || {
        is_socket(&activated)
    });

    // the first connection starts keyseald on the passed socket
    let out = cli_at(&activated, &["secret", "get", "app/x"]);
    let text = || strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
    assert!(
        out.status.success(),
        "get through the activated socket: {}; log:\n{}",
        stderr_of(&out),
        text()
    );
    assert_eq!(out.stdout, b"via activation");
    let mut put = Command::new(KEYSEAL);
    put.arg("--socket")
        .arg(&activated)
        .args(["secret", "put", "app/x", "--from-file"])
        .arg(&d.policy);
    let out = run_bounded(put, PROMPT);
    assert!(out.status.success(), "{}", stderr_of(&out));

    assert!(
        text().contains("using the socket passed by systemd"),
        "log:\n{}",
        text()
    );
    assert!(
        !d.socket.exists(),
        "keyseald bound api.socket although systemd passed a socket"
    );
    // non-accept mode execs the daemon in place: SIGTERM ends it cleanly
    signal_child(&g.0, Signal::SIGTERM);
    let st = wait_child(&mut g.0, PROMPT).expect("activated keyseald did not stop");
    assert!(st.success(), "{st}; log:\n{}", text());
}

// ---------------------------------------------------------------------------
// 4. sd_notify
// ---------------------------------------------------------------------------

/// Receives datagrams until one contains `needle`; returns it.
fn recv_notify(sock: &UnixDatagram, needle: &str, g: &mut Guard, log: &Path) -> String {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == needle) {
                    return msg;
                }
                seen.push(msg);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
        if let Some(st) = g.0.try_wait().unwrap() {
            // the datagram may already be queued; drain once more
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == needle) {
                    return msg;
                }
                seen.push(msg);
            }
            panic!(
                "keyseald exited ({st}) before sending {needle:?}; got {seen:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within 10 s; got {seen:?}"
        );
    }
}

fn notify_cycle(d: &TestDaemon, sock: &UnixDatagram, notify_socket: &str) {
    let log = d.dir().join("notify.log");
    let mut cmd = keyseald(&d.config);
    cmd.env("NOTIFY_SOCKET", notify_socket);
    let mut g = spawn_keyseald(cmd, &log);
    let ready = recv_notify(sock, "READY=1", &mut g, &log);
    assert!(
        ready.contains(&format!("STATUS=serving on {}", d.socket.display())),
        "{ready:?}"
    );
    // READY=1 means ready: the very first request succeeds, no retry
    let out = cli_at(&d.socket, &["secret", "get", "app/x"]);
    assert!(
        out.status.success(),
        "right after READY=1: {}",
        stderr_of(&out)
    );
    assert_eq!(out.stdout, b"v1");
    signal_child(&g.0, Signal::SIGHUP);
    recv_notify(sock, "STATUS=policy reloaded", &mut g, &log);
    signal_child(&g.0, Signal::SIGTERM);
    recv_notify(sock, "STOPPING=1", &mut g, &log);
    let st = wait_child(&mut g.0, PROMPT).expect("keyseald did not stop after SIGTERM");
    assert!(st.success(), "{st}");
}

#[test]
fn sd_notify_ready_reload_and_stopping() {
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"v1");
    assert!(d.stop().success());

    // a path socket
    let path = d.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    notify_cycle(&d, &sock, path.to_str().unwrap());

    // an abstract socket, written "@name" as systemd does
    use std::os::linux::net::SocketAddrExt;
    let name = format!("keyseal-e2e-notify-{}", rand::random::<u64>());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    notify_cycle(&d, &sock, &format!("@{name}"));
}

// ---------------------------------------------------------------------------
// 5. systemd credentials (LoadCredential=ID:SOCKET)
// ---------------------------------------------------------------------------

/// Connects to `socket` from the abstract address `\0<random>/unit/UNIT/ID`
/// (what PID 1 does) or, with `None`, from an unbound socket; reads to EOF.
fn load_credential(socket: &Path, from: Option<(&str, &str)>) -> Vec<u8> {
    use nix::sys::socket::{bind, connect, socket as mksocket, AddressFamily, SockFlag};
    use nix::sys::socket::{SockType, UnixAddr};
    let fd = mksocket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    if let Some((unit, id)) = from {
        let name = format!("{:016x}/unit/{unit}/{id}", rand::random::<u64>());
        bind(
            fd.as_raw_fd(),
            &UnixAddr::new_abstract(name.as_bytes()).unwrap(),
        )
        .unwrap();
    }
    connect(fd.as_raw_fd(), &UnixAddr::new(socket).unwrap()).unwrap();
    let mut s = UnixStream::from(fd);
    s.set_read_timeout(Some(PROMPT)).unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v)
        .expect("the daemon must answer or close, not leave the connection hanging");
    v
}

#[test]
fn load_credential_delivers_mapped_secrets_only() {
    let policy = format!(
        "{ROOT_POLICY}\n[[credential]]\nunit = \"app.service\"\nid = \"dbpw\"\nsecret = \"app/db\"\n"
    );
    let d = TestDaemon::start(Backend::SoftHsm, &policy);
    d.put("app/db", b"db-pass\x00\xffword-1");
    d.put("app/other", b"not mapped");
    assert_eq!(
        load_credential(&d.creds_socket, Some(("app.service", "dbpw"))),
        b"db-pass\x00\xffword-1"
    );
    // the newest version is delivered
    d.put("app/db", b"db-password-2");
    assert_eq!(
        load_credential(&d.creds_socket, Some(("app.service", "dbpw"))),
        b"db-password-2"
    );
    let refused = count_log_lines(&d, "credential request refused");
    // unmapped id, unmapped unit, an id naming a secret directly
    for (unit, id) in [
        ("app.service", "other"),
        ("evil.service", "dbpw"),
        ("app.service", "app/other"),
    ] {
        assert!(
            load_credential(&d.creds_socket, Some((unit, id))).is_empty(),
            "({unit}, {id}) must get nothing"
        );
    }
    // a peer not bound to an abstract address
    assert!(load_credential(&d.creds_socket, None).is_empty());
    wait_log_lines(&d, "credential request refused", refused + 4);
    let log = log_of(&d);
    assert!(log.contains("credential delivered"));
    assert!(
        !log.contains("db-pass") && !log.contains("not mapped"),
        "a secret value reached the log"
    );
}

// ---------------------------------------------------------------------------
// 6. Startup faults
// ---------------------------------------------------------------------------

/// A temp dir with a SoftHSM2 token, a PIN file, a policy and a config.
struct FaultSetup {
    hsm: SoftHsm,
    dir: tempfile::TempDir,
}

impl FaultSetup {
    fn new() -> FaultSetup {
        let hsm = SoftHsm::new().unwrap();
        let dir = tempfile::Builder::new()
            .prefix("keyseal-e2e-fault-")
            .tempdir()
            .unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, &hsm.pin).unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, ROOT_POLICY).unwrap();
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();
        FaultSetup { hsm, dir }
    }

    fn pkcs11_section(&self, token_label: &str) -> String {
        format!(
            "[root]\nbackend = \"pkcs11\"\n[root.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{token_label}\"\npin_file = \"pin\"\n",
            self.hsm.module.display()
        )
    }

    /// `extra_api` goes into the `[api]` section.
    fn write_config(&self, root_section: &str, extra_api: &str) -> PathBuf {
        let p = self.dir.path().join("keyseald.toml");
        std::fs::write(
            &p,
            format!(
                "{root_section}\n[store]\npath = \"store\"\n\n[api]\nsocket = \"keyseal.sock\"\ncredentials_socket = \"credentials.sock\"\n{extra_api}\n[policy]\npath = \"policy.toml\"\n"
            ),
        )
        .unwrap();
        p
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn unreachable_tpm_config(&self) -> (PathBuf, String) {
        // a port nobody listens on
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tcti = format!("swtpm:host=127.0.0.1,port={port}");
        let cfg = self.write_config(
            &format!("[root]\nbackend = \"tpm\"\n[root.tpm]\ntcti = \"{tcti}\"\n"),
            "",
        );
        (cfg, tcti)
    }
}

/// Runs keyseald on `config` and asserts: exit `code`; exactly one
/// `keyseald: ` line on stderr, containing every needle; nothing on stdout;
/// no store or socket created. Returns the whole stderr (ANSI stripped).
fn expect_startup_failure(config: &Path, code: i32, needles: &[&str]) -> String {
    let dir = config.parent().unwrap();
    let out = run_bounded(keyseald(config), Duration::from_secs(15));
    let err = strip_ansi(&stderr_of(&out));
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    let fatal: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("keyseald: "))
        .collect();
    assert_eq!(fatal.len(), 1, "one `keyseald: ` line expected:\n{err}");
    for n in needles {
        assert!(fatal[0].contains(n), "{n:?} missing from: {}", fatal[0]);
    }
    for created in ["store", "keyseal.sock", "credentials.sock"] {
        assert!(
            !dir.join(created).exists(),
            "{created} was created by a daemon that failed to start"
        );
    }
    assert!(out.stdout.is_empty());
    err
}

/// A line of the daemon's human log format: `<RFC 3339 time>  LEVEL ...`.
fn log_level(line: &str) -> Option<&str> {
    let b = line.as_bytes();
    let ts = b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T';
    ts.then(|| line.split_whitespace().nth(1).unwrap_or(""))
}

/// "One clear line": apart from ordinary INFO/WARN log lines, stderr is the
/// single fatal line — no continuation lines, no second error.
fn assert_one_clear_line(stderr: &str) {
    for l in stderr.lines().filter(|l| !l.trim().is_empty()) {
        if l.starts_with("keyseald: ") {
            continue;
        }
        match log_level(l) {
            Some("INFO" | "WARN" | "DEBUG" | "TRACE") => {}
            Some(level) => panic!("a second {level} line next to the fatal one:\n{stderr}"),
            None => panic!("the failure spans several lines ({l:?}):\n{stderr}"),
        }
    }
}

#[test]
fn startup_fault_unknown_config_key() {
    let f = FaultSetup::new();
    let cfg = f.write_config(
        &f.pkcs11_section(&f.hsm.token_label),
        "sockett = \"x.sock\"\n",
    );
    // the first line names the file; the key may be on a later line (see
    // the ignored test below)
    let err = expect_startup_failure(&cfg, 78, &["keyseald.toml"]);
    assert!(
        err.contains("unknown field `sockett`"),
        "the message names the key: {err}"
    );
}

#[test]

fn startup_fault_unknown_config_key_is_one_line() {
    let f = FaultSetup::new();
    let cfg = f.write_config(
        &f.pkcs11_section(&f.hsm.token_label),
        "sockett = \"x.sock\"\n",
    );
    let err = expect_startup_failure(&cfg, 78, &["sockett"]);
    assert_one_clear_line(&err);
}

#[test]
fn startup_fault_wrong_pin() {
    let f = FaultSetup::new();
    std::fs::write(f.path("pin"), "not-the-pin").unwrap();
    let cfg = f.write_config(&f.pkcs11_section(&f.hsm.token_label), "");
    let err = expect_startup_failure(&cfg, 77, &["wrong user PIN", "pin_file"]);
    assert_one_clear_line(&err);
    assert!(!err.contains("not-the-pin"), "the PIN reached stderr");
}

#[test]
fn startup_fault_missing_token_label() {
    let f = FaultSetup::new();
    let cfg = f.write_config(&f.pkcs11_section("no-such-token"), "");
    let err = expect_startup_failure(
        &cfg,
        78,
        &[
            "no-such-token",
            "fix root.pkcs11.token_label",
            "keyseal-test",
        ],
    );
    assert_one_clear_line(&err);
}

#[test]
fn startup_fault_unreachable_tpm() {
    let f = FaultSetup::new();
    let (cfg, tcti) = f.unreachable_tpm_config();
    expect_startup_failure(&cfg, 69, &["cannot reach TPM", &tcti, "[root.tpm]"]);
}

#[test]

fn startup_fault_unreachable_tpm_is_one_line() {
    let f = FaultSetup::new();
    let (cfg, tcti) = f.unreachable_tpm_config();
    let err = expect_startup_failure(&cfg, 69, &["cannot reach TPM", &tcti]);
    assert_one_clear_line(&err);
}

#[test]
fn startup_fault_pin_file_readable_by_others() {
    let f = FaultSetup::new();
    std::fs::set_permissions(f.path("pin"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = f.write_config(&f.pkcs11_section(&f.hsm.token_label), "");
    let err = expect_startup_failure(&cfg, 78, &["PIN file", "chmod 600"]);
    assert_one_clear_line(&err);
}

#[test]
fn startup_fault_store_not_initialised() {
    let f = FaultSetup::new();
    let cfg = f.write_config(&f.pkcs11_section(&f.hsm.token_label), "");
    let err = expect_startup_failure(&cfg, 78, &["keyseal init", "store"]);
    assert_one_clear_line(&err);
}

#[test]
fn check_with_a_good_config_exits_0_and_serves_nothing() {
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"v1");
    assert!(d.stop().success());
    std::fs::remove_file(&d.socket).unwrap();
    let mut cmd = keyseald(&d.config);
    cmd.arg("--check");
    let out = run_bounded(cmd, Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    assert!(!d.socket.exists(), "--check must not listen");
    // and --check on a broken policy fails
    std::fs::write(&d.policy, "[[rule]\n").unwrap();
    let mut cmd = keyseald(&d.config);
    cmd.arg("--check");
    let out = run_bounded(cmd, Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(78), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("policy"), "{}", stderr_of(&out));
}

// ---------------------------------------------------------------------------
// 7. Watch over the CLI
// ---------------------------------------------------------------------------

/// Spawns `keyseal secret watch args...`; its stdout lines arrive on the
/// returned channel.
fn spawn_watch(d: &TestDaemon, args: &[&str]) -> (Guard, mpsc::Receiver<String>) {
    let mut c = d.cli(&["secret", "watch"]);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    (Guard(child), rx)
}

/// Puts `name` until the watcher prints a line for it: the watch is
/// subscribed from then on.
fn sync_watch(d: &TestDaemon, rx: &mpsc::Receiver<String>, name: &str) {
    let deadline = Instant::now() + PROMPT;
    loop {
        d.put(name, b"sync");
        let until = Instant::now() + Duration::from_millis(300);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(name) => return,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("keyseal secret watch exited before subscribing")
                }
            }
        }
        assert!(Instant::now() < deadline, "the watch never saw {name}");
    }
}

#[test]
fn watch_prints_new_versions() {
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"v1");
    let (mut g, rx) = spawn_watch(&d, &["app/"]);
    sync_watch(&d, &rx, "app/sync");
    // drain the sync lines
    while rx.recv_timeout(Duration::from_millis(50)).is_ok() {}
    d.put("other/y", b"outside the prefix");
    d.put("app/x", b"v2");
    let line = rx
        .recv_timeout(PROMPT)
        .expect("no watch line within 5 s of the put");
    // events arrive in order: other/y would have come first if not filtered
    assert_eq!(line, "put app/x v2");
    let out = d.cli(&["secret", "rm", "app/x"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(rx.recv_timeout(PROMPT).unwrap(), "delete app/x v2");
    g.0.kill().unwrap();
    wait_child(&mut g.0, PROMPT).expect("watch did not die");
}

#[test]

fn sigterm_with_an_open_watch_still_stops_the_daemon() {
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    let (mut g, rx) = spawn_watch(&d, &["app/"]);
    sync_watch(&d, &rx, "app/sync");
    let mut child = d.take_daemon_child().unwrap();
    signal_child(&child, Signal::SIGTERM);
    let st = wait_child(&mut child, PROMPT);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let st = st.expect("keyseald did not exit within 5 s of SIGTERM while a watch was open");
    assert!(st.success(), "{st}");
    // the watcher learns the daemon went away instead of hanging
    let wst =
        wait_child(&mut g.0, PROMPT).expect("keyseal secret watch hangs after the daemon exited");
    // "until Ctrl-C": ending quietly with 0 would look like a normal end
    assert!(!wst.success(), "the watcher must report the lost daemon");
}
