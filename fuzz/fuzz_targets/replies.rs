//! Everything a client decodes from a server: option replies, reply
//! headers and chunk payloads, and whole replies put together by the
//! client's reply assembler.
//!
//! For the assembler, the first bytes pick the connection's mode and the
//! request (READ, BLOCK_STATUS or another command, its offset and length);
//! the rest is a stream of reply messages in a compact form the fuzzer
//! finds its way through easily (see `next_header`). A byte map of the READ buffer checks that no byte is
//! delivered twice and that a successful READ was delivered whole.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_proto::assemble::{Failure, Next, ReplyAssembler, Violation, reply_header_len};
use nbd_proto::consts::{
    EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, chunk, cmd,
};
use nbd_proto::option::{Info, MetaContext, OptionReplyHeader, ServerEntry};
use nbd_proto::reply::{Chunk, ReplyHeader, ReplyMode, encode_chunk_header, encode_simple};

/// The unread rest of the fuzzer's input.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    }
}

/// Bytes of the READ delivered so far (None: not yet).
struct ByteMap {
    offset: u64,
    bytes: Vec<Option<u8>>,
}

impl ByteMap {
    fn deliver(&mut self, at: u64, data: &[u8]) {
        let start = (at - self.offset) as usize;
        for (slot, &b) in self.bytes[start..start + data.len()].iter_mut().zip(data) {
            assert!(slot.is_none(), "byte {at}+ delivered twice");
            *slot = Some(b);
        }
    }
}

/// Chunk types a message picks from (the last: a raw type from the input).
const CHUNK_TYPES: [u16; 7] = [
    chunk::NONE,
    chunk::OFFSET_DATA,
    chunk::OFFSET_HOLE,
    chunk::BLOCK_STATUS,
    chunk::BLOCK_STATUS_EXT,
    chunk::ERROR,
    chunk::ERROR_OFFSET,
];

/// Builds the next reply header from a few input bytes (a form, then an
/// error value, or flags, a chunk type and a payload length) and decodes
/// it as the client would.
fn next_header(mode: ReplyMode, input: &mut Input) -> Option<ReplyHeader> {
    let form = input.byte()? % 3;
    let magic = [
        SIMPLE_REPLY_MAGIC,
        STRUCTURED_REPLY_MAGIC,
        EXTENDED_REPLY_MAGIC,
    ][usize::from(form)];
    let len = reply_header_len(magic, mode).ok()?;
    let mut raw = BytesMut::new();
    if form == 0 {
        encode_simple(&mut raw, input.byte()?.into(), 1);
    } else {
        let flags = input.byte()?.into();
        let pick = input.byte()?;
        let chunk_type = match CHUNK_TYPES.get(usize::from(pick & 0x7f) % 8) {
            Some(&t) => t,
            None => u16::from_be_bytes(input.take(2)?.try_into().unwrap()),
        };
        // Mostly short payloads, sometimes any length at all.
        let payload_len = if pick & 0x80 == 0 {
            u64::from(input.byte()?)
        } else if form == 2 {
            input.u64()?
        } else {
            u64::from(u32::from_be_bytes(input.take(4)?.try_into().unwrap()))
        };
        encode_chunk_header(&mut raw, form == 2, flags, chunk_type, 1, 0, payload_len);
    }
    assert_eq!(raw.len(), len);
    Some(ReplyHeader::decode(&raw).expect("an encoded header decodes"))
}

/// Feeds one reply message; None when the input ran out or the server
/// broke the rules (the connection would be dropped). Offsets of data and
/// hole chunks are taken relative to the request, so that the fuzzer
/// easily lands inside it.
fn message(
    a: &mut ReplyAssembler,
    mode: ReplyMode,
    map: &mut ByteMap,
    input: &mut Input,
) -> Option<()> {
    let header = next_header(mode, input)?;
    let relative = |input: &mut Input| {
        let rel = i8::from_be_bytes(input.take(1)?.try_into().unwrap());
        Some(map.offset.wrapping_add_signed(rel.into()))
    };
    let applied: Result<(), Violation> = match a.header(&header) {
        Err(v) => Err(v),
        Ok(Next::Complete) => Ok(()),
        Ok(Next::Data(dst)) => {
            let data = input.take(dst.len())?;
            dst.copy_from_slice(data);
            map.deliver(map.offset, data);
            Ok(())
        }
        Ok(Next::DataOffset(c)) => {
            let at = relative(input)?;
            match a.data_at(c, at) {
                Ok(dst) => {
                    let data = input.take(dst.len())?;
                    dst.copy_from_slice(data);
                    map.deliver(at, data);
                    Ok(())
                }
                Err(v) => Err(v),
            }
        }
        Ok(Next::Payload(c)) => {
            let mut payload = input.take(c.payload_len())?.to_vec();
            let hole = matches!(
                header,
                ReplyHeader::Chunk {
                    chunk_type: chunk::OFFSET_HOLE,
                    ..
                }
            );
            if hole && payload.len() >= 8 {
                let at = relative(&mut Input(&payload[..1]))?;
                payload[..8].copy_from_slice(&at.to_be_bytes());
            }
            let r = a.payload(c, &payload);
            if r.is_ok()
                && hole
                && let Ok(Chunk::Hole { offset, length }) =
                    Chunk::decode(chunk::OFFSET_HOLE, &payload)
            {
                map.deliver(offset, &vec![0; length as usize]);
            }
            r
        }
    };
    applied.ok()
}

fn assemble(data: &[u8]) -> Option<()> {
    let mut input = Input(data);
    let pick = input.byte()?;
    let mode = [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ][usize::from(pick % 3)];
    // Short requests, so that the fuzzer can also cover them whole.
    let length = u64::from(input.byte()?);
    let offset = input.u64()?;
    let selected = vec![0, 7];
    let mut a = match pick / 3 % 3 {
        0 => ReplyAssembler::read(offset, vec![0xee; length as usize], mode),
        1 => ReplyAssembler::block_status(offset, length, mode, selected.clone()),
        _ => ReplyAssembler::plain(cmd::WRITE, offset, length, mode),
    };
    let mut map = ByteMap {
        offset,
        bytes: vec![None; length as usize],
    };
    let is_read = a.command() == cmd::READ;
    while !a.is_done() {
        message(&mut a, mode, &mut map, &mut input)?;
    }
    let delivered = map.bytes.iter().filter(|b| b.is_some()).count() as u64;
    match a.finish() {
        Ok(out) if is_read => {
            let want: Vec<u8> = map
                .bytes
                .iter()
                .map(|b| b.expect("READ succeeded with a gap"))
                .collect();
            assert_eq!(out.data, want);
        }
        Ok(out) => {
            assert!(out.data.is_empty());
            if pick / 3 % 3 == 1 {
                assert!(!out.extents.is_empty());
                for (i, (id, extents)) in out.extents.iter().enumerate() {
                    assert!(selected.contains(id) && !extents.is_empty());
                    assert!(out.extents[..i].iter().all(|(other, _)| other != id));
                }
            }
        }
        Err(Failure::Violation(Violation::Incomplete { covered })) => {
            assert!(is_read && covered == delivered && covered < length);
        }
        Err(_) => {}
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let _ = OptionReplyHeader::decode(data);
    let _ = ReplyHeader::decode(data);
    let _ = Info::decode(data);
    let _ = MetaContext::decode(data);
    let _ = ServerEntry::decode(data);
    if data.len() >= 2 {
        let t = u16::from_be_bytes([data[0], data[1]]);
        let _ = Chunk::decode(t, &data[2..]);
    }
    assemble(data);
});
