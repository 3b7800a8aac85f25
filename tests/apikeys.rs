//! API keys at library level on a real root (SoftHSM2; swtpm where noted):
//! issue/verify, typo rejection before lookup, rotation with overlap,
//! revoke, revoke-by-owner, expiry, CIDRs, rate plans and the brute-force
//! guard with a controlled clock, the pepper across root rotation and
//! restart, and a stolen store without the root.

mod common;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::Duration;

use common::{Backend, Device, Fixture};
use keyseal::apikeys::{
    ApiKeyError, ApiKeyToken, ApiKeys, ApiKeysConfig, InvalidReason, IssueRequest, Issued,
    KeyState, ListFilter, Verdict, VerifyCaller, VerifyRequest,
};
use keyseal::ratelimit::{RatePlan, Window};
use keyseal::secrets::{RotationOutcome, SecretStore, SecretsError};
use keyseal::store::Store;

const T0: u64 = 1_700_000_000;

fn at(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn caller(uid: u32) -> VerifyCaller {
    VerifyCaller {
        uid,
        unit: Some("app.service".into()),
        actor: format!("unit:app.service uid:{uid}"),
    }
}

fn all(_: &str) -> bool {
    true
}

fn cfg_with_plans() -> ApiKeysConfig {
    let mut c = ApiKeysConfig::default();
    c.plans.insert(
        "free".into(),
        RatePlan::new("free", None, Some(10), Some(1000), Some(20)).unwrap(),
    );
    c.plans.insert(
        "tiny".into(),
        RatePlan::new("tiny", None, Some(2), Some(3), None).unwrap(),
    );
    c
}

fn open(b: Backend) -> (Fixture, SecretStore, ApiKeys) {
    let (f, s) = Fixture::new(b);
    let a = ApiKeys::open(&s, cfg_with_plans()).unwrap();
    (f, s, a)
}

/// Opens a store that was just closed: sled releases its file lock when its
/// background flusher has stopped, shortly after the last handle is dropped.
fn open_store(path: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(path) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Like `Fixture::reopen`, waiting for the previous handle's lock.
fn reopen(f: &Fixture) -> SecretStore {
    let root = f.device.open_root();
    SecretStore::open(open_store(&f.store_path()), root, f.cfg.clone()).unwrap()
}

fn issue(a: &ApiKeys, owner: &str, now: u64) -> Issued {
    a.issue(
        "uid:0(root)",
        &IssueRequest {
            owner: owner.into(),
            scopes: vec!["read".into(), "write".into()],
            ..Default::default()
        },
        now,
    )
    .unwrap()
}

fn verify_from(a: &ApiKeys, uid: u32, key: &str, source: Option<&str>, now: Duration) -> Verdict {
    a.verify(
        &caller(uid),
        VerifyRequest {
            key,
            source: source.map(|s| s.parse().unwrap()),
            required_scopes: &[],
            dry_run: false,
        },
        now,
        &all,
    )
    .unwrap()
}

fn verify(a: &ApiKeys, key: &str, now: u64) -> Verdict {
    verify_from(a, 1000, key, None, at(now))
}

fn reason(v: &Verdict) -> InvalidReason {
    match v {
        Verdict::Invalid { reason, .. } => *reason,
        Verdict::Valid(v) => panic!("expected invalid, got valid {v:?}"),
    }
}

#[test]
fn issue_then_verify() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let k = issue(&a, "team-a/cust-1", T0);
    let key = k.token.expose().to_owned();
    assert!(key.starts_with("ks_live_"));
    assert_eq!(k.record.last4, &key[key.len() - 4..]);
    assert_eq!(k.record.env, "live");
    assert_eq!(k.record.rotate_after, 90 * 86_400);
    match verify(&a, &key, T0 + 1) {
        Verdict::Valid(v) => {
            assert_eq!(v.id, k.record.id);
            assert_eq!(v.owner, "team-a/cust-1");
            assert_eq!(v.scopes, vec!["read", "write"]);
            assert_eq!(v.env, "live");
            assert!(v.rate.is_none(), "no plan: unlimited");
            assert!(v.missing_scopes.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // a required scope the key lacks: genuine key, missing scope reported
    let v = a
        .verify(
            &caller(1000),
            VerifyRequest {
                key: &key,
                source: None,
                required_scopes: &["admin".into(), "read".into()],
                dry_run: false,
            },
            at(T0 + 2),
            &all,
        )
        .unwrap();
    match v {
        Verdict::Valid(v) => assert_eq!(v.missing_scopes, vec!["admin"]),
        other => panic!("{other:?}"),
    }
    // the record never holds the key
    let dbg = format!("{:?}", k.record);
    assert!(!dbg.contains(&key[8..key.len() - 4]), "{dbg}");
    // test keys default to 30 days before rotation is due
    let t = a
        .issue(
            "x",
            &IssueRequest {
                owner: "team-a/cust-1".into(),
                env: "test".into(),
                ..Default::default()
            },
            T0,
        )
        .unwrap();
    assert!(t.token.expose().starts_with("ks_test_"));
    assert_eq!(t.record.rotate_after, 30 * 86_400);
    assert_eq!(a.count(), 2);
}

#[test]
fn typo_is_rejected_before_any_lookup() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let k = issue(&a, "team-a", T0);
    let key = k.token.expose().to_owned();
    let before = a.stats().lookups;
    // one character changed
    let mut typo = key.clone().into_bytes();
    let i = key.len() - 10;
    typo[i] = if typo[i] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    assert_eq!(reason(&verify(&a, &typo, T0)), InvalidReason::BadChecksum);
    // truncated, extended, bad character, empty, another prefix
    for bad in [
        key[..key.len() - 1].to_owned(),
        format!("{key}0"),
        format!("{}-{}", &key[..20], &key[21..]),
        String::new(),
        key.replacen("ks_", "zz_", 1),
    ] {
        let r = reason(&verify(&a, &bad, T0));
        assert!(
            matches!(r, InvalidReason::Malformed | InvalidReason::BadChecksum),
            "{r:?}"
        );
    }
    assert_eq!(a.stats().lookups, before, "no lookup for a malformed key");
    // a well-formed key that was never issued is looked up, and unknown
    let stranger = ApiKeyToken::generate("ks", "live").unwrap();
    assert_eq!(
        reason(&verify(&a, stranger.expose(), T0)),
        InvalidReason::Unknown
    );
    assert_eq!(a.stats().lookups, before + 1);
}

#[test]
fn rotate_with_overlap() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let mut req = IssueRequest {
        owner: "team-a/cust-9".into(),
        scopes: vec!["read".into()],
        env: "test".into(),
        expires_in: Some(Duration::from_secs(365 * 86_400)),
        cidrs: vec!["10.0.0.0/8".into()],
        plan: "free".into(),
        ..Default::default()
    };
    req.labels.insert("tier".into(), "gold".into());
    let old = a.issue("admin", &req, T0).unwrap();
    let t1 = T0 + 10 * 86_400;
    let rot = a
        .rotate(
            "admin",
            &old.record.id,
            Some(Duration::from_secs(48 * 3600)),
            t1,
            &all,
        )
        .unwrap();
    // successor inherits metadata, links both ways
    let new = &rot.record;
    assert_ne!(new.id, old.record.id);
    assert_eq!(new.owner, old.record.owner);
    assert_eq!(new.scopes, old.record.scopes);
    assert_eq!(new.env, "test");
    assert_eq!(new.cidrs, old.record.cidrs);
    assert_eq!(new.plan.as_deref(), Some("free"));
    assert_eq!(new.labels.get("tier").map(String::as_str), Some("gold"));
    assert_eq!(new.predecessor.as_deref(), Some(old.record.id.as_str()));
    assert_eq!(
        new.expires_at,
        Some(t1 + 365 * 86_400),
        "lifetime inherited"
    );
    assert_eq!(rot.predecessor.successor.as_deref(), Some(new.id.as_str()));
    assert_eq!(rot.predecessor.expires_at, Some(t1 + 48 * 3600));
    assert!(rot.token.expose().starts_with("ks_test_"));
    assert_ne!(rot.token.expose(), old.token.expose());
    // both valid during the overlap
    let src = Some("10.1.2.3");
    for t in [t1, t1 + 47 * 3600, t1 + 48 * 3600 - 1] {
        assert!(verify_from(&a, 1, old.token.expose(), src, at(t)).is_valid());
        assert!(verify_from(&a, 1, rot.token.expose(), src, at(t)).is_valid());
    }
    // the predecessor stops at the end of the overlap; the successor goes on
    let end = t1 + 48 * 3600;
    assert_eq!(
        reason(&verify_from(&a, 1, old.token.expose(), src, at(end))),
        InvalidReason::Expired
    );
    assert!(verify_from(&a, 1, rot.token.expose(), src, at(end)).is_valid());
    // a rotated key cannot be rotated again; the successor can
    assert!(matches!(
        a.rotate("admin", &old.record.id, None, t1 + 1, &all),
        Err(ApiKeyError::FailedPrecondition(_))
    ));
    let third = a.rotate("admin", &new.id, None, end, &all).unwrap();
    assert_eq!(
        third.predecessor.expires_at,
        Some(end + 86_400),
        "default 24h"
    );
    // admins who may not administer the owner see NotFound
    assert!(matches!(
        a.rotate("other", &third.record.id, None, end, &|_: &str| false),
        Err(ApiKeyError::NotFound)
    ));
}

#[test]
fn rotation_shares_the_rate_budget() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let old = a
        .issue(
            "admin",
            &IssueRequest {
                owner: "o".into(),
                plan: "tiny".into(),
                ..Default::default()
            },
            T0,
        )
        .unwrap();
    let rot = a.rotate("admin", &old.record.id, None, T0, &all).unwrap();
    let rate = |key: &str| match verify(&a, key, T0) {
        Verdict::Valid(v) => v.rate.unwrap(),
        other => panic!("{other:?}"),
    };
    // tiny: 2 per minute; one on each key exhausts the shared budget
    assert!(rate(old.token.expose()).allowed);
    assert!(rate(rot.token.expose()).allowed);
    assert!(!rate(rot.token.expose()).allowed);
}

#[test]
fn revoke_takes_effect_on_the_next_verify() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let k = issue(&a, "team-b", T0);
    assert!(verify(&a, k.token.expose(), T0).is_valid());
    let (r, already) = a.revoke("ops", &k.record.id, T0 + 5, &all).unwrap();
    assert!(!already);
    assert_eq!(r.revoked_at, Some(T0 + 5));
    assert_eq!(r.revoked_by.as_deref(), Some("ops"));
    assert_eq!(
        reason(&verify(&a, k.token.expose(), T0 + 5)),
        InvalidReason::Revoked
    );
    // idempotent: the first revocation stays
    let (r, already) = a.revoke("ops2", &k.record.id, T0 + 9, &all).unwrap();
    assert!(already);
    assert_eq!(r.revoked_at, Some(T0 + 5));
    // revoked keys cannot be rotated
    assert!(matches!(
        a.rotate("ops", &k.record.id, None, T0 + 9, &all),
        Err(ApiKeyError::FailedPrecondition(_))
    ));
    // unknown and malformed ids
    assert!(matches!(
        a.revoke("ops", "ak_000000000000000000000000", T0, &all),
        Err(ApiKeyError::NotFound)
    ));
    assert!(matches!(
        a.revoke("ops", "nope", T0, &all),
        Err(ApiKeyError::InvalidArgument(_))
    ));
    // not permitted for the owner: same as unknown, and nothing changes
    let k2 = issue(&a, "team-b", T0);
    assert!(matches!(
        a.revoke("ops", &k2.record.id, T0, &|_: &str| false),
        Err(ApiKeyError::NotFound)
    ));
    assert!(verify(&a, k2.token.expose(), T0).is_valid());
}

