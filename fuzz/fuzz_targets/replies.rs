//! Everything a client decodes from a server: option replies, reply
//! headers and chunk payloads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::option::{Info, MetaContext, OptionReplyHeader, ServerEntry};
use nbd_proto::reply::{Chunk, ReplyHeader};

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
});
