//! The proxy listeners (hyper 1.x, HTTP/1.1): the gateway
//! (`/p/<proxy>/<path>` on loopback TCP and on a Unix socket) and the
//! forward proxy (absolute-form requests for `HTTP_PROXY` users, CONNECT
//! tunnels to allow-listed hosts; tunnels to `intercept_hosts` are
//! TLS-terminated and their requests served like forward-proxy requests,
//! in `server/intercept.rs`).
//!
//! A request goes through phases, each a small function (pingora's
//! `ProxyHttp` shape): `authenticate` (proxy key, or the kernel identity of
//! a Unix-socket peer or of a loopback TCP peer via [`super::sockdiag`]) →
//! `authorize` (the proxy's callers) → `rate_limit` (the key's plan and the
//! proxy's plan) → `rules` ([`evaluate`]) → `upstream_request` (strip client
//! credentials and hop-by-hop headers, inject the target credential) →
//! `audit_decision` (the decision event is durable in the audit log, else
//! 503; refusals are audited the same way) → send (pooled client,
//! timeouts) → `response_filter` (hop-by-hop, `keyseal-decision`,
//! `X-RateLimit-*`) → log (when the response body ends).
//!
//! Nothing here caches key validity: every request verifies its key, so a
//! revocation applies to the next request. Each request takes the proxy's
//! snapshot once, so repointing a proxy at a new credential never affects
//! requests in flight.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream, UnixListener};

use super::config::ProxyConfig;
use super::model::{decide, decision_reason, Effect, RequestFacts};
use super::request::{
    gateway_path, path_is_clean, path_under_base, presented_key, strip_hop_by_hop,
    targets_for_host, upstream_request, UpstreamError,
};
use super::store::{LogEntry, ProxyStore, Snapshot};
use super::upstream::Clients;
use crate::api::DaemonState;
use crate::apikeys::{VerifyCaller, VerifyRequest};
use crate::identity::{Identifier, PeerIdentity};
use crate::policy::Capability;
use crate::ratelimit::{Limiter, RateDecision, RatePlan};

mod intercept;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies of answers.
pub type RespBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Name of the response header telling which rule allowed a call.
pub const DECISION_HEADER: &str = "keyseal-decision";

pub use super::request::Mode;

/// Who is at the other end of the connection.
#[derive(Debug, Clone)]
pub enum Peer {
    Unix(Arc<PeerIdentity>),
    Tcp(Arc<TcpPeer>),
}

/// A TCP connection: its two addresses and, once asked for, the owner of
/// the peer's socket (loopback only, via `sock_diag`), kept for the
/// connection's life.
#[derive(Debug)]
pub struct TcpPeer {
    pub addr: SocketAddr,
    pub local: SocketAddr,
    owner: tokio::sync::OnceCell<Option<Arc<PeerIdentity>>>,
    /// `addr` as text, and the actor `tcp:<addr>`: formatted once per
    /// connection, not for every request on it (the audit event's `peer`
    /// and key verification's caller).
    addr_text: String,
    actor: String,
}

impl TcpPeer {
    pub fn new(addr: SocketAddr, local: SocketAddr) -> TcpPeer {
        let addr_text = addr.to_string();
        TcpPeer {
            addr,
            local,
            owner: tokio::sync::OnceCell::new(),
            actor: format!("tcp:{addr_text}"),
            addr_text,
        }
    }

    /// The kernel identity of a loopback peer: the uid owning its socket
    /// (exact 4-tuple lookup with netlink `sock_diag`) and that uid's user
    /// name. The gid is unknown (`u32::MAX`: `gid=`/`group=` selectors never
    /// match), as are pid, exe and unit. `None` for non-loopback peers and
    /// when the socket is not found live.
    async fn kernel_identity(&self) -> Option<Arc<PeerIdentity>> {
        let (addr, local) = (self.addr, self.local);
        let loopback = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
            v4 => v4.is_loopback(),
        };
        if !loopback(addr.ip()) || !loopback(local.ip()) {
            return None;
        }
        self.owner
            .get_or_init(|| async move {
                let r = tokio::task::spawn_blocking(move || {
                    let o = super::sockdiag::tcp_owner(addr, local)?;
                    let mut id = PeerIdentity::new(o.uid, u32::MAX);
                    id.user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(o.uid))
                        .ok()
                        .flatten()
                        .map(|u| u.name);
                    Ok::<_, super::sockdiag::SockDiagError>((id, o.inode))
                })
                .await;
                match r {
                    Ok(Ok((id, inode))) => {
                        tracing::debug!(peer = %addr, uid = id.uid, inode, "loopback TCP peer identified");
                        Some(Arc::new(id))
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %addr, error = %e, "cannot identify the loopback TCP peer");
                        None
                    }
                    Err(_) => None,
                }
            })
            .await
            .clone()
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
enum Who {
    Key {
        id: String,
        owner: String,
        rate: Option<RateDecision>,
    },
    /// Known by the kernel: a Unix-socket peer, or (`tcp`) the owner of a
    /// loopback TCP peer's socket.
    Kernel { id: Arc<PeerIdentity>, tcp: bool },
}

