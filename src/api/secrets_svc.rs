//! `keyseal.v1.Secrets`: Get, Put, List, History, Delete, Undelete,
//! Destroy, Watch.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::{self, secrets_server::Secrets};
use super::{caller, status_of, ChangeEvent, DaemonState};
use crate::name::{check_prefix, SecretName};
use crate::policy::Capability;
use crate::secrets::{OpCtx, PutOptions, SecretMeta, VersionState};

/// Largest List response body we build (the message limit is 4 MiB).
const LIST_RESPONSE_BUDGET: usize = 3 * 1024 * 1024;

/// The Secrets service.
pub struct SecretsService {
    pub state: Arc<DaemonState>,
}

fn parse_name(s: &str) -> Result<SecretName, Status> {
    SecretName::parse(s).map_err(|e| Status::invalid_argument(format!("invalid name: {e}")))
}

fn meta_pb(m: SecretMeta) -> pb::SecretMeta {
    pb::SecretMeta {
        name: m.name,
        current_version: m.current_version,
        created_at: m.created_at,
        updated_at: m.updated_at,
        created_by: m.created_by,
        labels: m.labels.into_iter().collect(),
        rotate_after_secs: m.rotate_after,
        expires_at: m.expires_at,
        max_versions: m.max_versions,
    }
}

impl SecretsService {
    fn notify(&self, name: &SecretName, versions: &[u64], kind: &'static str) {
        for v in versions {
            // No receivers is fine.
            let _ = self.state.events.send(ChangeEvent {
                name: name.as_str().to_owned(),
                version: *v,
                kind,
            });
        }
    }

