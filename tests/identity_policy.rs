//! Tests of caller identification (real sockets, real child processes) and
//! of the policy file: selectors, globs, every error kind, reload, perms.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyseal::identity::{parse_cgroup_unit, CgroupUnit, Identifier, IdentityError, PeerIdentity};
use keyseal::policy::{
    denial_message, Capability, CredentialProblem, Glob, GlobError, Policy, PolicyError,
    PolicyHandle, RuleProblem,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------

/// SHA-256 by coreutils' `sha256sum` where installed (an independent
/// implementation, and fast on a large debug test binary), else by sha2.
fn sha256_hex(path: &Path) -> String {
    match Command::new("sha256sum").arg(path).output() {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap()[..64].to_owned(),
        _ => hex::encode(Sha256::digest(std::fs::read(path).unwrap())),
    }
}

fn accept_within(listener: &UnixListener, limit: Duration) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    start.elapsed() < limit,
                    "child did not connect in {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The real python binary (not a pyenv shim), so the child's pid is the one
/// we spawned.
fn python() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os,sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python3 is installed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn spawn_python(script: &str, sock: &Path) -> Child {
    Command::new(python())
        .args(["-c", script])
        .arg(sock)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn temp_listener() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let l = UnixListener::bind(&path).unwrap();
    (dir, path, l)
}

#[test]
fn identifies_own_process_over_socketpair_and_caches_hash() {
    let (a, _b) = UnixStream::pair().unwrap();
    let ider = Identifier::new();
    let id = ider.identify(a.as_fd()).unwrap();

    assert_eq!(id.uid, nix::unistd::geteuid().as_raw());
    assert_eq!(id.gid, nix::unistd::getegid().as_raw());
    assert_eq!(id.pid, Some(std::process::id() as i32));
    let me = std::env::current_exe().unwrap();
    assert_eq!(id.exe.as_deref(), Some(me.as_path()));
    assert_eq!(id.exe_sha256.as_deref(), Some(sha256_hex(&me).as_str()));

    let mut want_groups: Vec<u32> = nix::unistd::getgroups()
        .unwrap()
        .iter()
        .map(|g| g.as_raw())
        .collect();
    let mut got = id.groups.clone();
    want_groups.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want_groups);
    if let Some(g) = &id.group {
        assert!(id.group_names.contains(g), "primary group name is listed");
    }
    let own_unit =
        parse_cgroup_unit(&std::fs::read_to_string("/proc/self/cgroup").unwrap()).map(|u| u.name);
    assert_eq!(id.unit, own_unit);

    assert_eq!(ider.cache_len(), 1);
    assert_eq!(ider.cache_hits(), 0);
    let again = ider.identify(a.as_fd()).unwrap();
    assert_eq!(again, id);
    assert_eq!(ider.cache_len(), 1, "same executable version hashed once");
    assert_eq!(ider.cache_hits(), 1);

    let line = id.display_short();
    assert!(line.starts_with(&format!("uid={}", id.uid)), "{line}");
    assert!(
        line.contains(&format!("pid={}", std::process::id())),
        "{line}"
    );
    assert!(id.actor().contains(&format!("uid:{}", id.uid)));
    // Serializable for audit records.
    let json = serde_json::to_string(&id).unwrap();
    assert!(json.contains("\"exe_sha256\""));
}

#[test]
fn identifies_a_child_process_peer() {
    let (_dir, path, listener) = temp_listener();
    let script = "import os,socket,sys\n\
                  s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
                  s.sendall(('%d\\n%s\\n' % (os.getpid(), os.readlink('/proc/self/exe'))).encode())\n\
                  s.recv(1)\n";
    let mut child = spawn_python(script, &path);
    let conn = accept_within(&listener, Duration::from_secs(20));
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let (mut pid_line, mut exe_line) = (String::new(), String::new());
    r.read_line(&mut pid_line).unwrap();
    r.read_line(&mut exe_line).unwrap();

    let ider = Identifier::new();
    let id = ider.identify(conn.as_fd()).unwrap();
    assert_eq!(id.pid, Some(child.id() as i32));
    assert_eq!(id.pid, Some(pid_line.trim().parse::<i32>().unwrap()));
    let exe = PathBuf::from(exe_line.trim());
    assert_eq!(id.exe.as_deref(), Some(exe.as_path()));
    assert_eq!(id.exe, Some(python()));
    assert_eq!(id.exe_sha256.as_deref(), Some(sha256_hex(&exe).as_str()));
    assert_eq!(id.uid, nix::unistd::geteuid().as_raw());

    drop(r);
    drop(conn);
    assert!(child.wait().unwrap().success());
}

