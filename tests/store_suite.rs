//! The store/envelope suite, run against both roots of trust (real SoftHSM2
//! and real swtpm) by parameterisation: every test below runs twice.

mod common;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Fixture};
use keyseal::name::SecretName;
use keyseal::secrets::VersionRecord;
use keyseal::secrets::{
    OpCtx, PutOptions, RotationOutcome, SecretStore, SecretsConfig, SecretsError, VersionState,
};
use keyseal::store::{decode, encode, Store, StoreError};

fn n(s: &str) -> SecretName {
    SecretName::parse(s).unwrap()
}

fn ctx() -> OpCtx {
    OpCtx {
        actor: "uid:1000".into(),
        now: 1_700_000_000,
    }
}

fn get(s: &SecretStore, name: &str, v: Option<u64>) -> Result<Vec<u8>, SecretsError> {
    s.get(&ctx(), &n(name), v).map(|x| x.value.to_vec())
}

fn round_trip_and_versions(b: Backend) {
    let (_f, s) = Fixture::new(b);
    let name = n("app/db/password");
    assert_eq!(
        s.put(&ctx(), &name, b"one", &PutOptions::default())
            .unwrap(),
        1
    );
    assert_eq!(
        s.put(&ctx(), &name, b"two", &PutOptions::default())
            .unwrap(),
        2
    );
    assert_eq!(get(&s, "app/db/password", None).unwrap(), b"two");
    assert_eq!(get(&s, "app/db/password", Some(1)).unwrap(), b"one");
    assert!(matches!(
        get(&s, "app/db/password", Some(3)),
        Err(SecretsError::VersionNotFound(3))
    ));
    assert!(matches!(
        get(&s, "app/other", None),
        Err(SecretsError::NotFound)
    ));
    let empty = n("empty");
    s.put(&ctx(), &empty, b"", &PutOptions::default()).unwrap();
    assert_eq!(get(&s, "empty", None).unwrap(), b"");
    let meta = s.describe(&name).unwrap();
    assert_eq!(meta.current_version, 2);
    assert_eq!(meta.created_by, "uid:1000");
}

fn cas_conflicts(b: Backend) {
    let (_f, s) = Fixture::new(b);
    let name = n("cas/x");
    let o = |cas| PutOptions {
        cas: Some(cas),
        ..Default::default()
    };
    assert_eq!(s.put(&ctx(), &name, b"a", &o(0)).unwrap(), 1);
    assert!(matches!(
        s.put(&ctx(), &name, b"b", &o(0)),
        Err(SecretsError::CasConflict {
            expected: 0,
            actual: 1
        })
    ));
    assert_eq!(s.put(&ctx(), &name, b"b", &o(1)).unwrap(), 2);
    assert_eq!(get(&s, "cas/x", None).unwrap(), b"b");
    assert_eq!(s.history(&name).unwrap().len(), 2);
}

fn delete_undelete_destroy(b: Backend) {
    let (_f, s) = Fixture::new(b);
    let name = n("d/x");
    for v in [b"v1", b"v2", b"v3"] {
        s.put(&ctx(), &name, v, &PutOptions::default()).unwrap();
    }
    assert_eq!(s.delete(&ctx(), &name, &[]).unwrap(), vec![3]);
    assert_eq!(
        get(&s, "d/x", None).unwrap(),
        b"v2",
        "latest active after soft delete"
    );
    assert!(matches!(
        get(&s, "d/x", Some(3)),
        Err(SecretsError::VersionDeleted(3))
    ));
    s.undelete(&ctx(), &name, &[3]).unwrap();
    assert_eq!(get(&s, "d/x", None).unwrap(), b"v3");
    s.destroy(&ctx(), &name, &[2]).unwrap();
    assert!(matches!(
        get(&s, "d/x", Some(2)),
        Err(SecretsError::VersionDestroyed(2))
    ));
    assert!(matches!(
        s.undelete(&ctx(), &name, &[2]),
        Err(SecretsError::VersionDestroyed(2))
    ));
    // the destroyed record holds no ciphertext and no wrapped key
    let h = s.history(&name).unwrap();
    assert!(matches!(h[1].state, VersionState::Destroyed(_)));
    assert_eq!(h[1].root_version, None);
    // a failing multi-version call changes nothing
    assert!(matches!(
        s.delete(&ctx(), &name, &[1, 99]),
        Err(SecretsError::VersionNotFound(99))
    ));
    assert_eq!(get(&s, "d/x", Some(1)).unwrap(), b"v1");
}

