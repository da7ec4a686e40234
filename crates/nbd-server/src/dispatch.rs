//! Dispatch: admitted requests started on the device, their replies handed
//! to the writer. While the writer is behind (its backlog full), READs wait
//! here in arrival order but everything else still runs: a client that
//! asks for block status behind a row of reads is answered at once, and a
//! slow reader pins little memory.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::zero_copy::ReplyWrite;
use nbd_proto::consts::cmd;
use nbd_proto::request::Request;

use crate::admission::Permits;
use crate::execute::Session;
use crate::outgoing::ReplySink;

pub struct Dispatch<W> {
    session: Arc<Session>,
    sink: ReplySink<W>,
    /// READs whose replies would go over the writer's backlog, in arrival
    /// order, with the permits they hold.
    deferred: VecDeque<(Request, Permits)>,
}

impl<W: ReplyWrite + 'static> Dispatch<W> {
    pub fn new(session: Arc<Session>, sink: ReplySink<W>) -> Self {
        Dispatch {
            session,
            sink,
            deferred: VecDeque::new(),
        }
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Starts a READ, or defers it while the writer is behind.
    pub fn read(&mut self, req: Request, permits: Permits) -> std::io::Result<()> {
        if !self.deferred.is_empty() || !self.sink.has_room() {
            self.deferred.push_back((req, permits));
            return Ok(());
        }
        self.start(req, Vec::new(), permits)
    }

    /// Answers a refused request without running it.
    pub fn refuse(
        &self,
        req: &Request,
        code: u32,
        message: &str,
        permits: Permits,
    ) -> std::io::Result<()> {
        let mut out = self.session.error_reply(req, code, message);
        out.permits = Some(permits);
        self.sink.send(out)
    }

    /// Runs a request and sends its reply: on this task when the answer is
    /// at hand (cached data, block status), on a task of its own when the
    /// data must be fetched first (then at hand), else on the blocking pool.
    pub fn start(&self, req: Request, payload: Vec<u8>, permits: Permits) -> std::io::Result<()> {
        debug_assert!(req.command == cmd::WRITE || payload.is_empty());
        let started = self.session.metrics.started(req.command, req.length);
        if let Some(mut out) = self.session.try_inline(&req) {
            self.session.metrics.finished(req.command, started);
            out.permits = Some(permits);
            return self.sink.send(out);
        }
        let session = self.session.clone();
        let sink = self.sink.clone();
        if let Some(fetch) = session.fetch_ahead(&req) {
            tokio::spawn(async move {
                let out = match fetch.await {
                    Ok(rest) => {
                        if let Some(rest) = rest {
                            // Queued behind this task: the reply goes first.
                            tokio::spawn(finish_fetch(rest));
                        }
                        session.try_inline(&req)
                    }
                    Err(e) => Some(session.store_error(&req, &e)),
                };
                match out {
                    Some(out) => deliver(&session, &sink, &req, out, permits, started),
                    // Evicted already, or another fetch of the same blocks
                    // is under way: the blocking read waits for it.
                    None => run_blocking(session, sink, req, Vec::new(), permits, started),
                }
            });
            return Ok(());
        }
        run_blocking(session, sink, req, payload, permits, started);
        Ok(())
    }

    /// Starts the deferred READs, in order, while the writer has room.
    fn start_ready(&mut self) -> std::io::Result<()> {
        while self.sink.has_room()
            && let Some((req, permits)) = self.deferred.pop_front()
        {
            self.start(req, Vec::new(), permits)?;
        }
        Ok(())
    }

    /// Awaits `f` while starting deferred READs whenever the writer has
    /// room: they may hold the very permits `f` waits for, so otherwise a
    /// mix of request sizes could stall the connection. Fails when the
    /// writer is gone, since no reply can be sent any more.
    pub async fn alongside<T>(&mut self, f: impl Future<Output = T>) -> std::io::Result<T> {
        let mut f = std::pin::pin!(f);
        loop {
            self.start_ready()?;
            // `f` first: when it is ready at once (the usual case for a
            // permit) nothing else is polled or registered.
            tokio::select! {
                biased;
                v = &mut f => return Ok(v),
                () = self.sink.room(), if !self.deferred.is_empty() => {}
                () = self.sink.gone() => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "replies can no longer be sent",
                    ));
                }
            }
        }
    }

    /// The input has ended cleanly: starts every deferred READ (the writer
    /// sends them as the client takes them).
    pub fn finish(mut self) -> std::io::Result<()> {
        for (req, permits) in std::mem::take(&mut self.deferred) {
            self.start(req, Vec::new(), permits)?;
        }
        Ok(())
    }
}

/// Runs a request on the blocking pool and sends its reply from there.
fn run_blocking<W: ReplyWrite + 'static>(
    session: Arc<Session>,
    sink: ReplySink<W>,
    req: Request,
    payload: Vec<u8>,
    permits: Permits,
    started: std::time::Instant,
) {
    tokio::task::spawn_blocking(move || {
        let out = session.execute(&req, payload);
        deliver(&session, &sink, &req, out, permits, started);
    });
}

/// Sends a reply made away from the reader's task, from the thread that
/// made it when the socket is free: waking the writer task would cost a
/// cross-thread wakeup per request.
fn deliver<W: ReplyWrite + 'static>(
    session: &Session,
    sink: &ReplySink<W>,
    req: &Request,
    mut out: crate::outgoing::Outgoing,
    permits: Permits,
    started: std::time::Instant,
) {
    session.metrics.finished(req.command, started);
    out.permits = Some(permits);
    sink.send_or_close(out);
}

/// Runs what a fetch left to do once its reader could be answered. A
/// failure leaves those blocks absent: the next read of them fetches them.
async fn finish_fetch(rest: ferry_block::Fetch) {
    let mut next = Some(rest);
    while let Some(f) = next {
        next = match f.await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("fetching the rest of a block: {e}");
                None
            }
        };
    }
}