impl Who {
    fn label(&self) -> String {
        match self {
            Who::Key { id, .. } => format!("key:{id}"),
            Who::Kernel { id, tcp: false } => id.display_short(),
            Who::Kernel { id, tcp: true } => match &id.user {
                Some(u) => format!("uid={}({}) tcp", id.uid, u),
                None => format!("uid={} tcp", id.uid),
            },
        }
    }

    fn rate_key(&self) -> String {
        match self {
            Who::Key { id, .. } => format!("key:{id}"),
            Who::Kernel { id, .. } => format!("uid:{}", id.uid),
        }
    }
}

/// The shared state of the listeners.
pub struct Gateway {
    state: Arc<DaemonState>,
    store: Arc<ProxyStore>,
    cfg: ProxyConfig,
    clients: Arc<Clients>,
    limiter: Limiter<(String, String)>,
    plans: BTreeMap<String, RatePlan>,
    identifier: Arc<Identifier>,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A JSON answer.
fn json(status: StatusCode, v: serde_json::Value) -> Response<RespBody> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: &str) -> Response<RespBody> {
    json(status, serde_json::json!({ "error": msg }))
}

/// A refusal before the upstream: the answer and the log decision.
pub(crate) struct Refusal {
    resp: Box<Response<RespBody>>,
    decision: &'static str,
    rule: Option<String>,
}

impl Refusal {
    pub(crate) fn json(
        status: StatusCode,
        v: serde_json::Value,
        decision: &'static str,
    ) -> Refusal {
        Refusal {
            resp: Box::new(json(status, v)),
            decision,
            rule: None,
        }
    }

    fn new(status: StatusCode, msg: &str, decision: &'static str) -> Refusal {
        Refusal {
            resp: Box::new(error(status, msg)),
            decision,
            rule: None,
        }
    }
}

fn set_rate_headers(h: &mut HeaderMap, d: &RateDecision) {
    let put = |h: &mut HeaderMap, k: &'static str, v: u64| {
        h.insert(HeaderName::from_static(k), HeaderValue::from(v));
    };
    put(h, "x-ratelimit-limit", d.limit);
    put(h, "x-ratelimit-remaining", d.remaining);
    put(h, "x-ratelimit-reset", d.reset_secs());
    if !d.allowed {
        put(h, "retry-after", d.retry_after_secs());
    }
}

fn rate_limited(d: &RateDecision) -> Refusal {
    let reset_time = now_us() / 1_000_000 + d.reset_secs();
    let mut resp = json(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::json!({
            "error": "rate limit exceeded",
            "limit": d.limit,
            "current_usage": d.limit.saturating_sub(d.remaining),
            "reset_time": reset_time,
            "retry_after": d.retry_after_secs(),
        }),
    );
    set_rate_headers(resp.headers_mut(), d);
    Refusal {
        resp: Box::new(resp),
        decision: "rate_limited",
        rule: None,
    }
}

