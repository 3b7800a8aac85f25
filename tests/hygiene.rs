//! Secret hygiene: unique canary values go through every path that carries
//! a secret (secret put/get, `keyseal run`, API keys issued, rotated,
//! verified and presented wrongly, signing, a proxy target credential
//! injected into a proxied request, an upstream mTLS client key, the token
//! PIN), then everything the daemon and the CLI wrote or exposed is
//! searched for each canary in plain, base64 (standard and URL-safe, at
//! every byte alignment) and hex form: the daemon log, every CLI stdout/stderr (except the stdout that
//! legitimately carries a value), the files under the daemon's directory
//! (the sled store must hold only ciphertext), `/proc/<pid>/cmdline` and
//! `/proc/<pid>/environ`. Also: core dumps are off and the daemon is
//! non-dumpable (observed from a process without CAP_SYS_PTRACE).
//!
//! Real keyseald, real keyseal, real SoftHSM2.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use common::daemon::{TestDaemon, KEYSEALD, PROXY_POLICY, ROOT_POLICY};
use common::proxy::free_port;
use common::Backend;
use sha2::{Digest, Sha256};

/// The PIN of the SoftHSM2 token made by `keyseal::testkit_hsm::SoftHsm`.
const TEST_PIN: &str = "1234-test-pin";

/// A secret value that must appear nowhere it is not supposed to.
struct Canary {
    what: String,
    value: Vec<u8>,
}

fn canary(what: &str) -> Canary {
    let r: [u8; 12] = rand::random();
    Canary {
        what: what.to_owned(),
        value: format!("cnry{}{}", what.replace(['-', ' '], ""), hex::encode(r)).into_bytes(),
    }
}

/// The encoded forms searched for: plain, lower/upper hex, and base64
/// (standard and URL-safe) of the value at each of the 3 byte alignments
/// it can have inside a larger encoded blob (only the characters that
/// depend on the value alone).
fn forms(v: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = vec![
        ("plain", v.to_vec()),
        ("hex", hex::encode(v).into_bytes()),
        ("HEX", hex::encode_upper(v).into_bytes()),
    ];
    for shift in 0..3usize {
        let mut buf = vec![0u8; shift];
        buf.extend_from_slice(v);
        let from = (8 * shift).div_ceil(6);
        let to = 8 * (shift + v.len()) / 6;
        for (name, enc) in [
            ("base64", STANDARD.encode(&buf)),
            ("base64url", URL_SAFE_NO_PAD.encode(&buf)),
        ] {
            out.push((name, enc.as_bytes()[from..to].to_vec()));
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Every (place, canary, form) hit.
#[derive(Default)]
struct Scan {
    places: Vec<(String, Vec<u8>)>,
}

impl Scan {
    fn add(&mut self, place: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.places.push((place.into(), bytes.into()));
    }

    fn add_output(&mut self, what: &str, out: &Output, stdout_carries_value: bool) {
        if !stdout_carries_value {
            self.add(format!("stdout of {what}"), out.stdout.clone());
        }
        self.add(format!("stderr of {what}"), out.stderr.clone());
    }

    fn hits(&self, canaries: &[Canary]) -> Vec<String> {
        let mut hits = Vec::new();
        for c in canaries {
            let forms = forms(&c.value);
            for (place, bytes) in &self.places {
                for (form, f) in &forms {
                    if find(bytes, f) {
                        hits.push(format!("{} ({form}) in {place}", c.what));
                    }
                }
            }
        }
        hits
    }
}

#[test]
fn forms_find_embedded_encodings() {
    let v = b"cnrytest0123456789abcdef";
    for pre in [&b""[..], b"x", b"xy", b"xyz"] {
        let mut blob = pre.to_vec();
        blob.extend_from_slice(v);
        blob.extend_from_slice(b"tail");
        for enc in [
            STANDARD.encode(&blob),
            URL_SAFE_NO_PAD.encode(&blob),
            hex::encode(&blob),
        ] {
            assert!(
                forms(v).iter().any(|(_, f)| find(enc.as_bytes(), f)),
                "{enc}"
            );
        }
    }
}

/// Regular files under `dir`, recursively (sockets and the like skipped).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn ok(
    d: &TestDaemon,
    scan: &mut Scan,
    args: &[&str],
    stdin: &[u8],
    stdout_carries_value: bool,
) -> Output {
    let out = d.run(args, stdin);
    assert!(
        out.status.success(),
        "keyseal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    scan.add_output(
        &format!("keyseal {}", args.join(" ")),
        &out,
        stdout_carries_value,
    );
    out
}

/// A plain-HTTP upstream that answers 200 and keeps what it received.
fn upstream() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !find(&req, b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            seen2.lock().unwrap().extend_from_slice(&req);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            );
        }
    });
    (port, seen)
}