#[test]
fn peer_that_exited_before_identify_gets_no_proc_attributes() {
    let (_dir, path, listener) = temp_listener();
    let script = "import socket,sys\n\
                  s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n";
    let mut child = spawn_python(script, &path);
    let conn = accept_within(&listener, Duration::from_secs(20));
    let child_pid = child.id() as i32;
    assert!(child.wait().unwrap().success()); // exited and reaped

    let ider = Identifier::new();
    let id = ider.identify(conn.as_fd()).unwrap();
    // What the kernel captured at connect() stays.
    assert_eq!(id.uid, nix::unistd::geteuid().as_raw());
    assert_eq!(id.pid, Some(child_pid));
    // Nothing read from /proc now could be the child's: all dropped.
    assert_eq!(id.exe, None);
    assert_eq!(id.exe_sha256, None);
    assert_eq!(id.unit, None);
    assert!(id.groups.is_empty());
    assert_eq!(ider.cache_len(), 0);
}

#[test]
fn peer_running_as_another_user_is_identified_by_that_uid() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to start a child under another uid");
        return;
    }
    let (dir, path, listener) = temp_listener();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = "import os,socket,sys\n\
                  os.setgroups([]); os.setgid(65534); os.setuid(65534)\n\
                  s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
                  s.recv(1)\n";
    let mut child = spawn_python(script, &path);
    let mut conn = accept_within(&listener, Duration::from_secs(20));
    let id = Identifier::new().identify(conn.as_fd()).unwrap();
    assert_eq!((id.uid, id.gid), (65534, 65534));
    assert_eq!(id.pid, Some(child.id() as i32));
    assert!(id.groups.is_empty());
    // Root may read another user's /proc/PID/exe.
    assert_eq!(id.exe, Some(python()));
    conn.write_all(b"x").unwrap();
    drop(conn);
    assert!(child.wait().unwrap().success());
}

#[test]
fn not_a_socket_is_an_error_not_a_panic() {
    let f = tempfile::tempfile().unwrap();
    let err = Identifier::new().identify(f.as_fd()).unwrap_err();
    assert!(matches!(err, IdentityError::NoPeerCredentials(_)), "{err}");
}

#[test]
fn unit_from_cgroup_lines() {
    let unit = |s: &str| parse_cgroup_unit(s);
    let sys = |n: &str| {
        Some(CgroupUnit {
            name: n.into(),
            user_manager_uid: None,
        })
    };
    assert_eq!(unit("0::/system.slice/foo.service\n"), sys("foo.service"));
    assert_eq!(
        unit("0::/user.slice/user-1000.slice/user@1000.service/app.slice/bar.service\n"),
        Some(CgroupUnit {
            name: "bar.service".into(),
            user_manager_uid: Some(1000)
        })
    );
    assert_eq!(
        unit("0::/user.slice/user-1000.slice/session-3.scope\n"),
        sys("session-3.scope")
    );
    // A delegated subtree cannot rename its unit.
    assert_eq!(
        unit("0::/system.slice/foo.service/app-a.service\n"),
        sys("foo.service")
    );
    assert_eq!(
        unit("0::/system.slice/a.slice/b.service/x\n"),
        sys("b.service")
    );
    assert_eq!(unit("0::/init.scope\n"), sys("init.scope"));
    // The user manager itself is a system unit.
    assert_eq!(
        unit("0::/user.slice/user-1000.slice/user@1000.service\n"),
        sys("user@1000.service")
    );
    // cgroup v1 (hybrid) fallback.
    assert_eq!(
        unit("12:pids:/\n1:name=systemd:/system.slice/old.service\n0::/\n"),
        sys("old.service")
    );
    // Not in a unit.
    assert_eq!(unit("0::/\n"), None);
    assert_eq!(unit("0::/docker/0123abcd\n"), None);
    assert_eq!(unit("0::/system.slice\n"), None);
    assert_eq!(unit("0::/system.slice/.service\n"), None);
    assert_eq!(unit(""), None);
    assert_eq!(unit("garbage without colons"), None);
}

// ---------------------------------------------------------------------------
// Policy: selectors and decisions
// ---------------------------------------------------------------------------

const SHA: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

