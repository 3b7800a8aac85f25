//! The daemon's plumbing: socket binding (stale vs live), identifying each
//! connection at accept, serving gRPC until a shutdown signal, SIGHUP policy
//! reload, sd_notify, and the systemd credentials socket.
//!
//! Servers take their listener and their shutdown signal (`serve`), so tests
//! bind a temp socket and drive shutdown themselves.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::Instrument;

use crate::api::apikeys_svc::ApiKeysService;
use crate::api::pb::api_keys_server::ApiKeysServer;
use crate::api::pb::{secrets_server::SecretsServer, system_server::SystemServer};
use crate::api::secrets_svc::SecretsService;
use crate::api::system_svc::SystemService;
use crate::api::{Caller, DaemonState};
use crate::identity::Identifier;
use crate::name::SecretName;
use crate::secrets::OpCtx;

/// Smallest gRPC message limit of the server; it grows with the configured
/// `store.max_value_bytes` (twice the value + 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// The client's limit: above the largest value the config accepts (64 MiB).
pub const CLIENT_MAX_MESSAGE_BYTES: usize = 66 * 1024 * 1024;

/// A connection whose caller the kernel identified at accept.
pub struct IdentifiedConn {
    stream: UnixStream,
    caller: Caller,
}

impl Connected for IdentifiedConn {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for IdentifiedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for IdentifiedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Binds a Unix socket at `path`: a stale socket file is replaced, a live
/// one (another daemon answering) is not, and a non-socket is never touched.
/// Sets `mode` and, when given, the group.
pub fn bind_socket(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> io::Result<std::os::unix::net::UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another daemon is listening on {}; stop it first",
                        path.display()
                    ),
                ))
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(g) = group {
        let gid = nix::unistd::Group::from_name(g)
            .map_err(|e| io::Error::other(format!("cannot look up group {g}: {e}")))?
            .ok_or_else(|| {
                io::Error::other(format!(
                    "group {g} does not exist; create it or fix api.group"
                ))
            })?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| io::Error::other(format!("chgrp {g}: {e}")))?;
    }
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Sends a state line to systemd when run under `Type=notify`.
pub fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(name) = bytes.strip_prefix(b"@") {
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// Accepts connections and identifies each caller off the runtime; yields
/// identified connections for tonic. Unidentifiable peers are dropped.
fn identified_incoming(
    listener: UnixListener,
    identifier: Arc<Identifier>,
) -> ReceiverStream<Result<IdentifiedConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let tx = tx.clone();
            let identifier = identifier.clone();
            tokio::spawn(async move {
                let std_stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => return tracing::warn!(error = %e, "connection lost at accept"),
                };
                let res = tokio::task::spawn_blocking(move || {
                    let id = identifier.identify(std_stream.as_fd());
                    (std_stream, id)
                })
                .await;
                let (std_stream, id) = match res {
                    Ok(r) => r,
                    Err(_) => return,
                };
                let identity = match id {
                    Ok(i) => Arc::new(i),
                    Err(e) => {
                        return tracing::warn!(error = %e, "refused a connection without peer credentials")
                    }
                };
                let stream = match UnixStream::from_std(std_stream) {
                    Ok(s) => s,
                    Err(e) => return tracing::warn!(error = %e, "connection lost at accept"),
                };
                let conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(conn = conn_id, caller = %identity.display_short(), "connection accepted");
                let _ = tx
                    .send(Ok(IdentifiedConn {
                        stream,
                        caller: Caller { conn_id, identity },
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Serves the gRPC API on `listener` until `shutdown` resolves, then lets
/// in-flight requests finish and flushes the store.
pub async fn serve(
    state: Arc<DaemonState>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let identifier = Arc::new(Identifier::new());
    let incoming = identified_incoming(listener, identifier);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SecretsServer<SecretsService>>()
        .await;
    health_reporter
        .set_serving::<SystemServer<SystemService>>()
        .await;
    health_reporter
        .set_serving::<crate::api::pb::keys_server::KeysServer<crate::api::keys_svc::KeysService>>()
        .await;
    health_reporter
        .set_serving::<ApiKeysServer<ApiKeysService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| {
            tracing::error!(error = %e, "reflection service failed to build");
            e
        });
    // Twice the largest value, so an oversized value still decodes and gets
    // the store's typed "value too large" error rather than a transport error.
    let max_message = MAX_MESSAGE_BYTES.max(2 * state.secrets.config().max_value_len + 1024 * 1024);
    let secrets = SecretsServer::new(SecretsService {
        state: state.clone(),
    })
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let system = SystemServer::new(SystemService {
        state: state.clone(),
    });
    let keys = crate::api::pb::keys_server::KeysServer::new(crate::api::keys_svc::KeysService {
        state: state.clone(),
    });
    let audit =
        crate::api::pb::audit_server::AuditServer::new(crate::api::audit_svc::AuditService {
            state: state.clone(),
        });
    // A debug span: at the default level it costs nothing per request (an
    // enabled span has its fields formatted on every request, ~5% of a
    // Get's CPU); lines logged at info name their caller themselves.
    let mut builder = tonic::transport::Server::builder().trace_fn(|req| {
        let caller = req.extensions().get::<Caller>();
        tracing::debug_span!(
            "rpc",
            conn = caller.map(|c| c.conn_id).unwrap_or(0),
            uid = caller.map(|c| c.identity.uid),
            pid = caller.and_then(|c| c.identity.pid),
            unit = caller.and_then(|c| c.identity.unit.clone()),
            path = %req.uri().path(),
        )
    });
    let router = builder
        .add_service(health_service)
        .add_service(secrets)
        .add_service(keys)
        .add_service(audit)
        .add_service(system);
    let router = router.add_service(ApiKeysServer::new(ApiKeysService {
        state: state.clone(),
    }));
    let router = router.add_service(crate::api::pb::proxy_server::ProxyServer::new(
        crate::api::proxy_svc::ProxyService {
            state: state.clone(),
        },
    ));
    let router = match reflection {
        Ok(r) => router.add_service(r),
        Err(_) => router,
    };
    let res = router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(e) = state.secrets.store().flush() {
        tracing::error!(error = %e, "final flush failed");
    }
    res
}

/// Serves systemd's credential protocol (`LoadCredential=ID:SOCKET`): the
/// service manager connects from the abstract address
/// `\0<random>/unit/<unit>/<ID>`; the (unit, ID) pair is mapped through the
/// policy's `[[credential]]` entries to a secret whose value is written
/// back. Only peers with a uid in `allowed_uids` (default: root, i.e. PID 1)
/// are answered, since any process can bind an abstract address.
pub async fn serve_credentials(
    state: Arc<DaemonState>,
    listener: UnixListener,
    allowed_uids: Vec<u32>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "credentials accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        let allowed = allowed_uids.clone();
        tokio::spawn(
            async move {
                if let Err(msg) = answer_credential(&state, stream, &allowed).await {
                    tracing::warn!(reason = %msg, "credential request refused");
                }
            }
            .instrument(tracing::info_span!("credential")),
        );
    }
}

async fn answer_credential(
    state: &DaemonState,
    mut stream: UnixStream,
    allowed: &[u32],
) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("no peer credentials: {e}"))?;
    if !allowed.contains(&cred.uid()) {
        return Err(format!(
            "peer uid {} is not allowed to load credentials",
            cred.uid()
        ));
    }
    let peer: nix::sys::socket::UnixAddr =
        nix::sys::socket::getpeername(std::os::fd::AsRawFd::as_raw_fd(&stream))
            .map_err(|e| format!("getpeername: {e}"))?;
    let abs = peer
        .as_abstract()
        .ok_or("peer is not bound to an abstract address")?;
    let text = std::str::from_utf8(abs).map_err(|_| "peer address is not UTF-8")?;
    let mut parts = text.splitn(4, '/');
    let (_random, kw, unit, id) = (parts.next(), parts.next(), parts.next(), parts.next());
    let (Some("unit"), Some(unit), Some(id)) = (kw, unit, id) else {
        return Err("peer address is not <random>/unit/<unit>/<id>".into());
    };
    let name = state
        .policy
        .current()
        .credential(unit, id)
        .map(str::to_owned)
        .ok_or_else(|| format!("no [[credential]] maps unit {unit} id {id}"))?;
    let name =
        SecretName::parse(&name).map_err(|e| format!("credential maps to an invalid name: {e}"))?;
    let ctx = OpCtx::new(format!("unit:{unit} credential:{id}"));
    let n = name.clone();
    let v = state
        .blocking(move |s| s.get(&ctx, &n, None))
        .await
        .map_err(|e| e.message().to_owned())?;
    stream
        .write_all(&v.value)
        .await
        .map_err(|e| format!("write: {e}"))?;
    stream.shutdown().await.map_err(|e| format!("close: {e}"))?;
    tracing::info!(unit, id, name = %name, version = v.version, "credential delivered");
    Ok(())
}

/// The API listener: the first socket passed by systemd socket activation
/// (`LISTEN_PID`/`LISTEN_FDS`, fd 3) when present, else a fresh bind.
pub fn listener_from_env_or_bind(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> io::Result<UnixListener> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if ours && n >= 1 {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        let fd = crate::sys::take_inherited_fd(3)?;
        let l = std::os::unix::net::UnixListener::from(fd);
        l.set_nonblocking(true)?;
        tracing::info!("using the socket passed by systemd (socket activation)");
        return UnixListener::from_std(l);
    }
    UnixListener::from_std(bind_socket(path, mode, group)?)
}
