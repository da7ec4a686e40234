//! One client connection: option haggling, then the transmission loop with
//! one reader (this task), the device calls on the blocking pool, and one
//! writer task.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use nbd_proto::consts::{cmd, cmdflag, errno};
use nbd_proto::reply::ReplyMode;
use nbd_proto::request::Request;
use nbd_proto::server_handshake::{HandshakeConfig, Negotiated, ServerHandshake, Step};
use nbd_tls::Prefixed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::bufpool::POOL;
use crate::execute::Session;
use crate::frame::FrameReader;
use crate::limits::Limits;
use crate::outgoing::{Permits, ReplySink};
use crate::registry::{Export, Registry};
use crate::split::Split;

/// How long a shutting-down server waits for a stalled client.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct ConnContext {
    pub registry: Arc<Registry>,
    pub limits: Limits,
    pub handshake: HandshakeConfig,
    pub shutdown: CancellationToken,
    pub tls: Option<nbd_tls::TlsAcceptor>,
}

/// Serves one connection to the end. Errors are the connection's own and
/// only end it.
pub async fn serve<S: Split>(
    mut stream: S,
    ctx: Arc<ConnContext>,
    peer: String,
) -> std::io::Result<()> {
    let deadline = tokio::time::Instant::now() + ctx.limits.handshake_timeout;
    let mut hs = ServerHandshake::new(ctx.handshake.clone());
    let phase = match bounded(&ctx, deadline, negotiate(&mut stream, &mut hs, &ctx)).await {
        Some(p) => p?,
        None => return Ok(()),
    };
    match phase {
        Phase::Done(n, pending) => transmission(stream, ctx, *n, pending, peer).await,
        Phase::Ended => Ok(()),
        Phase::StartTls(leftover) => {
            let Some(acceptor) = ctx.tls.clone() else {
                tracing::warn!(%peer, "STARTTLS acknowledged without TLS credentials");
                return Ok(());
            };
            let accept = acceptor.accept(Prefixed::new(leftover.to_vec(), stream));
            let mut tls = match bounded(&ctx, deadline, accept).await {
                Some(Ok(t)) => t,
                Some(Err(e)) => {
                    tracing::warn!(%peer, "{}", nbd_tls::describe_handshake_error(&e, nbd_tls::Side::Server));
                    return Ok(());
                }
                None => return Ok(()),
            };
            let ids = nbd_tls::peer_identities(tls.get_ref().1.peer_certificates());
            let suite = tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
            tracing::info!(%peer, client = %ids.join(","), ?suite, "TLS established");
            hs.tls_established(ids);
            match bounded(&ctx, deadline, negotiate(&mut tls, &mut hs, &ctx)).await {
                Some(Ok(Phase::Done(n, pending))) => {
                    transmission(tls, ctx, *n, pending, peer).await
                }
                Some(Err(e)) => Err(e),
                // A second STARTTLS is refused by the handshake itself.
                _ => Ok(()),
            }
        }
    }
}

/// Runs a handshake step unless the deadline passes or the server shuts
/// down first (None).
async fn bounded<F: std::future::Future>(
    ctx: &ConnContext,
    deadline: tokio::time::Instant,
    f: F,
) -> Option<F::Output> {
    tokio::select! {
        _ = ctx.shutdown.cancelled() => None,
        r = tokio::time::timeout_at(deadline, f) => match r {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::info!("handshake timed out");
                None
            }
        },
    }
}

enum Phase {
    /// Transmission starts; the bytes hold input read past the handshake.
    Done(Box<Negotiated<Arc<Export>>>, BytesMut),
    /// STARTTLS acknowledged; the bytes already belong to TLS.
    StartTls(BytesMut),
    Ended,
}

