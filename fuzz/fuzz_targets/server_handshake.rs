//! Arbitrary bytes, split at arbitrary points, fed to the server handshake.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_proto::option::ServerEntry;
use nbd_proto::server_handshake::*;

struct Cat;

impl Catalog for Cat {
    type Export = ();
    fn lookup(&self, name: &str, _: &Peer) -> Lookup<()> {
        if name.is_empty() || name == "disk" { Lookup::Found(()) } else { Lookup::Unknown }
    }
    fn info(&self, _: &()) -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size: 1 << 30,
            flags: 0,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 << 20,
            contexts: vec!["base:allocation".into()],
        }
    }
    fn list(&self, _: &Peer) -> Vec<ServerEntry> {
        vec![ServerEntry { name: "disk".into(), description: String::new() }]
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let tls = match split % 3 {
        0 => TlsMode::Off,
        1 => TlsMode::Allow,
        _ => TlsMode::Require,
    };
    let mut hs = ServerHandshake::new(HandshakeConfig { tls, max_option_len: 4096 });
    let step = (split as usize % 17) + 1;
    for piece in data.chunks(step) {
        let mut input = BytesMut::from(piece);
        match hs.feed(&mut input, &Cat) {
            Step::NeedMore => assert!(input.len() < 4096 + 16),
            Step::StartTls => hs.tls_established(vec![]),
            _ => break,
        }
        let _ = hs.take_output();
    }
});
