//! Proxy telemetry and anomaly detection end to end: the real keyseald and
//! keyseal binaries, `curl` as the client, a local HTTPS upstream (own test
//! CA from rcgen) answering with the status a path asks for. Thresholds are
//! made small through `[proxy.anomaly]` so each test runs in seconds.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::daemon::{TestDaemon, PROXY_POLICY, ROOT_POLICY};
use common::proxy::{curl, free_port, issue, ok, start_upstream, Pki, Upstream};
use common::Backend;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

struct Env {
    d: TestDaemon,
    _up: Upstream,
    gw: u16,
}

/// A daemon with the gateway on loopback TCP, `[proxy.anomaly]` = `anomaly`,
/// target `vendor` (the upstream) and proxy `vendor` for owner `svc/a`
/// (allow GET /v1/.*, deny /v1/admin.*), with `--on-anomaly on_anomaly`.
fn setup(anomaly: &str, on_anomaly: &str) -> Env {
    let pki = Pki::new("keyseal proxy_telemetry test CA");
    let up = start_upstream("127.0.0.1", &pki, None);
    let gw = free_port();
    let extra = format!(
        r#"
[rate_plans.tiny]
per_minute = 2
burst = 2

[proxy]
gateway_listen = "127.0.0.1:{gw}"
gateway_socket = "proxy.sock"

[proxy.anomaly]
flush_secs = 1
{anomaly}
"#
    );
    let d = TestDaemon::start_with(
        Backend::SoftHsm,
        &format!("{ROOT_POLICY}\n{PROXY_POLICY}"),
        &extra,
    );
    let ca: PathBuf = d.dir().join("upstream-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{}", up.addr.port());
    ok(
        &d,
        &[
            "target",
            "put",
            "vendor",
            "--url",
            &url,
            "--ca",
            ca.to_str().unwrap(),
        ],
        b"",
    );
    for (name, plan) in [("vendor", None), ("lim", Some("tiny"))] {
        let mut args = vec![
            "proxy",
            "put",
            name,
            "--target",
            "vendor",
            "--key-owner",
            "svc/a",
            "--caller",
            "uid=0",
            "--on-anomaly",
            on_anomaly,
        ];
        if let Some(p) = plan {
            args.extend(["--rate-plan", p]);
        }
        ok(&d, &args, b"");
        ok(
            &d,
            &[
                "rule",
                "add",
                name,
                "allow-v1",
                "--priority",
                "10",
                "--allow",
                "--method",
                "GET",
                "--path",
                "/v1/.*",
            ],
            b"",
        );
        ok(
            &d,
            &[
                "rule",
                "add",
                name,
                "deny-admin",
                "--priority",
                "10",
                "--deny",
                "--path",
                "/v1/admin(/.*)?",
            ],
            b"",
        );
    }
    Env { d, _up: up, gw }
}

/// GET through the gateway; (status, body).
fn get(e: &Env, key: &str, path: &str) -> (u16, String) {
    let r = curl(&[
        "-H",
        &format!("Authorization: Bearer {key}"),
        &format!("http://127.0.0.1:{}/p/{path}", e.gw),
    ]);
    (r.status, r.body)
}

/// GET through the gateway's Unix socket (caller known by the kernel).
fn get_unix(e: &Env, path: &str) -> (u16, String) {
    let sock = e.d.dir().join("proxy.sock");
    let r = curl(&[
        "--unix-socket",
        sock.to_str().unwrap(),
        &format!("http://localhost/p/{path}"),
    ]);
    (r.status, r.body)
}

