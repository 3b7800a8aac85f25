//! Egress guards for CONNECT tunnels: the host allow-list, numeric host
//! normalisation (`0177.0.0.1`, `0x7f.1`, `2130706433` are all 127.0.0.1,
//! as `inet_aton` reads them) and the refusal of internal addresses after
//! resolution. The caller connects to the address checked here, never
//! resolves again (no DNS rebinding between check and connect).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::apikeys::Cidr;

/// Egress settings (`[proxy]` `egress_allow`, `egress_allow_addresses`).
#[derive(Debug, Clone, Default)]
pub struct Egress {
    /// Host patterns: `api.example.com`, `*.example.com` (subdomains only),
    /// `*` (any host; the address guard still applies). Optional `:port`.
    pub allow: Vec<String>,
    /// Internal addresses explicitly allowed despite the guard.
    pub allow_addresses: Vec<Cidr>,
}

/// Reads a host the way `inet_aton` would when it is numeric: 1 to 4 parts,
/// each decimal, octal (leading `0`) or hex (`0x`); the last part fills the
/// remaining bytes. Also bracketed or bare IPv6. `None`: a name.
pub fn parse_numeric_host(host: &str) -> Option<IpAddr> {
    let h = host.trim_end_matches('.');
    let inner = h.trim_start_matches('[').trim_end_matches(']');
    if let Ok(v6) = inner.parse::<Ipv6Addr>() {
        return Some(IpAddr::V6(v6));
    }
    let parts: Vec<&str> = h.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let (digits, radix) = if let Some(x) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X"))
        {
            (x, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        if p.is_empty() {
            return None;
        }
        let n = if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, radix).ok()?
        };
        nums.push(n);
    }
    let last = *nums.last()?;
    let head = &nums[..nums.len() - 1];
    if head.iter().any(|n| *n > 255) {
        return None;
    }
    let rest_bits = 8 * (4 - head.len() as u32);
    if rest_bits < 64 && last >= (1u64 << rest_bits) {
        return None;
    }
    let mut v: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        v |= n << (24 - 8 * i as u32);
    }
    v |= last;
    Some(IpAddr::V4(Ipv4Addr::from(v as u32)))
}

/// Why an address is refused, or `None` when it is a public address.
pub fn refused_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => v4_reason(a),
        IpAddr::V6(a) => {
            if a == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                return Some("cloud metadata");
            }
            if a.to_ipv4_mapped().is_some() {
                return Some("IPv4-mapped IPv6");
            }
            let s = a.segments();
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_multicast() {
                Some("multicast")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
                Some("IPv4-compatible IPv6")
            } else if s[0] == 0x64 && s[1] == 0xff9b {
                Some("NAT64")
            } else if s[0] == 0x2002 {
                Some("6to4")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else {
                None
            }
        }
    }
}

fn v4_reason(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    if a == Ipv4Addr::new(169, 254, 169, 254) {
        Some("cloud metadata")
    } else if o[0] == 127 {
        Some("loopback")
    } else if o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if a.is_private() {
        Some("private")
    } else if a.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("CGNAT (100.64.0.0/10)")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else if (o[0] == 198 && (o[1] & 0xfe) == 18)
        || (o[0] == 192 && o[1] == 0 && o[2] == 2)
        || (o[0] == 198 && o[1] == 51 && o[2] == 100)
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)
    {
        Some("benchmarking or documentation")
    } else {
        None
    }
}

/// A refused egress.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("host {0} is not on the egress allow-list")]
    NotAllowed(String),
    #[error("{host} resolves to {ip}, a {reason} address; refused")]
    Internal {
        host: String,
        ip: IpAddr,
        reason: &'static str,
    },
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("bad CONNECT target {0:?}: expected host:port")]
    BadTarget(String),
}

impl Egress {
    /// The normalised host (numeric forms turned into their address).
    pub fn normalise(host: &str) -> String {
        match parse_numeric_host(host) {
            Some(IpAddr::V6(a)) => a.to_string(),
            Some(ip) => ip.to_string(),
            None => host.trim_end_matches('.').to_ascii_lowercase(),
        }
    }

