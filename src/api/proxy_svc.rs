//! `keyseal.v1.Proxy`: targets, target credentials (write-only), proxies,
//! rules, rule explanations and the request log.
//!
//! Capability `proxy:admin` on `target/<name>`, `credential/<id>` or
//! `proxy/<name>` (rules, tests and the request log are the proxy's).
//! A credential value goes in through `PutCredential` and never comes out.

use std::fmt;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::{self, proxy_server::Proxy as ProxyApi};
use super::{caller, DaemonState};
use crate::policy::Capability;
use crate::proxy::model::{
    CallerSelector, Condition, Credential, Effect, Injection, OnAnomaly, Proxy, ProxyError,
    RequestFacts, Rule, Target,
};
use crate::proxy::store::LogEntry;
use crate::proxy::telemetry::{Bucket, Interval};
use crate::proxy::ProxyStore;
use crate::secrets::OpCtx;

impl fmt::Debug for pb::PutCredentialRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutCredentialRequest")
            .field("credential", &self.credential)
            .field("value", &format_args!("*** ({} bytes)", self.value.len()))
            .finish()
    }
}

impl fmt::Debug for pb::PutTargetRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutTargetRequest")
            .field("target", &self.target)
            .field(
                "client_key_pem",
                &format_args!("*** ({} bytes)", self.client_key_pem.len()),
            )
            .finish()
    }
}

/// The Proxy service.
pub struct ProxyService {
    pub state: Arc<DaemonState>,
}

/// Maps a proxy error to a gRPC status.
pub fn status_of_proxy(e: ProxyError) -> Status {
    match e {
        ProxyError::InvalidArgument(m) => Status::invalid_argument(m),
        ProxyError::NotFound(m) => Status::not_found(format!("{m} not found")),
        ProxyError::FailedPrecondition(m) => Status::failed_precondition(m),
        ProxyError::Secrets(s) => super::status_of(s),
    }
}

fn target_pb(t: Target) -> pb::ProxyTarget {
    pb::ProxyTarget {
        name: t.name,
        base_url: t.base_url,
        ca_bundle: t.ca_bundle.unwrap_or_default(),
        connect_timeout_ms: t.connect_timeout_ms,
        response_timeout_ms: t.response_timeout_ms,
        idle_timeout_ms: t.idle_timeout_ms,
        created_at: t.created_at,
        updated_at: t.updated_at,
        allow_http: false,
        client_cert_pem: t.client_cert.unwrap_or_default(),
    }
}

fn cred_pb(c: Credential) -> pb::TargetCredential {
    let description = c.injection.describe();
    let (kind, header, basic_user, query_param) = match c.injection {
        Injection::Header { name, template } => (
            "header",
            format!("{name}: {template}"),
            String::new(),
            String::new(),
        ),
        Injection::Basic { user } => ("basic", String::new(), user, String::new()),
        Injection::Query { param } => ("query", String::new(), String::new(), param),
    };
    pb::TargetCredential {
        id: c.id,
        target: c.target,
        kind: kind.into(),
        header,
        basic_user,
        query_param,
        created_at: c.created_at,
        created_by: c.created_by,
        updated_at: c.updated_at,
        description,
    }
}

fn proxy_pb(p: Proxy) -> pb::ProxyInfo {
    pb::ProxyInfo {
        name: p.name,
        target: p.target,
        credential: p.credential.unwrap_or_default(),
        default_effect: p.default_effect.as_str().into(),
        rate_plan: p.rate_plan.unwrap_or_default(),
        callers: p.callers.iter().map(|c| c.to_string()).collect(),
        key_ids: p.key_ids,
        key_owners: p.key_owners,
        created_at: p.created_at,
        updated_at: p.updated_at,
        on_anomaly: p.on_anomaly.as_str().into(),
    }
}

fn cond_pb(c: Condition) -> pb::ProxyCondition {
    pb::ProxyCondition {
        name: c.name,
        regex: c.regex,
    }
}

fn rule_pb(r: Rule) -> pb::ProxyRule {
    pb::ProxyRule {
        proxy: r.proxy,
        id: r.id,
        priority: r.priority,
        effect: r.effect.as_str().into(),
        methods: r.methods,
        path: r.path,
        headers: r.headers.into_iter().map(cond_pb).collect(),
        query: r.query.into_iter().map(cond_pb).collect(),
        notes: r.notes,
        created_at: r.created_at,
    }
}