fn max_versions_pruning(b: Backend) {
    let (_f, s) = Fixture::new(b);
    let name = n("p/x");
    let o = PutOptions {
        max_versions: Some(3),
        ..Default::default()
    };
    for i in 1..=5u8 {
        s.put(&ctx(), &name, &[i], &o).unwrap();
    }
    let versions: Vec<u64> = s
        .history(&name)
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, vec![3, 4, 5]);
    assert!(matches!(
        get(&s, "p/x", Some(2)),
        Err(SecretsError::VersionNotFound(2))
    ));
    assert_eq!(get(&s, "p/x", Some(3)).unwrap(), vec![3]);
}

fn list_by_prefix_with_paging(b: Backend) {
    let (_f, s) = Fixture::new(b);
    for name in ["app/a/1", "app/a/2", "app/b/1", "other/x", "app/a/3"] {
        s.put(&ctx(), &n(name), b"x", &PutOptions::default())
            .unwrap();
    }
    let p1 = s.list("app/a/", None, 2).unwrap();
    let names: Vec<_> = p1.items.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["app/a/1", "app/a/2"]);
    let p2 = s.list("app/a/", p1.next.as_deref(), 2).unwrap();
    let names: Vec<_> = p2.items.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["app/a/3"]);
    assert!(p2.next.is_none());
    assert_eq!(s.list("", None, 100).unwrap().items.len(), 5);
    assert!(s.list("../", None, 10).is_err());
}

fn bad_input_changes_nothing(b: Backend) {
    let cfg = SecretsConfig {
        max_value_len: 16,
        ..Default::default()
    };
    let (_f, s) = Fixture::with_config(b, cfg);
    let name = n("x");
    s.put(&ctx(), &name, b"ok", &PutOptions::default()).unwrap();
    assert!(matches!(
        s.put(&ctx(), &name, &[0u8; 17], &PutOptions::default()),
        Err(SecretsError::ValueTooLarge { len: 17, max: 16 })
    ));
    assert!(matches!(
        s.put(
            &ctx(),
            &name,
            b"y",
            &PutOptions {
                max_versions: Some(0),
                ..Default::default()
            }
        ),
        Err(SecretsError::InvalidArgument(_))
    ));
    assert!(matches!(
        get(&s, "x", Some(0)),
        Err(SecretsError::InvalidArgument(_))
    ));
    assert_eq!(s.describe(&name).unwrap().current_version, 1);
    assert_eq!(s.history(&name).unwrap().len(), 1);
}

