//! `keyseal.v1.Keys`: named signing keys held in the root device.
//!
//! Capabilities: `key:admin` (create, rotate, enable/disable, destroy),
//! `key:sign` (sign, verify); reading public material (get, list, jwks)
//! needs either.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::{self, keys_server::Keys as KeysApi};
use super::{caller, Caller, DaemonState};
use crate::keys::{jwk, kid, spki_pem, KeyRecord, KeyVersionState, KeysError, SignInput};
use crate::name::SecretName;
use crate::policy::Capability;
use crate::root::{RootError, SignAlg};
use crate::secrets::OpCtx;

/// Bound on key generation (create, rotate).
const KEYGEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The Keys service.
pub struct KeysService {
    pub state: Arc<DaemonState>,
}

fn parse_name(s: &str) -> Result<SecretName, Status> {
    SecretName::parse(s).map_err(|e| Status::invalid_argument(format!("invalid key name: {e}")))
}

/// Maps a keys error to a gRPC status (messages never carry key material).
pub fn status_of_keys(e: KeysError) -> Status {
    let msg = e.to_string();
    match e {
        KeysError::InvalidName(_) | KeysError::InvalidArgument(_) => Status::invalid_argument(msg),
        KeysError::NotFound | KeysError::VersionNotFound(_) => Status::not_found(msg),
        KeysError::Exists => Status::already_exists(msg),
        KeysError::Disabled(_) => Status::failed_precondition(msg),
        KeysError::Root(RootError::Unsupported(_)) => Status::unimplemented(msg),
        KeysError::Root(RootError::Config(_)) => Status::invalid_argument(msg),
        KeysError::Root(RootError::Integrity(_)) => Status::data_loss(msg),
        KeysError::Root(_) => Status::unavailable(msg),
        KeysError::Store(crate::store::StoreError::NoSpace(_)) => Status::resource_exhausted(msg),
        KeysError::Store(_) => Status::internal(msg),
    }
}

fn info(rec: KeyRecord) -> Result<pb::KeyInfo, Status> {
    let mut versions = Vec::with_capacity(rec.versions.len());
    for v in &rec.versions {
        let j = jwk(rec.alg, &v.spki, &kid(&rec.name, v.version)).map_err(status_of_keys)?;
        versions.push(pb::KeyVersionInfo {
            version: v.version,
            state: match v.state {
                KeyVersionState::Enabled => "enabled",
                KeyVersionState::Disabled => "disabled",
            }
            .into(),
            created_at: v.created_at,
            public_key_pem: spki_pem(&v.spki),
            jwk: j.to_string(),
        });
    }
    Ok(pb::KeyInfo {
        name: rec.name,
        algorithm: rec.alg.as_str().into(),
        current_version: rec.current,
        created_at: rec.created_at,
        created_by: rec.created_by,
        versions,
    })
}

/// Owned sign/verify input taken from a request.
enum Input {
    Message(Vec<u8>),
    Digest(Vec<u8>),
}

impl Input {
    fn from_sign(i: Option<pb::sign_request::Input>, hash: &str) -> Result<Input, Status> {
        match i {
            Some(pb::sign_request::Input::Message(m)) => Ok(Input::Message(m)),
            Some(pb::sign_request::Input::Digest(d)) => Self::digest(d, hash),
            None => Err(Status::invalid_argument("give a message or a digest")),
        }
    }

    fn from_verify(i: Option<pb::verify_request::Input>, hash: &str) -> Result<Input, Status> {
        match i {
            Some(pb::verify_request::Input::Message(m)) => Ok(Input::Message(m)),
            Some(pb::verify_request::Input::Digest(d)) => Self::digest(d, hash),
            None => Err(Status::invalid_argument("give a message or a digest")),
        }
    }

    fn digest(d: Vec<u8>, hash: &str) -> Result<Input, Status> {
        if !hash.eq_ignore_ascii_case("sha256") {
            return Err(Status::invalid_argument(
                "hash must be \"sha256\" for a prehashed digest",
            ));
        }
        if d.len() != 32 {
            return Err(Status::invalid_argument("a SHA-256 digest is 32 bytes"));
        }
        Ok(Input::Digest(d))
    }

    fn as_input(&self) -> SignInput<'_> {
        match self {
            Input::Message(m) => SignInput::Message(m),
            Input::Digest(d) => SignInput::Sha256Digest(d),
        }
    }
}

impl KeysService {
    fn read_allowed(&self, who: &Caller, name: &str) -> Result<(), Status> {
        let p = self.state.policy.current();
        if p.check(&who.identity, Capability::KeySign, name).allowed
            || p.check(&who.identity, Capability::KeyAdmin, name).allowed
        {
            Ok(())
        } else {
            self.state.authorize(who, Capability::KeySign, name)
        }
    }

