//! The server loop on its own: the real server on a Unix socket, exports
//! in memory, driven by the project's own client (valid traffic in every
//! reply mode) and by raw request headers (what a client must not send).
//! No external peer is involved.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_block::{BASE_ALLOCATION, BlockDev, Layer, MemDev};
use nbd_client::{Client, ConnectOptions, Error, ReplyMode};
use nbd_proto::assemble::reply_header_len;
use nbd_proto::client_handshake::{ClientConfig, ClientHandshake, ClientStep};
use nbd_proto::consts::{cmd, cmdflag, errno, replyflag};
use nbd_proto::reply::{Chunk, ReplyHeader};
use nbd_proto::request::Request;
use nbd_proto::server_handshake::HandshakeConfig;
use nbd_server::{Limits, Listener, Registry, RegistryError, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 4 << 20;
/// Nothing here should take long; a hang fails the test instead.
const DEADLINE: Duration = Duration::from_secs(20);

/// Reads that wait until the test lets them go: the test then knows the
/// server has read and started every request it sent.
struct Gate {
    next: Arc<MemDev>,
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, bool)> {
        self.state.lock().unwrap()
    }

    fn open(&self) {
        self.lock().1 = true;
        self.changed.notify_all();
    }

    /// Waits (blocking, with the deadline) until `n` reads are waiting.
    fn wait_for(&self, n: usize) {
        let (st, timeout) = self
            .changed
            .wait_timeout_while(self.lock(), DEADLINE, |s| s.0 < n)
            .unwrap();
        assert!(!timeout.timed_out(), "only {} of {n} reads arrived", st.0);
    }
}

