//! Exit codes shared by `keyseald` and `keyseal` (sysexits-style), so
//! scripts and systemd can tell failures apart.

use crate::root::RootError;
use crate::secrets::SecretsError;
use crate::store::StoreError;

pub const OK: i32 = 0;
/// Any other failure.
pub const FAILURE: i32 = 1;
/// Bad command line.
pub const USAGE: i32 = 64;
/// Input data was refused (invalid name, value too large, CAS conflict...).
pub const DATA: i32 = 65;
/// Not found.
pub const NOT_FOUND: i32 = 66;
/// The root device (HSM/TPM) or the daemon is unreachable.
pub const UNAVAILABLE: i32 = 69;
/// Storage failure (disk full, corrupt store, store locked).
pub const IO: i32 = 74;
/// Cannot create the socket.
pub const CANT_CREATE: i32 = 73;
/// Permission denied / wrong PIN.
pub const NO_PERM: i32 = 77;
/// Configuration error or not initialised.
pub const CONFIG: i32 = 78;

/// The exit code for a root error.
pub fn of_root(e: &RootError) -> i32 {
    match e {
        RootError::Unavailable(_) | RootError::Device(_) => UNAVAILABLE,
        RootError::Auth(_) => NO_PERM,
        RootError::NotInitialised(_) | RootError::Config(_) => CONFIG,
        RootError::Integrity(_) => DATA,
        RootError::Unsupported(_) => DATA,
    }
}

/// The exit code for a secret-store error.
pub fn of_secrets(e: &SecretsError) -> i32 {
    match e {
        SecretsError::Root(r) => of_root(r),
        SecretsError::Store(StoreError::SchemaTooNew { .. }) => CONFIG,
        SecretsError::Store(_) => IO,
        SecretsError::NotInitialised => CONFIG,
        SecretsError::NotFound | SecretsError::VersionNotFound(_) => NOT_FOUND,
        _ => DATA,
    }
}
