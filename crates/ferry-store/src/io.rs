//! Positional I/O loops: short reads and writes, and EINTR, handled once.

use std::fs::File;
use std::io;

use rustix::io::Errno;

/// Fills `buf` from `off`; bytes past the end of the file read as zeroes.
pub(crate) fn pread_full(file: &File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pread(file, &mut *buf, off) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes all of `buf` at `off`.
pub(crate) fn pwrite_all(file: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pwrite(file, buf, off) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `fdatasync`, as an `io::Result`.
pub(crate) fn datasync(file: &File) -> io::Result<()> {
    rustix::fs::fdatasync(file).map_err(io::Error::from)
}
