//! A hostile server's handshake bytes, split at arbitrary points, fed to
//! the client handshake under every mix of what the client asks for.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_proto::client_handshake::*;
use nbd_proto::consts::OPTION_REPLY_HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, data)) = data.split_first() else { return };
    let mut cfg = ClientConfig::new(if knobs & 1 != 0 { "disk" } else { "" });
    cfg.structured = knobs & 2 != 0;
    cfg.extended = knobs & 4 != 0;
    cfg.list_contexts = knobs & 8 != 0;
    cfg.list_exports = knobs & 16 != 0;
    cfg.tls = knobs & 32 != 0;
    if knobs & 64 != 0 {
        cfg.meta_contexts = vec!["base:allocation".into(), "qemu:dirty-bitmap:c1".into()];
    }
    let mut hs = ClientHandshake::new(cfg);
    let step = (knobs as usize % 13) + 1;
    let mut input = BytesMut::new();
    for piece in data.chunks(step) {
        input.extend_from_slice(piece);
        match hs.feed(&mut input) {
            // What waits for the rest of a message stays bounded: the
            // client refuses longer option replies before buffering them.
            Ok(ClientStep::NeedMore) => {
                assert!(input.len() < OPTION_REPLY_HEADER_LEN + MAX_OPTION_REPLY as usize)
            }
            Ok(ClientStep::StartTls) => {
                input.clear();
                if hs.tls_established().is_err() {
                    return;
                }
            }
            _ => return,
        }
        let _ = hs.take_output();
    }
});
