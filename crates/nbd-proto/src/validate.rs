//! Server side of the transmission phase: whether a request header may be
//! carried out under the terms the handshake settled, and if not, which
//! error answers it (NBD spec "Request types" and "Error values"; the
//! digest's sections 4.6 and 4.7).
//!
//! The checks only read the header. The caller consumes any payload
//! ([`Request::payload_len`]) whatever the verdict, then answers a
//! refusal without touching the export.

use crate::consts::{cmd, cmdflag, errno, tflag};
use crate::reply::ReplyMode;
use crate::request::Request;

/// DF reads are served up to this size. The spec requires 64 KiB; the
/// reference nbd-server allows 1 MiB, and so do we.
pub const MAX_DF_READ: u64 = 1 << 20;

/// What the handshake settled for one connection, as far as requests are
/// concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub mode: ReplyMode,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Export size now (it is checked per request, so a resize is seen).
    pub size: u64,
    /// Largest READ/WRITE payload advertised.
    pub max_payload: u32,
    /// Minimum block size advertised: offsets and lengths must be
    /// multiples of it (1 accepts anything).
    pub min_block: u32,
    /// SET_META_CONTEXT selected at least one context for this export.
    pub has_contexts: bool,
}

/// A request refused before touching the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({})", errno::name(*.errno))]
pub struct Refusal {
    /// The NBD error value to answer with.
    pub errno: u32,
    pub message: &'static str,
}

fn refuse(errno: u32, message: &'static str) -> Result<(), Refusal> {
    Err(Refusal { errno, message })
}

impl Terms {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Command flags this command may carry on this connection.
    /// FUA is accepted everywhere, even where SEND_FUA was not advertised
    /// (clients in the wild set it on reads; it is harmless). None: the
    /// command is unknown. DISC never gets here: it has no reply.
    fn allowed_flags(&self, command: u16) -> Option<u16> {
        let extended = self.mode == ReplyMode::Extended;
        let mut allowed = cmdflag::FUA;
        match command {
            cmd::READ if self.has(tflag::SEND_DF) => allowed |= cmdflag::DF,
            cmd::READ | cmd::FLUSH | cmd::TRIM | cmd::CACHE => {}
            cmd::WRITE if extended => allowed |= cmdflag::PAYLOAD_LEN,
            cmd::WRITE => {}
            cmd::WRITE_ZEROES => {
                allowed |= cmdflag::NO_HOLE;
                if self.has(tflag::SEND_FAST_ZERO) {
                    allowed |= cmdflag::FAST_ZERO;
                }
            }
            cmd::BLOCK_STATUS => allowed |= cmdflag::REQ_ONE,
            _ => return None,
        }
        Some(allowed)
    }