fn log_pb(e: LogEntry) -> pb::RequestLogEntry {
    pb::RequestLogEntry {
        time_us: e.time_us,
        proxy: e.proxy,
        caller: e.caller,
        method: e.method,
        path: e.path,
        status: u32::from(e.status),
        latency_us: e.latency_us,
        bytes_in: e.bytes_in,
        bytes_out: e.bytes_out,
        decision: e.decision,
        rule: e.rule.unwrap_or_default(),
    }
}

fn bucket_pb(b: Bucket) -> pb::TelemetryBucket {
    pb::TelemetryBucket {
        start: b.start,
        requests: b.requests,
        status_2xx: b.status_2xx,
        status_3xx: b.status_3xx,
        status_4xx: b.status_4xx,
        status_5xx: b.status_5xx,
        denied: b.denied,
        rate_limited: b.rate_limited,
        unauthenticated: b.unauthenticated,
        errors: b.errors,
        suspended: b.suspended,
        p50_latency_us: b.percentile(0.5),
        p95_latency_us: b.percentile(0.95),
        anomalies: b.anomalies.into_iter().collect(),
    }
}

fn opt(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

fn ms(v: u64, default: u64) -> u64 {
    if v == 0 {
        default
    } else {
        v
    }
}

impl ProxyService {
    fn admin(&self, who: &super::Caller, name: &str) -> Result<(), Status> {
        self.state.authorize(who, Capability::ProxyAdmin, name)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ProxyStore) -> Result<T, ProxyError> + Send + 'static,
    ) -> Result<T, Status> {
        let p = self.state.proxies.clone();
        self.state
            .run_blocking(move || f(&p).map_err(status_of_proxy))
            .await
    }
}