fn alice() -> PeerIdentity {
    let mut id = PeerIdentity::new(1000, 1000);
    id.pid = Some(4242);
    id.user = Some("alice".into());
    id.group = Some("alice".into());
    id.groups = vec![1000, 2000];
    id.group_names = vec!["alice".into(), "ops".into()];
    id.exe = Some("/usr/bin/app-a".into());
    id.exe_sha256 = Some(SHA.into());
    id.unit = Some("app-a.service".into());
    id
}

fn rule(selector: &str) -> Policy {
    Policy::parse(&format!(
        "[[rule]]\nname = \"r\"\ncapabilities = [\"secret:read\"]\nnames = [\"app/**\"]\n[rule.match]\n{selector}\n"
    ))
    .unwrap_or_else(|e| panic!("{selector}: {e}"))
}

#[test]
fn each_selector_allows_the_matching_caller_and_denies_others() {
    let cases: &[(&str, bool)] = &[
        ("user = \"alice\"", true),
        ("user = \"bob\"", false),
        ("uid = 1000", true),
        ("uid = 1001", false),
        ("group = \"alice\"", true),
        ("group = \"ops\"", true), // supplementary group name
        ("group = \"wheel\"", false),
        ("gid = 1000", true),
        ("gid = 2000", true), // supplementary gid
        ("gid = 3000", false),
        ("unit = \"app-a.service\"", true),
        ("unit = \"app-b.service\"", false),
        ("exe = \"/usr/bin/app-a\"", true),
        ("exe = \"/usr/bin/app-b\"", false),
        (&format!("exe_sha256 = \"{SHA}\""), true),
        (&format!("exe_sha256 = \"{}\"", SHA.to_uppercase()), true),
        (&format!("exe_sha256 = \"{}\"", "0".repeat(64)), false),
        ("any = true", true),
        ("uid = 1000\nunit = \"app-a.service\"", true), // all must match
        ("uid = 1000\nunit = \"app-b.service\"", false),
        ("user = \"alice\"\nexe = \"/usr/bin/other\"", false),
    ];
    let who = alice();
    for (sel, want) in cases {
        let p = rule(sel);
        let d = p.check(&who, Capability::SecretRead, "app/a/x");
        assert_eq!(d.allowed, *want, "selector {sel:?}");
        assert_eq!(d.rule.is_some(), *want);
        // The capability and the name must be granted too.
        assert!(
            !p.check(&who, Capability::SecretWrite, "app/a/x").allowed,
            "{sel}"
        );
        assert!(
            !p.check(&who, Capability::SecretRead, "other/x").allowed,
            "{sel}"
        );
    }
}

#[test]
fn user_manager_units_never_match_unit_selectors() {
    let mut who = alice();
    who.user_manager_uid = Some(1000); // `systemd-run --user --unit=app-a`
    assert!(
        !rule("unit = \"app-a.service\"")
            .check(&who, Capability::SecretRead, "app/x")
            .allowed
    );
    assert!(
        rule("uid = 1000")
            .check(&who, Capability::SecretRead, "app/x")
            .allowed
    );
    assert!(!who.actor().contains("unit:"));
}

#[test]
fn proc_attributes_missing_means_no_match() {
    let who = PeerIdentity::new(1000, 1000); // e.g. peer exited: no exe, no unit
    for sel in [
        "exe = \"/usr/bin/app-a\"",
        "unit = \"app-a.service\"",
        "user = \"alice\"",
        "gid = 2000",
    ] {
        assert!(
            !rule(sel)
                .check(&who, Capability::SecretRead, "app/x")
                .allowed,
            "{sel}"
        );
    }
}

#[test]
fn default_deny() {
    let who = alice();
    for cap in Capability::ALL {
        assert!(!Policy::empty().check(&who, cap, "app/a/x").allowed);
        assert!(
            !Policy::parse("")
                .unwrap()
                .check(&who, cap, "app/a/x")
                .allowed
        );
    }
    assert_eq!(Policy::empty().rule_count(), 0);
    assert_eq!(Policy::empty().credential("a.service", "x"), None);
    let d = Policy::empty().check(&who, Capability::SecretRead, "x");
    assert_eq!(d.rule, None);
}

const FULL: &str = r#"
[[rule]]
name = "app-a reads its secrets"
capabilities = ["secret:read"]
names = ["app/a/*", "shared/**"]
[rule.match]
user = "alice"

[[rule]]
name = "ops write"
capabilities = ["secret:read", "secret:write", "secret:delete"]
names = ["**"]
[rule.match]
group = "ops"

[[rule]]
name = "ops administer"
capabilities = ["system:admin", "audit:read"]
[rule.match]
group = "ops"

[[rule]]
name = "everyone verifies"
capabilities = ["apikey:verify"]
names = ["**"]
[rule.match]
any = true

