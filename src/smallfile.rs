//! Reading small files the daemon is pointed at (policy, CA bundles): a
//! regular file, opened without blocking, read up to a bound. A device, a
//! FIFO or a directory is refused before anything is read, so a bad path
//! can neither hold a worker (a FIFO's open waits for a writer) nor fill
//! memory (`/dev/zero` never ends).

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a small file could not be read.
#[derive(Debug)]
pub enum SmallFileError {
    Io(io::Error),
    NotAFile,
    TooLarge,
}

/// Opens `path` read-only with `O_NONBLOCK` and checks that it is a
/// regular file; returns it with its metadata (for owner/mode checks).
pub fn open_regular(path: &Path) -> Result<(File, Metadata), SmallFileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(SmallFileError::Io)?;
    let meta = file.metadata().map_err(SmallFileError::Io)?;
    if !meta.is_file() {
        return Err(SmallFileError::NotAFile);
    }
    Ok((file, meta))
}

/// Reads all of `file`, refusing more than `max` bytes.
pub fn read_bounded(file: File, max: u64) -> Result<Vec<u8>, SmallFileError> {
    let mut buf = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(SmallFileError::Io)?;
    if buf.len() as u64 > max {
        return Err(SmallFileError::TooLarge);
    }
    Ok(buf)
}
