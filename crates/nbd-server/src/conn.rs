//! One client connection: option haggling, then the transmission loop with
//! one reader (this task), the device calls on the blocking pool, and one
//! writer task.

use std::sync::Arc;

use bytes::BytesMut;
use nbd_proto::consts::{cmd, cmdflag, errno};
use nbd_proto::reply::ReplyMode;
use nbd_proto::request::Request;
use nbd_proto::server_handshake::{HandshakeConfig, Negotiated, ServerHandshake, Step};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::bufpool::POOL;
use crate::execute::Session;
use crate::frame::FrameReader;
use crate::limits::Limits;
use crate::outgoing::{Outgoing, write_loop};
use crate::registry::{Export, Registry};

pub struct ConnContext {
    pub registry: Arc<Registry>,
    pub limits: Limits,
    pub handshake: HandshakeConfig,
    pub shutdown: CancellationToken,
}

/// Serves one connection to the end. Errors are the connection's own and
/// only end it.
pub async fn serve<S>(mut stream: S, ctx: Arc<ConnContext>, peer: String) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let negotiated = tokio::select! {
        _ = ctx.shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(ctx.limits.handshake_timeout, handshake(&mut stream, &ctx)) => match r {
            Ok(r) => r?,
            Err(_) => {
                tracing::info!(%peer, "handshake timed out");
                return Ok(());
            }
        },
    };
    let Some((negotiated, pending)) = negotiated else {
        return Ok(());
    };
    tracing::info!(
        %peer,
        export = %negotiated.info.name,
        mode = ?negotiated.mode,
        contexts = negotiated.contexts.len(),
        "transmission started"
    );
    transmission(stream, ctx, *negotiated, pending, peer).await
}

type Handshaken = Option<(Box<Negotiated<Arc<Export>>>, BytesMut)>;

async fn handshake<S>(stream: &mut S, ctx: &ConnContext) -> std::io::Result<Handshaken>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hs = ServerHandshake::new(ctx.handshake.clone());
    let mut input = BytesMut::with_capacity(4096);
    loop {
        let step = hs.feed(&mut input, &*ctx.registry);
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
        match step {
            Step::NeedMore => {
                if stream.read_buf(&mut input).await? == 0 {
                    return Ok(None);
                }
            }
            Step::Done(n) => return Ok(Some((n, input))),
            Step::Abort => return Ok(None),
            Step::StartTls => {
                // The handshake only acknowledges STARTTLS when TLS is
                // configured, which this build's listeners never are.
                tracing::warn!("STARTTLS acknowledged without TLS credentials");
                return Ok(None);
            }
            Step::Close(why) => {
                tracing::info!("closing during handshake: {why}");
                return Ok(None);
            }
        }
    }
}

async fn transmission<S>(
    stream: S,
    ctx: Arc<ConnContext>,
    n: Negotiated<Arc<Export>>,
    pending: BytesMut,
    peer: String,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(write_loop(wr, rx));
    let session = Arc::new(Session {
        dev: n.export.dev.clone(),
        mode: n.mode,
        flags: n.flags,
        contexts: n.contexts,
        max_payload: ctx.limits.max_payload,
    });
    let mut reader = FrameReader::new(rd, pending);
    let result = tokio::select! {
        r = read_loop(&mut reader, &session, &ctx.limits, &tx) => r,
        _ = ctx.shutdown.cancelled() => Ok(()),
    };
    if let Err(e) = &result {
        tracing::info!(%peer, "connection ends: {e}");
    }
    // In-flight requests keep their own senders: the writer finishes when
    // the last of them has been answered.
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, "writer: {e}"),
        Err(e) => tracing::warn!(%peer, "writer task failed: {e}"),
    }
    Ok(())
}

async fn read_loop<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    session: &Arc<Session>,
    limits: &Limits,
    tx: &mpsc::UnboundedSender<Outgoing>,
) -> std::io::Result<()> {
    let extended = session.mode == ReplyMode::Extended;
    let hlen = Request::header_len(extended);
    let count = Arc::new(Semaphore::new(limits.max_inflight));
    let bytes = Arc::new(Semaphore::new(limits.max_inflight_bytes));
    loop {
        if !reader.fill(hlen).await? {
            return Ok(());
        }
        let req = Request::decode(reader.peek(hlen), extended)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        reader.consume(hlen);
        if req.command == cmd::DISC {
            return Ok(());
        }
        // Bytes of payload that follow this header on the wire.
        let payload_len =
            if req.command == cmd::WRITE || (extended && req.flags & cmdflag::PAYLOAD_LEN != 0) {
                req.length
            } else {
                0
            };
        let checked = if req.command != cmd::WRITE && payload_len > 0 {
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
            let _ = tx.send(session.error_reply(&req, code, message));
            continue;
        }
        let weight = match req.command {
            cmd::READ | cmd::WRITE => req.length as u32,
            _ => 0,
        };
        let permits = vec![
            count
                .clone()
                .acquire_owned()
                .await
                .map_err(std::io::Error::other)?,
            bytes
                .clone()
                .acquire_many_owned(weight)
                .await
                .map_err(std::io::Error::other)?,
        ];
        let mut payload = Vec::new();
        if req.command == cmd::WRITE {
            payload = POOL.get(req.length as usize);
            reader.read_payload(&mut payload[..req.length as usize]).await?;
        }
        if let Some(mut out) = session.try_read_inline(&req) {
            out.permits = permits;
            let _ = tx.send(out);
            continue;
        }
        let session = session.clone();
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = session.execute(&req, payload);
            out.permits = permits;
            let _ = tx.send(out);
        });
    }
}