#[test]
fn revoke_every_key_of_an_owner() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let leaked: Vec<Issued> = (0..3).map(|_| issue(&a, "team-c/acme", T0)).collect();
    let other_owner = issue(&a, "team-c/acme2", T0);
    let nested = issue(&a, "team-c/acme/sub", T0);
    // Verified (so cached) before the revocation: the cache must not keep
    // them valid.
    for k in &leaked {
        assert!(verify(&a, k.token.expose(), T0).is_valid());
    }
    a.revoke("ops", &leaked[0].record.id, T0 + 1, &all).unwrap();
    let ids = a.revoke_owner("ops", "team-c/acme", T0 + 10).unwrap();
    assert_eq!(ids.len(), 2, "already revoked keys are not counted");
    for k in &leaked {
        assert!(!verify(&a, k.token.expose(), T0 + 10).is_valid());
    }
    assert!(verify(&a, other_owner.token.expose(), T0 + 10).is_valid());
    assert!(verify(&a, nested.token.expose(), T0 + 10).is_valid());
    assert!(a
        .revoke_owner("ops", "team-c/acme", T0 + 11)
        .unwrap()
        .is_empty());
    assert!(matches!(
        a.revoke_owner("ops", "bad//owner", T0),
        Err(ApiKeyError::InvalidArgument(_))
    ));
}