/// A body that counts bytes, refuses more than `limit`, and runs `on_end`
/// with the count when dropped (finished or abandoned).
struct Metered<B> {
    inner: B,
    count: Arc<AtomicU64>,
    limit: u64,
    on_end: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.count.load(Ordering::Relaxed));
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let n =
                        self.count.fetch_add(d.len() as u64, Ordering::Relaxed) + d.len() as u64;
                    if n > self.limit {
                        return Poll::Ready(Some(Err("body exceeds the size limit".into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the request phases learned, for the log.
struct Ctx {
    start: Instant,
    time_us: u64,
    proxy: String,
    caller: String,
    method: String,
    path: String,
    /// Who, for the audit event (refined once the caller is authenticated).
    actor: crate::audit::Actor,
    /// The TCP peer, when not a Unix socket.
    tcp: Option<Arc<TcpPeer>>,
    mode: Mode,
    /// The decision event was written (or auditing is off): nothing more
    /// goes to the audit log for this request.
    audited: bool,
}

impl Ctx {
    /// A request's context before its caller is known: the actor is the
    /// kernel identity of a Unix peer, filled in later for TCP peers.
    fn new<B>(req: &Request<B>, peer: &Peer, mode: Mode) -> Ctx {
        Ctx {
            start: Instant::now(),
            time_us: now_us(),
            proxy: "-".into(),
            caller: "-".into(),
            method: req.method().as_str().to_owned(),
            path: req.uri().path().to_owned(),
            actor: match peer {
                Peer::Unix(id) => crate::audit::Actor::peer(id),
                Peer::Tcp(_) => crate::audit::Actor::default(),
            },
            tcp: match peer {
                Peer::Unix(_) => None,
                Peer::Tcp(t) => Some(t.clone()),
            },
            mode,
            audited: false,
        }
    }

    fn set_who(&mut self, who: &Who) {
        self.caller = who.label();
        self.actor = match who {
            Who::Key { id, .. } => crate::audit::Actor::api_key(id.clone()),
            Who::Kernel { id, .. } => crate::audit::Actor::peer(id),
        };
    }
}

/// The audit `code` of a refusal (gRPC code names, as for gRPC requests).
fn audit_code(decision: &str, status: u16) -> (crate::audit::Outcome, Option<&'static str>) {
    use crate::audit::Outcome;
    match decision {
        "allow" => (Outcome::Ok, None),
        "deny" => (Outcome::Denied, Some("PERMISSION_DENIED")),
        "unauthenticated" => (Outcome::Denied, Some("UNAUTHENTICATED")),
        "rate_limited" => (Outcome::Denied, Some("RESOURCE_EXHAUSTED")),
        _ => (
            Outcome::Error,
            Some(match status {
                400 | 413 => "INVALID_ARGUMENT",
                404 => "NOT_FOUND",
                405 => "UNIMPLEMENTED",
                429 => "RESOURCE_EXHAUSTED",
                502 | 503 => "UNAVAILABLE",
                504 => "DEADLINE_EXCEEDED",
                _ => "INTERNAL",
            }),
        ),
    }
}

/// A method worth recording verbatim: a short HTTP token. Anything else is
/// recorded as its audit HMAC.
fn plain_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:[]".contains(&b))
}

/// The 503 answered when the decision cannot be audited.
fn unaudited() -> Refusal {
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the audit log could not record this request; nothing is forwarded unaudited",
        "error",
    )
}

impl Gateway {
    /// Builds the listeners' state. Rate plans are the config's
    /// `[rate_plans.NAME]` (shared with API keys).
    pub fn new(state: Arc<DaemonState>, store: Arc<ProxyStore>, cfg: ProxyConfig) -> Gateway {
        let plans = state.apikeys.config().plans.clone();
        store.start_telemetry(
            cfg.anomaly.clone(),
            state.audit.clone(),
            state.shutdown.clone(),
        );
        let clients = Arc::new(Clients::new(Arc::clone(&store)));
        Gateway {
            state,
            store,
            cfg,
            clients,
            limiter: Limiter::new(100_000),
            plans,
            identifier: Arc::new(Identifier::new()),
        }
    }

    fn log(&self, ctx: &Ctx, status: u16, decision: &str, rule: Option<String>, bytes: (u64, u64)) {
        let e = LogEntry {
            time_us: ctx.time_us,
            proxy: ctx.proxy.clone(),
            caller: ctx.caller.clone(),
            method: ctx.method.clone(),
            path: ctx.path.clone(),
            status,
            latency_us: ctx.start.elapsed().as_micros() as u64,
            bytes_in: bytes.0,
            bytes_out: bytes.1,
            decision: decision.to_owned(),
            rule,
        };
        // Every request is in the request log and the audit log already; a
        // line per request on stderr only at debug.
        tracing::debug!(
            proxy = %e.proxy, caller = %e.caller, method = %e.method, path = %e.path,
            status, decision = %e.decision, rule = e.rule.as_deref().unwrap_or("-"),
            latency_us = e.latency_us, "proxied request"
        );
        self.store.log(e);
    }

    /// Writes the decision about this request to the audit log and waits
    /// until it is durable, before anything is forwarded (fail closed: an
    /// `Err` is the 503 to answer instead). One event per request; a no-op
    /// once written or when auditing is off (`audit.unsafe_disable`).
    ///
    /// The path can carry identifiers, so only its audit HMAC is recorded
    /// (`path_hmac`; `keyseal audit hash`); a CONNECT records its
    /// `host:port`. The target is the proxy name (`connect` for tunnels),
    /// the actor the key id or kernel identity, never a key.
    async fn audit_decision(
        &self,
        ctx: &mut Ctx,
        decision: &str,
        status: Option<u16>,
        rule: Option<&str>,
    ) -> Result<(), Refusal> {
        if ctx.audited {
            return Ok(());
        }
        ctx.audited = true;
        let Some(audit) = &self.state.audit else {
            return Ok(());
        };
        // A TCP caller refused before it was known (e.g. a bad key) is
        // still attributed to the uid owning its socket when loopback.
        if ctx.actor.uid.is_none() && ctx.actor.api_key_id.is_none() {
            if let Some(t) = &ctx.tcp {
                if let Some(id) = t.kernel_identity().await {
                    ctx.actor = crate::audit::Actor::peer(&id);
                }
            }
        }
        let connect = ctx.proxy == super::store::CONNECT_LOG_NAME;
        let op = if connect {
            "proxy.connect"
        } else {
            "proxy.request"
        };
        let (outcome, code) = audit_code(decision, status.unwrap_or(0));
        let mut ev = crate::audit::NewEvent::new(ctx.time_us / 1000, ctx.actor.clone(), op)
            .outcome(outcome, code)
            .detail("decision", decision)
            .detail(
                "listener",
                match ctx.mode {
                    Mode::Gateway => "gateway",
                    Mode::Forward => "forward",
                },
            );
        if ctx.proxy != "-" {
            ev = ev.target(if super::model::check_name("proxy", &ctx.proxy).is_ok() {
                ctx.proxy.clone()
            } else {
                audit.hash(ctx.proxy.as_bytes())
            });
        }
        ev = ev.detail(
            "method",
            if plain_token(&ctx.method, 32) {
                ctx.method.clone()
            } else {
                audit.hash(ctx.method.as_bytes())
            },
        );
        if connect {
            // A CONNECT's "path" is host:port: recorded as is when it is one.
            ev = ev.detail(
                "host",
                if plain_token(&ctx.path, 260) {
                    ctx.path.clone()
                } else {
                    audit.hash(ctx.path.as_bytes())
                },
            );
        } else if !ctx.path.is_empty() {
            ev = ev.detail("path_hmac", audit.hash(ctx.path.as_bytes()));
        }
        if let Some(r) = rule {
            ev = ev.detail("rule", r);
        }
        if let Some(st) = status {
            ev = ev.detail("status", st.to_string());
        }
        if let Some(t) = &ctx.tcp {
            ev = ev.detail("peer", t.addr_text.clone());
        }
        match audit.append(ev).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, proxy = %ctx.proxy, "audit append failed; refusing the proxied request");
                Err(unaudited())
            }
        }
    }

    /// Audits a refusal; answers 503 instead when it cannot be audited.
    async fn audit_refusal(&self, ctx: &mut Ctx, r: Refusal) -> Refusal {
        let status = r.resp.status().as_u16();
        match self
            .audit_decision(ctx, r.decision, Some(status), r.rule.as_deref())
            .await
        {
            Ok(()) => r,
            Err(u) => u,
        }
    }

    // ---- phases -----------------------------------------------------------

    fn unauthenticated(mode: Mode, msg: &str) -> Refusal {
        match mode {
            Mode::Gateway => {
                let mut r = Refusal::new(StatusCode::UNAUTHORIZED, msg, "unauthenticated");
                r.resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keyseal\""),
                );
                r
            }
            Mode::Forward => {
                let mut r = Refusal::new(
                    StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                    msg,
                    "unauthenticated",
                );
                r.resp.headers_mut().insert(
                    http::header::PROXY_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"keyseal\""),
                );
                r
            }
        }
    }

    /// Phase 1: who is calling. A presented key is verified now (no
    /// caching), else the kernel identity of a Unix-socket peer or of a
    /// loopback TCP peer (`sock_diag`) is used.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: &Peer,
        mode: Mode,
    ) -> Result<Who, Refusal> {
        let key = presented_key(headers, mode);
        let Some(key) = key else {
            return match peer {
                Peer::Unix(id) => Ok(Who::Kernel {
                    id: id.clone(),
                    tcp: false,
                }),
                Peer::Tcp(t) => match t.kernel_identity().await {
                    Some(id) => Ok(Who::Kernel { id, tcp: true }),
                    None => Err(Self::unauthenticated(mode, "missing proxy key")),
                },
            };
        };
        let (caller, source) = match peer {
            Peer::Unix(id) => (
                VerifyCaller {
                    uid: id.uid,
                    unit: id.unit.clone(),
                    actor: id.actor(),
                },
                None,
            ),
            Peer::Tcp(t) => (
                VerifyCaller {
                    uid: u32::MAX,
                    unit: None,
                    actor: t.actor.clone(),
                },
                Some(t.addr.ip()),
            ),
        };
        let now = crate::apikeys::now();
        let verdict = self.state.apikeys.verify(
            &caller,
            VerifyRequest {
                key: &key,
                source,
                required_scopes: &[],
                dry_run: false,
            },
            now,
            &|_| true,
        );
        match verdict {
            Ok(crate::apikeys::Verdict::Valid(v)) => Ok(Who::Key {
                id: v.id,
                owner: v.owner,
                rate: v.rate,
            }),
            Ok(crate::apikeys::Verdict::Invalid { .. }) => Err(Self::unauthenticated(
                mode,
                "invalid, expired or revoked proxy key",
            )),
            Err(crate::apikeys::ApiKeyError::Throttled { retry_after_secs }) => {
                let mut r = Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed key checks; retry later",
                    "unauthenticated",
                );
                r.resp.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs),
                );
                Err(r)
            }
            Err(e) => {
                tracing::error!(error = %e, "proxy key verification failed");
                Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot verify the proxy key now",
                    "error",
                ))
            }
        }
    }

    /// Phase 2: may this caller use this proxy.
    fn allowed_on(&self, who: &Who, snap: &Snapshot) -> bool {
        let p = &snap.proxy;
        match who {
            Who::Key { id, owner, .. } => p.key_ids.contains(id) || p.key_owners.contains(owner),
            Who::Kernel { id, .. } => {
                p.callers.iter().any(|s| s.matches(id))
                    || self
                        .state
                        .policy
                        .current()
                        .check(id, Capability::ProxyUse, &p.name)
                        .allowed
            }
        }
    }

    /// Phase 3: the key's own plan, then the proxy's plan for this caller.
    /// Returns the tightest admitted decision, for the response headers.
    fn rate_limit(&self, who: &Who, snap: &Snapshot) -> Result<Option<RateDecision>, Refusal> {
        let mut tightest: Option<RateDecision> = None;
        if let Who::Key { rate: Some(d), .. } = who {
            if !d.allowed {
                return Err(rate_limited(d));
            }
            tightest = Some(*d);
        }
        if let Some(name) = &snap.proxy.rate_plan {
            let Some(plan) = self.plans.get(name) else {
                tracing::error!(proxy = %snap.proxy.name, plan = %name, "proxy's rate plan is not configured; refusing");
                return Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the proxy's rate plan is not configured",
                    "error",
                ));
            };
            let key = (snap.proxy.name.clone(), who.rate_key());
            if let Some(d) = self.limiter.check(key, plan, crate::apikeys::now()) {
                if !d.allowed {
                    return Err(rate_limited(&d));
                }
                if tightest.map_or(true, |t| d.remaining < t.remaining) {
                    tightest = Some(d);
                }
            }
        }
        Ok(tightest)
    }

    // ---- entry points -----------------------------------------------------

    async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
        mode: Mode,
    ) -> Response<RespBody> {
        let mut ctx = Ctx::new(&req, &peer, mode);
        if req.method() == Method::CONNECT {
            if mode != Mode::Forward {
                let r = Refusal::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "CONNECT is served on the forward proxy listener",
                    "error",
                );
                return *self.audit_refusal(&mut ctx, r).await.resp;
            }
            return self.connect(req, peer, ctx).await;
        }
        let res = match mode {
            Mode::Forward => self.forward(req, &peer, &mut ctx).await,
            Mode::Gateway => self.gateway(req, &peer, &mut ctx).await,
        };
        match res {
            Ok(r) => r,
            Err(refusal) => self.refuse(&mut ctx, refusal).await,
        }
    }

    /// Answers a refusal: its audit event (or the 503 when that cannot be
    /// written), then its request-log entry.
    async fn refuse(&self, ctx: &mut Ctx, refusal: Refusal) -> Response<RespBody> {
        let refusal = self.audit_refusal(ctx, refusal).await;
        self.log(
            ctx,
            refusal.resp.status().as_u16(),
            refusal.decision,
            refusal.rule,
            (0, 0),
        );
        *refusal.resp
    }

    async fn gateway(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
        ctx: &mut Ctx,
    ) -> Result<Response<RespBody>, Refusal> {
        let path = req.uri().path().to_owned();
        let Some((name, rest)) = gateway_path(&path) else {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "use /p/<proxy>/<path>",
                "error",
            ));
        };
        ctx.proxy = name.to_owned();
        ctx.path = rest.to_owned();
        let who = self
            .authenticate(req.headers(), peer, Mode::Gateway)
            .await?;
        ctx.set_who(&who);
        let snap = self.snapshot(name)?;
        let rest = rest.to_owned();
        self.proxied(req, who, snap, rest, Mode::Gateway, ctx).await
    }

    fn snapshot(&self, name: &str) -> Result<Arc<Snapshot>, Refusal> {
        self.store.snapshot(name).map_err(|e| match e {
            super::model::ProxyError::NotFound(_) => {
                Refusal::new(StatusCode::NOT_FOUND, "no such proxy", "error")
            }
            other => {
                tracing::error!(error = %other, "proxy snapshot failed");
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "proxy configuration unavailable",
                    "error",
                )
            }
        })
    }

    /// Forward proxy: an absolute-form request is matched to a target by
    /// host, then to the first proxy of that target the caller may use.
    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
        ctx: &mut Ctx,
    ) -> Result<Response<RespBody>, Refusal> {
        let Some(host) = super::request::forward_host(req.uri()) else {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "the forward proxy takes absolute-form requests (http://host/path)",
                "error",
            ));
        };
        let who = self
            .authenticate(req.headers(), peer, Mode::Forward)
            .await?;
        ctx.set_who(&who);
        self.forward_to(req, who, &host, ctx).await
    }

    /// The forward proxy after authentication: the target by `host`, then
    /// the first proxy of that target the caller may use. Also serves the
    /// requests inside intercepted tunnels.
    async fn forward_to(
        &self,
        req: Request<Incoming>,
        who: Who,
        host: &str,
        ctx: &mut Ctx,
    ) -> Result<Response<RespBody>, Refusal> {
        let fail = |e: super::model::ProxyError| {
            tracing::error!(error = %e, "proxy configuration read failed");
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "proxy configuration unavailable",
                "error",
            )
        };
        let targets = self.store.list_targets().map_err(fail)?;
        let target_names = targets_for_host(&targets, host);
        if target_names.is_empty() {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "no target is configured for this host",
                "deny",
            ));
        }
        let mut chosen = None;
        for p in self.store.list_proxies().map_err(fail)? {
            if target_names.contains(&p.target) {
                let snap = self.snapshot(&p.name)?;
                if self.allowed_on(&who, &snap) {
                    chosen = Some(snap);
                    break;
                }
            }
        }
        let Some(snap) = chosen else {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "no proxy for this host admits this caller",
                "deny",
            ));
        };
        ctx.proxy = snap.proxy.name.clone();
        let Some(rest) = path_under_base(req.uri().path(), &snap.base.path) else {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "path is outside the target's base path",
                "deny",
            ));
        };
        ctx.path = rest.clone();
        self.proxied(req, who, snap, rest, Mode::Forward, ctx).await
    }

    /// The shared pipeline after the proxy is known.
    async fn proxied(
        &self,
        req: Request<Incoming>,
        who: Who,
        snap: Arc<Snapshot>,
        rest: String,
        mode: Mode,
        ctx: &mut Ctx,
    ) -> Result<Response<RespBody>, Refusal> {
        if !self.allowed_on(&who, &snap) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "this caller may not use this proxy",
                "deny",
            ));
        }
        if let Some(s) = self
            .store
            .telemetry()
            .suspended(&snap.proxy.name, &ctx.caller)
        {
            return Err(super::telemetry::suspended_refusal(&s));
        }
        if !path_is_clean(&rest) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "path has dot segments, empty segments or encoded separators",
                "deny",
            ));
        }
        let rate = self.rate_limit(&who, &snap)?;

        // Rules. The headers are copied only when a rule looks at them.
        let headers: Vec<(String, String)> =
            if snap.rules.iter().any(|r| !r.rule.headers.is_empty()) {
                req.headers()
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                    .collect()
            } else {
                Vec::new()
            };
        let query = req.uri().query().map(str::to_owned);
        // The decision only; the trace `evaluate` builds (a reason per rule)
        // is for `keyseal proxy test`.
        let winner = decide(
            &snap.rules,
            &RequestFacts {
                method: req.method().as_str(),
                path: &rest,
                headers: &headers,
                query: query.as_deref(),
            },
        );
        let effect = winner.map_or(snap.proxy.default_effect, |r| r.rule.effect);
        let rule_id = winner.map(|r| r.rule.id.clone());
        if effect == Effect::Deny {
            let rule_label = rule_id.as_deref().unwrap_or("default");
            let mut resp = json(
                StatusCode::FORBIDDEN,
                serde_json::json!({
                    "error": "denied by the proxy's rules",
                    "rule": rule_id,
                    "reason": decision_reason(snap.proxy.default_effect, winner),
                }),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("deny; rule={rule_label}")) {
                resp.headers_mut().insert(DECISION_HEADER, v);
            }
            return Err(Refusal {
                resp: Box::new(resp),
                decision: "deny",
                rule: rule_id,
            });
        }

        // Credential.
        let secret = match (&snap.proxy.credential, &snap.credential) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the proxy's target credential was deleted",
                    "error",
                ))
            }
            (Some(_), Some(c)) => {
                // A cached value needs no blocking-pool hop; a cold one may
                // need the root device (blocking).
                let v = match self.store.cached_credential_value(&c.id) {
                    Some(v) => Ok(v),
                    None => {
                        let store = self.store.clone();
                        let id = c.id.clone();
                        tokio::task::spawn_blocking(move || store.credential_value(&id))
                            .await
                            .map_err(|_| {
                                Refusal::new(
                                    StatusCode::INTERNAL_SERVER_ERROR,
                                    "worker failed",
                                    "error",
                                )
                            })?
                    }
                };
                match v {
                    Ok(v) => Some((c.injection.clone(), v)),
                    Err(super::model::ProxyError::NotFound(_)) => {
                        return Err(Refusal::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the proxy's target credential was deleted",
                            "error",
                        ))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot unseal the target credential");
                        return Err(Refusal::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the target credential cannot be unsealed now",
                            "error",
                        ));
                    }
                }
            }
        };

        // Upstream request.
        let (parts, body) = req.into_parts();
        if let Some(len) = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        {
            if len > self.cfg.max_request_bytes {
                return Err(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body is larger than the proxy's limit",
                    "error",
                ));
            }
        }
        let (uri, headers_out) = upstream_request(
            &parts.headers,
            query.as_deref(),
            &rest,
            &snap.base,
            secret.as_ref().map(|(inj, v)| (inj, v.as_slice())),
        )
        .map_err(|e| match e {
            UpstreamError::Injection => Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the target credential cannot be put in a header",
                "error",
            ),
            UpstreamError::BadPath => {
                Refusal::new(StatusCode::BAD_REQUEST, "bad request path", "error")
            }
        })?;
        let count_in = Arc::new(AtomicU64::new(0));
        let body_up = Metered {
            inner: body,
            count: count_in.clone(),
            limit: self.cfg.max_request_bytes,
            on_end: None,
        }
        .boxed();
        let mut up = Request::new(body_up);
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = headers_out;
        drop(secret);

        // The decision is durable in the audit log before anything leaves.
        self.audit_decision(ctx, "allow", None, rule_id.as_deref())
            .await?;

        // Send.
        let client = match self.clients.cached(&snap.target) {
            Some(c) => Ok(c),
            None => {
                // Building may unseal a client key (device call).
                let (clients, t) = (self.clients.clone(), snap.target.clone());
                tokio::task::spawn_blocking(move || clients.get(&t))
                    .await
                    .unwrap_or_else(|_| Err("worker failed".into()))
            }
        }
        .map_err(|e| {
            tracing::error!(target = %snap.target.name, error = %e, "upstream client");
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream TLS setup failed",
                "error",
            )
        })?;
        let timeout = Duration::from_millis(snap.target.response_timeout_ms);
        let resp = match tokio::time::timeout(timeout, client.request(up)).await {
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream did not answer in time",
                    "error",
                ))
            }
            Ok(Err(e)) => {
                tracing::warn!(proxy = %snap.proxy.name, error = %e, connect = e.is_connect(), "upstream request failed");
                return Err(Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    if e.is_connect() {
                        "upstream unreachable"
                    } else {
                        "upstream request failed"
                    },
                    "error",
                ));
            }
            Ok(Ok(r)) => r,
        };

        // Response filter.
        let (mut rparts, rbody) = resp.into_parts();
        if rparts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n > self.cfg.max_response_bytes)
        {
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream response is larger than the proxy's limit",
                "error",
            ));
        }
        strip_hop_by_hop(&mut rparts.headers);
        let rule_label = rule_id.as_deref().unwrap_or("default");
        if let Ok(v) = HeaderValue::from_str(&format!("allow; rule={rule_label}")) {
            rparts.headers.insert(DECISION_HEADER, v);
        }
        if let Some(d) = &rate {
            set_rate_headers(&mut rparts.headers, d);
        }
        let status = rparts.status.as_u16();
        let store = self.store.clone();
        let entry = LogEntry {
            time_us: ctx.time_us,
            proxy: ctx.proxy.clone(),
            caller: ctx.caller.clone(),
            method: ctx.method.clone(),
            path: ctx.path.clone(),
            status,
            latency_us: 0,
            bytes_in: 0,
            bytes_out: 0,
            decision: "allow".into(),
            rule: rule_id,
        };
        let start = ctx.start;
        let _ = mode;
        let body_out = Metered {
            inner: rbody,
            count: Arc::new(AtomicU64::new(0)),
            limit: self.cfg.max_response_bytes,
            on_end: Some(Box::new(move |out| {
                let mut e = entry;
                e.latency_us = start.elapsed().as_micros() as u64;
                e.bytes_in = count_in.load(Ordering::Relaxed);
                e.bytes_out = out;
                // In the request log and the audit log already: stderr
                // gets a line per request only at debug.
                tracing::debug!(
                    proxy = %e.proxy, caller = %e.caller, method = %e.method, path = %e.path,
                    status = e.status, decision = "allow", rule = e.rule.as_deref().unwrap_or("-"),
                    latency_us = e.latency_us, bytes_in = e.bytes_in, bytes_out = e.bytes_out,
                    "proxied request"
                );
                store.log(e);
            })),
        }
        .boxed();
        Ok(Response::from_parts(rparts, body_out))
    }

    /// CONNECT: an authenticated caller, an allow-listed host, every
    /// resolved address checked, then a blind tunnel to the checked address
    /// (or, for an intercepted host, a TLS-terminated tunnel).
    async fn connect(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
        mut ctx: Ctx,
    ) -> Response<RespBody> {
        ctx.proxy = super::store::CONNECT_LOG_NAME.into();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        ctx.path = authority.clone();
        let who = match self.authenticate(req.headers(), &peer, Mode::Forward).await {
            Ok(w) => w,
            Err(r) => return self.connect_refused(&mut ctx, r).await,
        };
        ctx.set_who(&who);
        let addrs = match self.cfg.egress.resolve(&authority).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(target = %authority, reason = %e, caller = %ctx.caller, "CONNECT refused");
                let r = Refusal::new(StatusCode::FORBIDDEN, &e.to_string(), "deny");
                return self.connect_refused(&mut ctx, r).await;
            }
        };
        if let Some((host, port)) = super::ssrf::split_host_port(&authority) {
            let host = super::ssrf::Egress::normalise(&host);
            if self.cfg.intercepts(&host, port) {
                return self.intercept(req, peer, host, ctx).await;
            }
        }
        let mut stream = None;
        for a in &addrs {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(a)).await
            {
                stream = Some(s);
                break;
            }
        }
        let Some(upstream) = stream else {
            let r = Refusal::new(
                StatusCode::BAD_GATEWAY,
                "cannot connect to the tunnel target",
                "error",
            );
            return self.connect_refused(&mut ctx, r).await;
        };
        // The tunnel carries nothing until its decision is durable.
        if let Err(r) = self
            .audit_decision(&mut ctx, "allow", Some(200), None)
            .await
        {
            drop(upstream);
            return self.connect_refused(&mut ctx, r).await;
        }
        self.log(&ctx, 200, "allow", None, (0, 0));
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let mut client = TokioIo::new(upgraded);
                    let mut upstream = upstream;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        Response::new(full(Bytes::new()))
    }
}

