//! The offline audit-bundle verifier on hostile bundles: it must return an
//! error (or a report), never panic.
//!
//! Input: one mode byte, then the parts separated by `\n=====\n`.
//!
//! - Mode byte even ("raw"): the parts are, in order, `audit-key.pem`,
//!   `manifest.json`, `manifest.sig`, `events.jsonl`, `leaves.txt`,
//!   `checkpoints.txt`, `proofs.json`, written as they are. This mostly
//!   exercises the early checks (key, signature, JSON shapes).
//! - Mode byte odd ("signed"): an attacker who brings their own key gets
//!   past every signature, so the harness plays that attacker with a fixed
//!   P-256 key: the parts are checkpoint bodies (separated by `\n~~\n`, each
//!   signed into a note), `events.jsonl`, `leaves.txt`, `proofs.json`
//!   (its `consistency.from_checkpoint`, when a string, is signed too) and
//!   `manifest.json` (its `format`, `key_id` and `checkpoint` fixed up; its
//!   `files` too when bit 1 of the mode byte is set), then the manifest is
//!   signed. This reaches the Merkle and proof checks. Bit 2: pass the
//!   `after` checkpoint as the verifier's own; bit 3: pass the key as
//!   trusted.
#![no_main]

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use keyseal::audit::bundle::{
    verify_bundle, verify_bundle_with, VerifyOptions, BUNDLE_FORMAT, CHECKPOINTS_FILE, EVENTS_FILE,
    KEY_FILE, LEAVES_FILE, MANIFEST_FILE, MANIFEST_SIG_FILE, PROOFS_FILE,
};
use keyseal::audit::note::{key_id, signature_line, spki_pem};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey as _;
use sha2::{Digest, Sha256};

struct Attacker {
    dir: PathBuf,
    key: SigningKey,
    pem: String,
    key_id: u32,
}

fn attacker() -> &'static Attacker {
    static A: OnceLock<Attacker> = OnceLock::new();
    A.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keyseal-fuzz-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let spki = key.verifying_key().to_public_key_der().unwrap().into_vec();
        Attacker {
            dir,
            pem: spki_pem(&spki),
            key_id: key_id(&spki),
            key,
        }
    })
}

/// ECDSA here is deterministic (RFC 6979), so signatures are memoised:
/// instrumented P-256 arithmetic is most of the cost of an execution.
fn sign(a: &Attacker, msg: &[u8]) -> Vec<u8> {
    thread_local! {
        static CACHE: RefCell<HashMap<Vec<u8>, Vec<u8>>> = RefCell::new(HashMap::new());
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(s) = c.get(msg) {
            return s.clone();
        }
        if c.len() > 50_000 {
            c.clear();
        }
        let sig: Signature = a.key.sign(msg);
        let der = sig.to_der().as_bytes().to_vec();
        c.insert(msg.to_vec(), der.clone());
        der
    })
}

/// A signed note of `body` under the origin on its first line.
fn note(a: &Attacker, body: &str) -> String {
    let origin = body.split('\n').next().unwrap_or("");
    format!(
        "{body}\n{}",
        signature_line(origin, a.key_id, &sign(a, body.as_bytes()))
    )
}

/// Writes the bundle's files. A file whose bytes did not change since the
/// last execution is left alone, and a changed one is replaced by a new
/// file (unlink, create) instead of being truncated: on ext4, truncating a
/// file that has data makes its close start writeback (`auto_da_alloc`),
/// which cost more than the verification.
fn write(a: &Attacker, files: &[(&str, &[u8])]) {
    thread_local! {
        static LAST: RefCell<HashMap<String, Vec<u8>>> = RefCell::new(HashMap::new());
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        for (name, bytes) in files {
            if last.get(*name).is_some_and(|b| b.as_slice() == *bytes) {
                continue;
            }
            let path = a.dir.join(name);
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, bytes).unwrap();
            last.insert(name.to_string(), bytes.to_vec());
        }
    });
}

