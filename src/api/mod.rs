//! The gRPC layer: the only module that knows protobuf types. It converts
//! requests to domain types at the boundary, checks policy with the caller's
//! kernel identity, and maps domain errors to gRPC codes.
//!
//! Architecture invariant: handlers never trust request fields for identity;
//! the [`Caller`] comes from the connection (see `crate::daemon`).

pub mod apikeys_svc;
pub mod audit_svc;
pub mod device;
pub mod keys_svc;
pub mod proxy_svc;
mod redact;
pub mod secrets_svc;
pub mod system_svc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Status};

use crate::hardening::HardeningReport;
use crate::identity::PeerIdentity;
use crate::policy::{denial_message, Capability, PolicyHandle};
use crate::secrets::{SecretStore, SecretsError};
use crate::store::StoreError;

/// Generated protobuf and tonic code for package `keyseal.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("keyseal.v1");
    /// Descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keyseal_descriptor");
}

/// The caller of a connection, identified by the kernel at accept. Set as
/// the connection's tonic `ConnectInfo`, so every request carries it.
#[derive(Clone, Debug)]
pub struct Caller {
    pub conn_id: u64,
    pub identity: Arc<PeerIdentity>,
}

/// A change to a secret, fanned out to `Watch` streams.
#[derive(Clone, Debug)]
pub struct ChangeEvent {
    pub name: String,
    pub version: u64,
    pub kind: &'static str,
}

/// Shared state of the daemon's services.
pub struct DaemonState {
    pub secrets: Arc<SecretStore>,
    pub policy: PolicyHandle,
    pub started: Instant,
    pub hardening: HardeningReport,
    pub events: tokio::sync::broadcast::Sender<ChangeEvent>,
    pub request_timeout: Duration,
    /// API keys: issue, verify, rotate, revoke (`apikeys_svc`).
    pub apikeys: Arc<crate::apikeys::ApiKeys>,
    /// Named signing keys held in the root device.
    pub keys: Arc<crate::keys::Keys>,
    /// Becomes `true` when the daemon shuts down; long-lived streams end on it.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Proxy targets, credentials, proxies, rules and the request log.
    pub proxies: Arc<crate::proxy::ProxyStore>,
    /// The tamper-evident audit log; `None` only with `audit.unsafe_disable`.
    pub audit: Option<Arc<crate::audit::AuditLog>>,
    /// Threads for short device calls (signing): see [`device`].
    pub device: Arc<device::DevicePool>,
}

