//! The daemon config: `Config::parse` on arbitrary text never panics.
//!
//! `Config::parse` reads the PIN from `root.pkcs11.pin_file` /
//! `root.tpm.auth_file` (relative to the config's directory) or from an
//! env var. So that fuzz input cannot make it read arbitrary files
//! (`/proc/kcore` is mode 0400 and endless), the config "lives" in a
//! private temp directory holding only a mode-0600 `pin` file, the default
//! PIN env var is set, and inputs whose TOML has any string value that is
//! an absolute path or contains `..` are checked only at the TOML layer.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use keyseal::config::{Config, DEFAULT_PIN_ENV};
use libfuzzer_sys::fuzz_target;

fn config_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("keyseal-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pin = dir.join("pin");
        std::fs::write(&pin, "1234\n").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::env::set_var(DEFAULT_PIN_ENV, "fuzz-pin");
        dir.join("keyseald.toml")
    })
}

/// Whether any string in the document could name a file outside the
/// private directory.
fn escapes(v: &toml::Value) -> bool {
    match v {
        toml::Value::String(s) => s.starts_with('/') || s.contains("..") || s.contains('~'),
        toml::Value::Array(a) => a.iter().any(escapes),
        toml::Value::Table(t) => t.values().any(escapes),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = config_path();
    if let Ok(doc) = toml::from_str::<toml::Value>(text) {
        if escapes(&doc) {
            return;
        }
    }
    match Config::parse(text, path) {
        Ok(c) => {
            // Resolved paths stay under the config's directory.
            let dir = path.parent().unwrap();
            assert!(c.store_path.starts_with(dir));
            assert!(c.max_value_bytes >= 1);
            assert!(c.default_max_versions >= 1);
            assert!(c.socket_mode & 0o7 == 0);
            let _ = format!("{c:?}");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains("fuzz-pin"), "error shows the PIN");
        }
    }
});