#[test]
fn expiry() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let k = a
        .issue(
            "admin",
            &IssueRequest {
                owner: "o".into(),
                expires_in: Some(Duration::from_secs(3600)),
                ..Default::default()
            },
            T0,
        )
        .unwrap();
    assert_eq!(k.record.expires_at, Some(T0 + 3600));
    assert!(verify(&a, k.token.expose(), T0 + 3599).is_valid());
    assert_eq!(
        reason(&verify(&a, k.token.expose(), T0 + 3600)),
        InvalidReason::Expired
    );
    assert_eq!(k.record.state(T0 + 3600), KeyState::Expired);
}

#[test]
fn source_cidrs() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let k = a
        .issue(
            "admin",
            &IssueRequest {
                owner: "o".into(),
                cidrs: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
                ..Default::default()
            },
            T0,
        )
        .unwrap();
    let key = k.token.expose();
    for ok in ["10.1.2.3", "::ffff:10.9.9.9", "2001:db8:1::7"] {
        assert!(verify_from(&a, 5, key, Some(ok), at(T0)).is_valid(), "{ok}");
    }
    for bad in ["192.168.1.1", "11.0.0.1", "2001:db9::1"] {
        assert_eq!(
            reason(&verify_from(&a, 5, key, Some(bad), at(T0))),
            InvalidReason::WrongSource,
            "{bad}"
        );
    }
    // no source given: a restricted key fails closed
    assert_eq!(
        reason(&verify_from(&a, 5, key, None, at(T0))),
        InvalidReason::WrongSource
    );
    // bad CIDRs are refused at issue, and nothing is written
    let n = a.count();
    for bad in ["10.1.0.0/8", "10.0.0.0/40", "host.example"] {
        let r = a.issue(
            "admin",
            &IssueRequest {
                owner: "o".into(),
                cidrs: vec![bad.into()],
                ..Default::default()
            },
            T0,
        );
        assert!(matches!(r, Err(ApiKeyError::InvalidArgument(_))), "{bad}");
    }
    assert_eq!(a.count(), n);
}

