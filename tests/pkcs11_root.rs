//! The PKCS#11 backend on a real SoftHSM2 token: faults name their fix,
//! PIN files are checked, signatures verify with stock openssl.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use keyseal::root::pkcs11::{read_pin_file, Pkcs11Config, Pkcs11Root};
use keyseal::root::{Dek, RootError, RootOfTrust, SignAlg};
use keyseal::testkit_hsm::SoftHsm;
use zeroize::Zeroizing;

#[test]
fn wrap_unwrap_binding_and_versions() {
    let hsm = SoftHsm::new().unwrap();
    let root = Pkcs11Root::open(&hsm.config()).unwrap();
    assert!(!root.has_version(1).unwrap());
    assert!(matches!(
        root.wrap(1, &Dek::generate(), b"id"),
        Err(RootError::NotInitialised(_))
    ));
    root.create_version(1).unwrap();
    assert!(
        root.create_version(1).is_err(),
        "creating an existing version must fail"
    );
    let dek = Dek::generate();
    let w = root.wrap(1, &dek, b"secret/a/1").unwrap();
    assert_eq!(w.root_version, 1);
    assert_eq!(
        root.unwrap(&w, b"secret/a/1").unwrap().expose(),
        dek.expose()
    );
    assert!(matches!(
        root.unwrap(&w, b"secret/a/2"),
        Err(RootError::Integrity(_))
    ));
    let mut t = w.clone();
    t.blob[20] ^= 1;
    assert!(matches!(
        root.unwrap(&t, b"secret/a/1"),
        Err(RootError::Integrity(_))
    ));
    let mut t = w.clone();
    t.blob.truncate(10);
    assert!(matches!(
        root.unwrap(&t, b"secret/a/1"),
        Err(RootError::Integrity(_))
    ));
    root.create_version(2).unwrap();
    let w2 = root.wrap(2, &dek, b"x").unwrap();
    root.retire_version(1).unwrap();
    assert!(!root.has_version(1).unwrap());
    assert!(matches!(
        root.unwrap(&w, b"secret/a/1"),
        Err(RootError::NotInitialised(_))
    ));
    assert_eq!(root.unwrap(&w2, b"x").unwrap().expose(), dek.expose());
}

#[test]
fn root_key_is_sensitive_and_not_extractable() {
    let hsm = SoftHsm::new().unwrap();
    let root = Pkcs11Root::open(&hsm.config()).unwrap();
    root.create_version(1).unwrap();
    drop(root);
    // an independent client: pkcs11-tool from OpenSC lists the key's attributes
    let out = std::process::Command::new("pkcs11-tool")
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
            "secrkey",
        ])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("keyseal-root-v1"), "{text}");
    assert!(text.contains("AES length 32"), "{text}");
    assert!(
        text.contains("sensitive") && text.contains("never extractable"),
        "{text}"
    );
}

#[test]
fn wrong_pin_names_the_fix() {
    let hsm = SoftHsm::new().unwrap();
    let mut cfg = hsm.config();
    cfg.pin = Zeroizing::new("wrong-pin".into());
    let e = Pkcs11Root::open(&cfg).unwrap_err();
    assert!(matches!(e, RootError::Auth(_)), "{e:?}");
    let m = e.to_string();
    assert!(
        m.contains("wrong user PIN") && m.contains("pin_file"),
        "{m}"
    );
    assert!(!m.contains("wrong-pin"), "the PIN leaked into the message");
}

#[test]
fn missing_token_names_the_fix() {
    let hsm = SoftHsm::new().unwrap();
    let mut cfg = hsm.config();
    cfg.token_label = "no-such-token".into();
    let e = Pkcs11Root::open(&cfg).unwrap_err();
    assert!(matches!(e, RootError::NotInitialised(_)), "{e:?}");
    let m = e.to_string();
    assert!(
        m.contains("no-such-token") && m.contains("softhsm2-util --init-token"),
        "{m}"
    );
}

#[test]
fn missing_module_names_the_fix() {
    let cfg = Pkcs11Config {
        module: "/nonexistent/libpkcs11.so".into(),
        token_label: "x".into(),
        pin: Zeroizing::new("1".into()),
    };
    let e = Pkcs11Root::open(&cfg).unwrap_err();
    assert!(matches!(e, RootError::Unavailable(_)), "{e:?}");
    assert!(e.to_string().contains("root.pkcs11.module"), "{e}");
}

#[test]
fn pin_file_permissions_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pin");
    std::fs::write(&p, "1234\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = read_pin_file(&p).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(read_pin_file(&p).unwrap().as_str(), "1234");
    std::fs::write(&p, "").unwrap();
    assert!(read_pin_file(&p).is_err());
    assert!(read_pin_file(&dir.path().join("missing")).is_err());
}

#[test]
fn signatures_verify_with_openssl() {
    let hsm = SoftHsm::new().unwrap();
    let root = Pkcs11Root::open(&hsm.config()).unwrap();
    let key = root
        .create_signing_key("audit-v1", SignAlg::EcdsaP256Sha256)
        .unwrap();
    let spki = root.public_key_spki(&key).unwrap();
    let msg = b"checkpoint body\n";
    let sig = root.sign(&key, msg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pub.der"), &spki).unwrap();
    std::fs::write(dir.path().join("sig.der"), &sig).unwrap();
    std::fs::write(dir.path().join("msg"), msg).unwrap();
    let run = |msgfile: &str| {
        std::process::Command::new("openssl")
            .current_dir(dir.path())
            .args([
                "dgst",
                "-sha256",
                "-keyform",
                "DER",
                "-verify",
                "pub.der",
                "-signature",
                "sig.der",
                msgfile,
            ])
            .output()
            .unwrap()
    };
    let out = run("msg");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.path().join("other"), b"checkpoint body!").unwrap();
    assert!(
        !run("other").status.success(),
        "a signature over other bytes verified"
    );
    root.destroy_signing_key(&key).unwrap();
    assert!(root.sign(&key, msg).is_err());
}

#[test]
fn concurrent_wrap_unwrap_on_shared_root() {
    let hsm = SoftHsm::new().unwrap();
    let root = Arc::new(Pkcs11Root::open(&hsm.config()).unwrap());
    root.create_version(1).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let root = root.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let id = format!("t{t}/{i}");
                    let dek = Dek::generate();
                    let w = root.wrap(1, &dek, id.as_bytes()).unwrap();
                    assert_eq!(
                        root.unwrap(&w, id.as_bytes()).unwrap().expose(),
                        dek.expose()
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
