//! Signing matrix: every (backend × algorithm) on real SoftHSM2 and real
//! swtpm. Each signature — from `sign(message)` and, where the algorithm
//! allows it, `sign_digest(sha256(message))` — must verify with stock
//! `openssl` against the exported SubjectPublicKeyInfo, and must not verify
//! for a modified message. Unsupported combinations must say
//! `RootError::Unsupported` naming the algorithm. Timings are printed
//! (`cargo nextest run --test signing_matrix --no-capture`).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::Engine as _;
use keyseal::root::pkcs11::Pkcs11Root;
use keyseal::root::tpm::{TpmConfig, TpmRoot};
use keyseal::root::{RootError, RootOfTrust, SignAlg, SigningKeyRef};
use keyseal::testkit::Swtpm;
use keyseal::testkit_hsm::SoftHsm;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Pkcs11,
    Tpm,
}

/// The emulator behind a root; kept alive for the test.
enum Device {
    Hsm(SoftHsm),
    /// Only held so that swtpm lives (and is killed on drop).
    Tpm(#[allow(dead_code)] Swtpm),
}

impl Device {
    fn start(b: Backend) -> (Device, Box<dyn RootOfTrust>) {
        match b {
            Backend::Pkcs11 => {
                let hsm = SoftHsm::new().expect("SoftHSM2 token");
                let root = Pkcs11Root::open(&hsm.config()).expect("open Pkcs11Root");
                (Device::Hsm(hsm), Box::new(root))
            }
            Backend::Tpm => {
                let tpm = Swtpm::start().expect("start swtpm");
                let root = TpmRoot::open(&TpmConfig {
                    tcti: tpm.tcti(),
                    auth_value: None,
                    pcrs: vec![],
                })
                .expect("open TpmRoot");
                (Device::Tpm(tpm), Box::new(root))
            }
        }
    }
}

const MESSAGE: &[u8] = b"keyseal signing matrix: checkpoint 42\n";
const MODIFIED: &[u8] = b"keyseal signing matrix: checkpoint 43\n";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// PEM of a DER SubjectPublicKeyInfo.
fn pem(spki: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(spki);
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    out
}

fn openssl(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Verifies `sig` over the file `msg` in `dir` with stock openssl and
/// `pub.pem`, the way a third party would for `alg`.
fn openssl_verify(dir: &Path, alg: SignAlg, msg: &str, sig: &[u8]) -> Output {
    std::fs::write(dir.join("sig"), sig).unwrap();
    match alg {
        SignAlg::EcdsaP256Sha256 => openssl(
            dir,
            &[
                "dgst",
                "-sha256",
                "-verify",
                "pub.pem",
                "-signature",
                "sig",
                msg,
            ],
        ),
        SignAlg::RsaPss3072Sha256 => openssl(
            dir,
            &[
                "dgst",
                "-sha256",
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:32",
                "-sigopt",
                "rsa_mgf1_md:sha256",
                "-verify",
                "pub.pem",
                "-signature",
                "sig",
                msg,
            ],
        ),
        SignAlg::Ed25519 => openssl(
            dir,
            &[
                "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-in", msg,
                "-sigfile", "sig",
            ],
        ),
    }
}

/// `sig` verifies over MESSAGE and does not over MODIFIED.
fn assert_verifies(dir: &Path, alg: SignAlg, what: &str, sig: &[u8]) {
    let ok = openssl_verify(dir, alg, "msg", sig);
    assert!(
        ok.status.success()
            && (text(&ok).contains("Verified OK")
                || text(&ok).contains("Signature Verified Successfully")),
        "{what}: openssl did not verify the {} signature: {}",
        alg.as_str(),
        text(&ok)
    );
    let bad = openssl_verify(dir, alg, "modified", sig);
    assert!(
        !bad.status.success(),
        "{what}: a {} signature verified over a modified message: {}",
        alg.as_str(),
        text(&bad)
    );
    // A signature with one bit flipped fails too.
    let mut flipped = sig.to_vec();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let bad = openssl_verify(dir, alg, "msg", &flipped);
    assert!(
        !bad.status.success(),
        "{what}: a corrupted {} signature verified: {}",
        alg.as_str(),
        text(&bad)
    );
}

/// The phrase `openssl pkey -text` prints for the key of `alg`.
fn openssl_key_text(alg: SignAlg) -> &'static [&'static str] {
    match alg {
        SignAlg::EcdsaP256Sha256 => &["Public-Key: (256 bit)", "prime256v1"],
        SignAlg::Ed25519 => &["ED25519 Public-Key"],
        SignAlg::RsaPss3072Sha256 => &["Public-Key: (3072 bit)", "Exponent: 65537"],
    }
}

fn expected_sig_len(alg: SignAlg) -> Option<usize> {
    match alg {
        SignAlg::EcdsaP256Sha256 => None, // DER, 70..=72 bytes
        SignAlg::Ed25519 => Some(64),
        SignAlg::RsaPss3072Sha256 => Some(384),
    }
}

fn assert_unsupported<T: std::fmt::Debug>(res: Result<T, RootError>, alg: SignAlg, what: &str) {
    match res {
        Err(RootError::Unsupported(m)) => assert!(
            m.contains(alg.as_str()),
            "{what}: the Unsupported message does not name {}: {m}",
            alg.as_str()
        ),
        other => panic!("{what}: expected RootError::Unsupported, got {other:?}"),
    }
}

/// Whether `backend` supports keys of `alg` at all.
fn supported(backend: Backend, alg: SignAlg) -> bool {
    !(backend == Backend::Tpm && alg == SignAlg::Ed25519)
}

/// Timed signatures: mean over `n` calls.
fn time_sign(n: u32, mut f: impl FnMut() -> Vec<u8>) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    ms(t.elapsed()) / f64::from(n)
}