fn telemetry(d: &TestDaemon, proxy: &str, interval: &str) -> serde_json::Value {
    let out = ok(
        d,
        &[
            "proxy",
            "telemetry",
            proxy,
            "--interval",
            interval,
            "--limit",
            "10",
            "--json",
        ],
        b"",
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const FIELDS: [&str; 10] = [
    "requests",
    "status_2xx",
    "status_3xx",
    "status_4xx",
    "status_5xx",
    "denied",
    "rate_limited",
    "unauthenticated",
    "errors",
    "suspended",
];

/// The buckets' counters summed (a run may straddle a minute or hour).
fn sums(v: &serde_json::Value) -> Vec<(String, u64)> {
    FIELDS
        .iter()
        .map(|f| {
            let n = v["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b[*f].as_u64().unwrap())
                .sum();
            (f.to_string(), n)
        })
        .collect()
}

fn expect(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    FIELDS
        .iter()
        .map(|f| {
            let n = pairs
                .iter()
                .find(|(k, _)| k == f)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            (f.to_string(), n)
        })
        .collect()
}

/// Waits until the proxy's telemetry at `interval` sums to `want` (log
/// entries of allowed calls are written when the response body ends, a
/// moment after curl has it), then checks it stays there.
fn wait_sums(d: &TestDaemon, proxy: &str, interval: &str, want: &[(String, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = sums(&telemetry(d, proxy, interval));
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{proxy} {interval}: got {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sums(&telemetry(d, proxy, interval)),
        want,
        "{proxy} {interval}"
    );
}

/// `proxy.anomaly` audit events of `kind` for `caller`.
fn anomaly_events(d: &TestDaemon, kind: &str, caller: &str) -> Vec<serde_json::Value> {
    let out = ok(
        d,
        &[
            "audit",
            "query",
            "--op",
            "proxy.anomaly",
            "--limit",
            "1000",
            "--json",
        ],
        b"",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["detail"]["kind"] == kind && e["detail"]["caller"] == caller)
        .collect()
}

/// Waits for at least one event, then checks that exactly one stays.
fn exactly_one_event(d: &TestDaemon, kind: &str, caller: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    while anomaly_events(d, kind, caller).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no {kind} event for {caller}; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let ev = anomaly_events(d, kind, caller);
    assert_eq!(ev.len(), 1, "{kind} for {caller}: {ev:?}");
    ev.into_iter().next().unwrap()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn telemetry_counts_match_the_requests_and_survive_restart() {
    // Thresholds out of reach: this test counts only.
    let mut e = setup(
        "spike_min_count = 100000\nerror_min_count = 100000\npath_learning_requests = 100000",
        "flag",
    );
    let (_, key) = issue(&e.d, "svc/a", None);
    let mut sent = Vec::new();
    for (path, want) in [
        ("vendor/v1/ok", 200),
        ("vendor/v1/ok/2", 200),
        ("vendor/v1/ok/3", 200),
        ("vendor/v1/status/302", 302),
        ("vendor/v1/status/404", 404),
        ("vendor/v1/status/404", 404),
        ("vendor/v1/status/503", 503),
        ("vendor/v1/admin", 403),
        ("vendor/v1/admin/x", 403),
    ] {
        let (status, body) = get(&e, &key, path);
        assert_eq!(status, want, "{path}: {body}");
        sent.push(status);
    }
    // A wrong key: unauthenticated, still counted for the proxy.
    let (status, _) = get(&e, "ks_test_nope", "vendor/v1/ok");
    assert_eq!(status, 401);
    // Three calls on a proxy with a plan of 2 per minute (burst 2).
    let lim: Vec<u16> = (0..3).map(|_| get(&e, &key, "lim/v1/ok").0).collect();
    assert_eq!(lim, vec![200, 200, 429]);

    let vendor = expect(&[
        ("requests", 10),
        ("status_2xx", 3),
        ("status_3xx", 1),
        ("status_4xx", 5),
        ("status_5xx", 1),
        ("denied", 2),
        ("unauthenticated", 1),
    ]);
    let limited = expect(&[
        ("requests", 3),
        ("status_2xx", 2),
        ("status_4xx", 1),
        ("rate_limited", 1),
    ]);
    for iv in ["minute", "hour", "day"] {
        wait_sums(&e.d, "vendor", iv, &vendor);
        wait_sums(&e.d, "lim", iv, &limited);
    }
    let t = telemetry(&e.d, "vendor", "day");
    let b = &t["buckets"][0];
    assert!(b["p50_latency_us"].as_u64().unwrap() > 0, "{t}");
    assert!(b["p95_latency_us"].as_u64().unwrap() >= b["p50_latency_us"].as_u64().unwrap());
    assert!(t["suspended"].as_array().unwrap().is_empty());
    // The table form names the columns.
    let table = ok(
        &e.d,
        &["proxy", "telemetry", "vendor", "--interval", "day"],
        b"",
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("2XX") && text.contains("P95_MS"), "{text}");
    // Bad input is refused.
    let out = e.d.run(&["proxy", "telemetry", "nope", "--json"], b"");
    assert!(!out.status.success());

    // The buckets are persisted: the same counts after a restart.
    e.d.stop();
    e.d.spawn();
    for iv in ["minute", "hour", "day"] {
        assert_eq!(sums(&telemetry(&e.d, "vendor", iv)), vendor, "{iv}");
        assert_eq!(sums(&telemetry(&e.d, "lim", iv)), limited, "{iv}");
    }
}

#[test]
fn spike_and_first_seen_path_each_raise_one_audit_event() {
    let e = setup(
        "spike_factor = 2.0\nspike_window_minutes = 5\nspike_min_count = 6\n\
         path_learning_requests = 2\nerror_min_count = 100000",
        "flag",
    );
    // Key A: learns /v1/items/{n}, then one new pattern (used twice) and
    // the learnt one again: one first_seen_path, no spike (5 requests).
    let (a_id, a) = issue(&e.d, "svc/a", None);
    for p in [
        "/v1/items/1",
        "/v1/items/2",
        "/v1/items/3",
        "/v1/other",
        "/v1/other",
    ] {
        assert_eq!(get(&e, &a, &format!("vendor{p}")).0, 200, "{p}");
    }
    let a_caller = format!("key:{a_id}");
    let ev = exactly_one_event(&e.d, "first_seen_path", &a_caller);
    assert_eq!(ev["detail"]["path"], "/v1/other", "{ev}");
    assert_eq!(ev["detail"]["proxy"], "vendor");
    assert_eq!(ev["detail"]["action"], "flag");
    assert_eq!(ev["target"], "vendor");
    assert!(anomaly_events(&e.d, "volume_spike", &a_caller).is_empty());

    // Key B: 10 requests of one pattern in (at most two) minutes with no
    // history: one spike (the two minutes cannot both reach 6), no
    // first-seen path.
    let (b_id, b) = issue(&e.d, "svc/a", None);
    for i in 0..10 {
        assert_eq!(get(&e, &b, &format!("vendor/v1/items/{i}")).0, 200);
    }
    let b_caller = format!("key:{b_id}");
    let ev = exactly_one_event(&e.d, "volume_spike", &b_caller);
    assert!(
        ev["detail"]["count"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 6
    );
    assert!(anomaly_events(&e.d, "first_seen_path", &b_caller).is_empty());
    // Never a key in the audit log.
    let out = ok(&e.d, &["audit", "query", "--op", "proxy.*", "--json"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(&a) && !text.contains(&b));
    // The minute buckets carry the flags.
    let t = telemetry(&e.d, "vendor", "minute");
    let flagged: u64 = t["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["anomalies"]["volume_spike"].as_u64().unwrap_or(0)
                + b["anomalies"]["first_seen_path"].as_u64().unwrap_or(0)
        })
        .sum();
    assert_eq!(flagged, 2, "{t}");
}

#[test]
fn on_anomaly_suspend_refuses_the_caller_until_unsuspended() {
    let mut e = setup(
        "spike_factor = 2.0\nspike_window_minutes = 5\nspike_min_count = 4\n\
         path_learning_requests = 100000\nerror_min_count = 100000",
        "suspend",
    );
    let show = ok(&e.d, &["proxy", "show", "vendor", "--json"], b"");
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["on_anomaly"], "suspend");
    let (id, key) = issue(&e.d, "svc/a", None);
    let (_, other) = issue(&e.d, "svc/a", None);
    let caller = format!("key:{id}");
    // The 4th request in a minute spikes; the caller is refused soon after.
    let mut first_refused = None;
    for i in 0..12 {
        let (status, body) = get(&e, &key, "vendor/v1/items/1");
        if status == 403 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"], "suspended", "{body}");
            assert_eq!(v["caller"], caller.as_str());
            first_refused = Some(i);
            break;
        }
        assert_eq!(status, 200, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let i = first_refused.expect("the caller was never suspended");
    assert!(i >= 4, "refused after {i} requests");
    let ev = exactly_one_event(&e.d, "volume_spike", &caller);
    assert_eq!(ev["detail"]["action"], "suspend");
    // Only this caller and only this proxy.
    assert_eq!(get(&e, &other, "vendor/v1/items/1").0, 200);
    assert_eq!(get(&e, &key, "lim/v1/items/1").0, 200);
    let t = telemetry(&e.d, "vendor", "hour");
    assert_eq!(t["suspended"][0]["caller"], caller.as_str(), "{t}");
    assert_eq!(t["suspended"][0]["kind"], "volume_spike");

    // Kept across a restart.
    e.d.stop();
    e.d.spawn();
    let (status, body) = get(&e, &key, "vendor/v1/items/1");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"suspended\""), "{body}");

    // Unsuspending a caller that is not suspended is NOT_FOUND.
    let out = e.d.run(
        &["proxy", "unsuspend", "vendor", "--caller", "key:ak_nobody"],
        b"",
    );
    assert!(!out.status.success());
    ok(
        &e.d,
        &["proxy", "unsuspend", "vendor", "--caller", &caller],
        b"",
    );
    let (status, body) = get(&e, &key, "vendor/v1/items/1");
    assert_eq!(status, 200, "{body}");
    let t = telemetry(&e.d, "vendor", "hour");
    assert!(t["suspended"].as_array().unwrap().is_empty(), "{t}");
    // The refusals are counted; the clearing is audited with the caller.
    let total_suspended: u64 = t["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["suspended"].as_u64().unwrap())
        .sum();
    assert!(total_suspended >= 2, "{t}");
    let out = ok(
        &e.d,
        &["audit", "query", "--op", "proxy.suspension.clear", "--json"],
        b"",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&caller), "{text}");

    // A kernel-identified caller (Unix socket, no key) is suspended by its
    // uid (and unit), not per process: each curl is a new pid.
    let mut refused = None;
    for _ in 0..12 {
        let (status, body) = get_unix(&e, "vendor/v1/items/1");
        if status == 403 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"], "suspended", "{body}");
            refused = Some(v["caller"].as_str().unwrap().to_owned());
            break;
        }
        assert_eq!(status, 200, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let kcaller = refused.expect("the kernel caller was never suspended");
    assert!(
        kcaller == "uid=0" || kcaller.starts_with("uid=0 unit="),
        "{kcaller}"
    );
    assert!(!kcaller.contains("pid="), "{kcaller}");
    ok(
        &e.d,
        &["proxy", "unsuspend", "vendor", "--caller", &kcaller],
        b"",
    );
    assert_eq!(get_unix(&e, "vendor/v1/items/1").0, 200);
}