/// One HTTP/1.1 request over loopback TCP; returns the raw response.
fn http(port: u16, path: &str, bearer: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    resp
}

fn proc_file(pid: u32, name: &str) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/{name}")).unwrap()
}

/// `Max core file size` soft and hard limits from /proc/PID/limits.
fn core_limit(pid: u32) -> String {
    let limits = String::from_utf8(proc_file(pid, "limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("no core limit line")
        .to_owned();
    line.split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn canaries_appear_nowhere() {
    let (up_port, seen) = upstream();
    let gw = free_port();
    let mut d = TestDaemon::start_with(
        Backend::SoftHsm,
        &format!("{ROOT_POLICY}\n{PROXY_POLICY}"),
        &format!("[proxy]\ngateway_listen = \"127.0.0.1:{gw}\"\n"),
    );
    let pid = d.pid().unwrap();
    let mut scan = Scan::default();

    let secret = canary("secret-stdin");
    let secret_file = canary("secret-file");
    let secret_v2 = canary("secret-version2");
    let msg = canary("signed-message");
    let cred = canary("target-credential");
    let wrong = canary("presented-wrong-key");

    // Secrets: put from stdin and from a file, a second version, get.
    ok(
        &d,
        &mut scan,
        &["secret", "put", "hyg/db/password"],
        &secret.value,
        false,
    );
    let vfile = d.dir().join("value-input");
    std::fs::write(&vfile, &secret_file.value).unwrap();
    ok(
        &d,
        &mut scan,
        &[
            "secret",
            "put",
            "hyg/tls/key",
            "--from-file",
            vfile.to_str().unwrap(),
        ],
        b"",
        false,
    );
    std::fs::remove_file(&vfile).unwrap();
    ok(
        &d,
        &mut scan,
        &["secret", "put", "hyg/db/password"],
        &secret_v2.value,
        false,
    );
    let got = ok(
        &d,
        &mut scan,
        &["secret", "get", "hyg/db/password"],
        b"",
        true,
    );
    assert_eq!(got.stdout, secret_v2.value);
    let got = ok(
        &d,
        &mut scan,
        &["secret", "get", "hyg/db/password", "--version", "1"],
        b"",
        true,
    );
    assert_eq!(got.stdout, secret.value);
    let got = ok(&d, &mut scan, &["secret", "get", "hyg/tls/key"], b"", true);
    assert_eq!(got.stdout, secret_file.value);
    for args in [
        &["secret", "ls", "hyg/", "--json"][..],
        &["secret", "history", "hyg/db/password", "--json"],
        &["status", "--json"],
    ] {
        ok(&d, &mut scan, args, b"", false);
    }

    // `keyseal run`: the child sees the value; its stdout is only a hash.
    let out = ok(
        &d,
        &mut scan,
        &[
            "run",
            "--env",
            "HYG=hyg/db/password",
            "--",
            "sh",
            "-c",
            "printf %s \"$HYG\" | sha256sum",
        ],
        b"",
        false,
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with(&hex::encode(Sha256::digest(&secret_v2.value))),
        "keyseal run did not pass the value to the child"
    );

    // API keys: issue (key on stdout only), show, list, verify (key on
    // stdin), rotate (new key on stdout only), a wrong key, revoke.
    let issued = ok(
        &d,
        &mut scan,
        &["apikey", "issue", "--owner", "hyg/svc", "--json"],
        b"",
        true,
    );
    let key = String::from_utf8(issued.stdout).unwrap().trim().to_owned();
    let meta: serde_json::Value = serde_json::from_slice(&issued.stderr).unwrap();
    let key_id = meta["id"].as_str().unwrap().to_owned();
    ok(
        &d,
        &mut scan,
        &["apikey", "verify", "--json"],
        key.as_bytes(),
        false,
    );
    ok(
        &d,
        &mut scan,
        &["apikey", "show", &key_id, "--json"],
        b"",
        false,
    );
    ok(&d, &mut scan, &["apikey", "ls", "--json"], b"", false);
    let rotated = ok(
        &d,
        &mut scan,
        &["apikey", "rotate", &key_id, "--json"],
        b"",
        true,
    );
    let key2 = String::from_utf8(rotated.stdout).unwrap().trim().to_owned();
    ok(&d, &mut scan, &["apikey", "verify"], key2.as_bytes(), false);
    // A well-formed look-alike with a bad checksum, and a free-form string.
    let last = if key.ends_with('0') { "1" } else { "0" };
    let lookalike = format!("{}{last}", &key[..key.len() - 1]);
    for w in [lookalike.as_bytes(), &wrong.value[..]] {
        let out = d.run(&["apikey", "verify", "--json"], w);
        assert!(!out.status.success());
        scan.add_output("keyseal apikey verify (wrong key)", &out, false);
    }
    // Signing keys: the message is signed inside the device.
    ok(&d, &mut scan, &["key", "create", "hyg-sign"], b"", false);
    let sig = ok(
        &d,
        &mut scan,
        &["key", "sign", "hyg-sign"],
        &msg.value,
        false,
    );
    let sig_file = d.dir().join("sig-input");
    std::fs::write(&sig_file, &sig.stdout).unwrap();
    ok(
        &d,
        &mut scan,
        &[
            "key",
            "verify",
            "hyg-sign",
            "--signature",
            sig_file.to_str().unwrap(),
        ],
        &msg.value,
        false,
    );
    std::fs::remove_file(&sig_file).unwrap();
    ok(
        &d,
        &mut scan,
        &["key", "show", "hyg-sign", "--json"],
        b"",
        false,
    );

    // Proxy: a target credential sealed from stdin, injected into a
    // proxied request; a request with a wrong key.
    let url = format!("http://127.0.0.1:{up_port}");
    ok(
        &d,
        &mut scan,
        &["target", "put", "hyg", "--url", &url, "--allow-http"],
        b"",
        false,
    );
    ok(
        &d,
        &mut scan,
        &[
            "target",
            "cred",
            "put",
            "hyg-cred",
            "--target",
            "hyg",
            "--header",
            "x-api-key: {}",
        ],
        &cred.value,
        false,
    );
    ok(
        &d,
        &mut scan,
        &[
            "proxy",
            "put",
            "hyg",
            "--target",
            "hyg",
            "--credential",
            "hyg-cred",
            "--key-owner",
            "hyg/svc",
        ],
        b"",
        false,
    );
    ok(
        &d,
        &mut scan,
        &[
            "rule",
            "add",
            "hyg",
            "allow-all",
            "--allow",
            "--path",
            "/.*",
        ],
        b"",
        false,
    );
    let resp = http(gw, "/p/hyg/v1/thing?x=1", &key2);
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "proxied request failed: {}",
        String::from_utf8_lossy(&resp)
    );
    assert!(
        find(&seen.lock().unwrap(), &cred.value),
        "the upstream did not receive the injected credential"
    );
    scan.add("gateway response (allowed)", resp);
    let resp = http(
        gw,
        "/p/hyg/v1/thing",
        std::str::from_utf8(&wrong.value).unwrap(),
    );
    assert!(!resp.starts_with(b"HTTP/1.1 200"));
    scan.add("gateway response (wrong key)", resp);
    // An upstream client key (mTLS), read from a file outside the daemon's
    // directory: sealed, never listed or logged. Its canary is a line of
    // its PEM text and the raw private scalar.
    let (client_cert, client_key, client_scalar) = {
        let k = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["hyg-client".to_string()])
            .unwrap()
            .self_signed(&k)
            .unwrap();
        let der = k.serialize_der();
        // PKCS#8 of P-256 from ring: the scalar follows `04 20` after the
        // algorithm identifiers.
        let at = der.windows(2).position(|w| w == [0x04, 0x20]).unwrap() + 2;
        (cert.pem(), k.serialize_pem(), der[at..at + 32].to_vec())
    };
    let outside = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (outside.path().join("c.pem"), outside.path().join("k.pem"));
    std::fs::write(&cert_path, &client_cert).unwrap();
    std::fs::write(&key_path, &client_key).unwrap();
    ok(
        &d,
        &mut scan,
        &[
            "target",
            "put",
            "hyg-mtls",
            "--url",
            "https://127.0.0.1:9",
            "--client-cert",
            cert_path.to_str().unwrap(),
            "--client-key-file",
            key_path.to_str().unwrap(),
        ],
        b"",
        false,
    );
    let client_key_line = client_key.lines().nth(1).unwrap().as_bytes().to_vec();
    for args in [
        &["target", "cred", "ls", "--json"][..],
        &["target", "ls", "--json"],
        &["proxy", "show", "hyg", "--json"],
        &["proxy", "requests", "hyg", "--json"],
        &["proxy", "test", "hyg", "GET", "/v1/thing", "--json"],
    ] {
        ok(&d, &mut scan, args, b"", false);
    }
    ok(&d, &mut scan, &["apikey", "revoke", &key_id], b"", false);

    // What the running daemon exposes.
    assert_eq!(core_limit(pid), "0 0", "core dumps are not off");
    scan.add("/proc/PID/cmdline", proc_file(pid, "cmdline"));
    scan.add("/proc/PID/environ", proc_file(pid, "environ"));

    // Files, while running and after a clean stop (sled flushes on close).
    let dir = d.dir().to_path_buf();
    let scan_files = |scan: &mut Scan, when: &str| {
        for f in files_under(&dir) {
            if f == dir.join("pin") {
                continue; // the PIN file is the PIN's legitimate home
            }
            scan.add(
                format!("{} ({when})", f.display()),
                std::fs::read(&f).unwrap(),
            );
        }
    };
    scan_files(&mut scan, "running");
    let st = d.stop();
    assert!(st.success(), "keyseald exited with {st}");
    scan_files(&mut scan, "stopped");
    let log = d.log_text();
    assert!(log.contains("secret"), "the daemon logged nothing useful");
    scan.add("daemon log", log.into_bytes());

    let canaries = [
        Canary {
            what: "token PIN".into(),
            value: TEST_PIN.as_bytes().to_vec(),
        },
        secret,
        secret_file,
        secret_v2,
        msg,
        cred,
        wrong,
        Canary {
            what: "issued API key".into(),
            value: key.into_bytes(),
        },
        Canary {
            what: "rotated API key".into(),
            value: key2.into_bytes(),
        },
        Canary {
            what: "look-alike API key".into(),
            value: lookalike.into_bytes(),
        },
        Canary {
            what: "upstream client key (PEM line)".into(),
            value: client_key_line,
        },
        Canary {
            what: "upstream client key (scalar)".into(),
            value: client_scalar,
        },
    ];
    let hits = scan.hits(&canaries);
    assert!(
        hits.is_empty(),
        "secrets found where they must not be ({} places searched):\n{}",
        scan.places.len(),
        hits.join("\n")
    );
    // The scan would have seen them: the sled store is non-empty.
    let store_files = files_under(&d.dir().join("store"));
    assert!(!store_files.is_empty());
}

/// Starts keyseald on `d`'s config without CAP_SYS_PTRACE (so that a
/// reader with the same capabilities is subject to the dumpable check).
/// The child is returned to the caller, which kills and reaps it.
#[allow(clippy::zombie_processes)]
fn spawn_without_ptrace(d: &TestDaemon) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&d.log)
        .unwrap();
    let mut child = Command::new("setpriv")
        .args(["--bounding-set=-sys_ptrace", "--inh-caps=-all", "--"])
        .arg(KEYSEALD)
        .arg("--config")
        .arg(&d.config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if d.cli(&["status"]).output().unwrap().status.success() {
            return child;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyseald not ready:\n{}", d.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a process with uid 0 but without CAP_SYS_PTRACE can read the
/// target of /proc/PID/fd/0 (ptrace read access: refused for a
/// non-dumpable process).
fn fd_readable_without_ptrace(pid: u32) -> bool {
    Command::new("setpriv")
        .args(["--bounding-set=-sys_ptrace", "--inh-caps=-all", "--"])
        .arg("readlink")
        .arg(format!("/proc/{pid}/fd/0"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn daemon_is_not_dumpable() {
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: setpriv (util-linux) is not installed");
        return;
    }
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.stop();
    let mut child = spawn_without_ptrace(&d);
    // The control: a dumpable process with the same capabilities is
    // readable, so a refusal below is the daemon's PR_SET_DUMPABLE 0.
    let mut control = Command::new("setpriv")
        .args(["--bounding-set=-sys_ptrace", "--inh-caps=-all", "--"])
        .args(["sleep", "30"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let control_readable = fd_readable_without_ptrace(control.id());
    let daemon_readable = fd_readable_without_ptrace(child.id());
    let core = core_limit(child.id());
    let _ = control.kill();
    let _ = control.wait();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        control_readable,
        "the control process is not readable: the check proves nothing here"
    );
    assert!(!daemon_readable, "keyseald is dumpable");
    assert_eq!(core, "0 0", "core dumps are not off");
}

#[test]
fn pin_from_env_stays_out_of_proc() {
    // `pin_env`: the PIN comes from the environment keyseald was started
    // with. /proc/PID/environ shows the exec-time environment block, which
    // keyseald overwrites at start (hardening::scrub_env_var).
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.stop();
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    assert!(cfg.contains("pin_file = \"pin\""));
    std::fs::write(
        &d.config,
        cfg.replace("pin_file = \"pin\"", "pin_env = \"HYG_PIN\""),
    )
    .unwrap();
    std::fs::remove_file(d.dir().join("pin")).unwrap();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&d.log)
        .unwrap();
    let mut child = Command::new(KEYSEALD)
        .arg("--config")
        .arg(&d.config)
        .env("HYG_PIN", TEST_PIN)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.cli(&["status"]).output().unwrap().status.success() {
        assert!(
            Instant::now() < deadline,
            "keyseald not ready:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let environ = proc_file(child.id(), "environ");
    let cmdline = proc_file(child.id(), "cmdline");
    let _ = child.kill();
    let _ = child.wait();
    let mut scan = Scan::default();
    scan.add("/proc/PID/environ", environ);
    scan.add("/proc/PID/cmdline", cmdline);
    scan.add("daemon log", d.log_text().into_bytes());
    let hits = scan.hits(&[Canary {
        what: "token PIN (pin_env)".into(),
        value: TEST_PIN.as_bytes().to_vec(),
    }]);
    assert!(hits.is_empty(), "{}", hits.join("\n"));
}
