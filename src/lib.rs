//! keyseal: secrets sealed under a hardware root of trust.
//!
//! See `docs/ARCHITECTURE.md` for the map. Layers, bottom up: [`root`]
//! (PKCS#11 / TPM), [`store`] (sled trees), [`envelope`] (DEKs, AES-256-GCM,
//! DEK cache), [`secrets`] (versioned KV), [`name`] (the name grammar).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod root;
pub mod testkit;
pub mod testkit_hsm;
pub mod envelope;
pub mod name;
pub mod secrets;
pub mod store;
