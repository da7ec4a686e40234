//! Request headers in both forms, then the server's verdict on them.
//!
//! The bytes after the header pick the negotiated terms; whatever the
//! terms, a request that passes validation must be safe to carry out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::Reader;
use nbd_proto::consts::{cmd, cmdflag, tflag};
use nbd_proto::reply::ReplyMode;
use nbd_proto::request::Request;
use nbd_proto::validate::{MAX_DF_READ, Terms};

/// Terms from the fuzzer's bytes, or a typical export if there are too few.
fn terms(seed: &[u8]) -> Terms {
    let mut r = Reader::new(seed);
    let parsed = (|| {
        let mode = [
            ReplyMode::Simple,
            ReplyMode::Structured,
            ReplyMode::Extended,
        ][usize::from(r.u16().ok()? % 3)];
        Some(Terms {
            mode,
            flags: r.u16().ok()?,
            size: r.u64().ok()?,
            max_payload: r.u32().ok()?,
            min_block: 1 << (r.u16().ok()? % 17),
            has_contexts: r.u16().ok()? & 1 != 0,
        })
    })();
    parsed.unwrap_or(Terms {
        mode: ReplyMode::Structured,
        flags: tflag::HAS_FLAGS | tflag::SEND_DF | tflag::SEND_FLUSH,
        size: 1 << 30,
        max_payload: 32 << 20,
        min_block: 1,
        has_contexts: true,
    })
}

fuzz_target!(|data: &[u8]| {
    for extended in [false, true] {
        let Ok(req) = Request::decode(data, extended) else {
            continue;
        };
        let mut b = bytes::BytesMut::new();
        if extended || req.length <= u32::MAX as u64 {
            req.encode(&mut b, extended);
            assert_eq!(Request::decode(&b, extended).unwrap(), req);
        }
        let mut t = terms(&data[Request::header_len(extended)..]);
        t.mode = match (extended, t.mode) {
            (true, _) => ReplyMode::Extended,
            (false, ReplyMode::Extended) => ReplyMode::Structured,
            (false, m) => m,
        };
        let payload = req.payload_len(extended);
        if !extended {
            assert!(payload <= u64::from(u32::MAX));
        }
        if t.validate(&req).is_err() {
            continue;
        }
        assert!(
            req.command == cmd::WRITE || payload == 0,
            "stray payload accepted"
        );
        if req.command != cmd::FLUSH {
            let end = req.offset.checked_add(req.length);
            assert!(
                end.is_some_and(|e| e <= t.size),
                "range past the end accepted"
            );
            let align = u64::from(t.min_block);
            assert!(
                req.offset.is_multiple_of(align),
                "misaligned offset accepted"
            );
        }
        if matches!(req.command, cmd::READ | cmd::WRITE) {
            assert!(
                req.length <= u64::from(t.max_payload),
                "oversized payload accepted"
            );
        }
        if req.flags & cmdflag::DF != 0 {
            assert!(req.length <= MAX_DF_READ && t.flags & tflag::SEND_DF != 0);
        }
        if matches!(req.command, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM) {
            assert!(
                t.flags & tflag::READ_ONLY == 0,
                "write to a read-only export accepted"
            );
        }
        if req.command == cmd::BLOCK_STATUS {
            assert!(t.mode.structured() && t.has_contexts && req.length > 0);
        }
    }
});
