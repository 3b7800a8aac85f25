//! API keys end to end: the real keyseald, driven by the real keyseal CLI
//! (and a plain tonic client for the wire-level checks), on both roots.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::daemon::{TestDaemon, KEYSEAL};
use common::Backend;
use keyseal::api::pb::{self, api_keys_client::ApiKeysClient};
use prost::Message;

const POLICY: &str = r#"
[[rule]]
name = "root: api keys"
capabilities = ["apikey:admin", "apikey:verify"]
names = ["**"]
[rule.match]
uid = 0

[[rule]]
name = "root: admin"
capabilities = ["system:admin", "audit:read"]
[rule.match]
uid = 0

[[rule]]
name = "team-a admins"
capabilities = ["apikey:admin"]
names = ["team-a/**"]
[rule.match]
uid = 4243

[[rule]]
name = "service b verifies team-b keys"
capabilities = ["apikey:verify"]
names = ["team-b/**"]
[rule.match]
uid = 4244
"#;

const CONFIG: &str = r#"
[apikeys]
rotation_overlap = "24h"

[rate_plans.tiny]
per_minute = 2

[rate_plans.free]
per_minute = 10
per_day = 1000
burst = 20
"#;

fn start(b: Backend, extra: &str) -> TestDaemon {
    TestDaemon::start_with(b, POLICY, &format!("{CONFIG}\n{extra}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `keyseal apikey issue ARGS`: returns (key, stderr).
fn issue(d: &TestDaemon, args: &[&str]) -> (String, String) {
    let mut a = vec!["apikey", "issue"];
    a.extend_from_slice(args);
    let out = d.run(&a, b"");
    ok(&out, "issue");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is the key alone: {stdout:?}");
    (lines[0].to_owned(), text(&out.stderr))
}

fn verify(d: &TestDaemon, key: &str, extra: &[&str]) -> Output {
    let mut a = vec!["apikey", "verify", "--json"];
    a.extend_from_slice(extra);
    d.run(&a, format!("{key}\n").as_bytes())
}

fn verify_json(d: &TestDaemon, key: &str, extra: &[&str]) -> serde_json::Value {
    let out = verify(d, key, extra);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", text(&out.stdout), text(&out.stderr)))
}

fn key_id(d: &TestDaemon, key: &str) -> String {
    let v = verify_json(d, key, &["--dry-run"]);
    assert_eq!(v["valid"], true, "{v}");
    v["key_id"].as_str().unwrap().to_owned()
}

/// The secret part of a key: everything between `ks_<env>_` and the last 4.
fn secret_part(key: &str) -> &str {
    let body = key.len() - 39;
    &key[body..key.len() - 4]
}

fn as_uid(d: &TestDaemon, uid: u32, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg("--regid=0")
        .arg("--clear-groups")
        .arg(KEYSEAL)
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Issue, verify, ls (last 4 only), show, rotate with overlap, revoke,
/// revoke-by-owner, expiry, CIDRs, rate plan, restart and root rotation,
/// all through the CLI.
fn apikey_lifecycle(b: Backend) {
    let mut d = start(b, "");
    let (k1, meta) = issue(
        &d,
        &[
            "--owner",
            "team-a/acme",
            "--scope",
            "read",
            "--scope",
            "write",
            "--label",
            "tier=gold",
        ],
    );
    assert!(k1.starts_with("ks_live_") && k1.len() == 8 + 39, "{k1}");
    assert!(
        meta.contains("team-a/acme") && meta.contains("once"),
        "{meta}"
    );
    assert!(!meta.contains(secret_part(&k1)), "metadata shows the key");

    let v = verify_json(&d, &k1, &["--scope", "read"]);
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["owner"], "team-a/acme");
    assert_eq!(v["env"], "live");
    assert_eq!(v["scopes"], serde_json::json!(["read", "write"]));
    let id1 = v["key_id"].as_str().unwrap().to_owned();
    // human output and exit codes
    let out = d.run(&["apikey", "verify"], k1.as_bytes());
    ok(&out, "verify");
    assert!(text(&out.stdout).starts_with("valid: "));
    let out = d.run(&["apikey", "verify", "--scope", "admin"], k1.as_bytes());
    assert_eq!(out.status.code(), Some(1), "missing scope fails");
    assert!(text(&out.stdout).contains("missing scopes: admin"));
    // a typo
    let mut typo = k1.clone().into_bytes();
    typo[20] = if typo[20] == b'Q' { b'R' } else { b'Q' };
    let out = d.run(&["apikey", "verify"], &typo);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout).trim(), "invalid");

    // ls and show: last 4 only
    let (k_other, _) = issue(&d, &["--owner", "team-b/zeta", "--env", "test"]);
    for args in [
        vec!["apikey", "ls"],
        vec!["apikey", "ls", "--json"],
        vec!["apikey", "ls", "--all", "--json"],
        vec!["apikey", "show", &id1],
        vec!["apikey", "show", &id1, "--json"],
    ] {
        let out = d.cli(&args).output().unwrap();
        ok(&out, &args.join(" "));
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        for k in [&k1, &k_other] {
            assert!(
                !all.contains(secret_part(k)),
                "{args:?} printed a key: {all}"
            );
            assert!(!all.contains(&k[..k.len() - 4]), "{args:?}: {all}");
        }
    }
    let out = d.cli(&["apikey", "ls", "--json"]).output().unwrap();
    let ls: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    let out = d
        .cli(&["apikey", "ls", "--owner", "team-a/acme", "--json"])
        .output()
        .unwrap();
    let ls: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["id"], id1.as_str());
    assert_eq!(ls[0]["last4"], &k1[k1.len() - 4..]);
    assert_eq!(ls[0]["key"], format!("ks_live_…{}", &k1[k1.len() - 4..]));
    assert_eq!(ls[0]["labels"]["tier"], "gold");
    let out = d.cli(&["apikey", "ls"]).output().unwrap();
    assert!(text(&out.stdout).contains(&format!("ks_live_…{}", &k1[k1.len() - 4..])));
    // nothing is due yet
    let out = d
        .cli(&["apikey", "ls", "--due", "--json"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "[]");

    // rotate with a 48h overlap: both keys valid
    let out = d.run(&["apikey", "rotate", &id1, "--overlap", "48h"], b"");
    ok(&out, "rotate");
    let k2 = text(&out.stdout).trim().to_owned();
    assert!(k2.starts_with("ks_live_") && k2 != k1);
    assert!(text(&out.stderr).contains("stays valid until"));
    assert_eq!(verify_json(&d, &k1, &[])["valid"], true);
    let v2 = verify_json(&d, &k2, &[]);
    assert_eq!(v2["valid"], true);
    assert_eq!(v2["scopes"], serde_json::json!(["read", "write"]));
    let id2 = v2["key_id"].as_str().unwrap().to_owned();
    let out = d.cli(&["apikey", "show", &id1, "--json"]).output().unwrap();
    let m1: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m1["successor_id"], id2.as_str());
    let overlap_end = m1["expires_at"].as_u64().unwrap();
    let now = keyseal::apikeys::now().as_secs();
    assert!(
        overlap_end >= now + 48 * 3600 - 60 && overlap_end <= now + 48 * 3600,
        "{overlap_end} vs {now}"
    );
    // rotating the predecessor again is refused
    let out = d.run(&["apikey", "rotate", &id1], b"");
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));

    // revoke: the next verify fails
    let out = d.run(&["apikey", "revoke", &id1], b"");
    ok(&out, "revoke");
    assert_eq!(verify_json(&d, &k1, &[])["valid"], false);
    assert_eq!(verify_json(&d, &k2, &[])["valid"], true);
    let out = d.run(&["apikey", "revoke", "ak_000000000000000000000000"], b"");
    assert_eq!(out.status.code(), Some(66), "unknown id: NOT_FOUND");

    // expiry (real clock, 2 s)
    let (k3, _) = issue(&d, &["--owner", "team-a/acme", "--expires-in", "2s"]);
    assert_eq!(verify_json(&d, &k3, &[])["valid"], true);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(verify_json(&d, &k3, &[])["valid"], false);

    // CIDRs
    let (k4, _) = issue(
        &d,
        &[
            "--owner",
            "team-a/acme",
            "--cidr",
            "10.0.0.0/8",
            "--cidr",
            "2001:db8::/32",
        ],
    );
    assert_eq!(
        verify_json(&d, &k4, &["--source-ip", "10.2.3.4"])["valid"],
        true
    );
    assert_eq!(
        verify_json(&d, &k4, &["--source-ip", "2001:db8::9"])["valid"],
        true
    );
    assert_eq!(
        verify_json(&d, &k4, &["--source-ip", "192.168.0.1"])["valid"],
        false
    );
    assert_eq!(verify_json(&d, &k4, &[])["valid"], false);
    let out = d.run(
        &[
            "apikey",
            "issue",
            "--owner",
            "team-a/acme",
            "--cidr",
            "10.1.0.0/8",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(65));
    assert!(text(&out.stderr).contains("did you mean 10.0.0.0/8"));

    // rate plan: tiny = 2 per minute
    let (k5, _) = issue(&d, &["--owner", "team-a/acme", "--plan", "tiny"]);
    for remaining in [1, 0] {
        let v = verify_json(&d, &k5, &[]);
        assert_eq!(v["rate"]["allowed"], true, "{v}");
        assert_eq!(v["rate"]["limit"], 2);
        assert_eq!(v["rate"]["remaining"], remaining);
    }
    let out = verify(&d, &k5, &[]);
    assert_eq!(out.status.code(), Some(1), "rate limited");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["rate"]["allowed"], false);
    assert_eq!(v["rate"]["window"], "minute");
    let retry = v["rate"]["retry_after_secs"].as_u64().unwrap();
    assert!((1..=30).contains(&retry), "{v}");
    let out = d.run(&["apikey", "issue", "--owner", "o", "--plan", "gold"], b"");
    assert_eq!(out.status.code(), Some(65));
    assert!(
        text(&out.stderr).contains("free, tiny"),
        "{}",
        text(&out.stderr)
    );

    // the pepper survives a restart and a root rotation
    d.stop();
    d.spawn();
    assert_eq!(verify_json(&d, &k2, &[])["valid"], true);
    ok(&d.cli(&["root", "rotate"]).output().unwrap(), "root rotate");
    assert_eq!(verify_json(&d, &k2, &[])["valid"], true);
    assert_eq!(verify_json(&d, &k1, &[])["valid"], false);

    // revoke every key of the owner in one step
    let out = d.run(&["apikey", "revoke", "--owner", "team-a/acme"], b"");
    ok(&out, "revoke --owner");
    assert!(
        text(&out.stderr).contains("revoked 4 keys of team-a/acme"),
        "{}",
        text(&out.stderr)
    );
    for k in [&k2, &k4, &k5] {
        assert_eq!(verify_json(&d, k, &[])["valid"], false);
    }
    assert_eq!(verify_json(&d, &k_other, &[])["valid"], true);
    let out = d
        .cli(&["apikey", "ls", "--owner", "team-a/acme", "--json"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "[]");

    // no key ever reached the daemon's log
    let log = d.log_text();
    for k in [&k1, &k2, &k3, &k4, &k5, &k_other] {
        assert!(!log.contains(secret_part(k)), "a key is in the daemon log");
    }
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("api key verify refused"))
        .collect();
    for reason in ["revoked", "expired", "wrong_source", "bad_checksum"] {
        assert!(
            refused.iter().any(|l| l.contains(reason)),
            "the operator sees the reason {reason}: {refused:#?}"
        );
    }
}

