//! The audit log on both roots of trust (real SoftHSM2 and real swtpm):
//! group commit, export, offline verification (ours and stock openssl),
//! tamper detection naming the first bad sequence number, consistency
//! between exports, restart, deadlines, retention, and measurements.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::{Backend, Fixture};
use keyseal::audit::merkle::{leaf_hash, verify_consistency, verify_inclusion, CompactRange};
use keyseal::audit::{
    verify_bundle, verify_bundle_with, Actor, ActorKind, AuditConfig, AuditError, AuditEvent,
    AuditLog, EventFilter, EventProblem, EventRange, ExportOptions, Fault, NewEvent, Outcome,
    VerifyError, VerifyOptions,
};

const T0: u64 = 1_700_000_000_000;
const NOW: u64 = 1_700_000_100;

fn cfg() -> AuditConfig {
    AuditConfig {
        origin: Some("keyseal.test/audit".into()),
        deadline: Duration::from_secs(10),
        ..AuditConfig::default()
    }
}

fn actor() -> Actor {
    Actor {
        kind: ActorKind::Peer,
        uid: Some(1000),
        user: Some("alice".into()),
        pid: Some(4242),
        unit: Some("app.service".into()),
        exe: Some("/usr/bin/app".into()),
        api_key_id: None,
    }
}

fn ev(i: u64) -> NewEvent {
    NewEvent::new(T0 + i, actor(), "secret.get")
        .target(format!("app/db/{i}"))
        .request_id(format!("req-{i}"))
}

fn fill(log: &AuditLog, from: u64, n: u64) {
    for i in from..from + n {
        log.append_blocking(ev(i)).unwrap();
    }
}

fn export(log: &AuditLog, dir: &Path, range: EventRange, after: Option<String>) -> PathBuf {
    let out = dir.join(format!("export-{}", rand_suffix()));
    log.export(
        &ExportOptions {
            range,
            after,
            now: NOW,
        },
        &out,
    )
    .unwrap();
    out
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst).to_string()
}

