//! Daemon configuration: a raw TOML layer (`deny_unknown_fields`, so a typo
//! is an error that names the key) resolved into a typed [`Config`] with
//! defaults, validated paths and the PIN read from its file or env var.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::hardening::LockMemory;
use crate::root::pkcs11::{read_pin_file, Pkcs11Config};
use crate::root::tpm::TpmConfig;

/// Default config path of `keyseald`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keyseal/keyseald.toml";
/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/keyseal/keyseal.sock";
/// Env var holding the PKCS#11 user PIN when `pin_env` is not set.
pub const DEFAULT_PIN_ENV: &str = "KEYSEAL_PKCS11_PIN";

/// A config error: says which key is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    root: RawRoot,
    store: RawStore,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    memory: RawMemory,
    #[serde(default)]
    apikeys: crate::apikeys::RawApiKeys,
    #[serde(default)]
    rate_plans: std::collections::BTreeMap<String, crate::apikeys::RawRatePlan>,
    #[serde(default)]
    proxy: crate::proxy::RawProxyConfig,
    #[serde(default)]
    audit: RawAudit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    origin: Option<String>,
    checkpoint_every_events: Option<u64>,
    checkpoint_interval_secs: Option<u64>,
    deadline_ms: Option<u64>,
    commit_linger_us: Option<u64>,
    /// For measurement only: turns the audit log off. Must be spelled out.
    unsafe_disable: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoot {
    backend: String,
    pkcs11: Option<RawPkcs11>,
    tpm: Option<RawTpm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPkcs11 {
    module: PathBuf,
    token_label: String,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTpm {
    tcti: String,
    auth_file: Option<PathBuf>,
    #[serde(default)]
    pcrs: Vec<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: PathBuf,
    max_value_bytes: Option<usize>,
    default_max_versions: Option<u32>,
    min_free_bytes: Option<u64>,
    audit_reserve_bytes: Option<u64>,
    cache_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<PathBuf>,
    mode: Option<String>,
    group: Option<String>,
    credentials_socket: Option<PathBuf>,
    request_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    capacity: Option<usize>,
    ttl_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    lock: Option<String>,
}

/// Which root of trust, with its resolved settings.
#[derive(Debug, Clone)]
pub enum RootConfig {
    Pkcs11(Pkcs11Config),
    Tpm(TpmConfig),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// The resolved daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: RootConfig,
    /// The environment variable the PKCS#11 PIN was read from (when not
    /// from `pin_file`): keyseald scrubs it from its environment at start.
    pub pin_env_var: Option<String>,
    pub store_path: PathBuf,
    pub max_value_bytes: usize,
    pub default_max_versions: u32,
    /// `store.min_free_bytes` / `store.audit_reserve_bytes`: the free-space
    /// reserve of the store's file system (see `docs/operations.md`).
    pub disk_limits: crate::store::DiskLimits,
    /// `store.cache_bytes`: the cap of sled's page cache.
    pub store_cache_bytes: u64,
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub credentials_socket: Option<PathBuf>,
    pub request_timeout: Duration,
    pub policy_path: Option<PathBuf>,
    pub cache_capacity: usize,
    pub cache_ttl: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub lock_memory: LockMemory,
    /// `[apikeys]` and `[rate_plans.NAME]` (see `docs/apikeys.md`).
    pub apikeys: crate::apikeys::ApiKeysConfig,
    /// `[proxy]` (see `docs/proxy.md`).
    pub proxy: crate::proxy::ProxyConfig,
    /// `[audit]` (see `docs/auditing.md`).
    pub audit: crate::audit::AuditConfig,
    /// `audit.unsafe_disable = true`: no audit log at all (benchmarks only).
    pub audit_unsafe_disable: bool,
}

impl Config {
    /// Reads and resolves the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let abs_path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let path = abs_path.as_path();
        let err = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(format!(
                "cannot read: {e}; pass --config PATH or create {DEFAULT_CONFIG_PATH}"
            ))
        })?;
        Self::parse(&text, path)
    }

    /// Resolves config text; `path` is for messages and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| err(toml_error_line(text, &e)))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let mut pin_env_var = None;
        let root = match raw.root.backend.as_str() {
            "pkcs11" => {
                let p = raw.root.pkcs11.ok_or_else(|| {
                    err("root.backend = \"pkcs11\" needs a [root.pkcs11] section with module, token_label and pin_file or pin_env".into())
                })?;
                let pin = match (&p.pin_file, &p.pin_env) {
                    (Some(_), Some(_)) => {
                        return Err(err("root.pkcs11: set pin_file or pin_env, not both".into()))
                    }
                    (Some(f), None) => read_pin_file(&abs(f))
                        .map_err(|e| err(format!("root.pkcs11.pin_file: {e}")))?,
                    (None, env) => {
                        let var = env.as_deref().unwrap_or(DEFAULT_PIN_ENV);
                        let v = std::env::var(var).map_err(|_| {
                            err(format!("root.pkcs11: no pin_file set and env var {var} is not set; set one of them"))
                        })?;
                        if v.is_empty() {
                            return Err(err(format!("root.pkcs11: env var {var} is empty")));
                        }
                        pin_env_var = Some(var.to_owned());
                        Zeroizing::new(v)
                    }
                };
                if p.token_label.is_empty() {
                    return Err(err("root.pkcs11.token_label is empty".into()));
                }
                RootConfig::Pkcs11(Pkcs11Config {
                    module: p.module,
                    token_label: p.token_label,
                    pin,
                })
            }
            "tpm" => {
                let t = raw.root.tpm.ok_or_else(|| {
                    err("root.backend = \"tpm\" needs a [root.tpm] section with tcti (e.g. \"device:/dev/tpmrm0\")".into())
                })?;
                if let Some(bad) = t.pcrs.iter().find(|p| **p > 23) {
                    return Err(err(format!(
                        "root.tpm.pcrs: PCR {bad} does not exist (0..=23)"
                    )));
                }
                let auth_value = match &t.auth_file {
                    Some(f) => Some(Zeroizing::new(
                        read_pin_file(&abs(f))
                            .map_err(|e| err(format!("root.tpm.auth_file: {e}")))?
                            .as_bytes()
                            .to_vec(),
                    )),
                    None => None,
                };
                RootConfig::Tpm(TpmConfig {
                    tcti: t.tcti,
                    auth_value,
                    pcrs: t.pcrs,
                })
            }
            other => {
                return Err(err(format!(
                    "root.backend = \"{other}\" is not a backend; use \"pkcs11\" or \"tpm\""
                )))
            }
        };

        let socket_mode = match &raw.api.mode {
            None => 0o660,
            Some(m) => {
                let v = u32::from_str_radix(m.trim_start_matches("0o"), 8).map_err(|_| {
                    err(format!(
                        "api.mode = \"{m}\" is not an octal mode like \"0660\""
                    ))
                })?;
                if v & 0o7 != 0 {
                    return Err(err(format!(
                        "api.mode = \"{m}\" gives access to every local user; use \"0660\" with api.group, or \"0600\""
                    )));
                }
                if v > 0o777 {
                    return Err(err(format!("api.mode = \"{m}\" is not a permission mode")));
                }
                v
            }
        };
        let log_format = match raw.log.format.as_deref() {
            None | Some("human") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(o) => {
                return Err(err(format!(
                    "log.format = \"{o}\": use \"human\" or \"json\""
                )))
            }
        };
        let lock_memory = match raw.memory.lock.as_deref() {
            None | Some("auto") => LockMemory::Auto,
            Some("required") => LockMemory::Required,
            Some("off") => LockMemory::Off,
            Some(o) => {
                return Err(err(format!(
                    "memory.lock = \"{o}\": use \"auto\", \"required\" or \"off\""
                )))
            }
        };
        let max_value_bytes = raw.store.max_value_bytes.unwrap_or(1024 * 1024);
        if max_value_bytes == 0 || max_value_bytes > 64 * 1024 * 1024 {
            return Err(err(
                "store.max_value_bytes must be between 1 and 67108864".into()
            ));
        }
        let default_max_versions = raw.store.default_max_versions.unwrap_or(10);
        if default_max_versions == 0 {
            return Err(err("store.default_max_versions must be at least 1".into()));
        }
        let disk_limits = crate::store::DiskLimits {
            min_free_bytes: raw
                .store
                .min_free_bytes
                .unwrap_or(crate::store::DiskLimits::DEFAULT_MIN_FREE),
            audit_reserve_bytes: raw
                .store
                .audit_reserve_bytes
                .unwrap_or(crate::store::DiskLimits::DEFAULT_AUDIT_RESERVE),
        };
        disk_limits.validate().map_err(err)?;
        let store_cache_bytes = raw
            .store
            .cache_bytes
            .unwrap_or(crate::store::DEFAULT_CACHE_BYTES);
        if !(1 << 20..=1 << 40).contains(&store_cache_bytes) {
            return Err(err(
                "store.cache_bytes must be between 1048576 (1 MiB) and 1099511627776 (1 TiB)"
                    .into(),
            ));
        }
        let timeout = raw.api.request_timeout_secs.unwrap_or(10);
        if timeout == 0 {
            return Err(err("api.request_timeout_secs must be at least 1".into()));
        }
        let apikeys =
            crate::apikeys::ApiKeysConfig::from_raw(raw.apikeys, raw.rate_plans).map_err(err)?;
        let proxy = crate::proxy::ProxyConfig::from_raw(raw.proxy, base).map_err(err)?;
        let mut audit = crate::audit::AuditConfig::default();
        if let Some(o) = raw.audit.origin {
            if o.is_empty() || o.contains('\n') || o.len() > 255 {
                return Err(err(
                    "audit.origin must be one line of 1 to 255 characters".into()
                ));
            }
            audit.origin = Some(o);
        }
        if let Some(n) = raw.audit.checkpoint_every_events {
            if n == 0 {
                return Err(err(
                    "audit.checkpoint_every_events must be at least 1".into()
                ));
            }
            audit.checkpoint_every_events = n;
        }
        if let Some(t) = raw.audit.checkpoint_interval_secs {
            if t == 0 {
                return Err(err(
                    "audit.checkpoint_interval_secs must be at least 1".into()
                ));
            }
            audit.checkpoint_interval = Duration::from_secs(t);
        }
        if let Some(l) = raw.audit.commit_linger_us {
            if l > 100_000 {
                return Err(err(
                    "audit.commit_linger_us must be between 0 and 100000".into()
                ));
            }
            audit.commit_linger = Duration::from_micros(l);
        }
        if let Some(d) = raw.audit.deadline_ms {
            if !(10..=60_000).contains(&d) {
                return Err(err("audit.deadline_ms must be between 10 and 60000".into()));
            }
            audit.deadline = Duration::from_millis(d);
        }
        let audit_unsafe_disable = raw.audit.unsafe_disable.unwrap_or(false);
        Ok(Config {
            pin_env_var,
            audit,
            audit_unsafe_disable,
            apikeys,
            proxy,
            root,
            store_path: abs(&raw.store.path),
            max_value_bytes,
            default_max_versions,
            disk_limits,
            store_cache_bytes,
            socket: raw
                .api
                .socket
                .map(|p| abs(&p))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            socket_mode,
            socket_group: raw.api.group,
            credentials_socket: raw.api.credentials_socket.map(|p| abs(&p)),
            request_timeout: Duration::from_secs(timeout),
            policy_path: raw.policy.path.map(|p| abs(&p)),
            cache_capacity: raw.cache.capacity.unwrap_or(10_000),
            cache_ttl: Duration::from_secs(raw.cache.ttl_secs.unwrap_or(300)),
            log_format,
            log_level: raw.log.level.unwrap_or_else(|| "info".into()),
            lock_memory,
        })
    }
}