both_backends!(apikey_lifecycle);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn grpc(socket: &Path) -> ApiKeysClient<tonic::transport::Channel> {
    ApiKeysClient::new(keyseal::client::connect(socket).await.unwrap())
}

fn vreq(key: &str, source: &str) -> pb::VerifyApiKeyRequest {
    pb::VerifyApiKeyRequest {
        key: key.into(),
        source_ip: source.into(),
        ..Default::default()
    }
}

/// Invalid keys get byte-identical answers whatever the reason; repeated
/// failures throttle the caller (RESOURCE_EXHAUSTED with retry-after).
#[test]
fn grpc_verify_is_uniform_and_guarded() {
    // 5 failures per minute (one per 12 s) before a caller is throttled
    let d = TestDaemon::start_with(
        Backend::SoftHsm,
        POLICY,
        &CONFIG.replace(
            "rotation_overlap = \"24h\"",
            "rotation_overlap = \"24h\"\nfailed_verifies_per_minute = 5",
        ),
    );
    let keys = rt().block_on(async {
        let mut c = grpc(&d.socket).await;
        let good = c
            .issue(pb::IssueApiKeyRequest {
                owner: "team-b/one".into(),
                allowed_cidrs: vec!["10.0.0.0/8".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let revoked = c
            .issue(pb::IssueApiKeyRequest {
                owner: "team-b/one".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        c.revoke(pb::RevokeApiKeyRequest {
            id: revoked.meta.unwrap().id,
        })
        .await
        .unwrap();
        let ok = c
            .verify(vreq(&good.key, "10.0.0.1"))
            .await
            .unwrap()
            .into_inner();
        assert!(ok.valid);
        let mut typo = good.key.clone().into_bytes();
        typo[30] = if typo[30] == b'z' { b'y' } else { b'z' };
        let unknown = keyseal::apikeys::ApiKeyToken::generate("ks", "live").unwrap();
        let answers = [
            c.verify(vreq(unknown.expose(), ""))
                .await
                .unwrap()
                .into_inner(),
            c.verify(vreq(&String::from_utf8(typo).unwrap(), ""))
                .await
                .unwrap()
                .into_inner(),
            c.verify(vreq(&revoked.key, "")).await.unwrap().into_inner(),
            c.verify(vreq(&good.key, "192.0.2.1"))
                .await
                .unwrap()
                .into_inner(),
            c.verify(vreq("not a key at all", ""))
                .await
                .unwrap()
                .into_inner(),
        ];
        let empty = pb::VerifyApiKeyResponse::default().encode_to_vec();
        for a in &answers {
            assert_eq!(a.encode_to_vec(), empty, "{a:?}");
        }
        // 4 failures without a source so far: one more, then throttled
        let _ = c.verify(vreq("ks_live_x", "")).await.unwrap();
        let e = c.verify(vreq(&good.key, "")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        let retry: u64 = e
            .metadata()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=12).contains(&retry), "{retry}");
        // the same caller for another customer address is not throttled
        assert!(
            c.verify(vreq(&good.key, "10.9.9.9"))
                .await
                .unwrap()
                .into_inner()
                .valid
        );
        // bad input from the calling service is an error, not a failure
        let e = c.verify(vreq(&good.key, "not-an-ip")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        [good.key, revoked.key]
    });
    let log = d.log_text();
    for k in &keys {
        assert!(!log.contains(secret_part(k)), "a key is in the daemon log");
    }
    for reason in [
        "unknown",
        "bad_checksum",
        "revoked",
        "wrong_source",
        "malformed",
    ] {
        assert!(log.contains(reason), "the log names the reason {reason}");
    }
}

/// Policy scoping: admins by owner glob, verifiers by owner glob, and
/// callers without `apikey:verify` anywhere are refused before any lookup.
#[test]
fn policy_scopes_admins_and_verifiers() {
    let d = start(Backend::SoftHsm, "");
    let (ka, _) = issue(&d, &["--owner", "team-a/x"]);
    let (kb, _) = issue(&d, &["--owner", "team-b/y"]);
    let id_b = key_id(&d, &kb);
    // uid 4243 administers team-a/** only
    let out = as_uid(&d, 4243, &["apikey", "issue", "--owner", "team-a/new"], b"");
    ok(&out, "scoped issue");
    let out = as_uid(&d, 4243, &["apikey", "issue", "--owner", "team-b/new"], b"");
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("apikey:admin"));
    let out = as_uid(&d, 4243, &["apikey", "show", &id_b], b"");
    assert_eq!(
        out.status.code(),
        Some(66),
        "another owner's key: not found"
    );
    let out = as_uid(&d, 4243, &["apikey", "revoke", &id_b], b"");
    assert_eq!(out.status.code(), Some(66));
    assert_eq!(verify_json(&d, &kb, &[])["valid"], true, "not revoked");
    let out = as_uid(&d, 4243, &["apikey", "ls", "--json"], b"");
    let ls: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let owners: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["owner"].as_str().unwrap())
        .collect();
    assert_eq!(owners.len(), 2, "{owners:?}");
    assert!(owners.iter().all(|o| o.starts_with("team-a/")));
    let out = as_uid(&d, 4243, &["apikey", "revoke", "--owner", "team-b/y"], b"");
    assert_eq!(out.status.code(), Some(77));
    // uid 4243 has no apikey:verify at all: refused before any lookup
    let out = as_uid(&d, 4243, &["apikey", "verify"], ka.as_bytes());
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    // uid 4244 holds no apikey:admin at all: refused before any lookup
    for args in [
        vec!["apikey", "ls"],
        vec!["apikey", "show", id_b.as_str()],
        vec!["apikey", "revoke", id_b.as_str()],
        vec!["apikey", "rotate", id_b.as_str()],
    ] {
        let out = as_uid(&d, 4244, &args, b"");
        assert_eq!(
            out.status.code(),
            Some(77),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // uid 4244 verifies team-b keys only; team-a keys look invalid to it
    let out = as_uid(&d, 4244, &["apikey", "verify", "--json"], kb.as_bytes());
    ok(&out, "verify team-b as 4244");
    let out = as_uid(&d, 4244, &["apikey", "verify", "--json"], ka.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
}

/// `keyseal scan`: live keys fail the scan, revoked keys are reported but
/// pass, look-alikes with a bad checksum are ignored, `.git` is skipped,
/// and an unreachable daemon makes every key "unknown" (fail).
#[test]
fn scan_finds_planted_keys() {
    let d = start(Backend::SoftHsm, "");
    let (live, _) = issue(&d, &["--owner", "team-a/scan"]);
    let (dead, _) = issue(&d, &["--owner", "team-a/scan"]);
    let dead_id = key_id(&d, &dead);
    ok(&d.run(&["apikey", "revoke", &dead_id], b""), "revoke");
    let mut lookalike = live.clone().into_bytes();
    let n = lookalike.len();
    lookalike[n - 10] = if lookalike[n - 10] == b'a' {
        b'b'
    } else {
        b'a'
    };
    let lookalike = String::from_utf8(lookalike).unwrap();

    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    std::fs::create_dir_all(r.join("src/deep")).unwrap();
    std::fs::create_dir_all(r.join(".git")).unwrap();
    std::fs::write(r.join("README.md"), "nothing here\nks_live_short\n").unwrap();
    std::fs::write(
        r.join("src/deep/config.env"),
        format!("# settings\nDEBUG=1\nAPI_KEY={live}\n"),
    )
    .unwrap();
    std::fs::write(r.join("src/old.txt"), format!("old key: \"{dead}\"\n")).unwrap();
    std::fs::write(
        r.join("src/fixtures.json"),
        format!("{{\"example\": \"{lookalike}\"}}\n"),
    )
    .unwrap();
    std::fs::write(r.join(".git/ORIG"), format!("{live}\n")).unwrap();

    let out = d.cli(&["scan"]).arg(r).output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let live_line = lines.iter().find(|l| l.contains("config.env")).unwrap();
    assert!(live_line.contains("config.env:3:9:"), "{live_line}");
    assert!(live_line.contains("LIVE"), "{live_line}");
    let dead_line = lines.iter().find(|l| l.contains("old.txt")).unwrap();
    assert!(
        dead_line.contains("old.txt:1:11:") && dead_line.contains("not live"),
        "{dead_line}"
    );
    assert!(!stdout.contains("fixtures.json"), "look-alike reported");
    assert!(!stdout.contains(".git"), ".git scanned");
    let all = format!("{stdout}{}", text(&out.stderr));
    for k in [&live, &dead, &lookalike] {
        assert!(!all.contains(secret_part(k)), "scan printed a key: {all}");
    }
    assert!(
        text(&out.stderr).contains("1 look-alikes ignored"),
        "{}",
        text(&out.stderr)
    );

    // JSON
    let out = d.cli(&["scan", "--json"]).arg(r).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let statuses: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 2);
    assert!(statuses.contains(&"live") && statuses.contains(&"not_live"));

    // daemon unreachable: keys are "unknown" and the scan still fails
    let out = Command::new(KEYSEAL)
        .args(["--socket", "/nonexistent/keyseal.sock", "scan"])
        .arg(r.join("src/old.txt"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("unknown"),
        "{}",
        text(&out.stdout)
    );

    // only look-alikes and revoked keys: the scan passes
    let id = key_id(&d, &live);
    ok(&d.run(&["apikey", "revoke", &id], b""), "revoke live");
    let out = d.cli(&["scan"]).arg(r).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let out = Command::new(KEYSEAL)
        .args(["--socket", "/nonexistent/keyseal.sock", "scan"])
        .arg(r.join("src/fixtures.json"))
        .arg(r.join("README.md"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