    /// `EnableVersion` / `DisableVersion`: audited as `key.enable` /
    /// `key.disable`, capability `key:admin` on the key.
    async fn set_version_enabled(
        &self,
        req: Request<pb::KeyVersionRequest>,
        enabled: bool,
    ) -> Result<Response<pb::KeyInfo>, Status> {
        let op = if enabled { "key.enable" } else { "key.disable" };
        let audit = self
            .state
            .audit_ctx(&req, op, Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::KeyInfo>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            let name = parse_name(&r.name)?;
            self.state
                .authorize(&who, Capability::KeyAdmin, name.as_str())?;
            let rec = self
                .keys(move |k| k.set_enabled(&name, r.version, enabled))
                .await?;
            tracing::info!(key = %rec.name, version = r.version, enabled, "key version state changed");
            Ok(Response::new(info(rec)?))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn keys<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::keys::Keys) -> Result<T, KeysError> + Send + 'static,
    ) -> Result<T, Status> {
        let keys = self.state.keys.clone();
        self.state
            .run_blocking(move || f(&keys).map_err(status_of_keys))
            .await
    }

    /// For signing: on the device threads ([`crate::api::device`]), which
    /// keep no more calls in the device at once than it can use.
    async fn keys_device<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::keys::Keys) -> Result<T, KeysError> + Send + 'static,
    ) -> Result<T, Status> {
        let keys = self.state.keys.clone();
        self.state
            .device
            .run(self.state.request_timeout, move || {
                f(&keys).map_err(status_of_keys)
            })
            .await
    }

    /// For key generation: RSA-3072 inside a TPM takes seconds, more under
    /// load, so it gets a longer bound than ordinary requests.
    async fn keys_slow<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::keys::Keys) -> Result<T, KeysError> + Send + 'static,
    ) -> Result<T, Status> {
        let keys = self.state.keys.clone();
        let limit = self.state.request_timeout.max(KEYGEN_TIMEOUT);
        self.state
            .run_blocking_for(limit, move || f(&keys).map_err(status_of_keys))
            .await
    }
}

