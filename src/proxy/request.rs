//! The proxy listeners' request handling that needs no I/O, as pure
//! functions (the `proxy_request` fuzz target calls them on arbitrary
//! input): the presented proxy key, gateway paths (`/p/<proxy>/<path>`),
//! absolute-form hosts matched to targets, paths below a base path, path
//! hygiene, and the upstream request's URI and headers (hop-by-hop and
//! `Connection`-listed headers dropped, client credentials stripped, the
//! target credential injected).

use base64::Engine;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use super::model::{is_hop_by_hop, percent_decode, BaseUrl, Injection, Target};
use super::ssrf::Egress;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Gateway,
    Forward,
}

/// The proxy key presented, if any: `Authorization: Bearer` on the
/// gateway; `Proxy-Authorization` (Basic with the key as password, or
/// Bearer) on the forward proxy. `Some("")` for a credential of another
/// scheme (it then fails verification like a wrong key).
pub fn presented_key(headers: &HeaderMap, mode: Mode) -> Option<String> {
    let h = match mode {
        Mode::Gateway => headers.get(http::header::AUTHORIZATION),
        Mode::Forward => headers.get(http::header::PROXY_AUTHORIZATION),
    }?;
    let v = h.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_owned());
    }
    if mode == Mode::Forward && scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        return s.split_once(':').map(|(_, p)| p.to_owned());
    }
    Some(String::new())
}

/// A gateway path `/p/<proxy>/<path>`: the proxy name and the path for the
/// upstream (`/` when there is none). `None` when not under `/p/`.
pub fn gateway_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/p/")?;
    Some(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

/// The normalised host of an absolute-form request target (`None` for an
/// origin-form target, which the forward proxy refuses).
pub fn forward_host(uri: &http::Uri) -> Option<String> {
    uri.host().map(Egress::normalise)
}

/// The normalised host a request inside an intercepted tunnel names: its
/// absolute-form target's, else its `Host` header's. It must be the
/// tunnel's host.
pub fn tunnel_host(uri: &http::Uri, headers: &HeaderMap) -> Option<String> {
    uri.host()
        .map(str::to_owned)
        .or_else(|| {
            let h = headers.get(http::header::HOST)?.to_str().ok()?;
            let a: http::uri::Authority = h.parse().ok()?;
            Some(a.host().to_owned())
        })
        .map(|h| Egress::normalise(h.trim_matches(['[', ']'])))
}

/// The names of the targets whose base URL is on `host` (normalised), in
/// the order given. The base URL's host is normalised the same way, as the
/// egress allow-list's patterns are: `https://API.example.com.` and
/// `http://127.1` name the hosts `api.example.com` and `127.0.0.1`.
pub fn targets_for_host(targets: &[Target], host: &str) -> Vec<String> {
    targets
        .iter()
        .filter(|t| t.base().is_ok_and(|b| Egress::normalise(&b.host) == host))
        .map(|t| t.name.clone())
        .collect()
}

/// The part of a forward-proxy request path below the target's base path
/// (`""` or `/a/b`): the path itself when the base has none, `/` for the
/// base path itself. `None` when the path is outside the base path.
pub fn path_under_base(path: &str, base_path: &str) -> Option<String> {
    if base_path.is_empty() {
        return Some(path.to_owned());
    }
    match path.strip_prefix(base_path) {
        Some("") => Some("/".to_owned()),
        Some(r) if r.starts_with('/') => Some(r.to_owned()),
        _ => None,
    }
}

/// Refuses paths that could mean something else upstream after
/// normalisation (`..`, `.`, empty segments, encoded `/`, `\` or `.`),
/// so a rule's regex sees exactly what the upstream serves.
pub fn path_is_clean(path: &str) -> bool {
    if !path.starts_with('/') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%2e")
        || path.contains('\\')
    {
        return false;
    }
    let segs: Vec<&str> = path[1..].split('/').collect();
    let last = segs.len() - 1;
    segs.iter()
        .enumerate()
        .all(|(i, s)| *s != "." && *s != ".." && (!s.is_empty() || i == last))
}

/// The header names listed in the `Connection` headers, lowercased. Read
/// from the raw bytes, element by element: a value that also holds bytes
/// outside visible ASCII (obs-text, which hyper accepts) still drops the
/// headers it names.
pub fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|s| std::str::from_utf8(s).ok())
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

