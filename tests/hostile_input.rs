//! Hostile input (issue 7, "bad input"): one table of hand-encoded gRPC
//! requests sent over the real Unix socket of a real keyseald (SoftHSM2
//! root) with a raw HTTP/2 client (hyper), so the bytes on the wire are
//! exactly the row's: huge names, NUL and control bytes, invalid UTF-8 in
//! string fields, negative and huge versions, 10,000-deep nesting,
//! truncated varints and lengths, broken gRPC framing, an empty body and
//! messages over the size limit.
//!
//! For every row: the answer has the expected gRPC status (what tonic and
//! keyseald really return, see the table), keyseald stays up, a fresh
//! client is served afterwards, nothing changed (secrets, versions and
//! their states, signing keys, API keys), the audit log gained no
//! successful write, a request refused by a handler has its refusal
//! audited, no audit event or log line carries the 1 MiB input, and
//! keyseald logged no panic.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::daemon::{audit_events, TestDaemon, ROOT_POLICY};
use common::proxy::issue;
use common::Backend;
use http_body_util::{BodyExt, Full};
use keyseal::api::pb;
use keyseal::api::pb::api_keys_client::ApiKeysClient;
use keyseal::client::Client;
use tonic::Code;

// ---------------------------------------------------------------------------
// Hand encoding
// ---------------------------------------------------------------------------

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// A length-delimited field (wire type 2).
fn ld(field: u32, data: &[u8]) -> Vec<u8> {
    let mut out = varint(((field as u64) << 3) | 2);
    out.extend(varint(data.len() as u64));
    out.extend_from_slice(data);
    out
}

