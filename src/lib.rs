//! keyseal: secrets sealed under a hardware root of trust.
//!
//! See `docs/ARCHITECTURE.md` for the map. Layers, bottom up: [`root`]
//! (PKCS#11 / TPM), [`store`] (sled trees), [`envelope`] (DEKs, AES-256-GCM,
//! DEK cache), [`secrets`] (versioned KV), [`name`] (the name grammar).
#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod api;
pub mod apikeys;
pub mod audit;
pub mod client;
pub mod config;
pub mod daemon;
pub mod envelope;
pub mod exit;
pub mod hardening;
pub mod identity;
pub mod keys;
pub mod name;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod root;
pub mod secrets;
pub mod smallfile;
pub mod store;
#[allow(unsafe_code)]
pub(crate) mod sys;
pub mod testkit;
pub mod testkit_hsm;
