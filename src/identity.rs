//! Who is calling: a [`PeerIdentity`] read from the kernel at accept, never
//! from request fields.
//!
//! [`Identifier::identify`] takes a connected Unix socket and returns:
//!
//! - `uid`, `gid`, `pid` from `SO_PEERCRED`. The kernel captured them when the
//!   peer called `connect()`, so they hold even if the peer has exited since.
//! - `groups`, `exe`, `exe_sha256`, `unit` from `/proc/PID`. These are read
//!   *now*, so a pid that was reused by another process would give someone
//!   else's attributes. The guard: pin the peer with a pidfd first
//!   (`SO_PEERPIDFD`, Linux ≥ 6.5, which names exactly the process that
//!   connected; else `pidfd_open(pid)` straight away), read `/proc/PID`, and
//!   then confirm through `/proc/self/fdinfo/<pidfd>` that the pinned process
//!   is still alive under the same pid. If it is not (or no pidfd could be
//!   had), every `/proc`-derived field is dropped: the identity then carries
//!   only what the kernel captured at connect, and policy selectors on exe or
//!   unit simply do not match (fail closed).
//!
//!   Residual window, kernels before 6.5 only: between the peer's `connect()`
//!   and our `pidfd_open(pid)`, the peer could exit and its pid be reused.
//!   `SO_PEERPIDFD` closes that window on newer kernels.
//! - `exe_sha256`: SHA-256 of the executable the process runs, hashed from
//!   `/proc/PID/exe` opened as a file (the very inode that was executed, even
//!   if the path was replaced since). Hashes are cached per file version,
//!   keyed by (device, inode, size, mtime, ctime), so each executable version
//!   is hashed once; the cache is a bounded LRU.
//! - `unit`: the systemd unit, from the process's cgroup (see
//!   [`parse_cgroup_unit`]). Units run by a *user's* systemd instance
//!   (`user@UID.service`) are named by that user, so they are recorded with
//!   `user_manager_uid` set and never match a policy `unit` selector.
//!
//! Reading `/proc/PID/exe` of another user's process needs privilege (root
//! or the same uid); when it fails `exe` stays `None`, which is not an error.
//!
//! [`Identifier::identify`] blocks (it reads `/proc`, may hash a file and
//! asks NSS for user and group names): call it from `spawn_blocking` in
//! async code.

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group, Uid, User};
use parking_lot::Mutex;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::sys;

/// How many executable versions the hash cache remembers.
pub const EXE_HASH_CACHE_CAPACITY: usize = 4096;

/// The caller of a connection, as the kernel knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerIdentity {
    /// Effective uid at `connect()` (`SO_PEERCRED`).
    pub uid: u32,
    /// Effective gid at `connect()` (`SO_PEERCRED`).
    pub gid: u32,
    /// Process id at `connect()`; `None` when the kernel gave none (0, e.g.
    /// a peer in a pid namespace we cannot see).
    pub pid: Option<i32>,
    /// Name of `uid`, if it resolves.
    pub user: Option<String>,
    /// Name of `gid`, if it resolves.
    pub group: Option<String>,
    /// Supplementary gids (`Groups:` of `/proc/PID/status`).
    pub groups: Vec<u32>,
    /// Names of `gid` and of the supplementary groups that resolve.
    pub group_names: Vec<String>,
    /// Path of the executable (`/proc/PID/exe`).
    #[serde(serialize_with = "serialize_path_lossy")]
    pub exe: Option<PathBuf>,
    /// SHA-256 of the executable, lowercase hex.
    pub exe_sha256: Option<String>,
    /// systemd unit from `/proc/PID/cgroup` (e.g. `app-a.service`), `None`
    /// when the process is not in a unit.
    pub unit: Option<String>,
    /// `Some(uid)` when `unit` runs under that user's own systemd instance
    /// (`user@UID.service`): the user chose its name, so policy `unit`
    /// selectors never match it.
    pub user_manager_uid: Option<u32>,
}

fn serialize_path_lossy<S: serde::Serializer>(
    p: &Option<PathBuf>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_some(&p.to_string_lossy()),
        None => s.serialize_none(),
    }
}

/// Text from the system (paths, names) made safe for one log line.
fn clean(s: &str) -> String {
    s.escape_debug().to_string()
}