/// Drops the hop-by-hop headers (RFC 9110 §7.6.1) and those listed in
/// `Connection` (an upstream response on its way to the client).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    let drop_names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k.as_str()) || listed.iter().any(|l| l == k.as_str()))
        .cloned()
        .collect();
    for k in drop_names {
        headers.remove(k);
    }
}

/// Why the upstream request cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// The credential does not fit its header (answered 500).
    Injection,
    /// The base path, path and query do not make a URI (answered 400).
    BadPath,
}

/// The upstream request's URI and headers for a client request with
/// `headers` and `query` on `rest` (the path below the proxy), sent to
/// `base`, with the target credential `secret` injected:
///
/// - hop-by-hop headers, headers listed in `Connection`, `Host`, and the
///   client's credentials (`Authorization`, which carries the gateway's
///   proxy key, and `Proxy-Authorization`) are dropped; `Host` is the
///   base URL's authority;
/// - a client query parameter with the injected parameter's name is
///   dropped (the credential's value is the only one);
/// - the credential goes where its recipe says: a header from its
///   template, `Authorization: Basic`, or a query parameter (marked
///   sensitive when it is a header).
pub fn upstream_request(
    headers: &HeaderMap,
    query: Option<&str>,
    rest: &str,
    base: &BaseUrl,
    secret: Option<(&Injection, &[u8])>,
) -> Result<(http::Uri, HeaderMap), UpstreamError> {
    let mut query_out: Vec<String> = Vec::new();
    let injected_param = match secret {
        Some((Injection::Query { param }, _)) => Some(param.as_str()),
        _ => None,
    };
    if let Some(q) = query {
        for p in q.split('&').filter(|p| !p.is_empty()) {
            let k = p.split_once('=').map_or(p, |(k, _)| k);
            if injected_param.is_some_and(|ip| percent_decode(k) == ip) {
                continue;
            }
            query_out.push(p.to_owned());
        }
    }
    let mut headers_out = HeaderMap::with_capacity(headers.len() + 2);
    let listed = connection_listed(headers);
    for (k, v) in headers.iter() {
        let n = k.as_str();
        if is_hop_by_hop(n)
            || listed.iter().any(|l| l == n)
            || n == "host"
            || n == "authorization"
            || n == "proxy-authorization"
        {
            continue;
        }
        headers_out.append(k.clone(), v.clone());
    }
    if let Ok(h) = HeaderValue::from_str(&base.authority()) {
        headers_out.insert(http::header::HOST, h);
    }
    if let Some((inj, value)) = secret {
        match inj {
            Injection::Header { name, template } => {
                let text = String::from_utf8_lossy(value);
                let v = zeroize::Zeroizing::new(template.replace("{}", &text));
                let (Ok(n), Ok(mut hv)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&v),
                ) else {
                    return Err(UpstreamError::Injection);
                };
                hv.set_sensitive(true);
                headers_out.insert(n, hv);
            }
            Injection::Basic { user } => {
                let mut raw = zeroize::Zeroizing::new(format!("{user}:").into_bytes());
                raw.extend_from_slice(value);
                let enc = zeroize::Zeroizing::new(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(&*raw)
                ));
                if let Ok(mut hv) = HeaderValue::from_str(&enc) {
                    hv.set_sensitive(true);
                    headers_out.insert(http::header::AUTHORIZATION, hv);
                }
            }
            Injection::Query { param } => {
                query_out.push(format!("{param}={}", url_encode(value)));
            }
        }
    }
    let scheme = if base.https { "https" } else { "http" };
    let mut uri = format!("{scheme}://{}{}{}", base.authority(), base.path, rest);
    if !query_out.is_empty() {
        uri.push('?');
        uri.push_str(&query_out.join("&"));
    }
    let uri: http::Uri = uri.parse().map_err(|_| UpstreamError::BadPath)?;
    Ok((uri, headers_out))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(v: &[u8]) -> String {
    let mut s = String::with_capacity(v.len() * 3);
    for b in v {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            s.push(*b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert!(path_is_clean("/"));
        assert!(path_is_clean("/v1/items"));
        assert!(path_is_clean("/v1/items/"));
        assert!(!path_is_clean("/v1/../admin"));
        assert!(!path_is_clean("/v1/./x"));
        assert!(!path_is_clean("/v1//x"));
        assert!(!path_is_clean("/v1/%2e%2e/x"));
        assert!(!path_is_clean("/v1/a%2Fb"));
        assert!(!path_is_clean("v1"));
    }

    #[test]
    fn gateway_paths() {
        assert_eq!(gateway_path("/p/gh/v1/x"), Some(("gh", "/v1/x")));
        assert_eq!(gateway_path("/p/gh"), Some(("gh", "/")));
        assert_eq!(gateway_path("/q/gh/x"), None);
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

    /// Found by the `proxy_request` fuzz target: the request's host was
    /// normalised (trailing dot, numeric forms) but the base URL's was
    /// not, so `http://example.com./` never reached the target
    /// `http://example.com.`, nor `http://127.1/` the target `http://127.1`.
    #[test]
    fn targets_match_the_normalised_host() {
        let ts = [
            target("dot", "http://EXAMPLE.com."),
            target("short", "http://127.1:8080"),
            target("v6", "https://[0:0::1]"),
            target("other", "https://api.example.net"),
        ];
        for (uri, want) in [
            ("http://EXAMPLE.com./v1", "dot"),
            ("http://example.com/", "dot"),
            ("http://127.0.0.1:8080/x", "short"),
            ("http://0x7f000001:8080/x", "short"),
            ("http://[::1]/", "v6"),
        ] {
            let uri: http::Uri = uri.parse().unwrap();
            let host = forward_host(&uri).unwrap();
            assert_eq!(targets_for_host(&ts, &host), vec![want.to_owned()], "{uri}");
        }
    }

    /// Found by the `proxy_request` fuzz target: a `Connection` value with
    /// a byte outside visible ASCII was skipped whole, so the headers it
    /// named were forwarded upstream (and back to the client).
    #[test]
    fn connection_options_beside_obs_text_are_dropped() {
        let mut h = HeaderMap::new();
        h.append(
            http::header::CONNECTION,
            HeaderValue::from_bytes(b"\xff, X-Internal").unwrap(),
        );
        h.append("x-internal", HeaderValue::from_static("secret"));
        h.append("accept", HeaderValue::from_static("*/*"));
        assert!(connection_listed(&h).contains(&"x-internal".to_owned()));
        let base = BaseUrl::parse("https://api.example.com", false).unwrap();
        let (_, out) = upstream_request(&h, None, "/", &base, None).unwrap();
        assert!(!out.contains_key("x-internal"));
        assert!(out.contains_key("accept"));
        let mut resp = h.clone();
        strip_hop_by_hop(&mut resp);
        assert!(!resp.contains_key("x-internal"));
        assert!(resp.contains_key("accept"));
    }

    #[test]
    fn paths_under_a_base() {
        assert_eq!(path_under_base("/x", "").as_deref(), Some("/x"));
        assert_eq!(path_under_base("/v1", "/v1").as_deref(), Some("/"));
        assert_eq!(path_under_base("/v1/x", "/v1").as_deref(), Some("/x"));
        assert_eq!(path_under_base("/v10/x", "/v1"), None);
        assert_eq!(path_under_base("/x", "/v1"), None);
    }
}