#[tonic::async_trait]
impl ProxyApi for ProxyService {
    async fn put_target(
        &self,
        req: Request<pb::PutTargetRequest>,
    ) -> Result<Response<pb::ProxyTarget>, Status> {
        let audit = self.state.audit_ctx(
            &req,
            "proxy.target.put",
            req.get_ref().target.as_ref().map(|t| t.name.as_str()),
        );
        let res: Result<Response<pb::ProxyTarget>, Status> = async move {
        let who = caller(&req)?;
        let r = req.into_inner();
        let client_key = zeroize::Zeroizing::new(r.client_key_pem);
        let t = r
            .target
            .ok_or_else(|| Status::invalid_argument("give a target"))?;
        self.admin(&who, &format!("target/{}", t.name))?;
        let base = crate::proxy::model::BaseUrl::parse(&t.base_url, t.allow_http)
            .map_err(status_of_proxy)?;
        let now = OpCtx::new("").now;
        let rec = Target {
            name: t.name,
            base_url: base.to_text(),
            ca_bundle: opt(t.ca_bundle),
            connect_timeout_ms: ms(t.connect_timeout_ms, 5_000),
            response_timeout_ms: ms(t.response_timeout_ms, 30_000),
            idle_timeout_ms: ms(t.idle_timeout_ms, 90_000),
            created_at: 0,
            updated_at: 0,
            client_cert: opt(t.client_cert_pem),
        };
        let t = self
            .run(move |s| {
                let key = (!client_key.is_empty()).then_some(client_key.as_slice());
                s.put_target_tls(rec, key, now)
            })
            .await?;
        tracing::info!(target = %t.name, url = %t.base_url, actor = %who.identity.actor(), "proxy target saved");
        Ok(Response::new(target_pb(t)))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn list_targets(
        &self,
        req: Request<pb::ProxyListRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        let audit = self.state.audit_ctx(&req, "proxy.target.list", None);
        let res: Result<Response<pb::ListTargetsResponse>, Status> = async move {
            let who = caller(&req)?;
            let all = self.run(|s| s.list_targets()).await?;
            let p = self.state.policy.current();
            let targets = all
                .into_iter()
                .filter(|t| {
                    p.check(
                        &who.identity,
                        Capability::ProxyAdmin,
                        &format!("target/{}", t.name),
                    )
                    .allowed
                })
                .map(target_pb)
                .collect();
            Ok(Response::new(pb::ListTargetsResponse { targets }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn delete_target(
        &self,
        req: Request<pb::ProxyNameRequest>,
    ) -> Result<Response<pb::ProxyEmpty>, Status> {
        let audit = self.state.audit_ctx(
            &req,
            "proxy.target.delete",
            Some(req.get_ref().name.as_str()),
        );
        let res: Result<Response<pb::ProxyEmpty>, Status> = async move {
            let who = caller(&req)?;
            let name = req.into_inner().name;
            self.admin(&who, &format!("target/{name}"))?;
            let n = name.clone();
            self.run(move |s| s.delete_target(&n)).await?;
            tracing::info!(target = %name, actor = %who.identity.actor(), "proxy target deleted");
            Ok(Response::new(pb::ProxyEmpty {}))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn put_credential(
        &self,
        req: Request<pb::PutCredentialRequest>,
    ) -> Result<Response<pb::TargetCredential>, Status> {
        let audit = self.state.audit_ctx(
            &req,
            "proxy.credential.put",
            req.get_ref().credential.as_ref().map(|c| c.id.as_str()),
        );
        let res: Result<Response<pb::TargetCredential>, Status> = async move {
        let who = caller(&req)?;
        let r = req.into_inner();
        let value = zeroize::Zeroizing::new(r.value);
        let c = r
            .credential
            .ok_or_else(|| Status::invalid_argument("give a credential"))?;
        self.admin(&who, &format!("credential/{}", c.id))?;
        let injection = match c.kind.as_str() {
            "header" | "" => Injection::header(if c.header.is_empty() {
                "authorization: Bearer {}"
            } else {
                &c.header
            }),
            "basic" => Injection::basic(&c.basic_user),
            "query" => Injection::query(&c.query_param),
            o => Err(ProxyError::InvalidArgument(format!(
                "kind {o:?}: use \"header\", \"basic\" or \"query\""
            ))),
        }
        .map_err(status_of_proxy)?;
        let ctx = OpCtx::new(who.identity.actor());
        let rec = Credential {
            id: c.id,
            target: c.target,
            injection,
            created_at: 0,
            created_by: ctx.actor.clone(),
            updated_at: 0,
        };
        let c = self
            .run(move |s| s.put_credential(rec, &value, ctx.now))
            .await?;
        if let Injection::Query { .. } = c.injection {
            tracing::warn!(credential = %c.id, "query-parameter credential: discouraged (URLs end up in upstream logs)");
        }
        tracing::info!(credential = %c.id, target = %c.target, actor = %who.identity.actor(), "target credential sealed");
        Ok(Response::new(cred_pb(c)))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn list_credentials(
        &self,
        req: Request<pb::ProxyListRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let audit = self.state.audit_ctx(&req, "proxy.credential.list", None);
        let res: Result<Response<pb::ListCredentialsResponse>, Status> = async move {
            let who = caller(&req)?;
            let all = self.run(|s| s.list_credentials()).await?;
            let p = self.state.policy.current();
            let credentials = all
                .into_iter()
                .filter(|c| {
                    p.check(
                        &who.identity,
                        Capability::ProxyAdmin,
                        &format!("credential/{}", c.id),
                    )
                    .allowed
                })
                .map(cred_pb)
                .collect();
            Ok(Response::new(pb::ListCredentialsResponse { credentials }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn delete_credential(
        &self,
        req: Request<pb::ProxyNameRequest>,
    ) -> Result<Response<pb::ProxyEmpty>, Status> {
        let audit = self.state.audit_ctx(
            &req,
            "proxy.credential.delete",
            Some(req.get_ref().name.as_str()),
        );
        let res: Result<Response<pb::ProxyEmpty>, Status> = async move {
        let who = caller(&req)?;
        let id = req.into_inner().name;
        self.admin(&who, &format!("credential/{id}"))?;
        let i = id.clone();
        self.run(move |s| s.delete_credential(&i)).await?;
        tracing::info!(credential = %id, actor = %who.identity.actor(), "target credential deleted");
        Ok(Response::new(pb::ProxyEmpty {}))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn put_proxy(
        &self,
        req: Request<pb::PutProxyRequest>,
    ) -> Result<Response<pb::ProxyInfo>, Status> {
        let audit = self.state.audit_ctx(
            &req,
            "proxy.put",
            req.get_ref().proxy.as_ref().map(|p| p.name.as_str()),
        );
        let res: Result<Response<pb::ProxyInfo>, Status> = async move {
        let who = caller(&req)?;
        let p = req
            .into_inner()
            .proxy
            .ok_or_else(|| Status::invalid_argument("give a proxy"))?;
        self.admin(&who, &format!("proxy/{}", p.name))?;
        let default_effect = Effect::parse(&p.default_effect).map_err(status_of_proxy)?;
        let callers = p
            .callers
            .iter()
            .map(|c| CallerSelector::parse(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(status_of_proxy)?;
        let on_anomaly = OnAnomaly::parse(&p.on_anomaly).map_err(status_of_proxy)?;
        let rate_plan = opt(p.rate_plan);
        if let Some(plan) = &rate_plan {
            if !self.state.apikeys.config().plans.contains_key(plan) {
                return Err(Status::invalid_argument(format!(
                    "rate plan {plan:?} is not configured; add a [rate_plans.{plan}] section"
                )));
            }
        }
        let rec = Proxy {
            name: p.name,
            target: p.target,
            credential: opt(p.credential),
            default_effect,
            rate_plan,
            callers,
            key_ids: p.key_ids,
            key_owners: p.key_owners,
            created_at: 0,
            updated_at: 0,
            on_anomaly,
        };
        let now = OpCtx::new("").now;
        let p = self.run(move |s| s.put_proxy(rec, now)).await?;
        tracing::info!(proxy = %p.name, target = %p.target, credential = p.credential.as_deref().unwrap_or("-"), actor = %who.identity.actor(), "proxy saved");
        Ok(Response::new(proxy_pb(p)))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn get_proxy(
        &self,
        req: Request<pb::ProxyNameRequest>,
    ) -> Result<Response<pb::ProxyInfo>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "proxy.get", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::ProxyInfo>, Status> = async move {
            let who = caller(&req)?;
            let name = req.into_inner().name;
            self.admin(&who, &format!("proxy/{name}"))?;
            let p = self.run(move |s| s.get_proxy(&name)).await?;
            Ok(Response::new(proxy_pb(p)))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn list_proxies(
        &self,
        req: Request<pb::ProxyListRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        let audit = self.state.audit_ctx(&req, "proxy.list", None);
        let res: Result<Response<pb::ListProxiesResponse>, Status> = async move {
            let who = caller(&req)?;
            let all = self.run(|s| s.list_proxies()).await?;
            let p = self.state.policy.current();
            let proxies = all
                .into_iter()
                .filter(|x| {
                    p.check(
                        &who.identity,
                        Capability::ProxyAdmin,
                        &format!("proxy/{}", x.name),
                    )
                    .allowed
                })
                .map(proxy_pb)
                .collect();
            Ok(Response::new(pb::ListProxiesResponse { proxies }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn delete_proxy(
        &self,
        req: Request<pb::ProxyNameRequest>,
    ) -> Result<Response<pb::ProxyEmpty>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "proxy.delete", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::ProxyEmpty>, Status> = async move {
            let who = caller(&req)?;
            let name = req.into_inner().name;
            self.admin(&who, &format!("proxy/{name}"))?;
            let n = name.clone();
            self.run(move |s| s.delete_proxy(&n)).await?;
            tracing::info!(proxy = %name, actor = %who.identity.actor(), "proxy deleted");
            Ok(Response::new(pb::ProxyEmpty {}))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn put_rule(
        &self,
        req: Request<pb::PutRuleRequest>,
    ) -> Result<Response<pb::ProxyRule>, Status> {
        let audit = self.state.audit_ctx(&req, "proxy.rule.put", None);
        let res: Result<Response<pb::ProxyRule>, Status> = async move {
        let who = caller(&req)?;
        let r = req
            .into_inner()
            .rule
            .ok_or_else(|| Status::invalid_argument("give a rule"))?;
        self.admin(&who, &format!("proxy/{}", r.proxy))?;
        let effect = match r.effect.as_str() {
            "allow" => Effect::Allow,
            "deny" => Effect::Deny,
            o => {
                return Err(Status::invalid_argument(format!(
                    "effect {o:?}: use \"allow\" or \"deny\""
                )))
            }
        };
        let conv = |v: Vec<pb::ProxyCondition>| {
            v.into_iter()
                .map(|c| Condition {
                    name: c.name,
                    regex: c.regex,
                })
                .collect()
        };
        let rec = Rule {
            proxy: r.proxy,
            id: r.id,
            priority: r.priority,
            effect,
            methods: r.methods,
            path: if r.path.is_empty() {
                ".*".into()
            } else {
                r.path
            },
            headers: conv(r.headers),
            query: conv(r.query),
            notes: r.notes,
            created_at: 0,
        };
        let now = OpCtx::new("").now;
        let r = self.run(move |s| s.put_rule(rec, now)).await?;
        tracing::info!(proxy = %r.proxy, rule = %r.id, priority = r.priority, effect = r.effect.as_str(), actor = %who.identity.actor(), "proxy rule saved");
        Ok(Response::new(rule_pb(r)))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn list_rules(
        &self,
        req: Request<pb::ProxyNameRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        let audit =
            self.state
                .audit_ctx(&req, "proxy.rule.list", Some(req.get_ref().name.as_str()));
        let res: Result<Response<pb::ListRulesResponse>, Status> = async move {
            let who = caller(&req)?;
            let name = req.into_inner().name;
            self.admin(&who, &format!("proxy/{name}"))?;
            let rules = self
                .run(move |s| {
                    s.get_proxy(&name)?;
                    s.list_rules(&name)
                })
                .await?;
            Ok(Response::new(pb::ListRulesResponse {
                rules: rules.into_iter().map(rule_pb).collect(),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn delete_rule(
        &self,
        req: Request<pb::ProxyRuleRef>,
    ) -> Result<Response<pb::ProxyEmpty>, Status> {
        let audit = self.state.audit_ctx(
            &req,
            "proxy.rule.delete",
            Some(req.get_ref().proxy.as_str()),
        );
        let res: Result<Response<pb::ProxyEmpty>, Status> = async move {
        let who = caller(&req)?;
        let r = req.into_inner();
        self.admin(&who, &format!("proxy/{}", r.proxy))?;
        let (p, id) = (r.proxy.clone(), r.id.clone());
        self.run(move |s| s.delete_rule(&p, &id)).await?;
        tracing::info!(proxy = %r.proxy, rule = %r.id, actor = %who.identity.actor(), "proxy rule deleted");
        Ok(Response::new(pb::ProxyEmpty {}))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn test(
        &self,
        req: Request<pb::ProxyTestRequest>,
    ) -> Result<Response<pb::ProxyTestResponse>, Status> {
        let audit = self
            .state
            .audit_ctx(&req, "proxy.test", Some(req.get_ref().proxy.as_str()));
        let res: Result<Response<pb::ProxyTestResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            self.admin(&who, &format!("proxy/{}", r.proxy))?;
            let path = if r.path.starts_with('/') {
                r.path
            } else {
                format!("/{}", r.path)
            };
            let (path, query) = match path.split_once('?') {
                Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                None => (path, opt(r.query)),
            };
            let method = r.method.to_ascii_uppercase();
            let headers: Vec<(String, String)> = r
                .headers
                .into_iter()
                .map(|c| (c.name.to_ascii_lowercase(), c.regex))
                .collect();
            let e = self
                .run(move |s| {
                    s.explain(
                        &r.proxy,
                        &RequestFacts {
                            method: &method,
                            path: &path,
                            headers: &headers,
                            query: query.as_deref(),
                        },
                    )
                })
                .await?;
            Ok(Response::new(pb::ProxyTestResponse {
                effect: e.effect.as_str().into(),
                rule: e.rule.unwrap_or_default(),
                reason: e.reason,
                trace: e
                    .trace
                    .into_iter()
                    .map(|t| pb::ProxyRuleTrace {
                        id: t.id,
                        priority: t.priority,
                        effect: t.effect.as_str().into(),
                        matched: t.matched,
                        why_not: t.why_not.unwrap_or_default(),
                    })
                    .collect(),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn requests(
        &self,
        req: Request<pb::RequestsQuery>,
    ) -> Result<Response<pb::RequestsResponse>, Status> {
        let audit =
            self.state
                .audit_ctx(&req, "proxy.requests", Some(req.get_ref().proxy.as_str()));
        let res: Result<Response<pb::RequestsResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            self.admin(&who, &format!("proxy/{}", r.proxy))?;
            let limit = if r.limit == 0 {
                1000
            } else {
                r.limit.min(10_000)
            } as usize;
            let after = r.processed_after.saturating_mul(1_000_000);
            let before = r.processed_before.saturating_mul(1_000_000);
            let entries = self
                .run(move |s| s.query_log(&r.proxy, after, before, limit))
                .await?;
            Ok(Response::new(pb::RequestsResponse {
                entries: entries.into_iter().map(log_pb).collect(),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn telemetry(
        &self,
        req: Request<pb::TelemetryRequest>,
    ) -> Result<Response<pb::TelemetryResponse>, Status> {
        let audit =
            self.state
                .audit_ctx(&req, "proxy.telemetry", Some(req.get_ref().proxy.as_str()));
        let res: Result<Response<pb::TelemetryResponse>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            self.admin(&who, &format!("proxy/{}", r.proxy))?;
            let iv = Interval::parse(&r.interval).map_err(status_of_proxy)?;
            let limit = if r.limit == 0 {
                60
            } else {
                r.limit.min(10_000)
            } as usize;
            let now = OpCtx::new("").now.saturating_mul(1_000_000);
            let name = r.proxy.clone();
            let (buckets, suspended) = self
                .run(move |s| {
                    // CONNECT tunnels are aggregated under a name that is
                    // not a proxy.
                    if name != crate::proxy::store::CONNECT_LOG_NAME {
                        s.get_proxy(&name)?;
                    }
                    let t = s.telemetry();
                    Ok((t.query(&name, iv, limit, now)?, t.suspensions(&name)))
                })
                .await?;
            Ok(Response::new(pb::TelemetryResponse {
                proxy: r.proxy,
                interval: iv.as_str().into(),
                buckets: buckets.into_iter().map(bucket_pb).collect(),
                suspended: suspended
                    .into_iter()
                    .map(|s| pb::ProxySuspension {
                        caller: s.caller,
                        since_us: s.since_us,
                        kind: s.kind,
                    })
                    .collect(),
            }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn ca_certificate(
        &self,
        req: Request<pb::ProxyListRequest>,
    ) -> Result<Response<pb::ProxyCaResponse>, Status> {
        let audit = self.state.audit_ctx(&req, "proxy.ca.get", Some("ca"));
        let res: Result<Response<pb::ProxyCaResponse>, Status> = async move {
            let who = caller(&req)?;
            self.admin(&who, "ca")?;
            let pem = self.run(|s| s.ca.certificate_pem()).await?;
            Ok(Response::new(pb::ProxyCaResponse { pem }))
        }
        .await;
        self.state.audited(audit, res).await
    }

    async fn unsuspend(
        &self,
        req: Request<pb::UnsuspendRequest>,
    ) -> Result<Response<pb::ProxyEmpty>, Status> {
        let audit =
            self.state
                .audit_ctx(&req, "proxy.unsuspend", Some(req.get_ref().proxy.as_str()));
        let res: Result<Response<pb::ProxyEmpty>, Status> = async move {
            let who = caller(&req)?;
            let r = req.into_inner();
            self.admin(&who, &format!("proxy/{}", r.proxy))?;
            let (p, c) = (r.proxy.clone(), r.caller.clone());
            let s = self
                .run(move |s| s.telemetry().unsuspend(&p, &c))
                .await?;
            tracing::info!(proxy = %s.proxy, caller = %s.caller, kind = %s.kind, actor = %who.identity.actor(), "proxy caller unsuspended");
            if let Some(a) = &self.state.audit {
                // Who was cleared, next to the request's own event.
                let ev = crate::audit::NewEvent::new(
                    OpCtx::new("").now.saturating_mul(1000),
                    crate::audit::Actor::peer(&who.identity),
                    "proxy.suspension.clear",
                )
                .target(s.proxy.clone())
                .detail("proxy", s.proxy.clone())
                .detail("caller", s.caller.clone())
                .detail("kind", s.kind.clone())
                .detail("since_us", s.since_us.to_string());
                if let Err(e) = a.append(ev).await {
                    tracing::error!(error = %e, "audit append of an unsuspend failed");
                }
            }
            Ok(Response::new(pb::ProxyEmpty {}))
        }
        .await;
        self.state.audited(audit, res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_target_debug_masks_the_client_key() {
        let r = pb::PutTargetRequest {
            target: Some(pb::ProxyTarget {
                name: "t".into(),
                client_cert_pem: "CERT".into(),
                ..Default::default()
            }),
            client_key_pem: b"-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES".to_vec(),
        };
        let d = format!("{r:?}");
        assert!(!d.contains("SECRETKEYBYTES"), "{d}");
        assert!(d.contains("*** (42 bytes)"), "{d}");
        assert!(d.contains("CERT"), "{d}");
    }
}