/// Attributes a caller must all have (`None`: not checked): the one
/// matching rule behind policy selectors (`policy.rs`) and proxy caller
/// selectors (`proxy::model::CallerSelector`). A gid matches the primary
/// or a supplementary group; a group name any of the caller's group names;
/// a unit only a system unit (not one of a user's manager).
#[derive(Clone, Copy, Debug, Default)]
pub struct Attributes<'a> {
    pub uid: Option<u32>,
    pub user: Option<&'a str>,
    pub gid: Option<u32>,
    pub group: Option<&'a str>,
    pub unit: Option<&'a str>,
    pub exe: Option<&'a Path>,
    pub exe_sha256: Option<&'a str>,
}

impl Attributes<'_> {
    pub fn matches(&self, who: &PeerIdentity) -> bool {
        self.uid.map_or(true, |u| who.uid == u)
            && self.user.map_or(true, |u| who.user.as_deref() == Some(u))
            && self
                .gid
                .map_or(true, |g| who.gid == g || who.groups.contains(&g))
            && self
                .group
                .map_or(true, |g| who.group_names.iter().any(|n| n == g))
            && self.unit.map_or(true, |u| who.system_unit() == Some(u))
            && self.exe.map_or(true, |e| who.exe.as_deref() == Some(e))
            && self
                .exe_sha256
                .map_or(true, |h| who.exe_sha256.as_deref() == Some(h))
    }
}

impl PeerIdentity {
    /// An identity with only uid and gid known (no pid, names or `/proc`
    /// attributes). Useful for tests and for callers identified otherwise.
    pub fn new(uid: u32, gid: u32) -> Self {
        PeerIdentity {
            uid,
            gid,
            pid: None,
            user: None,
            group: None,
            groups: Vec::new(),
            group_names: Vec::new(),
            exe: None,
            exe_sha256: None,
            unit: None,
            user_manager_uid: None,
        }
    }

    /// The unit, when it is a system unit (not one of a user's manager).
    pub fn system_unit(&self) -> Option<&str> {
        match self.user_manager_uid {
            None => self.unit.as_deref(),
            Some(_) => None,
        }
    }

    /// One line for logs and audit, e.g.
    /// `uid=1000(alice) gid=1000 pid=123 unit=app.service exe=/usr/bin/x`.
    /// Absent parts are left out; system-provided text is escaped.
    pub fn display_short(&self) -> String {
        let mut s = format!("uid={}", self.uid);
        if let Some(u) = &self.user {
            let _ = write!(s, "({})", clean(u));
        }
        let _ = write!(s, " gid={}", self.gid);
        if let Some(pid) = self.pid {
            let _ = write!(s, " pid={pid}");
        }
        if let Some(unit) = &self.unit {
            let _ = write!(s, " unit={}", clean(unit));
            if let Some(m) = self.user_manager_uid {
                let _ = write!(s, "[user@{m}]");
            }
        }
        if let Some(exe) = &self.exe {
            let _ = write!(s, " exe={}", clean(&exe.to_string_lossy()));
        }
        s
    }

    /// A stable actor string for `created_by` fields: `unit:app.service
    /// uid:1001` for a system unit, else `uid:1000(alice)` or `uid:1000`.
    pub fn actor(&self) -> String {
        let mut s = String::new();
        if let Some(unit) = self.system_unit() {
            let _ = write!(s, "unit:{} ", clean(unit));
        }
        let _ = write!(s, "uid:{}", self.uid);
        if self.system_unit().is_none() {
            if let Some(u) = &self.user {
                let _ = write!(s, "({})", clean(u));
            }
        }
        s
    }
}

/// Why a caller could not be identified at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// `SO_PEERCRED` failed: not a connected Unix socket.
    #[error("no peer credentials on this socket (is it a connected Unix socket?): {0}")]
    NoPeerCredentials(#[source] nix::Error),
}

/// Identifies callers; holds the executable-hash cache. Share one per daemon.
pub struct Identifier {
    exe_hashes: Mutex<LruCache<ExeKey, String>>,
    hits: AtomicU64,
}

/// One version of one executable file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ExeKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

const CACHE_CAP: NonZeroUsize = match NonZeroUsize::new(EXE_HASH_CACHE_CAPACITY) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

impl Default for Identifier {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Identifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identifier")
            .field("cached_hashes", &self.cache_len())
            .field("cache_hits", &self.cache_hits())
            .finish()
    }
}

/// What was read from `/proc/PID` before the liveness check.
struct ProcSnapshot {
    exe: Option<PathBuf>,
    exe_file: Option<File>,
    groups: Vec<u32>,
    unit: Option<CgroupUnit>,
}