    /// Checks a request header against the terms. The order of the checks
    /// decides which error a request that breaks several rules gets.
    pub fn validate(&self, req: &Request) -> Result<(), Refusal> {
        // Only a WRITE carries data. BLOCK_STATUS_PAYLOAD (a context
        // filter) is never advertised, so any other payload is unexpected.
        if req.command != cmd::WRITE && req.payload_len(self.mode == ReplyMode::Extended) > 0 {
            return refuse(errno::EINVAL, "unexpected payload");
        }
        let Some(allowed) = self.allowed_flags(req.command) else {
            return refuse(errno::EINVAL, "unknown command");
        };
        if req.flags & !allowed != 0 {
            return refuse(errno::EINVAL, "unsupported command flags");
        }
        let writes = matches!(req.command, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
        if writes && self.has(tflag::READ_ONLY) {
            return refuse(errno::EPERM, "export is read-only");
        }
        // FLUSH has no range: its offset and length should be 0, but
        // garbage there is not worth refusing.
        if req.command == cmd::FLUSH {
            return Ok(());
        }
        if req.offset > self.size || req.length > self.size - req.offset {
            return if matches!(req.command, cmd::WRITE | cmd::WRITE_ZEROES) {
                refuse(errno::ENOSPC, "request past the end of the export")
            } else {
                refuse(errno::EINVAL, "request past the end of the export")
            };
        }
        if !self.aligned(req) {
            return refuse(
                errno::EINVAL,
                "request not aligned to the minimum block size",
            );
        }
        let df = req.flags & cmdflag::DF != 0;
        match req.command {
            // The spec reserves EOVERFLOW for a DF read it will not serve
            // in one chunk; a plain READ or a WRITE above the advertised
            // maximum broke a rule the client was told, so EINVAL, as
            // qemu-nbd answers.
            cmd::READ if df && req.length > MAX_DF_READ.min(self.max_payload.into()) => {
                refuse(errno::EOVERFLOW, "DF read too large")
            }
            cmd::READ | cmd::WRITE if req.length > u64::from(self.max_payload) => {
                refuse(errno::EINVAL, "request larger than the maximum payload")
            }
            cmd::BLOCK_STATUS if !self.mode.structured() || !self.has_contexts => {
                refuse(errno::EINVAL, "no meta context negotiated")
            }
            cmd::BLOCK_STATUS if req.length == 0 => {
                refuse(errno::EINVAL, "zero-length block status")
            }
            _ => Ok(()),
        }
    }

    /// Offset and length are multiples of the minimum block size; a request
    /// may still end at an unaligned end of the export.
    fn aligned(&self, req: &Request) -> bool {
        let align = u64::from(self.min_block.max(1));
        req.offset.is_multiple_of(align)
            && (req.length.is_multiple_of(align) || req.offset + req.length == self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 30;
    const MAX: u32 = 32 << 20;

    fn terms(mode: ReplyMode, flags: u16) -> Terms {
        Terms {
            mode,
            flags: tflag::HAS_FLAGS | flags,
            size: SIZE,
            max_payload: MAX,
            min_block: 1,
            has_contexts: true,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    fn check(t: &Terms, r: Request) -> Result<(), (u32, &'static str)> {
        t.validate(&r).map_err(|e| (e.errno, e.message))
    }

    use ReplyMode::{Extended, Simple, Structured};
    const DF: u16 = tflag::SEND_DF;
    const RO: u16 = tflag::READ_ONLY;
    const FZ: u16 = tflag::SEND_FAST_ZERO;
    const EINVAL: u32 = errno::EINVAL;

    /// (reply mode, transmission flags, request, expected refusal or None).
    #[allow(clippy::type_complexity)]
    #[rustfmt::skip]
    const TABLE: &[(ReplyMode, u16, (u16, u16, u64, u64), Option<(u32, &str)>)] = &[
        // Every known command with plain flags.
        (Simple, 0, (cmd::READ, 0, 0, 4096), None),
        (Simple, 0, (cmd::WRITE, 0, 0, 4096), None),
        (Simple, 0, (cmd::FLUSH, 0, 0, 0), None),
        (Simple, 0, (cmd::TRIM, 0, 0, 4096), None),
        (Simple, 0, (cmd::CACHE, 0, 0, 4096), None),
        (Simple, 0, (cmd::WRITE_ZEROES, 0, 0, 4096), None),
        (Structured, 0, (cmd::BLOCK_STATUS, 0, 0, 4096), None),
        // Unknown commands, DISC included (it never reaches validation).
        (Simple, 0, (cmd::RESIZE, 0, 0, 0), Some((EINVAL, "unknown command"))),
        (Extended, 0, (99, 0, 0, 0), Some((EINVAL, "unknown command"))),
        (Simple, 0, (cmd::DISC, 0, 0, 0), Some((EINVAL, "unknown command"))),
        // FUA is accepted on every command.
        (Simple, 0, (cmd::READ, cmdflag::FUA, 0, 512), None),
        (Simple, 0, (cmd::WRITE, cmdflag::FUA, 0, 512), None),
        (Simple, 0, (cmd::FLUSH, cmdflag::FUA, 0, 0), None),
        (Simple, 0, (cmd::TRIM, cmdflag::FUA, 0, 512), None),
        (Simple, 0, (cmd::CACHE, cmdflag::FUA, 0, 512), None),
        (Simple, 0, (cmd::WRITE_ZEROES, cmdflag::FUA, 0, 512), None),
        (Structured, 0, (cmd::BLOCK_STATUS, cmdflag::FUA, 0, 512), None),
        // DF: only on READ, only when SEND_DF was advertised.
        (Structured, DF, (cmd::READ, cmdflag::DF, 0, 512), None),
        (Simple, 0, (cmd::READ, cmdflag::DF, 0, 512), Some((EINVAL, "unsupported command flags"))),
        (Structured, DF, (cmd::WRITE, cmdflag::DF, 0, 512), Some((EINVAL, "unsupported command flags"))),
        // NO_HOLE and FAST_ZERO: WRITE_ZEROES only; FAST_ZERO if advertised.
        (Simple, 0, (cmd::WRITE_ZEROES, cmdflag::NO_HOLE, 0, 512), None),
        (Simple, 0, (cmd::WRITE, cmdflag::NO_HOLE, 0, 512), Some((EINVAL, "unsupported command flags"))),
        (Simple, FZ, (cmd::WRITE_ZEROES, cmdflag::FAST_ZERO, 0, 512), None),
        (Simple, 0, (cmd::WRITE_ZEROES, cmdflag::FAST_ZERO, 0, 512), Some((EINVAL, "unsupported command flags"))),
        (Simple, FZ, (cmd::TRIM, cmdflag::FAST_ZERO, 0, 512), Some((EINVAL, "unsupported command flags"))),
        // REQ_ONE: BLOCK_STATUS only.
        (Structured, 0, (cmd::BLOCK_STATUS, cmdflag::REQ_ONE, 0, 512), None),
        (Structured, 0, (cmd::READ, cmdflag::REQ_ONE, 0, 512), Some((EINVAL, "unsupported command flags"))),
        // Undefined flag bits.
        (Extended, DF, (cmd::READ, 1 << 9, 0, 512), Some((EINVAL, "unsupported command flags"))),
        // PAYLOAD_LEN: a WRITE's with extended headers; elsewhere it
        // announces a payload nothing takes.
        (Extended, 0, (cmd::WRITE, cmdflag::PAYLOAD_LEN, 0, 512), None),
        (Extended, 0, (cmd::WRITE, 0, 0, 512), None),
        (Structured, 0, (cmd::WRITE, cmdflag::PAYLOAD_LEN, 0, 512), Some((EINVAL, "unsupported command flags"))),
        (Extended, 0, (cmd::READ, cmdflag::PAYLOAD_LEN, 0, 512), Some((EINVAL, "unexpected payload"))),
        (Extended, tflag::BLOCK_STATUS_PAYLOAD, (cmd::BLOCK_STATUS, cmdflag::PAYLOAD_LEN, 0, 12), Some((EINVAL, "unexpected payload"))),
        (Extended, 0, (99, cmdflag::PAYLOAD_LEN, 0, 8), Some((EINVAL, "unexpected payload"))),
        // Read-only: EPERM for what writes, before any range check.
        (Simple, RO, (cmd::WRITE, 0, 0, 512), Some((errno::EPERM, "export is read-only"))),
        (Simple, RO, (cmd::WRITE_ZEROES, 0, SIZE, 512), Some((errno::EPERM, "export is read-only"))),
        (Simple, RO, (cmd::TRIM, 0, 0, 512), Some((errno::EPERM, "export is read-only"))),
        (Simple, RO, (cmd::READ, 0, 0, 512), None),
        (Simple, RO, (cmd::FLUSH, 0, 0, 0), None),
        (Simple, RO, (cmd::CACHE, 0, 0, 512), None),
        (Structured, RO, (cmd::BLOCK_STATUS, 0, 0, 512), None),
        // Past the end: ENOSPC for what writes data, EINVAL otherwise;
        // bounds computed without overflow.
        (Simple, 0, (cmd::WRITE, 0, SIZE - 512, 1024), Some((errno::ENOSPC, "request past the end of the export"))),
        (Simple, 0, (cmd::WRITE_ZEROES, 0, u64::MAX - 511, 1024), Some((errno::ENOSPC, "request past the end of the export"))),
        (Simple, 0, (cmd::READ, 0, SIZE, 1), Some((EINVAL, "request past the end of the export"))),
        (Simple, 0, (cmd::READ, 0, u64::MAX, u64::MAX), Some((EINVAL, "request past the end of the export"))),
        (Simple, 0, (cmd::TRIM, 0, SIZE + 1, 0), Some((EINVAL, "request past the end of the export"))),
        (Simple, 0, (cmd::CACHE, 0, 1, SIZE), Some((EINVAL, "request past the end of the export"))),
        (Structured, 0, (cmd::BLOCK_STATUS, 0, SIZE - 1, 2), Some((EINVAL, "request past the end of the export"))),
        (Simple, 0, (cmd::READ, 0, SIZE - 512, 512), None),
        (Simple, 0, (cmd::READ, 0, SIZE, 0), None),
        // FLUSH has no range to check.
        (Simple, 0, (cmd::FLUSH, 0, u64::MAX, u64::MAX), None),
        // Payload size: EINVAL above the maximum for READ and WRITE.
        (Simple, 0, (cmd::READ, 0, 0, MAX as u64), None),
        (Simple, 0, (cmd::READ, 0, 0, MAX as u64 + 1), Some((EINVAL, "request larger than the maximum payload"))),
        (Structured, DF, (cmd::READ, 0, 0, MAX as u64 + 1), Some((EINVAL, "request larger than the maximum payload"))),
        (Simple, 0, (cmd::WRITE, 0, 0, MAX as u64 + 1), Some((EINVAL, "request larger than the maximum payload"))),
        (Extended, 0, (cmd::WRITE, cmdflag::PAYLOAD_LEN, 0, MAX as u64 + 1), Some((EINVAL, "request larger than the maximum payload"))),
        // Payload-less commands may go far past the maximum payload.
        (Simple, 0, (cmd::TRIM, 0, 0, SIZE), None),
        (Simple, 0, (cmd::WRITE_ZEROES, 0, 0, SIZE), None),
        (Simple, 0, (cmd::CACHE, 0, 0, SIZE), None),
        (Extended, 0, (cmd::BLOCK_STATUS, 0, 0, SIZE), None),
        // DF reads: EOVERFLOW above what is served in one chunk.
        (Structured, DF, (cmd::READ, cmdflag::DF, 0, MAX_DF_READ), None),
        (Structured, DF, (cmd::READ, cmdflag::DF, 0, MAX_DF_READ + 1), Some((errno::EOVERFLOW, "DF read too large"))),
        (Extended, DF, (cmd::READ, cmdflag::DF | cmdflag::FUA, 0, MAX as u64 + 1), Some((errno::EOVERFLOW, "DF read too large"))),
        // BLOCK_STATUS needs structured replies, a context and a length.
        (Simple, 0, (cmd::BLOCK_STATUS, 0, 0, 512), Some((EINVAL, "no meta context negotiated"))),
        (Structured, 0, (cmd::BLOCK_STATUS, 0, 0, 0), Some((EINVAL, "zero-length block status"))),
        (Extended, 0, (cmd::BLOCK_STATUS, cmdflag::REQ_ONE, SIZE, 0), Some((EINVAL, "zero-length block status"))),
        // Zero-length I/O other than block status is answered, not refused.
        (Simple, 0, (cmd::READ, 0, 0, 0), None),
        (Extended, 0, (cmd::WRITE, cmdflag::PAYLOAD_LEN, 0, 0), None),
        (Simple, 0, (cmd::TRIM, 0, 0, 0), None),
    ];

    #[test]
    fn the_rules_table() {
        for &(mode, flags, (command, cflags, offset, length), want) in TABLE {
            let got = check(&terms(mode, flags), req(command, cflags, offset, length));
            assert_eq!(
                got,
                want.map_or(Ok(()), Err),
                "{mode:?} flags {flags:#x}: {} flags {cflags:#x} at {offset} length {length}",
                cmd::name(command)
            );
        }
    }

    #[test]
    fn block_status_without_contexts() {
        let t = Terms {
            has_contexts: false,
            ..terms(Extended, 0)
        };
        assert_eq!(
            check(&t, req(cmd::BLOCK_STATUS, 0, 0, 512)),
            Err((EINVAL, "no meta context negotiated"))
        );
    }

    #[test]
    fn minimum_block_size() {
        let size = 10 * 4096 + 512;
        let t = Terms {
            min_block: 4096,
            size,
            ..terms(Structured, 0)
        };
        let misaligned = Err((EINVAL, "request not aligned to the minimum block size"));
        for (command, offset, length, want) in [
            (cmd::READ, 4096, 8192, Ok(())),
            (cmd::READ, 512, 4096, misaligned),
            (cmd::WRITE, 0, 4096 + 512, misaligned),
            (cmd::TRIM, 4096, 1, misaligned),
            (cmd::BLOCK_STATUS, 0, 512, misaligned),
            // The unaligned tail of the export can be reached.
            (cmd::READ, 8 * 4096, 2 * 4096 + 512, Ok(())),
            (cmd::WRITE_ZEROES, 10 * 4096, 512, Ok(())),
            // Ranges past the end are refused as such, not as misaligned.
            (
                cmd::WRITE,
                10 * 4096,
                4096,
                Err((errno::ENOSPC, "request past the end of the export")),
            ),
            // FLUSH has no range.
            (cmd::FLUSH, 1, 1, Ok(())),
        ] {
            assert_eq!(
                check(&t, req(command, 0, offset, length)),
                want,
                "{} at {offset} length {length}",
                cmd::name(command)
            );
        }
    }

    #[test]
    fn df_limit_follows_a_small_maximum_payload() {
        let t = Terms {
            max_payload: 256 << 10,
            ..terms(Structured, DF)
        };
        assert_eq!(check(&t, req(cmd::READ, cmdflag::DF, 0, 256 << 10)), Ok(()));
        assert_eq!(
            check(&t, req(cmd::READ, cmdflag::DF, 0, (256 << 10) + 1)),
            Err((errno::EOVERFLOW, "DF read too large"))
        );
    }

    #[test]
    fn payload_that_follows_the_header() {
        for (command, flags, extended, want) in [
            (cmd::WRITE, 0, false, 4096),
            (cmd::WRITE, 0, true, 4096),
            (cmd::WRITE, cmdflag::PAYLOAD_LEN, true, 4096),
            (cmd::READ, 0, true, 0),
            (cmd::READ, cmdflag::PAYLOAD_LEN, true, 4096),
            // In compact form the flag means nothing on the wire.
            (cmd::READ, cmdflag::PAYLOAD_LEN, false, 0),
            (cmd::BLOCK_STATUS, cmdflag::PAYLOAD_LEN, true, 4096),
            (cmd::TRIM, 0, false, 0),
        ] {
            assert_eq!(
                req(command, flags, 0, 4096).payload_len(extended),
                want,
                "{} flags {flags:#x} extended {extended}",
                cmd::name(command)
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_terms() -> impl Strategy<Value = Terms> {
            (
                prop_oneof![Just(Simple), Just(Structured), Just(Extended)],
                any::<u16>(),
                any::<u64>(),
                any::<u32>(),
                0u32..=16,
                any::<bool>(),
            )
                .prop_map(|(mode, flags, size, max_payload, shift, has_contexts)| {
                    Terms {
                        mode,
                        flags,
                        size,
                        max_payload,
                        min_block: 1 << shift,
                        has_contexts,
                    }
                })
        }

        fn any_request() -> impl Strategy<Value = Request> {
            (
                0u16..10,
                any::<u16>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            )
                .prop_map(|(command, flags, cookie, offset, length)| Request {
                    flags,
                    command,
                    cookie,
                    offset,
                    length,
                })
        }

        proptest! {
            /// Whatever passes is safe to carry out: inside the export,
            /// within the payload limit, with no stray payload and only
            /// flags the command takes.
            #[test]
            fn accepted_requests_are_safe(t in any_terms(), r in any_request()) {
                if t.validate(&r).is_ok() {
                    let extended = t.mode == Extended;
                    prop_assert!(r.command == cmd::WRITE || r.payload_len(extended) == 0);
                    prop_assert_eq!(r.flags & !t.allowed_flags(r.command).unwrap(), 0);
                    if r.command != cmd::FLUSH {
                        prop_assert!(r.offset.checked_add(r.length).is_some_and(|end| end <= t.size));
                    }
                    if matches!(r.command, cmd::READ | cmd::WRITE) {
                        prop_assert!(r.length <= u64::from(t.max_payload));
                    }
                    if r.flags & cmdflag::DF != 0 {
                        prop_assert!(r.length <= MAX_DF_READ);
                    }
                    if matches!(r.command, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM) {
                        prop_assert!(!t.has(tflag::READ_ONLY));
                    }
                    if r.command == cmd::BLOCK_STATUS {
                        prop_assert!(t.mode.structured() && t.has_contexts && r.length > 0);
                    }
                }
            }

            /// ENOSPC answers only a write of data past the end.
            #[test]
            fn enospc_only_for_writes_past_the_end(t in any_terms(), r in any_request()) {
                if let Err(e) = t.validate(&r)
                    && e.errno == errno::ENOSPC
                {
                    let inside = r.offset.checked_add(r.length).is_some_and(|end| end <= t.size);
                    prop_assert!(!inside);
                    prop_assert!(matches!(r.command, cmd::WRITE | cmd::WRITE_ZEROES));
                }
            }
        }
    }
}