[[credential]]
unit = "app-a.service"
id = "db-password"
secret = "app/a/db-password"

[[credential]]
unit = "app-a.service"
id = "api-token"
secret = "app/a/token"
"#;

#[test]
fn full_example_decisions_and_explanations() {
    let p = Policy::parse(FULL).unwrap();
    assert_eq!(p.rule_count(), 4);
    let who = alice();
    let d = p.check(&who, Capability::SecretRead, "app/a/x");
    assert_eq!(
        d,
        keyseal::policy::Decision {
            allowed: true,
            rule: Some("app-a reads its secrets".into())
        }
    );
    // Write comes from the group rule.
    let d = p.check(&who, Capability::SecretWrite, "app/a/x");
    assert_eq!(d.rule.as_deref(), Some("ops write"));
    assert!(!p.check(&who, Capability::SecretDestroy, "app/a/x").allowed);
    // System capabilities ignore the name.
    assert!(p.check(&who, Capability::SystemAdmin, "system").allowed);
    assert!(p.check(&who, Capability::AuditRead, "anything").allowed);
    assert!(!p.check(&who, Capability::KeyAdmin, "k").allowed);

    let mut stranger = PeerIdentity::new(5000, 5000);
    stranger.user = Some("eve".into());
    assert!(
        !p.check(&stranger, Capability::SecretRead, "app/a/x")
            .allowed
    );
    assert!(
        !p.check(&stranger, Capability::SystemAdmin, "system")
            .allowed
    );
    assert_eq!(
        p.check(&stranger, Capability::ApiKeyVerify, "any/key")
            .rule
            .as_deref(),
        Some("everyone verifies")
    );

    assert_eq!(
        p.credential("app-a.service", "db-password"),
        Some("app/a/db-password")
    );
    assert_eq!(
        p.credential("app-a.service", "api-token"),
        Some("app/a/token")
    );
    assert_eq!(p.credential("app-a.service", "nope"), None);
    assert_eq!(p.credential("app-b.service", "db-password"), None);
}

