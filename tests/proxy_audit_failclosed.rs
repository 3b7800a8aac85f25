//! The proxy fails closed when its decisions cannot be audited: the real
//! gateway (in process, over a real SoftHSM2 root, real sockets) answers
//! 503 and sends nothing upstream once the audit log stops taking events.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, Fixture};
use keyseal::api::DaemonState;
use keyseal::audit::{AuditConfig, AuditLog, EventFilter};
use keyseal::policy::{Policy, PolicyHandle};
use keyseal::proxy::model::{CallerSelector, Effect, Proxy, Target};
use keyseal::proxy::server::{run, Gateway};
use keyseal::proxy::{ProxyConfig, ProxyStore};

/// A plain-HTTP upstream on loopback that counts the requests it gets.
fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let h = h.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut b = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            });
        }
    });
    (addr, hits)
}

/// One HTTP/1.1 request over loopback TCP, no key; (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    (status, body)
}

#[test]
fn unauditable_decisions_get_503_and_nothing_is_forwarded() {
    let (fx, s) = Fixture::new(Backend::SoftHsm);
    let s = Arc::new(s);
    let (up, hits) = upstream();
    let ca = fx.dir.path().join("ca.pem");
    {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, p.self_signed(&key).unwrap().pem()).unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let uid = nix::unistd::geteuid().as_raw();

    let apikeys = Arc::new(
        keyseal::apikeys::ApiKeys::open(&s, keyseal::apikeys::ApiKeysConfig::default()).unwrap(),
    );
    let keys = Arc::new(keyseal::keys::Keys::open(s.envelope().root().clone(), s.store()).unwrap());
    let proxies = Arc::new(ProxyStore::open(s.clone()).unwrap());
    let audit = Arc::new(AuditLog::open(&s, AuditConfig::default()).unwrap());
    proxies
        .put_target(
            Target {
                name: "up".into(),
                base_url: format!("http://{up}"),
                ca_bundle: Some(ca.to_string_lossy().into_owned()),
                connect_timeout_ms: 5_000,
                response_timeout_ms: 5_000,
                idle_timeout_ms: 1_000,
                client_cert: None,
                created_at: 0,
                updated_at: 0,
            },
            0,
        )
        .unwrap();
    proxies
        .put_proxy(
            Proxy {
                name: "p".into(),
                target: "up".into(),
                credential: None,
                default_effect: Effect::Allow,
                rate_plan: None,
                callers: vec![CallerSelector::parse(&format!("uid={uid}")).unwrap()],
                key_ids: vec![],
                key_owners: vec![],
                created_at: 0,
                updated_at: 0,
                on_anomaly: Default::default(),
            },
            0,
        )
        .unwrap();

    let gw_addr: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    rt.block_on(async {
        let (events, _) = tokio::sync::broadcast::channel(16);
        let state = Arc::new(DaemonState {
            secrets: s.clone(),
            policy: PolicyHandle::new(Policy::empty()),
            started: Instant::now(),
            hardening: keyseal::hardening::HardeningReport {
                core_dumps_disabled: false,
                non_dumpable: false,
                memory_locked: false,
                memory_lock_note: None,
            },
            events,
            request_timeout: Duration::from_secs(10),
            apikeys,
            keys,
            shutdown: stop_rx.clone(),
            proxies: proxies.clone(),
            audit: Some(audit.clone()),
            device: Arc::new(keyseal::api::device::DevicePool::new(2).unwrap()),
        });
        let cfg = ProxyConfig {
            gateway_listen: Some(gw_addr),
            ..ProxyConfig::default()
        };
        let gw = Arc::new(Gateway::new(state, proxies.clone(), cfg));
        run(gw, stop_rx).await.unwrap();
    });
    let _guard = rt.enter();

    // Audited: forwarded, and the decision is in the log.
    let (status, body) = get(gw_addr, "/p/p/v1/x");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "ok");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let filter = EventFilter {
        op: Some("proxy.request".into()),
        ..EventFilter::default()
    };
    let evs = audit.query(&filter, 0, 100).unwrap().0;
    assert_eq!(evs.len(), 1, "{evs:?}");

    // The audit log stops taking events: every decision is now a 503 with
    // a JSON body, and nothing reaches the upstream.
    audit.close(1_700_000_000).unwrap();
    for path in ["/p/p/v1/x", "/p/p/v1/y", "/p/nope/x"] {
        let (status, body) = get(gw_addr, path);
        assert_eq!(status, 503, "{path}: {body}");
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            j["error"].as_str().unwrap().contains("audit"),
            "{path}: {body}"
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "an unaudited request was forwarded"
    );

    let _ = stop_tx.send(true);
    drop(_guard);
    rt.shutdown_timeout(Duration::from_secs(5));
}
