//! End-to-end smoke test: real keyseald + real keyseal CLI on both roots.

mod common;

use common::daemon::{TestDaemon, ROOT_POLICY};
use common::Backend;

fn put_get_ls_history_rm_run_rotate(b: Backend) {
    let d = TestDaemon::start(b, ROOT_POLICY);
    d.put("app/a/db", b"s3cret value");
    d.put("app/a/db", b"second");
    assert_eq!(d.get("app/a/db"), b"second");
    let out = d
        .cli(&["secret", "get", "app/a/db", "--version", "1"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"s3cret value");
    let out = d.cli(&["secret", "ls", "app/", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "app/a/db");
    assert_eq!(v[0]["current_version"], 2);
    let out = d
        .cli(&["secret", "history", "app/a/db", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["versions"].as_array().unwrap().len(), 2);
    let out = d.cli(&["secret", "rm", "app/a/db"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(d.get("app/a/db"), b"s3cret value");
    let out = d
        .cli(&[
            "run",
            "--env",
            "DBPW=app/a/db",
            "--",
            "sh",
            "-c",
            "test \"$DBPW\" = 's3cret value' && exit 7",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "exit code passed through");
    let out = d.cli(&["root", "rotate"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.get("app/a/db"), b"s3cret value");
    let out = d.cli(&["status", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["root_key_version"], 2);
    // the secret never reached the log
    assert!(
        !d.log_text().contains("s3cret"),
        "secret value in the daemon log"
    );
}

both_backends!(put_get_ls_history_rm_run_rotate);
