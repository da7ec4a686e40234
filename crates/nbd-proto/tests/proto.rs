//! Round-trip properties of the codecs and scripted sessions against the
//! server handshake state machine, including hostile input.

use bytes::{BufMut, BytesMut};
use nbd_proto::consts::*;
use nbd_proto::option::*;
use nbd_proto::reply::*;
use nbd_proto::request::Request;
use nbd_proto::server_handshake::*;
use proptest::prelude::*;

#[derive(Clone)]
struct OneExport;

impl Catalog for OneExport {
    type Export = String;
    fn lookup(&self, name: &str, _peer: &Peer) -> Lookup<String> {
        match name {
            "" | "disk" => Lookup::Found("disk".into()),
            "secret" => Lookup::Denied("not for you".into()),
            _ => Lookup::Unknown,
        }
    }
    fn info(&self, _e: &String) -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: "a disk".into(),
            size: 1 << 20,
            flags: tflag::SEND_FLUSH | tflag::SEND_TRIM,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 << 20,
            contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()],
        }
    }
    fn list(&self, _peer: &Peer) -> Vec<ServerEntry> {
        vec![ServerEntry {
            name: "disk".into(),
            description: "a disk".into(),
        }]
    }
}

/// A decoded option reply.
#[derive(Debug)]
struct Rep {
    option: u32,
    rep_type: u32,
    data: Vec<u8>,
}

fn parse_replies(mut out: &[u8]) -> Vec<Rep> {
    let mut reps = Vec::new();
    while out.len() >= OPTION_REPLY_HEADER_LEN {
        let h = OptionReplyHeader::decode(&out[..OPTION_REPLY_HEADER_LEN]).unwrap();
        let end = OPTION_REPLY_HEADER_LEN + h.len as usize;
        reps.push(Rep {
            option: h.option,
            rep_type: h.rep_type,
            data: out[OPTION_REPLY_HEADER_LEN..end].to_vec(),
        });
        out = &out[end..];
    }
    assert!(out.is_empty(), "trailing bytes in server output");
    reps
}

struct Session {
    hs: ServerHandshake,
}

impl Session {
    fn new(tls: TlsMode) -> Self {
        let mut hs = ServerHandshake::new(HandshakeConfig {
            tls,
            ..Default::default()
        });
        let greeting = hs.take_output();
        assert_eq!(nbd_proto::handshake::decode_greeting(&greeting).unwrap(), 3);
        let mut s = Session { hs };
        let mut input = BytesMut::new();
        input.put_u32(cflag::FIXED_NEWSTYLE | cflag::NO_ZEROES);
        assert!(matches!(s.hs.feed(&mut input, &OneExport), Step::NeedMore));
        s
    }

    fn send(&mut self, code: u32, data: &[u8]) -> (Step<String>, Vec<Rep>) {
        let mut input = BytesMut::new();
        encode_option(&mut input, code, data);
        let step = self.hs.feed(&mut input, &OneExport);
        (step, parse_replies(&self.hs.take_output()))
    }
}

fn info_req(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = BytesMut::new();
    InfoRequest {
        name: name.into(),
        infos: infos.to_vec(),
    }
    .encode(&mut b);
    b.to_vec()
}