impl Gateway {
    /// A refused CONNECT: audited (503 when it cannot be), logged, answered.
    async fn connect_refused(&self, ctx: &mut Ctx, r: Refusal) -> Response<RespBody> {
        let r = self.audit_refusal(ctx, r).await;
        self.log(ctx, r.resp.status().as_u16(), r.decision, None, (0, 0));
        *r.resp
    }
}

async fn serve_conn<I>(gw: Arc<Gateway>, io: I, peer: Peer, mode: Mode)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = gw.cfg.header_timeout;
    let svc = hyper::service::service_fn(move |req| {
        let gw = gw.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(gw.handle(req, peer, mode).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "proxy connection ended with an error");
    }
}

/// Serves `mode` on a loopback TCP listener until `shutdown` resolves.
pub async fn serve_tcp(
    gw: Arc<Gateway>,
    listener: TcpListener,
    mode: Mode,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let peer = Peer::Tcp(Arc::new(TcpPeer::new(addr, local)));
        tokio::spawn(serve_conn(gw.clone(), stream, peer, mode));
    }
}

/// Serves the gateway on a Unix socket; each caller is identified by the
/// kernel at accept.
pub async fn serve_unix(
    gw: Arc<Gateway>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let Ok(std_stream) = stream.into_std() else {
                return;
            };
            let ident = gw.identifier.clone();
            let Ok((std_stream, id)) = tokio::task::spawn_blocking(move || {
                let id = ident.identify(std_stream.as_fd());
                (std_stream, id)
            })
            .await
            else {
                return;
            };
            let id = match id {
                Ok(i) => Arc::new(i),
                Err(e) => {
                    return tracing::warn!(error = %e, "proxy: peer without credentials refused")
                }
            };
            let Ok(stream) = tokio::net::UnixStream::from_std(std_stream) else {
                return;
            };
            serve_conn(gw, stream, Peer::Unix(id), Mode::Gateway).await;
        });
    }
}