fn openssl_verify(dir: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-verify",
            "audit-key.pem",
            "-signature",
            "manifest.sig",
            "manifest.json",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// Verifies the first checkpoint of a bundle with openssl: the note text
/// and the DER signature after the 4-byte key ID.
fn openssl_verify_checkpoint(dir: &Path) -> String {
    let cps = std::fs::read_to_string(dir.join("checkpoints.txt")).unwrap();
    let (body, rest) = cps.split_once("\n\n").unwrap();
    let sig_line = rest.lines().next().unwrap();
    let b64 = sig_line.rsplit(' ').next().unwrap();
    let blob = B64.decode(b64).unwrap();
    std::fs::write(dir.join("cp.body"), format!("{body}\n")).unwrap();
    std::fs::write(dir.join("cp.sig"), &blob[4..]).unwrap();
    let out = Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-verify",
            "audit-key.pem",
            "-signature",
            "cp.sig",
            "cp.body",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    std::fs::remove_file(dir.join("cp.body")).unwrap();
    std::fs::remove_file(dir.join("cp.sig")).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

fn lines_of(dir: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(dir.join("events.jsonl")).unwrap();
    b.split(|c| *c == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn write_lines(dir: &Path, ls: &[Vec<u8>]) {
    let mut out = Vec::new();
    for l in ls {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    std::fs::write(dir.join("events.jsonl"), out).unwrap();
}

fn event_error(r: Result<keyseal::audit::Report, VerifyError>) -> (u64, EventProblem) {
    match r {
        Err(VerifyError::Event { seq, problem, .. }) => (seq, problem),
        other => panic!("expected an event error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------

fn concurrent_appends_export_verify(b: Backend) {
    let (f, s) = Fixture::new(b);
    let log = Arc::new(AuditLog::open(&s, cfg()).unwrap());
    let threads = 16u64;
    let per = 40u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..per)
                    .map(|i| log.append_blocking(ev(t * per + i)).unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    seqs.sort();
    let total = threads * per;
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    let st = log.stats();
    eprintln!(
        "{b:?}: {} events in {} group commits",
        st.appended, st.batches
    );
    assert_eq!(st.appended, total);
    assert!(st.batches < total, "group commit: {} batches", st.batches);
    assert_eq!(st.failures, 0);
    assert_eq!(log.head().size, total);

    // Sequence order is time order (times are raised, never lowered).
    let (all, next) = log.query(&EventFilter::default(), 1, usize::MAX).unwrap();
    assert!(next.is_none());
    assert_eq!(all.len() as u64, total);
    assert!(all.windows(2).all(|w| w[0].time <= w[1].time));

    let out = export(&log, f.dir.path(), EventRange::All, None);
    let report = verify_bundle(&out).unwrap();
    assert_eq!(report.events, total);
    assert_eq!(report.first_seq, Some(1));
    assert_eq!(report.last_seq, Some(total));
    assert_eq!(report.tree_size, total);
    assert_eq!(report.root, hex::encode(log.head().root));
    assert_eq!(report.key_fingerprint, log.public_key().fingerprint());
    // Pinning the key the operator recorded.
    verify_bundle_with(
        &out,
        &VerifyOptions {
            trusted_key_pem: Some(log.public_key().to_pem()),
            after: None,
        },
    )
    .unwrap();
    // Stock openssl agrees, on the manifest and on the checkpoint.
    assert_eq!(openssl_verify(&out), (true, "Verified OK".into()));
    assert_eq!(openssl_verify_checkpoint(&out), "Verified OK");
}

fn tampering_is_located(b: Backend) {
    let (f, s) = Fixture::new(b);
    let log = AuditLog::open(&s, cfg()).unwrap();
    fill(&log, 1, 40);
    // A range in the middle: prefix and suffix subtrees are both needed.
    let good = export(
        &log,
        f.dir.path(),
        EventRange::Seqs { first: 5, last: 30 },
        None,
    );
    let r = verify_bundle(&good).unwrap();
    assert_eq!((r.first_seq, r.last_seq, r.events), (Some(5), Some(30), 26));
    let base = lines_of(&good);
    let idx = |seq: u64| (seq - 5) as usize;
    let case = |name: &str| {
        let d = f.dir.path().join(format!("tamper-{name}"));
        copy_dir(&good, &d);
        d
    };

    // Flip one bit of one byte of seq 12 ("secret.get" -> "secret.fet").
    let d = case("flip");
    let mut ls = base.clone();
    let pos = ls[idx(12)]
        .windows(10)
        .position(|w| w == b"secret.get")
        .unwrap()
        + 7;
    ls[idx(12)][pos] ^= 0x01;
    write_lines(&d, &ls);
    assert_eq!(event_error(verify_bundle(&d)), (12, EventProblem::Modified));
    let msg = verify_bundle(&d).unwrap_err().to_string();
    assert!(msg.starts_with("seq 12: modified"), "{msg}");

    // Delete seq 17.
    let d = case("delete");
    let mut ls = base.clone();
    ls.remove(idx(17));
    write_lines(&d, &ls);
    assert_eq!(event_error(verify_bundle(&d)), (17, EventProblem::Missing));

    // Swap seq 20 and 21.
    let d = case("swap");
    let mut ls = base.clone();
    ls.swap(idx(20), idx(21));
    write_lines(&d, &ls);
    assert_eq!(
        event_error(verify_bundle(&d)),
        (20, EventProblem::Reordered)
    );

    // Insert a forged event claiming seq 9, before the real seq 9.
    let d = case("insert");
    let mut ls = base.clone();
    let mut forged = AuditEvent::decode(&ls[idx(9)]).unwrap();
    forged.target = Some("app/db/innocent".into());
    ls.insert(idx(9), forged.encode().unwrap());
    write_lines(&d, &ls);
    assert_eq!(
        event_error(verify_bundle(&d)),
        (
            9,
            EventProblem::Inserted {
                claimed_seq: Some(9)
            }
        )
    );

    // The last event modified: still named.
    let d = case("last");
    let mut ls = base.clone();
    let mut last = AuditEvent::decode(&ls[idx(30)]).unwrap();
    last.result = Outcome::Denied;
    ls[idx(30)] = last.encode().unwrap();
    write_lines(&d, &ls);
    assert_eq!(event_error(verify_bundle(&d)), (30, EventProblem::Modified));

    // Edited manifest: its signature fails, with ours and with openssl.
    let d = case("manifest");
    let m = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    let edited = m.replacen("\"count\": 26", "\"count\": 25", 1);
    assert_ne!(m, edited);
    std::fs::write(d.join("manifest.json"), edited).unwrap();
    assert_eq!(verify_bundle(&d), Err(VerifyError::ManifestSignature));
    let (ok, _) = openssl_verify(&d);
    assert!(!ok);

    // Edited checkpoint (tree size 40 -> 41): bad signature.
    let d = case("checkpoint");
    let c = std::fs::read_to_string(d.join("checkpoints.txt")).unwrap();
    let edited = c.replacen("\n40\n", "\n41\n", 1);
    assert_ne!(c, edited);
    std::fs::write(d.join("checkpoints.txt"), edited).unwrap();
    assert!(
        matches!(
            verify_bundle(&d),
            Err(VerifyError::CheckpointSignature { .. })
        ),
        "{:?}",
        verify_bundle(&d)
    );

    // Edited prefix subtree hash: the root no longer matches.
    let d = case("prefix");
    let p = std::fs::read_to_string(d.join("proofs.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&p).unwrap();
    let h = v["prefix"][0]["hash"].as_str().unwrap().to_owned();
    let flipped = format!("{}{}", if &h[..1] == "0" { "1" } else { "0" }, &h[1..]);
    std::fs::write(d.join("proofs.json"), p.replace(&h, &flipped)).unwrap();
    assert_eq!(
        verify_bundle(&d),
        Err(VerifyError::RootMismatch { size: 40 })
    );

    // leaves.txt alone edited: file hash mismatch.
    let d = case("leaves");
    let l = std::fs::read_to_string(d.join("leaves.txt")).unwrap();
    std::fs::write(d.join("leaves.txt"), l.replacen("5 ", "5  ", 1)).unwrap();
    assert_eq!(
        verify_bundle(&d),
        Err(VerifyError::FileHash {
            file: "leaves.txt".into()
        })
    );

    // The untouched bundle still verifies (nothing above changed it).
    verify_bundle(&good).unwrap();
    // Another key pinned: refused.
    let other = p256::ecdsa::SigningKey::from_slice(&[3u8; 32]).unwrap();
    let other_pem = p256::pkcs8::EncodePublicKey::to_public_key_pem(
        other.verifying_key(),
        p256::pkcs8::LineEnding::LF,
    )
    .unwrap();
    assert!(matches!(
        verify_bundle_with(
            &good,
            &VerifyOptions {
                trusted_key_pem: Some(other_pem),
                after: None
            }
        ),
        Err(VerifyError::UntrustedKey { .. })
    ));
}

fn consecutive_exports_are_consistent(b: Backend) {
    let (f, s) = Fixture::new(b);
    let log = AuditLog::open(&s, cfg()).unwrap();
    fill(&log, 1, 30);
    let first = export(&log, f.dir.path(), EventRange::All, None);
    let r1 = verify_bundle(&first).unwrap();
    let m1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.join("manifest.json")).unwrap()).unwrap();
    let cp1 = m1["checkpoint"].as_str().unwrap().to_owned();
    let pem = std::fs::read_to_string(first.join("audit-key.pem")).unwrap();

    fill(&log, 31, 25);
    // The next export: by time, from where the last one ended.
    let second = export(
        &log,
        f.dir.path(),
        EventRange::Time {
            since: Some(r1.last_time.unwrap() + 1),
            until: None,
        },
        Some(cp1.clone()),
    );
    let r2 = verify_bundle_with(
        &second,
        &VerifyOptions {
            trusted_key_pem: Some(pem),
            after: Some(cp1.clone()),
        },
    )
    .unwrap();
    assert_eq!((r2.first_seq, r2.last_seq), (Some(31), Some(55)));
    assert_eq!(r2.consistent_from, Some(30));
    assert_eq!(openssl_verify(&second), (true, "Verified OK".into()));

    // Giving another `after` than the bundle proves: refused.
    let unrelated = log.checkpoint_now(NOW).unwrap().note;
    assert!(matches!(
        verify_bundle_with(
            &second,
            &VerifyOptions {
                trusted_key_pem: None,
                after: Some(unrelated),
            }
        ),
        Err(VerifyError::AfterMismatch(_))
    ));
    // An `after` checkpoint that is not this log's is refused at export.
    let forged = cp1.replacen("\n30\n", "\n29\n", 1);
    assert!(matches!(
        log.export(
            &ExportOptions {
                range: EventRange::All,
                after: Some(forged),
                now: NOW
            },
            &f.dir.path().join("refused")
        ),
        Err(AuditError::InvalidArgument(_))
    ));
}

fn rewritten_store_is_inconsistent(b: Backend) {
    let (f, s) = Fixture::new(b);
    // Create the log (signing key, origin), then keep a copy of the store.
    let log = AuditLog::open(&s, cfg()).unwrap();
    log.close(NOW).unwrap();
    drop(log);
    drop(s);
    let snapshot = f.dir.path().join("snapshot");
    copy_tree(&f.store_path(), &snapshot);

    let s = f.reopen();
    let log = AuditLog::open(&s, cfg()).unwrap();
    fill(&log, 1, 20);
    let first = export(&log, f.dir.path(), EventRange::All, None);
    let m1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.join("manifest.json")).unwrap()).unwrap();
    let cp1 = m1["checkpoint"].as_str().unwrap().to_owned();
    log.close(NOW).unwrap();
    drop(log);
    drop(s);

    // Someone with the disk and the device rolls the store back and writes
    // another history of at least the same length.
    std::fs::remove_dir_all(f.store_path()).unwrap();
    copy_tree(&snapshot, &f.store_path());
    let s = f.reopen();
    let log = AuditLog::open(&s, cfg()).unwrap();
    for i in 1..=25u64 {
        log.append_blocking(
            NewEvent::new(T0 + i, actor(), "secret.list").target(format!("other/{i}")),
        )
        .unwrap();
    }
    let out = f.dir.path().join("after-rewrite");
    let summary = log
        .export(
            &ExportOptions {
                range: EventRange::All,
                after: Some(cp1.clone()),
                now: NOW,
            },
            &out,
        )
        .unwrap();
    assert_eq!(summary.after_consistent, Some(false));
    assert_eq!(
        verify_bundle(&out),
        Err(VerifyError::Inconsistent {
            from_size: 20,
            to_size: 25
        })
    );
    // Rewritten to exactly the same size: still caught.
    drop(log);
    drop(s);
    std::fs::remove_dir_all(f.store_path()).unwrap();
    copy_tree(&snapshot, &f.store_path());
    let s = f.reopen();
    let log = AuditLog::open(&s, cfg()).unwrap();
    for i in 1..=20u64 {
        log.append_blocking(NewEvent::new(T0 + i, actor(), "secret.put"))
            .unwrap();
    }
    let out = export(&log, f.dir.path(), EventRange::All, Some(cp1));
    assert_eq!(
        verify_bundle(&out),
        Err(VerifyError::Inconsistent {
            from_size: 20,
            to_size: 20
        })
    );
}

fn restart_continues_the_log(b: Backend) {
    let (f, s) = Fixture::new(b);
    let log = AuditLog::open(&s, cfg()).unwrap();
    fill(&log, 1, 10);
    let head = log.head();
    let origin = log.origin().to_owned();
    let pem = log.public_key().to_pem();
    let hashed = log.hash(b"app/db/password");
    let last = log.close(NOW).unwrap().unwrap();
    assert_eq!(last.checkpoint.size, 10);
    assert!(matches!(
        log.append_blocking(ev(11)),
        Err(AuditError::Closed)
    ));
    drop(log);
    // What an interrupted batch could leave behind: a torn record after
    // the last complete one (never acknowledged). Open cuts it off.
    let seg = f.store_path().join("audit").join("000000000000.log");
    let len = std::fs::metadata(&seg).unwrap().len();
    {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        // len 100, crc, seq 11, then only 7 of the 100 bytes.
        w.write_all(&100u32.to_le_bytes()).unwrap();
        w.write_all(&0u32.to_le_bytes()).unwrap();
        w.write_all(&11u64.to_le_bytes()).unwrap();
        w.write_all(b"garbage").unwrap();
    }
    drop(s);

    let s = f.reopen();
    let log = AuditLog::open(&s, cfg()).unwrap();
    assert!(log.event(11).unwrap().is_none());
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        len,
        "torn record cut off"
    );
    assert_eq!(log.head(), head);
    assert_eq!(log.origin(), origin);
    assert_eq!(log.public_key().to_pem(), pem);
    assert_eq!(log.hash(b"app/db/password"), hashed);
    assert!(hashed.starts_with("hmac-sha256:") && hashed.len() == 12 + 64);
    assert_eq!(log.latest_checkpoint().unwrap().unwrap(), last);
    for i in 11..=15 {
        assert_eq!(log.append_blocking(ev(i)).unwrap(), i);
    }
    let new = log.head();
    let proof = log.consistency_proof(10, 15).unwrap();
    assert!(verify_consistency(10, 15, &head.root, &new.root, &proof));
    assert_eq!(log.root_at(10).unwrap(), head.root);

    let out = export(&log, f.dir.path(), EventRange::All, Some(last.note));
    let r = verify_bundle(&out).unwrap();
    assert_eq!(r.events, 15);
    assert_eq!(r.consistent_from, Some(10));
    // The checkpoint of size 10 lies inside the range: verified too.
    assert!(r.checkpoints >= 2, "{r:?}");
    let (hits, _) = log
        .query(
            &EventFilter {
                target: Some("app/db/12".into()),
                ..Default::default()
            },
            1,
            10,
        )
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].seq, 12);
}

fn stalled_writes_fail_within_the_deadline(b: Backend) {
    let (_f, s) = Fixture::new(b);
    let deadline = Duration::from_millis(300);
    let log = AuditLog::open(&s, AuditConfig { deadline, ..cfg() }).unwrap();
    assert_eq!(log.append_blocking(ev(1)).unwrap(), 1);

    log.set_fault(Fault::StallWrites);
    let t = Instant::now();
    let err = log.append_blocking(ev(2)).unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(err, AuditError::Deadline(_)), "{err:?}");
    assert!(err.is_unavailable());
    assert!(
        waited >= deadline && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // The async API too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let err = rt.block_on(log.append(ev(3))).unwrap_err();
    assert!(matches!(err, AuditError::Deadline(_)), "{err:?}");
    let st = log.stats();
    assert_eq!(st.failures, 2);
    assert_eq!(st.deadline_exceeded, 2);
    assert!(st.last_error.unwrap().contains("did not complete"));

    // Fault cleared: the log recovers (the stalled events are written
    // late, as attempts whose requests failed).
    log.set_fault(Fault::None);
    let seq = rt.block_on(log.append(ev(4))).unwrap();
    assert_eq!(seq, 4);
    assert_eq!(log.stats().appended, 4);

    // A failing disk fails the batch at once.
    log.set_fault(Fault::FailWrites);
    let err = log.append_blocking(ev(5)).unwrap_err();
    assert!(matches!(err, AuditError::Write(_)) && err.is_unavailable());
    assert_eq!(log.stats().write_errors, 1);
    log.set_fault(Fault::None);
    assert_eq!(log.append_blocking(ev(6)).unwrap(), 5);
}

/// The right edge of the tree of the first `size` events, from their bytes.
fn rebuild(log: &AuditLog, size: u64) -> CompactRange {
    let mut cr = CompactRange::new();
    for seq in 1..=size {
        let e = log.event(seq).unwrap().unwrap();
        cr.append(leaf_hash(&e.encode().unwrap()), |_, _| {});
    }
    cr
}

/// Roots and proofs from the store, checked against a tree rebuilt
/// independently from the event bytes after `prefix` (the right edge of the
/// events before them).
fn check_proofs(log: &AuditLog, prefix: &CompactRange) {
    let size = log.head().size;
    let from = prefix.size() + 1;
    let mut cr = prefix.clone();
    let mut leaves = Vec::new();
    for seq in from..=size {
        let e = log.event(seq).unwrap().unwrap();
        let l = leaf_hash(&e.encode().unwrap());
        leaves.push(l);
        cr.append(l, |_, _| {});
        assert_eq!(log.root_at(seq).unwrap(), cr.root(), "root at {seq}");
    }
    let root = log.head().root;
    assert_eq!(cr.root(), root);
    for seq in from..=size {
        let p = log.inclusion_proof(seq, size).unwrap();
        let leaf = leaves[(seq - from) as usize];
        assert!(verify_inclusion(seq - 1, size, &leaf, &p, &root));
    }
    for old in (from - 1..=size).step_by(7) {
        let p = log.consistency_proof(old, size).unwrap();
        let old_root = log.root_at(old).unwrap();
        assert!(verify_consistency(old, size, &old_root, &root, &p));
    }
}

fn prune_keeps_the_rest_verifiable(b: Backend) {
    let (f, s) = Fixture::new(b);
    let log = AuditLog::open(&s, cfg()).unwrap();
    fill(&log, 1, 150);
    assert!(matches!(
        log.prune_before(20),
        Err(AuditError::NotExported {
            requested: 20,
            exported: 0
        })
    ));
    let first = export(
        &log,
        f.dir.path(),
        EventRange::Seqs {
            first: 1,
            last: 100,
        },
        None,
    );
    let m1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.join("manifest.json")).unwrap()).unwrap();
    let cp1 = m1["checkpoint"].as_str().unwrap().to_owned();
    // the bundle held events 1..=100 (its checkpoint covers 150): only
    // what an auditor has may go
    assert_eq!(log.stats().exported_size, 100);
    assert!(matches!(
        log.prune_before(102),
        Err(AuditError::NotExported {
            requested: 102,
            exported: 100
        })
    ));
    // a bundle of a later range alone exports nothing more
    export(
        &log,
        f.dir.path(),
        EventRange::Seqs {
            first: 120,
            last: 150,
        },
        None,
    );
    assert_eq!(log.stats().exported_size, 100);
    assert!(matches!(
        log.prune_before(152),
        Err(AuditError::NotExported { .. })
    ));
    // 76 = 64 + 8 + 4: the pruned prefix is three subtrees.
    let root_76 = log.root_at(76).unwrap();
    let prefix = rebuild(&log, 76);
    assert_eq!(prefix.root(), root_76);
    let p = log.prune_before(77).unwrap();
    assert_eq!(p.pruned, 76);
    assert_eq!(p.events_removed, 76);
    assert!(log.event(76).unwrap().is_none());
    assert!(log.event(77).unwrap().is_some());
    assert_eq!(log.first_seq(), 77);
    assert_eq!(log.stats().pruned, 76);
    assert_eq!(log.root_at(76).unwrap(), root_76);
    assert!(matches!(log.root_at(75), Err(AuditError::Pruned(_))));
    fill(&log, 151, 10);
    check_proofs(&log, &prefix);

    let out = export(&log, f.dir.path(), EventRange::All, Some(cp1.clone()));
    let r = verify_bundle(&out).unwrap();
    assert_eq!((r.first_seq, r.last_seq), (Some(77), Some(160)));
    assert_eq!(r.consistent_from, Some(150));
    assert!(matches!(
        log.export(
            &ExportOptions {
                range: EventRange::Seqs {
                    first: 10,
                    last: 40
                },
                after: None,
                now: NOW
            },
            &f.dir.path().join("pruned")
        ),
        Err(AuditError::Pruned(77))
    ));
    // Proofs for what remains survive a restart.
    let head = log.head();
    drop(log);
    drop(s);
    let s = f.reopen();
    let log = AuditLog::open(&s, cfg()).unwrap();
    assert_eq!(log.head(), head);
    assert_eq!(log.first_seq(), 77);
    fill(&log, 161, 3);
    check_proofs(&log, &prefix);
    let out = export(
        &log,
        f.dir.path(),
        EventRange::Seqs {
            first: 90,
            last: 162,
        },
        Some(cp1),
    );
    verify_bundle(&out).unwrap();
}

/// Proofs straight from the store on a tree with many stored subtrees.
fn proofs_from_the_store(b: Backend) {
    let (_f, s) = Fixture::new(b);
    let log = AuditLog::open(&s, cfg()).unwrap();
    fill(&log, 1, 300);
    check_proofs(&log, &CompactRange::new());
}

fn empty_and_time_ranges(b: Backend) {
    let (f, s) = Fixture::new(b);
    let log = AuditLog::open(&s, cfg()).unwrap();
    // An empty log exports and verifies.
    let out = export(&log, f.dir.path(), EventRange::All, None);
    let r = verify_bundle(&out).unwrap();
    assert_eq!((r.events, r.tree_size), (0, 0));
    fill(&log, 1, 12);
    // A time window with no events.
    let out = export(
        &log,
        f.dir.path(),
        EventRange::Time {
            since: Some(T0 + 1000),
            until: None,
        },
        None,
    );
    assert_eq!(verify_bundle(&out).unwrap().events, 0);
    // Times are inclusive at both ends.
    let out = export(
        &log,
        f.dir.path(),
        EventRange::Time {
            since: Some(T0 + 3),
            until: Some(T0 + 7),
        },
        None,
    );
    let r = verify_bundle(&out).unwrap();
    assert_eq!((r.first_seq, r.last_seq), (Some(3), Some(7)));
    // A single event.
    let out = export(
        &log,
        f.dir.path(),
        EventRange::Seqs {
            first: 12,
            last: 12,
        },
        None,
    );
    assert_eq!(verify_bundle(&out).unwrap().events, 1);
    // Refuses a non-empty directory.
    assert!(matches!(
        log.export(
            &ExportOptions {
                range: EventRange::All,
                after: None,
                now: NOW
            },
            &out
        ),
        Err(AuditError::InvalidArgument(_))
    ));
}

/// The fenced block after `<!-- test: TAG -->` in docs/auditing.md.
fn doc_block(tag: &str) -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/auditing.md")).unwrap();
    let marker = format!("<!-- test: {tag} -->");
    let rest = &doc[doc.find(&marker).unwrap() + marker.len()..];
    let rest = &rest[rest.find("```").unwrap()..];
    let body = &rest[rest.find('\n').unwrap() + 1..];
    body[..body.find("\n```").unwrap() + 1].to_owned()
}

