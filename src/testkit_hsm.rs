//! Test support, SoftHSM2 part: a throwaway token per test process.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once per process, so each test process
//! (cargo nextest runs one test per process) gets its own token directory.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use zeroize::Zeroizing;

use crate::root::pkcs11::Pkcs11Config;

/// Where Debian's softhsm2 package puts the module.
pub const SOFTHSM_MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// The SoftHSM2 module on this machine, if installed.
pub fn softhsm_module() -> Option<PathBuf> {
    SOFTHSM_MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Writes a SoftHSM2 config whose tokens live under `dir/tokens`.
pub fn write_softhsm_conf(dir: &Path) -> io::Result<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )?;
    Ok(conf)
}

/// Creates a token with `softhsm2-util` under the config `conf`.
pub fn init_softhsm_token(conf: &Path, label: &str, pin: &str, so_pin: &str) -> io::Result<()> {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin,
            "--so-pin",
            so_pin,
        ])
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A throwaway SoftHSM2 token directory with one initialised token. Sets
/// `SOFTHSM2_CONF` for this process. Removed on drop.
pub struct SoftHsm {
    dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub module: PathBuf,
    pub token_label: String,
    pub pin: String,
}

impl SoftHsm {
    pub fn new() -> io::Result<SoftHsm> {
        let module = softhsm_module().ok_or_else(|| {
            io::Error::other("libsofthsm2.so not found: apt-get install softhsm2")
        })?;
        let dir = tempfile::Builder::new()
            .prefix("keyseal-softhsm-")
            .tempdir()?;
        let conf = write_softhsm_conf(dir.path())?;
        let token_label = "keyseal-test".to_owned();
        let pin = "1234-test-pin".to_owned();
        init_softhsm_token(&conf, &token_label, &pin, "so-pin-5678")?;
        std::env::set_var("SOFTHSM2_CONF", &conf);
        Ok(SoftHsm {
            dir,
            conf,
            module,
            token_label,
            pin,
        })
    }

    /// The token directory (tests corrupt or hide it for fault tests).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config {
            module: self.module.clone(),
            token_label: self.token_label.clone(),
            pin: Zeroizing::new(self.pin.clone()),
        }
    }
}
