//! Shared test support: a root of trust on real SoftHSM2 or real swtpm.
#![allow(dead_code)]

use std::sync::Arc;

use keyseal::root::pkcs11::Pkcs11Root;
use keyseal::root::tpm::{TpmConfig, TpmRoot};
use keyseal::root::RootOfTrust;
use keyseal::secrets::{SecretStore, SecretsConfig};
use keyseal::store::Store;
use keyseal::testkit::Swtpm;
use keyseal::testkit_hsm::SoftHsm;

pub mod audit;
pub mod daemon;
pub mod proxy;

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    SoftHsm,
    Tpm,
}

/// The device behind a test: keeps the emulator alive and can open the root
/// again (as a restarted daemon would).
pub enum Device {
    SoftHsm(SoftHsm),
    Tpm(Swtpm),
}

impl Device {
    pub fn start(b: Backend) -> Device {
        match b {
            Backend::SoftHsm => Device::SoftHsm(SoftHsm::new().unwrap()),
            Backend::Tpm => Device::Tpm(Swtpm::start().unwrap()),
        }
    }

    pub fn open_root(&self) -> Arc<dyn RootOfTrust> {
        match self {
            Device::SoftHsm(h) => Arc::new(Pkcs11Root::open(&h.config()).unwrap()),
            Device::Tpm(t) => Arc::new(
                TpmRoot::open(&TpmConfig {
                    tcti: t.tcti(),
                    auth_value: None,
                    pcrs: vec![],
                })
                .unwrap(),
            ),
        }
    }
}

/// A device, a temp store directory, and an opened, initialised SecretStore.
pub struct Fixture {
    pub device: Device,
    pub dir: tempfile::TempDir,
    pub cfg: SecretsConfig,
}

impl Fixture {
    pub fn new(b: Backend) -> (Fixture, SecretStore) {
        Self::with_config(b, SecretsConfig::default())
    }

    pub fn with_config(b: Backend, cfg: SecretsConfig) -> (Fixture, SecretStore) {
        let device = Device::start(b);
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture { device, dir, cfg };
        let root = f.device.open_root();
        let store = Store::open(&f.store_path()).unwrap();
        SecretStore::init(&store, root.as_ref()).unwrap();
        let s = SecretStore::open(store, root, f.cfg.clone()).unwrap();
        (f, s)
    }

    pub fn store_path(&self) -> std::path::PathBuf {
        self.dir.path().join("store")
    }

    /// Reopens store and root (drop the old SecretStore first).
    pub fn reopen(&self) -> SecretStore {
        let root = self.device.open_root();
        let store = Store::open(&self.store_path()).unwrap();
        SecretStore::open(store, root, self.cfg.clone()).unwrap()
    }
}

/// Generates one test per backend from a function `fn(Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn softhsm() {
                    super::$name($crate::common::Backend::SoftHsm)
                }
                #[test]
                fn swtpm() {
                    super::$name($crate::common::Backend::Tpm)
                }
            }
        )*
    };
}

/// `sled::open` of a store another handle of this process has just
/// dropped: sled's background threads can hold the file lock for a moment
/// after the last handle goes, so a lock conflict is retried for up to 10 s.
pub fn open_sled(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("sled::open({}): {e}", path.display()),
        }
    }
}
