//! A misbehaving server must not crash or hang the client: every request
//! ends with a clean error, well within a deadline.
//!
//! The fake server runs the real server handshake (nbd-proto) on one end
//! of an in-memory pipe, then follows a script: garbage, wrong cookies,
//! absurd chunk lengths, data outside the request, silence, or a close in
//! the middle of a reply.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use nbd_client::{Client, ConnectOptions, Error, ReplyMode};
use nbd_proto::consts::{BASE_ALLOCATION, chunk, cmd, replyflag, tflag};
use nbd_proto::option::ServerEntry;
use nbd_proto::reply::{encode_chunk_header, encode_simple};
use nbd_proto::request::Request;
use nbd_proto::server_handshake::{
    Catalog, ExportInfo, HandshakeConfig, Lookup, Peer, ServerHandshake, Step,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SIZE: u64 = 1 << 20;
/// Every scenario must be over well before this.
const DEADLINE: Duration = Duration::from_secs(10);

struct OneExport;

impl Catalog for OneExport {
    type Export = ();
    fn lookup(&self, _name: &str, _peer: &Peer) -> Lookup<()> {
        Lookup::Found(())
    }
    fn info(&self, _: &()) -> ExportInfo {
        ExportInfo {
            name: String::new(),
            description: String::new(),
            size: SIZE,
            flags: tflag::SEND_FLUSH,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 1 << 20,
            contexts: vec![BASE_ALLOCATION.to_string()],
        }
    }
    fn list(&self, _peer: &Peer) -> Vec<ServerEntry> {
        Vec::new()
    }
}

/// The server end of the pipe, in transmission.
struct Fake {
    io: DuplexStream,
    mode: ReplyMode,
}

impl Fake {
    /// Answers the client's handshake like a real server would.
    async fn accept(mut io: DuplexStream) -> Fake {
        let mut hs = ServerHandshake::new(HandshakeConfig::default());
        let mut input = BytesMut::with_capacity(4096);
        loop {
            let step = hs.feed(&mut input, &OneExport);
            let out = hs.take_output();
            io.write_all(&out).await.expect("handshake write");
            match step {
                Step::NeedMore => {}
                Step::Done(n) => {
                    return Fake { io, mode: n.mode };
                }
                other => panic!("fake server: unexpected handshake step {other:?}"),
            }
            let n = io.read_buf(&mut input).await.expect("handshake read");
            assert!(n > 0, "client left during the handshake");
        }
    }

    fn extended(&self) -> bool {
        self.mode == ReplyMode::Extended
    }

    /// The next request (READs only in these scripts: no payload).
    async fn request(&mut self) -> Request {
        let mut buf = vec![0u8; Request::header_len(self.extended())];
        self.io.read_exact(&mut buf).await.expect("request");
        Request::decode(&buf, self.extended()).expect("valid request")
    }

    async fn send(&mut self, b: &[u8]) {
        // The client may already have hung up on a bad reply.
        let _ = self.io.write_all(b).await;
    }

    fn chunk(&self, flags: u16, chunk_type: u16, req: &Request, payload_len: u64) -> BytesMut {
        let mut out = BytesMut::new();
        encode_chunk_header(
            &mut out,
            self.extended(),
            flags,
            chunk_type,
            req.cookie,
            req.offset,
            payload_len,
        );
        out
    }

    /// A data chunk with the first `len` bytes of a READ, all `byte`.
    fn data(&self, flags: u16, req: &Request, len: u64, byte: u8) -> BytesMut {
        let mut out = self.chunk(flags, chunk::OFFSET_DATA, req, 8 + len);
        out.put_u64(req.offset);
        out.put_bytes(byte, len as usize);
        out
    }

    /// Waits until the client closes its end (reads and drops the rest).
    async fn wait_closed(mut self) {
        let mut sink = [0u8; 4096];
        while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {}
    }
}

fn opts(extended: bool, io_timeout: Option<Duration>) -> ConnectOptions {
    ConnectOptions {
        extended,
        io_timeout,
        handshake_timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    }
}

/// Connects a client to a fake server that runs `script` after the
/// handshake, and returns the client (or the handshake's error).
async fn connect<F, Fut>(o: ConnectOptions, script: F) -> Result<Client, Error>
where
    F: FnOnce(Fake) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (client_end, server_end) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move { script(Fake::accept(server_end).await).await });
    Client::from_stream(client_end, "", &o).await
}

