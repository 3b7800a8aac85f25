//! Persistence of the proxy model and the request log, with the in-memory
//! caches the gateway reads on every request.
//!
//! Trees: `proxy_targets` (name -> [`Target`]), `proxy_creds` (id ->
//! [`Credential`]), `proxy_proxies` (name -> [`Proxy`]),
//! and `proxy_rules` (proxy || 0x00 || rule id -> [`Rule`]). The request
//! log is in its own files under `<store>/proxy-log/` ([`RequestLog`]); an
//! older store's `proxy_log` tree is moved there at open. Each change is
//! one sled transaction over the trees it reads and writes, flushed before
//! returning. A credential's value is sealed under the root with
//! [`SecretStore::seal_value`] (kind [`CRED_KIND`], name = id) before its
//! record is written, so root rotation rewraps it; it is never returned.
//!
//! The gateway reads a [`Snapshot`] per request (compiled rules), cached
//! until the next change; credential values are cached unsealed (zeroized
//! on drop) and dropped from the cache by the change that replaces or
//! deletes them, so a deleted credential is refused on the next request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use zeroize::Zeroizing;

use super::model::*;
use crate::secrets::SecretStore;
use crate::store::{decode, encode};

/// Kind of sealed credential values (name = credential id).
pub const CRED_KIND: &str = "proxy-cred";

const T_TARGETS: &str = "proxy_targets";
const T_CREDS: &str = "proxy_creds";
const T_PROXIES: &str = "proxy_proxies";
const T_RULES: &str = "proxy_rules";
/// The name CONNECT tunnels are logged and aggregated under (not a proxy:
/// no proxy may be called this).
pub const CONNECT_LOG_NAME: &str = "connect";

/// Where the request log was kept before it moved to its own files.
const T_LOG_OLD: &str = "proxy_log";

/// One proxied request. Never holds a key or a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Unix time, microseconds.
    pub time_us: u64,
    pub proxy: String,
    /// `key:<id>` or the kernel identity (`uid=...`), or `-`.
    pub caller: String,
    pub method: String,
    /// Path without the query (the query can carry secrets).
    pub path: String,
    pub status: u16,
    pub latency_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// `allow`, `deny`, `rate_limited`, `unauthenticated`, `error`.
    pub decision: String,
    pub rule: Option<String>,
}

/// A proxy ready for the gateway: records and compiled, sorted rules.
#[derive(Debug)]
pub struct Snapshot {
    pub proxy: Proxy,
    pub target: Target,
    pub base: BaseUrl,
    pub credential: Option<Credential>,
    pub rules: Vec<CompiledRule>,
}

type TxResult<T> = Result<T, ConflictableTransactionError<ProxyError>>;