fn matrix(backend: Backend, alg: SignAlg) {
    let (device, root) = Device::start(backend);
    let tag = format!("{backend:?}/{}", alg.as_str());
    if !supported(backend, alg) {
        assert_unsupported(
            root.create_signing_key("matrix", alg),
            alg,
            &format!("{tag} create_signing_key"),
        );
        // A forged reference of that algorithm is refused the same way.
        let forged = SigningKeyRef {
            alg,
            handle: b"matrix".to_vec(),
        };
        assert_unsupported(root.sign(&forged, MESSAGE), alg, &format!("{tag} sign"));
        assert_unsupported(
            root.sign_digest(&forged, &Sha256::digest(MESSAGE)),
            alg,
            &format!("{tag} sign_digest"),
        );
        assert_unsupported(
            root.public_key_spki(&forged),
            alg,
            &format!("{tag} public_key_spki"),
        );
        return;
    }

    let t = Instant::now();
    let key = root
        .create_signing_key("matrix", alg)
        .unwrap_or_else(|e| panic!("{tag}: create_signing_key: {e}"));
    let keygen = ms(t.elapsed());
    assert_eq!(key.alg, alg);

    let dir = tempfile::tempdir().unwrap();
    let spki = root.public_key_spki(&key).unwrap();
    std::fs::write(dir.path().join("pub.der"), &spki).unwrap();
    std::fs::write(dir.path().join("pub.pem"), pem(&spki)).unwrap();
    std::fs::write(dir.path().join("msg"), MESSAGE).unwrap();
    std::fs::write(dir.path().join("modified"), MODIFIED).unwrap();

    // openssl parses the DER SPKI as the right kind of key, and the PEM we
    // wrote is the same key.
    let parsed = openssl(
        dir.path(),
        &[
            "pkey", "-pubin", "-inform", "DER", "-in", "pub.der", "-text", "-noout",
        ],
    );
    assert!(parsed.status.success(), "{tag}: {}", text(&parsed));
    for phrase in openssl_key_text(alg) {
        assert!(
            text(&parsed).contains(phrase),
            "{tag}: openssl does not see '{phrase}' in the SPKI: {}",
            text(&parsed)
        );
    }
    let reencoded = openssl(
        dir.path(),
        &["pkey", "-pubin", "-in", "pub.pem", "-outform", "DER"],
    );
    assert!(reencoded.status.success(), "{tag}: {}", text(&reencoded));
    assert_eq!(
        reencoded.stdout, spki,
        "{tag}: the SPKI is not canonical DER"
    );

    // sign(message)
    let sig = root.sign(&key, MESSAGE).unwrap();
    if let Some(len) = expected_sig_len(alg) {
        assert_eq!(sig.len(), len, "{tag}: signature length");
    }
    assert_verifies(dir.path(), alg, &format!("{tag} sign"), &sig);

    // sign_digest(sha256(message))
    let digest = Sha256::digest(MESSAGE);
    let sign_digest_ms = if alg == SignAlg::Ed25519 {
        assert_unsupported(
            root.sign_digest(&key, &digest),
            alg,
            &format!("{tag} sign_digest"),
        );
        None
    } else {
        let sig = root.sign_digest(&key, &digest).unwrap();
        if let Some(len) = expected_sig_len(alg) {
            assert_eq!(sig.len(), len, "{tag}: signature length");
        }
        assert_verifies(dir.path(), alg, &format!("{tag} sign_digest"), &sig);
        assert!(
            matches!(
                root.sign_digest(&key, &digest[..31]),
                Err(RootError::Config(_))
            ),
            "{tag}: a 31-byte digest was accepted"
        );
        Some(time_sign(10, || root.sign_digest(&key, &digest).unwrap()))
    };

    let sign_ms = time_sign(10, || root.sign(&key, MESSAGE).unwrap());
    eprintln!(
        "[timing] {backend:?} {:<13} keygen {keygen:8.1} ms | sign {sign_ms:7.2} ms | sign_digest {}",
        alg.as_str(),
        sign_digest_ms.map_or_else(|| "unsupported".to_owned(), |v| format!("{v:7.2} ms"))
    );

    // A reference that names another algorithm than the key has is refused,
    // not turned into a wrong signature.
    for other in [
        SignAlg::EcdsaP256Sha256,
        SignAlg::Ed25519,
        SignAlg::RsaPss3072Sha256,
    ] {
        if other == alg || !supported(backend, other) {
            continue;
        }
        let wrong = SigningKeyRef {
            alg: other,
            handle: key.handle.clone(),
        };
        let signed = root.sign(&wrong, MESSAGE);
        assert!(
            matches!(signed, Err(RootError::Integrity(_))),
            "{tag}: signing through a {} reference: {signed:?}",
            other.as_str()
        );
        let exported = root.public_key_spki(&wrong);
        assert!(
            matches!(exported, Err(RootError::Integrity(_))),
            "{tag}: exporting through a {} reference: {exported:?}",
            other.as_str()
        );
    }

    if let Device::Hsm(hsm) = &device {
        assert_private_key_is_sign_only(hsm, alg);
    }

    root.destroy_signing_key(&key).unwrap();
    if backend == Backend::Pkcs11 {
        assert!(
            root.sign(&key, MESSAGE).is_err(),
            "{tag}: signing still works after destroy"
        );
        assert!(root.public_key_spki(&key).is_err());
        // The label is free again.
        let again = root.create_signing_key("matrix", alg).unwrap();
        root.destroy_signing_key(&again).unwrap();
    }
}