/// Deletes request-log entries older than `retention`, every `every`,
/// until `shutdown` resolves.
async fn prune_request_log(
    store: Arc<ProxyStore>,
    retention: Duration,
    every: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let cutoff = now_us().saturating_sub(retention.as_micros() as u64);
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.prune_log(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(removed = n, "request log pruned"),
            Ok(Err(e)) => tracing::warn!(error = %e, "request log pruning failed"),
            Err(_) => tracing::warn!("request log pruning task failed"),
        }
    }
}

/// Binds and serves every configured listener and starts the request-log
/// pruner (`request_log_retention`); the tasks end when `shutdown` fires.
/// Errors name the listener that could not be bound.
pub async fn run(
    gw: Arc<Gateway>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let mut tasks = Vec::new();
    let cfg = gw.cfg.clone();
    if let Some(a) = cfg.gateway_listen {
        let l = TcpListener::bind(a)
            .await
            .map_err(|e| format!("cannot listen on proxy.gateway_listen {a}: {e}"))?;
        tracing::info!(addr = %a, "proxy gateway listening");
        tasks.push(tokio::spawn(serve_tcp(
            gw.clone(),
            l,
            Mode::Gateway,
            wait(shutdown.clone()),
        )));
    }
    if let Some(a) = cfg.forward_listen {
        let l = TcpListener::bind(a)
            .await
            .map_err(|e| format!("cannot listen on proxy.forward_listen {a}: {e}"))?;
        tracing::info!(addr = %a, "forward proxy listening");
        tasks.push(tokio::spawn(serve_tcp(
            gw.clone(),
            l,
            Mode::Forward,
            wait(shutdown.clone()),
        )));
    }
    if let Some(every) = cfg.log_prune_interval() {
        tasks.push(tokio::spawn(prune_request_log(
            gw.store.clone(),
            cfg.request_log_retention.unwrap_or(every),
            every,
            wait(shutdown.clone()),
        )));
    }
    if let Some(p) = &cfg.gateway_socket {
        let l = crate::daemon::bind_socket(p, cfg.gateway_socket_mode, None)
            .and_then(UnixListener::from_std)
            .map_err(|e| format!("cannot listen on proxy.gateway_socket {}: {e}", p.display()))?;
        tracing::info!(socket = %p.display(), "proxy gateway listening");
        tasks.push(tokio::spawn(serve_unix(
            gw.clone(),
            l,
            wait(shutdown.clone()),
        )));
    }
    Ok(tasks)
}
