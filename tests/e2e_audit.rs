//! The audit log through the real daemon and CLI, on both roots: every
//! request leaves an event; an export verifies offline with our CLI and the
//! manifest with stock openssl; a tampered bundle fails naming the sequence.

mod common;

use std::process::Command;

use common::audit::export_and_verify;
use common::daemon::{TestDaemon, ROOT_POLICY};
use common::Backend;

fn export_verify_and_tamper(b: Backend) {
    let d = TestDaemon::start(b, ROOT_POLICY);
    d.put("app/a", b"value-one");
    d.get("app/a");
    // a denied request is audited too
    let out = d.cli(&["secret", "get", "app/missing"]).output().unwrap();
    assert_eq!(out.status.code(), Some(66));
    let q = d
        .cli(&["audit", "query", "--op", "secret.*", "--json"])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let text = String::from_utf8_lossy(&q.stdout).to_string();
    let ops: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        ops.iter()
            .any(|e| e["op"] == "secret.put" && e["target"] == "app/a" && e["result"] == "ok"),
        "{text}"
    );
    assert!(
        ops.iter()
            .any(|e| e["op"] == "secret.get" && e["code"] == "NOT_FOUND"),
        "{text}"
    );
    assert!(
        !text.contains("value-one"),
        "a secret value reached the audit log"
    );
    let st = d.cli(&["status", "--json"]).output().unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["audit"]["enabled"], true);
    assert!(st["audit"]["tree_size"].as_u64().unwrap() >= 4, "{st}");
    assert_eq!(st["audit"]["failures"], 0);
    export_and_verify(&d, "export1", None);
    let dir = d.dir().join("export1");
    let o = Command::new("openssl")
        .current_dir(&dir)
        .args([
            "dgst",
            "-sha256",
            "-verify",
            "audit-key.pem",
            "-signature",
            "manifest.sig",
            "manifest.json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Verified OK"));
    // flip one byte inside the second event: verification names seq 2
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let mut lines: Vec<String> = events.lines().map(str::to_owned).collect();
    assert!(lines.len() >= 3, "{events}");
    lines[1] = lines[1].replacen("\"op\":\"", "\"op\":\"x", 1);
    std::fs::write(dir.join("events.jsonl"), lines.join("\n") + "\n").unwrap();
    let v = d
        .cli(&["audit", "verify", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(65));
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(err.contains("FAILED"), "{err}");
    // a second export proven consistent with the first one's checkpoint
    d.put("app/b", b"x");
    let cp = std::fs::read_dir(d.dir().join("export1"))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("checkpoint"))
        .map(|e| e.path())
        .expect("a checkpoint file in the bundle");
    let report = export_and_verify(&d, "export2", Some(&cp));
    assert!(report.contains("consistent"), "{report}");
}

fn audit_read_is_required(b: Backend) {
    let policy = r#"
[[rule]]
name = "reader"
capabilities = ["secret:read"]
names = ["**"]
[rule.match]
uid = 0
[[rule]]
name = "status"
capabilities = ["system:admin"]
[rule.match]
uid = 0
"#;
    let d = TestDaemon::start(b, policy);
    let out = d.cli(&["audit", "tail"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn events(d: &TestDaemon, op: &str) -> Vec<serde_json::Value> {
    let q = d
        .cli(&["audit", "query", "--op", op, "--json"])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A completed root rotation leaves `root.rotate.completed` with the
/// versions, whether asked for over the API or resumed by keyseald at start
/// after an interruption.
fn root_rotation_is_audited(b: Backend) {
    let mut d = TestDaemon::start(b, ROOT_POLICY);
    d.put("app/r1", b"one");
    d.put("app/r2", b"two");
    let out = d.cli(&["root", "rotate"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = events(&d, "root.rotate.completed");
    assert_eq!(done.len(), 1, "{done:?}");
    let det = &done[0]["detail"];
    assert_eq!(done[0]["result"], "ok");
    assert_eq!(done[0]["actor"]["kind"], "daemon");
    assert_eq!(det["from_version"], "1", "{det}");
    assert_eq!(det["to_version"], "2", "{det}");
    // the two secrets and the sealed singletons (audit HMAC key, ...)
    let rewrapped: u64 = det["rewrapped"].as_str().unwrap().parse().unwrap();
    assert!(rewrapped >= 2, "{det}");
    assert_eq!(det["resumed"], "false", "{det}");

    // Interrupt a rotation (v2 -> v3) through the library on the stopped
    // daemon's store; keyseald resumes and completes it at start.
    d.stop();
    {
        let root = d.device.open_root();
        let store = keyseal::store::Store::open(&d.dir().join("store")).unwrap();
        let s = keyseal::secrets::SecretStore::open(store, root, Default::default()).unwrap();
        let out = s
            .rotate_root(&mut |_| std::ops::ControlFlow::Break(()))
            .unwrap();
        assert!(
            matches!(
                out,
                keyseal::secrets::RotationOutcome::Interrupted { to: 3, .. }
            ),
            "{out:?}"
        );
        assert_eq!(s.pending_rotation().unwrap(), Some(3));
    }
    d.spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let done = loop {
        let done = events(&d, "root.rotate.completed");
        if done.len() == 2 || std::time::Instant::now() > deadline {
            break done;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(done.len(), 2, "{done:?}\n{}", d.log_text());
    let det = &done[1]["detail"];
    assert_eq!(det["from_version"], "2", "{det}");
    assert_eq!(det["to_version"], "3", "{det}");
    assert_eq!(det["resumed"], "true", "{det}");
    assert_eq!(d.get("app/r1"), b"one");
}

both_backends!(
    export_verify_and_tamper,
    audit_read_is_required,
    root_rotation_is_audited
);
