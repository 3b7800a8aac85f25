//! `keyseal.v1.Audit`: export signed bundles, query, tail, the audit HMAC
//! of sensitive identifiers (all need `audit:read`), and prune exported
//! events (needs `audit:prune`).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::{self, audit_server::Audit};
use super::{caller, DaemonState};
use crate::audit::{AuditLog, EventFilter, EventRange, ExportOptions, Outcome};
use crate::policy::Capability;

/// Name checked for `audit:read` (a system capability; the name is ignored).
const AUDIT_RESOURCE: &str = "audit";
/// Bytes per streamed bundle chunk.
const CHUNK: usize = 1024 * 1024;

/// Bound on building an export bundle (the whole log, on a busy machine).
const EXPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);

/// The Audit service.
pub struct AuditService {
    pub state: Arc<DaemonState>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::AuditBundleChunk, Status>> + Send>>;
type LineStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEventLine, Status>> + Send>>;

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn opt(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

fn audit_err(e: crate::audit::AuditError) -> Status {
    use crate::audit::AuditError as E;
    match e {
        E::NotExported { .. } | E::Pruned(_) => Status::failed_precondition(e.to_string()),
        E::InvalidArgument(m) => Status::invalid_argument(m),
        E::Corrupt(_) => Status::data_loss(e.to_string()),
        e if e.is_no_space() => Status::resource_exhausted(e.to_string()),
        e if e.is_unavailable() => Status::unavailable(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}

/// Sends `path` as chunks of at most [`CHUNK`] bytes named `name`; an
/// empty file is one empty chunk. `Ok` also when the client went away.
async fn stream_file(
    name: &str,
    path: &std::path::Path,
    tx: &tokio::sync::mpsc::Sender<Result<pb::AuditBundleChunk, Status>>,
) -> Result<(), Status> {
    use tokio::io::AsyncReadExt;
    let read_err = |e: std::io::Error| Status::internal(format!("export file {name}: {e}"));
    let mut f = tokio::fs::File::open(path).await.map_err(read_err)?;
    let len = f.metadata().await.map_err(read_err)?.len();
    let mut sent = 0u64;
    loop {
        let want = usize::try_from((len - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
        let mut data = vec![0u8; want];
        f.read_exact(&mut data).await.map_err(read_err)?;
        sent += want as u64;
        let msg = pb::AuditBundleChunk {
            file: name.to_owned(),
            data,
            last_of_file: sent >= len,
        };
        if tx.send(Ok(msg)).await.is_err() || sent >= len {
            return Ok(());
        }
    }
}

impl AuditService {
    fn log(&self) -> Result<Arc<AuditLog>, Status> {
        let log = self.state.audit.clone().ok_or_else(|| {
            Status::failed_precondition("auditing is disabled (audit.unsafe_disable)")
        })?;
        // sled iterators spin on a database that failed a write: refuse
        // reading the log until keyseald restarts.
        if log.store_failed() {
            return Err(DaemonState::store_failed_status());
        }
        Ok(log)
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    type ExportStream = ChunkStream;

    async fn export(
        &self,
        req: Request<pb::AuditExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let audit = self.state.audit_ctx(&req, "audit.export", None);
        let res: Result<Response<Self::ExportStream>, Status> = async {
            let who = caller(&req)?;
            self.state
                .authorize(&who, Capability::AuditRead, AUDIT_RESOURCE)?;
            let log = self.log()?;
            let r = req.get_ref();
            let after = (!r.after_checkpoint.is_empty()).then(|| r.after_checkpoint.clone());
            if after.as_ref().is_some_and(|a| a.len() > 64 * 1024) {
                return Err(Status::invalid_argument("after_checkpoint is too long"));
            }
            let opts = ExportOptions {
                range: EventRange::Time {
                    since: opt(r.since_ms),
                    until: opt(r.until_ms),
                },
                after,
                now: unix_secs(),
            };
            // Export into a private temp dir, stream the files from it,
            // remove it when the stream ends (or the client goes away):
            // memory stays at one chunk per file read, however large the
            // bundle. The bound grows with the log, not with
            // `request_timeout`: a whole log of a million events takes
            // seconds on an idle machine and much longer on a busy one, and
            // failing it as "did not answer in time" tells the auditor
            // nothing useful.
            let (dir, files) = self
                .state
                .run_blocking_for(self.state.request_timeout.max(EXPORT_TIMEOUT), move || {
                    let dir = tempfile::Builder::new()
                        .prefix("keyseal-export-")
                        .tempdir()
                        .map_err(|e| Status::internal(format!("temp dir: {e}")))?;
                    let out = dir.path().join("bundle");
                    log.export(&opts, &out).map_err(audit_err)?;
                    let mut entries: Vec<_> = std::fs::read_dir(&out)
                        .map_err(|e| Status::internal(e.to_string()))?
                        .filter_map(Result::ok)
                        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                        .collect();
                    entries.sort();
                    Ok((dir, entries))
                })
                .await?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let _dir = dir; // removed when this task ends
                for (name, path) in files {
                    if let Err(e) = stream_file(&name, &path, &tx).await {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            });
            Ok(Response::new(
                Box::pin(ReceiverStream::new(rx)) as Self::ExportStream
            ))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn query(
        &self,
        req: Request<pb::AuditQueryRequest>,
    ) -> Result<Response<pb::AuditQueryResponse>, Status> {
        let audit = self.state.audit_ctx(&req, "audit.query", None);
        let res: Result<Response<pb::AuditQueryResponse>, Status> = async {
            let who = caller(&req)?;
            self.state
                .authorize(&who, Capability::AuditRead, AUDIT_RESOURCE)?;
            let log = self.log()?;
            let r = req.into_inner();
            let result = match r.result.as_str() {
                "" => None,
                s => Some(Outcome::parse(s).ok_or_else(|| {
                    Status::invalid_argument("result must be ok, denied or error")
                })?),
            };
            let nz = |s: String| (!s.is_empty()).then_some(s);
            let filter = EventFilter {
                actor: nz(r.actor),
                op: nz(r.op),
                target: nz(r.target),
                result,
                since: opt(r.since_ms),
                until: opt(r.until_ms),
            };
            let limit = match r.limit {
                0 => 100,
                n => n.min(1000) as usize,
            };
            let from = r.after_seq.saturating_add(1);
            let (events, next) = self
                .state
                .run_blocking(move || log.query(&filter, from, limit).map_err(audit_err))
                .await?;
            let mut lines = Vec::with_capacity(events.len());
            for e in events {
                let b = e.encode().map_err(|e| Status::internal(e.to_string()))?;
                lines.push(String::from_utf8_lossy(&b).into_owned());
            }
            Ok(Response::new(pb::AuditQueryResponse {
                events: lines,
                next_seq: next.map(|n| n - 1).unwrap_or(0),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    type TailStream = LineStream;

    async fn tail(
        &self,
        req: Request<pb::AuditTailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let audit = self.state.audit_ctx(&req, "audit.tail", None);
        let res: Result<Response<Self::TailStream>, Status> = async {
            let who = caller(&req)?;
            self.state.authorize(&who, Capability::AuditRead, AUDIT_RESOURCE)?;
            let log = self.log()?;
            let r = req.into_inner();
            let last = if r.last == 0 { 10 } else { u64::from(r.last.min(10_000)) };
            let size = log.head().size;
            let start = size.saturating_sub(last).saturating_add(1).max(log.first_seq());
            let mut shutdown = self.state.shutdown.clone();
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(async move {
                let mut next = start;
                let mut size_rx = log.watch_size();
                loop {
                    let l = log.clone();
                    let from = next;
                    let page = tokio::task::spawn_blocking(move || l.query(&EventFilter::default(), from, 1000)).await;
                    let Ok(Ok((events, _))) = page else {
                        let _ = tx.send(Err(Status::unavailable("audit log read failed"))).await;
                        return;
                    };
                    for e in events {
                        next = e.seq + 1;
                        let Ok(b) = e.encode() else { continue };
                        let line = pb::AuditEventLine { json: String::from_utf8_lossy(&b).into_owned() };
                        if tx.send(Ok(line)).await.is_err() {
                            return;
                        }
                    }
                    if !r.follow {
                        return;
                    }
                    tokio::select! {
                        _ = tx.closed() => return,
                        c = shutdown.changed() => {
                            if c.is_err() || *shutdown.borrow() {
                                let _ = tx.send(Err(Status::unavailable("keyseald is shutting down"))).await;
                                return;
                            }
                        }
                        c = size_rx.changed() => { if c.is_err() { return; } }
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as Self::TailStream))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn hash(
        &self,
        req: Request<pb::AuditHashRequest>,
    ) -> Result<Response<pb::AuditHashResponse>, Status> {
        let audit = self.state.audit_ctx(&req, "audit.hash", None);
        let res: Result<Response<pb::AuditHashResponse>, Status> = async {
            let who = caller(&req)?;
            self.state
                .authorize(&who, Capability::AuditRead, AUDIT_RESOURCE)?;
            let log = self.log()?;
            Ok(Response::new(pb::AuditHashResponse {
                hash: log.hash(&req.get_ref().value),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn prune(
        &self,
        req: Request<pb::AuditPruneRequest>,
    ) -> Result<Response<pb::AuditPruneResponse>, Status> {
        let through = req.get_ref().through_size;
        let mut audit = self
            .state
            .audit_ctx(&req, "audit.prune", None)
            .detail("through_size", through.to_string());
        let res: Result<Response<pb::AuditPruneResponse>, Status> = async {
            let who = caller(&req)?;
            self.state
                .authorize(&who, Capability::AuditPrune, AUDIT_RESOURCE)?;
            let log = self.log()?;
            let r = self
                .state
                .run_blocking(move || {
                    let exported = log.exported_size().map_err(audit_err)?;
                    let target = if through == 0 { exported } else { through };
                    let size = log.head().size;
                    if target > size {
                        return Err(Status::invalid_argument(format!(
                            "through_size {target} is larger than the log ({size} events)"
                        )));
                    }
                    let p = log
                        .prune_before(target.saturating_add(1))
                        .map_err(audit_err)?;
                    Ok(pb::AuditPruneResponse {
                        pruned: p.pruned,
                        events_removed: p.events_removed,
                        first_seq: log.first_seq(),
                        exported_size: exported,
                        tree_size: log.head().size,
                    })
                })
                .await?;
            Ok(Response::new(r))
        }
        .await;
        if let Ok(r) = &res {
            audit = audit
                .detail("pruned", r.get_ref().pruned.to_string())
                .detail("events_removed", r.get_ref().events_removed.to_string());
        }
        self.state.audited(audit, res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files go out in order as chunks of at most CHUNK bytes; the last
    /// chunk of each says so; an empty file is one empty chunk.
    #[tokio::test]
    async fn files_stream_in_bounded_chunks() {
        let d = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(2 * CHUNK + 123)).map(|i| (i % 251) as u8).collect();
        std::fs::write(d.path().join("big"), &big).unwrap();
        std::fs::write(d.path().join("empty"), b"").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        for name in ["big", "empty"] {
            stream_file(name, &d.path().join(name), &tx).await.unwrap();
        }
        drop(tx);
        let mut got = Vec::new();
        while let Some(m) = rx.recv().await {
            let m = m.unwrap();
            got.push((m.file, m.data, m.last_of_file));
        }
        let sizes: Vec<(&str, usize, bool)> = got
            .iter()
            .map(|(f, d, l)| (f.as_str(), d.len(), *l))
            .collect();
        assert_eq!(
            sizes,
            [
                ("big", CHUNK, false),
                ("big", CHUNK, false),
                ("big", 123, true),
                ("empty", 0, true)
            ]
        );
        let joined: Vec<u8> = got[..3].iter().flat_map(|(_, d, _)| d.clone()).collect();
        assert_eq!(joined, big);
        // A file that is gone is an error that names it.
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let e = stream_file("gone", &d.path().join("gone"), &tx)
            .await
            .unwrap_err();
        assert!(e.message().contains("gone"), "{}", e.message());
    }
}