/// What an audited request is about, taken before the handler runs.
pub struct AuditCtx {
    actor: crate::audit::Actor,
    op: &'static str,
    target: Option<String>,
    request_id: String,
    detail: Vec<(&'static str, String)>,
    /// Tells the audit writer an event is coming (group-commit linger).
    expected: Option<crate::audit::Expected>,
}

impl AuditCtx {
    /// Adds a fact to the request's event (`detail`; never a secret).
    pub fn detail(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.detail.push((key, value.into()));
        self
    }
}

/// gRPC code names as in the gRPC spec (audit `code` field).
pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

static REQUEST_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl DaemonState {
    /// Starts the audit record of a request: who (from the connection, or
    /// anonymous when the connection has none) and on what. `target` is
    /// recorded only when it is a valid name; anything else is recorded as
    /// its audit HMAC, so hostile input never lands in the log verbatim.
    pub fn audit_ctx<T>(
        &self,
        req: &Request<T>,
        op: &'static str,
        target: Option<&str>,
    ) -> AuditCtx {
        let actor = match req.extensions().get::<Caller>() {
            Some(c) => crate::audit::Actor::peer(&c.identity),
            None => crate::audit::Actor::default(),
        };
        let target = target.filter(|t| !t.is_empty()).map(|t| {
            if t.len() <= 512
                && (crate::name::SecretName::parse(t).is_ok()
                    || crate::name::check_prefix(t).is_ok())
            {
                t.to_owned()
            } else {
                match &self.audit {
                    Some(a) => a.hash(t.as_bytes()),
                    None => "invalid".to_owned(),
                }
            }
        });
        let conn = req
            .extensions()
            .get::<Caller>()
            .map(|c| c.conn_id)
            .unwrap_or(0);
        let n = REQUEST_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        AuditCtx {
            actor,
            op,
            target,
            request_id: format!("c{conn}-r{n}"),
            detail: Vec::new(),
            expected: self.audit.as_ref().map(|a| a.expect()),
        }
    }

    /// Records the outcome of a request durably before it is answered
    /// (group-committed with concurrent requests). When the event cannot be
    /// made durable within the audit deadline, the request fails with
    /// UNAVAILABLE instead: nothing is answered unaudited.
    pub async fn audited<T>(&self, ctx: AuditCtx, res: Result<T, Status>) -> Result<T, Status> {
        let (outcome, code) = outcome_of(&res);
        match self.record(ctx, outcome, code).await {
            Result::Ok(()) => res,
            Err(s) => Err(s),
        }
    }

    /// Like [`DaemonState::audited`], but answers even when the event
    /// cannot be written. Only for `system.status`: the one read that must
    /// work while the audit log is failing (it shows the failure count and
    /// the last audit error) and that reveals no secret or name. The failed
    /// attempt is still counted in the audit statistics.
    pub async fn audited_best_effort<T>(
        &self,
        ctx: AuditCtx,
        res: Result<T, Status>,
    ) -> Result<T, Status> {
        let op = ctx.op;
        let (outcome, code) = outcome_of(&res);
        if let Err(e) = self.record(ctx, outcome, code).await {
            tracing::warn!(error = %e.message(), op, "answered without an audit record");
        }
        res
    }

    async fn record(
        &self,
        ctx: AuditCtx,
        outcome: crate::audit::Outcome,
        code: Option<&'static str>,
    ) -> Result<(), Status> {
        let Some(audit) = &self.audit else {
            return Result::Ok(());
        };
        let mut ev = crate::audit::NewEvent::new(now_ms(), ctx.actor, ctx.op)
            .outcome(outcome, code)
            .request_id(ctx.request_id);
        if let Some(t) = ctx.target {
            ev = ev.target(t);
        }
        for (k, v) in ctx.detail {
            ev = ev.detail(k, v);
        }
        // `append` queues the event when called: the writer need no longer
        // wait for this request.
        let appended = audit.append(ev);
        drop(ctx.expected);
        match appended.await {
            Result::Ok(_) => Result::Ok(()),
            Err(e) => {
                tracing::error!(error = %e, op = ctx.op, "audit append failed; failing the request");
                Err(audit_failure_status(&e))
            }
        }
    }

    /// Records `root.rotate.completed` (details `from_version`,
    /// `to_version`, `rewrapped`, `resumed`) when a root rotation finished:
    /// one asked for over the API, or an interrupted one that keyseald
    /// resumed at start. A resumed rotation's `from` as reported by the
    /// store is already the new version; the version rotated from is then
    /// the newest retired one below `to`.
    pub async fn audit_rotation_completed(
        &self,
        from: u32,
        to: u32,
        rewrapped: u64,
        resumed: bool,
    ) {
        let mut from = from;
        if from == to {
            let s = self.secrets.clone();
            let prev = tokio::task::spawn_blocking(move || {
                s.store()
                    .root_state()
                    .ok()
                    .flatten()
                    .and_then(|st| st.retired.into_iter().filter(|v| *v < to).max())
            })
            .await
            .ok()
            .flatten();
            if let Some(p) = prev {
                from = p;
            }
        }
        self.audit_lifecycle(
            "root.rotate.completed",
            crate::audit::Outcome::Ok,
            &[
                ("from_version", from.to_string()),
                ("to_version", to.to_string()),
                ("rewrapped", rewrapped.to_string()),
                ("resumed", resumed.to_string()),
            ],
        )
        .await;
    }

    /// Records a daemon lifecycle event (start, stop, policy reload, root
    /// rotation...). Failures are logged; there is no request to fail.
    pub async fn audit_lifecycle(
        &self,
        op: &'static str,
        outcome: crate::audit::Outcome,
        detail: &[(&str, String)],
    ) {
        let Some(audit) = &self.audit else { return };
        let mut ev = crate::audit::NewEvent::new(now_ms(), crate::audit::Actor::daemon(), op)
            .outcome(
                outcome,
                (outcome != crate::audit::Outcome::Ok).then_some("INTERNAL"),
            );
        for (k, v) in detail {
            ev = ev.detail(*k, v.clone());
        }
        if let Err(e) = audit.append(ev).await {
            tracing::error!(error = %e, op, "audit append of a lifecycle event failed");
        }
    }
}

/// The outcome and status code name an answer is recorded with.
fn outcome_of<T>(res: &Result<T, Status>) -> (crate::audit::Outcome, Option<&'static str>) {
    match res {
        Result::Ok(_) => (crate::audit::Outcome::Ok, None),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ) =>
        {
            (crate::audit::Outcome::Denied, Some(code_name(s.code())))
        }
        Err(s) => (crate::audit::Outcome::Error, Some(code_name(s.code()))),
    }
}

/// The answer to a request whose audit event could not be made durable:
/// RESOURCE_EXHAUSTED when the store's disk is full, UNAVAILABLE otherwise
/// (deadline, queue full, closed, other write errors).
pub fn audit_failure_status(e: &crate::audit::AuditError) -> Status {
    let msg =
        format!("the audit log could not record this request ({e}); nothing is answered unaudited");
    if e.is_no_space() {
        Status::resource_exhausted(msg)
    } else {
        Status::unavailable(msg)
    }
}

