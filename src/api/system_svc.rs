//! `keyseal.v1.System`: Status and RotateRoot (streamed progress).

use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::{self, system_server::System};
use super::{caller, status_of, DaemonState};
use crate::policy::Capability;
use crate::secrets::RotationOutcome;

/// Name checked for system-wide capabilities.
pub const SYSTEM_RESOURCE: &str = "system";

/// The System service.
pub struct SystemService {
    pub state: Arc<DaemonState>,
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::RotateRootProgress, Status>> + Send>>;

#[tonic::async_trait]
impl System for SystemService {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let audit = self.state.audit_ctx(&req, "system.status", None);
        let res: Result<Response<pb::StatusResponse>, Status> = async move {
            let who = caller(&req)?;
            self.state
                .authorize(&who, Capability::SystemAdmin, SYSTEM_RESOURCE)?;
            let st = self.state.clone();
            // After a failed store write (a full disk) sled refuses writes
            // until restarted and its iterators spin: do not count then.
            let store_failed = st.audit.as_ref().is_some_and(|a| a.store_failed());
            let (root_state, count, stats, backend) = self
                .state
                .blocking_unguarded(move |s| {
                    Ok((
                        s.store().root_state()?,
                        if store_failed { 0 } else { s.count() as u64 },
                        s.envelope().stats(),
                        s.envelope().root().kind(),
                    ))
                })
                .await?;
            let disk = st.secrets.store().disk.clone();
            let (disk_state, store_path) = tokio::task::spawn_blocking(move || {
                (disk.state(), disk.path().display().to_string())
            })
            .await
            .map_err(|_| Status::internal("request worker failed"))?;
            let root_state = root_state.unwrap_or(crate::store::RootState {
                active: 0,
                retired: vec![],
                rotating_to: None,
            });
            Ok(Response::new(pb::StatusResponse {
                version: env!("CARGO_PKG_VERSION").into(),
                root_backend: backend.to_string(),
                root_key_version: root_state.active,
                retired_root_versions: root_state.retired,
                rotating_to: root_state.rotating_to.unwrap_or(0),
                secrets: count,
                uptime_secs: st.started.elapsed().as_secs(),
                cache: Some(pb::CacheStats {
                    entries: stats.entries,
                    capacity: stats.capacity,
                    hits: stats.hits,
                    misses: stats.misses,
                    evictions: stats.evictions,
                    root_calls: stats.root_calls,
                }),
                policy_rules: st.policy.current().rule_count() as u32,
                memory_locked: st.hardening.memory_locked,
                caller: who.identity.display_short(),
                audit_enabled: st.audit.is_some(),
                audit_appended: st.audit.as_ref().map(|a| a.stats().appended).unwrap_or(0),
                audit_failures: st.audit.as_ref().map(|a| a.stats().failures).unwrap_or(0),
                audit_batches: st.audit.as_ref().map(|a| a.stats().batches).unwrap_or(0),
                audit_tree_size: st.audit.as_ref().map(|a| a.head().size).unwrap_or(0),
                audit_last_error: st
                    .audit
                    .as_ref()
                    .and_then(|a| a.stats().last_error)
                    .unwrap_or_default(),
                disk_free_known: disk_state.free_bytes.is_some(),
                disk_free_bytes: disk_state.free_bytes.unwrap_or(0),
                disk_min_free_bytes: disk_state.limits.min_free_bytes,
                disk_audit_reserve_bytes: disk_state.limits.audit_reserve_bytes,
                disk_writes_refused: disk_state.writes_refused,
                disk_audit_refused: disk_state.audit_refused,
                store_path,
            }))
        }
        .await;
        self.state.audited_best_effort(audit, res).await
    }

    type RotateRootStream = ProgressStream;

    async fn rotate_root(
        &self,
        req: Request<pb::RotateRootRequest>,
    ) -> Result<Response<Self::RotateRootStream>, Status> {
        let audit = self.state.audit_ctx(&req, "root.rotate", None);
        let res: Result<Response<Self::RotateRootStream>, Status> = async move {
            let who = caller(&req)?;
            self.state
                .authorize(&who, Capability::SystemAdmin, SYSTEM_RESOURCE)?;
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let secrets = self.state.secrets.clone();
            tracing::info!(caller = %who.identity.display_short(), "root rotation requested");
            let state = self.state.clone();
            let progress_tx = tx.clone();
            tokio::spawn(async move {
                let out = tokio::task::spawn_blocking(move || {
                    let mut last = std::time::Instant::now();
                    secrets.rotate_root(&mut |p| {
                        // Throttle to ~20 updates/s; a gone client does not stop the rotation.
                        if last.elapsed().as_millis() >= 50 || p.done == p.total {
                            last = std::time::Instant::now();
                            let _ = progress_tx.blocking_send(Ok(pb::RotateRootProgress {
                                from_version: p.from,
                                to_version: p.to,
                                done: p.done,
                                total: p.total,
                                rewrapped: p.rewrapped,
                                completed: false,
                            }));
                        }
                        ControlFlow::Continue(())
                    })
                })
                .await;
                let msg = match out {
                    Ok(Ok(RotationOutcome::Completed {
                        from,
                        to,
                        rewrapped,
                    })) => {
                        tracing::info!(from, to, rewrapped, "root rotation completed");
                        state
                            .audit_rotation_completed(from, to, rewrapped, from == to)
                            .await;
                        Ok(pb::RotateRootProgress {
                            from_version: from,
                            to_version: to,
                            done: rewrapped,
                            total: rewrapped,
                            rewrapped,
                            completed: true,
                        })
                    }
                    Ok(Ok(RotationOutcome::Interrupted { to, .. })) => Err(Status::aborted(
                        format!("rotation to v{to} was interrupted; run it again to resume"),
                    )),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "root rotation failed");
                        Err(status_of(e))
                    }
                    Err(_) => Err(Status::internal("the rotation worker failed")),
                };
                let _ = tx.send(msg).await;
            });
            Ok(Response::new(
                Box::pin(ReceiverStream::new(rx)) as Self::RotateRootStream
            ))
        }
        .await;
        self.state.audited(audit, res).await
    }
}
