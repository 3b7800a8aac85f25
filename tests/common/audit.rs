//! Shared audit-log helpers of the end-to-end tests.

use std::path::Path;

use super::daemon::TestDaemon;

/// `keyseal audit export --out <dir>/<name>` (with `--after checkpoint`),
/// then `keyseal audit verify` of the bundle; asserts both succeed and
/// returns verify's stdout.
pub fn export_and_verify(d: &TestDaemon, name: &str, after: Option<&Path>) -> String {
    let dir = d.dir().join(name);
    let mut args = vec!["audit", "export", "--out", dir.to_str().unwrap()];
    if let Some(cp) = after {
        args.extend(["--after", cp.to_str().unwrap()]);
    }
    let out = d.cli(&args).output().unwrap();
    assert!(
        out.status.success(),
        "export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = d
        .cli(&["audit", "verify", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    String::from_utf8_lossy(&v.stdout).into_owned()
}