/// One verification per execution (each costs several instrumented ECDSA
/// verifications): against the key the bundle carries, or also against a
/// trusted key and an `after` checkpoint.
fn verify(a: &Attacker, trusted: bool, after: Option<String>) {
    if !trusted && after.is_none() {
        let _ = verify_bundle(&a.dir);
        return;
    }
    let opts = VerifyOptions {
        trusted_key_pem: trusted.then(|| a.pem.clone()),
        after,
    };
    let _ = verify_bundle_with(&a.dir, &opts);
}

fuzz_target!(|data: &[u8]| {
    let a = attacker();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parts: Vec<&[u8]> = split(rest, b"\n=====\n");
    let part = |i: usize| parts.get(i).copied().unwrap_or(b"");
    if mode & 1 == 0 {
        write(
            a,
            &[
                (KEY_FILE, part(0)),
                (MANIFEST_FILE, part(1)),
                (MANIFEST_SIG_FILE, part(2)),
                (EVENTS_FILE, part(3)),
                (LEAVES_FILE, part(4)),
                (CHECKPOINTS_FILE, part(5)),
                (PROOFS_FILE, part(6)),
            ],
        );
        verify(a, mode & 2 != 0, None);
        return;
    }

    let bodies = String::from_utf8_lossy(part(0));
    let notes: Vec<String> = bodies.split("\n~~\n").take(8).map(|b| note(a, b)).collect();
    let checkpoints = notes.join("\n");
    let events = part(1);
    let leaves = part(2);
    let mut after_note = None;
    let proofs = match serde_json::from_slice::<serde_json::Value>(part(3)) {
        Ok(mut v) => {
            if let Some(c) = v
                .get_mut("consistency")
                .and_then(|c| c.get_mut("from_checkpoint"))
            {
                if let Some(body) = c.as_str() {
                    let n = note(a, body);
                    after_note = Some(n.clone());
                    *c = serde_json::Value::String(n);
                }
            }
            serde_json::to_vec(&v).unwrap()
        }
        Err(_) => part(3).to_vec(),
    };
    let file =
        |b: &[u8]| serde_json::json!({"sha256": hex::encode(Sha256::digest(b)), "bytes": b.len()});
    let manifest = match serde_json::from_slice::<serde_json::Value>(part(4)) {
        Ok(mut v) => {
            if let Some(o) = v.as_object_mut() {
                o.insert("format".into(), BUNDLE_FORMAT.into());
                o.insert("key_id".into(), format!("{:08x}", a.key_id).into());
                if let Some(first) = notes.first() {
                    o.insert("checkpoint".into(), first.clone().into());
                }
                if mode & 2 != 0 {
                    o.insert(
                        "files".into(),
                        serde_json::json!({
                            EVENTS_FILE: file(events),
                            LEAVES_FILE: file(leaves),
                            CHECKPOINTS_FILE: file(checkpoints.as_bytes()),
                            PROOFS_FILE: file(&proofs),
                            KEY_FILE: file(a.pem.as_bytes()),
                        }),
                    );
                }
            }
            serde_json::to_vec(&v).unwrap()
        }
        Err(_) => part(4).to_vec(),
    };
    let sig = sign(a, &manifest);
    write(
        a,
        &[
            (KEY_FILE, a.pem.as_bytes()),
            (MANIFEST_FILE, &manifest),
            (MANIFEST_SIG_FILE, &sig),
            (EVENTS_FILE, events),
            (LEAVES_FILE, leaves),
            (CHECKPOINTS_FILE, checkpoints.as_bytes()),
            (PROOFS_FILE, &proofs),
        ],
    );
    verify(
        a,
        mode & 8 != 0,
        if mode & 4 != 0 { after_note } else { None },
    );
});

fn split<'a>(mut s: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while let Some(i) = s.windows(sep.len()).position(|w| w == sep) {
        out.push(&s[..i]);
        s = &s[i + sep.len()..];
    }
    out.push(s);
    out
}