/// The caller of `req`, or UNAUTHENTICATED when the connection had no peer
/// credentials (never a panic).
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no peer credentials on this connection"))
}

impl DaemonState {
    /// Checks `cap` on `name` for `who`; the denial names what was missing
    /// and is decided before any lookup, so it reveals nothing about `name`.
    pub fn authorize(&self, who: &Caller, cap: Capability, name: &str) -> Result<(), Status> {
        let d = self.policy.current().check(&who.identity, cap, name);
        if d.allowed {
            tracing::debug!(cap = %cap, name, rule = d.rule.as_deref().unwrap_or(""), "allowed");
            Ok(())
        } else {
            tracing::info!(cap = %cap, name, caller = %who.identity.actor(), "denied");
            Err(Status::permission_denied(denial_message(cap, name)))
        }
    }

    /// Whether a store write failed with an I/O error (a full disk) since
    /// start: sled then refuses writes until keyseald restarts, and its
    /// iterators spin, so store work is refused up front.
    pub fn store_failed(&self) -> bool {
        self.audit.as_ref().is_some_and(|a| a.store_failed())
    }

    /// The answer to store work while [`DaemonState::store_failed`].
    pub fn store_failed_status() -> Status {
        Status::resource_exhausted(
            "the store stopped writing after an I/O error (disk full?); free disk space, then restart keyseald",
        )
    }

    /// Runs blocking store work off the async runtime, bounded by the
    /// request timeout (DEADLINE_EXCEEDED instead of piling up). The work
    /// runs under the request's deadline (`root::with_deadline`), so work
    /// waiting for a busy root device gives up when the answer is gone.
    /// RESOURCE_EXHAUSTED at once while [`DaemonState::store_failed`].
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SecretStore) -> Result<T, SecretsError> + Send + 'static,
    ) -> Result<T, Status> {
        if self.store_failed() {
            return Err(Self::store_failed_status());
        }
        self.blocking_unguarded(f).await
    }

    /// [`DaemonState::blocking`] even while the store has failed: only for
    /// work that avoids iterating the store (`system.status`).
    pub async fn blocking_unguarded<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SecretStore) -> Result<T, SecretsError> + Send + 'static,
    ) -> Result<T, Status> {
        let s = self.secrets.clone();
        let deadline = Instant::now() + self.request_timeout;
        let job =
            tokio::task::spawn_blocking(move || crate::root::with_deadline(deadline, || f(&s)));
        match tokio::time::timeout(self.request_timeout, job).await {
            Ok(Ok(r)) => r.map_err(status_of),
            Ok(Err(_)) => Err(Status::internal("request worker failed")),
            Err(_) => Err(timed_out()),
        }
    }
}

impl DaemonState {
    /// Runs blocking work that already speaks `Status`, bounded by the
    /// request timeout like [`DaemonState::blocking`].
    pub async fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        self.run_blocking_for(self.request_timeout, f).await
    }

    /// [`DaemonState::run_blocking`] with its own bound, for slow admin work
    /// such as generating an RSA key inside a TPM (seconds on swtpm).
    pub async fn run_blocking_for<T: Send + 'static>(
        &self,
        limit: Duration,
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let deadline = Instant::now() + limit;
        let job = tokio::task::spawn_blocking(move || crate::root::with_deadline(deadline, f));
        match tokio::time::timeout(limit, job).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Status::internal("request worker failed")),
            Err(_) => Err(timed_out()),
        }
    }
}

/// The answer when the root device or store did not answer within a
/// request's bound.
pub(crate) fn timed_out() -> Status {
    Status::deadline_exceeded("the root device or store did not answer in time; retry later")
}

/// Maps a domain error to a gRPC status. Messages never contain values.
pub fn status_of(e: SecretsError) -> Status {
    use crate::root::RootError;
    let msg = e.to_string();
    match e {
        SecretsError::InvalidName(_)
        | SecretsError::ValueTooLarge { .. }
        | SecretsError::InvalidArgument(_) => Status::invalid_argument(msg),
        SecretsError::NotFound
        | SecretsError::VersionNotFound(_)
        | SecretsError::VersionDeleted(_)
        | SecretsError::VersionDestroyed(_) => Status::not_found(msg),
        SecretsError::Expired | SecretsError::CasConflict { .. } | SecretsError::NotInitialised => {
            Status::failed_precondition(msg)
        }
        SecretsError::RotationBusy => Status::aborted(msg),
        SecretsError::Integrity(_) => Status::data_loss(msg),
        SecretsError::Root(RootError::Config(_)) => Status::failed_precondition(msg),
        SecretsError::Root(RootError::Unsupported(_)) => Status::unimplemented(msg),
        SecretsError::Root(_) => Status::unavailable(msg),
        SecretsError::Store(StoreError::NoSpace(_)) => Status::resource_exhausted(msg),
        SecretsError::Store(_) => Status::internal(msg),
    }
}
