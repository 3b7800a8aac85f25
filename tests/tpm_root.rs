//! TPM backend against a real swtpm (one per test).

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use keyseal::root::tpm::{TpmConfig, TpmRoot};
use keyseal::root::{Dek, RootError, RootOfTrust, SignAlg, WrappedDek};
use keyseal::testkit::Swtpm;
use zeroize::Zeroizing;

fn cfg(tpm: &Swtpm) -> TpmConfig {
    TpmConfig {
        tcti: tpm.tcti(),
        auth_value: None,
        pcrs: vec![],
    }
}

fn open(cfg: &TpmConfig) -> TpmRoot {
    TpmRoot::open(cfg).expect("open TpmRoot on swtpm")
}

fn started() -> (Swtpm, TpmRoot) {
    let tpm = Swtpm::start().expect("start swtpm");
    let root = open(&cfg(&tpm));
    root.create_version(1).expect("create v1");
    (tpm, root)
}

#[track_caller]
fn assert_integrity<T: std::fmt::Debug>(r: Result<T, RootError>) {
    match r {
        Err(RootError::Integrity(_)) => {}
        other => panic!("expected Integrity, got {other:?}"),
    }
}

/// Runs a tpm2-tools command against the swtpm (the swtpm TCTI connects per
/// command, so this works while a TpmRoot is open).
fn tpm2_tool(tpm: &Swtpm, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .output()
        .expect("run tpm2-tools");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn wrap_unwrap_round_trip() {
    let (_tpm, root) = started();
    assert!(root.has_version(1).unwrap());
    let dek = Dek::generate();
    let w = root.wrap(1, &dek, b"dek-1").unwrap();
    assert_eq!(w.root_version, 1);
    let back = root.unwrap(&w, b"dek-1").unwrap();
    assert_eq!(back.expose(), dek.expose());
    // Each wrap is a fresh object: different blobs for the same DEK.
    let w2 = root.wrap(1, &dek, b"dek-1").unwrap();
    assert_ne!(w.blob, w2.blob);
    assert_eq!(root.unwrap(&w2, b"dek-1").unwrap().expose(), dek.expose());
}

#[test]
fn blob_survives_a_new_connection() {
    let tpm = Swtpm::start().unwrap();
    let dek = Dek::generate();
    let w = {
        let root = open(&cfg(&tpm));
        root.create_version(1).unwrap();
        root.wrap(1, &dek, b"id").unwrap()
    };
    // Primaries are re-derived from the owner seed: nothing was persisted.
    let root = open(&cfg(&tpm));
    assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());
}

#[test]
fn wrong_binding_is_integrity() {
    let (_tpm, root) = started();
    let w = root.wrap(1, &Dek::generate(), b"dek-1").unwrap();
    assert_integrity(root.unwrap(&w, b"dek-2"));
    assert_integrity(root.unwrap(&w, b""));
}

#[test]
fn every_flipped_byte_is_integrity() {
    let (_tpm, root) = started();
    let dek = Dek::generate();
    let w = root.wrap(1, &dek, b"dek-1").unwrap();
    let mut by_tpm = 0;
    let mut by_parser = 0;
    for i in 0..w.blob.len() {
        for mask in [0x01u8, 0x80] {
            let mut bad = w.clone();
            bad.blob[i] ^= mask;
            match root.unwrap(&bad, b"dek-1") {
                Err(RootError::Integrity(m)) if m.contains("TPM refused") => by_tpm += 1,
                Err(RootError::Integrity(_)) => by_parser += 1,
                other => panic!("byte {i} ^ {mask:#x}: expected Integrity, got {other:?}"),
            }
        }
    }
    eprintln!(
        "{} byte flips: {by_tpm} refused by the TPM, {by_parser} by the parser",
        2 * w.blob.len()
    );
    // Most of the blob is the TPM's encrypted, HMAC'd private area.
    assert!(by_tpm > w.blob.len() / 2, "{by_tpm} / {by_parser}");
    // The connection is still healthy afterwards (loaded objects flushed).
    assert_eq!(root.unwrap(&w, b"dek-1").unwrap().expose(), dek.expose());
}