/// An independent client (OpenSC's pkcs11-tool) sees the private key as
/// sensitive, never extractable and usable for signing only.
fn assert_private_key_is_sign_only(hsm: &SoftHsm, alg: SignAlg) {
    let out = Command::new("pkcs11-tool")
        .args(["--module"])
        .arg(&hsm.module)
        .args([
            "--token-label",
            &hsm.token_label,
            "--login",
            "--pin",
            &hsm.pin,
            "--list-objects",
            "--type",
            "privkey",
        ])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    let listing = text(&out);
    assert!(out.status.success(), "{listing}");
    assert!(listing.contains("label:      matrix"), "{listing}");
    let kind = match alg {
        SignAlg::EcdsaP256Sha256 => "EC",
        SignAlg::Ed25519 => "EC_EDWARDS",
        SignAlg::RsaPss3072Sha256 => "RSA",
    };
    assert!(
        listing.contains(&format!("Private Key Object; {kind}")),
        "{listing}"
    );
    let usage = listing
        .lines()
        .find(|l| l.trim_start().starts_with("Usage:"))
        .unwrap_or_default();
    assert_eq!(usage.trim(), "Usage:      sign", "{listing}");
    assert!(
        listing.contains("sensitive") && listing.contains("never extractable"),
        "{listing}"
    );
}

