//! The gRPC layer: the only module that knows protobuf types. It converts
//! requests to domain types at the boundary, checks policy with the caller's
//! kernel identity, and maps domain errors to gRPC codes.
//!
//! Architecture invariant: handlers never trust request fields for identity;
//! the [`Caller`] comes from the connection (see `crate::daemon`).

pub mod apikeys_svc;
pub mod audit_svc;
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
}

/// What an audited request is about, taken before the handler runs.
pub struct AuditCtx {
    actor: crate::audit::Actor,
    op: &'static str,
    target: Option<String>,
    request_id: String,
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
        }
    }

    /// Records the outcome of a request durably before it is answered
    /// (group-committed with concurrent requests). When the event cannot be
    /// made durable within the audit deadline, the request fails with
    /// UNAVAILABLE instead: nothing is answered unaudited.
    pub async fn audited<T>(&self, ctx: AuditCtx, res: Result<T, Status>) -> Result<T, Status> {
        let Some(audit) = &self.audit else { return res };
        let (outcome, code) = match &res {
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
        };
        let mut ev = crate::audit::NewEvent::new(now_ms(), ctx.actor, ctx.op)
            .outcome(outcome, code)
            .request_id(ctx.request_id);
        if let Some(t) = ctx.target {
            ev = ev.target(t);
        }
        match audit.append(ev).await {
            Result::Ok(_) => res,
            Err(e) => {
                tracing::error!(error = %e, op = ctx.op, "audit append failed; failing the request");
                Err(Status::unavailable(format!(
                    "the audit log could not record this request ({e}); nothing is answered unaudited"
                )))
            }
        }
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
            tracing::info!(cap = %cap, name, "denied");
            Err(Status::permission_denied(denial_message(cap, name)))
        }
    }

    /// Runs blocking store work off the async runtime, bounded by the
    /// request timeout (DEADLINE_EXCEEDED instead of piling up).
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SecretStore) -> Result<T, SecretsError> + Send + 'static,
    ) -> Result<T, Status> {
        let s = self.secrets.clone();
        let job = tokio::task::spawn_blocking(move || f(&s));
        match tokio::time::timeout(self.request_timeout, job).await {
            Ok(Ok(r)) => r.map_err(status_of),
            Ok(Err(_)) => Err(Status::internal("request worker failed")),
            Err(_) => Err(Status::deadline_exceeded(
                "the root device or store did not answer in time; retry later",
            )),
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
        match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Status::internal("request worker failed")),
            Err(_) => Err(Status::deadline_exceeded(
                "the root device or store did not answer in time; retry later",
            )),
        }
    }
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