#[test]
fn truncated_and_extended_blobs_are_integrity() {
    let (_tpm, root) = started();
    let w = root.wrap(1, &Dek::generate(), b"x").unwrap();
    for len in 0..w.blob.len() {
        let bad = WrappedDek {
            root_version: 1,
            blob: w.blob[..len].to_vec(),
        };
        assert_integrity(root.unwrap(&bad, b"x"));
    }
    let mut longer = w.clone();
    longer.blob.push(0);
    assert_integrity(root.unwrap(&longer, b"x"));
    assert_integrity(root.unwrap(
        &WrappedDek {
            root_version: 1,
            blob: vec![0xff; 300],
        },
        b"x",
    ));
}

#[test]
fn versions_and_retirement() {
    let (_tpm, root) = started();
    root.create_version(2).unwrap();
    let d1 = Dek::generate();
    let d2 = Dek::generate();
    let w1 = root.wrap(1, &d1, b"a").unwrap();
    let w2 = root.wrap(2, &d2, b"b").unwrap();
    assert_eq!(w1.root_version, 1);
    assert_eq!(w2.root_version, 2);
    assert_eq!(root.unwrap(&w1, b"a").unwrap().expose(), d1.expose());
    assert_eq!(root.unwrap(&w2, b"b").unwrap().expose(), d2.expose());

    // A blob presented as another version's does not load.
    let moved = WrappedDek {
        root_version: 2,
        blob: w1.blob.clone(),
    };
    assert_integrity(root.unwrap(&moved, b"a"));

    root.retire_version(1).unwrap();
    assert!(!root.has_version(1).unwrap());
    assert!(root.has_version(2).unwrap());
    match root.unwrap(&w1, b"a") {
        Err(RootError::NotInitialised(m)) => assert!(m.contains("version 1"), "{m}"),
        other => panic!("expected NotInitialised, got {other:?}"),
    }
    match root.wrap(1, &d1, b"a") {
        Err(RootError::NotInitialised(m)) => assert!(m.contains("version 1"), "{m}"),
        other => panic!("expected NotInitialised, got {other:?}"),
    }
    assert!(root.create_version(1).is_err());
    assert_eq!(root.unwrap(&w2, b"b").unwrap().expose(), d2.expose());
    assert!(!root.has_version(0).unwrap());
    assert!(root.wrap(0, &d1, b"a").is_err());
}

#[test]
fn many_versions_exceed_object_slots() {
    // swtpm (libtpms) has 3 transient object slots and no resource manager:
    // the primary cache must evict and re-derive.
    let (_tpm, root) = started();
    let mut wrapped = Vec::new();
    for v in 1..=5u32 {
        root.create_version(v).unwrap();
        let d = Dek::generate();
        let w = root.wrap(v, &d, format!("k{v}").as_bytes()).unwrap();
        wrapped.push((d, w));
    }
    let key = root
        .create_signing_key("s", SignAlg::EcdsaP256Sha256)
        .unwrap();
    for _ in 0..3 {
        for (i, (d, w)) in wrapped.iter().enumerate() {
            let id = format!("k{}", i + 1);
            assert_eq!(root.unwrap(w, id.as_bytes()).unwrap().expose(), d.expose());
            root.sign(&key, b"m").unwrap();
        }
    }
}