fn run_doc_procedures(dir: &Path) -> (bool, String, bool, String) {
    let sh = Command::new("bash")
        .args(["-c", &doc_block("auditor.sh")])
        .current_dir(dir)
        .output()
        .unwrap();
    let py = Command::new("python3")
        .arg("-c")
        .arg(doc_block("audit-root.py"))
        .arg(dir)
        .output()
        .unwrap();
    (
        sh.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&sh.stdout),
            String::from_utf8_lossy(&sh.stderr)
        ),
        py.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&py.stdout),
            String::from_utf8_lossy(&py.stderr)
        ),
    )
}

/// The by-hand procedure of docs/auditing.md (openssl, sha256sum, jq, awk,
/// python3), run verbatim on a real bundle and on a tampered copy.
fn auditor_procedure_from_the_docs(b: Backend) {
    let (f, s) = Fixture::new(b);
    let log = AuditLog::open(&s, cfg()).unwrap();
    fill(&log, 1, 23);
    let out = export(
        &log,
        f.dir.path(),
        EventRange::Seqs { first: 6, last: 19 },
        None,
    );
    let (sh_ok, sh_out, py_ok, py_out) = run_doc_procedures(&out);
    assert!(sh_ok, "{sh_out}");
    let lines: Vec<&str> = sh_out.lines().collect();
    assert_eq!(lines[0], lines[1], "fingerprints: {sh_out}");
    assert_eq!(lines[0], log.public_key().fingerprint());
    assert_eq!(sh_out.matches("Verified OK").count(), 2, "{sh_out}");
    assert_eq!(sh_out.matches(": OK").count(), 5, "{sh_out}");
    assert!(sh_out.contains("leaves OK"), "{sh_out}");
    assert!(py_ok, "{py_out}");
    assert_eq!(
        py_out.trim(),
        "keyseal.test/audit: tree size 23, root OK",
        "{py_out}"
    );
    // Procedures leave nothing behind; the bundle still verifies.
    verify_bundle(&out).unwrap();

    // A modified event fails both.
    let bad = f.dir.path().join("bad");
    copy_dir(&out, &bad);
    let mut ls = lines_of(&bad);
    ls[3] = String::from_utf8(ls[3].clone())
        .unwrap()
        .replace("\"ok\"", "\"denied\"")
        .into_bytes();
    write_lines(&bad, &ls);
    let (sh_ok, sh_out, py_ok, py_out) = run_doc_procedures(&bad);
    assert!(!sh_ok, "{sh_out}");
    assert!(sh_out.contains("events.jsonl: FAILED"), "{sh_out}");
    assert!(!py_ok);
    assert!(py_out.contains("root MISMATCH"), "{py_out}");
}