#[tonic::async_trait]
impl KeysApi for KeysService {
    async fn create(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::KeyInfo>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "key.create", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::KeyInfo>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            let name = parse_name(&r.name)?;
            let alg = SignAlg::parse(&r.algorithm).ok_or_else(|| {
                Status::invalid_argument(
                    "algorithm must be \"ecdsa-p256\", \"ed25519\" or \"rsa-pss-3072\"",
                )
            })?;
            self.state
                .authorize(&who, Capability::KeyAdmin, name.as_str())?;
            let ctx = OpCtx::new(who.identity.actor());
            let rec = self
                .keys_slow(move |k| k.create(&name, alg, &ctx.actor, ctx.now))
                .await?;
            tracing::info!(key = %rec.name, alg = rec.alg.as_str(), "signing key created");
            Ok(Response::new(info(rec)?))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn list(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "key.list", Some(req.get_ref().prefix.as_str()));
        let res: Result<Response<pb::ListKeysResponse>, Status> = async move {
            let who = caller(&req)?;
            let prefix = req.into_inner().prefix;
            crate::name::check_prefix(&prefix)
                .map_err(|e| Status::invalid_argument(format!("invalid prefix: {e}")))?;
            let recs = self.keys(move |k| k.list(&prefix)).await?;
            let p = self.state.policy.current();
            let mut keys = Vec::new();
            for rec in recs {
                if p.check(&who.identity, Capability::KeySign, &rec.name)
                    .allowed
                    || p.check(&who.identity, Capability::KeyAdmin, &rec.name)
                        .allowed
                {
                    keys.push(info(rec)?);
                }
            }
            Ok(Response::new(pb::ListKeysResponse { keys }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn get(&self, req: Request<pb::KeyNameRequest>) -> Result<Response<pb::KeyInfo>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "key.get", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::KeyInfo>, Status> = async move {
            let who = caller(&req)?;
            let name = parse_name(&req.into_inner().name)?;
            self.read_allowed(&who, name.as_str())?;
            let rec = self.keys(move |k| k.get(&name)).await?;
            Ok(Response::new(info(rec)?))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn sign(
        &self,
        req: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "key.sign", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::SignResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            let name = parse_name(&r.name)?;
            let input = Input::from_sign(r.input, &r.hash)?;
            self.state
                .authorize(&who, Capability::KeySign, name.as_str())?;
            let n = name.clone();
            let (version, signature) = self
                .keys_device(move |k| k.sign(&n, input.as_input()))
                .await?;
            tracing::debug!(key = %name, version, "signed");
            Ok(Response::new(pb::SignResponse {
                version,
                signature,
                kid: kid(name.as_str(), version),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "key.verify", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::VerifyResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            let name = parse_name(&r.name)?;
            let input = Input::from_verify(r.input, &r.hash)?;
            self.state
                .authorize(&who, Capability::KeySign, name.as_str())?;
            let version = (r.version != 0).then_some(r.version);
            let sig = r.signature;
            let v = self
                .keys(move |k| k.verify(&name, input.as_input(), &sig, version))
                .await?;
            Ok(Response::new(pb::VerifyResponse {
                valid: v.is_some(),
                version: v.unwrap_or(0),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn rotate(
        &self,
        req: Request<pb::KeyNameRequest>,
    ) -> Result<Response<pb::KeyInfo>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "key.rotate", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::KeyInfo>, Status> = async move {
            let who = caller(&req)?;
            let name = parse_name(&req.into_inner().name)?;
            self.state
                .authorize(&who, Capability::KeyAdmin, name.as_str())?;
            let now = OpCtx::new("").now;
            let rec = self.keys_slow(move |k| k.rotate(&name, now)).await?;
            tracing::info!(key = %rec.name, version = rec.current, "signing key rotated");
            Ok(Response::new(info(rec)?))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn disable_version(
        &self,
        req: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::KeyInfo>, Status> {
        self.set_version_enabled(req, false).await
    }

    async fn enable_version(
        &self,
        req: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::KeyInfo>, Status> {
        self.set_version_enabled(req, true).await
    }

    async fn destroy(
        &self,
        req: Request<pb::KeyNameRequest>,
    ) -> Result<Response<pb::DestroyKeyResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "key.destroy", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::DestroyKeyResponse>, Status> = async move {
            let who = caller(&req)?;
            let name = parse_name(&req.into_inner().name)?;
            self.state
                .authorize(&who, Capability::KeyAdmin, name.as_str())?;
            let n = name.clone();
            self.keys(move |k| k.destroy(&n)).await?;
            tracing::info!(key = %name, "signing key destroyed");
            Ok(Response::new(pb::DestroyKeyResponse {}))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn jwks(
        &self,
        req: Request<pb::JwksRequest>,
    ) -> Result<Response<pb::JwksResponse>, Status> {
        let audit = self.state.audit_ctx(&req, "key.jwks", None);
        let res: Result<Response<pb::JwksResponse>, Status> = async move {
            let who = caller(&req)?;
            let names = req.into_inner().names;
            if names.is_empty() || names.len() > 100 {
                return Err(Status::invalid_argument("name 1 to 100 keys"));
            }
            let mut parsed = Vec::with_capacity(names.len());
            for n in &names {
                let n = parse_name(n)?;
                self.read_allowed(&who, n.as_str())?;
                parsed.push(n);
            }
            let jwks = self.keys(move |k| k.jwks(&parsed)).await?;
            Ok(Response::new(pb::JwksResponse {
                jwks: jwks.to_string(),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn mint_token(
        &self,
        req: Request<pb::MintTokenRequest>,
    ) -> Result<Response<pb::MintTokenResponse>, Status> {
        let audit = self.state.audit_ctx(
            &req,
            "key.mint_token",
            Some(req.get_ref().key_name.as_str()),
        );
        let res: Result<Response<pb::MintTokenResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            let name = parse_name(&r.key_name)?;
            self.state
                .authorize(&who, Capability::KeySign, name.as_str())?;
            let ttl = match r.ttl_secs {
                0 => 900,
                t if t > 86_400 => {
                    return Err(Status::invalid_argument("ttl_secs is at most 86400"))
                }
                t => u64::from(t),
            };
            let key = zeroize::Zeroizing::new(r.api_key);
            let policy = self.state.policy.current();
            let may = |owner: &str| {
                policy
                    .check(&who.identity, Capability::ApiKeyVerify, owner)
                    .allowed
            };
            let vc = crate::apikeys::VerifyCaller {
                uid: who.identity.uid,
                unit: who.identity.system_unit().map(str::to_owned),
                actor: who.identity.actor(),
            };
            let verdict = self
                .state
                .apikeys
                .verify(
                    &vc,
                    crate::apikeys::VerifyRequest {
                        key: &key,
                        source: None,
                        required_scopes: &[],
                        dry_run: false,
                    },
                    crate::apikeys::now(),
                    &may,
                )
                .map_err(|e| Status::unauthenticated(format!("API key not accepted: {e}")))?;
            let v = match verdict {
                crate::apikeys::Verdict::Valid(v)
                    if v.rate.as_ref().map_or(true, |d| d.allowed) =>
                {
                    v
                }
                crate::apikeys::Verdict::Valid(_) => {
                    return Err(Status::resource_exhausted(
                        "the API key's rate limit is exhausted",
                    ))
                }
                // One answer for every invalid key, whatever the reason.
                crate::apikeys::Verdict::Invalid { .. } => {
                    return Err(Status::unauthenticated("API key not accepted"))
                }
            };
            let now = OpCtx::new("").now;
            let mut jti = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut jti);
            let claims = crate::keys::TokenClaims {
                iss: "keyseal".into(),
                sub: v.owner,
                scope: v.scopes.join(" "),
                iat: now,
                exp: now + ttl,
                jti: hex::encode(jti),
                key_id: v.id,
                env: Default::default(),
            };
            let n = name.clone();
            let (token, kid) = self
                .keys_device(move |k| {
                    let rec = k.get(&n)?;
                    Ok((k.mint_jwt(&n, &claims)?, kid(&rec.name, rec.current)))
                })
                .await?;
            tracing::info!(key = %name, kid = %kid, "token minted");
            Ok(Response::new(pb::MintTokenResponse {
                token,
                expires_at: now + ttl,
                kid,
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }
}