impl ProcSnapshot {
    fn read(pid: i32) -> Self {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let exe_link = dir.join("exe");
        let exe = std::fs::read_link(&exe_link).ok();
        let exe_file = exe.as_ref().and_then(|_| File::open(&exe_link).ok());
        let groups = std::fs::read_to_string(dir.join("status"))
            .map(|s| parse_status_groups(&s))
            .unwrap_or_default();
        let unit = std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|s| parse_cgroup_unit(&s));
        ProcSnapshot {
            exe,
            exe_file,
            groups,
            unit,
        }
    }
}

impl Identifier {
    /// An identifier with an empty hash cache.
    pub fn new() -> Self {
        Identifier {
            exe_hashes: Mutex::new(LruCache::new(CACHE_CAP)),
            hits: AtomicU64::new(0),
        }
    }

    /// Number of executable versions whose hash is cached.
    pub fn cache_len(&self) -> usize {
        self.exe_hashes.lock().len()
    }

    /// How many times a hash came from the cache instead of the file.
    pub fn cache_hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Identifies the peer of the connected Unix socket `fd` (see the module
    /// documentation for what is read and how PID reuse is guarded).
    /// Blocking.
    pub fn identify(&self, fd: BorrowedFd<'_>) -> Result<PeerIdentity, IdentityError> {
        let cred = getsockopt(&fd, PeerCredentials).map_err(IdentityError::NoPeerCredentials)?;
        let mut id = PeerIdentity::new(cred.uid(), cred.gid());
        id.pid = Some(cred.pid()).filter(|p| *p > 0);

        if let Some(pid) = id.pid {
            if let Some(pidfd) = pin_peer(fd, pid) {
                let snap = ProcSnapshot::read(pid);
                if pidfd_is_pid(&pidfd, pid) {
                    id.groups = snap.groups;
                    id.exe = snap.exe;
                    id.exe_sha256 = snap.exe_file.and_then(|f| self.exe_sha256(&f));
                    if let Some(u) = snap.unit {
                        id.unit = Some(u.name);
                        id.user_manager_uid = u.user_manager_uid;
                    }
                } else {
                    tracing::debug!(pid, "peer exited or pid changed during identification; /proc attributes dropped");
                }
            }
        }

        id.user = User::from_uid(Uid::from_raw(id.uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        id.group = group_name(id.gid);
        let mut gids = vec![id.gid];
        for g in &id.groups {
            if !gids.contains(g) {
                gids.push(*g);
            }
        }
        id.group_names = gids
            .into_iter()
            .filter_map(|g| {
                if g == id.gid {
                    id.group.clone()
                } else {
                    group_name(g)
                }
            })
            .collect();
        Ok(id)
    }

    /// SHA-256 of the open executable, from the cache when this version of
    /// the file was hashed before. `None` when the file cannot be read.
    fn exe_sha256(&self, file: &File) -> Option<String> {
        let m = file.metadata().ok()?;
        let key = ExeKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        };
        if let Some(h) = self.exe_hashes.lock().get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Some(h.clone());
        }
        // Hash outside the lock: a large binary must not stall other callers.
        let hex = sha256_file(file).ok()?;
        self.exe_hashes.lock().put(key, hex.clone());
        Some(hex)
    }
}

fn group_name(gid: u32) -> Option<String> {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// Lowercase hex SHA-256 of everything readable from `file` (from its
/// current offset; callers pass freshly opened files).
fn sha256_file(mut file: &File) -> io::Result<String> {
    let mut h = Sha256::new();
    io::copy(&mut file, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// A pidfd naming the peer, or `None` when the peer is gone or no pidfd can
/// be had (the caller then drops the `/proc` attributes).
fn pin_peer(sock: BorrowedFd<'_>, pid: i32) -> Option<OwnedFd> {
    match sys::peer_pidfd(sock) {
        Ok(sys::PeerPidfd::Fd(fd)) => Some(fd),
        Ok(sys::PeerPidfd::Gone) => None,
        Ok(sys::PeerPidfd::Unsupported) => match sys::pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!(pid, error = %e, "pidfd_open failed; /proc attributes dropped");
                None
            }
        },
        Err(e) => {
            tracing::warn!(pid, error = %e, "SO_PEERPIDFD failed; /proc attributes dropped");
            None
        }
    }
}

/// True when `pidfd` still names a live process whose pid is `pid`. The
/// kernel reports `Pid: -1` in the pidfd's fdinfo once the process is
/// reaped. Unreadable fdinfo counts as "no" (fail closed).
fn pidfd_is_pid(pidfd: &OwnedFd, pid: i32) -> bool {
    let path = format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd());
    match std::fs::read_to_string(Path::new(&path)) {
        Ok(info) => fdinfo_pid(&info) == Some(i64::from(pid)),
        Err(_) => false,
    }
}

/// The `Pid:` value of a pidfd's fdinfo text.
fn fdinfo_pid(info: &str) -> Option<i64> {
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Supplementary gids from the `Groups:` line of `/proc/PID/status`.
pub fn parse_status_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A systemd unit found in a cgroup path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupUnit {
    /// Unit name, e.g. `foo.service` or `session-3.scope`.
    pub name: String,
    /// `Some(uid)` when the unit belongs to `user@UID.service`, the user's
    /// own systemd instance.
    pub user_manager_uid: Option<u32>,
}

/// The systemd unit of a process, from the text of `/proc/PID/cgroup`.
///
/// Uses the cgroup v2 line (`0::/path`), else the v1 `name=systemd` line.
/// Like systemd itself, it skips leading `*.slice` components and takes the
/// first component after them, which must end in `.service` or `.scope`:
///
/// - `0::/system.slice/foo.service` → `foo.service`
/// - `0::/system.slice/foo.service/worker` → `foo.service` (a delegated
///   subtree cannot rename its unit: sub-cgroups are ignored)
/// - `0::/user.slice/user-1000.slice/session-3.scope` → `session-3.scope`
/// - `0::/user.slice/user-1000.slice/user@1000.service/app.slice/bar.service`
///   → `bar.service` with `user_manager_uid = Some(1000)`
/// - `0::/` or a non-systemd path → `None`
pub fn parse_cgroup_unit(cgroup: &str) -> Option<CgroupUnit> {
    let v2 = cgroup.lines().find_map(|l| l.strip_prefix("0::"));
    let v1 = cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        (ctrl == "name=systemd").then_some(path)
    });
    v2.and_then(unit_from_path)
        .or_else(|| v1.and_then(unit_from_path))
}