async fn negotiate<S>(
    stream: &mut S,
    hs: &mut ServerHandshake,
    ctx: &ConnContext,
) -> std::io::Result<Phase>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(4096);
    loop {
        let step = hs.feed(&mut input, &*ctx.registry);
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await?;
            // Over TLS, records the socket did not take yet stay buffered
            // until flushed.
            stream.flush().await?;
        }
        match step {
            Step::NeedMore => {
                if stream.read_buf(&mut input).await? == 0 {
                    return Ok(Phase::Ended);
                }
            }
            Step::Done(n) => {
                tracing::info!(
                    export = %n.info.name,
                    mode = ?n.mode,
                    contexts = n.contexts.len(),
                    "transmission started"
                );
                return Ok(Phase::Done(n, input));
            }
            Step::StartTls => return Ok(Phase::StartTls(input)),
            Step::Abort => return Ok(Phase::Ended),
            Step::Close(why) => {
                tracing::info!("closing during handshake: {why}");
                return Ok(Phase::Ended);
            }
        }
    }
}

async fn transmission<S: Split>(
    stream: S,
    ctx: Arc<ConnContext>,
    n: Negotiated<Arc<Export>>,
    pending: BytesMut,
    peer: String,
) -> std::io::Result<()> {
    let (rd, wr) = stream.split();
    let (sink, writer) = ReplySink::new(wr);
    let session = Arc::new(Session {
        dev: n.export.dev.clone(),
        mode: n.mode,
        flags: n.flags,
        contexts: n.contexts,
        max_payload: ctx.limits.max_payload,
    });
    let mut reader = FrameReader::new(rd, pending);
    // On shutdown the read loop answers what the client already sent; a
    // client that stalls (mid-payload, or never reading replies) gets a
    // grace period and is then cut off.
    let grace = async {
        ctx.shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = read_loop(&mut reader, &session, &ctx.limits, &sink, &ctx.shutdown) => r,
        _ = grace => Ok(()),
    };
    if let Err(e) = &result {
        tracing::info!(%peer, "connection ends: {e}");
    }
    // In-flight requests keep their own senders: the writer finishes when
    // the last of them has been answered.
    drop(sink);
    let mut writer = writer;
    let finished = tokio::select! {
        r = &mut writer => Some(r),
        _ = async {
            ctx.shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => None,
    };
    match finished {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => tracing::debug!(%peer, "writer: {e}"),
        Some(Err(e)) => tracing::warn!(%peer, "writer task failed: {e}"),
        None => {
            tracing::warn!(%peer, "client stopped reading replies; dropping it");
            writer.abort();
        }
    }
    Ok(())
}

/// READs whose replies would go over the writer's backlog, in arrival
/// order, with the permits they hold.
type Deferred = VecDeque<(Request, Permits)>;

/// Reads and starts requests until the client disconnects (or, after
/// shutdown, has nothing more to say). While the writer is behind (its
/// backlog full), READs wait in `deferred` but everything else still runs:
/// a client that asks for block status behind a row of reads is answered
/// at once, and a slow reader pins little memory.
async fn read_loop<R: AsyncRead + Unpin, W: AsyncWrite + Unpin + Send + 'static>(
    reader: &mut FrameReader<R>,
    session: &Arc<Session>,
    limits: &Limits,
    sink: &ReplySink<W>,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let mut deferred = Deferred::new();
    let input: std::io::Result<()> = async {
        let extended = session.mode == ReplyMode::Extended;
        let hlen = Request::header_len(extended);
        let count = Arc::new(Semaphore::new(limits.max_inflight));
        let bytes = Arc::new(Semaphore::new(limits.max_inflight_bytes));
        let mut draining = false;
        loop {
            dispatch_ready(&mut deferred, session, sink)?;
            let more = if draining {
                // Requests the client sent before it could know: answer them
                // with ESHUTDOWN rather than leave them unread (closing a socket
                // with unread input resets it, losing replies in flight).
                match tokio::time::timeout(Duration::ZERO, reader.fill(hlen)).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(()),
                }
            } else {
                tokio::select! {
                    r = reader.fill(hlen) => r?,
                    () = sink.room(), if !deferred.is_empty() => continue,
                    _ = shutdown.cancelled() => {
                        draining = true;
                        continue;
                    }
                }
            };
            if !more {
                return Ok(());
            }
            let req = Request::decode(reader.peek(hlen), extended)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            reader.consume(hlen);
            tracing::trace!(
                command = req.command,
                cookie = req.cookie,
                offset = req.offset,
                length = req.length,
                "request"
            );
            if req.command == cmd::DISC {
                return Ok(());
            }
            // Bytes of payload that follow this header on the wire.
            let payload_len = if req.command == cmd::WRITE
                || (extended && req.flags & cmdflag::PAYLOAD_LEN != 0)
            {
                req.length
            } else {
                0
            };
            // Every request, refused ones too, holds a slot until its reply is
            // sent: a client that never reads replies cannot make them pile up.
            let slot = acquire(count.clone().acquire_owned(), &mut deferred, session, sink).await?;
            let checked = if draining {
                Err((errno::ESHUTDOWN, "server is shutting down"))
            } else if req.command != cmd::WRITE && payload_len > 0 {
                Err((errno::EINVAL, "unexpected payload"))
            } else {
                session.validate(&req).map_err(|r| (r.errno, r.message))
            };
            if let Err((code, message)) = checked {
                if payload_len > limits.discard_limit() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "payload too large to discard",
                    ));
                }
                reader.discard(payload_len).await?;
                let mut out = session.error_reply(&req, code, message);
                out.permits = Some(Permits {
                    _slot: slot,
                    _bytes: None,
                });
                sink.send(out)?;
                continue;
            }
            let weight = match req.command {
                cmd::READ | cmd::WRITE => req.length as u32,
                _ => 0,
            };
            let held = bytes.clone().acquire_many_owned(weight);
            let permits = Permits {
                _slot: slot,
                _bytes: Some(acquire(held, &mut deferred, session, sink).await?),
            };
            if req.command == cmd::READ && (!deferred.is_empty() || !sink.has_room()) {
                deferred.push_back((req, permits));
                continue;
            }
            let mut payload = Vec::new();
            if req.command == cmd::WRITE {
                payload = POOL.get(req.length as usize);
                reader
                    .read_payload(&mut payload[..req.length as usize])
                    .await?;
            }
            dispatch(req, payload, permits, session, sink)?;
        }
    }
    .await;
    // A broken stream or a protocol error drops the connection; when the
    // input ends cleanly (DISC, EOF, shutdown) everything accepted is
    // answered.
    input?;
    for (req, permits) in deferred {
        dispatch(req, Vec::new(), permits, session, sink)?;
    }
    Ok(())
}

