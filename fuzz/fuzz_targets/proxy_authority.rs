//! The proxy's CONNECT authority and egress host handling:
//! `split_host_port`, `parse_numeric_host`, `Egress::normalise`,
//! `Egress::host_allowed` and `refused_reason` never panic on any input;
//! a split host is non-empty and free of `/`, `@` and spaces; normalising
//! is idempotent (the allow-list and the connect see the same host); a
//! host whose normal form is an address reads as that address numerically.
#![no_main]

use std::net::IpAddr;

use keyseal::proxy::ssrf::{parse_numeric_host, refused_reason, split_host_port, Egress};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s: &str = &s;
    let egress = Egress {
        allow: vec![
            "*.example.com".into(),
            "api.test:443".into(),
            "10.0.0.1".into(),
            "[::1]:8443".into(),
        ],
        allow_addresses: Vec::new(),
    };
    let _ = parse_numeric_host(s);
    let Some((host, port)) = split_host_port(s) else {
        return;
    };
    assert!(
        !host.is_empty() && !host.contains(['/', '@', ' ']),
        "{host:?}"
    );
    let n = Egress::normalise(&host);
    assert_eq!(
        Egress::normalise(&n),
        n,
        "normalise is not idempotent for {host:?}"
    );
    if let Ok(ip) = n.parse::<IpAddr>() {
        assert_eq!(parse_numeric_host(&host), Some(ip), "{host:?}");
        let _ = refused_reason(ip);
    }
    let _ = egress.host_allowed(&n, port);
});
