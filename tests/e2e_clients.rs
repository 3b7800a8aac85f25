//! End-to-end tests of keyseald from the clients' side: a Python grpcio
//! client (stubs generated from proto/ at test time), real Unix users and
//! the policy, bad input over the wire (tonic and raw bytes), and secrets
//! never reaching the daemon log.
//!
//! Every wait is bounded; every child process is killed on the way out.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::daemon::{TestDaemon, KEYSEAL, ROOT_POLICY};
use common::Backend;
use keyseal::api::pb;
use keyseal::client::Client;
use serde_json::Value;
use tonic::Code;

/// Bound of one client command (CLI or Python).
const CMD_LIMIT: Duration = Duration::from_secs(15);
/// Bound of waiting for a watch event.
const EVENT_LIMIT: Duration = Duration::from_secs(8);

const PY_CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/ks_client.py");

// ---------------------------------------------------------------------------
// Processes with deadlines
// ---------------------------------------------------------------------------

/// Runs `cmd` with `stdin`, killing it and failing the test after `limit`.
fn output_within(mut cmd: Command, stdin: &[u8], limit: Duration) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut sin = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        // The child may exit without reading everything (e.g. refused).
        let _ = sin.write_all(&data);
    });
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    writer.join().unwrap();
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A long-running child whose stdout is read line by line (watchers).
/// Killed on drop.
struct LineChild {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl LineChild {
    fn spawn(cmd: Command) -> LineChild {
        Self::spawn_io(cmd, false)
    }

    /// With `stdin`, the child's stdin is a pipe kept in `self.stdin`.
    fn spawn_io(mut cmd: Command, stdin: bool) -> LineChild {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        LineChild {
            child,
            stdin,
            rx,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits (bounded) for a line matching `pred`; returns it. Lines read
    /// on the way are kept in `seen`.
    fn wait_for(&mut self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "no line with {what} within {limit:?} ({e}); seen: {:?}; stderr: {}",
                        self.seen,
                        String::from_utf8_lossy(&self.stderr.lock().unwrap())
                    );
                }
            }
        }
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Python grpcio client
// ---------------------------------------------------------------------------

/// The real python interpreter (not a pyenv shim), so the pid we spawn is
/// the one we kill. `KEYSEAL_TEST_PYTHON` overrides.
fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Some(p) = std::env::var_os("KEYSEAL_TEST_PYTHON") {
            return PathBuf::from(p);
        }
        let out = Command::new("python3")
            .args([
                "-c",
                "import os,sys; print(os.path.realpath(sys.executable))",
            ])
            .output()
            .expect("python3 is installed (scripts/test-deps.sh)");
        assert!(out.status.success(), "python3 does not run");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// Python stubs generated from proto/ into a temp dir for this test.
struct Py {
    stubs: tempfile::TempDir,
}

impl Py {
    fn new() -> Py {
        let stubs = tempfile::Builder::new()
            .prefix("keyseal-pystubs-")
            .tempdir()
            .unwrap();
        let mut cmd = Command::new(python());
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["-m", "grpc_tools.protoc", "-I", "proto"])
            .arg(format!("--python_out={}", stubs.path().display()))
            .arg(format!("--grpc_python_out={}", stubs.path().display()))
            .args([
                "proto/keyseal/v1/secrets.proto",
                "proto/keyseal/v1/system.proto",
            ]);
        let out = output_within(cmd, b"", CMD_LIMIT);
        assert!(
            out.status.success(),
            "generating Python stubs failed (install grpcio, grpcio-tools and protobuf: scripts/test-deps.sh): {}",
            stderr_of(&out)
        );
        assert!(stubs.path().join("keyseal/v1/secrets_pb2_grpc.py").exists());
        Py { stubs }
    }

    fn cmd(&self, socket: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(python());
        c.arg(PY_CLIENT)
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env("PYTHONPATH", self.stubs.path())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("GRPC_VERBOSITY");
        c
    }

    /// Runs the client; returns its exit code and last JSON line.
    fn call(&self, socket: &Path, args: &[&str], stdin: &[u8]) -> (i32, Value) {
        let out = output_within(self.cmd(socket, args), stdin, CMD_LIMIT);
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_else(|| {
            panic!(
                "python {args:?} printed nothing (exit {:?}); stderr: {}",
                out.status.code(),
                stderr_of(&out)
            )
        });
        let v: Value = serde_json::from_str(last).unwrap_or_else(|e| {
            panic!(
                "python {args:?}: {e} in {last:?}; stderr: {}",
                stderr_of(&out)
            )
        });
        (out.status.code().unwrap_or(-1), v)
    }

    /// Like `call`, asserting success.
    fn ok(&self, socket: &Path, args: &[&str], stdin: &[u8]) -> Value {
        let (code, v) = self.call(socket, args, stdin);
        assert_eq!(code, 0, "python {args:?} failed: {v}");
        assert_eq!(v["ok"], true, "python {args:?}: {v}");
        v
    }

    /// A long-lived client on one channel answering one JSON line per
    /// request (see `Py::ask`); avoids an interpreter start per call.
    fn batch(&self, socket: &Path) -> LineChild {
        LineChild::spawn_io(self.cmd(socket, &["batch"]), true)
    }

    /// One call through a `batch` client: the args of a subcommand.
    fn ask(batch: &mut LineChild, args: &[&str]) -> Value {
        let line = serde_json::to_string(args).unwrap();
        let sin = batch.stdin.as_mut().expect("a batch client");
        writeln!(sin, "{line}").unwrap();
        sin.flush().unwrap();
        let answer = batch.wait_for("an answer", CMD_LIMIT, |_| true);
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{args:?}: {e} in {answer:?}"))
    }

