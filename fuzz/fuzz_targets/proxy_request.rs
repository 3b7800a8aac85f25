//! The proxy's request handling besides the CONNECT authority
//! (`keyseal::proxy::request`), on requests built from bytes:
//!
//! ```text
//! byte 0                flags: bit 0 forward (else gateway), bits 1-2 the
//!                       credential (none, header, basic, query), bit 3 add
//!                       a proxy key header, bit 4 as Basic (else Bearer)
//! request target        as on the request line (origin or absolute form)
//! base URL              of the target (a default when it does not parse)
//! recipe                header template / basic user / query parameter
//! secret                the target credential's value (bytes)
//! proxy key             put in Authorization / Proxy-Authorization (bit 3)
//! name: value           request headers (bytes), one a line ...
//! ```
//!
//! Checked besides "no panic": the presented key is the key put in the
//! header (Bearer trimmed, Basic's password exactly); a gateway path splits
//! into a proxy name without `/` and a path that rebuild the original; a
//! forward host is normalised (idempotent) and a target whose base URL is
//! the request's own origin is found for it; the path below a base path
//! rebuilds the request path; a clean path has no dot or empty segments,
//! also once percent-decoded; the upstream request keeps no hop-by-hop
//! header, no header named in `Connection` (parsed from the raw bytes, as
//! RFC 9110 says), no client `Authorization` / `Proxy-Authorization`, has
//! `Host` = the base authority once, every other client header unchanged,
//! the URI is base + path (+ the client's query), and the credential is
//! exactly where its recipe says, once; a response loses exactly its
//! hop-by-hop and `Connection`-listed headers.
#![no_main]

use base64::Engine;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use keyseal::proxy::model::{
    is_hop_by_hop, percent_decode, query_pairs, BaseUrl, Injection, Target,
};
use keyseal::proxy::request::{
    connection_listed, forward_host, gateway_path, path_is_clean, path_under_base, presented_key,
    strip_hop_by_hop, targets_for_host, tunnel_host, upstream_request, url_encode, Mode,
    UpstreamError,
};
use keyseal::proxy::ssrf::Egress;
use libfuzzer_sys::fuzz_target;

/// RFC 9110 §7.6.1: the `Connection` options, from the raw bytes (comma
/// separated, optional whitespace, case-insensitive), that name headers.
fn listed_oracle(h: &HeaderMap) -> Vec<String> {
    let mut out = Vec::new();
    for v in h.get_all(http::header::CONNECTION) {
        for t in v.as_bytes().split(|b| *b == b',') {
            let t: &[u8] = {
                let mut t = t;
                while let [b' ' | b'\t', r @ ..] = t {
                    t = r;
                }
                while let [r @ .., b' ' | b'\t'] = t {
                    t = r;
                }
                t
            };
            if let Ok(n) = HeaderName::from_bytes(t) {
                out.push(n.as_str().to_owned());
            }
        }
    }
    out
}

fn target(name: &str, base_url: &str) -> Target {
    Target {
        name: name.into(),
        base_url: base_url.into(),
        ca_bundle: None,
        connect_timeout_ms: 1,
        response_timeout_ms: 1,
        idle_timeout_ms: 1,
        created_at: 0,
        updated_at: 0,
        client_cert: None,
    }
}

