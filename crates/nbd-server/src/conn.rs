//! One client connection: option haggling, then the transmission loop with
//! one reader (this task), the device calls on the blocking pool, and one
//! writer task. The reader's loop takes each request through framing
//! (`frame.rs`), admission (`admission.rs`) and dispatch (`dispatch.rs`).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use nbd_proto::consts::{cmd, errno};
use nbd_proto::reply::ReplyMode;
use nbd_proto::request::Request;
use nbd_proto::server_handshake::{HandshakeConfig, Negotiated, ServerHandshake, Step};
use nbd_tls::Prefixed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::budget::MemoryBudget;
use crate::bufpool::POOL;
use crate::dispatch::Dispatch;
use crate::execute::Session;
use crate::frame::FrameReader;
use crate::limits::Limits;
use crate::metrics::{self, ExportMetrics};
use crate::outgoing::ReplySink;
use crate::registry::{Export, Registry};
use crate::split::Split;
use crate::zero_copy::ReplyWrite;

/// How long a shutting-down server waits for a stalled client.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct ConnContext {
    pub registry: Arc<Registry>,
    pub limits: Limits,
    pub handshake: HandshakeConfig,
    pub shutdown: CancellationToken,
    pub tls: Option<Arc<nbd_tls::ReloadableServerConfig>>,
    pub budget: Arc<MemoryBudget>,
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
            let Some(acceptor) = ctx.tls.as_ref().map(|t| t.acceptor()) else {
                tracing::warn!(%peer, "STARTTLS acknowledged without TLS credentials");
                return Ok(());
            };
            let accept = acceptor.accept(Prefixed::new(leftover.to_vec(), stream));
            let mut tls = match bounded(&ctx, deadline, accept).await {
                Some(Ok(t)) => {
                    metrics::tls_handshake(true);
                    t
                }
                Some(Err(e)) => {
                    metrics::tls_handshake(false);
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
    let limits = &ctx.limits;
    let (rd, wr) = stream.split();
    let zero_copy = limits.zero_copy && wr.sends_files();
    let (sink, writer) = ReplySink::new(wr, limits.stall_timeout);
    let extended = n.mode == ReplyMode::Extended;
    let session = Arc::new(Session {
        dev: n.export.dev.clone(),
        mode: n.mode,
        flags: n.flags,
        contexts: n.contexts,
        max_payload: limits.max_payload,
        zero_copy,
        metrics: ExportMetrics::connect(&n.export.name),
    });
    let stop = Stop {
        server: ctx.shutdown.clone(),
        export: n.export.retired().clone(),
    };
    let requests = Requests {
        framing: FrameReader::new(rd, pending, extended, limits.stall_timeout),
        admission: Admission::new(limits.max_inflight, &ctx.budget),
        dispatch: Dispatch::new(session, sink),
        extended,
        idle_timeout: limits.idle_timeout,
        discard_limit: limits.discard_limit(),
    };
    // On shutdown (or when the export is retired) the loop answers what
    // the client already sent; a client that stalls (mid-payload, or never
    // reading replies) gets a grace period and is then cut off.
    let ending = tokio::select! {
        r = requests.serve(&stop) => r,
        () = shutdown_grace(&stop) => Ok(Ending::Input),
    };
    match ending {
        Ok(Ending::Input) => {}
        Ok(Ending::Idle) => {
            tracing::info!(%peer, timeout = ?limits.idle_timeout, "idle client: disconnecting");
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            tracing::warn!(%peer, "closing: {e}");
        }
        Err(e) => tracing::info!(%peer, "connection ends: {e}"),
    }
    // In-flight requests keep their own senders: the writer finishes when
    // the last of them has been answered.
    let mut writer = writer;
    let finished = tokio::select! {
        r = &mut writer => Some(r),
        () = shutdown_grace(&stop) => None,
    };
    match finished {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) if e.kind() == std::io::ErrorKind::TimedOut => {
            tracing::warn!(%peer, "closing: {e}");
        }
        Some(Ok(Err(e))) => tracing::debug!(%peer, "writer: {e}"),
        Some(Err(e)) => tracing::warn!(%peer, "writer task failed: {e}"),
        None => {
            tracing::warn!(%peer, "client stopped reading replies; dropping it");
            writer.abort();
        }
    }
    Ok(())
}

/// What ends a connection from the server's side: the server shutting
/// down, or its export being retired (removed by a reload).
struct Stop {
    server: CancellationToken,
    export: CancellationToken,
}