#[test]
fn auth_value() {
    let tpm = Swtpm::start().unwrap();
    let mut c = cfg(&tpm);
    c.auth_value = Some(Zeroizing::new(b"s3cret-auth".to_vec()));
    let dek = Dek::generate();
    let (w, key) = {
        let root = open(&c);
        root.create_version(1).unwrap();
        let w = root.wrap(1, &dek, b"id").unwrap();
        assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());
        let key = root
            .create_signing_key("k", SignAlg::EcdsaP256Sha256)
            .unwrap();
        root.sign(&key, b"msg").unwrap();
        (w, key)
    };
    // Without the auth value configured: refused before asking the TPM.
    {
        let root = open(&cfg(&tpm));
        assert!(matches!(root.unwrap(&w, b"id"), Err(RootError::Auth(_))));
        assert!(matches!(root.sign(&key, b"msg"), Err(RootError::Auth(_))));
    }
    // A wrong auth value: the TPM refuses (and counts a DA failure).
    {
        let mut wrong = c.clone();
        wrong.auth_value = Some(Zeroizing::new(b"wrong".to_vec()));
        let root = open(&wrong);
        match root.unwrap(&w, b"id") {
            Err(RootError::Auth(m)) => assert!(m.contains("auth_value"), "{m}"),
            other => panic!("expected Auth, got {other:?}"),
        }
    }
    let root = open(&c);
    assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());
}

#[test]
fn config_debug_masks_auth_value() {
    let c = TpmConfig {
        tcti: "swtpm:host=127.0.0.1,port=1".into(),
        auth_value: Some(Zeroizing::new(b"topsecret".to_vec())),
        pcrs: vec![],
    };
    assert!(!format!("{c:?}").contains("topsecret"));
}

fn pcr_binding(auth: bool) {
    let tpm = Swtpm::start().unwrap();
    let mut c = cfg(&tpm);
    c.pcrs = vec![7, 16];
    if auth {
        c.auth_value = Some(Zeroizing::new(b"pcr-and-auth".to_vec()));
    }
    let dek = Dek::generate();
    let (w, plain) = {
        let root = open(&c);
        root.create_version(1).unwrap();
        let w = root.wrap(1, &dek, b"id").unwrap();
        assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());
        // A blob without PCR binding from the same TPM, for comparison.
        let plain_root_cfg = TpmConfig {
            pcrs: vec![],
            ..c.clone()
        };
        drop(root);
        let plain_root = open(&plain_root_cfg);
        let plain = plain_root.wrap(1, &dek, b"id").unwrap();
        (w, plain)
    };
    // Still fine from a new connection; the blob carries its PCR selection,
    // so a root configured without pcrs unseals it too.
    {
        let no_pcr_cfg = TpmConfig {
            pcrs: vec![],
            ..c.clone()
        };
        let root = open(&no_pcr_cfg);
        assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());
    }
    tpm2_tool(
        &tpm,
        &[
            "tpm2_pcrextend",
            "7:sha256=0000000000000000000000000000000000000000000000000000000000000001",
        ],
    );
    let root = open(&c);
    match root.unwrap(&w, b"id") {
        Err(RootError::Integrity(m)) => assert!(m.contains("PCR"), "{m}"),
        other => panic!("expected a PCR policy failure, got {other:?}"),
    }
    // The unbound blob is unaffected; new wraps bind to the new values.
    assert_eq!(root.unwrap(&plain, b"id").unwrap().expose(), dek.expose());
    let w2 = root.wrap(1, &dek, b"id").unwrap();
    assert_eq!(root.unwrap(&w2, b"id").unwrap().expose(), dek.expose());
}

#[test]
fn pcr_binding_without_auth() {
    pcr_binding(false);
}

#[test]
fn pcr_binding_with_auth() {
    pcr_binding(true);
}

#[test]
fn bad_pcr_index_is_config_error() {
    let tpm = Swtpm::start().unwrap();
    let mut c = cfg(&tpm);
    c.pcrs = vec![24];
    assert!(matches!(TpmRoot::open(&c), Err(RootError::Config(_))));
}