    fn watch(&self, socket: &Path, names: &[&str]) -> LineChild {
        let mut args = vec!["watch"];
        args.extend_from_slice(names);
        let mut w = LineChild::spawn(self.cmd(socket, &args));
        w.wait_for("ready", CMD_LIMIT, |l| l.contains("\"ready\": true"));
        w
    }
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

fn run_cli(d: &TestDaemon, args: &[&str], stdin: &[u8]) -> Output {
    output_within(d.cli(args), stdin, CMD_LIMIT)
}

fn cli_json(d: &TestDaemon, args: &[&str]) -> Value {
    let out = run_cli(d, args, b"");
    assert!(
        out.status.success(),
        "keyseal {args:?}: {}",
        stderr_of(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The store as the CLI shows it: every secret, and the history of `name`.
fn cli_snapshot(d: &TestDaemon, name: &str) -> (Value, Value) {
    (
        cli_json(d, &["secret", "ls", "--json"]),
        cli_json(d, &["secret", "history", name, "--json"]),
    )
}

fn assert_daemon_answers(d: &TestDaemon, after: &str) {
    let out = run_cli(d, &["status", "--json"], b"");
    assert!(
        out.status.success(),
        "daemon does not answer after {after}: {}; log:\n{}",
        stderr_of(&out),
        d.log_text()
    );
}

fn assert_no_panic_in_log(d: &TestDaemon) {
    let log = d.log_text();
    assert!(
        !log.contains("panicked"),
        "the daemon panicked; log:\n{log}"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn rand_hex() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A value no other test writes and no log line could contain by chance.
fn marker(tag: &str) -> String {
    format!("KSMARK{tag}{:016x}", rand::random::<u64>())
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).unwrap()
}

// ---------------------------------------------------------------------------
// 1. Python grpcio client
// ---------------------------------------------------------------------------

/// Values put by the CLI read back exactly by Python, and the reverse.
fn python_get_and_put_interop(b: Backend) {
    let py = Py::new();
    let d = TestDaemon::start(b, ROOT_POLICY);
    let v1: &[u8] = b"first\0\xff\xfe\n binary \r\n";
    let v2: &[u8] = b"second";
    d.put("app/py/x", v1);
    d.put("app/py/x", v2);

    let r = py.ok(&d.socket, &["get", "app/py/x"], b"");
    assert_eq!(r["name"], "app/py/x");
    assert_eq!(r["version"], 2);
    assert_eq!(unhex(&r["value_hex"]), v2);
    // A missing name: exit code 3 and the gRPC code.
    let (code, r) = py.call(&d.socket, &["get", "app/py/none"], b"");
    assert_eq!(code, 3, "{r}");
    assert_eq!(r["code"], "NOT_FOUND", "{r}");
    // Python writes (value on stdin), the CLI reads the exact bytes.
    let pv: &[u8] = b"from python \x00\x01\x02";
    let r = py.ok(&d.socket, &["put", "app/py/w"], pv);
    assert_eq!(r["version"], 1);
    assert_eq!(d.get("app/py/w"), pv);

    // More calls on one channel.
    let mut c = py.batch(&d.socket);
    let r = Py::ask(&mut c, &["get", "app/py/x", "--version", "1"]);
    assert_eq!(r["version"], 1, "{r}");
    assert_eq!(unhex(&r["value_hex"]), v1);
    let r = Py::ask(&mut c, &["get", "app/py/x", "--version", "9"]);
    assert_eq!(r["code"], "NOT_FOUND", "{r}");
    // CAS: a stale version is refused, the right one accepted.
    let r = Py::ask(
        &mut c,
        &["put", "app/py/w", "--cas", "0", "--value-hex", "78"],
    );
    assert_eq!(r["code"], "FAILED_PRECONDITION", "{r}");
    let r = Py::ask(
        &mut c,
        &["put", "app/py/w", "--cas", "1", "--value-hex", "79"],
    );
    assert_eq!(r["version"], 2, "{r}");
    assert_eq!(d.get("app/py/w"), b"y");
    let r = Py::ask(&mut c, &["get", "app/py/w", "--version", "1"]);
    assert_eq!(unhex(&r["value_hex"]), pv);
}

/// Python watches `app/`: it sees puts and deletes under the prefix within
/// a bounded time, and nothing outside it.
fn python_watch_sees_new_versions(b: Backend) {
    let py = Py::new();
    let d = TestDaemon::start(b, ROOT_POLICY);
    d.put("app/w/key", b"v1");
    let mut w = py.watch(&d.socket, &["app/"]);

    // Written after the subscription: an event outside the prefix would
    // arrive before the one inside it.
    d.put("other/x", b"not watched");
    d.put("apple", b"not under app/ either");
    let t0 = Instant::now();
    d.put("app/w/key", b"v2");
    let line = w.wait_for("app/w/key v2", EVENT_LIMIT, |l| l.contains("app/w/key"));
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["name"], "app/w/key");
    assert_eq!(ev["version"], 2);
    assert_eq!(ev["kind"], "put");
    assert!(t0.elapsed() < EVENT_LIMIT);

    let out = run_cli(&d, &["secret", "rm", "app/w/key"], b"");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let line = w.wait_for("delete event", EVENT_LIMIT, |l| l.contains("\"delete\""));
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["name"], "app/w/key");
    assert_eq!(ev["version"], 2);

    for l in &w.seen {
        assert!(
            !l.contains("other/x") && !l.contains("\"apple\""),
            "event outside app/ delivered: {l}"
        );
    }
    drop(w); // kills python
    assert_daemon_answers(&d, "the watcher was killed");
}

both_backends!(python_get_and_put_interop, python_watch_sees_new_versions);

/// grpc.health.v1 over hand-encoded bytes, and server reflection, from Python.
#[test]
fn python_health_and_reflection_softhsm() {
    let py = Py::new();
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);

    let mut c = py.batch(&d.socket);
    // HealthCheckResponse { status = SERVING (1) } is field 1, varint 1.
    let r = Py::ask(&mut c, &["health"]);
    assert_eq!(r["response_hex"], "0801", "overall health: {r}");
    for svc in ["keyseal.v1.Secrets", "keyseal.v1.System"] {
        let r = Py::ask(&mut c, &["health", "--service", svc]);
        assert_eq!(r["response_hex"], "0801", "{svc}: {r}");
    }
    let r = Py::ask(&mut c, &["health", "--service", "no.such.Service"]);
    assert_eq!(r["code"], "NOT_FOUND", "{r}");

    let r = Py::ask(&mut c, &["reflect-list"]);
    assert_eq!(r["ok"], true, "{r}");
    let services: Vec<&str> = r["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for want in [
        "keyseal.v1.Secrets",
        "keyseal.v1.System",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&want), "{want} not in {services:?}");
    }

    let r = Py::ask(&mut c, &["reflect-symbol", "keyseal.v1.Secrets"]);
    assert_eq!(r["ok"], true, "{r}");
    let files = r["files"].as_array().unwrap();
    let secrets = files
        .iter()
        .find_map(|f| f["services"].get("Secrets"))
        .unwrap_or_else(|| panic!("no file declares Secrets: {r}"));
    let methods: Vec<(&str, bool, bool)> = secrets
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m[0].as_str().unwrap(),
                m[1].as_bool().unwrap(),
                m[2].as_bool().unwrap(),
            )
        })
        .collect();
    for m in [
        "Get", "Put", "List", "History", "Delete", "Undelete", "Destroy",
    ] {
        assert!(methods.contains(&(m, false, false)), "{m} in {methods:?}");
    }
    assert!(
        methods.contains(&("Watch", false, true)),
        "Watch is server-streaming: {methods:?}"
    );
    assert!(files.iter().any(|f| f["package"] == "keyseal.v1"));
}

// ---------------------------------------------------------------------------
// 2. Identity and policy with real Unix users
// ---------------------------------------------------------------------------