fn meta_req(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = BytesMut::new();
    MetaContextRequest {
        export: export.into(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
    .encode(&mut b);
    b.to_vec()
}

#[test]
fn go_with_structured_replies_and_contexts() {
    let mut s = Session::new(TlsMode::Off);
    let (_, r) = s.send(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(r[0].rep_type, rep::ACK);
    let (_, r) = s.send(
        opt::SET_META_CONTEXT,
        &meta_req(
            "disk",
            &["base:allocation", "qemu:dirty-bitmap:b0", "x-unknown:foo"],
        ),
    );
    assert_eq!(r.len(), 3);
    assert_eq!(
        MetaContext::decode(&r[0].data).unwrap(),
        MetaContext {
            id: 0,
            name: "base:allocation".into()
        }
    );
    assert_eq!(MetaContext::decode(&r[1].data).unwrap().id, 1);
    assert_eq!(r[2].rep_type, rep::ACK);
    let (step, r) = s.send(opt::GO, &info_req("disk", &[info::BLOCK_SIZE, info::NAME]));
    assert!(r.iter().all(|x| x.option == opt::GO));
    let infos: Vec<Info> = r[..r.len() - 1]
        .iter()
        .map(|x| Info::decode(&x.data).unwrap())
        .collect();
    assert!(infos.contains(&Info::Export {
        size: 1 << 20,
        flags: tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_TRIM | tflag::SEND_DF
    }));
    assert!(infos.contains(&Info::Name("disk".into())));
    assert_eq!(r.last().unwrap().rep_type, rep::ACK);
    let Step::Done(n) = step else {
        panic!("GO did not finish")
    };
    assert_eq!(n.mode, ReplyMode::Structured);
    assert_eq!(n.contexts.len(), 2);
    assert!(n.block_size_promised);
}

#[test]
fn contexts_are_dropped_when_go_names_another_export_and_set_needs_structured() {
    let mut s = Session::new(TlsMode::Off);
    let (_, r) = s.send(
        opt::SET_META_CONTEXT,
        &meta_req("disk", &["base:allocation"]),
    );
    assert_eq!(r[0].rep_type, rep::ERR_INVALID);
    let (_, r) = s.send(opt::LIST_META_CONTEXT, &meta_req("disk", &["qemu:"]));
    assert_eq!(r.len(), 2);
    assert_eq!(
        MetaContext::decode(&r[0].data).unwrap(),
        MetaContext {
            id: 0,
            name: "qemu:dirty-bitmap:b0".into()
        }
    );
    let (step, _) = s.send(opt::GO, &info_req("", &[]));
    let Step::Done(n) = step else { panic!() };
    assert!(n.contexts.is_empty());
    assert_eq!(n.mode, ReplyMode::Simple);
    assert_eq!(n.flags & tflag::SEND_DF, 0);
}

#[test]
fn errors_for_unknown_denied_and_malformed() {
    let mut s = Session::new(TlsMode::Off);
    assert_eq!(
        s.send(opt::INFO, &info_req("nope", &[])).1[0].rep_type,
        rep::ERR_UNKNOWN
    );
    assert_eq!(
        s.send(opt::INFO, &info_req("secret", &[])).1[0].rep_type,
        rep::ERR_POLICY
    );
    assert_eq!(s.send(999, b"whatever").1[0].rep_type, rep::ERR_UNSUP);
    assert_eq!(s.send(opt::LIST, b"x").1[0].rep_type, rep::ERR_INVALID);
    assert_eq!(s.send(opt::STARTTLS, &[]).1[0].rep_type, rep::ERR_POLICY);
    // Name length pointing past the option.
    let mut bad = info_req("disk", &[]);
    bad[3] = 200;
    assert_eq!(s.send(opt::GO, &bad).1[0].rep_type, rep::ERR_INVALID);
    // Query count far larger than the option could hold.
    let mut b = BytesMut::new();
    b.put_u32(0);
    b.put_u32(u32::MAX);
    assert_eq!(
        s.send(opt::LIST_META_CONTEXT, &b).1[0].rep_type,
        rep::ERR_INVALID
    );
    // Embedded NUL in a name.
    assert_eq!(
        s.send(opt::INFO, &info_req("di\0sk", &[])).1[0].rep_type,
        rep::ERR_INVALID
    );
    let (_, r) = s.send(opt::LIST, &[]);
    assert_eq!(ServerEntry::decode(&r[0].data).unwrap().name, "disk");
    assert_eq!(r[1].rep_type, rep::ACK);
    assert_eq!(s.send(opt::EXTENDED_HEADERS, &[]).1[0].rep_type, rep::ACK);
    assert_eq!(
        s.send(opt::EXTENDED_HEADERS, &[]).1[0].rep_type,
        rep::ERR_INVALID
    );
    assert_eq!(
        s.send(opt::STRUCTURED_REPLY, &[]).1[0].rep_type,
        rep::ERR_EXT_HEADER_REQD
    );
    // EXPORT_NAME is forbidden once extended headers are on.
    assert!(matches!(
        s.send(opt::EXPORT_NAME, b"disk").0,
        Step::Close(_)
    ));
}

#[test]
fn oversized_option_is_skipped_without_buffering() {
    let mut s = Session::new(TlsMode::Off);
    let len: u32 = 8 << 20;
    let mut input = BytesMut::new();
    input.put_u64(IHAVEOPT);
    input.put_u32(opt::GO);
    input.put_u32(len);
    assert!(matches!(s.hs.feed(&mut input, &OneExport), Step::NeedMore));
    for i in 0..8 {
        let mut chunk = BytesMut::from(&vec![0xa5u8; 1 << 20][..]);
        assert!(matches!(s.hs.feed(&mut chunk, &OneExport), Step::NeedMore));
        assert!(chunk.is_empty(), "the skipped option is not buffered");
        let out = s.hs.take_output();
        if i < 7 {
            assert!(out.is_empty(), "answered before the option was consumed");
        } else {
            // The last chunk completed the skip: the option is answered.
            let r = parse_replies(&out);
            assert_eq!(
                (r.len(), r[0].option, r[0].rep_type),
                (1, opt::GO, rep::ERR_TOO_BIG)
            );
        }
    }
    // And the session goes on.
    let (_, r) = s.send(opt::LIST, &[]);
    assert_eq!(r.last().unwrap().rep_type, rep::ACK);
}

#[test]
fn absurd_option_length_hangs_up_at_once() {
    let mut s = Session::new(TlsMode::Off);
    let mut input = BytesMut::new();
    input.put_u64(IHAVEOPT);
    input.put_u32(opt::GO);
    input.put_u32(u32::MAX);
    assert!(matches!(s.hs.feed(&mut input, &OneExport), Step::Close(_)));
}

#[test]
fn tls_required_refuses_everything_but_starttls() {
    let mut s = Session::new(TlsMode::Require);
    assert_eq!(s.send(opt::LIST, &[]).1[0].rep_type, rep::ERR_TLS_REQD);
    assert_eq!(
        s.send(opt::GO, &info_req("disk", &[])).1[0].rep_type,
        rep::ERR_TLS_REQD
    );
    assert_eq!(s.send(77, &[]).1[0].rep_type, rep::ERR_TLS_REQD);
    assert_eq!(
        s.send(opt::STRUCTURED_REPLY, &[]).1[0].rep_type,
        rep::ERR_TLS_REQD
    );
    assert!(matches!(
        s.send(opt::EXPORT_NAME, b"disk").0,
        Step::Close(_)
    ));

    let mut s = Session::new(TlsMode::Require);
    let (step, r) = s.send(opt::STARTTLS, &[]);
    assert!(matches!(step, Step::StartTls));
    assert_eq!(r[0].rep_type, rep::ACK);
    s.hs.tls_established(vec!["client".into()]);
    assert_eq!(s.send(opt::STARTTLS, &[]).1[0].rep_type, rep::ERR_INVALID);
    assert_eq!(s.send(opt::LIST, &[]).1.last().unwrap().rep_type, rep::ACK);
}

#[test]
fn starttls_stops_consuming_at_the_option() {
    let mut s = Session::new(TlsMode::Allow);
    let mut input = BytesMut::new();
    encode_option(&mut input, opt::STARTTLS, &[]);
    input.extend_from_slice(b"\x16\x03\x01client-hello");
    assert!(matches!(s.hs.feed(&mut input, &OneExport), Step::StartTls));
    assert_eq!(&input[..], b"\x16\x03\x01client-hello");
}

#[test]
fn export_name_with_and_without_zeroes() {
    let mut hs = ServerHandshake::new(HandshakeConfig::default());
    hs.take_output();
    let mut input = BytesMut::new();
    input.put_u32(cflag::FIXED_NEWSTYLE);
    encode_option(&mut input, opt::EXPORT_NAME, b"disk");
    let Step::Done(_) = hs.feed(&mut input, &OneExport) else {
        panic!()
    };
    assert_eq!(hs.take_output().len(), 134);

    let mut hs = ServerHandshake::new(HandshakeConfig::default());
    hs.take_output();
    let mut input = BytesMut::new();
    input.put_u32(cflag::FIXED_NEWSTYLE | cflag::NO_ZEROES);
    encode_option(&mut input, opt::EXPORT_NAME, b"missing");
    assert!(matches!(hs.feed(&mut input, &OneExport), Step::Close(_)));
}

#[test]
fn bad_client_flags_and_magic_close() {
    let mut hs = ServerHandshake::new(HandshakeConfig::default());
    let mut input = BytesMut::from(&[0u8, 0, 0, 0x80][..]);
    assert!(matches!(hs.feed(&mut input, &OneExport), Step::Close(_)));
    let mut hs = ServerHandshake::new(HandshakeConfig::default());
    let mut input = BytesMut::new();
    input.put_u32(1);
    input.put_slice(b"GARBAGE!GARBAGE!");
    assert!(matches!(hs.feed(&mut input, &OneExport), Step::Close(_)));
}

proptest! {
    #[test]
    fn request_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32, extended: bool) {
        let req = Request { flags, command, cookie, offset, length: length.into() };
        let mut b = BytesMut::new();
        req.encode(&mut b, extended);
        prop_assert_eq!(b.len(), Request::header_len(extended));
        prop_assert_eq!(Request::decode(&b, extended).unwrap(), req);
    }

    #[test]
    fn block_status_round_trip(id: u32, ext in proptest::collection::vec((1u32.., any::<u32>()), 1..50), extended: bool) {
        let extents: Vec<Extent> = ext.iter().map(|&(l, f)| Extent { length: l.into(), flags: f.into() }).collect();
        let mut b = BytesMut::new();
        encode_block_status_payload(&mut b, extended, id, &extents);
        let t = if extended { chunk::BLOCK_STATUS_EXT } else { chunk::BLOCK_STATUS };
        prop_assert_eq!(Chunk::decode(t, &b).unwrap(), Chunk::BlockStatus { context_id: id, extents });
    }

    #[test]
    fn meta_context_request_round_trip(export in "[a-z]{0,20}", queries in proptest::collection::vec("[a-z:]{0,30}", 0..10)) {
        let req = MetaContextRequest { export, queries };
        let mut b = BytesMut::new();
        req.encode(&mut b);
        prop_assert_eq!(MetaContextRequest::decode(&b).unwrap(), req);
    }

    #[test]
    fn handshake_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20)) {
        let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::Allow, ..Default::default() });
        for c in chunks {
            let mut input = BytesMut::from(&c[..]);
            if !matches!(hs.feed(&mut input, &OneExport), Step::NeedMore) {
                break;
            }
        }
    }

    #[test]
    fn chunk_decode_never_panics(t: u16, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Chunk::decode(t, &payload);
        let _ = Info::decode(&payload);
        let _ = InfoRequest::decode(&payload);
        let _ = MetaContextRequest::decode(&payload);
    }
}
