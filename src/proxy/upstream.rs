//! Upstream HTTP clients: one pooled keep-alive client (hyper-util legacy
//! `Client` over rustls) per target, built from the target's trust roots
//! and timeouts and rebuilt when the target changes. A target with a
//! client certificate presents it (mTLS); its key is unsealed only to build
//! the client.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use rustls::RootCertStore;

use super::model::Target;
use super::store::ProxyStore;

/// The body type sent upstream.
pub type UpBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
/// A pooled client.
pub type UpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpBody>;

/// Trust roots from the PEM bundle at `path`.
pub fn load_roots(path: &str) -> Result<RootCertStore, String> {
    use rustls_pki_types::pem::PemObject;
    let pem = read_bundle(path)?;
    let mut roots = RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("{path}: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("{path}: bad certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{path} holds no PEM certificate"));
    }
    Ok(roots)
}

/// Largest CA bundle read (Debian's whole system bundle is ~220 KB).
pub const MAX_CA_BUNDLE_BYTES: u64 = 4 * 1024 * 1024;

/// Reads a CA bundle: a regular file of at most [`MAX_CA_BUNDLE_BYTES`]
/// (see [`crate::smallfile`]).
fn read_bundle(path: &str) -> Result<Vec<u8>, String> {
    use crate::smallfile::{open_regular, read_bounded, SmallFileError};
    let small_err = |e| match e {
        SmallFileError::Io(e) => format!("cannot read {path}: {e}"),
        SmallFileError::NotAFile => format!("{path} is not a regular file"),
        SmallFileError::TooLarge => {
            format!("{path} is larger than {MAX_CA_BUNDLE_BYTES} bytes; not a CA bundle")
        }
    };
    let (file, _) = open_regular(std::path::Path::new(path)).map_err(small_err)?;
    read_bounded(file, MAX_CA_BUNDLE_BYTES).map_err(small_err)
}

fn build(t: &Target, store: &ProxyStore) -> Result<UpClient, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &t.ca_bundle {
        Some(ca) => builder.with_root_certificates(load_roots(ca)?),
        None => {
            use hyper_rustls::ConfigBuilderExt;
            builder
                .with_native_roots()
                .map_err(|e| format!("system trust roots: {e}"))?
        }
    };
    let tls = match &t.client_cert {
        None => builder.with_no_client_auth(),
        Some(cert) => {
            let key = store
                .client_key(&t.name)
                .map_err(|e| format!("client key: {e}"))?;
            let (certs, key) =
                super::tls::client_auth(cert, &key).map_err(|e| format!("client key: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_millis(t.connect_timeout_ms)));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_millis(t.idle_timeout_ms))
        .pool_max_idle_per_host(64)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(https))
}

/// Clients by target, rebuilt when the target record changes.
pub struct Clients {
    map: Mutex<HashMap<String, (Target, UpClient)>>,
    store: Arc<ProxyStore>,
}

impl Clients {
    /// Clients reading client keys from `store`.
    pub fn new(store: Arc<ProxyStore>) -> Clients {
        Clients {
            map: Mutex::new(HashMap::new()),
            store,
        }
    }

    /// The client for `t` if one is built for this very record.
    pub fn cached(&self, t: &Target) -> Option<UpClient> {
        let m = self.map.lock();
        m.get(&t.name)
            .and_then(|(old, c)| (old == t).then(|| c.clone()))
    }

    /// The client for `t` (built on first use or after `t` changed).
    /// Blocking when it builds a client with a sealed client key.
    pub fn get(&self, t: &Target) -> Result<UpClient, String> {
        if let Some(c) = self.cached(t) {
            return Ok(c);
        }
        let c = build(t, &self.store)?;
        self.map
            .lock()
            .insert(t.name.clone(), (t.clone(), c.clone()));
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_bundle_must_be_a_small_regular_file() {
        let e = load_roots("/dev/zero").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = load_roots("/").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = load_roots(fifo.to_str().unwrap()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.path().join("big.pem");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_CA_BUNDLE_BYTES + 1).unwrap();
        let e = load_roots(big.to_str().unwrap()).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"no pem here").unwrap();
        let e = load_roots(empty.to_str().unwrap()).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
    }
}