impl Stop {
    async fn cancelled(&self) {
        tokio::select! {
            _ = self.server.cancelled() => {}
            _ = self.export.cancelled() => {}
        }
    }
}

/// Returns `SHUTDOWN_GRACE` after the connection was told to stop.
async fn shutdown_grace(stop: &Stop) {
    stop.cancelled().await;
    tokio::time::sleep(SHUTDOWN_GRACE).await;
}

/// Why a connection's input ended without an error.
enum Ending {
    /// DISC, end of stream, or shutdown: everything accepted is answered.
    Input,
    /// Nothing in flight and no request for the idle timeout.
    Idle,
}

/// What the reader waits for next.
enum Input {
    Request(Request),
    End,
    Idle,
    Shutdown,
}

/// The reader's side of a connection: framing, admission and dispatch.
struct Requests<R, W> {
    framing: FrameReader<R>,
    admission: Admission,
    dispatch: Dispatch<W>,
    extended: bool,
    idle_timeout: Option<Duration>,
    discard_limit: u64,
}

impl<R: AsyncRead + Unpin, W: ReplyWrite + 'static> Requests<R, W> {
    /// Reads and starts requests until the client disconnects (or, after
    /// shutdown, has nothing more to say). A broken stream or a protocol
    /// error drops the connection; when the input ends cleanly everything
    /// accepted is answered.
    async fn serve(mut self, stop: &Stop) -> std::io::Result<Ending> {
        let ending = loop {
            let next = next_input(&mut self.framing, &self.admission, self.idle_timeout, stop);
            match self.dispatch.alongside(next).await?? {
                Input::Request(req) if req.command == cmd::DISC => break Ending::Input,
                Input::Request(req) => self.handle(req, false).await?,
                Input::End => break Ending::Input,
                Input::Idle => break Ending::Idle,
                Input::Shutdown => {
                    self.drain().await?;
                    break Ending::Input;
                }
            }
        };
        self.dispatch.finish()?;
        Ok(ending)
    }

    /// Requests the client sent before it could know of the shutdown:
    /// answered with ESHUTDOWN rather than left unread (closing a socket
    /// with unread input resets it, losing replies in flight).
    async fn drain(&mut self) -> std::io::Result<()> {
        while let Some(req) = self.framing.request_if_ready()? {
            if req.command == cmd::DISC {
                break;
            }
            self.handle(req, true).await?;
        }
        Ok(())
    }

    /// Admits and starts one request, or refuses it (after reading any
    /// payload it carries).
    async fn handle(&mut self, req: Request, draining: bool) -> std::io::Result<()> {
        tracing::trace!(
            command = req.command,
            cookie = req.cookie,
            offset = req.offset,
            length = req.length,
            "request"
        );
        let payload = req.payload_len(self.extended);
        let checked = if draining {
            Err((errno::ESHUTDOWN, "server is shutting down"))
        } else {
            let session = self.dispatch.session();
            session.validate(&req).map_err(|r| (r.errno, r.message))
        };
        if let Err((code, message)) = checked {
            if payload > self.discard_limit {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "payload too large to discard",
                ));
            }
            let permits = self
                .dispatch
                .alongside(self.admission.slot_only())
                .await??;
            self.framing.discard(payload).await?;
            return self.dispatch.refuse(&req, code, message, permits);
        }
        let permits = self
            .dispatch
            .alongside(self.admission.admit(&req))
            .await??;
        match req.command {
            cmd::READ => self.dispatch.read(req, permits),
            cmd::WRITE => {
                let len = req.length as usize;
                let mut data = POOL.get(len);
                self.framing.read_payload(&mut data[..len]).await?;
                self.dispatch.start(req, data, permits)
            }
            _ => self.dispatch.start(req, Vec::new(), permits),
        }
    }
}

/// Waits for the next request, the end of the input, shutdown, or the
/// idle timeout. The idle timer restarts while requests are in flight (a
/// client waiting for its replies is not idle).
async fn next_input<R: AsyncRead + Unpin>(
    framing: &mut FrameReader<R>,
    admission: &Admission,
    idle_timeout: Option<Duration>,
    stop: &Stop,
) -> std::io::Result<Input> {
    loop {
        let idle = async {
            match idle_timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = framing.next_request() => {
                return Ok(r?.map_or(Input::End, Input::Request));
            }
            () = stop.cancelled() => return Ok(Input::Shutdown),
            () = idle => {}
        }
        if admission.idle() && !framing.mid_request() {
            return Ok(Input::Idle);
        }
    }
}
