//! The socket side of zero-copy read replies: a writer half that, on a
//! plain TCP or Unix socket, sends file bytes with `sendfile(2)` straight
//! from the page cache (the two copies file → buffer → socket become
//! none), and writes a reply's header with `MSG_MORE` so that it leaves in
//! one segment with the data behind it. Over TLS the bytes must pass
//! through user space to be encrypted: there the file is mapped and the
//! encryption copies from the mapping, one copy instead of a read into a
//! buffer and a second copy into the TLS record.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendFlags};
use tokio::io::{AsyncWrite, Interest};

/// Most bytes one fallback step reads into a buffer.
const COPY_STEP: usize = 256 << 10;

/// A connection's writer half, as the reply writer uses it.
pub trait ReplyWrite: AsyncWrite + Send + Unpin {
    /// Whether file bytes are better sent from the file at send time than
    /// read into a buffer first: without passing through user space (plain
    /// sockets), or from a mapping (TLS). Otherwise they are read and
    /// written.
    fn sends_files(&self) -> bool {
        false
    }

    /// Sends up to `len` bytes of `file` at `offset`; Ok(0) at the end of
    /// the file.
    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        poll_copy_file(self, cx, file, offset, len)
    }

    /// Writes `bufs`, which file bytes follow at once.
    fn poll_write_more(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write_vectored(cx, bufs)
    }
}

impl<T: ReplyWrite + ?Sized> ReplyWrite for Box<T> {
    fn sends_files(&self) -> bool {
        (**self).sends_files()
    }
    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_send_file(cx, file, offset, len)
    }
    fn poll_write_more(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        (**self).poll_write_more(cx, bufs)
    }
}

/// The TLS writer: file bytes go to rustls straight from a mapping of the
/// page cache, and its copy into the record it encrypts is the only one
/// (a read into a buffer first would be a second).
impl<S: tokio::io::AsyncRead + AsyncWrite + Unpin + Send> ReplyWrite
    for tokio::io::WriteHalf<nbd_tls::server::TlsStream<S>>
{
    fn sends_files(&self) -> bool {
        true
    }
    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        match Mapped::new(file, offset, len.min(COPY_STEP)) {
            Some(map) => Pin::new(self).poll_write(cx, map.bytes()),
            None => poll_copy_file(self, cx, file, offset, len),
        }
    }
}

/// A read-only shared mapping of part of a file, unmapped on drop.
struct Mapped {
    base: *mut std::ffi::c_void,
    map_len: usize,
    lead: usize,
    len: usize,
}

impl Mapped {
    /// Maps `[offset, offset + len)`; None where it cannot be mapped, or
    /// where the range is no longer inside a regular file (a page past the
    /// end of a file that shrank under us would fault: SIGBUS).
    fn new(file: &File, offset: u64, len: usize) -> Option<Mapped> {
        let page = rustix::param::page_size() as u64;
        let start = offset - offset % page;
        let lead = (offset - start) as usize;
        let stat = rustix::fs::fstat(file).ok()?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile
            && offset + len as u64 > stat.st_size as u64
        {
            return None;
        }
        let map_len = lead + len;
        // SAFETY: a fresh mapping at an address the kernel picks, of a file
        // we hold open; nothing else refers to that address range. POPULATE
        // maps the (cached) pages at once instead of faulting them in.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                map_len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::POPULATE,
                file,
                start,
            )
        }
        .ok()?;
        Some(Mapped {
            base,
            map_len,
            lead,
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the range lies inside the mapping, which lives as long as
        // `self`. Another connection's write can change these bytes while
        // they are copied, as it could during a pread: the reply rules
        // already let a READ racing a WRITE see either.
        unsafe { std::slice::from_raw_parts(self.base.cast::<u8>().add(self.lead), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no slice of it
        // outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.base, self.map_len) };
    }
}

/// Reads a piece of the file and writes it (the path for streams that
/// cannot take file bytes directly, and for files the kernel will not
/// splice). A write that is not ready wastes the read; it is a fallback.
fn poll_copy_file<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    cx: &mut Context<'_>,
    file: &File,
    offset: u64,
    len: usize,
) -> Poll<io::Result<usize>> {
    let mut buf = vec![0u8; len.min(COPY_STEP)];
    let n = loop {
        match rustix::io::pread(file, &mut buf, offset) {
            Err(Errno::INTR) => {}
            r => break r?,
        }
    };
    if n == 0 {
        return Poll::Ready(Ok(0));
    }
    Pin::new(w).poll_write(cx, &buf[..n])
}

/// A socket whose writes wait for readiness through tokio.
trait Socket: AsFd {
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_write_io<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

impl Socket for tokio::net::TcpStream {
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_write_ready(self, cx)
    }
    fn try_write_io<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(Interest::WRITABLE, f)
    }
}

impl Socket for tokio::net::UnixStream {
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::UnixStream::poll_write_ready(self, cx)
    }
    fn try_write_io<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(Interest::WRITABLE, f)
    }
}

/// Runs a non-blocking system call on `s` once it is writable.
fn poll_socket<S: Socket, R>(
    s: &S,
    cx: &mut Context<'_>,
    mut call: impl FnMut(BorrowedFd<'_>) -> Result<R, Errno>,
) -> Poll<io::Result<R>> {
    loop {
        ready!(s.poll_write_ready(cx))?;
        match s.try_write_io(|| {
            loop {
                match call(s.as_fd()) {
                    Err(Errno::INTR) => {}
                    r => return r.map_err(io::Error::from),
                }
            }
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return Poll::Ready(r),
        }
    }
}

/// sendfile(2) refuses some files (no splice support): they are copied.
fn refused(e: Errno) -> bool {
    matches!(e, Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)
}

/// sendfile(2) on `s`; None when the kernel refuses this file.
fn try_sendfile<S: Socket>(
    s: &S,
    cx: &mut Context<'_>,
    file: &File,
    offset: u64,
    len: usize,
) -> Option<Poll<io::Result<usize>>> {
    let mut refusal = false;
    let r = poll_socket(s, cx, |fd| {
        let mut off = offset;
        match rustix::fs::sendfile(fd, file, Some(&mut off), len) {
            Err(e) if refused(e) => {
                refusal = true;
                Ok(0)
            }
            r => r,
        }
    });
    (!refusal).then_some(r)
}

fn poll_send_more<S: Socket>(
    s: &S,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    poll_socket(s, cx, |fd| {
        rustix::net::sendmsg(
            fd,
            bufs,
            &mut SendAncillaryBuffer::default(),
            SendFlags::MORE | SendFlags::NOSIGNAL,
        )
    })
}

/// The writer half of a plain socket: file bytes by sendfile, headers with
/// MSG_MORE. One body for the TCP and the Unix half, which differ only in
/// the stream they refer to.
macro_rules! socket_half {
    ($half:ty) => {
        impl ReplyWrite for $half {
            fn sends_files(&self) -> bool {
                true
            }
            fn poll_send_file(
                &mut self,
                cx: &mut Context<'_>,
                file: &File,
                offset: u64,
                len: usize,
            ) -> Poll<io::Result<usize>> {
                match try_sendfile(self.as_ref(), cx, file, offset, len) {
                    Some(sent) => sent,
                    None => poll_copy_file(self, cx, file, offset, len),
                }
            }
            fn poll_write_more(
                &mut self,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                poll_send_more(self.as_ref(), cx, bufs)
            }
        }
    };
}

socket_half!(tokio::net::tcp::OwnedWriteHalf);
socket_half!(tokio::net::unix::OwnedWriteHalf);