#[test]
fn owner_scoped_verify_is_uniform() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let k = issue(&a, "team-a/x", T0);
    let only_b = |owner: &str| owner.starts_with("team-b/");
    let v = a
        .verify(
            &caller(7),
            VerifyRequest {
                key: k.token.expose(),
                source: None,
                required_scopes: &[],
                dry_run: false,
            },
            at(T0),
            &only_b,
        )
        .unwrap();
    assert_eq!(reason(&v), InvalidReason::NotPermitted);
}

#[test]
fn rate_plan_burst_then_minute_then_day() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let k = a
        .issue(
            "admin",
            &IssueRequest {
                owner: "o".into(),
                plan: "free".into(),
                ..Default::default()
            },
            T0,
        )
        .unwrap();
    let key = k.token.expose().to_owned();
    let rate_at = |now: Duration, dry: bool| match a
        .verify(
            &caller(1),
            VerifyRequest {
                key: &key,
                source: None,
                required_scopes: &[],
                dry_run: dry,
            },
            now,
            &all,
        )
        .unwrap()
    {
        Verdict::Valid(v) => v.rate.unwrap(),
        other => panic!("{other:?}"),
    };
    let t0 = at(T0);
    // dry runs do not charge
    for _ in 0..50 {
        assert_eq!(rate_at(t0, true).remaining, 19);
    }
    // free: burst 20, then 10 per minute (one per 6 s), 1000 per day
    for i in 0..20u64 {
        let d = rate_at(t0, false);
        assert!(d.allowed);
        assert_eq!((d.limit, d.remaining), (20, 19 - i));
    }
    let d = rate_at(t0, false);
    assert!(!d.allowed);
    assert_eq!(d.window, Window::Minute);
    assert_eq!(d.retry_after_secs(), 6);
    assert_eq!(d.reset_secs(), 120);
    // at a steady 10/min the day budget (1000) runs out first: 20 in the
    // burst, then one per 6 s; the day refills one per 86.4 s
    let mut t = t0;
    let mut admitted = 20u64;
    let refusal = loop {
        t += Duration::from_secs(6);
        let d = rate_at(t, false);
        if !d.allowed {
            break d;
        }
        admitted += 1;
        assert!(admitted < 2000, "day limit never reached");
    };
    assert_eq!(refusal.window, Window::Day);
    assert_eq!(refusal.limit, 1000);
    assert_eq!(refusal.remaining, 0);
    // exact: the k-th 6 s step passes the day layer while
    // (20 + k) * 86.4 <= 86400 + 6k, i.e. k <= 1053; it refuses step 1054
    // and admits again at 1074 * 86.4 - 86400 s, 69.6 s later
    assert_eq!(admitted, 20 + 1053);
    assert_eq!(t - t0, Duration::from_secs(6 * 1054));
    assert_eq!(refusal.retry_after, Duration::from_millis(69_600));
    assert_eq!(refusal.retry_after_secs(), 70);
}

