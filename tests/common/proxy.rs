//! Shared fixtures of the proxy tests: a test PKI (rcgen), an HTTPS echo
//! upstream (optionally requiring a client certificate), and helpers to run
//! the CLI, issue API keys and run `curl`.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use super::daemon::TestDaemon;

// ---------------------------------------------------------------------------
// Test PKI
// ---------------------------------------------------------------------------

/// A test CA; `leaf` mints certificates signed by it.
pub struct Pki {
    pub ca_pem: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(cn: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let ca = p.self_signed(&ca_key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            ca,
            ca_key,
        }
    }

    /// A leaf for `names` (CN = the first), a client certificate with
    /// `client`: (cert PEM, key PEM).
    pub fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        if client {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let c = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (c.pem(), key.serialize_pem())
    }
}

// ---------------------------------------------------------------------------
// The echo upstream
// ---------------------------------------------------------------------------

/// Answers every request with JSON of what it received (method, path,
/// query, headers, body_len), `content-type: application/json` and a
/// hop-by-hop header `x-upstream-hop` (named in `connection`). The status
/// is 200 except for `/v1/status/NNN`, which answers NNN (with a `location`
/// for 3xx); `/v1/slow` answers after 3 s.
async fn echo(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    if req.uri().path() == "/v1/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let status = req
        .uri()
        .path()
        .strip_prefix("/v1/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                serde_json::Value::String(v.to_str().unwrap_or("").to_owned()),
            )
        })
        .collect();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let v = serde_json::json!({
        "method": method, "path": path, "query": query, "headers": headers, "body_len": body,
    });
    let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(v.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    if (300..400).contains(&status) {
        r.headers_mut()
            .insert("location", "/v1/elsewhere".parse().unwrap());
    }
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut()
        .insert("x-upstream-hop", "1".parse().unwrap());
    r.headers_mut()
        .insert("connection", "x-upstream-hop".parse().unwrap());
    Ok(r)
}

pub struct Upstream {
    pub addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

/// An HTTPS echo server on `ip` with a leaf of `pki` for localhost and
/// 127.0.0.x; with `client_ca`, it requires a client certificate from it.
pub fn start_upstream(ip: &str, pki: &Pki, client_ca: Option<&Pki>) -> Upstream {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (cert, key) = pki.leaf(&["localhost", "127.0.0.1", "127.0.0.2"], false);
    let certs = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(c) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(c.ca_pem.as_bytes()).unwrap())
                .unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(certs, key).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(format!("{ip}:0")))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper::service::service_fn(echo),
                    )
                    .await;
            });
        }
    });
    Upstream { addr, _rt: rt }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `keyseal args` with `stdin`; asserts it succeeded.
pub fn ok(d: &TestDaemon, args: &[&str], stdin: &[u8]) -> Output {
    let out = d.run(args, stdin);
    assert!(
        out.status.success(),
        "keyseal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Issues an API key for `owner` (on rate plan `plan`); returns (id, key).
pub fn issue(d: &TestDaemon, owner: &str, plan: Option<&str>) -> (String, String) {
    let mut args = vec!["apikey", "issue", "--owner", owner, "--json"];
    if let Some(p) = plan {
        args.extend(["--plan", p]);
    }
    let out = ok(d, &args, b"");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let meta: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stderr).trim()).unwrap();
    (meta["id"].as_str().unwrap().to_owned(), key)
}

/// What `curl` got: HTTP status (0 if none), curl's exit code, response
/// headers, and the body followed by curl's stderr.
pub struct Http {
    pub status: u16,
    pub exit: i32,
    pub headers: String,
    pub body: String,
}

impl Http {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// `curl -sS --max-time 20 args`.
pub fn curl(args: &[&str]) -> Http {
    let dir = tempfile::tempdir().unwrap();
    let hdr = dir.path().join("h");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-D"])
        .arg(&hdr)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Http {
        status: code.trim().parse().unwrap_or(0),
        exit: out.status.code().unwrap_or(-1),
        headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
        body: format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    }
}
