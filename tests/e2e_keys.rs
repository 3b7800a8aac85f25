//! Signing keys through the real daemon and CLI, on both roots: every
//! signature verifies with stock openssl from the exported PEM; rotation,
//! disable, JWKS.

mod common;

use std::path::Path;
use std::process::Command;

use common::daemon::{TestDaemon, ROOT_POLICY};
use common::Backend;

fn openssl_verify(alg: &str, dir: &Path, pem: &str, sig: &str, msg: &str) -> bool {
    let mut c = Command::new("openssl");
    c.current_dir(dir);
    match alg {
        "ed25519" => {
            c.args([
                "pkeyutl", "-verify", "-pubin", "-inkey", pem, "-rawin", "-in", msg, "-sigfile",
                sig,
            ]);
        }
        "rsa-pss-3072" => {
            c.args([
                "dgst",
                "-sha256",
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:32",
                "-verify",
                pem,
                "-signature",
                sig,
                msg,
            ]);
        }
        _ => {
            c.args(["dgst", "-sha256", "-verify", pem, "-signature", sig, msg]);
        }
    }
    c.output().unwrap().status.success()
}

fn supported(b: Backend, alg: &str) -> bool {
    !(matches!(b, Backend::Tpm) && alg == "ed25519")
}

fn sign_verify_each_algorithm_with_openssl(b: Backend) {
    let d = TestDaemon::start(b, ROOT_POLICY);
    let dir = d.dir().to_path_buf();
    std::fs::write(dir.join("msg"), b"release artefact v1.2.3\n").unwrap();
    std::fs::write(dir.join("other"), b"release artefact v1.2.4\n").unwrap();
    for alg in ["ecdsa-p256", "ed25519", "rsa-pss-3072"] {
        let name = format!("sign/{alg}");
        let out = d
            .cli(&["key", "create", &name, "--alg", alg])
            .output()
            .unwrap();
        if !supported(b, alg) {
            assert!(!out.status.success(), "{alg} must be refused on {b:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("Ed25519") || err.contains("ed25519"), "{err}");
            continue;
        }
        assert!(
            out.status.success(),
            "create {alg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pem = d.cli(&["key", "pubkey", &name]).output().unwrap();
        assert!(pem.status.success());
        std::fs::write(dir.join(format!("{alg}.pem")), &pem.stdout).unwrap();
        let sig = format!("{alg}.sig");
        let out = d
            .cli(&["key", "sign", &name, "--in", "msg", "--out", &sig])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sign {alg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            openssl_verify(alg, &dir, &format!("{alg}.pem"), &sig, "msg"),
            "openssl rejects {alg} signature"
        );
        assert!(
            !openssl_verify(alg, &dir, &format!("{alg}.pem"), &sig, "other"),
            "{alg}: wrong message verified"
        );
        // prehashed digest (not for Ed25519)
        if alg != "ed25519" {
            let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                b"release artefact v1.2.3\n",
            ));
            let dsig = format!("{alg}.dsig");
            let out = d
                .cli(&["key", "sign", &name, "--digest", &digest, "--out", &dsig])
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                openssl_verify(alg, &dir, &format!("{alg}.pem"), &dsig, "msg"),
                "{alg} digest signature"
            );
        }
        // the daemon's own verify agrees
        let out = d
            .cli(&["key", "verify", &name, "--signature", &sig, "--in", "msg"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = d
            .cli(&["key", "verify", &name, "--signature", &sig, "--in", "other"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(65));
    }
}

fn rotate_disable_and_jwks(b: Backend) {
    let d = TestDaemon::start(b, ROOT_POLICY);
    let dir = d.dir().to_path_buf();
    std::fs::write(dir.join("msg"), b"payload").unwrap();
    assert!(d
        .cli(&["key", "create", "tok/main"])
        .output()
        .unwrap()
        .status
        .success());
    assert!(d
        .cli(&["key", "sign", "tok/main", "--in", "msg", "--out", "v1.sig"])
        .current_dir(&dir)
        .output()
        .unwrap()
        .status
        .success());
    let out = d.cli(&["key", "rotate", "tok/main"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d
        .cli(&["key", "sign", "tok/main", "--in", "msg", "--out", "v2.sig"])
        .current_dir(&dir)
        .output()
        .unwrap()
        .status
        .success());
    let verify = |sig: &str| {
        d.cli(&[
            "key",
            "verify",
            "tok/main",
            "--signature",
            sig,
            "--in",
            "msg",
        ])
        .current_dir(&dir)
        .output()
        .unwrap()
    };
    let v1 = verify("v1.sig");
    assert!(v1.status.success() && String::from_utf8_lossy(&v1.stdout).contains("version 1"));
    let v2 = verify("v2.sig");
    assert!(v2.status.success() && String::from_utf8_lossy(&v2.stdout).contains("version 2"));
    let jwks = d.cli(&["key", "jwks", "tok/main"]).output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&jwks.stdout).unwrap();
    let kids: Vec<&str> = j["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, vec!["tok/main#v1", "tok/main#v2"]);
    assert_eq!(j["keys"][0]["kty"], "EC");
    // the signing version cannot be disabled; v1 can, and then stops verifying
    assert!(!d
        .cli(&["key", "disable", "tok/main", "--version", "2"])
        .output()
        .unwrap()
        .status
        .success());
    assert!(d
        .cli(&["key", "disable", "tok/main", "--version", "1"])
        .output()
        .unwrap()
        .status
        .success());
    assert_eq!(verify("v1.sig").status.code(), Some(65));
    let jwks = d.cli(&["key", "jwks", "tok/main"]).output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&jwks.stdout).unwrap();
    assert_eq!(j["keys"].as_array().unwrap().len(), 1);
    // destroy needs --yes, then the key is gone
    assert_eq!(
        d.cli(&["key", "destroy", "tok/main"])
            .output()
            .unwrap()
            .status
            .code(),
        Some(64)
    );
    assert!(d
        .cli(&["key", "destroy", "tok/main", "--yes"])
        .output()
        .unwrap()
        .status
        .success());
    assert_eq!(
        d.cli(&["key", "show", "tok/main"])
            .output()
            .unwrap()
            .status
            .code(),
        Some(66)
    );
}

fn key_capabilities_are_enforced(b: Backend) {
    // root may only sign keys under app/ and administer nothing
    let policy = r#"
[[rule]]
name = "signer"
capabilities = ["key:sign"]
names = ["app/**"]
[rule.match]
uid = 0
"#;
    let d = TestDaemon::start(b, &format!("{policy}\n[[rule]]\nname = \"status\"\ncapabilities = [\"system:admin\"]\n[rule.match]\nuid = 0\n"));
    let out = d.cli(&["key", "create", "app/k"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("key:admin"));
}

both_backends!(
    sign_verify_each_algorithm_with_openssl,
    rotate_disable_and_jwks,
    key_capabilities_are_enforced
);

/// An API key is exchanged for a JWT signed by a hardware key; PyJWT (an
/// independent library) verifies it against the JWKS keyseal prints.
fn jwt_minted_and_verified_independently(b: Backend) {
    let d = TestDaemon::start(b, ROOT_POLICY);
    let dir = d.dir().to_path_buf();
    let issued = d.run(
        &[
            "apikey", "issue", "--owner", "team-a", "--scope", "read", "--scope", "write",
        ],
        b"",
    );
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let api_key = String::from_utf8(issued.stdout).unwrap().trim().to_owned();
    assert!(api_key.starts_with("ks_live_"), "{api_key}");
    let algs: &[&str] = match b {
        Backend::SoftHsm => &["ecdsa-p256", "ed25519"],
        Backend::Tpm => &["ecdsa-p256"],
    };
    for alg in algs {
        let name = format!("tok/{alg}");
        assert!(d
            .cli(&["key", "create", &name, "--alg", alg])
            .output()
            .unwrap()
            .status
            .success());
        let out = d.run(&["key", "token", &name, "--ttl", "600"], api_key.as_bytes());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap();
        assert_eq!(token.trim().split('.').count(), 3, "{token}");
        std::fs::write(dir.join("token"), &token).unwrap();
        let jwks = d.cli(&["key", "jwks", &name]).output().unwrap();
        std::fs::write(dir.join("jwks.json"), &jwks.stdout).unwrap();
        let py = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/verify_jwt.py"
            ))
            .arg(dir.join("jwks.json"))
            .arg(dir.join("token"))
            .output()
            .unwrap();
        assert!(
            py.status.success(),
            "PyJWT rejected the {alg} token: {}",
            String::from_utf8_lossy(&py.stderr)
        );
        let claims: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
        assert_eq!(claims["sub"], "team-a");
        assert_eq!(claims["scope"], "read write");
        let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert_eq!(ttl, 600);
        // the API key never reaches the log
        assert!(!d.log_text().contains(&api_key));
    }
    // a bad key (typo) and a revoked key get no token
    let mut typo = api_key.clone().into_bytes();
    let i = typo.len() - 8;
    typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
    let out = d.run(&["key", "token", "tok/ecdsa-p256"], &typo);
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d
        .cli(&["apikey", "revoke", "--owner", "team-a"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.run(&["key", "token", "tok/ecdsa-p256"], api_key.as_bytes());
    assert_eq!(out.status.code(), Some(77), "revoked key minted a token");
}

both_backends!(jwt_minted_and_verified_independently);
