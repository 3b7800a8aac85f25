//! Process hardening at start: no core dumps, not dumpable (no ptrace by
//! other uids, no /proc/PID/mem reads), memory locked where permitted so
//! plaintext DEKs are never swapped out.

use nix::sys::mman::{mlockall, MlockAllFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
use serde::Serialize;

/// Whether memory is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMemory {
    /// Lock when RLIMIT_MEMLOCK is unlimited (root, or `LimitMEMLOCK=infinity`).
    Auto,
    /// Lock or fail.
    Required,
    /// Do not lock.
    Off,
}

/// What [`harden`] achieved; logged at start and shown in status.
#[derive(Debug, Clone, Serialize)]
pub struct HardeningReport {
    pub core_dumps_disabled: bool,
    pub non_dumpable: bool,
    pub memory_locked: bool,
    /// Why memory is not locked, when it is not.
    pub memory_lock_note: Option<String>,
}

/// Hardens the current process. Fails only when `lock` is `Required` and
/// locking is impossible; everything else is best effort and reported.
pub fn harden(lock: LockMemory) -> Result<HardeningReport, String> {
    let core_dumps_disabled = setrlimit(Resource::RLIMIT_CORE, 0, 0).is_ok();
    let non_dumpable = nix::sys::prctl::set_dumpable(false).is_ok();
    let (memory_locked, memory_lock_note) = match lock {
        LockMemory::Off => (
            false,
            Some("disabled by config (memory.lock = \"off\")".to_owned()),
        ),
        LockMemory::Auto | LockMemory::Required => {
            // With a finite RLIMIT_MEMLOCK, MCL_FUTURE would make later
            // allocations fail once the limit is reached; only lock when
            // the limit is unlimited.
            let unlimited = matches!(getrlimit(Resource::RLIMIT_MEMLOCK), Ok((soft, _)) if soft == RLIM_INFINITY);
            if !unlimited {
                (false, Some("RLIMIT_MEMLOCK is finite; set LimitMEMLOCK=infinity (systemd) to lock memory".to_owned()))
            } else {
                // MCL_ONFAULT (Linux 4.4+): each page is locked when it is
                // first touched, so every page that ever held data stays out
                // of swap, but reserved address space is not populated.
                // Without it mlockall fills every mapping at once: the
                // allocator's 1 GiB arena reservation and each thread's
                // whole stack would become resident (measured: VmRSS 1 GiB
                // for a 1 GiB reservation, 14 MB with the flag).
                let flags = MlockAllFlags::MCL_CURRENT
                    | MlockAllFlags::MCL_FUTURE
                    | MlockAllFlags::from_bits_retain(libc::MCL_ONFAULT);
                match mlockall(flags) {
                    Ok(()) => (true, None),
                    Err(e) => (
                        false,
                        Some(format!(
                            "mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) failed: {e}"
                        )),
                    ),
                }
            }
        }
    };
    if lock == LockMemory::Required && !memory_locked {
        return Err(format!(
            "memory.lock = \"required\" but memory could not be locked: {}",
            memory_lock_note.as_deref().unwrap_or("unknown reason")
        ));
    }
    Ok(HardeningReport {
        core_dumps_disabled,
        non_dumpable,
        memory_locked,
        memory_lock_note,
    })
}

/// Removes a variable that carried a secret (the PKCS#11 PIN) from the
/// environment, including the exec-time copy `/proc/<pid>/environ` shows.
/// Call while the process has one thread.
pub fn scrub_env_var(name: &str) {
    crate::sys::scrub_env_var(name);
}