#[test]
fn sign_and_verify_with_openssl() {
    let (_tpm, root) = started();
    let key = root
        .create_signing_key("signer", SignAlg::EcdsaP256Sha256)
        .unwrap();
    let spki = root.public_key_spki(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&spki);
    let pem = format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n");
    std::fs::write(dir.path().join("pub.pem"), pem).unwrap();
    for (i, msg) in [&b"hello keyseal"[..], b"", &[0xa5u8; 10_000][..]]
        .iter()
        .enumerate()
    {
        let sig = root.sign(&key, msg).unwrap();
        let msg_path = dir.path().join(format!("msg{i}"));
        let sig_path = dir.path().join(format!("sig{i}.der"));
        std::fs::write(&msg_path, msg).unwrap();
        std::fs::write(&sig_path, &sig).unwrap();
        let out = Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(dir.path().join("pub.pem"))
            .arg("-signature")
            .arg(&sig_path)
            .arg(&msg_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl verify failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // And a different message does not verify.
        std::fs::write(&msg_path, b"tampered").unwrap();
        let out = Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(dir.path().join("pub.pem"))
            .arg("-signature")
            .arg(&sig_path)
            .arg(&msg_path)
            .output()
            .unwrap();
        assert!(!out.status.success());
    }
    // Signing keys do not depend on root versions.
    root.retire_version(1).unwrap();
    root.sign(&key, b"still works").unwrap();
    root.destroy_signing_key(&key).unwrap();

    // A corrupted key reference is an integrity error, not a panic.
    let mut bad = key.clone();
    let n = bad.handle.len();
    bad.handle[n - 5] ^= 1;
    assert_integrity(root.sign(&bad, b"x"));
    bad.handle.truncate(10);
    assert_integrity(root.sign(&bad, b"x"));
    assert_integrity(root.public_key_spki(&bad));
}

#[test]
fn concurrent_wrap_unwrap() {
    let (_tpm, root) = started();
    root.create_version(2).unwrap();
    let root = Arc::new(root);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let root = Arc::clone(&root);
            std::thread::spawn(move || {
                for i in 0..50 {
                    let v = 1 + (t + i) % 2;
                    let id = format!("t{t}-{i}");
                    let dek = Dek::generate();
                    let w = root.wrap(v, &dek, id.as_bytes()).unwrap();
                    let back = root.unwrap(&w, id.as_bytes()).unwrap();
                    assert_eq!(back.expose(), dek.expose());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn unreachable_tpm_is_unavailable() {
    // A port with nothing listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = TpmConfig {
        tcti: format!("swtpm:host=127.0.0.1,port={port}"),
        auth_value: None,
        pcrs: vec![],
    };
    match TpmRoot::open(&c) {
        Err(RootError::Unavailable(m)) => {
            assert!(m.contains("tcti"), "{m}");
            assert!(m.contains(&port.to_string()), "{m}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn reconnects_after_swtpm_restart() {
    let (mut tpm, root) = started();
    let dek = Dek::generate();
    let w = root.wrap(1, &dek, b"id").unwrap();
    // Restarted between two calls: the next call finds its connection
    // stale, reconnects and retries once, so it succeeds.
    tpm.restart().unwrap();
    assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());

    // While it is down every call fails fast with Unavailable, and it
    // recovers once it is back.
    tpm.kill();
    for _ in 0..3 {
        assert!(matches!(
            root.wrap(1, &dek, b"id"),
            Err(RootError::Unavailable(_))
        ));
    }
    tpm.restart().unwrap();
    assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());
    let key = root
        .create_signing_key("k", SignAlg::EcdsaP256Sha256)
        .unwrap();
    root.sign(&key, b"m").unwrap();
}

#[test]
fn unwrap_latency() {
    let (_tpm, root) = started();
    let dek = Dek::generate();
    let w = root.wrap(1, &dek, b"id").unwrap();
    root.unwrap(&w, b"id").unwrap(); // warm: primary derived
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        root.unwrap(&w, b"id").unwrap();
    }
    let unwrap_ms = t.elapsed().as_secs_f64() * 1000.0 / f64::from(n);
    let t = Instant::now();
    for _ in 0..50 {
        root.wrap(1, &dek, b"id").unwrap();
    }
    let wrap_ms = t.elapsed().as_secs_f64() * 1000.0 / 50.0;
    let key = root
        .create_signing_key("k", SignAlg::EcdsaP256Sha256)
        .unwrap();
    root.sign(&key, b"m").unwrap();
    let t = Instant::now();
    for _ in 0..50 {
        root.sign(&key, b"m").unwrap();
    }
    let sign_ms = t.elapsed().as_secs_f64() * 1000.0 / 50.0;
    drop(root);
    let t = Instant::now();
    let fresh = open(&cfg(&_tpm));
    fresh.unwrap(&w, b"id").unwrap();
    let cold_ms = t.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "swtpm latency: unwrap {unwrap_ms:.2} ms, wrap {wrap_ms:.2} ms, sign {sign_ms:.2} ms, open+first unwrap (primary derivation) {cold_ms:.1} ms"
    );
}

#[test]
fn recovers_object_slots_leaked_by_a_dead_client() {
    let tpm = Swtpm::start().unwrap();
    let dek = Dek::generate();
    // A client that "crashes" with primaries loaded: swtpm has no resource
    // manager, so they keep 2 of its 3 object slots.
    let (w, key) = {
        let dead = open(&cfg(&tpm));
        dead.create_version(1).unwrap();
        let w = dead.wrap(1, &dek, b"id").unwrap();
        let key = dead
            .create_signing_key("k", SignAlg::EcdsaP256Sha256)
            .unwrap();
        std::mem::forget(dead);
        (w, key)
    };
    let root = open(&cfg(&tpm));
    assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());
    root.sign(&key, b"m").unwrap();
    root.create_version(2).unwrap();
    let w2 = root.wrap(2, &dek, b"id2").unwrap();
    assert_eq!(root.unwrap(&w2, b"id2").unwrap().expose(), dek.expose());
}

/// The first call after a crashed keyseald is a wrap (a put, a rotation's
/// rewrap) or a signing-key creation: TPM2_Create needs a free object slot
/// for the object it builds, and the dead client's primaries hold two of
/// the three. Found by `tests/crash_harness.rs` (SIGKILL under load): every
/// put failed with "no free object slots" until something loaded a blob.
#[test]
fn create_after_a_dead_client_frees_object_slots() {
    let tpm = Swtpm::start().unwrap();
    let dead_client = |tpm: &Swtpm| {
        let dead = open(&cfg(tpm));
        if !dead.has_version(1).unwrap() {
            dead.create_version(1).unwrap();
        }
        let w = dead.wrap(1, &Dek::generate(), b"id").unwrap();
        let key = dead
            .create_signing_key("k", SignAlg::EcdsaP256Sha256)
            .unwrap();
        dead.sign(&key, b"m").unwrap();
        std::mem::forget(dead);
        w
    };
    dead_client(&tpm);
    let dek = Dek::generate();
    let root = open(&cfg(&tpm));
    let w = root.wrap(1, &dek, b"first").unwrap();
    assert_eq!(root.unwrap(&w, b"first").unwrap().expose(), dek.expose());
    drop(root);
    dead_client(&tpm);
    let root = open(&cfg(&tpm));
    let key = root
        .create_signing_key("k2", SignAlg::EcdsaP256Sha256)
        .unwrap();
    root.sign(&key, b"m").unwrap();
}

#[test]
fn objects_flushed_behind_our_back() {
    let (tpm, root) = started();
    let dek = Dek::generate();
    let w = root.wrap(1, &dek, b"id").unwrap();
    // Another client flushes every transient object (our cached primary).
    tpm2_tool(&tpm, &["tpm2_flushcontext", "--transient-object"]);
    // The call notices the primary is gone, reconnects (re-deriving it)
    // and retries once.
    assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());
    for _ in 0..2 {
        tpm2_tool(&tpm, &["tpm2_flushcontext", "--transient-object"]);
        assert_eq!(root.unwrap(&w, b"id").unwrap().expose(), dek.expose());
        root.wrap(1, &dek, b"id").unwrap();
    }
}
