//! Crash harness (issue 7, "Crashes"): keyseald under mixed write load is
//! SIGKILLed at random moments and restarted on the same store, again and
//! again (10 kills per backend here; `KEYSEAL_CRASH_KILLS=100` for the long
//! run; `KEYSEAL_CRASH_SEED=N` replays a schedule).
//!
//! The load, over gRPC, concurrently: secret puts with unique names and
//! values; API key issues, revokes and verifies; proxy target and proxy
//! puts (each with a unique field value) on a few names per worker; and, in
//! some rounds, a root rotation started at a random moment. After every
//! restart:
//!
//! - every acknowledged put reads back exactly; an unacknowledged one is
//!   either there with exactly its value (version 1) or absent;
//! - every acknowledged issued key verifies as valid, every acknowledged
//!   revocation stays revoked; an unacknowledged revoke left the key either
//!   active or revoked, and Get and Verify agree on which; an
//!   unacknowledged issue left at most one key;
//! - every proxy target / proxy holds the value of its last acknowledged
//!   put or of a later (unacknowledged) attempt, never an older one;
//! - an interrupted root rotation is resumed by the daemon and completes:
//!   the active version advanced when the rotation had got under way (or
//!   was acknowledged complete), every older version is retired, and all
//!   records still read (with a cold DEK cache, so from the device);
//! - the audit log exports and verifies, and holds an `ok` event for every
//!   acknowledged request (matched by op and target, counted).
//!
//! The figure line: `crash_harness: backend=... kills=N acked=N lost=0
//! unacked_visible_wrong=0`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{audit_events, runtime, TestDaemon, ROOT_POLICY};
use common::Backend;
use keyseal::api::pb;
use keyseal::api::pb::api_keys_client::ApiKeysClient;
use keyseal::api::pb::proxy_client::ProxyClient;
use keyseal::client::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

const PROXY_POLICY: &str = r#"
[[rule]]
name = "root: proxies"
capabilities = ["proxy:admin"]
names = ["**"]
[rule.match]
uid = 0
"#;

/// Verifying revoked keys counts as failures for the brute-force guard;
/// the checks verify hundreds of them from one caller.
const CONFIG: &str = r#"
[apikeys]
failed_verifies_per_minute = 1000000
caller_failed_verifies_per_minute = 10000000
"#;

/// Target (and proxy) names per proxy worker; each is overwritten again
/// and again across rounds.
const PROXY_NAMES: usize = 3;
/// Bound on one request during the load (the daemon may be gone).
const OP_TIMEOUT: Duration = Duration::from_secs(10);

struct Params {
    put_workers: usize,
    key_workers: usize,
    proxy_workers: usize,
    /// Pause between two ops of a worker (keeps the slower backend's store
    /// small enough for 10 rounds of full read-back).
    pace: Duration,
    /// Kill this long (ms, uniform) after the load got under way.
    kill_ms: std::ops::Range<u64>,
    /// Chance that a round starts a root rotation.
    rotate_chance: f64,
}

fn params(b: Backend) -> Params {
    match b {
        Backend::SoftHsm => Params {
            put_workers: 4,
            key_workers: 2,
            proxy_workers: 2,
            pace: Duration::from_millis(0),
            kill_ms: 300..2000,
            rotate_chance: 0.6,
        },
        // ~1.5 ms per unseal, one TPM command at a time
        Backend::Tpm => Params {
            put_workers: 2,
            key_workers: 1,
            proxy_workers: 1,
            pace: Duration::from_millis(5),
            kill_ms: 300..2000,
            rotate_chance: 0.6,
        },
    }
}

/// One gRPC connection with every client the harness needs.
#[derive(Clone)]
struct Conn {
    c: Client,
    apikeys: ApiKeysClient<Channel>,
    proxy: ProxyClient<Channel>,
}

impl Conn {
    async fn connect(socket: &Path) -> Option<Conn> {
        let c = Client::connect(socket).await.ok()?;
        let ch = keyseal::client::connect(socket).await.ok()?;
        Some(Conn {
            c,
            apikeys: ApiKeysClient::new(ch.clone()),
            proxy: ProxyClient::new(ch),
        })
    }
}

/// Answered requests by (op, target, ok), as the audit log names them:
/// `ok` for a request answered OK (its event must have result `ok`),
/// else answered with an error status (NOT_FOUND of a probe for an
/// unacknowledged put): its event may have any result.
#[derive(Default, Clone)]
struct Acks(HashMap<(String, String, bool), u64>);

