//! Signing and API-key verification through the real `keyseald`, each
//! beside a baseline measured in the same run:
//!
//! 1. **Sign** (`Keys.Sign` of a 64-byte message) for ECDSA P-256,
//!    Ed25519 and RSA-PSS-3072 on a SoftHSM2 token, against a raw
//!    in-process `cryptoki` sign loop on the same token with the same
//!    mechanisms (ECDSA: SHA-256 in software + `CKM_ECDSA`, as keyseald
//!    does; Ed25519: `CKM_EDDSA`; RSA: `CKM_SHA256_RSA_PKCS_PSS`), once
//!    with a session key and once with a token key made like keyseald's
//!    (the like-for-like baseline: keyseald's keys must persist). Both
//!    cores: keyseald runs with `KEYSEAL_WORKERS=2` and is not pinned; the
//!    raw loop runs on 1 and on 2 threads (one logged-in session each) while
//!    keyseald is idle. The load generator is a 1-worker tokio runtime in
//!    this process and shares the two cores with keyseald, which the raw
//!    loop does not have to; the table shows the CPU each side used.
//! 2. **Verify** (`ApiKeys.Verify` of a valid key, no rate plan) against an
//!    echo ceiling: a bare tonic `ApiKeys` server (this binary re-executed
//!    with `KEYSEAL_BENCH_ROLE=echo`) whose `Verify` returns a fixed valid
//!    answer with no lookup, hash or audit. As in `grpc_load`: keyseald
//!    (restarted with `KEYSEAL_WORKERS=1`) and the echo server are pinned to
//!    CPU 1 and this process to CPU 0 when `taskset` and 2 CPUs exist
//!    (`KEYSEAL_BENCH_PIN=0` leaves placement to the kernel).
//!
//! Run: `cargo build --release --bins && cargo bench --bench sign_verify`.
//! Env: `KEYSEAL_BENCH_SECS` measured seconds per phase (default 5, after
//! 1 s of warm-up); `KEYSEAL_BENCH_ONLY=sign` or `=verify` runs one half.
//! Every request is audited (the shipped default).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use keyseal::api::pb::{
    self,
    api_keys_client::ApiKeysClient,
    api_keys_server::{ApiKeys, ApiKeysServer},
    keys_client::KeysClient,
};
use keyseal::testkit_hsm::softhsm_module;

mod common;
use common::*;

const ROLE_ENV: &str = "KEYSEAL_BENCH_ROLE";
const ECHO_SOCKET_ENV: &str = "KEYSEAL_BENCH_ECHO_SOCKET";
const PARENT_ENV: &str = "KEYSEAL_BENCH_PARENT";
const SECS_ENV: &str = "KEYSEAL_BENCH_SECS";
const PIN_ENV: &str = "KEYSEAL_BENCH_PIN";
const ONLY_ENV: &str = "KEYSEAL_BENCH_ONLY";

const WARMUP: Duration = Duration::from_secs(1);
const DEFAULT_SECS: f64 = 5.0;
const CONCURRENCY: [usize; 3] = [1, 16, 64];
const SIGN_WORKERS: usize = 2;
const VERIFY_WORKERS: usize = 1;
const MESSAGE: [u8; 64] = [0x5a; 64];

const POLICY: &str = r#"
[[rule]]
name = "bench: keys and api keys"
capabilities = ["key:sign", "key:admin", "apikey:verify", "apikey:admin"]
names = ["**"]
[rule.match]
uid = UID

[[rule]]
name = "bench: admin"
capabilities = ["system:admin"]
[rule.match]
uid = UID
"#;

/// The algorithms measured: keyseald's name and the raw mechanism.
#[derive(Clone, Copy)]
enum Alg {
    EcdsaP256,
    Ed25519,
    RsaPss3072,
}

impl Alg {
    const ALL: [Alg; 3] = [Alg::EcdsaP256, Alg::Ed25519, Alg::RsaPss3072];

    fn name(self) -> &'static str {
        match self {
            Alg::EcdsaP256 => "ecdsa-p256",
            Alg::Ed25519 => "ed25519",
            Alg::RsaPss3072 => "rsa-pss-3072",
        }
    }

    fn key_name(self) -> String {
        format!("bench/{}", self.name())
    }
}

fn pss() -> PkcsPssParams {
    PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32u64.into(),
    }
}