impl Layer for Gate {
    fn next(&self) -> &dyn BlockDev {
        &*self.next
    }

    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> ferry_block::Result<bool> {
        Ok(false)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> ferry_block::Result<()> {
        let mut st = self.lock();
        st.0 += 1;
        self.changed.notify_all();
        drop(self.changed.wait_while(st, |s| !s.1).unwrap());
        self.next.read_at(buf, offset)
    }
}

struct Running {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    disk: Arc<MemDev>,
    gate: Arc<Gate>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A server with a writable export "disk" (the default), a read-only
/// export "ro" and "gated" (see [`Gate`]), all in memory.
async fn start(limits: Limits) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let registry = Arc::new(Registry::new(limits.max_payload));
    let disk = Arc::new(MemDev::new(SIZE));
    registry.add("disk", "in memory", disk.clone()).unwrap();
    let ro = MemDev::with_data(vec![0x5a; SIZE as usize]).read_only();
    registry.add("ro", "", Arc::new(ro)).unwrap();
    let gate = Arc::new(Gate {
        next: Arc::new(MemDev::with_data(pattern(3, SIZE as usize))),
        state: Mutex::new((0, false)),
        changed: Condvar::new(),
    });
    registry.add("gated", "", gate.clone()).unwrap();
    registry.set_default("disk");
    let server = Server::new(registry.clone(), limits, HandshakeConfig::default(), None).unwrap();
    let shutdown = CancellationToken::new();
    let listener = Listener::bind_unix(sock.clone()).unwrap();
    let task = tokio::spawn(server.run(vec![listener], shutdown.clone()));
    Running {
        _dir: dir,
        sock,
        disk,
        gate,
        registry,
        shutdown,
        task,
    }
}

impl Running {
    async fn client(&self, export: &str, opts: &ConnectOptions) -> Client {
        let s = UnixStream::connect(&self.sock).await.unwrap();
        Client::from_stream(s, export, opts).await.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("server stops")
            .unwrap();
        assert!(!self.sock.exists(), "socket file left behind");
    }
}

fn opts(structured: bool, extended: bool) -> ConnectOptions {
    ConnectOptions {
        structured,
        extended,
        meta_contexts: if structured {
            vec![BASE_ALLOCATION.to_string()]
        } else {
            Vec::new()
        },
        requests: 32,
        ..ConnectOptions::default()
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_every_reply_mode() {
    let srv = start(Limits::default()).await;
    let modes = [
        (false, false, ReplyMode::Simple),
        (true, false, ReplyMode::Structured),
        (true, true, ReplyMode::Extended),
    ];
    for (i, (structured, extended, mode)) in modes.into_iter().enumerate() {
        let c = Arc::new(srv.client("disk", &opts(structured, extended)).await);
        assert_eq!(c.info().mode, mode);
        assert_eq!(c.size(), SIZE);
        let base = i as u64 * (1 << 20);
        let data = Arc::new(pattern(i as u8, 300_000));
        // Many requests in flight at once, answered in any order.
        let d = data.clone();
        let writes = all(&c, 8, move |c, k| {
            let chunk = Bytes::copy_from_slice(&d[(k * 30_000) as usize..][..30_000]);
            Box::pin(async move { c.write(base + k * 30_000, chunk, k == 7).await })
        });
        for r in writes.await {
            r.unwrap();
        }
        c.flush().await.unwrap();
        let got = c.read(base, vec![0; 240_000]).await.unwrap();
        assert_eq!(got, data[..240_000]);
        c.write_zeroes(base + 4096, 8192, false, false)
            .await
            .unwrap();
        c.trim(base + 65536, 65536).await.unwrap();
        let got = c.read(base, vec![0xff; 8192 + 4096]).await.unwrap();
        assert_eq!(&got[..4096], &data[..4096]);
        assert!(got[4096..].iter().all(|&b| b == 0));
        let model = srv.disk.contents();
        assert_eq!(&model[base as usize..][..4096], &data[..4096]);
        if structured {
            // A hole (never written) reads as zeroes; block status sees it.
            let st = c.block_status(base + (512 << 10), 4096).await.unwrap();
            assert_eq!(st[0].name, BASE_ALLOCATION);
            assert_eq!(st[0].extents[0].flags & 1, 1, "{st:?}");
        }
        drop(model);
        Arc::into_inner(c).unwrap().disconnect().await.unwrap();
    }
    srv.stop().await;
}

/// Runs the requests concurrently (each its own task, so they are all
/// in flight together) and returns their results in order.
async fn all<T: Send + 'static>(
    c: &Arc<Client>,
    n: u64,
    req: impl Fn(Arc<Client>, u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>,
) -> Vec<T> {
    let tasks: Vec<_> = (0..n).map(|k| tokio::spawn(req(c.clone(), k))).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    let srv = start(Limits::default()).await;
    let c = srv.client("ro", &opts(true, true)).await;
    assert!(c.info().read_only());
    let got = c.read(SIZE - 100, vec![0; 100]).await.unwrap();
    assert_eq!(got, vec![0x5a; 100]);
    assert!(matches!(
        c.write(0, Bytes::from_static(b"x"), false).await,
        Err(Error::Unsupported(_))
    ));
    c.disconnect().await.unwrap();
    // The raw request anyway: EPERM.
    let mut raw = Raw::connect(&srv.sock, "ro", true, true).await;
    let req = raw.request(cmd::WRITE, 0, 0, 4);
    let e = raw.call(req, Some(b"abcd")).await;
    assert_eq!(e, errno::EPERM);
    srv.stop().await;
}

/// A client that sends what it likes: the handshake from nbd-proto, then
/// raw request headers, and replies read as they come.
struct Raw {
    io: UnixStream,
    mode: ReplyMode,
    extended: bool,
    cookie: u64,
}

impl Raw {
    async fn connect(sock: &Path, export: &str, structured: bool, extended: bool) -> Raw {
        let mut io = UnixStream::connect(sock).await.unwrap();
        let mut hs = ClientHandshake::new(ClientConfig {
            structured,
            extended,
            ..ClientConfig::new(export)
        });
        let mut input = BytesMut::new();
        let negotiated = loop {
            let step = hs.feed(&mut input).unwrap();
            io.write_all(&hs.take_output()).await.unwrap();
            match step {
                ClientStep::NeedMore => {
                    assert!(io.read_buf(&mut input).await.unwrap() > 0, "server hung up");
                }
                ClientStep::Done(n) => break n,
                _ => panic!("unexpected handshake step"),
            }
        };
        Raw {
            io,
            mode: negotiated.mode,
            extended: negotiated.mode == ReplyMode::Extended,
            cookie: 0,
        }
    }

    fn request(&mut self, command: u16, flags: u16, offset: u64, length: u64) -> Request {
        self.cookie += 1;
        Request {
            flags,
            command,
            cookie: self.cookie,
            offset,
            length,
        }
    }

    /// Sends one request (and payload) and returns the errno of its reply
    /// (0: success), after reading the whole reply.
    async fn call(&mut self, req: Request, payload: Option<&[u8]>) -> u32 {
        let mut out = BytesMut::new();
        req.encode(&mut out, self.extended);
        if let Some(p) = payload {
            out.extend_from_slice(p);
        }
        self.io.write_all(&out).await.unwrap();
        tokio::time::timeout(DEADLINE, self.reply(&req))
            .await
            .expect("reply in time")
    }

    async fn reply(&mut self, req: &Request) -> u32 {
        let (cookie, errno) = self.any_reply(std::slice::from_ref(req)).await;
        assert_eq!(cookie, req.cookie);
        errno
    }

    /// Reads the next whole reply (our server never interleaves the
    /// chunks of two replies) to one of `reqs`: (cookie, errno).
    async fn any_reply(&mut self, reqs: &[Request]) -> (u64, u32) {
        let mut err = 0;
        loop {
            let mut magic = [0u8; 4];
            self.io.read_exact(&mut magic).await.unwrap();
            let len = reply_header_len(u32::from_be_bytes(magic), self.mode)
                .expect("a reply header of the negotiated form");
            let mut hdr = vec![0u8; len];
            hdr[..4].copy_from_slice(&magic);
            self.io.read_exact(&mut hdr[4..]).await.unwrap();
            let header = ReplyHeader::decode(&hdr).unwrap();
            let req = reqs
                .iter()
                .find(|r| r.cookie == header.cookie())
                .expect("reply to a request in flight");
            match header {
                ReplyHeader::Simple { error, cookie } => {
                    if error == 0 && req.command == cmd::READ {
                        let mut data = vec![0u8; req.length as usize];
                        self.io.read_exact(&mut data).await.unwrap();
                    }
                    return (cookie, error);
                }
                ReplyHeader::Chunk {
                    flags,
                    chunk_type,
                    cookie,
                    payload_len,
                    ..
                } => {
                    let mut payload = vec![0u8; payload_len as usize];
                    self.io.read_exact(&mut payload).await.unwrap();
                    if let Ok(Chunk::Error { error, .. }) = Chunk::decode(chunk_type, &payload) {
                        err = error;
                    }
                    if flags & replyflag::DONE != 0 {
                        return (cookie, err);
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_specs_errors_and_the_connection_lives() {
    let srv = start(Limits::default()).await;
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let mut raw = Raw::connect(&srv.sock, "disk", structured, extended).await;
        let cases = [
            (
                raw.request(cmd::READ, 0, SIZE - 10, 20),
                None,
                errno::EINVAL,
            ),
            (
                raw.request(cmd::WRITE, 0, SIZE - 2, 4),
                Some(&b"wxyz"[..]),
                errno::ENOSPC,
            ),
            (
                raw.request(cmd::WRITE_ZEROES, 0, SIZE, 1),
                None,
                errno::ENOSPC,
            ),
            (raw.request(cmd::TRIM, 0, SIZE + 1, 0), None, errno::EINVAL),
            (raw.request(cmd::CACHE, 0, SIZE, 4096), None, errno::EINVAL),
            (raw.request(99, 0, 0, 0), None, errno::EINVAL),
            (
                raw.request(cmd::FLUSH, cmdflag::NO_HOLE, 0, 0),
                None,
                errno::EINVAL,
            ),
            (raw.request(cmd::READ, 0, 0, 4096), None, 0),
            (raw.request(cmd::FLUSH, 0, 0, 0), None, 0),
        ];
        for (req, payload, want) in cases {
            let got = raw.call(req, payload).await;
            assert_eq!(
                got,
                want,
                "{} at {} length {} (structured {structured}, extended {extended})",
                cmd::name(req.command),
                req.offset,
                req.length
            );
        }
        if structured {
            // Block status needs a negotiated context; none was asked for.
            let req = raw.request(cmd::BLOCK_STATUS, 0, 0, 4096);
            assert_eq!(raw.call(req, None).await, errno::EINVAL);
        }
        // The refused WRITE's payload was consumed: the stream is in step.
        let req = raw.request(cmd::WRITE, 0, 8192, 4);
        assert_eq!(raw.call(req, Some(b"1234")).await, 0);
    }
    assert_eq!(&srv.disk.contents()[8192..8196], b"1234");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_in_flight_limits_still_answer_everything() {
    let limits = Limits {
        max_inflight: 2,
        max_inflight_bytes: 1 << 20,
        max_payload: 1 << 20,
        ..Limits::default()
    };
    let srv = start(limits).await;
    let c = Arc::new(srv.client("disk", &opts(true, true)).await);
    let data = pattern(9, 1 << 20);
    c.write(0, Bytes::from(data.clone()), false).await.unwrap();
    let reads = all(&c, 64, |c, k| {
        Box::pin(async move { c.read(k * 16384, vec![0; 16384]).await })
    });
    for (k, r) in reads.await.into_iter().enumerate() {
        assert_eq!(r.unwrap(), data[k * 16384..][..16384]);
    }
    Arc::into_inner(c).unwrap().disconnect().await.unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_exports_cannot_be_removed_until_their_clients_leave() {
    let srv = start(Limits::default()).await;
    let c = srv.client("ro", &opts(true, true)).await;
    assert_eq!(
        srv.registry.remove_idle("ro").err(),
        Some(RegistryError::Busy {
            name: "ro".into(),
            open: 1
        })
    );
    // Still served after the refused removal.
    assert_eq!(c.read(0, vec![0; 10]).await.unwrap(), vec![0x5a; 10]);
    c.disconnect().await.unwrap();
    let removed = tokio::time::timeout(DEADLINE, async {
        loop {
            match srv.registry.remove_idle("ro") {
                Ok(p) => return p,
                Err(RegistryError::Busy { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("the connection closes");
    assert_eq!(removed.dev.size(), SIZE);
    let s = UnixStream::connect(&srv.sock).await.unwrap();
    assert!(
        Client::from_stream(s, "ro", &opts(true, true))
            .await
            .is_err()
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_requests_in_flight() {
    let srv = start(Limits::default()).await;
    let mut raw = Raw::connect(&srv.sock, "gated", true, true).await;
    let reqs: Vec<Request> = (0..32u64)
        .map(|k| raw.request(cmd::READ, 0, k * 32768, 32768))
        .collect();
    let mut out = BytesMut::new();
    for r in &reqs {
        r.encode(&mut out, raw.extended);
    }
    raw.io.write_all(&out).await.unwrap();
    let gate = srv.gate.clone();
    tokio::task::spawn_blocking(move || gate.wait_for(32))
        .await
        .unwrap();
    // Every request is in the server's hands; now it is told to stop.
    srv.shutdown.cancel();
    srv.gate.open();
    let mut answered = std::collections::BTreeSet::new();
    for _ in &reqs {
        let (cookie, e) = tokio::time::timeout(DEADLINE, raw.any_reply(&reqs))
            .await
            .expect("replies in time");
        assert_eq!(e, 0, "READ {cookie} refused");
        assert!(answered.insert(cookie), "two replies to {cookie}");
    }
    // Then it closes the connection and exits.
    let mut rest = Vec::new();
    raw.io.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    srv.stop().await;
}