/// Measures key generation spread (RSA prime generation varies a lot) and
/// signing, for every supported algorithm on `backend`.
fn timing(backend: Backend) {
    const KEYS: usize = 5;
    const SIGNS: u32 = 50;
    let (_device, root) = Device::start(backend);
    for alg in [
        SignAlg::EcdsaP256Sha256,
        SignAlg::Ed25519,
        SignAlg::RsaPss3072Sha256,
    ] {
        if !supported(backend, alg) {
            eprintln!("[timing] {backend:?} {:<13} unsupported", alg.as_str());
            continue;
        }
        let mut gen = Vec::new();
        let mut keys = Vec::new();
        for i in 0..KEYS {
            let t = Instant::now();
            keys.push(
                root.create_signing_key(&format!("timing-{}-{i}", alg.as_str()), alg)
                    .unwrap(),
            );
            gen.push(ms(t.elapsed()));
        }
        gen.sort_by(f64::total_cmp);
        let key = &keys[0];
        let sign_ms = time_sign(SIGNS, || root.sign(key, MESSAGE).unwrap());
        let digest = Sha256::digest(MESSAGE);
        let digest_ms = (alg != SignAlg::Ed25519)
            .then(|| time_sign(SIGNS, || root.sign_digest(key, &digest).unwrap()));
        eprintln!(
            "[timing] {backend:?} {:<13} keygen over {KEYS} keys: min {:.1} / median {:.1} / max {:.1} ms | sign {sign_ms:.2} ms | sign_digest {} (mean of {SIGNS})",
            alg.as_str(),
            gen[0],
            gen[KEYS / 2],
            gen[KEYS - 1],
            digest_ms.map_or_else(|| "unsupported".to_owned(), |v| format!("{v:.2} ms"))
        );
        for k in &keys {
            root.destroy_signing_key(k).unwrap();
        }
    }
}

macro_rules! matrix_tests {
    ($($name:ident: $backend:expr, $alg:expr;)*) => {
        $(
            #[test]
            fn $name() {
                matrix($backend, $alg);
            }
        )*
    };
}

matrix_tests! {
    pkcs11_ecdsa_p256: Backend::Pkcs11, SignAlg::EcdsaP256Sha256;
    pkcs11_ed25519: Backend::Pkcs11, SignAlg::Ed25519;
    pkcs11_rsa_pss_3072: Backend::Pkcs11, SignAlg::RsaPss3072Sha256;
    tpm_ecdsa_p256: Backend::Tpm, SignAlg::EcdsaP256Sha256;
    tpm_ed25519_is_unsupported: Backend::Tpm, SignAlg::Ed25519;
    tpm_rsa_pss_3072: Backend::Tpm, SignAlg::RsaPss3072Sha256;
}

#[test]
fn pkcs11_timing() {
    timing(Backend::Pkcs11);
}

#[test]
fn tpm_timing() {
    timing(Backend::Tpm);
}