/// Flip one byte of the stored ciphertext / wrapped DEK directly in sled:
/// the read fails with an integrity error, never garbage.
fn tamper_detection(b: Backend) {
    let cfg = SecretsConfig {
        cache_capacity: 0,
        ..Default::default()
    };
    let (f, s) = Fixture::with_config(b, cfg);
    s.put(&ctx(), &n("t/a"), b"secret-a", &PutOptions::default())
        .unwrap();
    s.put(&ctx(), &n("t/b"), b"secret-b", &PutOptions::default())
        .unwrap();
    drop(s);
    let db = common::open_sled(&f.store_path());
    let versions = db.open_tree("versions").unwrap();
    let key_a: Vec<u8> = [b"t/a".as_slice(), &[0], &1u64.to_be_bytes()].concat();
    let key_b: Vec<u8> = [b"t/b".as_slice(), &[0], &1u64.to_be_bytes()].concat();
    let rec_a = versions.get(&key_a).unwrap().unwrap().to_vec();
    let rec_b = versions.get(&key_b).unwrap().unwrap().to_vec();
    // 1. flip the last byte (inside the GCM tag of the value)
    let mut t = rec_a.clone();
    let last = t.len() - 1;
    t[last] ^= 0x01;
    versions.insert(&key_a, t).unwrap();
    // 2. move b's record to a new name: AAD/binding no longer match
    let key_c: Vec<u8> = [b"t/c".as_slice(), &[0], &1u64.to_be_bytes()].concat();
    versions.insert(&key_c, rec_b.clone()).unwrap();
    let secrets = db.open_tree("secrets").unwrap();
    let meta_b = secrets.get(b"t/b").unwrap().unwrap();
    secrets.insert(b"t/c", meta_b).unwrap();
    db.flush().unwrap();
    drop((versions, secrets, db));
    let s = f.reopen();
    assert!(
        matches!(get(&s, "t/a", None), Err(SecretsError::Integrity(_))),
        "{:?}",
        get(&s, "t/a", None)
    );
    assert!(
        matches!(get(&s, "t/c", None), Err(SecretsError::Integrity(_))),
        "{:?}",
        get(&s, "t/c", None)
    );
    assert_eq!(get(&s, "t/b", None).unwrap(), b"secret-b");
    drop(s);
    // 3. flip bytes of b's wrapped DEK, nonce and ciphertext, one at a time:
    //    each read fails with an integrity error, never garbage
    let db = common::open_sled(&f.store_path());
    let versions = db.open_tree("versions").unwrap();
    let rec: VersionRecord = decode("versions", &rec_b).unwrap();
    let sealed = rec.sealed.clone().unwrap();
    let mut variants = Vec::new();
    for i in (0..sealed.wrapped.blob.len()).step_by(5) {
        let mut r = rec.clone();
        r.sealed.as_mut().unwrap().wrapped.blob[i] ^= 0x80;
        variants.push(("wrapped DEK", i, r));
    }
    for i in 0..sealed.nonce.len() {
        let mut r = rec.clone();
        r.sealed.as_mut().unwrap().nonce[i] ^= 0x01;
        variants.push(("nonce", i, r));
    }
    for i in 0..sealed.ciphertext.len() {
        let mut r = rec.clone();
        r.sealed.as_mut().unwrap().ciphertext[i] ^= 0x01;
        variants.push(("ciphertext", i, r));
    }
    for (what, i, r) in variants {
        versions.insert(&key_b, encode(&r).unwrap()).unwrap();
        db.flush().unwrap();
        // a fresh SecretStore and root: cold cache, the wrapped DEK is unwrapped
        let store = Store::from_db(db.clone()).unwrap();
        let s = SecretStore::open(store, f.device.open_root(), f.cfg.clone()).unwrap();
        match get(&s, "t/b", None) {
            Err(SecretsError::Integrity(_)) => {}
            Ok(_) => panic!("flipped {what} byte {i}: read succeeded"),
            Err(e) => panic!("flipped {what} byte {i}: unexpected error {e:?}"),
        }
    }
}

fn cache_eviction_then_cold_read(b: Backend) {
    let cfg = SecretsConfig {
        cache_capacity: 2,
        cache_ttl: Duration::from_secs(60),
        ..Default::default()
    };
    let (_f, s) = Fixture::with_config(b, cfg);
    for i in 0..5 {
        s.put(
            &ctx(),
            &n(&format!("c/{i}")),
            format!("v{i}").as_bytes(),
            &PutOptions::default(),
        )
        .unwrap();
    }
    let calls = s.envelope().stats().root_calls;
    // c/4 is warm: no hardware call
    assert_eq!(get(&s, "c/4", None).unwrap(), b"v4");
    assert_eq!(
        s.envelope().stats().root_calls,
        calls,
        "warm read touched the root"
    );
    // c/0 was evicted: one unwrap
    assert_eq!(get(&s, "c/0", None).unwrap(), b"v0");
    assert_eq!(s.envelope().stats().root_calls, calls + 1);
    assert!(s.envelope().stats().evictions >= 3);
}

fn cache_ttl_zero_every_read_is_cold(b: Backend) {
    let cfg = SecretsConfig {
        cache_ttl: Duration::ZERO,
        ..Default::default()
    };
    let (_f, s) = Fixture::with_config(b, cfg);
    s.put(&ctx(), &n("ttl"), b"x", &PutOptions::default())
        .unwrap();
    let calls = s.envelope().stats().root_calls;
    get(&s, "ttl", None).unwrap();
    get(&s, "ttl", None).unwrap();
    assert_eq!(s.envelope().stats().root_calls, calls + 2);
}

