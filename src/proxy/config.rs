//! `[proxy]` of the daemon config: listeners, egress allow-list, limits.
//!
//! ```toml
//! [proxy]
//! gateway_listen = "127.0.0.1:8480"     # loopback only; callers present a proxy key
//! gateway_socket = "/run/keyseal/proxy.sock"   # callers known by the kernel
//! gateway_socket_mode = "0660"
//! forward_listen = "127.0.0.1:8481"     # HTTP_PROXY / HTTPS_PROXY (CONNECT)
//! egress_allow = ["api.vendor.example", "*.vendor.example:443"]
//! egress_allow_addresses = []           # internal CIDRs allowed despite the SSRF guard
//! max_request_bytes = 10485760
//! max_response_bytes = 104857600
//! header_timeout_secs = 10              # client must send its headers within this
//! request_log_retention = "30d"         # proxy_log entries older than this are pruned ("off": never)
//! intercept_hosts = ["api.vendor.example"]   # CONNECT to these is TLS-terminated (default: none)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ssrf::Egress;

/// `[proxy]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyConfig {
    gateway_listen: Option<String>,
    gateway_socket: Option<PathBuf>,
    gateway_socket_mode: Option<String>,
    forward_listen: Option<String>,
    #[serde(default)]
    egress_allow: Vec<String>,
    #[serde(default)]
    egress_allow_addresses: Vec<String>,
    max_request_bytes: Option<u64>,
    max_response_bytes: Option<u64>,
    header_timeout_secs: Option<u64>,
    anomaly: Option<super::telemetry::RawAnomalyConfig>,
    request_log_retention: Option<String>,
    #[serde(default)]
    intercept_hosts: Vec<String>,
}

/// The resolved `[proxy]` section.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub gateway_listen: Option<SocketAddr>,
    pub gateway_socket: Option<PathBuf>,
    pub gateway_socket_mode: u32,
    pub forward_listen: Option<SocketAddr>,
    pub egress: Egress,
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    pub header_timeout: Duration,
    /// `[proxy.anomaly]`: telemetry and anomaly thresholds.
    pub anomaly: super::telemetry::AnomalyConfig,
    /// How long request-log entries are kept; `None`: forever.
    pub request_log_retention: Option<Duration>,
    /// Hosts whose CONNECT tunnels are TLS-terminated by the proxy (same
    /// patterns as `egress_allow`); empty: interception off.
    pub intercept: Egress,
}

/// Default `request_log_retention`: 30 days.
pub const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(30 * 86_400);

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            gateway_listen: None,
            gateway_socket: None,
            gateway_socket_mode: 0o660,
            forward_listen: None,
            egress: Egress::default(),
            max_request_bytes: 10 * 1024 * 1024,
            max_response_bytes: 100 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            anomaly: super::telemetry::AnomalyConfig::default(),
            request_log_retention: Some(DEFAULT_LOG_RETENTION),
            intercept: Egress::default(),
        }
    }
}

fn loopback(key: &str, v: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = v
        .parse()
        .map_err(|_| format!("proxy.{key} = {v:?} is not an address like \"127.0.0.1:8480\""))?;
    if !a.ip().is_loopback() {
        return Err(format!(
            "proxy.{key} = {v:?}: listen on a loopback address (127.0.0.1 or [::1]) only"
        ));
    }
    Ok(a)
}