/// A TOML error as one line: `line L, column C: message` (toml's Display
/// spans several lines with a source snippet).
pub fn toml_error_line(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

impl RootConfig {
    /// Opens the configured root of trust (blocking).
    pub fn open(
        &self,
    ) -> Result<std::sync::Arc<dyn crate::root::RootOfTrust>, crate::root::RootError> {
        Ok(match self {
            RootConfig::Pkcs11(c) => std::sync::Arc::new(crate::root::pkcs11::Pkcs11Root::open(c)?),
            RootConfig::Tpm(c) => std::sync::Arc::new(crate::root::tpm::TpmRoot::open(c)?),
        })
    }
}

impl Config {
    /// The secret store's settings from this config.
    pub fn secrets_config(&self) -> crate::secrets::SecretsConfig {
        crate::secrets::SecretsConfig {
            max_value_len: self.max_value_bytes,
            default_max_versions: self.default_max_versions,
            cache_capacity: self.cache_capacity,
            cache_ttl: self.cache_ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_store(extra: &str) -> Result<Config, ConfigError> {
        std::env::set_var("KEYSEAL_CONFIG_TEST_PIN", "1234");
        Config::parse(
            &format!(
                "[root]\nbackend = \"pkcs11\"\n[root.pkcs11]\nmodule = \"libsofthsm2.so\"\ntoken_label = \"keyseal\"\npin_env = \"KEYSEAL_CONFIG_TEST_PIN\"\n[store]\npath = \"store\"\n{extra}"
            ),
            Path::new("/etc/keyseal/keyseald.toml"),
        )
    }

    #[test]
    fn store_cache_bytes_defaults_and_bounds() {
        let c = with_store("").unwrap();
        assert_eq!(c.store_cache_bytes, crate::store::DEFAULT_CACHE_BYTES);
        let c = with_store("cache_bytes = 134217728\n").unwrap();
        assert_eq!(c.store_cache_bytes, 128 << 20);
        for bad in ["0", "1048575", "1099511627777"] {
            let e = with_store(&format!("cache_bytes = {bad}\n")).unwrap_err();
            assert!(
                e.to_string().contains("store.cache_bytes must be between"),
                "{bad}: {e}"
            );
        }
    }
}
