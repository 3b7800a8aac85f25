//! The proxy's pure decision and parsing code, driven by text:
//!
//! ```text
//! METHOD /path?query            request line
//! name: value                   request headers ...
//! --                            end of headers
//! PRIO<TAB>allow|deny<TAB>GET,POST<TAB>path-regex<TAB>h=re;h2=re<TAB>q=re
//! ...                           one rule per line
//! ```
//!
//! Rule evaluation must never panic and must agree with a brute-force
//! oracle (lowest matching priority decides, deny wins within it, else the
//! default); the gateway's `decide` must agree with `evaluate`. Every line also goes through the URL/host parsers and the SSRF
//! numeric-host normalisation, which must be idempotent and agree with the
//! standard library on canonical dotted quads.
#![no_main]

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use keyseal::proxy::model::{
    check_name, decide, decision_reason, evaluate, percent_decode, query_pairs, sort_rules,
    BaseUrl, CallerSelector, CompiledRule, Condition, Effect, Injection, RequestFacts, Rule,
};
use keyseal::proxy::ssrf::{parse_numeric_host, refused_reason, split_host_port, Egress};
use libfuzzer_sys::fuzz_target;

fn conds(s: Option<&str>) -> Vec<Condition> {
    s.unwrap_or("")
        .split(';')
        .filter(|c| !c.is_empty())
        .take(4)
        .map(|c| {
            let (name, regex) = c.split_once('=').unwrap_or((c, ".*"));
            Condition {
                name: name.to_owned(),
                regex: regex.to_owned(),
            }
        })
        .collect()
}

/// `CompiledRule::new`, memoised by rule line: compiling the regexes
/// (instrumented regex-automata, mostly building the meta regex's full
/// DFA) is most of an execution's cost, and a line always gives the same
/// rule. The key is the line alone, whatever its position: the rule id
/// (`r<position>`, always valid) is put on the cached rule afterwards, so
/// a line that moved (inserted or removed lines) is not compiled again.
fn compile(line: &str, rule: Rule) -> Option<CompiledRule> {
    thread_local! {
        static CACHE: RefCell<HashMap<String, Option<CompiledRule>>> =
            RefCell::new(HashMap::new());
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let id = rule.id.clone();
        let r = match c.get(line) {
            Some(r) => r.clone(),
            None => {
                if c.len() > 20_000 {
                    c.clear();
                }
                let r = CompiledRule::new(rule).ok();
                c.insert(line.to_owned(), r.clone());
                r
            }
        };
        r.map(|mut r| {
            r.rule.id = id;
            r
        })
    })
}

fn hosts(line: &str, egress: &Egress) {
    let ip = parse_numeric_host(line);
    if let Some(ip) = ip {
        let _ = refused_reason(ip);
    }
    let n = Egress::normalise(line);
    assert_eq!(Egress::normalise(&n), n, "normalise is not idempotent");
    if let Ok(std_ip) = line.parse::<Ipv4Addr>() {
        assert_eq!(ip, Some(IpAddr::V4(std_ip)), "disagrees with std");
        assert_eq!(n, std_ip.to_string());
    }
    if let Some(IpAddr::V4(a)) = ip {
        if a.is_loopback() || a.is_private() || a.is_unspecified() {
            assert!(refused_reason(IpAddr::V4(a)).is_some());
        }
    }
    if let Some((h, port)) = split_host_port(line) {
        let _ = egress.host_allowed(&Egress::normalise(&h), port);
    }
    let _ = BaseUrl::parse(line, true).map(|u| (u.to_text(), u.authority()));
    let _ = CallerSelector::parse(line).map(|c| c.to_string());
    let _ = Injection::header(line).map(|i| i.describe());
    let _ = Injection::basic(line);
    let _ = Injection::query(line);
    let _ = check_name("rule", line);
    let _ = Effect::parse(line);
    let _ = percent_decode(line);
    let _ = query_pairs(Some(line)).count();
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.lines();
    let req_line = lines.next().unwrap_or("");
    let (method, target) = req_line.split_once(' ').unwrap_or((req_line, "/"));
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut headers = Vec::new();
    for l in lines.by_ref() {
        if l == "--" {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let rule_lines: Vec<&str> = lines.collect();
    let mut rules = Vec::new();
    for (i, l) in rule_lines.iter().take(12).enumerate() {
        let mut f = l.split('\t');
        let priority = f.next().and_then(|p| p.trim().parse().ok()).unwrap_or(100);
        let effect = match f.next() {
            Some("allow") | Some("a") => Effect::Allow,
            _ => Effect::Deny,
        };
        let methods = f
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect();
        let rule = Rule {
            proxy: "p".into(),
            id: format!("r{i}"),
            priority,
            effect,
            methods,
            path: f.next().unwrap_or(".*").to_owned(),
            headers: conds(f.next()),
            query: conds(f.next()),
            notes: String::new(),
            created_at: 0,
        };
        if let Some(r) = compile(l, rule) {
            rules.push(r);
        }
    }
    sort_rules(&mut rules);
    let req = RequestFacts {
        method,
        path,
        headers: &headers,
        query,
    };
    // Oracle: each rule on its own (the same for both defaults).
    let matching: Vec<&CompiledRule> = rules
        .iter()
        .filter(|r| {
            evaluate(Effect::Deny, std::slice::from_ref(*r), &req)
                .rule
                .is_some()
        })
        .collect();
    // The gateway's fast path decides the same.
    let won = decide(&rules, &req);
    for default in [Effect::Allow, Effect::Deny] {
        let ex = evaluate(default, &rules, &req);
        assert_eq!(won.map(|r| r.rule.id.as_str()), ex.rule.as_deref());
        assert_eq!(won.map_or(default, |r| r.rule.effect), ex.effect);
        assert_eq!(decision_reason(default, won), ex.reason);
        match matching.iter().map(|r| r.rule.priority).min() {
            None => {
                assert_eq!(ex.effect, default);
                assert!(ex.rule.is_none());
            }
            Some(p) => {
                let deny = matching
                    .iter()
                    .any(|r| r.rule.priority == p && r.rule.effect == Effect::Deny);
                let want = if deny { Effect::Deny } else { Effect::Allow };
                assert_eq!(ex.effect, want);
                let id = ex.rule.as_deref().expect("a deciding rule");
                let winner = rules.iter().find(|r| r.rule.id == id).unwrap();
                assert_eq!(winner.rule.priority, p);
                assert!(ex.trace.iter().any(|t| t.id == id && t.matched));
            }
        }
    }
    let egress = Egress {
        allow: rule_lines.iter().take(4).map(|s| s.to_string()).collect(),
        allow_addresses: Vec::new(),
    };
    for l in text.lines().take(32) {
        hosts(l, &egress);
    }
});