/// Runs an account-management command, retrying while another process holds
/// the /etc/passwd lock (tests run in parallel processes).
fn account_cmd(args: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = output_within(
            {
                let mut c = Command::new(args[0]);
                c.args(&args[1..]);
                c
            },
            b"",
            CMD_LIMIT,
        );
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{args:?} failed: {}",
            stderr_of(&out)
        );
        std::thread::sleep(Duration::from_millis(50 + u64::from(rand::random::<u8>())));
    }
}

#[derive(Clone)]
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// System users and a group created for one test, deleted on drop.
#[derive(Default)]
struct Accounts {
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    fn group(&mut self, role: &str) -> (String, u32) {
        let name = format!("ks-{role}-{}", rand_hex());
        account_cmd(&["groupadd", "--system", &name]);
        self.groups.push(name.clone());
        let gid = nix::unistd::Group::from_name(&name)
            .unwrap()
            .expect("group just created")
            .gid
            .as_raw();
        (name, gid)
    }

    fn user(&mut self, role: &str, groups: &[&str]) -> TestUser {
        let name = format!("ks-{role}-{}", rand_hex());
        let mut args = vec![
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ];
        let joined = groups.join(",");
        if !groups.is_empty() {
            args.extend(["-G", &joined]);
        }
        args.push(&name);
        account_cmd(&args);
        self.users.push(name.clone());
        let u = nix::unistd::User::from_name(&name)
            .unwrap()
            .expect("user just created");
        TestUser {
            name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = Command::new("userdel").arg(u).output();
        }
        for g in &self.groups {
            let _ = Command::new("groupdel").arg(g).output();
        }
    }
}

/// `keyseal args...` run as `u` (real and effective ids, its groups).
fn cli_as(u: &TestUser, socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    output_within(cli_as_cmd(u, socket, args), stdin, CMD_LIMIT)
}

fn cli_as_cmd(u: &TestUser, socket: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", u.uid))
        .arg(format!("--regid={}", u.gid))
        .arg("--init-groups")
        .arg(KEYSEAL)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("KEYSEAL_SOCKET");
    c
}

/// Restarts the daemon with `api.group = group` added to its config, so
/// keyseald itself gives the socket to that group (mode stays 0660).
fn restart_with_socket_group(d: &mut TestDaemon, group: &str) {
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    assert!(
        cfg.contains("mode = \"0660\"\n"),
        "config layout changed:\n{cfg}"
    );
    let cfg = cfg.replacen(
        "mode = \"0660\"\n",
        &format!("mode = \"0660\"\ngroup = \"{group}\"\n"),
        1,
    );
    std::fs::write(&d.config, cfg).unwrap();
    d.stop();
    d.spawn();
}

