//! The credential-injecting proxy: services call vendor APIs through
//! keyseal, which injects the vendor credential on the way out, so the
//! service never holds it.
//!
//! - [`model`]: targets, target credentials (egress-only), proxies, rules,
//!   and the pure rule evaluation with its explanation.
//! - [`store`]: sled persistence, the per-request snapshot cache.
//! - [`reqlog`]: the request log, in its own append-only files.
//! - [`request`]: the listeners' pure request handling (proxy key, gateway
//!   paths, hosts to targets, stripping and credential injection).
//! - [`server`]: the hyper listeners (gateway on loopback TCP and a Unix
//!   socket, forward proxy with CONNECT), as pingora-style phases.
//! - [`sockdiag`]: the uid owning a loopback TCP peer's socket (netlink
//!   `sock_diag`), so key-less loopback callers are known by the kernel.
//! - [`ssrf`]: egress allow-list and internal-address guards for tunnels.
//! - [`upstream`]: pooled TLS clients per target.
//! - [`telemetry`]: per-minute/hour/day buckets, anomaly flags and caller
//!   suspension.
//! - [`tls`]: the interception CA (key in the root device), leaf
//!   certificates per host, upstream client certificates (mTLS).
//! - [`config`]: the `[proxy]` config section.

pub mod config;
pub mod model;
pub mod reqlog;
pub mod request;
pub mod server;
pub mod sockdiag;
pub mod ssrf;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;

pub use config::{ProxyConfig, RawProxyConfig};
pub use model::ProxyError;
pub use store::ProxyStore;
