//! End-to-end support: the real `keyseald` binary on a temp socket, over a
//! real SoftHSM2 token or a real swtpm, driven by the real `keyseal` binary.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{Backend, Device};

pub const KEYSEALD: &str = env!("CARGO_BIN_EXE_keyseald");
pub const KEYSEAL: &str = env!("CARGO_BIN_EXE_keyseal");

/// A policy that lets root (uid 0, the test process) do everything.
pub const ROOT_POLICY: &str = r#"
[[rule]]
name = "root: secrets"
capabilities = ["secret:read", "secret:write", "secret:delete", "secret:destroy"]
names = ["**"]
[rule.match]
uid = 0

[[rule]]
name = "root: admin"
capabilities = ["system:admin", "audit:read"]
[rule.match]
uid = 0

[[rule]]
name = "root: keys and api keys"
capabilities = ["key:sign", "key:admin", "apikey:verify", "apikey:admin"]
names = ["**"]
[rule.match]
uid = 0
"#;

/// Added to `ROOT_POLICY` by the proxy tests: root administers proxies.
pub const PROXY_POLICY: &str = r#"
[[rule]]
name = "root: proxies"
capabilities = ["proxy:admin"]
names = ["**"]
[rule.match]
uid = 0
"#;

/// A running (or stopped) keyseald with its own directory.
pub struct TestDaemon {
    pub device: Device,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub policy: PathBuf,
    pub socket: PathBuf,
    pub creds_socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl TestDaemon {
    /// Writes config + policy, runs `keyseal init`, starts keyseald and
    /// waits until it answers.
    pub fn start(b: Backend, policy: &str) -> TestDaemon {
        Self::start_with(b, policy, "")
    }

    /// Like `start`, with extra TOML appended to the config (e.g. a
    /// `[cache]` section).
    pub fn start_with(b: Backend, policy: &str, extra_config: &str) -> TestDaemon {
        let device = Device::start(b);
        let dir = tempfile::Builder::new()
            .prefix("keyseal-e2e-")
            .tempdir()
            .unwrap();
        // other users (tests run clients as other uids) must reach the socket dir
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root_section = match &device {
            Device::SoftHsm(h) => {
                let pin = dir.path().join("pin");
                std::fs::write(&pin, &h.pin).unwrap();
                std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
                format!(
                    "[root]\nbackend = \"pkcs11\"\n[root.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"pin\"\n",
                    h.module.display(),
                    h.token_label
                )
            }
            Device::Tpm(t) => format!(
                "[root]\nbackend = \"tpm\"\n[root.tpm]\ntcti = \"{}\"\n",
                t.tcti()
            ),
        };
        let config = dir.path().join("keyseald.toml");
        let policy_path = dir.path().join("policy.toml");
        let socket = dir.path().join("keyseal.sock");
        let creds_socket = dir.path().join("credentials.sock");
        // `KEYSEAL_TEST_STORE_CACHE_BYTES`: `store.cache_bytes` for the
        // daemon (the soak's memory figures with another page-cache cap).
        let store_extra = std::env::var("KEYSEAL_TEST_STORE_CACHE_BYTES")
            .map(|v| format!("cache_bytes = {v}\n"))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "{root_section}\n[store]\npath = \"store\"\n{store_extra}\n[api]\nsocket = \"keyseal.sock\"\nmode = \"0660\"\ncredentials_socket = \"credentials.sock\"\n\n[policy]\npath = \"policy.toml\"\n\n[log]\nlevel = \"debug\"\n{extra_config}\n"
            ),
        )
        .unwrap();
        std::fs::write(&policy_path, policy).unwrap();
        std::fs::set_permissions(&policy_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut d = TestDaemon {
            device,
            log: dir.path().join("keyseald.log"),
            dir,
            config,
            policy: policy_path,
            socket,
            creds_socket,
            child: None,
        };
        let out = Command::new(KEYSEAL)
            .arg("init")
            .arg("--config")
            .arg(&d.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keyseal init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        d.spawn();
        d
    }

    /// Starts keyseald (again) on the same config and waits for it.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(KEYSEALD)
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait().unwrap() {
                    panic!("keyseald exited early ({st}); log:\n{}", self.log_text());
                }
            }
            if self.socket.exists() && std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
                let out = self.cli(&["status"]).output().unwrap();
                if out.status.success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "keyseald did not become ready; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A `keyseal` command aimed at this daemon's socket.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KEYSEAL);
        c.arg("--socket").arg(&self.socket).args(args);
        c
    }

    /// Runs `keyseal args...` with `stdin` and returns the output.
    pub fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut c = self.cli(args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// `keyseal secret put NAME` with the value on stdin; panics on failure.
    pub fn put(&self, name: &str, value: &[u8]) {
        let out = self.run(&["secret", "put", name], value);
        assert!(
            out.status.success(),
            "put {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `keyseal secret get NAME`; panics on failure.
    pub fn get(&self, name: &str) -> Vec<u8> {
        let out = self.cli(&["secret", "get", name]).output().unwrap();
        assert!(
            out.status.success(),
            "get {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Sends a signal to keyseald.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.pid().unwrap() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    /// SIGTERM and wait (bounded); returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "keyseald did not stop within 20 s after SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl TestDaemon {
    /// Takes the running keyseald out of the harness: the caller now owns
    /// the child (signals it, reaps it). `spawn` can start a new one later.
    pub fn take_daemon_child(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// SIGKILLs keyseald and reaps it (a crash: nothing is flushed or
    /// closed). `spawn` starts it again on the same store.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    /// `keyseal audit export --out DIR/name` of the whole log, then
    /// `keyseal audit verify` of it; panics unless both succeed. Returns
    /// the verifier's report.
    pub fn export_and_verify(&self, name: &str) -> String {
        super::audit::export_and_verify(self, name, None)
    }
}

/// A small multi-threaded runtime for gRPC clients in tests.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every event of the log with result `result` ("" for all), paging
/// through `Audit.Query`, parsed.
pub async fn audit_events(c: &mut keyseal::client::Client, result: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut after = 0u64;
    loop {
        let r = c
            .audit
            .query(keyseal::api::pb::AuditQueryRequest {
                after_seq: after,
                limit: 1000,
                result: result.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for e in &r.events {
            out.push(serde_json::from_str(e).unwrap());
        }
        if r.next_seq == 0 {
            return out;
        }
        after = r.next_seq;
    }
}