#[test]
fn unix_users_identity_and_policy_softhsm() {
    let mut acc = Accounts::default();
    let (group, gid) = acc.group("grp");
    let alice = acc.user("alice", &[&group]);
    let bob = acc.user("bob", &[&group]);
    let carol = acc.user("carol", &[]);
    let policy = format!(
        r#"{ROOT_POLICY}
[[rule]]
name = "alice reads app/a"
capabilities = ["secret:read"]
names = ["app/a/*"]
[rule.match]
user = "{a}"

[[rule]]
name = "alice writes her own"
capabilities = ["secret:write"]
names = ["app/a/own-*"]
[rule.match]
user = "{a}"
"#,
        a = alice.name
    );
    let mut d = TestDaemon::start(Backend::SoftHsm, &policy);
    let va: &[u8] = b"alice's \0 secret\xff\n";
    d.put("app/a/x", va);
    d.put("app/b/x", b"not for alice");
    restart_with_socket_group(&mut d, &group);

    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(
        meta.gid(),
        gid,
        "socket group set by keyseald from api.group"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "socket mode");

    // A reads what the policy grants, exactly.
    let out = cli_as(&alice, &d.socket, &["secret", "get", "app/a/x"], b"");
    assert_eq!(out.status.code(), Some(0), "alice get: {}", stderr_of(&out));
    assert_eq!(out.stdout, va);
    // ...and a missing name she may read is NOT_FOUND (66), not a denial.
    let out = cli_as(&alice, &d.socket, &["secret", "get", "app/a/nope"], b"");
    assert_eq!(out.status.code(), Some(66), "{}", stderr_of(&out));

    // A is denied (77) elsewhere, and the denial does not reveal whether the
    // name exists: same code, same message up to the name itself.
    let exists = cli_as(&alice, &d.socket, &["secret", "get", "app/b/x"], b"");
    let missing = cli_as(&alice, &d.socket, &["secret", "get", "app/b/y"], b"");
    assert_eq!(exists.status.code(), Some(77), "{}", stderr_of(&exists));
    assert_eq!(missing.status.code(), Some(77), "{}", stderr_of(&missing));
    assert!(exists.stdout.is_empty() && missing.stdout.is_empty());
    let (e, m) = (stderr_of(&exists), stderr_of(&missing));
    assert!(e.contains("secret:read"), "names the capability: {e}");
    assert_eq!(e.replace("app/b/x", "NAME"), m.replace("app/b/y", "NAME"));
    // Same for history (metadata is as secret as existence).
    let exists = cli_as(&alice, &d.socket, &["secret", "history", "app/b/x"], b"");
    let missing = cli_as(&alice, &d.socket, &["secret", "history", "app/b/y"], b"");
    assert_eq!(exists.status.code(), Some(77));
    assert_eq!(
        stderr_of(&exists).replace("app/b/x", "NAME"),
        stderr_of(&missing).replace("app/b/y", "NAME")
    );

    // A only lists what she may read.
    let out = cli_as(&alice, &d.socket, &["secret", "ls", "--json"], b"");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app/a/x"]);

    // A may not write where she only reads; her write grant works, and the
    // version records her kernel identity, not anything she claimed.
    let out = cli_as(
        &alice,
        &d.socket,
        &["secret", "put", "app/a/x"],
        b"overwrite",
    );
    assert_eq!(out.status.code(), Some(77), "{}", stderr_of(&out));
    assert_eq!(d.get("app/a/x"), va, "denied write changed nothing");
    let out = cli_as(
        &alice,
        &d.socket,
        &["secret", "put", "app/a/own-1"],
        b"mine",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let h = cli_json(&d, &["secret", "history", "app/a/own-1", "--json"]);
    let by = h["versions"][0]["created_by"].as_str().unwrap();
    assert_eq!(by, format!("uid:{}({})", alice.uid, alice.name));

    // A is not an admin.
    let out = cli_as(&alice, &d.socket, &["status"], b"");
    assert_eq!(out.status.code(), Some(77), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("system:admin"),
        "{}",
        stderr_of(&out)
    );
    // root is, and the daemon sees root as root.
    let out = run_cli(&d, &["status"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    let you = text.lines().find(|l| l.starts_with("you:")).unwrap();
    assert!(you.contains("uid=0(root)"), "{you}");

    // B connects (group member) but is granted nothing.
    let out = cli_as(&bob, &d.socket, &["secret", "get", "app/a/x"], b"");
    assert_eq!(out.status.code(), Some(77), "{}", stderr_of(&out));
    assert!(out.stdout.is_empty());
    let out = cli_as(&bob, &d.socket, &["secret", "ls", "--json"], b"");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]), "bob lists nothing");

    // C is not in the socket's group: cannot connect at all.
    let out = cli_as(&carol, &d.socket, &["secret", "get", "app/a/x"], b"");
    assert_eq!(out.status.code(), Some(69), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("cannot connect"),
        "{}",
        stderr_of(&out)
    );
    assert!(out.stdout.is_empty());

    // A watching everything sees only events on names she may read.
    let mut w = LineChild::spawn(cli_as_cmd(
        &alice,
        &d.socket,
        &["secret", "watch", "--json"],
    ));
    // The CLI prints nothing when subscribed: write until an event shows
    // up, then write once more, so the second round surely follows the
    // subscription.
    let deadline = Instant::now() + EVENT_LIMIT;
    let first_a_version = loop {
        d.put("app/b/x", b"b update");
        d.put("app/a/x", va);
        if let Ok(line) = w.rx.recv_timeout(Duration::from_millis(200)) {
            w.seen.push(line.clone());
            let ev: Value = serde_json::from_str(&line).unwrap();
            break ev["version"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "alice's watch saw nothing");
    };
    d.put("app/b/x", b"b again");
    d.put("app/a/x", va);
    let want = format!("\"version\":{}", first_a_version + 1);
    w.wait_for("the next app/a/x event", EVENT_LIMIT, |l| {
        l.contains("app/a/x") && l.contains(&want)
    });
    for l in &w.seen {
        assert!(
            l.contains("\"app/a/x\""),
            "alice saw an event she may not read: {l}"
        );
    }
    drop(w);
    drop(d);
    drop(acc);
}

// ---------------------------------------------------------------------------
// 3. Bad input over the wire
// ---------------------------------------------------------------------------

enum Req {
    Get(pb::GetRequest),
    Put(pb::PutRequest),
    List(pb::ListRequest),
    History(pb::HistoryRequest),
    Delete(pb::VersionsRequest),
    Undelete(pb::VersionsRequest),
    Destroy(pb::VersionsRequest),
    Watch(pb::WatchRequest),
}

async fn send(c: &mut Client, r: Req) -> Result<(), tonic::Status> {
    match r {
        Req::Get(r) => c.secrets.get(r).await.map(|_| ()),
        Req::Put(r) => c.secrets.put(r).await.map(|_| ()),
        Req::List(r) => c.secrets.list(r).await.map(|_| ()),
        Req::History(r) => c.secrets.history(r).await.map(|_| ()),
        Req::Delete(r) => c.secrets.delete(r).await.map(|_| ()),
        Req::Undelete(r) => c.secrets.undelete(r).await.map(|_| ()),
        Req::Destroy(r) => c.secrets.destroy(r).await.map(|_| ()),
        Req::Watch(r) => c.secrets.watch(r).await.map(|_| ()),
    }
}

struct Case {
    what: String,
    req: Req,
    code: Code,
    /// The message must contain this (the rule that was broken).
    says: &'static str,
    /// Attacker-controlled input that must not be echoed back.
    input: Option<String>,
}

fn put_req(name: &str, value: &[u8]) -> pb::PutRequest {
    pb::PutRequest {
        name: name.into(),
        value: value.to_vec(),
        ..Default::default()
    }
}

fn versions_req(name: &str, versions: &[u64]) -> pb::VersionsRequest {
    pb::VersionsRequest {
        name: name.into(),
        versions: versions.to_vec(),
    }
}

/// Invalid names, and the rule each breaks.
fn bad_names() -> Vec<(String, &'static str)> {
    vec![
        (String::new(), "name is empty"),
        ("../x".into(), "'.' or '..'"),
        ("x/./y".into(), "'.' or '..'"),
        ("a//b".into(), "empty segment"),
        ("/a".into(), "empty segment"),
        ("a/".into(), "empty segment"),
        ("a\0b".into(), "character outside"),
        ("a b".into(), "character outside"),
        ("app/é".into(), "character outside"),
        ("秘密/x".into(), "character outside"),
        ("a".repeat(300), "longer than 256 bytes"),
        (
            format!("x/{}", "q".repeat(129)),
            "segment 2 is longer than 128",
        ),
        (
            format!("{}\0{}", "z".repeat(150), "y".repeat(150)),
            "longer than 256 bytes",
        ),
    ]
}

fn bad_input_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (name, says) in bad_names() {
        let input = Some(name.clone());
        let show = format!("{:?}", name.chars().take(24).collect::<String>());
        let reqs = [
            (
                "get",
                Req::Get(pb::GetRequest {
                    name: name.clone(),
                    version: 0,
                }),
            ),
            ("put", Req::Put(put_req(&name, b"v"))),
            (
                "history",
                Req::History(pb::HistoryRequest { name: name.clone() }),
            ),
            ("delete", Req::Delete(versions_req(&name, &[]))),
            ("undelete", Req::Undelete(versions_req(&name, &[1]))),
            ("destroy", Req::Destroy(versions_req(&name, &[1]))),
            (
                "watch",
                Req::Watch(pb::WatchRequest {
                    names: vec![name.clone()],
                }),
            ),
        ];
        for (op, req) in reqs {
            // A watch filter ending in '/' is a prefix: "a/" is valid there.
            if op == "watch" && name == "a/" {
                continue;
            }
            cases.push(Case {
                what: format!("{op} {show}"),
                req,
                code: Code::InvalidArgument,
                says,
                input: input.clone(),
            });
        }
    }
    let mut more = vec![
        Case {
            what: "ls prefix ../".into(),
            req: Req::List(pb::ListRequest {
                prefix: "../".into(),
                ..Default::default()
            }),
            code: Code::InvalidArgument,
            says: "invalid prefix",
            input: None,
        },
        Case {
            what: "ls prefix a//".into(),
            req: Req::List(pb::ListRequest {
                prefix: "a//".into(),
                ..Default::default()
            }),
            code: Code::InvalidArgument,
            says: "invalid prefix",
            input: None,
        },
        Case {
            what: "ls bad page token".into(),
            req: Req::List(pb::ListRequest {
                prefix: "app/".into(),
                page_token: "../../etc".into(),
                page_size: 10,
            }),
            code: Code::InvalidArgument,
            says: "invalid page_token",
            input: Some("../../etc".into()),
        },
        Case {
            what: "watch prefix /".into(),
            req: Req::Watch(pb::WatchRequest {
                names: vec!["/".into()],
            }),
            code: Code::InvalidArgument,
            says: "invalid name",
            input: None,
        },
        Case {
            what: "watch 257 names".into(),
            req: Req::Watch(pb::WatchRequest {
                names: (0..257).map(|i| format!("app/n{i}")).collect(),
            }),
            code: Code::InvalidArgument,
            says: "at most 256",
            input: None,
        },
        Case {
            what: "value 1 MiB + 1 (new name)".into(),
            req: Req::Put(put_req("app/big", &vec![b'v'; (1 << 20) + 1])),
            code: Code::InvalidArgument,
            says: "1048577 bytes, more than the maximum of 1048576",
            input: None,
        },
        Case {
            what: "value 1 MiB + 1 (existing name)".into(),
            req: Req::Put(put_req("app/x", &vec![b'v'; (1 << 20) + 1])),
            code: Code::InvalidArgument,
            says: "more than the maximum of 1048576",
            input: None,
        },
        Case {
            what: "get version 999".into(),
            req: Req::Get(pb::GetRequest {
                name: "app/x".into(),
                version: 999,
            }),
            code: Code::NotFound,
            says: "version 999 not found",
            input: None,
        },
        Case {
            what: "get missing name".into(),
            req: Req::Get(pb::GetRequest {
                name: "app/missing".into(),
                version: 0,
            }),
            code: Code::NotFound,
            says: "not found",
            input: None,
        },
        Case {
            what: "history missing name".into(),
            req: Req::History(pb::HistoryRequest {
                name: "app/missing".into(),
            }),
            code: Code::NotFound,
            says: "not found",
            input: None,
        },
        Case {
            what: "cas 1 when current is 2".into(),
            req: Req::Put(pb::PutRequest {
                cas: Some(1),
                ..put_req("app/x", b"cas")
            }),
            code: Code::FailedPrecondition,
            says: "expected current version 1, found 2",
            input: None,
        },
        Case {
            what: "cas 0 (must not exist) on an existing name".into(),
            req: Req::Put(pb::PutRequest {
                cas: Some(0),
                ..put_req("app/x", b"cas")
            }),
            code: Code::FailedPrecondition,
            says: "expected current version 0, found 2",
            input: None,
        },
        Case {
            what: "cas 5 on a missing name".into(),
            req: Req::Put(pb::PutRequest {
                cas: Some(5),
                ..put_req("app/new", b"cas")
            }),
            code: Code::FailedPrecondition,
            says: "expected current version 5, found 0",
            input: None,
        },
        Case {
            what: "max_versions 0".into(),
            req: Req::Put(pb::PutRequest {
                max_versions: Some(0),
                ..put_req("app/x", b"m")
            }),
            code: Code::InvalidArgument,
            says: "max_versions must be at least 1",
            input: None,
        },
        Case {
            what: "empty label key".into(),
            req: Req::Put(pb::PutRequest {
                labels: [(String::new(), "v".to_owned())].into_iter().collect(),
                set_labels: true,
                ..put_req("app/x", b"l")
            }),
            code: Code::InvalidArgument,
            says: "label keys must be 1..=128 bytes",
            input: None,
        },
        Case {
            what: "label value 1025 bytes".into(),
            req: Req::Put(pb::PutRequest {
                labels: [("k".to_owned(), "w".repeat(1025))].into_iter().collect(),
                set_labels: true,
                ..put_req("app/x", b"l")
            }),
            code: Code::InvalidArgument,
            says: "at most 1024 bytes",
            input: Some("w".repeat(1025)),
        },
        Case {
            what: "65 labels".into(),
            req: Req::Put(pb::PutRequest {
                labels: (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
                set_labels: true,
                ..put_req("app/x", b"l")
            }),
            code: Code::InvalidArgument,
            says: "at most 64 labels",
            input: None,
        },
        Case {
            what: "undelete with no versions".into(),
            req: Req::Undelete(versions_req("app/x", &[])),
            code: Code::InvalidArgument,
            says: "name the versions to undelete",
            input: None,
        },
        Case {
            what: "destroy with no versions".into(),
            req: Req::Destroy(versions_req("app/x", &[])),
            code: Code::InvalidArgument,
            says: "name the versions to destroy",
            input: None,
        },
        Case {
            what: "delete version 0".into(),
            req: Req::Delete(versions_req("app/x", &[0])),
            code: Code::InvalidArgument,
            says: "versions start at 1",
            input: None,
        },
        Case {
            what: "delete version 999".into(),
            req: Req::Delete(versions_req("app/x", &[999])),
            code: Code::NotFound,
            says: "version 999 not found",
            input: None,
        },
        // One bad version in a batch: nothing at all is changed.
        Case {
            what: "delete [2, 999]".into(),
            req: Req::Delete(versions_req("app/x", &[2, 999])),
            code: Code::NotFound,
            says: "version 999 not found",
            input: None,
        },
        Case {
            what: "destroy [1, 999]".into(),
            req: Req::Destroy(versions_req("app/x", &[1, 999])),
            code: Code::NotFound,
            says: "version 999 not found",
            input: None,
        },
        Case {
            what: "delete on a missing name".into(),
            req: Req::Delete(versions_req("app/missing", &[])),
            code: Code::NotFound,
            says: "not found",
            input: None,
        },
    ];
    cases.append(&mut more);
    cases
}

/// Table-driven bad requests through the tonic client: the right code, a
/// message stating the rule without echoing the input, the daemon still
/// answering and the store unchanged after each.
fn bad_requests_are_refused_cleanly(b: Backend) {
    let d = TestDaemon::start(b, ROOT_POLICY);
    d.put("app/x", b"one");
    d.put("app/x", b"two");
    let rt = runtime();
    let mut c = rt.block_on(Client::connect(&d.socket)).unwrap();

    // Boundary: exactly the maximum is accepted and reads back intact.
    let max = vec![0xa5u8; 1 << 20];
    rt.block_on(c.secrets.put(put_req("app/max", &max)))
        .unwrap();
    let got = rt
        .block_on(c.secrets.get(pb::GetRequest {
            name: "app/max".into(),
            version: 0,
        }))
        .unwrap()
        .into_inner();
    assert!(got.value == max, "1 MiB value read back");

    let snapshot = |c: &mut Client| {
        rt.block_on(async {
            let list = c
                .secrets
                .list(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner();
            let hist = c
                .secrets
                .history(pb::HistoryRequest {
                    name: "app/x".into(),
                })
                .await
                .unwrap()
                .into_inner();
            (list, hist)
        })
    };
    let before = snapshot(&mut c);
    let cli_before = cli_snapshot(&d, "app/x");
    assert_eq!(before.0.secrets.len(), 2);
    assert_eq!(before.1.versions.len(), 2);

    let cases = bad_input_cases();
    assert!(cases.len() > 100);
    for case in cases {
        let what = case.what.clone();
        let st = rt
            .block_on(send(&mut c, case.req))
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(st.code(), case.code, "{what}: {st:?}");
        assert!(
            st.message().contains(case.says),
            "{what}: message {:?} does not say {:?}",
            st.message(),
            case.says
        );
        if let Some(input) = case.input.filter(|i| i.len() >= 4) {
            assert!(
                !st.message().contains(&input),
                "{what}: input echoed in {:?}",
                st.message()
            );
            // Not even a long stretch of it.
            let chars: Vec<char> = input.chars().collect();
            if chars.len() >= 16 {
                for w in chars.windows(16) {
                    let piece: String = w.iter().collect();
                    assert!(
                        !st.message().contains(&piece),
                        "{what}: input echoed in {:?}",
                        st.message()
                    );
                }
            }
        }
        rt.block_on(c.system.status(pb::StatusRequest {}))
            .unwrap_or_else(|e| panic!("daemon does not answer after {what}: {e:?}"));
        assert_eq!(snapshot(&mut c), before, "{what}: the store changed");
    }
    assert_eq!(cli_snapshot(&d, "app/x"), cli_before);
    assert_eq!(d.get("app/x"), b"two");
    let out = run_cli(&d, &["secret", "get", "app/x", "--version", "1"], b"");
    assert_eq!(out.stdout, b"one");
    assert_daemon_answers(&d, "the bad requests");
    assert_no_panic_in_log(&d);
}

/// Hand-made bytes on the wire through Python's generic calls.
fn malformed_protobuf_is_refused(b: Backend) {
    let py = Py::new();
    let d = TestDaemon::start(b, ROOT_POLICY);
    d.put("app/x", b"one");
    d.put("app/x", b"two");
    let before = cli_snapshot(&d, "app/x");

    // PutRequest{name="app/x", value="zz"} is 0a 05 "app/x" 12 02 "zz".
    let name_x = hex::encode(b"\x0a\x05app/x");
    let put = "/keyseal.v1.Secrets/Put";
    let decode_err = &["INVALID_ARGUMENT", "INTERNAL"][..];
    let cases: Vec<(&str, &str, String, &[&str])> = vec![
        ("garbage ff ff ff", put, "ffffff".into(), decode_err),
        (
            "truncated value (says 5, has 2)",
            put,
            format!("{name_x}12057a7a"),
            decode_err,
        ),
        ("truncated name", put, "0a05617070".into(), decode_err),
        ("name not UTF-8", put, "0a02fffe12027a7a".into(), decode_err),
        ("name with wrong wire type", put, "0801".into(), decode_err),
        (
            "value length 2^32",
            put,
            format!("{name_x}12ffffffff0f"),
            decode_err,
        ),
        (
            "varint over 10 bytes",
            put,
            "18ffffffffffffffffffff01".into(),
            decode_err,
        ),
        ("end-group without start", put, "0c".into(), decode_err),
        (
            "garbage label map entry",
            put,
            format!("{name_x}2203ffffff"),
            decode_err,
        ),
        (
            "truncated packed versions",
            "/keyseal.v1.Secrets/Delete",
            format!("{name_x}1203ffffff"),
            decode_err,
        ),
        (
            "garbage Get",
            "/keyseal.v1.Secrets/Get",
            "ffff".into(),
            decode_err,
        ),
        (
            "garbage Status",
            "/keyseal.v1.System/Status",
            "ffff".into(),
            decode_err,
        ),
        // Well-formed but empty or only unknown fields: the name is empty.
        ("empty message", put, String::new(), &["INVALID_ARGUMENT"]),
        (
            "only an unknown field",
            put,
            "f80701".into(),
            &["INVALID_ARGUMENT"],
        ),
        (
            "no such method",
            "/keyseal.v1.Secrets/Nope",
            "0a0161".into(),
            &["UNIMPLEMENTED"],
        ),
        (
            "no such service",
            "/keyseal.v9.Secrets/Get",
            "0a0161".into(),
            &["UNIMPLEMENTED"],
        ),
    ];
    let mut client = py.batch(&d.socket);
    for (what, method, hexbytes, allowed) in cases {
        let r = Py::ask(&mut client, &["raw", method, "--hex", &hexbytes]);
        let got = if r["ok"] == true {
            "OK"
        } else {
            r["code"].as_str().unwrap_or("?")
        };
        assert!(allowed.contains(&got), "{what}: got {got}: {r}");
        assert_daemon_answers(&d, what);
        assert_eq!(
            cli_snapshot(&d, "app/x"),
            before,
            "{what}: the store changed"
        );
    }

    // A message larger than the daemon accepts (4 MiB): refused before decoding.
    let r = Py::ask(&mut client, &["raw", put, "--fill", &(5 << 20).to_string()]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        ["RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "INVALID_ARGUMENT"]
            .contains(&r["code"].as_str().unwrap()),
        "oversized message: {r}"
    );
    assert_daemon_answers(&d, "an oversized message");
    assert_eq!(cli_snapshot(&d, "app/x"), before);
    // The same Python channel still works for a good call.
    let r = Py::ask(&mut client, &["get", "app/x"]);
    assert_eq!(unhex(&r["value_hex"]), b"two", "{r}");
    drop(client);
    assert_no_panic_in_log(&d);
}

both_backends!(
    bad_requests_are_refused_cleanly,
    malformed_protobuf_is_refused
);

// ---------------------------------------------------------------------------
// 4. Secrets never in logs
// ---------------------------------------------------------------------------

/// Root may do everything except write under `ro/`.
const LOG_POLICY: &str = r#"
[[rule]]
name = "root: secrets"
capabilities = ["secret:read", "secret:write", "secret:delete", "secret:destroy"]
names = ["app/**"]
[rule.match]
uid = 0

[[rule]]
name = "root: admin"
capabilities = ["system:admin", "audit:read"]
[rule.match]
uid = 0
"#;

/// The forms a value could take in a careless log line.
fn leak_forms(m: &str) -> Vec<String> {
    let b = m.as_bytes();
    vec![
        m.to_owned(),
        hex::encode(b),
        hex::encode_upper(b),
        // Debug of a byte slice: [75, 83, 77, ...]
        format!("{:?}", &b[..8]).trim_end_matches(']').to_owned(),
        // The random tail alone (in case the prefix was mangled).
        m[m.len() - 16..].to_owned(),
    ]
}

fn assert_not_leaked(haystack: &str, m: &str, where_: &str) {
    for form in leak_forms(m) {
        assert!(
            !haystack.contains(&form),
            "secret marker {m} found (as {form:?}) in {where_}:\n{haystack}"
        );
    }
}

fn secrets_never_in_logs(b: Backend) {
    let py = Py::new();
    let d = TestDaemon::start(b, LOG_POLICY);
    let m_cli = marker("CLI");
    let m_py = marker("PY");
    let m_cas = marker("CAS");
    let m_big = marker("BIG");
    let m_denied = marker("DENIED");
    let m_raw = marker("RAW");
    let m_lbl = marker("LBL");
    let stderr_all = std::cell::RefCell::new(String::new());
    let cli = |args: &[&str], stdin: &[u8]| {
        let out = run_cli(&d, args, stdin);
        stderr_all.borrow_mut().push_str(&stderr_of(&out));
        out
    };

    let mut w_py = py.watch(&d.socket, &["app/"]);
    // The CLI watcher prints nothing when ready; it is checked at the end.
    let mut w_cli = LineChild::spawn(d.cli(&["secret", "watch", "app/", "--json"]));

    // Writes through each path.
    assert!(cli(&["secret", "put", "app/log/cli"], m_cli.as_bytes())
        .status
        .success());
    py.ok(&d.socket, &["put", "app/log/py"], m_py.as_bytes());
    w_py.wait_for("app/log/py", EVENT_LIMIT, |l| l.contains("app/log/py"));

    // Refused writes carrying a value.
    let out = cli(
        &["secret", "put", "app/log/cli", "--cas", "7"],
        m_cas.as_bytes(),
    );
    assert_eq!(out.status.code(), Some(65), "CAS conflict");
    let big = m_big.repeat((1 << 20) / m_big.len() + 1);
    let out = cli(&["secret", "put", "app/log/big"], big.as_bytes());
    assert_eq!(out.status.code(), Some(65), "too large");
    let out = cli(&["secret", "put", "ro/x"], m_denied.as_bytes());
    assert_eq!(out.status.code(), Some(77), "denied");
    let (code, r) = py.call(&d.socket, &["put", "ro/y"], m_denied.as_bytes());
    assert_eq!((code, r["code"].as_str()), (3, Some("PERMISSION_DENIED")));
    // Malformed request whose value field holds a marker.
    let raw = format!("0a02fffe12{:02x}{}", m_raw.len(), hex::encode(&m_raw));
    let (code, r) = py.call(
        &d.socket,
        &["raw", "/keyseal.v1.Secrets/Put", "--hex", &raw],
        b"",
    );
    assert_eq!(code, 3, "{r}");
    assert_not_leaked(&r.to_string(), &m_raw, "the error returned to the client");
    // Labels are metadata, not secrets, but a put that carries a value and
    // a bad label must not log the value either.
    let mut c_lbl = Command::new(KEYSEAL);
    c_lbl.arg("--socket").arg(&d.socket).args([
        "secret",
        "put",
        "app/log/lbl",
        "--label",
        "=empty-key",
    ]);
    let out = output_within(c_lbl, m_lbl.as_bytes(), CMD_LIMIT);
    assert_eq!(out.status.code(), Some(65), "{}", stderr_of(&out));
    stderr_all.borrow_mut().push_str(&stderr_of(&out));

    // Reads through each path.
    let out = cli(&["secret", "get", "app/log/cli"], b"");
    assert_eq!(out.stdout, m_cli.as_bytes());
    let r = py.ok(&d.socket, &["get", "app/log/py"], b"");
    assert_eq!(unhex(&r["value_hex"]), m_py.as_bytes());
    let out = cli(
        &[
            "run",
            "--env",
            "V1=app/log/cli",
            "--env",
            "V2=app/log/py",
            "--",
            "sh",
            "-c",
            &format!("test \"$V1\" = '{m_cli}' && test \"$V2\" = '{m_py}' && exit 9"),
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(9), "run saw both values");
    let out = cli(&["secret", "history", "app/log/cli", "--json"], b"");
    assert!(out.status.success());
    assert_not_leaked(
        &String::from_utf8_lossy(&out.stdout),
        &m_cli,
        "history output",
    );
    let out = cli(&["secret", "ls", "--json"], b"");
    assert_not_leaked(&String::from_utf8_lossy(&out.stdout), &m_cli, "ls output");
    let out = cli(&["status", "--json"], b"");
    assert!(out.status.success());
    // Rotation rewraps every DEK: still no values in the log.
    let out = cli(&["root", "rotate"], b"");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let r = py.ok(&d.socket, &["get", "app/log/cli"], b"");
    assert_eq!(unhex(&r["value_hex"]), m_cli.as_bytes());

    // A last write both watchers must see (proves the CLI watcher ran).
    assert!(cli(&["secret", "put", "app/log/last"], b"last")
        .status
        .success());
    w_py.wait_for("app/log/last", EVENT_LIMIT, |l| l.contains("app/log/last"));
    w_cli.wait_for("app/log/last", EVENT_LIMIT, |l| l.contains("app/log/last"));
    let watched = [w_py.seen.join("\n"), w_cli.seen.join("\n")].join("\n");
    drop(w_py);
    drop(w_cli);

    let log = d.log_text();
    // The log is really at debug level and saw the traffic, so its silence
    // about values means something.
    assert!(log.contains("DEBUG"), "log is not at debug level:\n{log}");
    assert!(
        log.contains("app/log/cli") && log.contains("app/log/py"),
        "log:\n{log}"
    );
    assert!(log.contains("denied"), "log:\n{log}");
    for m in [&m_cli, &m_py, &m_cas, &m_big, &m_denied, &m_raw, &m_lbl] {
        assert_not_leaked(&log, m, "the daemon log");
        assert_not_leaked(&stderr_all.borrow(), m, "the CLI's stderr");
        assert_not_leaked(&watched, m, "watch output");
    }
    assert_no_panic_in_log(&d);
}

both_backends!(secrets_never_in_logs);

// ---------------------------------------------------------------------------
// 5. Limits that cross the wire
// ---------------------------------------------------------------------------

/// Rewrites one line of the daemon's config and restarts it.
fn restart_with_config_line(d: &mut TestDaemon, line: &str, replacement: &str) {
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    assert!(cfg.contains(line), "config layout changed:\n{cfg}");
    std::fs::write(&d.config, cfg.replacen(line, replacement, 1)).unwrap();
    d.stop();
    d.spawn();
}

/// `store.max_value_bytes` accepts up to 64 MiB; a value under the
/// configured maximum must go through the API.
#[test]
fn configured_max_value_above_4_mib_is_usable_softhsm() {
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    restart_with_config_line(
        &mut d,
        "path = \"store\"\n",
        "path = \"store\"\nmax_value_bytes = 8388608\n",
    );
    let value: Vec<u8> = (0..5 << 20).map(|i: u32| (i % 251) as u8).collect();
    let out = run_cli(&d, &["secret", "put", "app/five-mib"], &value);
    assert!(
        out.status.success(),
        "5 MiB put under an 8 MiB max_value_bytes: exit {:?}: {}",
        out.status.code(),
        stderr_of(&out)
    );
    let out = run_cli(&d, &["secret", "get", "app/five-mib"], b"");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(out.stdout == value, "5 MiB value read back");
    // Above the configured maximum: the store's rule, not a transport error.
    let out = run_cli(&d, &["secret", "put", "app/nine-mib"], &vec![7u8; 9 << 20]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("more than the maximum of 8388608"));
}

/// Labels are bounded per secret (64 x 1 KiB) but a List page is not
/// bounded in bytes: enough labelled secrets must still list.
fn listing_many_labelled_secrets_fits_4mib(b: Backend) {
    let d = TestDaemon::start(b, ROOT_POLICY);
    let rt = runtime();
    let mut c = rt.block_on(Client::connect(&d.socket)).unwrap();
    let n = 60;
    for i in 0..n {
        let labels = (0..64)
            .map(|j| (format!("{j:0>128}"), "l".repeat(1024)))
            .collect();
        rt.block_on(c.secrets.put(pb::PutRequest {
            labels,
            set_labels: true,
            ..put_req(&format!("app/l{i:03}"), b"v")
        }))
        .unwrap();
    }
    let out = run_cli(&d, &["secret", "ls", "--json"], b"");
    assert!(
        out.status.success(),
        "ls of {n} labelled secrets: exit {:?}: {}",
        out.status.code(),
        stderr_of(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), n);
    assert_daemon_answers(&d, "a large listing");
}

/// Names written as root; then the policy is reloaded so that root may
/// only read `app/*/r` (and write nothing): `s` names are hidden from it.
/// Visible names come in runs between hidden ones.
const FILTER_NAMES: [&str; 11] = [
    "app/0/s", "app/1/r", "app/2/r", "app/3/r", "app/4/s", "app/5/s", "app/6/r", "app/7/s",
    "app/8/r", "app/9/r", "app/a/s",
];

fn daemon_with_hidden_names(b: Backend) -> TestDaemon {
    let d = TestDaemon::start(b, ROOT_POLICY);
    for n in FILTER_NAMES {
        d.put(n, b"v");
    }
    std::fs::write(
        &d.policy,
        r#"
[[rule]]
name = "root reads r"
capabilities = ["secret:read"]
names = ["app/*/r"]
[rule.match]
uid = 0

[[rule]]
name = "root: admin"
capabilities = ["system:admin"]
[rule.match]
uid = 0
"#,
    )
    .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log_text().contains("policy reloaded") {
        assert!(
            Instant::now() < deadline,
            "policy not reloaded:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

/// Every page of `prefix` with `page_size`: (names, next_page_token) each.
fn list_pages(d: &TestDaemon, page_size: u32) -> Vec<(Vec<String>, String)> {
    let rt = runtime();
    let mut c = rt.block_on(Client::connect(&d.socket)).unwrap();
    let mut pages = Vec::new();
    let mut token = String::new();
    for _ in 0..30 {
        let page = rt
            .block_on(c.secrets.list(pb::ListRequest {
                prefix: "app/".into(),
                page_size,
                page_token: token,
            }))
            .unwrap()
            .into_inner();
        let names = page.secrets.into_iter().map(|m| m.name).collect();
        token = page.next_page_token.clone();
        pages.push((names, page.next_page_token));
        if token.is_empty() {
            return pages;
        }
    }
    panic!("paging did not end: {pages:?}");
}

fn visible_names() -> Vec<String> {
    FILTER_NAMES
        .iter()
        .filter(|n| n.ends_with("/r"))
        .map(|n| n.to_string())
        .collect()
}

/// Paging through a filtered listing visits every visible name exactly
/// once, in order, whatever the page size.
fn list_paging_visits_every_visible_name(b: Backend) {
    let d = daemon_with_hidden_names(b);
    for size in [1, 2, 3, 100] {
        let pages = list_pages(&d, size);
        let seen: Vec<String> = pages.iter().flat_map(|(n, _)| n.clone()).collect();
        assert_eq!(seen, visible_names(), "page_size {size}: {pages:?}");
    }
}

/// A page holds at most `page_size` entries, also when the policy hides
/// some names.
fn list_page_size_holds_when_filtered(b: Backend) {
    let d = daemon_with_hidden_names(b);
    for size in [1, 2, 3] {
        for (names, _) in list_pages(&d, size) {
            assert!(
                names.len() <= size as usize,
                "page_size {size} returned {} entries: {names:?}",
                names.len()
            );
        }
    }
}

/// The page token must not name a secret the caller may not see: like the
/// identical denial messages, a listing must not reveal hidden names.
fn list_page_token_reveals_no_hidden_name(b: Backend) {
    let d = daemon_with_hidden_names(b);
    for size in [1, 2, 3] {
        for (_, token) in list_pages(&d, size) {
            assert!(
                !FILTER_NAMES
                    .iter()
                    .any(|n| n.ends_with("/s") && *n == token),
                "page_size {size}: next_page_token {token:?} is a name the caller may not read"
            );
        }
    }
}

both_backends!(list_paging_visits_every_visible_name);

#[test]
fn listing_many_labelled_secrets_fits_4mib_softhsm() {
    listing_many_labelled_secrets_fits_4mib(Backend::SoftHsm)
}

// Bugs in src/api/secrets_svc.rs `list` (see the report); ignored so the
// suite stays green until they are fixed. Run with `--run-ignored all`.
mod list_page_size_holds_when_filtered {
    #[test]
    #[ignore = "bug: Secrets.List returns more than page_size entries when the policy hides names (src/api/secrets_svc.rs list loop)"]
    fn softhsm() {
        super::list_page_size_holds_when_filtered(crate::common::Backend::SoftHsm)
    }
    #[test]
    #[ignore = "bug: Secrets.List returns more than page_size entries when the policy hides names (src/api/secrets_svc.rs list loop)"]
    fn swtpm() {
        super::list_page_size_holds_when_filtered(crate::common::Backend::Tpm)
    }
}

mod list_page_token_reveals_no_hidden_name {
    #[test]
    #[ignore = "bug: Secrets.List next_page_token is the last scanned store name, which may be hidden from the caller (src/api/secrets_svc.rs list loop)"]
    fn softhsm() {
        super::list_page_token_reveals_no_hidden_name(crate::common::Backend::SoftHsm)
    }
    #[test]
    #[ignore = "bug: Secrets.List next_page_token is the last scanned store name, which may be hidden from the caller (src/api/secrets_svc.rs list loop)"]
    fn swtpm() {
        super::list_page_token_reveals_no_hidden_name(crate::common::Backend::Tpm)
    }
}
