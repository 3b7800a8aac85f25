//! `keyseal.v1.ApiKeys`: Issue, Verify, List, Get, Rotate, Revoke,
//! RevokeOwner.
//!
//! Authorisation: Verify needs `apikey:verify` from some rule (else
//! PERMISSION_DENIED before any lookup) and, once the key is found, on the
//! key's owner (else the uniform invalid answer). Admin calls need
//! `apikey:admin` on the owner: checked before any lookup when the request
//! names the owner (Issue, List with an owner, RevokeOwner); for the others
//! a caller without `apikey:admin` in any rule is refused before any lookup,
//! and a key whose owner the caller may not administer answers NOT_FOUND,
//! the same as an unknown id (List leaves it out).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::pb::{self, api_keys_server::ApiKeys as ApiKeysRpc};
use super::{caller, status_of, Caller, DaemonState};
use crate::apikeys::{
    check_owner, now, ApiKeyError, ApiKeyRecord, ApiKeys, IssueRequest, ListFilter, Verdict,
    VerifyCaller, VerifyRequest,
};
use crate::policy::{denial_message, Capability};

/// The ApiKeys service.
pub struct ApiKeysService {
    pub state: Arc<DaemonState>,
}

/// Maps an API-key error to a gRPC status. Messages never contain keys.
pub fn apikey_status(e: ApiKeyError) -> Status {
    match e {
        ApiKeyError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        ApiKeyError::NotFound => Status::not_found(e.to_string()),
        ApiKeyError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        ApiKeyError::Throttled { retry_after_secs } => {
            let mut s = Status::resource_exhausted(e.to_string());
            if let Ok(v) = retry_after_secs.to_string().parse() {
                s.metadata_mut().insert("retry-after", v);
            }
            s
        }
        ApiKeyError::Secrets(s) => status_of(s),
    }
}

fn meta_pb(r: &ApiKeyRecord, now: u64) -> pb::ApiKeyMeta {
    pb::ApiKeyMeta {
        id: r.id.clone(),
        owner: r.owner.clone(),
        scopes: r.scopes.clone(),
        env: r.env.clone(),
        prefix: r.prefix.clone(),
        last4: r.last4.clone(),
        created_at: r.created_at,
        created_by: r.created_by.clone(),
        expires_at: r.expires_at,
        revoked_at: r.revoked_at,
        revoked_by: r.revoked_by.clone().unwrap_or_default(),
        allowed_cidrs: r.cidrs.iter().map(|c| c.to_string()).collect(),
        rate_plan: r.plan.clone().unwrap_or_default(),
        labels: r.labels.clone().into_iter().collect(),
        rotate_after_secs: r.rotate_after,
        predecessor_id: r.predecessor.clone().unwrap_or_default(),
        successor_id: r.successor.clone().unwrap_or_default(),
        state: r.state(now).as_str().into(),
        rotation_due: r.rotation_due(now),
    }
}

type May = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl ApiKeysService {
    /// `cap` on an owner for this caller, with the current policy; a caller
    /// holding `cap` in no rule at all is refused here, before any lookup.
    fn may(&self, who: &Caller, cap: Capability) -> Result<May, Status> {
        let policy = self.state.policy.current();
        if !policy.grants_any(&who.identity, cap) {
            tracing::info!(cap = %cap, caller = %who.identity.actor(), "denied");
            return Err(Status::permission_denied(denial_message(cap, "any owner")));
        }
        let id = who.identity.clone();
        Ok(Box::new(move |owner: &str| {
            policy.check(&id, cap, owner).allowed
        }))
    }

    /// Runs blocking store work (writes flush) off the runtime, bounded by
    /// the request timeout.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ApiKeys) -> Result<T, ApiKeyError> + Send + 'static,
    ) -> Result<T, Status> {
        let ak = self.state.apikeys.clone();
        let job = tokio::task::spawn_blocking(move || f(&ak));
        match tokio::time::timeout(self.state.request_timeout, job).await {
            Ok(Ok(r)) => r.map_err(apikey_status),
            Ok(Err(_)) => Err(Status::internal("request worker failed")),
            Err(_) => Err(crate::api::timed_out()),
        }
    }
}

fn parse_owner(owner: &str) -> Result<(), Status> {
    check_owner(owner).map_err(apikey_status)
}

fn secs(now: Duration) -> u64 {
    now.as_secs()
}