/// A varint field (wire type 0).
fn vf(field: u32, v: u64) -> Vec<u8> {
    let mut out = varint((field as u64) << 3);
    out.extend(varint(v));
    out
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// `depth` nested start-groups of unknown field 15, closed again.
fn nested_groups(depth: usize) -> Vec<u8> {
    let mut out = vec![0x7b; depth]; // field 15, wire type 3 (start group)
    out.extend(vec![0x7c; depth]); // field 15, wire type 4 (end group)
    out
}

/// `depth` length-delimited unknown fields (field 15), each holding the next.
fn nested_ld(depth: usize) -> Vec<u8> {
    let mut inner = Vec::new();
    for _ in 0..depth {
        inner = ld(15, &inner);
    }
    inner
}

/// A gRPC message frame: uncompressed flag, big-endian length, message.
fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend((msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

// ---------------------------------------------------------------------------
// A raw gRPC call over HTTP/2 on the Unix socket
// ---------------------------------------------------------------------------

struct Answer {
    code: Code,
    message: String,
    /// The response message (framed) when the call succeeded.
    body: Bytes,
}

async fn raw_call(socket: &Path, path: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Answer {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "{path}: HTTP status");
    let head = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = collected.to_bytes();
    drop(send);
    conn.abort();
    // Trailers-only answers carry the status in the headers.
    let get = |name: &str| {
        trailers
            .get(name)
            .or_else(|| head.get(name))
            .map(|v| v.to_str().unwrap_or("").to_owned())
    };
    let code = get("grpc-status")
        .and_then(|s| s.parse::<i32>().ok())
        .map(Code::from_i32)
        .unwrap_or_else(|| panic!("{path}: no grpc-status"));
    Answer {
        code,
        message: get("grpc-message").unwrap_or_default(),
        body,
    }
}

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

const PUT: &str = "/keyseal.v1.Secrets/Put";
const GET: &str = "/keyseal.v1.Secrets/Get";
const DELETE: &str = "/keyseal.v1.Secrets/Delete";
const HISTORY: &str = "/keyseal.v1.Secrets/History";
const SIGN: &str = "/keyseal.v1.Keys/Sign";
const KEY_ENABLE: &str = "/keyseal.v1.Keys/EnableVersion";
const KEY_CREATE: &str = "/keyseal.v1.Keys/Create";
const AK_VERIFY: &str = "/keyseal.v1.ApiKeys/Verify";
const AK_ISSUE: &str = "/keyseal.v1.ApiKeys/Issue";
const STATUS: &str = "/keyseal.v1.System/Status";

/// 1 MiB of a name character.
fn huge_name() -> Vec<u8> {
    let mut n = b"app/".to_vec();
    n.resize(1 << 20, b'a');
    n
}

struct Row {
    what: &'static str,
    path: &'static str,
    /// The whole HTTP/2 request body (gRPC framing included).
    body: Vec<u8>,
    headers: &'static [(&'static str, &'static str)],
    code: Code,
    /// The audit op of the handler when the request reaches one (then its
    /// refusal must be in the audit log); None when refused before.
    audited_as: Option<&'static str>,
}

fn row(what: &'static str, path: &'static str, msg: Vec<u8>, code: Code) -> Row {
    Row {
        what,
        path,
        body: frame(&msg),
        headers: &[],
        code,
        audited_as: None,
    }
}

impl Row {
    fn audited(mut self, op: &'static str) -> Row {
        self.audited_as = Some(op);
        self
    }
    fn raw(mut self, body: Vec<u8>) -> Row {
        self.body = body;
        self
    }
    fn headers(mut self, h: &'static [(&'static str, &'static str)]) -> Row {
        self.headers = h;
        self
    }
}

fn rows() -> Vec<Row> {
    let name_x = ld(1, b"app/x");
    let huge = huge_name();
    let minus_one = u64::MAX; // -1 as an int64 on the wire: the same 10-byte varint
    vec![
        // --- huge names ---
        row(
            "Put: 1 MiB name",
            PUT,
            cat(&[ld(1, &huge), ld(2, b"v")]),
            Code::InvalidArgument,
        )
        .audited("secret.put"),
        row("Get: 1 MiB name", GET, ld(1, &huge), Code::InvalidArgument).audited("secret.get"),
        row(
            "History: 1 MiB name",
            HISTORY,
            ld(1, &huge),
            Code::InvalidArgument,
        )
        .audited("secret.history"),
        row(
            "Sign: 1 MiB key name",
            SIGN,
            cat(&[ld(1, &huge), ld(2, b"m")]),
            Code::InvalidArgument,
        )
        .audited("key.sign"),
        row(
            "Keys.Create: 1 MiB key name",
            KEY_CREATE,
            cat(&[ld(1, &huge), ld(2, b"ecdsa-p256")]),
            Code::InvalidArgument,
        )
        .audited("key.create"),
        row(
            "ApiKeys.Issue: 1 MiB owner",
            AK_ISSUE,
            ld(1, &huge),
            Code::InvalidArgument,
        )
        .audited("apikey.issue"),
        // A 1 MiB "key" is simply not a valid key: answered like any other.
        row(
            "ApiKeys.Verify: 1 MiB key",
            AK_VERIFY,
            ld(1, &huge),
            Code::Ok,
        )
        .audited("apikey.verify"),
        row(
            "Put: 1 MiB label key",
            PUT,
            cat(&[
                name_x.clone(),
                ld(2, b"v"),
                ld(4, &cat(&[ld(1, &huge), ld(2, b"x")])),
                vf(5, 1),
            ]),
            Code::InvalidArgument,
        )
        .audited("secret.put"),
        // --- NUL and control bytes ---
        row(
            "Put: NUL in name",
            PUT,
            cat(&[ld(1, b"app/a\0b"), ld(2, b"v")]),
            Code::InvalidArgument,
        )
        .audited("secret.put"),
        row(
            "Put: ESC sequence in name",
            PUT,
            cat(&[ld(1, b"app/\x1b[31mred"), ld(2, b"v")]),
            Code::InvalidArgument,
        )
        .audited("secret.put"),
        row(
            "Put: newline in name",
            PUT,
            cat(&[ld(1, b"app/x\nforged log line"), ld(2, b"v")]),
            Code::InvalidArgument,
        )
        .audited("secret.put"),
        row(
            "Put: DEL and CR in name",
            PUT,
            cat(&[ld(1, b"app/\x7f\r"), ld(2, b"v")]),
            Code::InvalidArgument,
        )
        .audited("secret.put"),
        row(
            "Get: NUL-only name",
            GET,
            ld(1, b"\0\0\0\0"),
            Code::InvalidArgument,
        )
        .audited("secret.get"),
        row(
            "Sign: tab in key name",
            SIGN,
            cat(&[ld(1, b"k/\tone"), ld(2, b"m")]),
            Code::InvalidArgument,
        )
        .audited("key.sign"),
        // --- invalid UTF-8 where a string is expected (prost refuses to decode) ---
        row(
            "Get: name 0xff 0xfe",
            GET,
            ld(1, b"\xff\xfe"),
            Code::Internal,
        ),
        row(
            "Put: name app/\\xff",
            PUT,
            cat(&[ld(1, b"app/\xff"), ld(2, b"v")]),
            Code::Internal,
        ),
        row(
            "Put: label value not UTF-8",
            PUT,
            cat(&[
                name_x.clone(),
                ld(2, b"v"),
                ld(4, &cat(&[ld(1, b"k"), ld(2, b"\xc3\x28")])),
                vf(5, 1),
            ]),
            Code::Internal,
        ),
        row(
            "Sign: key name not UTF-8",
            SIGN,
            cat(&[ld(1, b"k/\xed\xa0\x80"), ld(2, b"m")]),
            Code::Internal,
        ),
        row(
            "ApiKeys.Verify: key not UTF-8",
            AK_VERIFY,
            ld(1, b"ks_live_\xff"),
            Code::Internal,
        ),
        row(
            "ApiKeys.Issue: owner overlong encoding",
            AK_ISSUE,
            ld(1, b"\xc0\xaf"),
            Code::Internal,
        ),
        // --- negative and huge versions ---
        row(
            "Get: version -1 (10-byte varint)",
            GET,
            cat(&[name_x.clone(), vf(2, minus_one)]),
            Code::NotFound,
        )
        .audited("secret.get"),
        row(
            "Get: version 2^63",
            GET,
            cat(&[name_x.clone(), vf(2, 1 << 63)]),
            Code::NotFound,
        )
        .audited("secret.get"),
        row(
            "Delete: versions [2, -1] (nothing deleted)",
            DELETE,
            cat(&[name_x.clone(), ld(2, &cat(&[varint(2), varint(minus_one)]))]),
            Code::NotFound,
        )
        .audited("secret.delete"),
        row(
            "Delete: 100,000 packed versions of -1",
            DELETE,
            cat(&[name_x.clone(), ld(2, &varint(minus_one).repeat(100_000))]),
            Code::NotFound,
        )
        .audited("secret.delete"),
        row(
            "Put: cas -1",
            PUT,
            cat(&[name_x.clone(), ld(2, b"v"), vf(3, minus_one)]),
            Code::FailedPrecondition,
        )
        .audited("secret.put"),
        row(
            "Keys.EnableVersion: version -1 (u32 field)",
            KEY_ENABLE,
            cat(&[ld(1, b"k/one"), vf(2, minus_one)]),
            Code::NotFound,
        ),
        // --- deep nesting ---
        row(
            "Get: 10,000 nested unknown groups",
            GET,
            cat(&[name_x.clone(), nested_groups(10_000)]),
            Code::Internal,
        ),
        row(
            "Put: 10,000 nested groups inside a label entry",
            PUT,
            cat(&[
                name_x.clone(),
                ld(2, b"v"),
                ld(4, &nested_groups(10_000)),
                vf(5, 1),
            ]),
            Code::Internal,
        ),
        row(
            "Status: 10,000 nested unknown groups",
            STATUS,
            nested_groups(10_000),
            Code::Internal,
        ),
        // Length-delimited unknown fields are skipped as opaque bytes, however
        // deep: the known fields still count.
        row(
            "Get: 10,000 nested unknown length-delimited fields",
            GET,
            cat(&[nested_ld(10_000), name_x.clone()]),
            Code::Ok,
        )
        .audited("secret.get"),
        row(
            "Get: end-group without start",
            GET,
            cat(&[name_x.clone(), vec![0x7c]]),
            Code::Internal,
        ),
        row(
            "Get: unclosed group",
            GET,
            cat(&[name_x.clone(), vec![0x7b, 0x7b]]),
            Code::Internal,
        ),
        // --- truncation ---
        row(
            "Get: truncated varint",
            GET,
            cat(&[name_x.clone(), vec![0x10, 0xff]]),
            Code::Internal,
        ),
        row(
            "Get: varint of 11 bytes",
            GET,
            cat(&[name_x.clone(), vec![0x10], vec![0xff; 10], vec![0x01]]),
            Code::Internal,
        ),
        row(
            "Get: truncated length (says 127, has 1)",
            GET,
            vec![0x0a, 0x7f, b'a'],
            Code::Internal,
        ),
        row(
            "Put: value length 2^32",
            PUT,
            cat(&[name_x.clone(), vec![0x12, 0xff, 0xff, 0xff, 0xff, 0x0f]]),
            Code::Internal,
        ),
        row("Put: truncated key", PUT, vec![0x80], Code::Internal),
        row("Put: wire type 7", PUT, vec![0x0f], Code::Internal),
        // --- empty bodies and broken framing ---
        row("Put: empty message", PUT, Vec::new(), Code::InvalidArgument).audited("secret.put"),
        row(
            "Put: no message at all (empty HTTP/2 body)",
            PUT,
            Vec::new(),
            Code::Internal,
        )
        .raw(Vec::new()),
        row(
            "Put: gRPC frame header cut at 3 bytes",
            PUT,
            Vec::new(),
            Code::Internal,
        )
        .raw(vec![0, 0, 0]),
        row(
            "Put: frame says 100 bytes, has 10",
            PUT,
            Vec::new(),
            Code::Internal,
        )
        .raw(cat(&[vec![0, 0, 0, 0, 100], vec![b'x'; 10]])),
        row(
            "Put: compressed flag without grpc-encoding",
            PUT,
            Vec::new(),
            Code::Internal,
        )
        .raw(cat(&[vec![1, 0, 0, 0, 7], name_x.clone()])),
        row(
            "Put: unknown grpc-encoding",
            PUT,
            name_x.clone(),
            Code::Unimplemented,
        )
        .headers(&[("grpc-encoding", "br")]),
        // tonic answers a unary call from its first message and ignores the
        // rest (a read here; the answer is checked to be app/x's value).
        row(
            "Get: two messages in a unary call",
            GET,
            Vec::new(),
            Code::Ok,
        )
        .raw(cat(&[frame(&name_x), frame(&ld(1, b"app/other"))]))
        .audited("secret.get"),
        // --- size limit (4 MiB) ---
        row(
            "Put: 5 MiB message",
            PUT,
            cat(&[name_x.clone(), ld(2, &vec![0x5a; 5 << 20])]),
            Code::OutOfRange,
        ),
        row(
            "Put: frame header claims 4 GiB - 1",
            PUT,
            Vec::new(),
            Code::OutOfRange,
        )
        .raw(cat(&[vec![0, 0xff, 0xff, 0xff, 0xff], name_x.clone()])),
        row(
            "Put: 1 MiB + 1 value (under the message limit)",
            PUT,
            cat(&[name_x.clone(), ld(2, &vec![0x5a; (1 << 20) + 1])]),
            Code::InvalidArgument,
        )
        .audited("secret.put"),
    ]
}

// ---------------------------------------------------------------------------
// State that must not change
// ---------------------------------------------------------------------------

/// Ops that may succeed during a row (reads, and the checks themselves).
const READ_OPS: &[&str] = &[
    "secret.get",
    "secret.list",
    "secret.history",
    "system.status",
    "key.get",
    "key.list",
    "key.sign",
    "key.verify",
    "key.jwks",
    "apikey.get",
    "apikey.list",
    "apikey.verify",
    "audit.query",
];

/// A signing key: name, current version, (version, state) of each.
type KeyState = (String, u32, Vec<(u32, String)>);

#[derive(Debug, PartialEq)]
struct Snapshot {
    secrets: Vec<(String, u64)>,
    versions: Vec<(u64, String)>,
    keys: Vec<KeyState>,
    apikeys: Vec<(String, String, String)>,
}

async fn snapshot(c: &mut Client, ak: &mut ApiKeysClient<tonic::transport::Channel>) -> Snapshot {
    let list = c
        .secrets
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    let hist = c
        .secrets
        .history(pb::HistoryRequest {
            name: "app/x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let keys = c
        .keys
        .list(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let aks = ak
        .list(pb::ListApiKeysRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    Snapshot {
        secrets: list
            .secrets
            .iter()
            .map(|m| (m.name.clone(), m.current_version))
            .collect(),
        versions: hist
            .versions
            .iter()
            .map(|v| (v.version, v.state.clone()))
            .collect(),
        keys: keys
            .keys
            .iter()
            .map(|k| {
                (
                    k.name.clone(),
                    k.current_version,
                    k.versions
                        .iter()
                        .map(|v| (v.version, v.state.clone()))
                        .collect(),
                )
            })
            .collect(),
        apikeys: aks
            .keys
            .iter()
            .map(|k| (k.id.clone(), k.owner.clone(), k.state.clone()))
            .collect(),
    }
}

async fn connect(d: &TestDaemon) -> (Client, ApiKeysClient<tonic::transport::Channel>) {
    let c = Client::connect(&d.socket).await.unwrap();
    let ch = keyseal::client::connect(&d.socket).await.unwrap();
    (c, ApiKeysClient::new(ch))
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn hostile_requests_are_refused_and_change_nothing() {
    let d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("app/x", b"one");
    d.put("app/x", b"two");
    let (_id, api_key) = issue(&d, "svc/a", None);
    let rt = common::daemon::runtime();
    let (mut c, mut ak) = rt.block_on(connect(&d));
    rt.block_on(c.keys.create(pb::CreateKeyRequest {
        name: "k/one".into(),
        algorithm: "ecdsa-p256".into(),
    }))
    .unwrap();

    let before = rt.block_on(snapshot(&mut c, &mut ak));
    assert_eq!(before.secrets, vec![("app/x".to_owned(), 2)]);
    assert_eq!(before.versions.len(), 2);
    assert_eq!(before.keys.len(), 1);
    assert_eq!(before.apikeys.len(), 1);
    let mut seen = rt.block_on(audit_events(&mut c.clone(), "")).len();

    let cases = rows();
    let n = cases.len();
    let mut failures = Vec::new();
    for r in cases {
        let what = r.what;
        let a = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(30),
                raw_call(&d.socket, r.path, r.body, r.headers),
            )
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 30 s"))
        });
        println!(
            "{what:<55} -> {:?} {:?}",
            a.code,
            a.message.chars().take(90).collect::<String>()
        );
        if a.code != r.code {
            failures.push(format!(
                "{what}: expected {:?}, got {:?} {:?}",
                r.code, a.code, a.message
            ));
        }
        assert!(
            a.message.len() < 1024,
            "{what}: the status message is {} bytes long",
            a.message.len()
        );
        if a.code == Code::Ok && r.path == GET {
            // The nested unknown fields did not disturb the known ones.
            let resp = <pb::GetResponse as prost::Message>::decode(&a.body[5..]).unwrap();
            assert_eq!(resp.value, b"two", "{what}");
        }
        if a.code == Code::Ok && r.path == AK_VERIFY {
            let resp = <pb::VerifyApiKeyResponse as prost::Message>::decode(&a.body[5..]).unwrap();
            assert!(!resp.valid, "{what}: a bogus key verified");
        }

        // keyseald is up and serves a new client as before.
        rt.block_on(async {
            let (mut c2, mut ak2) = connect(&d).await;
            c2.system
                .status(pb::StatusRequest {})
                .await
                .unwrap_or_else(|e| panic!("{what}: Status afterwards: {e:?}"));
            let v = c2
                .secrets
                .get(pb::GetRequest {
                    name: "app/x".into(),
                    version: 0,
                })
                .await
                .unwrap_or_else(|e| panic!("{what}: Get afterwards: {e:?}"))
                .into_inner();
            assert_eq!(v.value, b"two", "{what}");
            let ok = ak2
                .verify(pb::VerifyApiKeyRequest {
                    key: api_key.clone(),
                    dry_run: true,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("{what}: ApiKeys.Verify afterwards: {e:?}"))
                .into_inner();
            assert!(ok.valid, "{what}: the real key no longer verifies");
            assert_eq!(
                snapshot(&mut c2, &mut ak2).await,
                before,
                "{what}: the state changed"
            );
        });

        // The audit log: no successful write; the refusal recorded when a
        // handler saw the request; no event carries the big input.
        let events = rt.block_on(audit_events(&mut c, ""));
        let new = &events[seen..];
        seen = events.len();
        for e in new {
            let op = e["op"].as_str().unwrap_or("");
            if e["result"] == "ok" {
                assert!(
                    READ_OPS.contains(&op),
                    "{what}: a successful {op} was audited: {e}"
                );
            }
            assert!(
                e.to_string().len() < 4096,
                "{what}: an audit event of {} bytes",
                e.to_string().len()
            );
        }
        if let Some(op) = r.audited_as {
            let code_name = format!("{:?}", r.code);
            let want = if r.code == Code::Ok {
                "ok".to_owned()
            } else {
                code_name.clone()
            };
            assert!(
                new.iter().any(|e| e["op"] == op
                    && (e["result"] == want
                        || e["code"]
                            .as_str()
                            .is_some_and(|c| c.replace('_', "").eq_ignore_ascii_case(&code_name)))),
                "{what}: no {op} event with {want}: {new:#?}"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} rows answered differently:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The big input never reached the daemon's log either.
    let log = d.log_text();
    assert!(
        !log.contains(&"a".repeat(4096)),
        "the 1 MiB name is in keyseald's log"
    );
    assert!(!log.contains("panicked"), "keyseald logged a panic");
    assert!(
        !log.lines().any(|l| l.starts_with("forged log line")),
        "a name with a newline forged a line in keyseald's log"
    );
    println!(
        "hostile_input: {n} rows, all answered as expected; keyseald log {} bytes",
        log.len()
    );
}