/// Measurement, not assertion: group commit against one flush per event,
/// and export + verify rate. `AUDIT_MEASURE_EVENTS` sets the export size.
fn measure(b: Backend) {
    let (f, s) = Fixture::new(b);
    let conc = 32u64;
    let per = 30u64;
    let run = |log: Arc<AuditLog>, base: u64| {
        let t = Instant::now();
        let hs: Vec<_> = (0..conc)
            .map(|c| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        log.append_blocking(ev(base + c * per + i)).unwrap();
                    }
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        let secs = t.elapsed().as_secs_f64();
        let st = log.stats();
        ((conc * per) as f64 / secs, st.batches)
    };
    let single = Arc::new(
        AuditLog::open(
            &s,
            AuditConfig {
                max_batch: 1,
                ..cfg()
            },
        )
        .unwrap(),
    );
    let (rate1, batches1) = run(single.clone(), 0);
    single.close(NOW).unwrap();
    drop(single);
    // A long deadline: the export-size fill below queues many events at once.
    let grouped = Arc::new(
        AuditLog::open(
            &s,
            AuditConfig {
                deadline: Duration::from_secs(600),
                ..cfg()
            },
        )
        .unwrap(),
    );
    let (rate_g, batches_g) = run(grouped.clone(), 1_000_000);
    eprintln!(
        "{b:?} append, {conc} threads x {per}: one flush per event {rate1:.0} events/s ({batches1} flushes); group commit {rate_g:.0} events/s ({batches_g} flushes)"
    );

    let n: u64 = std::env::var("AUDIT_MEASURE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let t = Instant::now();
    let mut i = 0u64;
    while i < n {
        let chunk = (n - i).min(10_000);
        let futs: Vec<_> = (i..i + chunk)
            .map(|k| grouped.append(ev(2_000_000 + k)))
            .collect();
        rt.block_on(async {
            for fut in futs {
                fut.await.unwrap();
            }
        });
        i += chunk;
    }
    let fill_secs = t.elapsed().as_secs_f64();
    let total = grouped.head().size;
    let st = grouped.stats();
    eprintln!(
        "{b:?} fill: {} batches, write {:.2} s, flush {:.2} s",
        st.batches,
        st.write_micros as f64 / 1e6,
        st.flush_micros as f64 / 1e6
    );
    let t = Instant::now();
    let out = export(&grouped, f.dir.path(), EventRange::All, None);
    let export_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r = verify_bundle(&out).unwrap();
    let verify_secs = t.elapsed().as_secs_f64();
    assert_eq!(r.events, total);
    let bytes = std::fs::metadata(out.join("events.jsonl")).unwrap().len();
    eprintln!(
        "{b:?} {total} events ({:.1} MB): append (async, pipelined) {:.0}/s, export {:.0}/s ({export_secs:.2} s), verify {:.0}/s ({verify_secs:.2} s)",
        bytes as f64 / 1e6,
        n as f64 / fill_secs,
        total as f64 / export_secs,
        total as f64 / verify_secs,
    );
}

/// Segment files: the log rolls over into new files, a restart without a
/// clean close replays what followed the last saved state (across files),
/// damage inside a file is named, and pruning removes whole files.
fn segments_roll_replay_and_prune(b: Backend) {
    let (f, s) = Fixture::new(b);
    // 8 events per segment file.
    let small = || AuditConfig {
        segment_bits: 3,
        ..cfg()
    };
    let dir = f.store_path().join("audit");
    let segs = || {
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".log"))
            .collect();
        v.sort();
        v
    };
    let log = AuditLog::open(&s, small()).unwrap();
    fill(&log, 1, 30);
    log.checkpoint_now(NOW).unwrap();
    fill(&log, 31, 21);
    let head = log.head();
    assert_eq!(head.size, 51);
    // 51 events in files of 8: 7 files.
    assert_eq!(segs().len(), 7, "{:?}", segs());
    // A crash: no close, no checkpoint of the last 21 events.
    drop(log);
    drop(s);
    let s = f.reopen();
    let log = AuditLog::open(&s, small()).unwrap();
    assert_eq!(log.head(), head, "events after the saved state replayed");
    for seq in [1, 8, 9, 30, 31, 51] {
        let e = log.event(seq).unwrap().unwrap();
        assert_eq!(e.seq, seq);
    }
    fill(&log, 52, 13);
    let out = export(&log, f.dir.path(), EventRange::All, None);
    let r = verify_bundle(&out).unwrap();
    assert_eq!((r.first_seq, r.last_seq), (Some(1), Some(64)));
    let (ok, why) = openssl_verify(&out);
    assert!(ok, "{why}");

    // Prune through 20: files 1..=8 and 9..=16 go, 17..=24 stays (partly
    // pruned), and what is left still verifies.
    let p = log.prune_before(21).unwrap();
    assert_eq!((p.pruned, p.events_removed), (20, 20));
    assert_eq!(segs().len(), 6, "{:?}", segs());
    assert!(log.event(20).unwrap().is_none());
    assert_eq!(log.event(21).unwrap().unwrap().seq, 21);
    let out = export(&log, f.dir.path(), EventRange::All, None);
    let r = verify_bundle(&out).unwrap();
    assert_eq!((r.first_seq, r.last_seq), (Some(21), Some(64)));
    log.close(NOW).unwrap();
    drop(log);
    drop(s);

    // One flipped byte inside a stored event, in its body or its record
    // header: an export refuses, naming it (records of ~230 bytes: the 5th
    // of the file holding events 33..=40 is event 37).
    let seg = dir.join("000000000004.log");
    let clean = std::fs::read(&seg).unwrap();
    let rec = clean.len() / 8;
    for (i, at) in [rec * 4 + 60, rec * 4].into_iter().enumerate() {
        let mut bytes = clean.clone();
        bytes[at] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        let s = f.reopen();
        let log = AuditLog::open(&s, small()).unwrap();
        let err = log
            .export(
                &ExportOptions {
                    range: EventRange::All,
                    after: None,
                    now: NOW,
                },
                &f.dir.path().join(format!("damaged-{i}")),
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, AuditError::Corrupt(_)) && msg.contains("event 37"),
            "{msg}"
        );
    }
}

both_backends!(
    segments_roll_replay_and_prune,
    concurrent_appends_export_verify,
    tampering_is_located,
    consecutive_exports_are_consistent,
    rewritten_store_is_inconsistent,
    restart_continues_the_log,
    stalled_writes_fail_within_the_deadline,
    prune_keeps_the_rest_verifiable,
    proofs_from_the_store,
    empty_and_time_ranges,
    auditor_procedure_from_the_docs,
    measure,
);