fn values(h: &HeaderMap, n: &str) -> Vec<Vec<u8>> {
    h.get_all(n).iter().map(|v| v.as_bytes().to_vec()).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mode = if flags & 1 != 0 {
        Mode::Forward
    } else {
        Mode::Gateway
    };
    let mut lines = rest.split(|b| *b == b'\n');
    let mut next = || lines.next().unwrap_or(b"");
    let target_line = next();
    let base_line = String::from_utf8_lossy(next()).into_owned();
    let recipe = String::from_utf8_lossy(next()).into_owned();
    let secret = next().to_vec();
    let key = String::from_utf8_lossy(next()).into_owned();
    let header_lines: Vec<&[u8]> = lines.take(32).collect();

    // The request as hyper hands it over.
    let Ok(uri) = http::Uri::try_from(target_line) else {
        return;
    };
    let mut headers = HeaderMap::new();
    let auth_name = match mode {
        Mode::Gateway => http::header::AUTHORIZATION,
        Mode::Forward => http::header::PROXY_AUTHORIZATION,
    };
    let basic = flags & 16 != 0;
    let mut sent_key = None;
    if flags & 8 != 0 {
        let v = if basic {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("user:{key}"))
            )
        } else {
            format!("Bearer {key}")
        };
        if let Ok(hv) = HeaderValue::from_str(&v) {
            headers.append(auth_name.clone(), hv);
            sent_key = Some(key.clone());
        }
    }
    for l in &header_lines {
        let Some(i) = l.iter().position(|b| *b == b':') else {
            continue;
        };
        let v = l[i + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(&l[..i]), HeaderValue::from_bytes(v)) {
            headers.append(n, v);
        }
    }

    // Authentication.
    let presented = presented_key(&headers, mode);
    if let Some(k) = &sent_key {
        let v = headers.get(&auth_name).unwrap();
        if v.to_str().is_ok() {
            let want = match (basic, mode) {
                // `Bearer ` and nothing: no credential at all.
                (false, _) if k.trim().is_empty() => None,
                (false, _) => Some(k.trim().to_owned()),
                (true, Mode::Forward) => Some(k.clone()),
                (true, Mode::Gateway) => Some(String::new()),
            };
            assert_eq!(presented, want, "key {k:?} basic={basic} {mode:?}");
        }
    }

    // The path for the upstream, as the gateway or forward proxy finds it.
    let base_default = BaseUrl::parse("https://api.example.com/v1", false).unwrap();
    let base = BaseUrl::parse(&base_line, true).unwrap_or(base_default);
    let path = uri.path();
    let rest = match mode {
        Mode::Gateway => {
            let Some((name, r)) = gateway_path(path) else {
                assert!(!path.starts_with("/p/"));
                return;
            };
            assert!(!name.contains('/') && r.starts_with('/'), "{path:?}");
            let whole = format!("/p/{name}{r}");
            assert!(
                whole == path || (r == "/" && format!("/p/{name}") == path),
                "{path:?} -> {name:?} {r:?}"
            );
            r.to_owned()
        }
        Mode::Forward => {
            let Some(host) = forward_host(&uri) else {
                assert!(uri.host().is_none());
                return;
            };
            assert_eq!(Egress::normalise(&host), host, "not idempotent");
            let own = match (uri.scheme_str(), uri.authority()) {
                (Some(s), Some(a)) if s == "http" || s == "https" => {
                    Some(target("own", &format!("{s}://{a}")))
                }
                _ => None,
            };
            let mut targets = vec![
                target("a", "https://api.example.com/v1"),
                target("b", &base.to_text()),
                target("c", "http://127.0.0.1:8080"),
                target("d", "https://[::1]:8443/x"),
                target("e", "https://bad url"),
            ];
            targets.extend(own.clone());
            let found = targets_for_host(&targets, &host);
            for t in &targets {
                let hit = t.base().is_ok_and(|b| Egress::normalise(&b.host) == host);
                assert_eq!(found.contains(&t.name), hit, "{} for {host:?}", t.name);
            }
            if let Some(own) = &own {
                if own.base().is_ok() {
                    assert!(
                        found.contains(&own.name),
                        "{uri} (host {host:?}) does not find its own target {:?}",
                        own.base()
                    );
                }
            }
            let Some(r) = path_under_base(path, &base.path) else {
                assert!(!base.path.is_empty());
                assert!(path != base.path && !path.starts_with(&format!("{}/", base.path)));
                return;
            };
            if base.path.is_empty() {
                assert_eq!(r, path);
            } else {
                assert!(r.starts_with('/'));
                assert!(
                    format!("{}{r}", base.path) == path || (r == "/" && path == base.path),
                    "{path:?} under {:?} -> {r:?}",
                    base.path
                );
            }
            r
        }
    };
    if let Some(h) = tunnel_host(&uri, &headers) {
        assert_eq!(Egress::normalise(&h), h);
    }
    if !path_is_clean(&rest) {
        return;
    }
    let decoded = percent_decode(&rest);
    for p in [rest.as_str(), decoded.as_str()] {
        let segs: Vec<&str> = p[1..].split('/').collect();
        for (i, s) in segs.iter().enumerate() {
            assert!(*s != "." && *s != "..", "clean {rest:?} has a dot segment");
            assert!(!s.is_empty() || i == segs.len() - 1, "clean {rest:?}");
        }
        assert!(!p.contains('\\'), "clean {rest:?} has a backslash");
    }
    assert_eq!(decoded.matches('/').count(), rest.matches('/').count());

    // The upstream request.
    let injection = match (flags >> 1) & 3 {
        0 => None,
        1 => Some(
            Injection::header(&recipe)
                .unwrap_or_else(|_| Injection::header("authorization: Bearer {}").unwrap()),
        ),
        2 => Some(Injection::basic(&recipe).unwrap_or_else(|_| Injection::basic("u").unwrap())),
        _ => {
            Some(Injection::query(&recipe).unwrap_or_else(|_| Injection::query("api_key").unwrap()))
        }
    };
    let secret_arg = injection.as_ref().map(|i| (i, secret.as_slice()));
    let listed = listed_oracle(&headers);
    assert!(
        connection_listed(&headers)
            .iter()
            .filter(|l| HeaderName::from_bytes(l.as_bytes()).is_ok())
            .all(|l| listed.contains(l)),
        "connection_listed names more than the header lists"
    );
    match upstream_request(&headers, uri.query(), &rest, &base, secret_arg) {
        Err(UpstreamError::Injection) => {
            let Some(Injection::Header { template, .. }) = &injection else {
                panic!("injection error without a header recipe");
            };
            let v = template.replace("{}", &String::from_utf8_lossy(&secret));
            assert!(HeaderValue::from_str(&v).is_err());
        }
        Err(UpstreamError::BadPath) => {}
        Ok((up, h)) => {
            let injected_header = match &injection {
                Some(Injection::Header { name, .. }) => Some(name.as_str()),
                Some(Injection::Basic { .. }) => Some("authorization"),
                _ => None,
            };
            for (k, _) in h.iter() {
                let n = k.as_str();
                assert!(!is_hop_by_hop(n), "hop-by-hop {n} forwarded");
                assert!(n != "proxy-authorization");
                if Some(n) != injected_header && n != "host" {
                    assert!(
                        !listed.iter().any(|l| l == n),
                        "{n} is listed in Connection"
                    );
                    assert!(n != "authorization", "client Authorization forwarded");
                }
            }
            assert_eq!(values(&h, "host"), vec![base.authority().into_bytes()]);
            // Everything else the client sent goes through unchanged.
            for k in headers.keys() {
                let n = k.as_str();
                let dropped = is_hop_by_hop(n)
                    || listed.iter().any(|l| l == n)
                    || matches!(n, "host" | "authorization" | "proxy-authorization");
                if !dropped && Some(n) != injected_header {
                    assert_eq!(values(&h, n), values(&headers, n), "{n} changed");
                }
            }
            match &injection {
                Some(Injection::Header { name, template }) => {
                    let want = template.replace("{}", &String::from_utf8_lossy(&secret));
                    assert_eq!(values(&h, name), vec![want.into_bytes()]);
                    assert!(h.get(name.as_str()).unwrap().is_sensitive());
                }
                Some(Injection::Basic { user }) => {
                    let mut raw = format!("{user}:").into_bytes();
                    raw.extend_from_slice(&secret);
                    let want = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(&raw)
                    );
                    assert_eq!(values(&h, "authorization"), vec![want.into_bytes()]);
                }
                _ => {}
            }
            let scheme = if base.https { "https" } else { "http" };
            assert_eq!(up.scheme_str(), Some(scheme));
            assert_eq!(
                up.authority().map(|a| a.as_str().to_owned()),
                Some(base.authority())
            );
            assert_eq!(up.path(), format!("{}{rest}", base.path), "{up}");
            let client: Vec<(String, String)> = query_pairs(uri.query()).collect();
            let out: Vec<(String, String)> = query_pairs(up.query()).collect();
            match &injection {
                Some(Injection::Query { param }) => {
                    let mine: Vec<&str> = up
                        .query()
                        .unwrap()
                        .split('&')
                        .filter_map(|p| p.split_once('='))
                        .filter(|(k, _)| percent_decode(k) == *param)
                        .map(|(_, v)| v)
                        .collect();
                    assert_eq!(mine, vec![url_encode(&secret).as_str()], "{up}");
                    assert_eq!(percent_decode(mine[0]), String::from_utf8_lossy(&secret));
                    let others: Vec<_> = client.into_iter().filter(|(k, _)| k != param).collect();
                    let out_others: Vec<_> = out.into_iter().filter(|(k, _)| k != param).collect();
                    assert_eq!(others, out_others);
                }
                _ => assert_eq!(client, out, "{up}"),
            }
        }
    }

    // The same headers as an upstream response on its way back.
    let mut resp = headers.clone();
    strip_hop_by_hop(&mut resp);
    for k in headers.keys() {
        let n = k.as_str();
        if is_hop_by_hop(n) || listed.iter().any(|l| l == n) {
            assert!(!resp.contains_key(n), "{n} kept in a response");
        } else {
            assert_eq!(values(&resp, n), values(&headers, n));
        }
    }
});