fn abort<T>(e: ProxyError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_get<T: serde::de::DeserializeOwned>(
    t: &TransactionalTree,
    tree: &'static str,
    key: &[u8],
) -> TxResult<Option<T>> {
    match t.get(key)? {
        None => Ok(None),
        Some(b) => match decode(tree, &b) {
            Ok(v) => Ok(Some(v)),
            Err(e) => abort(e.into()),
        },
    }
}

fn tx_put<T: Serialize>(t: &TransactionalTree, key: &[u8], v: &T) -> TxResult<()> {
    match encode(v) {
        Ok(b) => {
            t.insert(key, b)?;
            Ok(())
        }
        Err(e) => abort(e.into()),
    }
}

fn from_tx(e: TransactionError<ProxyError>) -> ProxyError {
    match e {
        TransactionError::Abort(a) => a,
        TransactionError::Storage(s) => s.into(),
    }
}

fn rule_key(proxy: &str, id: &str) -> Vec<u8> {
    let mut k = proxy.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// A target record as written before `client_cert` existed.
#[derive(Deserialize)]
struct TargetV1 {
    name: String,
    base_url: String,
    ca_bundle: Option<String>,
    connect_timeout_ms: u64,
    response_timeout_ms: u64,
    idle_timeout_ms: u64,
    created_at: u64,
    updated_at: u64,
}

/// Decodes a target record, also one written before `client_cert`
/// (postcard has no defaults for missing trailing fields).
fn decode_target(b: &[u8]) -> Result<Target, crate::store::StoreError> {
    match decode::<Target>(T_TARGETS, b) {
        Ok(t) => Ok(t),
        Err(e) => match decode::<TargetV1>(T_TARGETS, b) {
            Ok(o) => Ok(Target {
                name: o.name,
                base_url: o.base_url,
                ca_bundle: o.ca_bundle,
                connect_timeout_ms: o.connect_timeout_ms,
                response_timeout_ms: o.response_timeout_ms,
                idle_timeout_ms: o.idle_timeout_ms,
                created_at: o.created_at,
                updated_at: o.updated_at,
                client_cert: None,
            }),
            Err(_) => Err(e),
        },
    }
}

/// Key of a sealed value in the `sealed` tree (as `SecretStore::seal_value` writes it).
fn sealed_id(kind: &str, name: &str) -> Vec<u8> {
    let mut k = kind.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

fn prefix(proxy: &str) -> Vec<u8> {
    let mut k = proxy.as_bytes().to_vec();
    k.push(0);
    k
}

/// The proxy configuration store.
pub struct ProxyStore {
    secrets: Arc<SecretStore>,
    targets: sled::Tree,
    creds: sled::Tree,
    proxies: sled::Tree,
    rules: sled::Tree,
    log: super::reqlog::RequestLog,
    write: Mutex<()>,
    /// Bumped by every change; snapshots carry the generation they saw.
    generation: AtomicU64,
    snapshots: RwLock<HashMap<String, (u64, Arc<Snapshot>)>>,
    values: RwLock<HashMap<String, Arc<Zeroizing<Vec<u8>>>>>,
    telemetry: Arc<super::telemetry::Telemetry>,
    /// The interception CA and its leaf cache (`proxy_ca` tree).
    pub ca: super::tls::ProxyCa,
}

impl std::fmt::Debug for ProxyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyStore").finish_non_exhaustive()
    }
}

impl ProxyStore {
    /// Opens the proxy trees of `secrets`' store.
    pub fn open(secrets: Arc<SecretStore>) -> Result<ProxyStore, ProxyError> {
        let db = secrets.store().db.clone();
        let ca = super::tls::ProxyCa::open(secrets.envelope().root().clone(), secrets.store())?;
        let telemetry = Arc::new(super::telemetry::Telemetry::open_guarded(
            &db,
            secrets.store().disk.clone(),
        )?);
        let dir = secrets.store().dir.clone().ok_or_else(|| {
            ProxyError::FailedPrecondition(
                "the proxy needs a store opened from a directory (for its request log)".into(),
            )
        })?;
        let log =
            super::reqlog::RequestLog::open(dir.join("proxy-log"), secrets.store().disk.clone())?;
        migrate_old_log(&db, &log)?;
        Ok(ProxyStore {
            ca,
            targets: db.open_tree(T_TARGETS)?,
            creds: db.open_tree(T_CREDS)?,
            proxies: db.open_tree(T_PROXIES)?,
            rules: db.open_tree(T_RULES)?,
            log,
            secrets,
            write: Mutex::new(()),
            generation: AtomicU64::new(1),
            snapshots: RwLock::new(HashMap::new()),
            values: RwLock::new(HashMap::new()),
            telemetry,
        })
    }

    fn changed(&self) -> Result<(), ProxyError> {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.snapshots.write().clear();
        self.secrets.store().flush()?;
        Ok(())
    }

    // ---- targets ----------------------------------------------------------

    /// Creates or replaces a target (`created_at` is kept on replace).
    pub fn put_target(&self, t: Target, now: u64) -> Result<Target, ProxyError> {
        self.put_target_tls(t, None, now)
    }

    /// Creates or replaces a target with its upstream client key (PEM) when
    /// `t.client_cert` is set: the pair is checked (parses, key matches the
    /// certificate), the key sealed under the root before the record is
    /// written. A target put without a client certificate drops a sealed
    /// key it had, in the record's transaction.
    pub fn put_target_tls(
        &self,
        mut t: Target,
        client_key: Option<&[u8]>,
        now: u64,
    ) -> Result<Target, ProxyError> {
        check_name("target", &t.name)?;
        let base = BaseUrl::parse(&t.base_url, true)?;
        t.base_url = base.to_text();
        for (what, v) in [
            ("connect timeout", t.connect_timeout_ms),
            ("response timeout", t.response_timeout_ms),
            ("idle timeout", t.idle_timeout_ms),
        ] {
            if v == 0 || v > 3_600_000 {
                return Err(invalid(format!("{what} must be 1 ms..=1 h")));
            }
        }
        if let Some(ca) = &t.ca_bundle {
            if !ca.starts_with('/') {
                return Err(invalid("ca bundle must be an absolute path"));
            }
            super::upstream::load_roots(ca).map_err(|e| invalid(format!("ca bundle: {e}")))?;
        }
        match (&t.client_cert, client_key) {
            (Some(cert), Some(key)) => {
                if cert.len() > 64 * 1024 || key.len() > 16 * 1024 {
                    return Err(invalid(
                        "client certificate (64 KiB) or key (16 KiB) is too large",
                    ));
                }
                super::tls::check_client_auth(cert, key)?;
            }
            (Some(_), None) => {
                return Err(invalid(
                    "a client certificate needs its private key (--client-key-file)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "a client key needs its certificate (--client-cert)",
                ))
            }
            (None, None) => {}
        }
        let _g = self.write.lock();
        self.secrets.store().disk.check_write()?;
        if let Some(key) = client_key {
            self.secrets
                .seal_value(super::tls::CLIENT_KEY_KIND, &t.name, key)?;
        }
        let sealed = self.secrets.store().sealed.clone();
        let key_id = sealed_id(super::tls::CLIENT_KEY_KIND, &t.name);
        let t = (&self.targets, &sealed)
            .transaction(|(tt, st)| {
                let old = match tt.get(t.name.as_bytes())? {
                    Some(b) => match decode_target(&b) {
                        Ok(o) => Some(o),
                        Err(e) => return abort(e.into()),
                    },
                    None => None,
                };
                let mut t = t.clone();
                t.created_at = old.map_or(now, |o| o.created_at);
                t.updated_at = now;
                tx_put(tt, t.name.as_bytes(), &t)?;
                if t.client_cert.is_none() {
                    st.remove(key_id.as_slice())?;
                }
                Ok(t)
            })
            .map_err(from_tx)?;
        self.changed()?;
        Ok(t)
    }

    pub fn get_target(&self, name: &str) -> Result<Target, ProxyError> {
        match self.targets.get(name.as_bytes())? {
            Some(b) => Ok(decode_target(&b)?),
            None => Err(ProxyError::NotFound(format!("target {name:?}"))),
        }
    }

    pub fn list_targets(&self) -> Result<Vec<Target>, ProxyError> {
        self.targets
            .iter()
            .values()
            .map(|v| Ok(decode_target(&v?)?))
            .collect()
    }

    /// Deletes a target that no credential or proxy uses.
    pub fn delete_target(&self, name: &str) -> Result<(), ProxyError> {
        let _g = self.write.lock();
        self.secrets.store().disk.check_write()?;
        // Writers are serialised by the lock, so nothing can start using
        // the target between this check and the transaction.
        if let Some(user) = self.target_in_use(name)? {
            return Err(ProxyError::FailedPrecondition(format!(
                "target {name} is used by {user}; delete or repoint that first"
            )));
        }
        let sealed = self.secrets.store().sealed.clone();
        let key_id = sealed_id(super::tls::CLIENT_KEY_KIND, name);
        (&self.targets, &sealed)
            .transaction(|(tt, st)| {
                if tt.remove(name.as_bytes())?.is_none() {
                    return abort(ProxyError::NotFound(format!("target {name:?}")));
                }
                st.remove(key_id.as_slice())?;
                Ok(())
            })
            .map_err(from_tx)?;
        self.changed()
    }

    /// The unsealed upstream client key (PEM) of target `name`. Blocking
    /// on a cold DEK cache. Only the upstream client reads it.
    pub fn client_key(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, ProxyError> {
        self.secrets
            .open_value(super::tls::CLIENT_KEY_KIND, name)?
            .ok_or_else(|| ProxyError::NotFound(format!("client key of target {name:?}")))
    }

    fn target_in_use(&self, name: &str) -> Result<Option<String>, ProxyError> {
        for c in self.list_credentials()? {
            if c.target == name {
                return Ok(Some(format!("credential {}", c.id)));
            }
        }
        for p in self.list_proxies()? {
            if p.target == name {
                return Ok(Some(format!("proxy {}", p.name)));
            }
        }
        Ok(None)
    }

    // ---- credentials ------------------------------------------------------

    /// Creates or replaces a credential and seals its value. The value is
    /// sealed first; the record is written after, so a record never points
    /// at a missing value.
    pub fn put_credential(
        &self,
        mut c: Credential,
        value: &[u8],
        now: u64,
    ) -> Result<Credential, ProxyError> {
        check_name("credential", &c.id)?;
        if value.is_empty() || value.len() > 16 * 1024 {
            return Err(invalid("credential value must be 1..=16384 bytes"));
        }
        if let Injection::Header { .. } = c.injection {
            if value.iter().any(|b| *b < 0x20 || *b == 0x7f) {
                return Err(invalid(
                    "credential value has control characters and cannot go into a header",
                ));
            }
        }
        let _g = self.write.lock();
        self.secrets.store().disk.check_write()?;
        self.get_target(&c.target)?;
        if let Some(old) = self.get_credential_opt(&c.id)? {
            if old.target != c.target {
                return Err(ProxyError::FailedPrecondition(format!(
                    "credential {} belongs to target {}; delete it first to move it",
                    c.id, old.target
                )));
            }
            c.created_at = old.created_at;
        } else {
            c.created_at = now;
        }
        c.updated_at = now;
        self.secrets.seal_value(CRED_KIND, &c.id, value)?;
        self.values.write().remove(&c.id);
        let rec = c.clone();
        (&self.targets, &self.creds)
            .transaction(|(tt, ct)| {
                if tt.get(rec.target.as_bytes())?.is_none() {
                    return abort(ProxyError::NotFound(format!("target {:?}", rec.target)));
                }
                tx_put(ct, rec.id.as_bytes(), &rec)
            })
            .map_err(from_tx)?;
        self.values.write().remove(&c.id);
        self.changed()?;
        Ok(c)
    }

    fn get_credential_opt(&self, id: &str) -> Result<Option<Credential>, ProxyError> {
        match self.creds.get(id.as_bytes())? {
            Some(b) => Ok(Some(decode(T_CREDS, &b)?)),
            None => Ok(None),
        }
    }

    pub fn get_credential(&self, id: &str) -> Result<Credential, ProxyError> {
        self.get_credential_opt(id)?
            .ok_or_else(|| ProxyError::NotFound(format!("credential {id:?}")))
    }

    pub fn list_credentials(&self) -> Result<Vec<Credential>, ProxyError> {
        self.creds
            .iter()
            .values()
            .map(|v| Ok(decode(T_CREDS, &v?)?))
            .collect()
    }

    /// Deletes a credential and its sealed value. Proxies still naming it
    /// refuse requests from now on (the value is gone).
    pub fn delete_credential(&self, id: &str) -> Result<(), ProxyError> {
        let _g = self.write.lock();
        self.secrets.store().disk.check_write()?;
        let sealed_key = {
            let mut k = CRED_KIND.as_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(id.as_bytes());
            k
        };
        let sealed = self.secrets.store().sealed.clone();
        (&self.creds, &sealed)
            .transaction(|(ct, st)| {
                if ct.remove(id.as_bytes())?.is_none() {
                    return abort(ProxyError::NotFound(format!("credential {id:?}")));
                }
                st.remove(sealed_key.as_slice())?;
                Ok(())
            })
            .map_err(from_tx)?;
        self.values.write().remove(id);
        self.changed()
    }

    /// The cached unsealed value of credential `id`, if cached: never
    /// blocks, so the proxy can skip a blocking-pool hop on the hot path.
    pub fn cached_credential_value(&self, id: &str) -> Option<Arc<Zeroizing<Vec<u8>>>> {
        self.values.read().get(id).cloned()
    }

    /// The unsealed value of credential `id` (cached). Blocking on a cold
    /// DEK cache (the root device unwraps).
    pub fn credential_value(&self, id: &str) -> Result<Arc<Zeroizing<Vec<u8>>>, ProxyError> {
        if let Some(v) = self.values.read().get(id) {
            return Ok(v.clone());
        }
        let gen = self.generation.load(Ordering::SeqCst);
        let v = self
            .secrets
            .open_value(CRED_KIND, id)?
            .ok_or_else(|| ProxyError::NotFound(format!("credential {id:?}")))?;
        let v = Arc::new(v);
        // Cache only when no change happened meanwhile (a delete racing
        // this read must not leave the old value cached).
        let mut w = self.values.write();
        if self.generation.load(Ordering::SeqCst) == gen && self.creds.contains_key(id)? {
            w.insert(id.to_owned(), v.clone());
        }
        Ok(v)
    }

    // ---- proxies ----------------------------------------------------------

    /// Creates or replaces a proxy. Its target must exist, and its
    /// credential must exist and belong to that target.
    pub fn put_proxy(&self, mut p: Proxy, now: u64) -> Result<Proxy, ProxyError> {
        check_name("proxy", &p.name)?;
        if p.name == CONNECT_LOG_NAME {
            return Err(invalid(format!(
                "the proxy name {CONNECT_LOG_NAME:?} is reserved: CONNECT tunnels are logged under it"
            )));
        }
        for id in &p.key_ids {
            if !crate::apikeys::check_id(id) {
                return Err(invalid(format!("{id:?} is not an API key id (ak_...)")));
            }
        }
        for o in &p.key_owners {
            crate::apikeys::check_owner(o).map_err(|e| invalid(e.to_string()))?;
        }
        let _g = self.write.lock();
        self.secrets.store().disk.check_write()?;
        let rec = (&self.targets, &self.creds, &self.proxies)
            .transaction(|(tt, ct, pt)| {
                if tt.get(p.target.as_bytes())?.is_none() {
                    return abort(ProxyError::NotFound(format!("target {:?}", p.target)));
                }
                if let Some(cid) = &p.credential {
                    let c: Option<Credential> = tx_get(ct, T_CREDS, cid.as_bytes())?;
                    match c {
                        None => return abort(ProxyError::NotFound(format!("credential {cid:?}"))),
                        Some(c) if c.target != p.target => {
                            return abort(ProxyError::FailedPrecondition(format!(
                                "credential {cid} belongs to target {}, not {}",
                                c.target, p.target
                            )))
                        }
                        Some(_) => {}
                    }
                }
                let old = match pt.get(p.name.as_bytes())? {
                    None => None,
                    Some(b) => match Proxy::decode(T_PROXIES, &b) {
                        Ok(v) => Some(v),
                        Err(e) => return abort(e.into()),
                    },
                };
                let mut rec = p.clone();
                rec.created_at = old.map_or(now, |o| o.created_at);
                rec.updated_at = now;
                tx_put(pt, rec.name.as_bytes(), &rec)?;
                Ok(rec)
            })
            .map_err(from_tx)?;
        p = rec;
        self.changed()?;
        Ok(p)
    }

    pub fn get_proxy(&self, name: &str) -> Result<Proxy, ProxyError> {
        match self.proxies.get(name.as_bytes())? {
            Some(b) => Ok(Proxy::decode(T_PROXIES, &b)?),
            None => Err(ProxyError::NotFound(format!("proxy {name:?}"))),
        }
    }

    pub fn list_proxies(&self) -> Result<Vec<Proxy>, ProxyError> {
        self.proxies
            .iter()
            .values()
            .map(|v| Ok(Proxy::decode(T_PROXIES, &v?)?))
            .collect()
    }

    /// Deletes a proxy and its rules in one transaction.
    pub fn delete_proxy(&self, name: &str) -> Result<(), ProxyError> {
        let _g = self.write.lock();
        self.secrets.store().disk.check_write()?;
        let rule_keys: Vec<sled::IVec> = self
            .rules
            .scan_prefix(prefix(name))
            .keys()
            .collect::<Result<_, _>>()?;
        (&self.proxies, &self.rules)
            .transaction(|(pt, rt)| {
                if pt.remove(name.as_bytes())?.is_none() {
                    return abort(ProxyError::NotFound(format!("proxy {name:?}")));
                }
                for k in &rule_keys {
                    rt.remove(k.as_ref())?;
                }
                Ok(())
            })
            .map_err(from_tx)?;
        self.telemetry.forget_proxy(name)?;
        self.changed()
    }

    // ---- rules ------------------------------------------------------------

    /// Creates or replaces rule `r.id` of proxy `r.proxy` (validated and
    /// compiled first).
    pub fn put_rule(&self, mut r: Rule, now: u64) -> Result<Rule, ProxyError> {
        r.created_at = now;
        let compiled = CompiledRule::new(r)?;
        let r = compiled.rule;
        let _g = self.write.lock();
        self.secrets.store().disk.check_write()?;
        let count = self.rules.scan_prefix(prefix(&r.proxy)).count();
        let key = rule_key(&r.proxy, &r.id);
        (&self.proxies, &self.rules)
            .transaction(|(pt, rt)| {
                if pt.get(r.proxy.as_bytes())?.is_none() {
                    return abort(ProxyError::NotFound(format!("proxy {:?}", r.proxy)));
                }
                if rt.get(key.as_slice())?.is_none() && count >= MAX_RULES {
                    return abort(invalid(format!("a proxy has at most {MAX_RULES} rules")));
                }
                tx_put(rt, &key, &r)
            })
            .map_err(from_tx)?;
        self.changed()?;
        Ok(r)
    }

    /// Rules of `proxy`, in evaluation order.
    pub fn list_rules(&self, proxy: &str) -> Result<Vec<Rule>, ProxyError> {
        let mut rules = self.compiled_rules(proxy)?;
        sort_rules(&mut rules);
        Ok(rules.into_iter().map(|c| c.rule).collect())
    }

    fn compiled_rules(&self, proxy: &str) -> Result<Vec<CompiledRule>, ProxyError> {
        self.rules
            .scan_prefix(prefix(proxy))
            .values()
            .map(|v| {
                let r: Rule = decode(T_RULES, &v?)?;
                CompiledRule::new(r)
            })
            .collect()
    }

    pub fn delete_rule(&self, proxy: &str, id: &str) -> Result<(), ProxyError> {
        let _g = self.write.lock();
        self.secrets.store().disk.check_write()?;
        let key = rule_key(proxy, id);
        self.rules
            .transaction(|rt| {
                if rt.remove(key.as_slice())?.is_none() {
                    return abort(ProxyError::NotFound(format!(
                        "rule {id:?} of proxy {proxy:?}"
                    )));
                }
                Ok(())
            })
            .map_err(from_tx)?;
        self.changed()
    }

    // ---- snapshots --------------------------------------------------------

    /// The proxy `name` with its target, credential record and compiled
    /// rules, cached until the next change.
    pub fn snapshot(&self, name: &str) -> Result<Arc<Snapshot>, ProxyError> {
        let gen = self.generation.load(Ordering::SeqCst);
        if let Some((g, s)) = self.snapshots.read().get(name) {
            if *g == gen {
                return Ok(s.clone());
            }
        }
        let proxy = self.get_proxy(name)?;
        let target = self.get_target(&proxy.target)?;
        let base = target.base()?;
        let credential = match &proxy.credential {
            Some(id) => self.get_credential_opt(id)?,
            None => None,
        };
        let mut rules = self.compiled_rules(name)?;
        sort_rules(&mut rules);
        let snap = Arc::new(Snapshot {
            proxy,
            target,
            base,
            credential,
            rules,
        });
        let mut w = self.snapshots.write();
        if self.generation.load(Ordering::SeqCst) == gen {
            w.insert(name.to_owned(), (gen, snap.clone()));
        }
        Ok(snap)
    }

    /// Telemetry buckets, anomaly detection and suspensions.
    pub fn telemetry(&self) -> &Arc<super::telemetry::Telemetry> {
        &self.telemetry
    }

    /// The generation of the configuration (changes on every write).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Explains the decision for a request to `proxy` (`keyseal proxy test`).
    pub fn explain(&self, proxy: &str, req: &RequestFacts<'_>) -> Result<Explain, ProxyError> {
        let s = self.snapshot(proxy)?;
        Ok(evaluate(s.proxy.default_effect, &s.rules, req))
    }

    // ---- request log ------------------------------------------------------

    /// Records a finished request: telemetry (and anomaly detection) now,
    /// the request log entry through its writer thread (see
    /// [`RequestLog`]; not synced: the log is operational data, the audit
    /// log has every decision).
    pub fn log(&self, e: LogEntry) {
        if e.proxy == CONNECT_LOG_NAME {
            // Tunnels have no proxy record: anomalies are flagged only.
            self.telemetry.record(&e, super::model::OnAnomaly::Flag);
        } else if let Ok(s) = self.snapshot(&e.proxy) {
            self.telemetry.record(&e, s.proxy.on_anomaly);
        }
        self.log.append(e);
    }

    /// Hides every request-log entry older than `before_us` and deletes
    /// the log files that hold only such entries; returns how many entries
    /// those files held.
    pub fn prune_log(&self, before_us: u64) -> Result<u64, ProxyError> {
        self.log.prune(before_us)
    }

    /// Entries of `proxy` with `after_us <= time < before_us` (0: open),
    /// oldest first, at most `limit`; includes every request that ended
    /// before the call.
    pub fn query_log(
        &self,
        proxy: &str,
        after_us: u64,
        before_us: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, ProxyError> {
        self.log.query(proxy, after_us, before_us, limit)
    }
}

/// Moves an older store's request log (the `proxy_log` sled tree) into the
/// log files, then drops the tree. Interrupted, it runs again at the next
/// open: the entries already moved are then in the files twice (the log
/// is operational data; nothing is lost).
fn migrate_old_log(db: &sled::Db, log: &super::reqlog::RequestLog) -> Result<(), ProxyError> {
    if !db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == T_LOG_OLD.as_bytes())
    {
        return Ok(());
    }
    let old = db.open_tree(T_LOG_OLD)?;
    let mut moved = 0u64;
    for kv in old.iter() {
        let (_, v) = kv?;
        match decode::<LogEntry>(T_LOG_OLD, &v) {
            Ok(e) => {
                log.append(e);
                moved += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "request log migration: a corrupt entry was skipped")
            }
        }
    }
    log.sync()?;
    drop(old);
    db.drop_tree(T_LOG_OLD)?;
    if moved > 0 {
        tracing::info!(
            entries = moved,
            "request log moved out of sled into its own files"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_target_records_decode() {
        #[derive(Serialize)]
        struct Old<'a> {
            name: &'a str,
            base_url: &'a str,
            ca_bundle: Option<&'a str>,
            connect_timeout_ms: u64,
            response_timeout_ms: u64,
            idle_timeout_ms: u64,
            created_at: u64,
            updated_at: u64,
        }
        let old = encode(&Old {
            name: "v",
            base_url: "https://a.example",
            ca_bundle: Some("/ca.pem"),
            connect_timeout_ms: 1,
            response_timeout_ms: 2,
            idle_timeout_ms: 3,
            created_at: 4,
            updated_at: 5,
        })
        .unwrap();
        let t = decode_target(&old).unwrap();
        assert_eq!(t.name, "v");
        assert_eq!(t.ca_bundle.as_deref(), Some("/ca.pem"));
        assert_eq!((t.idle_timeout_ms, t.updated_at), (3, 5));
        assert_eq!(t.client_cert, None);
        let mut new = t.clone();
        new.client_cert = Some("PEM".into());
        assert_eq!(decode_target(&encode(&new).unwrap()).unwrap(), new);
        assert!(decode_target(&[1, 2]).is_err());
    }
}