/// Starts the deferred READs, in order, while the writer has room.
fn dispatch_ready<W: AsyncWrite + Unpin + Send + 'static>(
    deferred: &mut Deferred,
    session: &Arc<Session>,
    sink: &ReplySink<W>,
) -> std::io::Result<()> {
    while sink.has_room()
        && let Some((req, permits)) = deferred.pop_front()
    {
        dispatch(req, Vec::new(), permits, session, sink)?;
    }
    Ok(())
}

/// Waits for an in-flight permit. Deferred READs may hold the very permits
/// it waits for, so they are started meanwhile whenever the writer has
/// room; otherwise a mix of request sizes could stall the connection.
async fn acquire<T, W: AsyncWrite + Unpin + Send + 'static>(
    permit: impl Future<Output = Result<T, tokio::sync::AcquireError>>,
    deferred: &mut Deferred,
    session: &Arc<Session>,
    sink: &ReplySink<W>,
) -> std::io::Result<T> {
    tokio::pin!(permit);
    loop {
        tokio::select! {
            p = &mut permit => return p.map_err(std::io::Error::other),
            () = sink.room(), if !deferred.is_empty() => dispatch_ready(deferred, session, sink)?,
        }
    }
}

/// Runs a request and sends its reply: on this task when the answer is at
/// hand (cached data, block status), else on the blocking pool.
fn dispatch<W: AsyncWrite + Unpin + Send + 'static>(
    req: Request,
    payload: Vec<u8>,
    permits: Permits,
    session: &Arc<Session>,
    sink: &ReplySink<W>,
) -> std::io::Result<()> {
    if let Some(mut out) = session.try_inline(&req) {
        out.permits = Some(permits);
        return sink.send(out);
    }
    let session = session.clone();
    let sink = sink.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = session.execute(&req, payload);
        out.permits = Some(permits);
        sink.queue(out);
    });
    Ok(())
}
