//! TLS interception of CONNECT tunnels to the `[proxy] intercept_hosts`:
//! after the usual CONNECT checks (caller authenticated, host on
//! `egress_allow`, every resolved address through the SSRF guard) the
//! proxy answers 200, terminates TLS with a leaf for the host minted by the
//! CA in the root device ([`crate::proxy::tls`]), and treats each inner
//! request (HTTP/1.1, or HTTP/2 when the client picks it by ALPN) like a
//! forward-proxy request for that host: target by
//! host, the caller's proxy, rules, rate plans, stripping, credential
//! injection, the request log, and the upstream over TLS with the target's
//! TLS settings. Each inner request verifies the key of the CONNECT again
//! (never cached), so a revocation applies to the next inner request.

use super::*;

/// HTTP/2 inside a tunnel: streams at once per connection ...
const H2_MAX_STREAMS: u32 = 100;
/// ... bytes of (decoded) request headers per stream ...
const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// ... and a ping this often, so a dead peer's connection is dropped.
const H2_PING_EVERY: Duration = Duration::from_secs(30);

/// What the inner requests of one tunnel share.
struct Tunnel {
    peer: Peer,
    /// The CONNECT's `Proxy-Authorization` (the only header kept; marked
    /// sensitive; dropped with the tunnel).
    auth: HeaderMap,
    /// The normalised host of the CONNECT.
    host: String,
}

impl Gateway {
    /// Answers the CONNECT (already authenticated and egress-checked) with
    /// 200 and serves the intercepted tunnel.
    pub(super) async fn intercept(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
        host: String,
        ctx: Ctx,
    ) -> Response<RespBody> {
        // The leaf first: if the CA cannot sign, the client hears why
        // instead of getting a tunnel that breaks in the handshake.
        let gw = self.clone();
        let h = host.clone();
        let leaf = tokio::task::spawn_blocking(move || gw.store.ca.leaf(&h)).await;
        let leaf = match leaf {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::error!(host = %host, error = %e, "proxy CA cannot mint a certificate");
                self.log(&ctx, 503, "error", None, (0, 0));
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the proxy cannot make a certificate for this host now",
                );
            }
            Err(_) => {
                self.log(&ctx, 500, "error", None, (0, 0));
                return error(StatusCode::INTERNAL_SERVER_ERROR, "worker failed");
            }
        };
        let mut auth = HeaderMap::new();
        if let Some(v) = req.headers().get(http::header::PROXY_AUTHORIZATION) {
            let mut v = v.clone();
            v.set_sensitive(true);
            auth.insert(http::header::PROXY_AUTHORIZATION, v);
        }
        self.log(&ctx, 200, "allow", Some("intercept".into()), (0, 0));
        let tunnel = Arc::new(Tunnel { peer, auth, host });
        let gw = self.clone();
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(leaf.config.clone());
            let tls = match tokio::time::timeout(
                gw.cfg.header_timeout,
                acceptor.accept(TokioIo::new(upgraded)),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    return tracing::info!(host = %tunnel.host, error = %e,
                        "intercepted tunnel: client TLS handshake failed (does it trust the keyseal proxy CA?)")
                }
                Err(_) => {
                    return tracing::info!(host = %tunnel.host, "intercepted tunnel: TLS handshake timed out")
                }
            };
            let header_timeout = gw.cfg.header_timeout;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let svc = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                let tunnel = tunnel.clone();
                async move { Ok::<_, Infallible>(gw.inner(req, &tunnel).await) }
            });
            // The client chose the protocol in the handshake (ALPN: h2 or
            // http/1.1; the leaf offers both). Either way each inner
            // request goes upstream as HTTP/1.1 on the target's pool.
            let res = if h2 {
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(H2_MAX_STREAMS)
                    .max_header_list_size(H2_MAX_HEADER_LIST)
                    .keep_alive_interval(Some(H2_PING_EVERY))
                    .keep_alive_timeout(header_timeout)
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
            } else {
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, "intercepted tunnel ended with an error");
            }
        });
        Response::new(full(Bytes::new()))
    }

    /// One request inside an intercepted tunnel.
    async fn inner(&self, req: Request<Incoming>, t: &Tunnel) -> Response<RespBody> {
        let mut ctx = Ctx::new(&req, &t.peer, Mode::Forward);
        let res = async {
            if req.method() == Method::CONNECT {
                return Err(Refusal::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "CONNECT inside an intercepted tunnel",
                    "error",
                ));
            }
            // The request must be for the host the tunnel (and its
            // certificate) is for.
            let named = super::super::request::tunnel_host(req.uri(), req.headers());
            if named.as_deref() != Some(t.host.as_str()) {
                return Err(Refusal::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "the request's host is not the tunnel's host",
                    "deny",
                ));
            }
            let who = self.authenticate(&t.auth, &t.peer, Mode::Forward).await?;
            ctx.set_who(&who);
            self.forward_to(req, who, &t.host, &mut ctx).await
        }
        .await;
        match res {
            Ok(r) => r,
            Err(refusal) => self.refuse(&mut ctx, refusal).await,
        }
    }
}