    async fn versions_op(
        &self,
        req: Request<pb::VersionsRequest>,
        cap: Capability,
        kind: &'static str,
    ) -> Result<Response<pb::VersionsResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let name = parse_name(&r.name)?;
        self.state.authorize(&who, cap, name.as_str())?;
        if r.versions.contains(&0) {
            return Err(Status::invalid_argument("versions start at 1"));
        }
        let ctx = OpCtx::new(who.identity.actor());
        let n = name.clone();
        let versions = r.versions;
        let done = self
            .state
            .blocking(move |s| match kind {
                "delete" => s.delete(&ctx, &n, &versions),
                "undelete" => s.undelete(&ctx, &n, &versions),
                _ => s.destroy(&ctx, &n, &versions),
            })
            .await?;
        tracing::info!(name = %name, versions = ?done, op = kind, "versions changed");
        self.notify(&name, &done, kind);
        Ok(Response::new(pb::VersionsResponse { versions: done }))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Secrets for SecretsService {
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "secret.get", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::GetResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            let name = parse_name(&r.name)?;
            self.state
                .authorize(&who, Capability::SecretRead, name.as_str())?;
            let ctx = OpCtx::new(who.identity.actor());
            let version = (r.version != 0).then_some(r.version);
            // A warm DEK cache needs no root device: answer on this thread
            // (store read + AES-GCM, microseconds) instead of a hop to the
            // blocking pool; otherwise the bounded blocking path.
            let cached = if self.state.store_failed() {
                None
            } else {
                self.state
                    .secrets
                    .get_cached(&ctx, &name, version)
                    .map_err(status_of)?
            };
            let v = match cached {
                Some(v) => v,
                None => {
                    self.state
                        .blocking(move |s| s.get(&ctx, &name, version))
                        .await?
                }
            };
            Ok(Response::new(pb::GetResponse {
                name: v.name.as_str().to_owned(),
                version: v.version,
                value: v.value.to_vec(),
                created_at: v.created_at,
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "secret.put", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::PutResponse>, Status> = async move {
            let who = caller(&req)?;
            let mut r = req.into_inner();
            let name = parse_name(&r.name)?;
            self.state
                .authorize(&who, Capability::SecretWrite, name.as_str())?;
            for (k, v) in &r.labels {
                if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                    return Err(Status::invalid_argument(
                        "label keys must be 1..=128 bytes and values at most 1024 bytes",
                    ));
                }
            }
            if r.labels.len() > 64 {
                return Err(Status::invalid_argument("at most 64 labels"));
            }
            let opts = PutOptions {
                cas: r.cas,
                labels: r.set_labels.then(|| r.labels.into_iter().collect()),
                rotate_after: r.rotate_after_secs,
                expires_at: r.expires_at,
                max_versions: r.max_versions,
            };
            let ctx = OpCtx::new(who.identity.actor());
            let value = zeroize::Zeroizing::new(std::mem::take(&mut r.value));
            let n = name.clone();
            let version = self
                .state
                .blocking(move |s| s.put(&ctx, &n, &value, &opts))
                .await?;
            tracing::info!(name = %name, version, "secret written");
            self.notify(&name, &[version], "put");
            Ok(Response::new(pb::PutResponse {
                name: name.as_str().to_owned(),
                version,
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "secret.list", Some(req.get_ref().prefix.as_str()));
        let res: Result<Response<pb::ListResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            check_prefix(&r.prefix)
                .map_err(|e| Status::invalid_argument(format!("invalid prefix: {e}")))?;
            if !r.page_token.is_empty() {
                check_prefix(&r.page_token)
                    .map_err(|_| Status::invalid_argument("invalid page_token"))?;
            }
            let limit = match r.page_size {
                0 => 100,
                n => n.min(1000) as usize,
            };
            let policy = self.state.policy.current();
            let prefix = r.prefix.clone();
            let mut after = (!r.page_token.is_empty()).then_some(r.page_token);
            // Only names the caller may read or write are listed. The store is
            // asked for just the entries still missing, the page ends on a
            // visible name (so the token reveals nothing hidden), and it stops
            // before the response could exceed the message size limit.
            let mut out: Vec<pb::SecretMeta> = Vec::new();
            let mut bytes = 0usize;
            let next = 'pages: loop {
                let (p, a, want) = (prefix.clone(), after.clone(), limit - out.len());
                let page = self
                    .state
                    .blocking(move |s| s.list(&p, a.as_deref(), want))
                    .await?;
                for m in page.items {
                    let visible = policy
                        .check(&who.identity, Capability::SecretRead, &m.name)
                        .allowed
                        || policy
                            .check(&who.identity, Capability::SecretWrite, &m.name)
                            .allowed;
                    if !visible {
                        continue;
                    }
                    let item = meta_pb(m);
                    let size = prost::Message::encoded_len(&item) + 8;
                    if !out.is_empty() && bytes + size > LIST_RESPONSE_BUDGET {
                        break 'pages out.last().map(|m| m.name.clone()).unwrap_or_default();
                    }
                    bytes += size;
                    out.push(item);
                }
                match page.next {
                    None => break String::new(),
                    Some(_) if out.len() >= limit => {
                        break out.last().map(|m| m.name.clone()).unwrap_or_default();
                    }
                    Some(n) => after = Some(n),
                }
            };
            Ok(Response::new(pb::ListResponse {
                secrets: out,
                next_page_token: next,
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "secret.history", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::HistoryResponse>, Status> = async move {
            let who = caller(&req)?;
            let name = parse_name(&req.into_inner().name)?;
            self.state
                .authorize(&who, Capability::SecretRead, name.as_str())?;
            let (meta, versions) = self
                .state
                .blocking(move |s| Ok((s.describe(&name)?, s.history(&name)?)))
                .await?;
            Ok(Response::new(pb::HistoryResponse {
                meta: Some(meta_pb(meta)),
                versions: versions
                    .into_iter()
                    .map(|v| {
                        let (state, at) = match v.state {
                            VersionState::Active => ("active", 0),
                            VersionState::Deleted(t) => ("deleted", t),
                            VersionState::Destroyed(t) => ("destroyed", t),
                        };
                        pb::VersionInfo {
                            version: v.version,
                            created_at: v.created_at,
                            created_by: v.created_by,
                            state: state.into(),
                            state_changed_at: at,
                            root_version: v.root_version.unwrap_or(0),
                        }
                    })
                    .collect(),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn delete(
        &self,
        req: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "secret.delete", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::VersionsResponse>, Status> = async move {
            self.versions_op(req, Capability::SecretDelete, "delete")
                .await
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn undelete(
        &self,
        req: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsResponse>, Status> {
        let audit =
            self.state
                .audit_ctx(&req, "secret.undelete", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::VersionsResponse>, Status> = async move {
            self.versions_op(req, Capability::SecretDelete, "undelete")
                .await
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn destroy(
        &self,
        req: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "secret.destroy", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::VersionsResponse>, Status> = async move {
            self.versions_op(req, Capability::SecretDestroy, "destroy")
                .await
        }
        .await;
        self.state.audited(audit, res).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let audit = self.state.audit_ctx(&req, "secret.watch", None);
        let res: Result<Response<Self::WatchStream>, Status> = async move {
        let who = caller(&req)?;
        let r = req.into_inner();
        if r.names.len() > 256 {
            return Err(Status::invalid_argument(
                "watch at most 256 names or prefixes",
            ));
        }
        let mut filters = Vec::with_capacity(r.names.len());
        for n in r.names {
            if let Some(p) = n.strip_suffix('/') {
                parse_name(p)?;
            } else {
                parse_name(&n)?;
            }
            filters.push(n);
        }
        let policy = self.state.policy.clone();
        let mut rx = self.state.events.subscribe();
        let mut shutdown = self.state.shutdown.clone();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = tx.closed() => break,
                    r = shutdown.changed() => {
                        let stopping = r.is_err() || *shutdown.borrow();
                        if stopping {
                            let _ = tx.send(Err(Status::unavailable("keyseald is shutting down; watch again after it restarts"))).await;
                            break;
                        }
                        continue;
                    }
                    ev = rx.recv() => ev,
                };
                let msg = match ev {
                    Ok(ev) => {
                        let wanted = filters.is_empty()
                            || filters.iter().any(|f| {
                                if f.ends_with('/') {
                                    ev.name.starts_with(f.as_str())
                                } else {
                                    *f == ev.name
                                }
                            });
                        // Policy is checked per event, with the current policy.
                        let may = policy
                            .current()
                            .check(&who.identity, Capability::SecretRead, &ev.name)
                            .allowed;
                        if !(wanted && may) {
                            continue;
                        }
                        Ok(pb::WatchEvent {
                            name: ev.name,
                            version: ev.version,
                            kind: ev.kind.into(),
                        })
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::data_loss(format!(
                            "watch fell behind and missed {n} events; re-read and watch again"
                        )))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                let fatal = msg.is_err();
                if tx.send(msg).await.is_err() || fatal {
                    break;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(out);
        Ok(Response::new(Box::pin(stream) as Self::WatchStream))
        }
        .await;
        self.state.audited(audit, res).await
    }
}