#[tonic::async_trait]
impl ApiKeysRpc for ApiKeysService {
    async fn issue(
        &self,
        req: Request<pb::IssueApiKeyRequest>,
    ) -> Result<Response<pb::IssueApiKeyResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "apikey.issue", Some(req.get_ref().owner.as_str()));
        let res: Result<Response<pb::IssueApiKeyResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            parse_owner(&r.owner)?;
            self.state
                .authorize(&who, Capability::ApiKeyAdmin, &r.owner)?;
            let issue = IssueRequest {
                owner: r.owner,
                scopes: r.scopes,
                env: r.env,
                expires_in: r.expires_in_secs.map(Duration::from_secs),
                cidrs: r.allowed_cidrs,
                plan: r.rate_plan,
                labels: r.labels.into_iter().collect(),
                rotate_after: r.rotate_after_secs.map(Duration::from_secs),
            };
            let actor = who.identity.actor();
            let t = secs(now());
            let issued = self.blocking(move |a| a.issue(&actor, &issue, t)).await?;
            Ok(Response::new(pb::IssueApiKeyResponse {
                key: issued.token.expose().to_owned(),
                meta: Some(meta_pb(&issued.record, t)),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyApiKeyRequest>,
    ) -> Result<Response<pb::VerifyApiKeyResponse>, Status> {
        let audit = self.state.audit_ctx(&req, "apikey.verify", None);
        let res: Result<Response<pb::VerifyApiKeyResponse>, Status> = async move {
        let who = caller(&req)?;
        let mut r = req.into_inner();
        let key = Zeroizing::new(std::mem::take(&mut r.key));
        let policy = self.state.policy.current();
        if !policy.grants_any(&who.identity, Capability::ApiKeyVerify) {
            tracing::info!(cap = %Capability::ApiKeyVerify, caller = %who.identity.actor(), "denied");
            return Err(Status::permission_denied(denial_message(
                Capability::ApiKeyVerify,
                "any owner",
            )));
        }
        let source = if r.source_ip.is_empty() {
            None
        } else {
            Some(r.source_ip.parse::<IpAddr>().map_err(|_| {
                Status::invalid_argument("source_ip is not an IPv4 or IPv6 address")
            })?)
        };
        if r.required_scopes.len() > 64 {
            return Err(Status::invalid_argument("at most 64 required scopes"));
        }
        let vc = VerifyCaller {
            uid: who.identity.uid,
            // Only system units: a user's own units are named by the user,
            // who could otherwise get a fresh guard bucket per name.
            unit: who.identity.system_unit().map(str::to_owned),
            actor: who.identity.actor(),
        };
        let may = |owner: &str| {
            policy
                .check(&who.identity, Capability::ApiKeyVerify, owner)
                .allowed
        };
        // O(1) and read-only (an HMAC and two sled reads, normally from
        // sled's cache): answered on the runtime without a blocking hop.
        let verdict = self
            .state
            .apikeys
            .verify(
                &vc,
                VerifyRequest {
                    key: &key,
                    source,
                    required_scopes: &r.required_scopes,
                    dry_run: r.dry_run,
                },
                now(),
                &may,
            )
            .map_err(apikey_status)?;
        Ok(Response::new(match verdict {
            // One answer for every invalid key, whatever the reason.
            Verdict::Invalid { .. } => pb::VerifyApiKeyResponse::default(),
            Verdict::Valid(v) => pb::VerifyApiKeyResponse {
                valid: true,
                key_id: v.id,
                owner: v.owner,
                scopes: v.scopes,
                env: v.env,
                rate: v.rate.map(|d| pb::RateDecision {
                    allowed: d.allowed,
                    limit: d.limit,
                    remaining: d.remaining,
                    reset_secs: d.reset_secs(),
                    retry_after_secs: d.retry_after_secs(),
                    window: d.window.as_str().into(),
                }),
                missing_scopes: v.missing_scopes,
            },
        }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn list(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "apikey.list", Some(req.get_ref().owner.as_str()));
        let res: Result<Response<pb::ListApiKeysResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            let owner = if r.owner.is_empty() {
                None
            } else {
                parse_owner(&r.owner)?;
                self.state
                    .authorize(&who, Capability::ApiKeyAdmin, &r.owner)?;
                Some(r.owner)
            };
            let filter = ListFilter {
                owner,
                due: r.due,
                include_inactive: r.include_inactive,
                after: (!r.page_token.is_empty()).then_some(r.page_token),
                limit: r.page_size as usize,
            };
            let may = self.may(&who, Capability::ApiKeyAdmin)?;
            let t = secs(now());
            let (keys, next) = self.blocking(move |a| a.list(&filter, t, &*may)).await?;
            Ok(Response::new(pb::ListApiKeysResponse {
                keys: keys.iter().map(|k| meta_pb(k, t)).collect(),
                next_page_token: next.unwrap_or_default(),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn get(
        &self,
        req: Request<pb::GetApiKeyRequest>,
    ) -> Result<Response<pb::ApiKeyMeta>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "apikey.get", Some(req.get_ref().id.as_str()));
        let res: Result<Response<pb::ApiKeyMeta>, Status> = async move {
            let who = caller(&req)?;
            let id = req.into_inner().id;
            let may = self.may(&who, Capability::ApiKeyAdmin)?;
            let rec = self.blocking(move |a| a.get(&id, &*may)).await?;
            Ok(Response::new(meta_pb(&rec, secs(now()))))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn rotate(
        &self,
        req: Request<pb::RotateApiKeyRequest>,
    ) -> Result<Response<pb::RotateApiKeyResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "apikey.rotate", Some(req.get_ref().id.as_str()));
        let res: Result<Response<pb::RotateApiKeyResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            let may = self.may(&who, Capability::ApiKeyAdmin)?;
            let actor = who.identity.actor();
            let t = secs(now());
            let overlap = r.overlap_secs.map(Duration::from_secs);
            let rot = self
                .blocking(move |a| a.rotate(&actor, &r.id, overlap, t, &*may))
                .await?;
            Ok(Response::new(pb::RotateApiKeyResponse {
                key: rot.token.expose().to_owned(),
                meta: Some(meta_pb(&rot.record, t)),
                predecessor: Some(meta_pb(&rot.predecessor, t)),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "apikey.revoke", Some(req.get_ref().id.as_str()));
        let res: Result<Response<pb::RevokeApiKeyResponse>, Status> = async move {
            let who = caller(&req)?;
            let id = req.into_inner().id;
            let may = self.may(&who, Capability::ApiKeyAdmin)?;
            let actor = who.identity.actor();
            let t = secs(now());
            let (rec, already) = self
                .blocking(move |a| a.revoke(&actor, &id, t, &*may))
                .await?;
            Ok(Response::new(pb::RevokeApiKeyResponse {
                meta: Some(meta_pb(&rec, t)),
                already_revoked: already,
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn revoke_owner(
        &self,
        req: Request<pb::RevokeOwnerApiKeysRequest>,
    ) -> Result<Response<pb::RevokeOwnerApiKeysResponse>, Status> {
        let audit = self.state.audit_ctx(
            &req,
            "apikey.revoke_owner",
            Some(req.get_ref().owner.as_str()),
        );
        let res: Result<Response<pb::RevokeOwnerApiKeysResponse>, Status> = async move {
            let who = caller(&req)?;
            let owner = req.into_inner().owner;
            parse_owner(&owner)?;
            self.state
                .authorize(&who, Capability::ApiKeyAdmin, &owner)?;
            let actor = who.identity.actor();
            let t = secs(now());
            let ids = self
                .blocking(move |a| a.revoke_owner(&actor, &owner, t))
                .await?;
            Ok(Response::new(pb::RevokeOwnerApiKeysResponse {
                revoked: ids.len() as u64,
                ids,
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }
}

// Messages that carry a full key: masking Debug (prost's derive is skipped
// for them in build.rs).

fn masked_key(k: &str) -> String {
    match crate::apikeys::ApiKeyToken::parse(k) {
        Ok(t) => t.masked(),
        Err(_) => format!("<{} bytes redacted>", k.len()),
    }
}

impl fmt::Debug for pb::IssueApiKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueApiKeyResponse")
            .field("key", &masked_key(&self.key))
            .field("meta", &self.meta)
            .finish()
    }
}

impl fmt::Debug for pb::RotateApiKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateApiKeyResponse")
            .field("key", &masked_key(&self.key))
            .field("meta", &self.meta)
            .field("predecessor", &self.predecessor)
            .finish()
    }
}

impl fmt::Debug for pb::VerifyApiKeyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyApiKeyRequest")
            .field("key", &masked_key(&self.key))
            .field("source_ip", &self.source_ip)
            .field("required_scopes", &self.required_scopes)
            .field("dry_run", &self.dry_run)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_keys() {
        let t = crate::apikeys::ApiKeyToken::generate("ks", "live").unwrap();
        let k = t.expose().to_owned();
        let secret_part = &k[8..k.len() - 4];
        let msgs = [
            format!(
                "{:?}",
                pb::IssueApiKeyResponse {
                    key: k.clone(),
                    meta: None
                }
            ),
            format!(
                "{:?}",
                pb::RotateApiKeyResponse {
                    key: k.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::VerifyApiKeyRequest {
                    key: k.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::VerifyApiKeyRequest {
                    key: "not-a-key-but-secret".into(),
                    ..Default::default()
                }
            ),
        ];
        for m in msgs {
            assert!(!m.contains(secret_part), "{m}");
            assert!(!m.contains("not-a-key-but-secret"), "{m}");
        }
    }
}
