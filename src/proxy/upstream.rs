//! Upstream HTTP clients: one pooled keep-alive client (hyper-util legacy
//! `Client` over rustls) per target, built from the target's trust roots
//! and timeouts and rebuilt when the target changes.

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

/// The body type sent upstream.
pub type UpBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
/// A pooled client.
pub type UpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpBody>;

/// Trust roots from the PEM bundle at `path`.
pub fn load_roots(path: &str) -> Result<RootCertStore, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    for c in certs {
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

fn build(t: &Target) -> Result<UpClient, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let tls = match &t.ca_bundle {
        Some(ca) => builder
            .with_root_certificates(load_roots(ca)?)
            .with_no_client_auth(),
        None => {
            use hyper_rustls::ConfigBuilderExt;
            builder
                .with_native_roots()
                .map_err(|e| format!("system trust roots: {e}"))?
                .with_no_client_auth()
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
#[derive(Default)]
pub struct Clients {
    map: Mutex<HashMap<String, (Target, UpClient)>>,
}

impl Clients {
    /// The client for `t` (built on first use or after `t` changed).
    pub fn get(&self, t: &Target) -> Result<UpClient, String> {
        let mut m = self.map.lock();
        if let Some((old, c)) = m.get(&t.name) {
            if old == t {
                return Ok(c.clone());
            }
        }
        let c = build(t)?;
        m.insert(t.name.clone(), (t.clone(), c.clone()));
        Ok(c)
    }
}