impl Acks {
    fn add(&mut self, op: &str, target: &str) {
        *self
            .0
            .entry((op.to_owned(), target.to_owned(), true))
            .or_default() += 1;
    }
    fn add_answered(&mut self, op: &str, target: &str) {
        *self
            .0
            .entry((op.to_owned(), target.to_owned(), false))
            .or_default() += 1;
    }
    fn merge(&mut self, o: Acks) {
        for (k, v) in o.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// A put of a proxy config value: the value and whether it was acked.
type Attempt = (String, bool);

/// What one worker did in one round.
#[derive(Default)]
struct Outcome {
    acks: Acks,
    /// Acknowledged writes (the figure's N).
    writes: u64,
    puts_acked: Vec<(String, Vec<u8>)>,
    puts_unacked: Vec<(String, Vec<u8>)>,
    /// (id, key, owner)
    issued: Vec<(String, String, String)>,
    issues_unacked: Vec<String>,
    revoked: Vec<String>,
    revokes_unacked: Vec<String>,
    /// target name -> attempts in order
    targets: BTreeMap<String, Vec<Attempt>>,
    proxies: BTreeMap<String, Vec<Attempt>>,
    /// During the load: a read that disagreed with an acknowledged write.
    wrong: Vec<String>,
    first_error: Option<String>,
    /// When the first failure happened (before the kill: a real failure).
    failed_at: Option<Instant>,
}

impl Outcome {
    fn failed<T>(
        &mut self,
        what: &str,
        r: &Result<Result<T, tonic::Status>, tokio::time::error::Elapsed>,
    ) {
        if self.first_error.is_none() {
            self.failed_at = Some(Instant::now());
            self.first_error = Some(match r {
                Ok(Err(s)) => format!("{what}: {:?}: {}", s.code(), s.message()),
                Ok(Ok(_)) => String::new(),
                Err(_) => format!("{what}: no answer within {OP_TIMEOUT:?}"),
            });
        }
    }
}

/// The state every check compares against: what the harness knows is (or
/// may be) in the store.
#[derive(Default)]
struct World {
    secrets: BTreeMap<String, Vec<u8>>,
    /// id -> (key, owner) of keys that must verify.
    live_keys: BTreeMap<String, (String, String)>,
    /// id -> key of keys that must not verify.
    revoked: BTreeMap<String, String>,
    /// Owners of issues whose answer was lost: at most one key each.
    unknown_issues: Vec<String>,
    targets: BTreeMap<String, String>,
    proxies: BTreeMap<String, String>,
    /// Active root version after the last check.
    root_version: u32,
    acks: Acks,
    writes: u64,
    rotations_completed: u32,
    rotations_resumed: u32,
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Result<T, tonic::Status>, tokio::time::error::Elapsed> {
    tokio::time::timeout(OP_TIMEOUT, f)
        .await
        .map(|r| r.map(|r| r.into_inner()))
}

/// Secret puts with unique names and values; every fifth is read back at
/// once.
async fn put_worker(
    socket: PathBuf,
    round: usize,
    id: usize,
    pace: Duration,
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
) -> Outcome {
    let mut o = Outcome::default();
    let Some(mut c) = Conn::connect(&socket).await else {
        o.first_error = Some("connect failed".into());
        return o;
    };
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let name = format!("crash/r{round}/p{id}/s{n}");
        let value = format!("v-{round}-{id}-{n}-{:016x}", rand::random::<u64>()).into_bytes();
        let r = timed(c.c.secrets.put(pb::PutRequest {
            name: name.clone(),
            value: value.clone(),
            ..Default::default()
        }))
        .await;
        match r {
            Ok(Ok(_)) => {
                o.acks.add("secret.put", &name);
                o.writes += 1;
                o.puts_acked.push((name.clone(), value.clone()));
                started.fetch_add(1, Ordering::SeqCst);
            }
            _ => {
                o.failed("secret.put", &r);
                o.puts_unacked.push((name, value));
                return o;
            }
        }
        if n % 5 == 0 {
            let r = timed(c.c.secrets.get(pb::GetRequest {
                name: name.clone(),
                version: 0,
            }))
            .await;
            match r {
                Ok(Ok(g)) => {
                    o.acks.add("secret.get", &name);
                    if g.value != value {
                        o.wrong
                            .push(format!("{name}: read another value during the load"));
                    }
                }
                _ => {
                    o.failed("secret.get", &r);
                    return o;
                }
            }
        }
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    o
}

/// API keys: issues (unique owners), revokes of earlier keys, and verifies.
#[allow(clippy::too_many_arguments)]
async fn key_worker(
    socket: PathBuf,
    round: usize,
    id: usize,
    seed: u64,
    pace: Duration,
    mut live: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let mut o = Outcome::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let Some(mut c) = Conn::connect(&socket).await else {
        o.first_error = Some("connect failed".into());
        return o;
    };
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let dice: f64 = rng.gen();
        if dice < 0.3 && !live.is_empty() {
            let (kid, _) = live.swap_remove(rng.gen_range(0..live.len()));
            let r = timed(
                c.apikeys
                    .revoke(pb::RevokeApiKeyRequest { id: kid.clone() }),
            )
            .await;
            match r {
                Ok(Ok(_)) => {
                    o.acks.add("apikey.revoke", &kid);
                    o.writes += 1;
                    o.revoked.push(kid);
                }
                _ => {
                    o.failed("apikey.revoke", &r);
                    o.revokes_unacked.push(kid);
                    return o;
                }
            }
        } else if dice < 0.45 && !live.is_empty() {
            let (kid, key) = live[rng.gen_range(0..live.len())].clone();
            let r = timed(c.apikeys.verify(pb::VerifyApiKeyRequest {
                key,
                ..Default::default()
            }))
            .await;
            match r {
                Ok(Ok(v)) => {
                    o.acks.add("apikey.verify", "");
                    if !v.valid || v.key_id != kid {
                        o.wrong
                            .push(format!("{kid}: did not verify during the load"));
                    }
                }
                _ => {
                    o.failed("apikey.verify", &r);
                    return o;
                }
            }
        } else {
            let owner = format!("crash/r{round}/k{id}/o{n}");
            let r = timed(c.apikeys.issue(pb::IssueApiKeyRequest {
                owner: owner.clone(),
                scopes: vec!["crash:test".into()],
                ..Default::default()
            }))
            .await;
            match r {
                Ok(Ok(k)) => {
                    let kid = k.meta.map(|m| m.id).unwrap_or_default();
                    o.acks.add("apikey.issue", &owner);
                    o.writes += 1;
                    live.push((kid.clone(), k.key.clone()));
                    o.issued.push((kid, k.key, owner));
                }
                _ => {
                    o.failed("apikey.issue", &r);
                    o.issues_unacked.push(owner);
                    return o;
                }
            }
        }
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    o
}

fn target_name(w: usize, k: usize) -> String {
    format!("crash-t{w}-{k}")
}

fn proxy_name(w: usize, k: usize) -> String {
    format!("crash-p{w}-{k}")
}

/// Proxy configuration: target puts (unique base URL path) and proxy puts
/// (unique key owner) over a few names, overwritten again and again.
#[allow(clippy::too_many_arguments)]
async fn proxy_worker(
    socket: PathBuf,
    round: usize,
    w: usize,
    seed: u64,
    pace: Duration,
    mut have_target: [bool; PROXY_NAMES],
    stop: Arc<AtomicBool>,
) -> Outcome {
    let mut o = Outcome::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let Some(mut c) = Conn::connect(&socket).await else {
        o.first_error = Some("connect failed".into());
        return o;
    };
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let k = rng.gen_range(0..PROXY_NAMES);
        let tname = target_name(w, k);
        if !have_target[k] || rng.gen_bool(0.5) {
            let url = format!("https://upstream.example.com/r{round}/n{n}");
            let r = timed(c.proxy.put_target(pb::PutTargetRequest {
                target: Some(pb::ProxyTarget {
                    name: tname.clone(),
                    base_url: url.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await;
            let ok = r.as_ref().is_ok_and(|r| r.is_ok());
            o.targets
                .entry(tname.clone())
                .or_default()
                .push((url.clone(), ok));
            match r {
                Ok(Ok(t)) => {
                    o.acks.add("proxy.target.put", &tname);
                    o.writes += 1;
                    have_target[k] = true;
                    if t.base_url != url {
                        o.wrong.push(format!(
                            "{tname}: answered base_url {} for {url}",
                            t.base_url
                        ));
                    }
                }
                _ => {
                    o.failed("proxy.target.put", &r);
                    return o;
                }
            }
        } else {
            let pname = proxy_name(w, k);
            let owner = format!("crash/r{round}/n{n}");
            let r = timed(c.proxy.put_proxy(pb::PutProxyRequest {
                proxy: Some(pb::ProxyInfo {
                    name: pname.clone(),
                    target: tname.clone(),
                    default_effect: "deny".into(),
                    key_owners: vec![owner.clone()],
                    ..Default::default()
                }),
            }))
            .await;
            let ok = r.as_ref().is_ok_and(|r| r.is_ok());
            o.proxies
                .entry(pname.clone())
                .or_default()
                .push((owner.clone(), ok));
            match r {
                Ok(Ok(_)) => {
                    o.acks.add("proxy.put", &pname);
                    o.writes += 1;
                }
                _ => {
                    o.failed("proxy.put", &r);
                    return o;
                }
            }
        }
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    o
}

/// What the round's rotation request saw.
#[derive(Default, Debug)]
struct RotationSeen {
    requested: bool,
    /// The stream started (the request's `ok` event is written then).
    acked: bool,
    /// Highest `to_version` in a progress message: the rotation was under
    /// way (the new version is active once progress is reported).
    to: u32,
    completed: bool,
    error: Option<String>,
    failed_at: Option<Instant>,
}

async fn rotate(socket: PathBuf, after: Duration) -> RotationSeen {
    let mut seen = RotationSeen::default();
    tokio::time::sleep(after).await;
    let Some(mut c) = Conn::connect(&socket).await else {
        return seen;
    };
    seen.requested = true;
    let r =
        tokio::time::timeout(OP_TIMEOUT, c.c.system.rotate_root(pb::RotateRootRequest {})).await;
    let mut stream = match r {
        Ok(Ok(s)) => {
            seen.acked = true;
            s.into_inner()
        }
        Ok(Err(s)) => {
            seen.error = Some(format!("{:?}: {}", s.code(), s.message()));
            seen.failed_at = Some(Instant::now());
            return seen;
        }
        Err(_) => {
            seen.error = Some("no answer".into());
            seen.failed_at = Some(Instant::now());
            return seen;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(p)) => {
                seen.to = seen.to.max(p.to_version);
                if p.completed {
                    seen.completed = true;
                    return seen;
                }
            }
            Ok(None) => return seen,
            Err(s) => {
                seen.error = Some(format!("{:?}: {}", s.code(), s.message()));
                seen.failed_at = Some(Instant::now());
                return seen;
            }
        }
    }
}

async fn status(c: &mut Conn) -> pb::StatusResponse {
    c.c.system
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Findings of one check pass.
#[derive(Default)]
struct Findings {
    /// Acknowledged operations not (exactly) there.
    lost: Vec<String>,
    /// Unacknowledged operations visible in a wrong or partial form.
    unacked_wrong: Vec<String>,
    /// Acknowledged requests without their `ok` audit event.
    unaudited: Vec<String>,
    rotation: String,
}

/// Checks after a restart; updates `world` with what is now known to be in
/// the store (an unacknowledged write found complete is kept from now on).
async fn check(
    socket: &Path,
    log: &Path,
    world: &mut World,
    round: &[Outcome],
    rotation: &RotationSeen,
) -> Findings {
    let mut f = Findings::default();
    let mut c = Conn::connect(socket).await.expect("connect after restart");
    let mut acks = Acks::default();

    // 1. Root rotation: a pending one is resumed by the daemon; wait for it.
    let st0 = status(&mut c).await;
    let pending_at_start = st0.rotating_to;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut st = st0;
    let mut polls = 0u64;
    while st.rotating_to != 0 {
        polls += 1;
        // the daemon logs a failed resume (and leaves the rotation pending)
        let failed = polls % 20 == 0
            && std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains("resumed root rotation failed");
        if failed || Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("rotation") || l.contains("ERROR"))
                .collect();
            panic!(
                "the resumed root rotation to v{} did not complete ({}); daemon log:\n{}",
                st.rotating_to,
                if failed {
                    "it failed"
                } else {
                    "not within 120 s"
                },
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        st = status(&mut c).await;
    }
    if rotation.acked {
        // the request's event is written before its stream starts
        acks.add("root.rotate", "");
    }
    let prev = world.root_version;
    let active = st.root_key_version;
    let under_way = rotation.to != 0 || rotation.completed;
    if under_way && active < rotation.to.max(prev + 1) {
        f.lost.push(format!(
            "root rotation to v{} was under way (completed: {}) but the active version is v{active}",
            rotation.to, rotation.completed
        ));
    }
    if active < prev || active > prev + 1 {
        f.unacked_wrong.push(format!(
            "root version went from v{prev} to v{active} with at most one rotation"
        ));
    }
    let retired: BTreeSet<u32> = st.retired_root_versions.iter().copied().collect();
    let expect: BTreeSet<u32> = (1..active).collect();
    if retired != expect {
        f.lost.push(format!(
            "active root v{active} but retired versions are {retired:?} (expected {expect:?})"
        ));
    }
    if active > prev {
        world.rotations_completed += 1;
    }
    world.root_version = active;
    f.rotation = format!(
        "root v{prev} -> v{active}{}{}",
        if pending_at_start != 0 {
            format!(" (resumed the rotation to v{pending_at_start})")
        } else {
            String::new()
        },
        if rotation.requested {
            format!(
                "; this round's rotation: acked {} progress-to v{} completed {}{}",
                rotation.acked,
                rotation.to,
                rotation.completed,
                rotation
                    .error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        } else {
            String::new()
        }
    );

    // 2. Secrets: every acknowledged put exactly; unacknowledged ones
    // complete or absent. Read by a few concurrent tasks.
    for o in round {
        for (n, v) in &o.puts_acked {
            world.secrets.insert(n.clone(), v.clone());
        }
    }
    let names: Vec<(String, Vec<u8>, bool)> = world
        .secrets
        .iter()
        .map(|(n, v)| (n.clone(), v.clone(), true))
        .chain(
            round
                .iter()
                .flat_map(|o| o.puts_unacked.iter())
                .filter(|(n, _)| !world.secrets.contains_key(n))
                .map(|(n, v)| (n.clone(), v.clone(), false)),
        )
        .collect();
    let chunks: Vec<Vec<(String, Vec<u8>, bool)>> = names
        .chunks(names.len().div_ceil(4).max(1))
        .map(|c| c.to_vec())
        .collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (name, value, acked) in chunk {
                let r =
                    c.c.secrets
                        .get(pb::GetRequest {
                            name: name.clone(),
                            version: 0,
                        })
                        .await;
                out.push((name, value, acked, r.map(|r| r.into_inner())));
            }
            out
        }));
    }
    for t in tasks {
        for (name, value, acked, r) in t.await.unwrap() {
            match (acked, r) {
                (true, Ok(g)) if g.value == value => acks.add("secret.get", &name),
                (true, Ok(g)) => {
                    acks.add("secret.get", &name);
                    f.lost
                        .push(format!("{name}: another value (v{})", g.version));
                }
                (true, Err(s)) => f.lost.push(format!("{name}: {:?}", s.code())),
                (false, Ok(g)) => {
                    acks.add("secret.get", &name);
                    if g.value != value || g.version != 1 {
                        f.unacked_wrong.push(format!(
                            "{name}: unacknowledged put visible as another value or version (v{})",
                            g.version
                        ));
                    } else {
                        world.secrets.insert(name, value);
                    }
                }
                (false, Err(s)) if s.code() == tonic::Code::NotFound => {
                    acks.add_answered("secret.get", &name);
                }
                (false, Err(s)) => f.unacked_wrong.push(format!(
                    "{name}: unacknowledged put reads as {:?}",
                    s.code()
                )),
            }
        }
    }

    // 3. API keys.
    for o in round {
        for (id, key, owner) in &o.issued {
            world
                .live_keys
                .insert(id.clone(), (key.clone(), owner.clone()));
        }
        for id in &o.revoked {
            if let Some((key, _)) = world.live_keys.remove(id) {
                world.revoked.insert(id.clone(), key);
            }
        }
    }
    for o in round {
        for id in &o.revokes_unacked {
            let Some((key, _)) = world.live_keys.get(id).cloned() else {
                continue;
            };
            let meta = c.apikeys.get(pb::GetApiKeyRequest { id: id.clone() }).await;
            let state = match meta {
                Ok(m) => {
                    acks.add("apikey.get", id);
                    m.into_inner().state
                }
                Err(s) => {
                    f.lost
                        .push(format!("key {id}: Get answered {:?}", s.code()));
                    continue;
                }
            };
            match state.as_str() {
                "revoked" => {
                    world.live_keys.remove(id);
                    world.revoked.insert(id.clone(), key);
                }
                "active" => {}
                other => f.unacked_wrong.push(format!(
                    "key {id}: state {other} after an unacknowledged revoke"
                )),
            }
        }
        world
            .unknown_issues
            .extend(o.issues_unacked.iter().cloned());
    }
    let verify_all: Vec<(String, String, bool)> = world
        .live_keys
        .iter()
        .map(|(id, (k, _))| (id.clone(), k.clone(), true))
        .chain(
            world
                .revoked
                .iter()
                .map(|(id, k)| (id.clone(), k.clone(), false)),
        )
        .collect();
    for (id, key, want) in verify_all {
        match c
            .apikeys
            .verify(pb::VerifyApiKeyRequest {
                key,
                ..Default::default()
            })
            .await
        {
            Ok(v) => {
                acks.add("apikey.verify", "");
                let v = v.into_inner();
                if want && (!v.valid || v.key_id != id) {
                    f.lost
                        .push(format!("key {id}: issued (acked) but does not verify"));
                }
                if !want && v.valid {
                    f.lost
                        .push(format!("key {id}: revoked (acked) but verifies"));
                }
            }
            Err(s) => f
                .lost
                .push(format!("key {id}: Verify answered {:?}", s.code())),
        }
    }
    for owner in &world.unknown_issues {
        match c
            .apikeys
            .list(pb::ListApiKeysRequest {
                owner: owner.clone(),
                include_inactive: true,
                ..Default::default()
            })
            .await
        {
            Ok(l) => {
                acks.add("apikey.list", owner);
                let n = l.into_inner().keys.len();
                if n > 1 {
                    f.unacked_wrong.push(format!(
                        "owner {owner}: {n} keys after one unacknowledged issue"
                    ));
                }
            }
            Err(s) => f.lost.push(format!("list {owner}: {:?}", s.code())),
        }
    }

    // 4. Proxy configuration: the last acked value or a later attempt.
    let targets: BTreeMap<String, String> =
        match c.proxy.list_targets(pb::ProxyListRequest {}).await {
            Ok(l) => {
                acks.add("proxy.target.list", "");
                l.into_inner()
                    .targets
                    .into_iter()
                    .map(|t| (t.name, t.base_url))
                    .collect()
            }
            Err(s) => {
                f.lost.push(format!("ListTargets: {:?}", s.code()));
                BTreeMap::new()
            }
        };
    let mut target_attempts: BTreeMap<String, Vec<Attempt>> = BTreeMap::new();
    let mut proxy_attempts: BTreeMap<String, Vec<Attempt>> = BTreeMap::new();
    for o in round {
        for (k, v) in &o.targets {
            target_attempts
                .entry(k.clone())
                .or_default()
                .extend(v.iter().cloned());
        }
        for (k, v) in &o.proxies {
            proxy_attempts
                .entry(k.clone())
                .or_default()
                .extend(v.iter().cloned());
        }
    }
    let mut proxies_now = BTreeMap::new();
    let proxy_names: BTreeSet<String> = world
        .proxies
        .keys()
        .cloned()
        .chain(proxy_attempts.keys().cloned())
        .collect();
    for name in &proxy_names {
        match c
            .proxy
            .get_proxy(pb::ProxyNameRequest { name: name.clone() })
            .await
        {
            Ok(p) => {
                acks.add("proxy.get", name);
                let owners = p.into_inner().key_owners;
                proxies_now.insert(name.clone(), owners.join(","));
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                acks.add_answered("proxy.get", name);
            }
            Err(s) => f.lost.push(format!("GetProxy {name}: {:?}", s.code())),
        }
    }
    for (kind, known, attempts, now) in [
        ("target", &mut world.targets, &target_attempts, &targets),
        ("proxy", &mut world.proxies, &proxy_attempts, &proxies_now),
    ] {
        let names: BTreeSet<String> = known.keys().chain(attempts.keys()).cloned().collect();
        for name in names {
            let list = attempts.get(&name).cloned().unwrap_or_default();
            // the allowed values: the last acked (or the known value when
            // nothing was acked this round), and every later attempt
            let last_ack = list.iter().rposition(|(_, ok)| *ok);
            let mut allowed: Vec<Option<String>> = Vec::new();
            match last_ack {
                Some(i) => {
                    allowed.extend(list[i..].iter().map(|(v, _)| Some(v.clone())));
                }
                None => {
                    allowed.push(known.get(&name).cloned());
                    allowed.extend(list.iter().map(|(v, _)| Some(v.clone())));
                }
            }
            let got = now.get(&name).cloned();
            if allowed.contains(&got) {
                match got {
                    Some(v) => {
                        known.insert(name, v);
                    }
                    None => {
                        known.remove(&name);
                    }
                }
                continue;
            }
            let acked_value = match last_ack {
                Some(i) => Some(list[i].0.clone()),
                None => known.get(&name).cloned(),
            };
            let msg = format!(
                "{kind} {name}: holds {got:?}, expected {acked_value:?} or a later attempt"
            );
            // an older or foreign value means an acknowledged put was lost
            if acked_value.is_some() {
                f.lost.push(msg);
            } else {
                f.unacked_wrong.push(msg);
            }
        }
    }

    // 5. Audit: an ok event for every acknowledged request.
    for o in round {
        world.writes += o.writes;
        world.acks.merge(o.acks.clone());
    }
    world.acks.merge(acks);
    let events = audit_events(&mut c.c, "").await;
    let mut have: HashMap<(String, String, bool), u64> = HashMap::new();
    world.rotations_resumed = events
        .iter()
        .filter(|e| e["op"] == "root.rotate.completed" && e["detail"]["resumed"] == "true")
        .count() as u32;
    for e in &events {
        let op = e["op"].as_str().unwrap_or("").to_owned();
        let target = e["target"].as_str().unwrap_or("").to_owned();
        if e["result"] == "ok" {
            *have.entry((op.clone(), target.clone(), true)).or_default() += 1;
        }
        *have.entry((op, target, false)).or_default() += 1;
    }
    for (key, n) in &world.acks.0 {
        let h = have.get(key).copied().unwrap_or(0);
        let (op, target, ok) = key;
        if h < *n {
            f.unaudited.push(format!(
                "{op} {target}: {n} answered{}, {h} such events",
                if *ok { " OK" } else { " (error status)" }
            ));
        }
    }
    f
}

fn kills() -> usize {
    std::env::var("KEYSEAL_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn seed() -> u64 {
    std::env::var("KEYSEAL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random)
}

fn crash_harness(b: Backend) {
    let kills = kills();
    let seed = seed();
    let p = params(b);
    let backend = match b {
        Backend::SoftHsm => "softhsm",
        Backend::Tpm => "swtpm",
    };
    println!("crash_harness: backend={backend} seed={seed} kills={kills} (KEYSEAL_CRASH_SEED={seed} replays the schedule)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = TestDaemon::start_with(b, &format!("{ROOT_POLICY}\n{PROXY_POLICY}"), CONFIG);
    let rt = runtime();
    let mut world = World {
        root_version: 1,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut lost_total = 0usize;
    let mut wrong_total = 0usize;
    for round in 0..kills {
        let t_round = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for id in 0..p.put_workers {
            tasks.push(rt.spawn(put_worker(
                d.socket.clone(),
                round,
                id,
                p.pace,
                stop.clone(),
                started.clone(),
            )));
        }
        let live: Vec<(String, String)> = world
            .live_keys
            .iter()
            .map(|(id, (k, _))| (id.clone(), k.clone()))
            .collect();
        for id in 0..p.key_workers {
            let mine = live
                .iter()
                .enumerate()
                .filter(|(i, _)| i % p.key_workers == id)
                .map(|(_, k)| k.clone())
                .collect();
            tasks.push(rt.spawn(key_worker(
                d.socket.clone(),
                round,
                id,
                rng.gen(),
                p.pace,
                mine,
                stop.clone(),
            )));
        }
        for w in 0..p.proxy_workers {
            let have = std::array::from_fn(|k| world.targets.contains_key(&target_name(w, k)));
            tasks.push(rt.spawn(proxy_worker(
                d.socket.clone(),
                round,
                w,
                rng.gen(),
                p.pace,
                have,
                stop.clone(),
            )));
        }
        // the load is under way (bounded wait), then a random moment later
        let begun = Instant::now();
        while started.load(Ordering::SeqCst) < p.put_workers as u64
            && begun.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let kill_after = rng.gen_range(p.kill_ms.clone());
        let rotation = if rng.gen_bool(p.rotate_chance) {
            let at = Duration::from_millis(rng.gen_range(0..kill_after));
            Some(rt.spawn(rotate(d.socket.clone(), at)))
        } else {
            None
        };
        std::thread::sleep(Duration::from_millis(kill_after));
        let killed_at = Instant::now();
        d.kill9();
        // let the clients see the dead socket, then stop them
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::SeqCst);
        let outcomes: Vec<Outcome> = tasks.into_iter().map(|t| rt.block_on(t).unwrap()).collect();
        let rotation = match rotation {
            Some(t) => rt.block_on(t).unwrap(),
            None => RotationSeen::default(),
        };
        let round_writes: u64 = outcomes.iter().map(|o| o.writes).sum();
        let errors: BTreeSet<String> = outcomes
            .iter()
            .filter_map(|o| o.first_error.clone())
            .collect();
        let during: Vec<String> = outcomes.iter().flat_map(|o| o.wrong.clone()).collect();
        // A request that failed while the daemon was up is a failure of its
        // own (e.g. a device error under load), not an effect of the kill.
        let mut before_kill: Vec<String> = outcomes
            .iter()
            .filter(|o| o.failed_at.is_some_and(|t| t < killed_at))
            .filter_map(|o| o.first_error.clone())
            .collect();
        if rotation.failed_at.is_some_and(|t| t < killed_at) {
            before_kill.push(format!("root.rotate: {:?}", rotation.error));
        }
        assert!(
            before_kill.is_empty(),
            "requests failed while keyseald was up (seed {seed}, round {}): {before_kill:?}",
            round + 1
        );
        assert!(
            round_writes > 0,
            "no write was acknowledged in round {round}"
        );

        let t_spawn = Instant::now();
        d.spawn();
        let spawn_s = t_spawn.elapsed().as_secs_f64();
        let t_check = Instant::now();
        let mut f = rt.block_on(check(&d.socket, &d.log, &mut world, &outcomes, &rotation));
        f.lost.extend(during);
        let check_s = t_check.elapsed().as_secs_f64();
        let t_export = Instant::now();
        let bundle = format!("export-{round}");
        let report = d.export_and_verify(&bundle);
        // Verified: nothing reads it again. A long run's bundles grow with
        // the log (~300 MB each past 1M events); keeping all 100 filled
        // the disk of a 100-kill run, and below the audit reserve keyseald
        // rightly fails every request closed.
        let _ = std::fs::remove_dir_all(d.dir().join(&bundle));
        println!(
            "round {}: killed after {kill_after} ms; {round_writes} writes acknowledged; {}; lost {}, unacked visible wrong {}, unaudited {}; restart {spawn_s:.1} s, check {check_s:.1} s, export+verify {:.1} s, round {:.1} s; {}",
            round + 1,
            f.rotation,
            f.lost.len(),
            f.unacked_wrong.len(),
            f.unaudited.len(),
            t_export.elapsed().as_secs_f64(),
            t_round.elapsed().as_secs_f64(),
            report.lines().next().unwrap_or("")
        );
        println!("  failures seen at the kill: {errors:?}");
        lost_total += f.lost.len() + f.unaudited.len();
        wrong_total += f.unacked_wrong.len();
        assert!(
            f.lost.is_empty(),
            "acknowledged operations lost (seed {seed}): {:?}",
            f.lost
        );
        assert!(
            f.unaudited.is_empty(),
            "acknowledged requests without an ok audit event (seed {seed}): {:?}",
            f.unaudited
        );
        assert!(
            f.unacked_wrong.is_empty(),
            "unacknowledged operations half-visible (seed {seed}): {:?}",
            f.unacked_wrong
        );
    }
    println!(
        "crash_harness: backend={backend} kills={kills} acked={} lost={lost_total} unacked_visible_wrong={wrong_total} (seed {seed}; {} secrets, {} live + {} revoked API keys, {} targets, {} proxies; root v{}, {} rotations completed, {} resumed after a kill; {} acknowledged requests matched to audit events; {:.0} s)",
        world.writes,
        world.secrets.len(),
        world.live_keys.len(),
        world.revoked.len(),
        world.targets.len(),
        world.proxies.len(),
        world.root_version,
        world.rotations_completed,
        world.rotations_resumed,
        world.acks.total(),
        t0.elapsed().as_secs_f64()
    );
    d.stop();
}

both_backends!(crash_harness);