fn is_unit(c: &str) -> bool {
    (c.ends_with(".service") && c.len() > ".service".len())
        || (c.ends_with(".scope") && c.len() > ".scope".len())
}

fn unit_from_path(path: &str) -> Option<CgroupUnit> {
    let mut comps = path.trim().split('/').filter(|c| !c.is_empty());
    let first = comps.find(|c| !c.ends_with(".slice"))?;
    if !is_unit(first) {
        return None;
    }
    let manager = first
        .strip_prefix("user@")
        .and_then(|r| r.strip_suffix(".service"))
        .and_then(|u| u.parse::<u32>().ok());
    if let Some(uid) = manager {
        if let Some(inner) = comps
            .find(|c| !c.ends_with(".slice"))
            .filter(|c| is_unit(c))
        {
            return Some(CgroupUnit {
                name: inner.to_owned(),
                user_manager_uid: Some(uid),
            });
        }
    }
    Some(CgroupUnit {
        name: first.to_owned(),
        user_manager_uid: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_pid_line() {
        assert_eq!(
            fdinfo_pid("pos:\t0\nflags:\t02000002\nmnt_id:\t15\nPid:\t4242\nNSpid:\t4242\n"),
            Some(4242)
        );
        assert_eq!(fdinfo_pid("Pid:\t-1\n"), Some(-1));
        assert_eq!(fdinfo_pid("pos:\t0\n"), None);
    }

    #[test]
    fn pid_reuse_guard_rejects_a_reaped_process() {
        let me = std::process::id() as i32;
        let live = sys::pidfd_open(me).unwrap();
        assert!(pidfd_is_pid(&live, me));
        assert!(
            !pidfd_is_pid(&live, me + 1),
            "a pidfd never vouches for another pid"
        );

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let pinned = sys::pidfd_open(pid).unwrap();
        assert!(pidfd_is_pid(&pinned, pid) || child.try_wait().unwrap().is_some());
        child.wait().unwrap(); // reaped: the pid is free for reuse from here on
        assert!(
            !pidfd_is_pid(&pinned, pid),
            "whoever holds the pid now is not our peer"
        );
    }

    #[test]
    fn status_groups() {
        let s = "Name:\tx\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(parse_status_groups(s), vec![4, 24, 27]);
        assert_eq!(parse_status_groups("Groups:\t\n"), Vec::<u32>::new());
    }
}
