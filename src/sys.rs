//! The crate's only `unsafe` code: two Linux calls that nix 0.29 does not wrap.
//!
//! The crate root denies `unsafe_code`; this module alone allows it (see the
//! `#[allow(unsafe_code)]` on its declaration in `lib.rs`). Every unsafe block
//! here is a single libc call plus, on success, taking ownership of the file
//! descriptor the kernel just returned. Why each one is sound:
//!
//! - [`peer_pidfd`]: `getsockopt(SO_PEERPIDFD)` is given a pointer to a live,
//!   properly aligned `c_int` on our stack and a `socklen_t` holding its exact
//!   size, so the kernel writes at most `size_of::<c_int>()` bytes into memory
//!   we own. The socket descriptor comes from a `BorrowedFd`, so it is open
//!   for the duration of the call. On success the returned value is a new
//!   descriptor installed in our table that nothing else refers to, so
//!   wrapping it in an `OwnedFd` (which closes it exactly once) is sound.
//! - [`pidfd_open`]: the raw `pidfd_open(2)` syscall takes only integers (a
//!   pid and a flags word of 0) and touches no memory of ours. A non-negative
//!   result is a fresh descriptor owned by nobody else; wrapping it in an
//!   `OwnedFd` is sound for the same reason as above.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc;

/// `SO_PEERPIDFD` (Linux 6.5). Not exported by the libc crate yet; the value
/// is 77 in the generic socket ABI and 0x56 on SPARC.
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_PEERPIDFD: libc::c_int = 77;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_PEERPIDFD: libc::c_int = 0x56;

/// What `SO_PEERPIDFD` said about the peer of a socket.
#[derive(Debug)]
pub(crate) enum PeerPidfd {
    /// A pidfd for exactly the process that connected.
    Fd(OwnedFd),
    /// The kernel does not support `SO_PEERPIDFD` (before 6.5) or has no pid
    /// for this peer; the caller may fall back to `pidfd_open(pid)`.
    Unsupported,
    /// The connecting process is gone. Falling back to `pidfd_open(pid)`
    /// would be wrong here: the pid may already belong to someone else.
    Gone,
}

/// Asks the kernel for a pidfd of the process at the other end of the
/// connected Unix socket `sock`.
pub(crate) fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<PeerPidfd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: see the module documentation (`peer_pidfd`).
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOPROTOOPT) | Some(libc::ENODATA) | Some(libc::EINVAL) => {
                Ok(PeerPidfd::Unsupported)
            }
            Some(libc::ESRCH) => Ok(PeerPidfd::Gone),
            _ => Err(err),
        };
    }
    if fd < 0 {
        return Ok(PeerPidfd::Unsupported);
    }
    // SAFETY: see the module documentation (`peer_pidfd`).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(PeerPidfd::Fd(owned))
}

/// `pidfd_open(pid, 0)`: a pidfd for whatever process holds `pid` now.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: see the module documentation (`pidfd_open`).
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = libc::c_int::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: see the module documentation (`pidfd_open`).
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok(owned)
}

/// Takes ownership of a descriptor inherited from the service manager
/// (systemd socket activation passes listening sockets from fd 3 on).
///
/// Soundness: `from_raw_fd` requires that `fd` is open and owned by nobody
/// else. We check it is open with `fcntl(F_GETFD)` and that it is a socket
/// with `fstat`; by the socket-activation protocol the process inherited it
/// for exactly this use, and the caller clears `LISTEN_FDS` so no other code
/// takes it a second time.
pub(crate) fn take_inherited_fd(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: fcntl with F_GETFD only reads descriptor flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::other(format!(
            "LISTEN_FDS is set but fd {fd} is not open"
        )));
    }
    // SAFETY: `st` is a properly sized, writable stat buffer on our stack.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 || (st.st_mode & libc::S_IFMT) != libc::S_IFSOCK {
        return Err(io::Error::other(format!(
            "LISTEN_FDS is set but fd {fd} is not a socket"
        )));
    }
    // SAFETY: see the function comment: open, a socket, inherited for us, taken once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes `name` from this process's environment and first overwrites its
/// value with zeros where the kernel shows it: `/proc/<pid>/environ` reads
/// the exec-time environment block in place, which `remove_var` alone
/// leaves untouched. For a PIN passed in the environment.
///
/// Call only while the process has a single thread (keyseald does it at the
/// top of `main`): the C environment is not thread-safe.
pub fn scrub_env_var(name: &str) {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return;
    };
    // SAFETY: single-threaded by contract, so nothing modifies the
    // environment concurrently. getenv returns null or a pointer to the
    // NUL-terminated value inside the live environment block, which is
    // writable process memory (the initial stack for exec-time variables);
    // strlen stays within it and write_volatile writes only those bytes.
    unsafe {
        let p = libc::getenv(cname.as_ptr());
        if !p.is_null() {
            let len = libc::strlen(p);
            for i in 0..len {
                std::ptr::write_volatile(p.add(i), 0);
            }
        }
    }
    std::env::remove_var(name);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn fdinfo_pid(fd: &OwnedFd) -> String {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut it = rel
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (major, minor)
    }

    #[test]
    fn peer_pidfd_of_a_socketpair_names_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        match peer_pidfd(a.as_fd()).unwrap() {
            PeerPidfd::Fd(fd) => assert_eq!(fdinfo_pid(&fd), std::process::id().to_string()),
            PeerPidfd::Unsupported => {
                assert!(!kernel_at_least(6, 5), "SO_PEERPIDFD exists from 6.5")
            }
            PeerPidfd::Gone => panic!("this process is alive"),
        }
    }

    #[test]
    fn pidfd_open_own_pid_and_bad_pid() {
        let fd = pidfd_open(std::process::id() as i32).unwrap();
        assert_eq!(fdinfo_pid(&fd), std::process::id().to_string());
        assert!(pidfd_open(-1).is_err());
    }
}
