//! End-to-end tests of the proxy's TLS: interception of CONNECT tunnels to
//! configured hosts (leaf certificates minted by a CA whose key is in the
//! root device) and upstream client certificates (mTLS). The real keyseald
//! and keyseal binaries, `curl` and `openssl` as the clients, and local
//! HTTPS upstreams (own test CA from rcgen) that echo what they received.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream as StdStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{TestDaemon, PROXY_POLICY, ROOT_POLICY};
use common::proxy::{curl, free_port, issue, ok, start_upstream, Pki, Upstream};
use common::Backend;

// ---------------------------------------------------------------------------
// Helpers (shared fixtures in tests/common/proxy.rs)
// ---------------------------------------------------------------------------

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// CONNECT through the forward proxy, then a TLS handshake (trusting only
/// `ca_pem`) as `server_name`: the open tunnel.
struct Tunnel {
    sock: StdStream,
    tls: rustls::ClientConnection,
}

impl Tunnel {
    fn open(fwd: u16, authority: &str, key: &str, server_name: &str, ca_pem: &str) -> Tunnel {
        use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
        let mut s = StdStream::connect(("127.0.0.1", fwd)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Bearer {key}\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).unwrap(), 1, "proxy closed during CONNECT");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "CONNECT answer: {head}");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut tls = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut s).unwrap();
        }
        Tunnel { sock: s, tls }
    }

    fn certs(&self) -> Vec<Vec<u8>> {
        self.tls
            .peer_certificates()
            .unwrap()
            .iter()
            .map(|c| c.to_vec())
            .collect()
    }

    /// One GET on the kept-alive tunnel: (status, body).
    fn get(&mut self, host: &str, path: &str) -> (u16, String) {
        let mut st = rustls::Stream::new(&mut self.tls, &mut self.sock);
        write!(st, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        st.flush().unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(st.read(&mut b).unwrap(), 1, "tunnel closed");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .expect("content-length");
        let mut body = vec![0u8; len];
        st.read_exact(&mut body).unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

struct Env {
    d: TestDaemon,
    pki: Pki,
    up: Upstream,
    up2: Upstream,
    test_ca: PathBuf,
    fwd: u16,
    gw: u16,
}

fn setup(b: Backend) -> Env {
    let pki = Pki::new("keyseal proxy_tls test CA");
    let up = start_upstream("127.0.0.1", &pki, None);
    let up2 = start_upstream("127.0.0.2", &pki, None);
    let (fwd, gw) = (free_port(), free_port());
    let extra = format!(
        r#"
[proxy]
forward_listen = "127.0.0.1:{fwd}"
gateway_listen = "127.0.0.1:{gw}"
egress_allow = ["*"]
egress_allow_addresses = ["127.0.0.1", "127.0.0.2"]
intercept_hosts = ["localhost"]
"#
    );
    let d = TestDaemon::start_with(b, &format!("{ROOT_POLICY}\n{PROXY_POLICY}"), &extra);
    let test_ca = d.dir().join("upstream-ca.pem");
    std::fs::write(&test_ca, &pki.ca_pem).unwrap();
    Env {
        d,
        pki,
        up,
        up2,
        test_ca,
        fwd,
        gw,
    }
}

/// Target `vendor` (the echo upstream at https://localhost:PORT), the
/// credential `vendor-key` (`x-api-key: <secret>`), proxy `vendor` for
/// owner `svc/a` with reads under /v1 allowed.
fn configure(e: &Env, secret: &str) {
    let d = &e.d;
    let url = format!("https://localhost:{}", e.up.addr.port());
    ok(
        d,
        &[
            "target",
            "put",
            "vendor",
            "--url",
            &url,
            "--ca",
            e.test_ca.to_str().unwrap(),
        ],
        b"",
    );
    ok(
        d,
        &[
            "target",
            "cred",
            "put",
            "vendor-key",
            "--target",
            "vendor",
            "--header",
            "x-api-key: {}",
        ],
        secret.as_bytes(),
    );
    ok(
        d,
        &[
            "proxy",
            "put",
            "vendor",
            "--target",
            "vendor",
            "--credential",
            "vendor-key",
            "--key-owner",
            "svc/a",
        ],
        b"",
    );
    ok(
        d,
        &[
            "rule",
            "add",
            "vendor",
            "reads",
            "--priority",
            "10",
            "--allow",
            "--method",
            "GET",
            "--path",
            "/v1/.*",
        ],
        b"",
    );
}

fn proxy_ca(e: &Env) -> (String, PathBuf) {
    let out = ok(&e.d, &["proxy", "ca"], b"");
    let pem = String::from_utf8(out.stdout).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let path = e.d.dir().join("keyseal-proxy-ca.pem");
    std::fs::write(&path, &pem).unwrap();
    (pem, path)
}

/// The interception flow every backend must pass; returns the CA PEM path.
fn intercept_flow(e: &Env, secret: &str, key: &str) -> PathBuf {
    let (ca_pem, ca_path) = proxy_ca(e);
    // Fetching it again gives the same CA (created once, persisted).
    assert_eq!(proxy_ca(e).0, ca_pem);
    let fwd = format!("http://127.0.0.1:{}", e.fwd);
    let user = format!("svc:{key}");
    let url = format!("https://localhost:{}/v1/items?q=1", e.up.addr.port());

    // HTTPS_PROXY user trusting the keyseal CA: the upstream receives the
    // injected credential and none of the client's credentials. (HTTP/1.1
    // inside the tunnel here; curl would pick h2 by ALPN, tested below.)
    let r = curl(&[
        "--http1.1",
        "-x",
        &fwd,
        "-U",
        &user,
        "--cacert",
        ca_path.to_str().unwrap(),
        "-H",
        "Authorization: Bearer client-own-token",
        "-H",
        "x-api-key: client-own-key",
        &url,
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["headers"]["x-api-key"], secret);
    assert!(j["headers"].get("authorization").is_none(), "{j}");
    assert!(j["headers"].get("proxy-authorization").is_none(), "{j}");
    assert_eq!(j["path"], "/v1/items");
    assert_eq!(j["query"], "q=1");
    assert_eq!(
        j["headers"]["host"],
        format!("localhost:{}", e.up.addr.port())
    );
    assert_eq!(
        r.header("keyseal-decision").as_deref(),
        Some("allow; rule=reads")
    );
    assert!(!r.headers.contains("HTTP/2"), "{}", r.headers);

    // The same over HTTP/2 inside the tunnel (ALPN h2): injected and
    // stripped alike; upstream it is HTTP/1.1 with the target's Host.
    let r = curl(&[
        "--http2",
        "-x",
        &fwd,
        "-U",
        &user,
        "--cacert",
        ca_path.to_str().unwrap(),
        "-H",
        "Authorization: Bearer client-own-token",
        &url,
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.contains("HTTP/2 200"), "{}", r.headers);
    let j = r.json();
    assert_eq!(j["headers"]["x-api-key"], secret);
    assert!(j["headers"].get("authorization").is_none(), "{j}");
    assert_eq!(j["path"], "/v1/items");
    assert_eq!(
        j["headers"]["host"],
        format!("localhost:{}", e.up.addr.port())
    );
    assert_eq!(
        r.header("keyseal-decision").as_deref(),
        Some("allow; rule=reads")
    );

    // Rules apply inside the tunnel: not a GET under /v1 -> default deny.
    let r = curl(&[
        "-x",
        &fwd,
        "-U",
        &user,
        "--cacert",
        ca_path.to_str().unwrap(),
        "-X",
        "DELETE",
        &url,
    ]);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        r.header("keyseal-decision").as_deref(),
        Some("deny; rule=default")
    );

    // A client that trusts only the upstream's own CA fails: the proxy,
    // not the upstream, terminated TLS.
    let r = curl(&[
        "-x",
        &fwd,
        "-U",
        &user,
        "--cacert",
        e.test_ca.to_str().unwrap(),
        &url,
    ]);
    assert_eq!(r.status, 0, "{}", r.body);
    assert_eq!(
        r.exit, 60,
        "curl must fail certificate verification: {}",
        r.body
    );

    // A bad key: the CONNECT is refused before any TLS. (A key-less
    // loopback caller is identified by its uid through sock_diag and then
    // authorised like a Unix-socket peer: see tests/proxy_gateway.rs.)
    let r = curl(&[
        "-x",
        &fwd,
        "-U",
        "svc:ks_live_bad",
        "--cacert",
        ca_path.to_str().unwrap(),
        &url,
    ]);
    assert!(r.body.contains("407"), "{}", r.body);

    // The served leaf: verifies against the CA, names the host, lives 7 days.
    let authority = format!("localhost:{}", e.up.addr.port());
    let chain = Tunnel::open(e.fwd, &authority, key, "localhost", &ca_pem).certs();
    let leaf_path = e.d.dir().join("leaf.pem");
    std::fs::write(&leaf_path, pem_of(&chain[0])).unwrap();
    let v = openssl(&[
        "verify",
        "-CAfile",
        ca_path.to_str().unwrap(),
        "-purpose",
        "sslserver",
        leaf_path.to_str().unwrap(),
    ]);
    assert!(v.trim().ends_with("OK"), "{v}");
    let text = openssl(&[
        "x509",
        "-in",
        leaf_path.to_str().unwrap(),
        "-noout",
        "-text",
    ]);
    assert!(text.contains("DNS:localhost"), "{text}");
    let days = |which: &str| {
        let out = openssl(&["x509", "-in", leaf_path.to_str().unwrap(), "-noout", which]);
        out.trim().to_owned()
    };
    // Valid now, not valid in 8 days, valid in 6.
    assert!(openssl(&[
        "x509",
        "-in",
        leaf_path.to_str().unwrap(),
        "-noout",
        "-checkend",
        &(6 * 86_400).to_string()
    ])
    .contains("will not expire"));
    let out = Command::new("openssl")
        .args([
            "x509",
            "-in",
            leaf_path.to_str().unwrap(),
            "-noout",
            "-checkend",
            &(8 * 86_400).to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "leaf must expire within 8 days ({})",
        days("-enddate")
    );
    // The CA: self-signed, a CA, valid for years.
    let ca_text = openssl(&["x509", "-in", ca_path.to_str().unwrap(), "-noout", "-text"]);
    assert!(ca_text.contains("CA:TRUE"), "{ca_text}");
    assert!(openssl(&[
        "x509",
        "-in",
        ca_path.to_str().unwrap(),
        "-noout",
        "-checkend",
        &(9 * 365 * 86_400).to_string()
    ])
    .contains("will not expire"));

    // A host that is not intercepted is still a plain tunnel: end-to-end
    // TLS with the upstream's own certificate, nothing injected.
    let r = curl(&[
        "-x",
        &fwd,
        "-U",
        &user,
        "--cacert",
        e.test_ca.to_str().unwrap(),
        &format!("https://127.0.0.2:{}/v1/tunnelled", e.up2.addr.port()),
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["path"], "/v1/tunnelled");
    assert!(j["headers"].get("x-api-key").is_none());

    // The request log has the inner requests under the proxy.
    let out = ok(&e.d, &["proxy", "requests", "vendor", "--json"], b"");
    let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = log.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|x| x["path"] == "/v1/items" && x["status"] == 200 && x["decision"] == "allow"),
        "{log}"
    );
    assert!(
        entries
            .iter()
            .any(|x| x["method"] == "DELETE" && x["status"] == 403),
        "{log}"
    );

    // Figures for docs/proxy.md (printed, not asserted): leaf mint time
    // (one device signature) and a cached-leaf request through curl.
    let t0 = std::time::Instant::now();
    let r = curl(&[
        "-x",
        &fwd,
        "-U",
        &user,
        "--cacert",
        ca_path.to_str().unwrap(),
        &url,
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    let text = e.d.log_text();
    let mints: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("proxy leaf certificate minted"))
        .collect();
    assert_eq!(
        mints.len(),
        1,
        "one leaf per host, then the cache: {mints:?}"
    );
    eprintln!(
        "FIGURE mint: {} | curl via cached leaf: {} ms",
        mints[0],
        t0.elapsed().as_millis()
    );
    assert!(!text.contains(secret), "the credential leaked into the log");
    assert!(!text.contains(key), "the proxy key leaked into the log");
    ca_path
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn intercept_softhsm_ca_key_in_device() {
    let mut e = setup(Backend::SoftHsm);
    let secret = "INTERCEPT-secret-51ab";
    configure(&e, secret);
    let key = issue(&e.d, "svc/a", None).1;
    let ca_path = intercept_flow(&e, secret, &key);

    // The CA's public key is the one of the signing key on the token.
    let root = e.d.device.open_root();
    let device_spki = root
        .public_key_spki(&keyseal::root::SigningKeyRef {
            alg: keyseal::root::SignAlg::EcdsaP256Sha256,
            handle: keyseal::proxy::tls::CA_KEY_LABEL.as_bytes().to_vec(),
        })
        .expect("the CA key is on the token under its label");
    let ca_pub = openssl(&[
        "x509",
        "-in",
        ca_path.to_str().unwrap(),
        "-noout",
        "-pubkey",
    ]);
    let spki_path = e.d.dir().join("ca-pub.der");
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-out"])
        .arg(&spki_path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(ca_pub.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read(&spki_path).unwrap(), device_spki);

    // The CA survives a restart (same certificate, same device key), and
    // leaves minted after the restart still verify against it.
    let before = std::fs::read_to_string(&ca_path).unwrap();
    e.d.stop();
    e.d.spawn();
    assert_eq!(proxy_ca(&e).0, before);
    let r = curl(&[
        "-x",
        &format!("http://127.0.0.1:{}", e.fwd),
        "-U",
        &format!("svc:{key}"),
        "--cacert",
        ca_path.to_str().unwrap(),
        &format!("https://localhost:{}/v1/again", e.up.addr.port()),
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["headers"]["x-api-key"], secret);
}

#[test]
fn intercept_swtpm() {
    let e = setup(Backend::Tpm);
    let secret = "INTERCEPT-tpm-secret-77";
    configure(&e, secret);
    let key = issue(&e.d, "svc/a", None).1;
    intercept_flow(&e, secret, &key);
}

#[test]
fn intercept_revoked_key_and_other_host_in_tunnel() {
    let e = setup(Backend::SoftHsm);
    configure(&e, "REVOKE-secret-9");
    let out = ok(
        &e.d,
        &["apikey", "issue", "--owner", "svc/a", "--json"],
        b"",
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let meta: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stderr).trim()).unwrap();
    let id = meta["id"].as_str().unwrap().to_owned();
    let (ca_pem, ca_path) = proxy_ca(&e);
    let fwd = format!("http://127.0.0.1:{}", e.fwd);
    let url = format!("https://localhost:{}/v1/x", e.up.addr.port());
    // A Host header naming another host inside the tunnel is refused.
    let r = curl(&[
        "-x",
        &fwd,
        "-U",
        &format!("svc:{key}"),
        "--cacert",
        ca_path.to_str().unwrap(),
        "-H",
        "Host: evil.example",
        &url,
    ]);
    assert_eq!(r.status, 421, "{}", r.body);

    // One kept-alive tunnel: the key is verified again for every inner
    // request, so a revocation applies to the next one.
    let authority = format!("localhost:{}", e.up.addr.port());
    let mut t = Tunnel::open(e.fwd, &authority, &key, "localhost", &ca_pem);
    let (status, body) = t.get(&authority, "/v1/first");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("REVOKE-secret-9"), "{body}");
    ok(&e.d, &["apikey", "revoke", &id], b"");
    let (status, body) = t.get(&authority, "/v1/second");
    assert_eq!(status, 407, "{body}");
    assert!(!body.contains("REVOKE-secret-9"));
    // And a new CONNECT with it is refused.
    let r = curl(&[
        "-x",
        &fwd,
        "-U",
        &format!("svc:{key}"),
        "--cacert",
        ca_path.to_str().unwrap(),
        &url,
    ]);
    assert!(r.body.contains("407"), "{}", r.body);
    let _ = (&e.pki, e.gw, &e.up2);
}

#[test]
fn upstream_mtls_client_certificate() {
    let e = setup(Backend::SoftHsm);
    let clients = Pki::new("keyseal proxy_tls client CA");
    let up = start_upstream("127.0.0.1", &e.pki, Some(&clients));
    let (cert, key) = clients.leaf(&["keyseal-client"], true);
    let (_, other_key) = clients.leaf(&["other"], true);
    let dir = e.d.dir();
    let cert_path = dir.join("client.pem");
    let key_path = dir.join("client.key");
    let other_key_path = dir.join("other.key");
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    std::fs::write(&other_key_path, &other_key).unwrap();
    let url = format!("https://localhost:{}", up.addr.port());
    let ca = e.test_ca.to_str().unwrap();
    let d = &e.d;
    ok(d, &["target", "put", "m", "--url", &url, "--ca", ca], b"");
    ok(
        d,
        &[
            "proxy",
            "put",
            "m",
            "--target",
            "m",
            "--default",
            "allow",
            "--key-owner",
            "svc/m",
        ],
        b"",
    );
    let key_m = issue(d, "svc/m", None).1;
    let bearer = format!("Authorization: Bearer {key_m}");
    let gw = format!("http://127.0.0.1:{}/p/m/v1/who", e.gw);

    // Without a client certificate the upstream refuses the handshake.
    let r = curl(&["-H", &bearer, &gw]);
    assert_eq!(r.status, 502, "{}", r.body);

    // A key that does not match the certificate is refused, nothing changes.
    let out = d.run(
        &[
            "target",
            "put",
            "m",
            "--url",
            &url,
            "--ca",
            ca,
            "--client-cert",
            cert_path.to_str().unwrap(),
            "--client-key-file",
            other_key_path.to_str().unwrap(),
        ],
        b"",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("does not match"), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");
    // A certificate without its key is a usage error.
    let out = d.run(
        &[
            "target",
            "put",
            "m",
            "--url",
            &url,
            "--client-cert",
            cert_path.to_str().unwrap(),
        ],
        b"",
    );
    assert!(!out.status.success());

    // With the certificate and its key: accepted.
    ok(
        d,
        &[
            "target",
            "put",
            "m",
            "--url",
            &url,
            "--ca",
            ca,
            "--client-cert",
            cert_path.to_str().unwrap(),
            "--client-key-file",
            key_path.to_str().unwrap(),
        ],
        b"",
    );
    let r = curl(&["-H", &bearer, &gw]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["path"], "/v1/who");

    // The key is never returned: listings show that a certificate is set.
    let out = ok(d, &["target", "ls", "--json"], b"");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let m = v
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "m")
        .unwrap();
    assert_eq!(m["client_cert"], true);
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!listing.contains(&key_body[..40]));
    let log = d.log_text();
    assert!(
        !log.contains(&key_body[..40]),
        "the client key leaked into the log"
    );

    // Intercepted tunnels to the host use the target's TLS settings too
    // (the forward proxy picks target `m` by host).
    let (_, ca_path) = proxy_ca(&e);
    let r = curl(&[
        "-x",
        &format!("http://127.0.0.1:{}", e.fwd),
        "-U",
        &format!("svc:{key_m}"),
        "--cacert",
        ca_path.to_str().unwrap(),
        &format!("https://localhost:{}/v1/via-tunnel", up.addr.port()),
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["path"], "/v1/via-tunnel");

    // Putting the target again without the certificate drops it (and the
    // sealed key): the upstream refuses again.
    ok(d, &["target", "put", "m", "--url", &url, "--ca", ca], b"");
    let r = curl(&["-H", &bearer, &gw]);
    assert_eq!(r.status, 502, "{}", r.body);
}