impl ProxyConfig {
    /// Resolves the raw section; relative paths are against `base`.
    pub fn from_raw(raw: RawProxyConfig, base: &Path) -> Result<ProxyConfig, String> {
        let mut c = ProxyConfig::default();
        if let Some(v) = raw.gateway_listen {
            c.gateway_listen = Some(loopback("gateway_listen", &v)?);
        }
        if let Some(v) = raw.forward_listen {
            c.forward_listen = Some(loopback("forward_listen", &v)?);
        }
        c.gateway_socket = raw
            .gateway_socket
            .map(|p| if p.is_absolute() { p } else { base.join(p) });
        if let Some(m) = raw.gateway_socket_mode {
            let v = u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|v| *v <= 0o777)
                .ok_or_else(|| format!("proxy.gateway_socket_mode = {m:?} is not an octal mode"))?;
            c.gateway_socket_mode = v;
        }
        for h in &raw.egress_allow {
            if h.is_empty() || h.contains(['/', '@', ' ']) {
                return Err(format!(
                    "proxy.egress_allow: {h:?} is not a host pattern (api.example.com, *.example.com, host:port, *)"
                ));
            }
        }
        c.egress.allow = raw.egress_allow;
        for a in &raw.egress_allow_addresses {
            c.egress.allow_addresses.push(
                a.parse()
                    .map_err(|e| format!("proxy.egress_allow_addresses: {e}"))?,
            );
        }
        if let Some(n) = raw.max_request_bytes {
            if n == 0 {
                return Err("proxy.max_request_bytes must be at least 1".into());
            }
            c.max_request_bytes = n;
        }
        if let Some(n) = raw.max_response_bytes {
            if n == 0 {
                return Err("proxy.max_response_bytes must be at least 1".into());
            }
            c.max_response_bytes = n;
        }
        if let Some(n) = raw.header_timeout_secs {
            if n == 0 || n > 3600 {
                return Err("proxy.header_timeout_secs must be 1..=3600".into());
            }
            c.header_timeout = Duration::from_secs(n);
        }
        if let Some(a) = raw.anomaly {
            c.anomaly = super::telemetry::AnomalyConfig::from_raw(a)?;
        }
        if let Some(v) = raw.request_log_retention {
            c.request_log_retention = if v == "off" {
                None
            } else {
                let d = crate::apikeys::parse_duration(&v)
                    .map_err(|e| format!("proxy.request_log_retention: {e}, or \"off\""))?;
                if d.is_zero() {
                    return Err(
                        "proxy.request_log_retention must be at least 1s (or \"off\")".into(),
                    );
                }
                Some(d)
            };
        }
        for h in &raw.intercept_hosts {
            if h.is_empty() || h == "*" || h.contains(['/', '@', ' ']) {
                return Err(format!(
                    "proxy.intercept_hosts: {h:?} is not a host pattern (api.example.com, *.example.com, host:port)"
                ));
            }
        }
        c.intercept.allow = raw.intercept_hosts;
        Ok(c)
    }

    /// How often the request log is pruned: a tenth of the retention,
    /// between 1 s and 10 min (so entries outlive it by at most that).
    pub fn log_prune_interval(&self) -> Option<Duration> {
        self.request_log_retention
            .map(|r| (r / 10).clamp(Duration::from_secs(1), Duration::from_secs(600)))
    }

    /// Whether a CONNECT to (normalised) `host`:`port` is intercepted.
    pub fn intercepts(&self, host: &str, port: u16) -> bool {
        !self.intercept.allow.is_empty() && self.intercept.host_allowed(host, port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<ProxyConfig, String> {
        let raw: RawProxyConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        ProxyConfig::from_raw(raw, Path::new("/"))
    }

    #[test]
    fn request_log_retention() {
        let c = parse("").unwrap();
        assert_eq!(c.request_log_retention, Some(DEFAULT_LOG_RETENTION));
        assert_eq!(c.log_prune_interval(), Some(Duration::from_secs(600)));
        let c = parse("request_log_retention = \"7d\"").unwrap();
        assert_eq!(
            c.request_log_retention,
            Some(Duration::from_secs(7 * 86_400))
        );
        let c = parse("request_log_retention = \"2s\"").unwrap();
        assert_eq!(c.log_prune_interval(), Some(Duration::from_secs(1)));
        let c = parse("request_log_retention = \"off\"").unwrap();
        assert_eq!(c.request_log_retention, None);
        assert_eq!(c.log_prune_interval(), None);
        for bad in ["\"0s\"", "\"30 days\"", "\"\"", "30"] {
            assert!(
                parse(&format!("request_log_retention = {bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn intercept_hosts() {
        let c = parse("").unwrap();
        assert!(!c.intercepts("api.vendor.example", 443));
        let c =
            parse(r#"intercept_hosts = ["api.vendor.example", "*.other.example:8443"]"#).unwrap();
        assert!(c.intercepts("api.vendor.example", 443));
        assert!(c.intercepts("api.vendor.example", 8443));
        assert!(c.intercepts("x.other.example", 8443));
        assert!(!c.intercepts("x.other.example", 443));
        assert!(!c.intercepts("other.example", 8443));
        assert!(!c.intercepts("evil.example", 443));
        assert!(parse(r#"intercept_hosts = ["*"]"#).is_err());
        assert!(parse(r#"intercept_hosts = ["a/b"]"#).is_err());
    }
}