#[test]
fn the_module_doc_example_parses() {
    let src = include_str!("../src/policy.rs");
    let start = src.find("//! ```toml\n").unwrap() + "//! ```toml\n".len();
    let end = start + src[start..].find("//! ```\n").unwrap();
    let example: String = src[start..end]
        .lines()
        .map(|l| {
            l.strip_prefix("//! ")
                .unwrap_or(l.trim_start_matches("//!"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let p = Policy::parse(&example).unwrap_or_else(|e| panic!("{e}\n{example}"));
    assert_eq!(p.rule_count(), 4);
    assert_eq!(
        p.credential("app-a.service", "db-password"),
        Some("app/a/db-password")
    );
}

#[test]
fn denial_message_names_capability_and_name_only() {
    assert_eq!(
        denial_message(Capability::SecretRead, "app/b/x"),
        "permission denied: missing capability secret:read on \"app/b/x\""
    );
    assert_eq!(
        denial_message(Capability::SystemAdmin, "system"),
        "permission denied: missing capability system:admin"
    );
    // Control characters in a name cannot forge log lines.
    assert!(!denial_message(Capability::SecretRead, "a\nb").contains('\n'));
}

#[test]
fn capability_strings() {
    let all: Vec<&str> = Capability::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        all,
        [
            "secret:read",
            "secret:write",
            "secret:delete",
            "secret:destroy",
            "system:admin",
            "audit:read",
            "audit:prune",
            "key:sign",
            "key:admin",
            "apikey:verify",
            "apikey:admin",
            "proxy:use",
            "proxy:admin"
        ]
    );
    for c in Capability::ALL {
        assert_eq!(c.to_string().parse::<Capability>().unwrap(), c);
    }
    let e = "secret:reed".parse::<Capability>().unwrap_err().to_string();
    assert!(
        e.contains("\"secret:reed\"") && e.contains("secret:read, secret:write"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Globs
// ---------------------------------------------------------------------------

fn m(pattern: &str, name: &str) -> bool {
    Glob::parse(pattern).unwrap().matches(name)
}

#[test]
fn glob_cases() {
    assert!(m("app/a/*", "app/a/x"));
    assert!(!m("app/a/*", "app/a/x/y"));
    assert!(!m("app/a/*", "app/a"));
    assert!(m("app/**", "app"), "`**` matches zero segments");
    assert!(m("app/**", "app/x"));
    assert!(m("app/**", "app/x/y"));
    assert!(!m("app/**", "apple/x"));
    assert!(!m("app/*/**", "app"), "strictly below app");
    assert!(m("app/*/**", "app/x/y"));
    assert!(m("**", "a"));
    assert!(m("**", "a/b/c"));
    assert!(m("**/db", "db"));
    assert!(m("**/db", "x/y/db"));
    assert!(!m("**/db", "x/db/y"));
    assert!(m("a/**/b", "a/b"));
    assert!(m("a/**/b", "a/x/y/b"));
    assert!(!m("a/**/b", "a/x/y/c"));
    assert!(m("*", "anything"));
    assert!(!m("*", "a/b"), "`*` never crosses '/'");
    assert!(m("app-?", "app-1"));
    assert!(!m("app-?", "app-12"));
    assert!(!m("app-?", "app-"));
    assert!(m("db-*-password", "db--password"));
    assert!(m("db-*-password", "db-prod-password"));
    assert!(!m("db-*-password", "db-prod/x-password"));
    assert!(m("a.b_c-d", "a.b_c-d"));
    assert!(!m("a.b", "aXb"), "`.` is literal");
}

#[test]
fn glob_validation() {
    assert_eq!(Glob::parse(""), Err(GlobError::Empty));
    assert_eq!(Glob::parse("app/a**"), Err(GlobError::PartialDoubleStar(2)));
    assert_eq!(Glob::parse("***"), Err(GlobError::PartialDoubleStar(1)));
    assert_eq!(Glob::parse("/app"), Err(GlobError::EmptySegment));
    assert_eq!(Glob::parse("app/"), Err(GlobError::EmptySegment));
    assert_eq!(Glob::parse("a//b"), Err(GlobError::EmptySegment));
    assert_eq!(Glob::parse("a/[bc]"), Err(GlobError::BadChar(2)));
    assert_eq!(Glob::parse(&"a".repeat(2000)), Err(GlobError::TooLong));
    assert_eq!(Glob::parse("app/**").unwrap().as_str(), "app/**");
}

#[test]
fn pathological_globs_finish() {
    let long_a = "a".repeat(20_000);
    assert!(!m("*a*a*a*a*a*a*a*a*a*a*a*b", &long_a));
    assert!(m("*a*a*a*a*a*a*a*a*a*a*a*a", &long_a));
    let deep = vec!["a"; 5_000].join("/");
    assert!(!m("**/a/**/a/**/a/**/a/**/a/**/b", &deep));
    assert!(m("**/a/**/a/**/a/**/a/**/a/**", &deep));
    let wide = format!("{}/x", "*a".repeat(200));
    assert!(!m(
        &format!("{wide}/**/{wide}/**/b"),
        &format!("{long_a}/x/{long_a}/x/c")
    ));
}

/// Plain recursive reference matcher (exponential, fine for tiny inputs).
fn reference(p: &[&str], n: &[&str]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some((&"**", rest)) => (0..=n.len()).any(|k| reference(rest, &n[k..])),
        Some((seg, rest)) => {
            !n.is_empty()
                && reference_seg(seg.as_bytes(), n[0].as_bytes())
                && reference(rest, &n[1..])
        }
    }
}

fn reference_seg(p: &[u8], n: &[u8]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some((b'*', rest)) => (0..=n.len()).any(|k| reference_seg(rest, &n[k..])),
        Some((b'?', rest)) => !n.is_empty() && reference_seg(rest, &n[1..]),
        Some((c, rest)) => n.first() == Some(c) && reference_seg(rest, &n[1..]),
    }
}

proptest! {
    #[test]
    fn glob_never_panics(pattern in ".{0,40}", name in ".{0,60}") {
        if let Ok(g) = Glob::parse(&pattern) {
            let _ = g.matches(&name);
        }
    }

    #[test]
    fn glob_never_panics_on_glob_like_input(pattern in "[ab*?/]{0,24}", name in "[ab/]{0,24}") {
        if let Ok(g) = Glob::parse(&pattern) {
            let _ = g.matches(&name);
        }
    }

    #[test]
    fn glob_agrees_with_reference(
        pattern in "([ab*?]{1,3}|\\*\\*)(/([ab*?]{1,3}|\\*\\*)){0,3}",
        name in "[ab]{0,3}(/[ab]{0,3}){0,4}",
    ) {
        if let Ok(g) = Glob::parse(&pattern) {
            let p: Vec<&str> = pattern.split('/').collect();
            let n: Vec<&str> = name.split('/').collect();
            prop_assert_eq!(g.matches(&name), reference(&p, &n), "{} vs {}", pattern, name);
        }
    }
}

// ---------------------------------------------------------------------------
// Errors: each names the rule or credential, the key, and the fix
// ---------------------------------------------------------------------------

const GOOD_RULE: &str = "[[rule]]\nname = \"first\"\ncapabilities = [\"secret:read\"]\nnames = [\"**\"]\n[rule.match]\nuid = 0\n\n";

fn second_rule_error(body: &str) -> (PolicyError, String) {
    let text = format!("{GOOD_RULE}[[rule]]\n{body}\n");
    let e = Policy::parse(&text).expect_err(body);
    let msg = e.to_string();
    (e, msg)
}

fn base(extra: &str) -> String {
    format!("name = \"app-a\"\ncapabilities = [\"secret:read\"]\nnames = [\"app/**\"]\n{extra}")
}

#[track_caller]
fn assert_rule_problem(body: &str, want: fn(&RuleProblem) -> bool, must_contain: &[&str]) {
    let (e, msg) = second_rule_error(body);
    match &e {
        PolicyError::Rule {
            index: 2,
            line: 8,
            problem,
            ..
        } => {
            assert!(want(problem), "unexpected problem {problem:?}");
        }
        other => panic!("not a rule-2 error: {other:?}"),
    }
    assert!(msg.starts_with("rule 2 (\"app-a\") at line 8: "), "{msg}");
    for s in must_contain {
        assert!(msg.contains(s), "{msg:?} lacks {s:?}");
    }
}

#[test]
fn rule_errors_name_the_rule_the_key_and_the_fix() {
    assert_rule_problem(
        "name = \"app-a\"\ncapabilities = [\"secret:reed\"]\nnames = [\"x\"]\n[rule.match]\nuid = 1",
        |p| matches!(p, RuleProblem::UnknownCapability(_)),
        &["unknown capability \"secret:reed\"", "`capabilities`", "(valid: secret:read, secret:write"],
    );
    assert_rule_problem(
        "name = \"app-a\"\ncapabilities = []\nnames = [\"x\"]\n[rule.match]\nuid = 1",
        |p| matches!(p, RuleProblem::NoCapabilities),
        &["`capabilities` is empty"],
    );
    assert_rule_problem(
        "name = \"app-a\"\ncapabilities = [\"system:admin\", \"secret:read\"]\nnames = [\"x\"]\n[rule.match]\nuid = 1",
        |p| matches!(p, RuleProblem::MixedCapabilities { .. }),
        &["system:admin", "secret:read", "split this into two rules"],
    );
    assert_rule_problem(
        "name = \"app-a\"\ncapabilities = [\"secret:read\"]\n[rule.match]\nuid = 1",
        |p| {
            matches!(
                p,
                RuleProblem::NamesRequired {
                    cap: Capability::SecretRead
                }
            )
        },
        &["`names`", "names = [\"app/**\"]"],
    );
    assert_rule_problem(
        "name = \"app-a\"\ncapabilities = [\"audit:read\"]\nnames = [\"**\"]\n[rule.match]\nuid = 1",
        |p| matches!(p, RuleProblem::NamesNotAllowed { cap: Capability::AuditRead }),
        &["remove `names`"],
    );
    assert_rule_problem(
        "name = \"app-a\"\ncapabilities = [\"secret:read\"]\nnames = [\"ok/**\", \"app/a**\"]\n[rule.match]\nuid = 1",
        |p| matches!(p, RuleProblem::BadGlob { error: GlobError::PartialDoubleStar(2), .. }),
        &["`names` entry \"app/a**\"", "whole segment"],
    );
    assert_rule_problem(
        &base(""),
        |p| matches!(p, RuleProblem::NoSelector),
        &["[rule.match]", "any = true"],
    );
    assert_rule_problem(
        &base("[rule.match]\n"),
        |p| matches!(p, RuleProblem::NoSelector),
        &["[rule.match]"],
    );
    assert_rule_problem(
        &base("[rule.match]\nany = true\nuid = 3"),
        |p| matches!(p, RuleProblem::AnyWithOthers),
        &["`match.any = true` cannot be combined"],
    );
    assert_rule_problem(
        &base("[rule.match]\nany = false"),
        |p| matches!(p, RuleProblem::AnyFalse),
        &["remove it"],
    );
    assert_rule_problem(
        &base("[rule.match]\nunit = \"app-a\""),
        |p| matches!(p, RuleProblem::BadSelector { key: "unit", .. }),
        &["`match.unit`", "app-a.service"],
    );
    assert_rule_problem(
        &base("[rule.match]\nexe = \"bin/app\""),
        |p| matches!(p, RuleProblem::BadSelector { key: "exe", .. }),
        &["`match.exe`", "absolute path"],
    );
    assert_rule_problem(
        &base("[rule.match]\nexe_sha256 = \"abc\""),
        |p| {
            matches!(
                p,
                RuleProblem::BadSelector {
                    key: "exe_sha256",
                    ..
                }
            )
        },
        &["`match.exe_sha256`", "64 hex digits", "sha256sum"],
    );
    assert_rule_problem(
        &base("[rule.match]\nuser = \"\""),
        |p| matches!(p, RuleProblem::BadSelector { key: "user", .. }),
        &["`match.user`"],
    );
    assert_rule_problem(
        &base("[rule.match]\nusr = \"alice\""),
        |p| matches!(p, RuleProblem::Shape(_)),
        &["unknown field `usr`", "in `match`"],
    );
    assert_rule_problem(
        &base("[rule.match]\nuid = \"alice\""),
        |p| matches!(p, RuleProblem::Shape(_)),
        &["match.uid", "expected u32"],
    );
    assert_rule_problem(
        "name = \"app-a\"\ncapabilites = [\"secret:read\"]\n[rule.match]\nuid = 1",
        |p| matches!(p, RuleProblem::Shape(_)),
        &["unknown field `capabilites`", "`capabilities`"],
    );
    assert_rule_problem(
        "name = \"app-a\"\ncapabilities = \"secret:read\"\nnames = [\"x\"]\n[rule.match]\nuid = 1",
        |p| matches!(p, RuleProblem::Shape(_)),
        &["capabilities", "expected a sequence"],
    );

    // A rule without a name is labelled by its index alone.
    let (e, msg) = second_rule_error("capabilities = [\"secret:read\"]\n[rule.match]\nuid = 1");
    assert!(
        matches!(
            e,
            PolicyError::Rule {
                index: 2,
                name: None,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        msg.starts_with("rule 2 (no name) at line 8: missing field `name`"),
        "{msg}"
    );
    let (e, _) = second_rule_error(
        "name = \" \"\ncapabilities = [\"secret:read\"]\nnames = [\"x\"]\n[rule.match]\nuid = 1",
    );
    assert!(
        matches!(
            e,
            PolicyError::Rule {
                problem: RuleProblem::EmptyName,
                ..
            }
        ),
        "{e:?}"
    );
    let (e, msg) = second_rule_error(
        "name = \"first\"\ncapabilities = [\"secret:read\"]\nnames = [\"x\"]\n[rule.match]\nuid = 1",
    );
    assert!(
        matches!(
            e,
            PolicyError::Rule {
                problem: RuleProblem::DuplicateName { first: 1 },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(msg.contains("already used by rule 1"), "{msg}");
}

#[test]
fn syntax_and_top_level_errors_carry_line_and_column() {
    let e =
        Policy::parse("[[rule]]\nname = \"x\"\ncapabilities = [\"secret:read\",\n").unwrap_err();
    assert!(matches!(e, PolicyError::Syntax(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("line 3") || msg.contains("line 4"), "{msg}");
    assert!(msg.contains("column"), "{msg}");

    let e = Policy::parse("\n\nrules = []\n").unwrap_err().to_string();
    assert!(
        e.contains("line 3") && e.contains("unknown field `rules`"),
        "{e}"
    );
    assert!(e.contains("`rule`") && e.contains("`credential`"), "{e}");

    let e = Policy::parse("rule = 3\n").unwrap_err().to_string();
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn credential_errors() {
    let cred = |unit: &str, id: &str, secret: &str| {
        format!("[[credential]]\nunit = \"{unit}\"\nid = \"{id}\"\nsecret = \"{secret}\"\n")
    };
    let ok = cred("app-a.service", "db", "app/a/db");
    let err = |text: &str| Policy::parse(text).unwrap_err();

    let e = err(&format!("{ok}\n{}", cred("app-a", "db", "app/a/db")));
    assert!(
        matches!(
            &e,
            PolicyError::Credential {
                index: 2,
                line: 6,
                problem: CredentialProblem::BadUnit(_)
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("credential 2 at line 6: `unit` \"app-a\""),
        "{e}"
    );
    let e = err(&cred("a.service", "x/y", "app/a/db"));
    assert!(
        matches!(
            &e,
            PolicyError::Credential {
                problem: CredentialProblem::BadId(_),
                ..
            }
        ),
        "{e:?}"
    );
    let e = err(&cred("a.service", "", "app/a/db"));
    assert!(
        matches!(
            &e,
            PolicyError::Credential {
                problem: CredentialProblem::BadId(_),
                ..
            }
        ),
        "{e:?}"
    );
    let e = err(&cred("a.service", "db", "app//db"));
    assert!(
        matches!(
            &e,
            PolicyError::Credential {
                problem: CredentialProblem::BadSecret { .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("`secret` \"app//db\""), "{e}");
    let e = err(&format!(
        "{ok}{}",
        cred("app-a.service", "db", "app/a/other")
    ));
    assert!(
        matches!(
            &e,
            PolicyError::Credential {
                index: 2,
                problem: CredentialProblem::Duplicate { first: 1, .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("already mapped by credential 1"),
        "{e}"
    );
    let e = err("[[credential]]\nunit = \"a.service\"\nid = \"x\"\n");
    assert!(e.to_string().contains("missing field `secret`"), "{e}");
    let e = err(&format!("{ok}extra = 1\n"));
    assert!(e.to_string().contains("unknown field `extra`"), "{e}");

    // Same id for another unit is fine.
    let p = Policy::parse(&format!("{ok}{}", cred("app-b.service", "db", "app/b/db"))).unwrap();
    assert_eq!(p.credential("app-b.service", "db"), Some("app/b/db"));
}

// ---------------------------------------------------------------------------
// Files: permissions and reload
// ---------------------------------------------------------------------------

fn write_policy(dir: &Path, file: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn load_checks_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let ok = write_policy(dir.path(), "ok.toml", FULL, 0o640);
    assert_eq!(Policy::load(&ok).unwrap().rule_count(), 4);

    for mode in [0o660, 0o646, 0o666] {
        let p = write_policy(dir.path(), "bad.toml", FULL, mode);
        let e = Policy::load(&p).unwrap_err();
        assert!(
            matches!(e, PolicyError::Writable { mode: m, .. } if m == mode),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("chmod go-w") && msg.contains("bad.toml"),
            "{msg}"
        );
    }

    let e = Policy::load(&dir.path().join("missing.toml")).unwrap_err();
    assert!(matches!(e, PolicyError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.toml"));

    let e = Policy::load(dir.path()).unwrap_err();
    assert!(
        matches!(e, PolicyError::NotAFile { .. } | PolicyError::Io { .. }),
        "{e:?}"
    );

    let bad = write_policy(dir.path(), "invalid.toml", "[[rule]]\nname = 1\n", 0o600);
    let e = Policy::load(&bad).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("policy file {}: rule 1", bad.display())),
        "{msg}"
    );

    if nix::unistd::geteuid().is_root() {
        let p = write_policy(dir.path(), "theirs.toml", FULL, 0o600);
        nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = Policy::load(&p).unwrap_err();
        assert!(
            matches!(e, PolicyError::Owner { owner: 65534, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("chown root"), "{e}");
    }
}

#[test]
fn reload_keeps_old_policy_when_new_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(dir.path(), "policy.toml", FULL, 0o600);
    let handle = PolicyHandle::new(Policy::empty());
    let reader = handle.clone();
    assert_eq!(reader.current().rule_count(), 0);

    handle.reload_from(&path).unwrap();
    let snapshot = reader.current();
    assert_eq!(snapshot.rule_count(), 4);

    // Broken file: error, old policy stays.
    std::fs::write(
        &path,
        "[[rule]]\nname = \"x\"\ncapabilities = [\"secret:reed\"]\n",
    )
    .unwrap();
    let e = handle.reload_from(&path).unwrap_err();
    assert!(e.to_string().contains("secret:reed"), "{e}");
    assert_eq!(reader.current().rule_count(), 4);
    assert!(
        reader
            .current()
            .check(&alice(), Capability::SecretRead, "app/a/x")
            .allowed
    );

    // Insecure file: refused, old policy stays.
    std::fs::write(&path, GOOD_RULE).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(matches!(
        handle.reload_from(&path),
        Err(PolicyError::Writable { .. })
    ));
    assert_eq!(reader.current().rule_count(), 4);

    // Fixed: new policy in force; old snapshots are unchanged.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    handle.reload_from(&path).unwrap();
    assert_eq!(reader.current().rule_count(), 1);
    assert_eq!(snapshot.rule_count(), 4);
    assert!(
        !reader
            .current()
            .check(&alice(), Capability::SecretRead, "app/a/x")
            .allowed
    );
}