#[test]
fn unknown_plan_is_refused_at_issue() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let r = a.issue(
        "admin",
        &IssueRequest {
            owner: "o".into(),
            plan: "platinum".into(),
            ..Default::default()
        },
        T0,
    );
    assert!(matches!(r, Err(ApiKeyError::InvalidArgument(m)) if m.contains("free")));
    assert_eq!(a.count(), 0);
}

#[test]
fn brute_force_guard() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let good = issue(&a, "o", T0);
    let t0 = at(T0);
    // 20 failures per minute are tolerated
    for _ in 0..20 {
        let guess = ApiKeyToken::generate("ks", "live").unwrap();
        assert!(!verify_from(&a, 66, guess.expose(), None, t0).is_valid());
    }
    // then the caller is throttled, even with a good key
    let r = a.verify(
        &caller(66),
        VerifyRequest {
            key: good.token.expose(),
            source: None,
            required_scopes: &[],
            dry_run: false,
        },
        t0,
        &all,
    );
    assert!(
        matches!(
            r,
            Err(ApiKeyError::Throttled {
                retry_after_secs: 3
            })
        ),
        "{r:?}"
    );
    let lookups = a.stats().lookups;
    assert!(a
        .verify(
            &caller(66),
            VerifyRequest {
                key: "ks_live_junk",
                source: None,
                required_scopes: &[],
                dry_run: false
            },
            t0,
            &all
        )
        .is_err());
    assert_eq!(a.stats().lookups, lookups, "throttled: nothing looked up");
    // another caller, or the same caller for another customer address, is not
    assert!(verify_from(&a, 67, good.token.expose(), None, t0).is_valid());
    assert!(verify_from(&a, 66, good.token.expose(), Some("203.0.113.5"), t0).is_valid());
    // 3 s later one more attempt is allowed
    assert!(verify_from(&a, 66, good.token.expose(), None, t0 + at(3)).is_valid());
    assert!(a.stats().throttled >= 2);
}

#[test]
fn guard_bounds_callers_that_vary_the_source() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let good = issue(&a, "o", T0);
    let t0 = at(T0);
    // 200 failures per minute over all sources (10 x 20) are tolerated...
    for i in 0..200u32 {
        let ip = format!("198.51.{}.{}", i / 250, i % 250);
        let guess = ApiKeyToken::generate("ks", "live").unwrap();
        assert!(!verify_from(&a, 70, guess.expose(), Some(&ip), t0).is_valid());
    }
    // ...then the caller is throttled from any source
    let r = a.verify(
        &caller(70),
        VerifyRequest {
            key: good.token.expose(),
            source: Some("192.0.2.200".parse().unwrap()),
            required_scopes: &[],
            dry_run: false,
        },
        t0,
        &all,
    );
    assert!(matches!(r, Err(ApiKeyError::Throttled { .. })), "{r:?}");
    // IPv6 customers are counted per /64
    for i in 0..20u32 {
        let ip = format!("2001:db8:0:1::{i:x}");
        let guess = ApiKeyToken::generate("ks", "live").unwrap();
        assert!(!verify_from(&a, 71, guess.expose(), Some(&ip), t0).is_valid());
    }
    let r = a.verify(
        &caller(71),
        VerifyRequest {
            key: good.token.expose(),
            source: Some("2001:db8:0:1::ffff".parse().unwrap()),
            required_scopes: &[],
            dry_run: false,
        },
        t0,
        &all,
    );
    assert!(matches!(r, Err(ApiKeyError::Throttled { .. })), "{r:?}");
    assert!(verify_from(&a, 71, good.token.expose(), Some("2001:db8:0:2::1"), t0).is_valid());
}