/// Runs `f` under the deadline; a hang fails the test.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: the client hung"))
}

fn assert_protocol(r: Result<Vec<u8>, Error>, needle: &str) {
    match r {
        Err(Error::Protocol(m)) if m.contains(needle) => {}
        other => panic!("expected a protocol error mentioning {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_after_the_handshake() {
    within("garbage", async {
        let r = connect(opts(true, None), |mut s| async move {
            s.send(&[0x5a; 512]).await;
            s.wait_closed().await;
        })
        .await;
        // Depending on timing the garbage is seen by the handshake or by the
        // reply reader; either way the request fails.
        let err = match r {
            Err(e) => e,
            Ok(c) => c.read(0, vec![0; 4096]).await.expect_err("read on garbage"),
        };
        let msg = err.to_string();
        assert!(
            msg.contains("unexpected data after the handshake") || msg.contains("magic"),
            "{msg}"
        );
    })
    .await;
}

#[tokio::test]
async fn reply_with_an_unknown_cookie() {
    within("unknown cookie", async {
        for extended in [false, true] {
            let c = connect(opts(extended, None), |mut s| async move {
                let req = s.request().await;
                let mut out = BytesMut::new();
                if s.extended() {
                    out = s.chunk(replyflag::DONE, chunk::NONE, &req, 0);
                    out[8..16].copy_from_slice(&(req.cookie ^ 0xdead).to_be_bytes());
                } else {
                    encode_simple(&mut out, 0, req.cookie ^ 0xdead);
                }
                s.send(&out).await;
                s.wait_closed().await;
            })
            .await
            .expect("connect");
            // Simple (error-free) reply to a READ in structured mode would be
            // its own violation; use FLUSH so only the cookie is wrong.
            let r = c.flush().await.map(|_| Vec::new());
            assert_protocol(r, "unknown cookie");
            // The connection is dead: later requests fail at once.
            assert!(c.read(0, vec![0; 512]).await.is_err());
        }
    })
    .await;
}

#[tokio::test]
async fn chunk_with_a_huge_payload_length() {
    within("huge chunk", async {
        for (extended, chunk_type, len, needle) in [
            // Non-data chunks are buffered: refuse before allocating.
            (false, chunk::ERROR, u64::from(u32::MAX), "too long"),
            (true, chunk::BLOCK_STATUS_EXT, u64::MAX, "too long"),
            // Data chunks go to the caller's buffer: refuse by range.
            (
                false,
                chunk::OFFSET_DATA,
                u64::from(u32::MAX),
                "outside READ",
            ),
            (true, chunk::OFFSET_DATA, u64::MAX, "outside READ"),
        ] {
            let c = connect(opts(extended, None), move |mut s| async move {
                let req = s.request().await;
                let mut out = s.chunk(replyflag::DONE, chunk_type, &req, len);
                out.put_u64(req.offset);
                s.send(&out).await;
                s.wait_closed().await;
            })
            .await
            .expect("connect");
            assert!(c.info().mode.structured());
            assert_protocol(c.read(4096, vec![0; 4096]).await, needle);
        }
    })
    .await;
}

#[tokio::test]
async fn data_chunk_outside_the_request() {
    within("data outside", async {
        // (offset relative to the request, length) of the bad chunk.
        for (rel, len) in [(4096i64, 512u64), (-512, 512), (4000, 512), (0, 8192)] {
            let c = connect(opts(false, None), move |mut s| async move {
                let req = s.request().await;
                let mut out = s.chunk(replyflag::DONE, chunk::OFFSET_DATA, &req, 8 + len);
                out.put_u64(req.offset.wrapping_add_signed(rel));
                out.put_bytes(0xab, len as usize);
                s.send(&out).await;
                s.wait_closed().await;
            })
            .await
            .expect("connect");
            assert_protocol(c.read(8192, vec![0; 4096]).await, "outside READ");
        }
    })
    .await;
}

#[tokio::test]
async fn overlapping_chunks_are_refused() {
    within("overlap", async {
        let c = connect(opts(false, None), |mut s| async move {
            let req = s.request().await;
            // The first half twice: as many bytes as asked for, but the
            // second half of the buffer would never be written.
            for flags in [0, replyflag::DONE] {
                let mut out = s.chunk(flags, chunk::OFFSET_DATA, &req, 8 + 2048);
                out.put_u64(req.offset);
                out.put_bytes(0xab, 2048);
                s.send(&out).await;
            }
            s.wait_closed().await;
        })
        .await
        .expect("connect");
        assert_protocol(c.read(0, vec![0; 4096]).await, "overlapping");
    })
    .await;
}

#[tokio::test]
async fn silent_server_times_out() {
    let timeout = Duration::from_millis(500);
    within("silent server", async {
        let c = connect(opts(true, Some(timeout)), |mut s| async move {
            // Answer the first read properly after staying idle for longer
            // than the timeout, then swallow the rest without a word.
            let req = s.request().await;
            s.send(&s.data(replyflag::DONE, &req, req.length, 0x11))
                .await;
            s.wait_closed().await;
        })
        .await
        .expect("connect");
        // Idle with nothing in flight is not a timeout.
        tokio::time::sleep(timeout * 3).await;
        let data = c.read(0, vec![0; 4096]).await.expect("first read");
        assert!(data.iter().all(|&b| b == 0x11));
        // Now several requests wait and nothing comes back.
        let started = tokio::time::Instant::now();
        let (a, b) = tokio::join!(c.read(0, vec![0; 4096]), c.read(4096, vec![0; 4096]));
        for r in [a, b] {
            match r {
                Err(Error::Timeout(d)) => assert_eq!(d, timeout),
                other => panic!("expected a timeout, got {other:?}"),
            }
        }
        let took = started.elapsed();
        assert!(
            took >= timeout && took < DEADLINE / 2,
            "timed out after {took:?}"
        );
        assert!(matches!(c.flush().await, Err(Error::Timeout(_))));
    })
    .await;
}

#[tokio::test]
async fn server_closes_in_the_middle_of_a_reply() {
    within("close mid-reply", async {
        for extended in [false, true] {
            let c = connect(opts(extended, None), |mut s| async move {
                let req = s.request().await;
                let mut out = s.chunk(replyflag::DONE, chunk::OFFSET_DATA, &req, 8 + req.length);
                out.put_u64(req.offset);
                out.put_bytes(0x22, req.length as usize / 2);
                s.send(&out).await;
                // Dropping the server end closes the pipe.
            })
            .await
            .expect("connect");
            let err = c.read(0, vec![0; 65536]).await.expect_err("half a reply");
            assert!(
                matches!(err, Error::Io(_) | Error::Disconnected(_)),
                "{err:?}"
            );
            assert!(c.read(0, vec![0; 512]).await.is_err());
        }
    })
    .await;
}

#[tokio::test]
async fn server_closes_with_requests_in_flight() {
    within("close between replies", async {
        let c = connect(opts(false, None), |mut s| async move {
            // Answer one of two reads, then leave.
            let req = s.request().await;
            let _ = s.request().await;
            let mut out = BytesMut::new();
            encode_chunk_header(
                &mut out,
                false,
                replyflag::DONE,
                chunk::OFFSET_DATA,
                req.cookie,
                0,
                8 + req.length,
            );
            out.put_u64(req.offset);
            out.put_bytes(0x33, req.length as usize);
            s.send(&out).await;
        })
        .await
        .expect("connect");
        let (a, b) = tokio::join!(c.read(0, vec![0; 512]), c.read(512, vec![0; 512]));
        let (ok, failed) = if a.is_ok() { (a, b) } else { (b, a) };
        assert!(ok.expect("one read answered").iter().all(|&x| x == 0x33));
        assert!(matches!(failed, Err(Error::Disconnected(_))), "{failed:?}");
    })
    .await;
}

#[tokio::test]
async fn simple_reply_to_a_read_in_structured_mode() {
    within("simple reply to READ", async {
        let c = connect(opts(false, None), |mut s| async move {
            let req = s.request().await;
            assert_eq!(req.command, cmd::READ);
            let mut out = BytesMut::new();
            encode_simple(&mut out, 0, req.cookie);
            out.put_bytes(0, req.length as usize);
            s.send(&out).await;
            s.wait_closed().await;
        })
        .await
        .expect("connect");
        assert_protocol(c.read(0, vec![0; 512]).await, "simple reply to READ");
    })
    .await;
}

#[tokio::test]
async fn replies_that_break_the_chunk_rules() {
    /// Builds the whole reply to a READ.
    type Script = fn(&Fake, &Request) -> BytesMut;
    let cases: [(bool, Script, &str); 4] = [
        (
            false,
            |s, req| {
                let mut out = s.data(0, req, req.length / 2, 0x44);
                out.extend_from_slice(&s.chunk(0, chunk::NONE, req, 0));
                out
            },
            "NONE chunk without the DONE flag",
        ),
        (
            true,
            |s, req| {
                let mut out = s.chunk(replyflag::DONE, chunk::ERROR_OFFSET, req, 14);
                out.put_u32(5);
                out.put_u16(0);
                out.put_u64(req.offset + req.length);
                out
            },
            "outside the request",
        ),
        (
            false,
            |s, req| {
                let mut out = s.data(0, req, req.length / 2, 0x44);
                encode_simple(&mut out, 5, req.cookie);
                out
            },
            "simple reply after chunks",
        ),
        (
            false,
            |s, req| {
                let mut out = s.chunk(replyflag::DONE, chunk::BLOCK_STATUS_EXT, req, 24);
                out.put_u32(0);
                out.put_u32(1);
                out.put_u64(req.length);
                out.put_u64(0);
                out
            },
            "BLOCK_STATUS_EXT chunk without extended headers",
        ),
    ];
    within("chunk rules", async {
        for (extended, script, needle) in cases {
            let c = connect(opts(extended, None), move |mut s| async move {
                let req = s.request().await;
                let out = script(&s, &req);
                s.send(&out).await;
                s.wait_closed().await;
            })
            .await
            .expect("connect");
            assert_protocol(c.read(4096, vec![0; 4096]).await, needle);
            // The connection is dead: later requests fail at once.
            assert!(c.read(0, vec![0; 512]).await.is_err());
        }
    })
    .await;
}

#[tokio::test]
async fn a_read_left_partly_unwritten_fails_alone() {
    within("incomplete read", async {
        let c = connect(opts(false, None), |mut s| async move {
            // Only half of the first READ, but a well-formed reply...
            let req = s.request().await;
            s.send(&s.data(replyflag::DONE, &req, req.length / 2, 0x44))
                .await;
            // ...so the stream is still in order and the next READ works.
            let req = s.request().await;
            s.send(&s.data(replyflag::DONE, &req, req.length, 0x55))
                .await;
            s.wait_closed().await;
        })
        .await
        .expect("connect");
        assert_protocol(c.read(0, vec![0; 4096]).await, "covered only 2048 bytes");
        let data = c.read(0, vec![0; 4096]).await.expect("the next read");
        assert!(data.iter().all(|&b| b == 0x55));
    })
    .await;
}