fn main() {
    if std::env::var(ROLE_ENV).as_deref() == Ok("echo") {
        echo_main();
        return;
    }
    let bins = match Bins::find("sign_verify") {
        Ok(b) => b,
        Err(msg) => {
            eprintln!("sign_verify: {msg}");
            std::process::exit(2);
        }
    };
    let Some(module) = softhsm_module() else {
        eprintln!("sign_verify: libsofthsm2.so not found: apt-get install softhsm2");
        std::process::exit(2);
    };
    let measure = match std::env::var(SECS_ENV) {
        Ok(v) => match v.parse::<f64>().ok().filter(|s| *s > 0.0 && *s <= 600.0) {
            Some(s) => Duration::from_secs_f64(s),
            None => {
                eprintln!("sign_verify: {SECS_ENV}={v}: expected seconds in (0, 600]");
                std::process::exit(2);
            }
        },
        Err(_) => Duration::from_secs_f64(DEFAULT_SECS),
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let pin = std::env::var(PIN_ENV).as_deref() != Ok("0") && cpus >= 2 && have_taskset();
    let only = std::env::var(ONLY_ENV).ok();
    let (do_sign, do_verify) = match only.as_deref() {
        None | Some("") => (true, true),
        Some("sign") => (true, false),
        Some("verify") => (false, true),
        Some(v) => {
            eprintln!("sign_verify: {ONLY_ENV}={v}: expected sign or verify");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Phases: 3 algs × (4 raw + 3 daemon) + 2 × 3 verify, with slack each.
    let budget = Duration::from_secs(240) + (WARMUP + measure + REQUEST_TIMEOUT) * 30;
    let code = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).unwrap();
        let mut term = signal(SignalKind::terminate()).unwrap();
        tokio::select! {
            () = run(&bins, &module, measure, pin, cpus, do_sign, do_verify) => 0,
            _ = int.recv() => { eprintln!("sign_verify: interrupted; stopping the servers"); 130 }
            _ = term.recv() => { eprintln!("sign_verify: terminated; stopping the servers"); 143 }
            () = tokio::time::sleep(budget) => {
                eprintln!("sign_verify: exceeded its time budget of {} s; stopping the servers", budget.as_secs());
                1
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

// ------------------------------------------------------------ raw cryptoki

/// The baseline: `threads` threads, each with its own logged-in session,
/// sign `MESSAGE` with a key of `alg` for warm-up + `measure`: a session
/// key (`token` false) or a token key with the attributes keyseald gives
/// its signing keys (`token` true: persistent, private, sensitive, not
/// extractable; SoftHSM2 re-checks a token object's file on each use).
/// Returns (signatures/s, this process's CPU in cores over the window).
fn raw_sign(
    ctx: &Pkcs11,
    slot: cryptoki::slot::Slot,
    pin: &str,
    alg: Alg,
    threads: usize,
    token: bool,
    measure: Duration,
) -> (f64, f64) {
    let keygen = ctx.open_rw_session(slot).unwrap();
    login(&keygen, pin);
    let (mech, public) = match alg {
        Alg::EcdsaP256 => (
            Mechanism::EccKeyPairGen,
            vec![Attribute::EcParams(vec![
                0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
            ])],
        ),
        Alg::Ed25519 => (
            Mechanism::EccEdwardsKeyPairGen,
            vec![Attribute::EcParams(vec![0x06, 0x03, 0x2b, 0x65, 0x70])],
        ),
        Alg::RsaPss3072 => (
            Mechanism::RsaPkcsKeyPairGen,
            vec![
                Attribute::ModulusBits(3072u64.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
            ],
        ),
    };
    let mut public = public;
    public.extend([Attribute::Token(token), Attribute::Verify(true)]);
    let private = [
        Attribute::Token(token),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
    ];
    let (pubkey, key) = keygen.generate_key_pair(&mech, &public, &private).unwrap();
    let start = Instant::now();
    let warm_end = start + WARMUP;
    let end = warm_end + measure;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut cpu = (0.0, 0.0);
    std::thread::scope(|sc| {
        for _ in 0..threads {
            let (done, stop) = (done.clone(), stop.clone());
            sc.spawn(move || {
                let s = ctx.open_rw_session(slot).unwrap();
                login(&s, pin);
                while !stop.load(Ordering::Relaxed) {
                    sign_once(&s, alg, key);
                    if Instant::now() >= warm_end {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let me = std::process::id();
        std::thread::sleep(warm_end.saturating_duration_since(Instant::now()));
        let c0 = cpu_secs(me);
        let n0 = done.load(Ordering::Relaxed);
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        let n1 = done.load(Ordering::Relaxed);
        let c1 = cpu_secs(me);
        stop.store(true, Ordering::Relaxed);
        cpu = ((n1 - n0) as f64, c1 - c0);
    });
    if token {
        keygen.destroy_object(key).unwrap();
        keygen.destroy_object(pubkey).unwrap();
    }
    let w = measure.as_secs_f64();
    (cpu.0 / w, cpu.1 / w)
}

fn login(s: &Session, pin: &str) {
    match s.login(UserType::User, Some(&AuthPin::from(pin.to_owned()))) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
}

fn sign_once(s: &Session, alg: Alg, key: ObjectHandle) {
    let sig = match alg {
        Alg::EcdsaP256 => s.sign(&Mechanism::Ecdsa, key, &Sha256::digest(MESSAGE)),
        Alg::Ed25519 => s.sign(
            &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
            key,
            &MESSAGE,
        ),
        Alg::RsaPss3072 => s.sign(&Mechanism::Sha256RsaPkcsPss(pss()), key, &MESSAGE),
    };
    assert!(!sig.unwrap().is_empty());
}

// ----------------------------------------------------------- echo role

/// The Verify ceiling: the same generated service, a fixed answer.
struct Echo;

fn unimpl<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("echo"))
}

#[tonic::async_trait]
impl ApiKeys for Echo {
    async fn issue(
        &self,
        _: Request<pb::IssueApiKeyRequest>,
    ) -> Result<Response<pb::IssueApiKeyResponse>, Status> {
        unimpl()
    }
    async fn verify(
        &self,
        _: Request<pb::VerifyApiKeyRequest>,
    ) -> Result<Response<pb::VerifyApiKeyResponse>, Status> {
        Ok(Response::new(pb::VerifyApiKeyResponse {
            valid: true,
            key_id: "ak_0123456789abcdef".into(),
            owner: "bench/customer".into(),
            scopes: vec!["read".into()],
            env: "live".into(),
            rate: None,
            missing_scopes: vec![],
        }))
    }
    async fn list(
        &self,
        _: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        unimpl()
    }
    async fn get(
        &self,
        _: Request<pb::GetApiKeyRequest>,
    ) -> Result<Response<pb::ApiKeyMeta>, Status> {
        unimpl()
    }
    async fn rotate(
        &self,
        _: Request<pb::RotateApiKeyRequest>,
    ) -> Result<Response<pb::RotateApiKeyResponse>, Status> {
        unimpl()
    }
    async fn revoke(
        &self,
        _: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        unimpl()
    }
    async fn revoke_owner(
        &self,
        _: Request<pb::RevokeOwnerApiKeysRequest>,
    ) -> Result<Response<pb::RevokeOwnerApiKeysResponse>, Status> {
        unimpl()
    }
}

fn echo_main() {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    if std::env::var(PARENT_ENV).ok() != Some(std::os::unix::process::parent_id().to_string()) {
        return;
    }
    let path = PathBuf::from(std::env::var_os(ECHO_SOCKET_ENV).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(VERIFY_WORKERS)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let mut term = signal(SignalKind::terminate()).unwrap();
        tonic::transport::Server::builder()
            .add_service(ApiKeysServer::new(Echo))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async move {
                    term.recv().await;
                },
            )
            .await
            .unwrap();
    });
}

// ----------------------------------------------------------------- run

async fn sign_phase(ch: &Channel, pid: u32, alg: Alg, conc: usize, measure: Duration) -> Phase {
    let client = KeysClient::new(ch.clone());
    let name = alg.key_name();
    closed_loop(conc, WARMUP, measure, pid, move |_| {
        let mut c = client.clone();
        let name = name.clone();
        async move {
            c.sign(pb::SignRequest {
                name,
                input: Some(pb::sign_request::Input::Message(MESSAGE.to_vec())),
                hash: String::new(),
            })
            .await
            .is_ok_and(|r| !r.get_ref().signature.is_empty())
        }
    })
    .await
}

async fn verify_phase(ch: &Channel, pid: u32, key: &str, conc: usize, measure: Duration) -> Phase {
    let client = ApiKeysClient::new(ch.clone());
    let key = key.to_owned();
    closed_loop(conc, WARMUP, measure, pid, move |_| {
        let mut c = client.clone();
        let key = key.clone();
        async move {
            c.verify(pb::VerifyApiKeyRequest {
                key,
                source_ip: "127.0.0.1".into(),
                required_scopes: vec!["read".into()],
                dry_run: false,
            })
            .await
            .is_ok_and(|r| r.get_ref().valid)
        }
    })
    .await
}

fn row(label: &str, conc: &str, m: &Phase) -> String {
    format!(
        "| {label} | {conc} | {:.0} | {} | {} | {:.2} | {:.1} µs | {:.2} | {} |",
        m.rps,
        fmt_dur(m.p50),
        fmt_dur(m.p99),
        m.server_cores,
        m.server_cpu_per_req().as_secs_f64() * 1e6,
        m.loadgen_cores,
        m.errors
    )
}

async fn run(
    bins: &Bins,
    module: &Path,
    measure: Duration,
    pin: bool,
    cpus: usize,
    do_sign: bool,
    do_verify: bool,
) {
    println!("sign_verify: Keys.Sign vs raw cryptoki, ApiKeys.Verify vs echo ceiling");
    println!(
        "machine: {cpus} CPUs, load average at start {}; {} s warm-up + {} s measured per phase",
        loadavg(),
        WARMUP.as_secs(),
        measure.as_secs_f64()
    );
    let home = BenchHome::new(bins, module, POLICY, "");

    let problems = if do_sign {
        // ---------------------------------------------------------- sign
        // SoftHSM2 reads its config once per process: point this process at the
        // same token before the module is loaded.
        std::env::set_var("SOFTHSM2_CONF", &home.hsm_conf);
        let ctx = Pkcs11::new(module).unwrap();
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        let slot = ctx
            .get_slots_with_initialized_token()
            .unwrap()
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .is_ok_and(|i| i.label().trim_end() == home.token_label)
            })
            .unwrap();

        let (mut daemon, ks) = home
            .start(bins, SIGN_WORKERS, None, "keyseald-sign.log")
            .await;
        let mut keys = KeysClient::new(ks.clone());
        for alg in Alg::ALL {
            keys.create(pb::CreateKeyRequest {
                name: alg.key_name(),
                algorithm: alg.name().into(),
            })
            .await
            .unwrap();
            let sig = keys
                .sign(pb::SignRequest {
                    name: alg.key_name(),
                    input: Some(pb::sign_request::Input::Message(MESSAGE.to_vec())),
                    hash: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            let ok = keys
                .verify(pb::VerifyRequest {
                    name: alg.key_name(),
                    input: Some(pb::verify_request::Input::Message(MESSAGE.to_vec())),
                    hash: String::new(),
                    signature: sig.signature,
                    version: 0,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                ok.valid,
                "{}: keyseald's signature does not verify",
                alg.name()
            );
        }

        println!();
        println!("### Sign (64-byte message), keyseald KEYSEAL_WORKERS={SIGN_WORKERS} unpinned vs raw cryptoki");
        println!();
        println!("| path | concurrency / threads | signatures/s | p50 | p99 | keyseald CPU (cores) | keyseald CPU/op | bench-process CPU (cores) | errors |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut summary = Vec::new();
        for alg in Alg::ALL {
            let mut raw_best = [0.0f64; 2];
            for (i, token) in [false, true].into_iter().enumerate() {
                let kind = if token { "token key" } else { "session key" };
                for threads in [1, 2] {
                    eprintln!("sign_verify: raw {} {kind} threads={threads}", alg.name());
                    let (rate, cores) =
                        raw_sign(&ctx, slot, home.pin, alg, threads, token, measure);
                    println!(
                        "| raw cryptoki {} {kind} | {threads} | {rate:.0} | | | (idle) | | {cores:.2} | 0 |",
                        alg.name()
                    );
                    raw_best[i] = raw_best[i].max(rate);
                }
            }
            let mut ks_best = 0.0f64;
            for conc in CONCURRENCY {
                daemon.check_alive();
                eprintln!("sign_verify: keyseald {} c={conc}", alg.name());
                let m = sign_phase(&ks, daemon.pid(), alg, conc, measure).await;
                println!(
                    "{}",
                    row(&format!("keyseald {}", alg.name()), &conc.to_string(), &m)
                );
                ks_best = ks_best.max(m.rps);
            }
            summary.push((alg, ks_best, raw_best));
        }
        println!();
        // keyseald signs with token keys (they must outlive a session), so
        // the like-for-like baseline is the token-key loop; the session-key
        // loop is the device's best case and is shown beside it.
        println!("| algorithm | keyseald best signatures/s | raw best, token key | keyseald / raw token key | goal ≥ 80% | raw best, session key | keyseald / raw session key |");
        println!("|---|---:|---:|---:|---|---:|---:|");
        for (alg, k, [rs, rt]) in &summary {
            let ratio = k / rt.max(1e-9);
            println!(
                "| {} | {k:.0} | {rt:.0} | {:.0}% | {} | {rs:.0} | {:.0}% |",
                alg.name(),
                ratio * 100.0,
                if ratio >= 0.8 { "met" } else { "MISSED" },
                k / rs.max(1e-9) * 100.0
            );
        }
        drop(ks);
        let how = daemon.stop();
        eprintln!("sign_verify: keyseald (sign phases): {how}");
        drop(ctx);
        daemon.log_problems()
    } else {
        Vec::new()
    };

    let verify_problems = if do_verify {
        // --------------------------------------------------------- verify
        if pin {
            pin_self_to_cpu0();
        }
        let server_cpus = pin.then_some("1");
        let (mut daemon, ks) = home
            .start(bins, VERIFY_WORKERS, server_cpus, "keyseald-verify.log")
            .await;
        let issued = ApiKeysClient::new(ks.clone())
            .issue(pb::IssueApiKeyRequest {
                owner: "bench/customer".into(),
                scopes: vec!["read".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let echo_socket = home.path().join("echo.sock");
        let mut echo = ChildGuard {
            name: "echo",
            child: Some(
                command_on(&std::env::current_exe().unwrap(), server_cpus)
                    .env(ROLE_ENV, "echo")
                    .env(ECHO_SOCKET_ENV, &echo_socket)
                    .env(PARENT_ENV, std::process::id().to_string())
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            ),
            log: None,
        };
        let echo_ch = wait_ready(&mut echo, &echo_socket, |ch| async move {
            ApiKeysClient::new(ch)
                .verify(pb::VerifyApiKeyRequest::default())
                .await
                .is_ok()
        })
        .await;
        drop(echo_ch);
        println!();
        println!(
            "### ApiKeys.Verify (valid key, no rate plan), keyseald KEYSEAL_WORKERS={VERIFY_WORKERS} vs echo ({VERIFY_WORKERS} worker); {}",
            if pin {
                "servers pinned to CPU 1, load generator (1 worker) to CPU 0"
            } else {
                "not pinned"
            }
        );
        println!();
        println!("| server | concurrency | requests/s | p50 | p99 | server CPU (cores) | server CPU/request | load-gen CPU (cores) | errors |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut pairs = Vec::new();
        for conc in CONCURRENCY {
            daemon.check_alive();
            echo.check_alive();
            eprintln!("sign_verify: Verify c={conc}");
            let k = verify_phase(&ks, daemon.pid(), &issued.key, conc, measure).await;
            println!("{}", row("keyseald", &conc.to_string(), &k));
            let ech = connect(&echo_socket).await.unwrap();
            let e = verify_phase(&ech, echo.pid(), &issued.key, conc, measure).await;
            println!("{}", row("echo", &conc.to_string(), &e));
            pairs.push((conc, k, e));
        }
        println!();
        println!("| concurrency | keyseald/echo requests/s | echo/keyseald server CPU per request | goal (c=64) ≥ 60% |");
        println!("|---:|---:|---:|---|");
        for (conc, k, e) in &pairs {
            let ratio = k.rps / e.rps.max(1e-9);
            let cpu = e.server_cpu_per_req().as_secs_f64()
                / k.server_cpu_per_req().as_secs_f64().max(1e-12);
            println!(
                "| {conc} | {:.0}% | {:.0}% | {} |",
                ratio * 100.0,
                cpu * 100.0,
                if *conc != 64 {
                    ""
                } else if ratio >= 0.6 {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
        drop(ks);
        let e = echo.stop();
        let k = daemon.stop();
        println!();
        println!(
            "load average at end {}; stopping: echo {e}; keyseald {k}",
            loadavg()
        );
        daemon.log_problems()
    } else {
        Vec::new()
    };
    for (what, p) in [("sign", problems), ("verify", verify_problems)] {
        if !p.is_empty() {
            println!(
                "keyseald ({what} run) logged {} warning/error lines, first:",
                p.len()
            );
            for l in p.iter().take(5) {
                println!("  {l}");
            }
        }
    }
}