#[test]
fn default_plan_and_unlimited() {
    let (_f, s) = Fixture::new(Backend::SoftHsm);
    let mut cfg = cfg_with_plans();
    cfg.default_plan = Some("tiny".into());
    let a = ApiKeys::open(&s, cfg).unwrap();
    let k = issue(&a, "o", T0);
    assert_eq!(k.record.plan.as_deref(), Some("tiny"));
    let u = a
        .issue(
            "admin",
            &IssueRequest {
                owner: "o".into(),
                plan: "unlimited".into(),
                ..Default::default()
            },
            T0,
        )
        .unwrap();
    assert_eq!(u.record.plan, None);
    match verify(&a, u.token.expose(), T0) {
        Verdict::Valid(v) => assert!(v.rate.is_none()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn listing_filters_and_pages() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let live = issue(&a, "team-a", T0);
    let test = a
        .issue(
            "admin",
            &IssueRequest {
                owner: "team-a".into(),
                env: "test".into(),
                ..Default::default()
            },
            T0,
        )
        .unwrap();
    let b = issue(&a, "team-b", T0);
    let revoked = issue(&a, "team-a", T0);
    a.revoke("ops", &revoked.record.id, T0, &all).unwrap();
    let list = |f: ListFilter, now: u64| -> Vec<String> {
        a.list(&f, now, &all)
            .unwrap()
            .0
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    let team_a = ListFilter {
        owner: Some("team-a".into()),
        ..Default::default()
    };
    let got = list(team_a.clone(), T0);
    assert_eq!(got.len(), 2);
    assert!(got.contains(&live.record.id) && got.contains(&test.record.id));
    let got = list(
        ListFilter {
            include_inactive: true,
            ..team_a.clone()
        },
        T0,
    );
    assert_eq!(got.len(), 3);
    assert_eq!(list(ListFilter::default(), T0).len(), 3);
    // due: test keys after 30 days, live keys after 90
    let due = ListFilter {
        due: true,
        ..Default::default()
    };
    assert!(list(due.clone(), T0 + 29 * 86_400).is_empty());
    assert_eq!(
        list(due.clone(), T0 + 30 * 86_400),
        vec![test.record.id.clone()]
    );
    assert_eq!(list(due.clone(), T0 + 90 * 86_400).len(), 3);
    // a rotated key is no longer due
    a.rotate("ops", &test.record.id, None, T0 + 31 * 86_400, &all)
        .unwrap();
    assert!(!list(due, T0 + 31 * 86_400).contains(&test.record.id));
    // admin scoping filters the listing
    let only_b = |o: &str| o == "team-b";
    let (got, _) = a.list(&ListFilter::default(), T0, &only_b).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, b.record.id);
    // paging
    for _ in 0..5 {
        issue(&a, "team-p", T0);
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = a
            .list(
                &ListFilter {
                    owner: Some("team-p".into()),
                    after: after.clone(),
                    limit: 2,
                    ..Default::default()
                },
                T0,
                &all,
            )
            .unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.into_iter().map(|r| r.id));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    seen.dedup();
    assert_eq!(seen.len(), 5);
}

/// The pepper is sealed under the root: root rotation rewraps it, a restart
/// unseals it, and keys issued before still verify.
fn pepper_survives_root_rotation_and_restart(b: Backend) {
    let (f, s, a) = open(b);
    let k = issue(&a, "team-a", T0);
    let out = s.rotate_root(&mut |_| ControlFlow::Continue(())).unwrap();
    assert!(
        matches!(out, RotationOutcome::Completed { to: 2, .. }),
        "{out:?}"
    );
    assert!(verify(&a, k.token.expose(), T0).is_valid());
    drop(a);
    drop(s);
    let s = reopen(&f);
    let a = ApiKeys::open(&s, cfg_with_plans()).unwrap();
    assert!(verify(&a, k.token.expose(), T0).is_valid());
    let k2 = issue(&a, "team-a", T0);
    assert!(verify(&a, k2.token.expose(), T0).is_valid());
}

both_backends!(pepper_survives_root_rotation_and_restart);

#[test]
fn stolen_store_without_the_root_cannot_verify() {
    let (f, s, a) = open(Backend::SoftHsm);
    let k = issue(&a, "team-a", T0);
    let key = k.token.expose().to_owned();
    drop(a);
    drop(s);
    // neither the key nor its random part is anywhere in the store files
    let mut files = vec![f.store_path()];
    let mut bytes = Vec::new();
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            bytes.extend(std::fs::read(&p).unwrap());
        }
    }
    let random = &key[8..8 + 33];
    assert!(!bytes.windows(random.len()).any(|w| w == random.as_bytes()));
    // the stored hash is keyed: neither sha256(key) nor an unkeyed HMAC
    let store = open_store(&f.store_path());
    let by_hash = store.db.open_tree("apikey_by_hash").unwrap();
    assert_eq!(by_hash.len(), 1);
    let stored = by_hash.iter().next().unwrap().unwrap().0;
    use sha2::Digest;
    assert_ne!(
        stored.as_ref(),
        sha2::Sha256::digest(key.as_bytes()).as_slice()
    );
    {
        use hmac::Mac;
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&[0u8; 32]).unwrap();
        m.update(key.as_bytes());
        assert_ne!(stored.as_ref(), m.finalize().into_bytes().as_slice());
    }
    drop(by_hash);
    drop(store);
    // a thief copies the store to a machine with another root device
    let stolen = tempfile::tempdir().unwrap();
    let dst = stolen.path().join("store");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(f.store_path()).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            let sub = dst.join(e.file_name());
            std::fs::create_dir(&sub).unwrap();
            for g in std::fs::read_dir(e.path()).unwrap() {
                let g = g.unwrap();
                std::fs::copy(g.path(), sub.join(g.file_name())).unwrap();
            }
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    let thief = Device::start(Backend::Tpm);
    let root = thief.open_root();
    let st = Store::open(&dst).unwrap();
    // even with a "version 1" root key on the thief's device (a TPM derives
    // one from its own seed), the pepper does not unseal
    if !root.has_version(1).unwrap() {
        root.create_version(1).unwrap();
    }
    let s = SecretStore::open(st, root, Default::default()).unwrap();
    match ApiKeys::open(&s, ApiKeysConfig::default()) {
        Err(ApiKeyError::Secrets(SecretsError::Integrity(_) | SecretsError::Root(_))) => {}
        other => panic!("the pepper opened without the root: {other:?}"),
    }
}