    /// Whether the (normalised) host and port are on the allow-list.
    pub fn host_allowed(&self, host: &str, port: u16) -> bool {
        self.allow.iter().any(|pat| {
            let (hp, pp) = match pat.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, p.parse::<u16>().ok()),
                _ => (pat.as_str(), None),
            };
            if pp.is_some_and(|p| p != port) {
                return false;
            }
            let hp = Egress::normalise(hp.trim_start_matches('[').trim_end_matches(']'));
            if hp == "*" {
                true
            } else if let Some(suffix) = hp.strip_prefix("*.") {
                host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}"))
            } else {
                hp == host
            }
        })
    }

    fn address_allowed(&self, ip: IpAddr) -> Result<(), &'static str> {
        match refused_reason(ip) {
            None => Ok(()),
            Some(reason) => {
                if self.allow_addresses.iter().any(|c| c.contains(ip)) {
                    Ok(())
                } else {
                    Err(reason)
                }
            }
        }
    }

    /// Checks `authority` (`host:port`) for a tunnel and resolves it; every
    /// answer must pass the address guard. Returns the addresses to connect
    /// to (connect to these, never resolve again).
    pub async fn resolve(&self, authority: &str) -> Result<Vec<SocketAddr>, EgressError> {
        let (host, port) = split_host_port(authority)
            .ok_or_else(|| EgressError::BadTarget(authority.to_owned()))?;
        let host = Egress::normalise(&host);
        if !self.host_allowed(&host, port) {
            return Err(EgressError::NotAllowed(host));
        }
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|_| EgressError::Resolve(host.clone()))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(EgressError::Resolve(host));
        }
        for a in &addrs {
            self.address_allowed(a.ip())
                .map_err(|reason| EgressError::Internal {
                    host: host.clone(),
                    ip: a.ip(),
                    reason,
                })?;
        }
        Ok(addrs)
    }
}

/// Splits `host:port` (`[v6]:port` too). The port is required.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (h, p) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        (h, after.strip_prefix(':')?)
    } else {
        s.rsplit_once(':')?
    };
    if h.is_empty() || h.contains(['/', '@', ' ']) {
        return None;
    }
    Some((h.to_owned(), p.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Option<IpAddr> {
        parse_numeric_host(s)
    }

    #[test]
    fn numeric_forms() {
        let lo = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(v4("127.0.0.1"), lo);
        assert_eq!(v4("0177.0.0.1"), lo);
        assert_eq!(v4("0x7f.1"), lo);
        assert_eq!(v4("2130706433"), lo);
        assert_eq!(v4("0x7f000001"), lo);
        assert_eq!(v4("127.1"), lo);
        assert_eq!(v4("127.0.0.1."), lo);
        assert_eq!(v4("example.com"), None);
        assert_eq!(v4("1.2.3.4.5"), None);
        assert_eq!(v4("256.1.1.1"), None);
        assert_eq!(v4("08.1.1.1"), None);
        assert_eq!(v4("[::1]"), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn refusals() {
        for s in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "100.64.0.1",
            "224.0.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "ff02::1",
        ] {
            let ip: IpAddr = s.parse().unwrap();
            assert!(refused_reason(ip).is_some(), "{s} must be refused");
        }
        for s in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "100.128.0.1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(refused_reason(ip), None, "{s} is public");
        }
    }

    #[test]
    fn allow_list() {
        let e = Egress {
            allow: vec!["api.example.com".into(), "*.vendor.io:443".into()],
            allow_addresses: vec![],
        };
        assert!(e.host_allowed("api.example.com", 8443));
        assert!(e.host_allowed("a.vendor.io", 443));
        assert!(!e.host_allowed("a.vendor.io", 80));
        assert!(!e.host_allowed("vendor.io", 443));
        assert!(!e.host_allowed("evilvendor.io", 443));
        assert_eq!(split_host_port("[::1]:443"), Some(("::1".into(), 443)));
        assert_eq!(split_host_port("a:b"), None);
    }

    #[tokio::test]
    async fn resolve_guards() {
        let e = Egress {
            allow: vec!["*".into()],
            allow_addresses: vec!["127.0.0.2".parse().unwrap()],
        };
        for t in [
            "127.0.0.1:443",
            "0x7f.1:443",
            "0177.0.0.1:443",
            "2130706433:443",
            "169.254.169.254:80",
            "10.0.0.1:443",
            "[::1]:443",
            "[::ffff:127.0.0.1]:443",
            "localhost:443",
        ] {
            assert!(
                matches!(e.resolve(t).await, Err(EgressError::Internal { .. })),
                "{t} must be refused"
            );
        }
        assert_eq!(
            e.resolve("127.0.0.2:9").await.unwrap(),
            vec!["127.0.0.2:9".parse().unwrap()]
        );
    }
}