/// Rotation with a crash injected half-way, then resumed in a new process
/// state (store and root reopened).
fn root_rotation_with_crash(b: Backend) {
    let (f, s) = Fixture::new(b);
    let mut expected = BTreeMap::new();
    for i in 0..20 {
        let name = format!("r/{i:02}");
        let val = format!("value-{i}").into_bytes();
        s.put(&ctx(), &n(&name), &val, &PutOptions::default())
            .unwrap();
        expected.insert(name, val);
    }
    let mut seen = 0;
    let out = s
        .rotate_root(&mut |p| {
            seen += 1;
            assert_eq!((p.from, p.to), (1, 2));
            if p.done == 10 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert!(matches!(out, RotationOutcome::Interrupted { to: 2, .. }));
    assert_eq!(seen, 10);
    // a write during the interrupted rotation goes under v2
    s.put(&ctx(), &n("r/new"), b"new", &PutOptions::default())
        .unwrap();
    expected.insert("r/new".into(), b"new".to_vec());
    drop(s);
    let s = f.reopen();
    assert_eq!(s.pending_rotation().unwrap(), Some(2));
    for (k, v) in &expected {
        assert_eq!(&get(&s, k, None).unwrap(), v, "{k} mid-rotation");
    }
    let mixed: Vec<Option<u32>> = s
        .history(&n("r/00"))
        .unwrap()
        .iter()
        .map(|h| h.root_version)
        .collect();
    assert_eq!(mixed, vec![Some(2)]);
    let late: Vec<Option<u32>> = s
        .history(&n("r/19"))
        .unwrap()
        .iter()
        .map(|h| h.root_version)
        .collect();
    assert_eq!(late, vec![Some(1)]);
    let out = s.rotate_root(&mut |_| ControlFlow::Continue(())).unwrap();
    assert!(
        matches!(out, RotationOutcome::Completed { from: 2, to: 2, .. }),
        "{out:?}"
    );
    assert_eq!(s.pending_rotation().unwrap(), None);
    assert!(!s.envelope().root().has_version(1).unwrap(), "v1 retired");
    drop(s);
    let s = f.reopen(); // cold cache: every read unwraps under v2
    for (k, v) in &expected {
        assert_eq!(&get(&s, k, None).unwrap(), v, "{k} after rotation");
        assert_eq!(s.history(&n(k)).unwrap()[0].root_version, Some(2));
    }
    // and a second rotation goes to v3
    let out = s.rotate_root(&mut |_| ControlFlow::Continue(())).unwrap();
    assert!(matches!(
        out,
        RotationOutcome::Completed { from: 2, to: 3, .. }
    ));
    assert!(!s.envelope().root().has_version(2).unwrap(), "v2 retired");
    assert!(s.envelope().root().has_version(3).unwrap(), "v3 active");
    // Each old version retired exactly once, in order.
    let st = s.store().root_state().unwrap().unwrap();
    assert_eq!(st.retired, vec![1, 2]);
}

fn concurrent_readers_and_writers(b: Backend) {
    let (_f, s) = Fixture::new(b);
    let s = Arc::new(s);
    let mut threads = Vec::new();
    for t in 0..6 {
        let s = s.clone();
        threads.push(std::thread::spawn(move || {
            for i in 0..25 {
                let name = n(&format!("conc/{}", i % 5));
                let val = format!("t{t}-i{i}");
                let v = s
                    .put(&ctx(), &name, val.as_bytes(), &PutOptions::default())
                    .unwrap();
                let got = s.get(&ctx(), &name, Some(v)).unwrap();
                assert_eq!(got.value.as_slice(), val.as_bytes());
                let _ = s.get(&ctx(), &name, None).unwrap();
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let total: u64 = (0..5)
        .map(|i| {
            s.describe(&n(&format!("conc/{i}")))
                .unwrap()
                .current_version
        })
        .sum();
    assert_eq!(total, 150, "no lost version numbers");
}

/// Reads and writes keep working while the rotation runs in another thread.
fn rotation_concurrent_with_writes(b: Backend) {
    let (_f, s) = Fixture::new(b);
    let s = Arc::new(s);
    for i in 0..30 {
        s.put(
            &ctx(),
            &n(&format!("rc/{i}")),
            b"before",
            &PutOptions::default(),
        )
        .unwrap();
    }
    let rot = {
        let s = s.clone();
        std::thread::spawn(move || s.rotate_root(&mut |_| ControlFlow::Continue(())).unwrap())
    };
    for i in 0..30 {
        s.put(
            &ctx(),
            &n(&format!("rc/{i}")),
            b"during",
            &PutOptions::default(),
        )
        .unwrap();
        assert_eq!(get(&s, &format!("rc/{i}"), Some(1)).unwrap(), b"before");
    }
    assert!(matches!(
        rot.join().unwrap(),
        RotationOutcome::Completed { to: 2, .. }
    ));
    for i in 0..30 {
        for h in s.history(&n(&format!("rc/{i}"))).unwrap() {
            assert_eq!(h.root_version, Some(2));
        }
    }
}

/// Daemon singletons (e.g. the API-key pepper) are sealed like secrets and
/// rewrapped by a root rotation; moving one to another name fails to open.
fn sealed_singletons_survive_rotation(b: Backend) {
    let (f, s) = Fixture::new(b);
    let made = s
        .open_or_create_value("apikey", "pepper", || {
            zeroize::Zeroizing::new(vec![7u8; 32])
        })
        .unwrap();
    let again = s
        .open_or_create_value("apikey", "pepper", || {
            zeroize::Zeroizing::new(vec![9u8; 32])
        })
        .unwrap();
    assert_eq!(made.as_slice(), again.as_slice(), "created once");
    let out = s.rotate_root(&mut |_| ControlFlow::Continue(())).unwrap();
    assert!(
        matches!(
            out,
            RotationOutcome::Completed {
                to: 2,
                rewrapped: 1,
                ..
            }
        ),
        "{out:?}"
    );
    drop(s);
    let s = f.reopen();
    assert_eq!(
        s.open_value("apikey", "pepper")
            .unwrap()
            .unwrap()
            .as_slice(),
        &[7u8; 32]
    );
    assert!(s.open_value("apikey", "other").unwrap().is_none());
    // a sealed blob copied under another name does not open there
    let raw = s.store().sealed.get(b"apikey\0pepper").unwrap().unwrap();
    s.store().sealed.insert(b"apikey\0copy", raw).unwrap();
    let cfg = SecretsConfig {
        cache_capacity: 0,
        ..Default::default()
    };
    drop(s);
    let root = f.device.open_root();
    let s = SecretStore::open(Store::open(&f.store_path()).unwrap(), root, cfg).unwrap();
    assert!(matches!(
        s.open_value("apikey", "copy"),
        Err(SecretsError::Integrity(_))
    ));
}

both_backends!(
    sealed_singletons_survive_rotation,
    round_trip_and_versions,
    cas_conflicts,
    delete_undelete_destroy,
    max_versions_pruning,
    list_by_prefix_with_paging,
    bad_input_changes_nothing,
    tamper_detection,
    cache_eviction_then_cold_read,
    cache_ttl_zero_every_read_is_cold,
    root_rotation_with_crash,
    concurrent_readers_and_writers,
    rotation_concurrent_with_writes,
);

#[test]
fn store_with_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = common::open_sled(dir.path());
        db.open_tree("meta")
            .unwrap()
            .insert(b"schema", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    // sled's background flusher may hold the lock file for a moment after
    // the handle is dropped: retry while it says "locked".
    let mut opened = Store::open(dir.path());
    for _ in 0..100 {
        match &opened {
            Err(StoreError::Open { reason, .. }) if reason.contains("locked") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                opened = Store::open(dir.path());
            }
            _ => break,
        }
    }
    match opened {
        Err(e @ StoreError::SchemaTooNew { found: 99, .. }) => {
            assert!(e.to_string().contains("upgrade keyseal"))
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("accepted a newer schema"),
    }
}