#[test]
fn labels_and_scopes_are_validated() {
    let (_f, _s, a) = open(Backend::SoftHsm);
    let mut labels = BTreeMap::new();
    labels.insert(String::new(), "v".into());
    for req in [
        IssueRequest {
            owner: "o".into(),
            labels,
            ..Default::default()
        },
        IssueRequest {
            owner: "o".into(),
            scopes: vec!["has space".into()],
            ..Default::default()
        },
        IssueRequest {
            owner: "/abs".into(),
            ..Default::default()
        },
        IssueRequest {
            owner: "o".into(),
            env: "Live".into(),
            ..Default::default()
        },
        IssueRequest {
            owner: "o".into(),
            expires_in: Some(Duration::ZERO),
            ..Default::default()
        },
    ] {
        assert!(
            matches!(a.issue("x", &req, T0), Err(ApiKeyError::InvalidArgument(_))),
            "{req:?}"
        );
    }
    assert_eq!(a.count(), 0);
    // custom environments
    let k = a
        .issue(
            "x",
            &IssueRequest {
                owner: "o".into(),
                env: "staging2".into(),
                ..Default::default()
            },
            T0,
        )
        .unwrap();
    assert!(k.token.expose().starts_with("ks_staging2_"));
    assert!(verify(&a, k.token.expose(), T0).is_valid());
}
