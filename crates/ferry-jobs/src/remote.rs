//! A remote disk a job works with: the source of a disk that is still
//! arriving (post-copy), the destination of a mirror. An NBD export that
//! is reached again after every failure, and checked each time to still
//! be the same disk.
//!
//! A request waits for the remote up to its timeout: through reconnects
//! with capped, jittered back-off; past the timeout it fails (for a
//! post-copy read: the server answers that one request with EIO and keeps
//! serving).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_block::{
    BASE_ALLOCATION, BlockDev, Caps, Error as BlockError, Extent, IDENTITY_PREFIX,
    Result as BlockResult, check_range,
};
use nbd_client::{Client, ConnectOptions, NbdUri};
use serde::{Deserialize, Serialize};

/// What a remote disk is: checked at every connection, recorded at the
/// first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteIdentity {
    pub size: u64,
    pub export: String,
    /// The `nbdferry:identity:...` context an nbdferry server publishes
    /// for its disk or snapshot (other servers publish none).
    pub id: Option<String>,
}

impl RemoteIdentity {
    fn of(uri: &NbdUri, client: &Client) -> Self {
        let info = client.info();
        let id = info.available_contexts.as_ref().and_then(|list| {
            list.iter()
                .find(|c| c.starts_with(IDENTITY_PREFIX))
                .cloned()
        });
        RemoteIdentity {
            size: info.size,
            export: uri.export.clone(),
            id,
        }
    }
}

/// Why the remote could not answer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the remote disk is not reachable ({0}) and did not come back within {1:?}")]
    Unavailable(String, Duration),
    /// Another disk answers at the remote's address: never mixed in.
    #[error("the remote is not the disk it was: it was {expected:?}, it is now {found:?}")]
    Changed {
        expected: RemoteIdentity,
        found: RemoteIdentity,
    },
    #[error("the remote refused: {0}")]
    Refused(nbd_client::Error),
    /// A mirror's destination must take writes.
    #[error("{0} is read-only")]
    ReadOnly(String),
}

/// Connected or not, and the last failure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteStatus {
    pub connected: bool,
    pub reconnects: u64,
    pub last_error: Option<String>,
}

/// Which connection a request goes on. Clients' reads (on demand) have
/// one of their own, so they never queue behind the background pass's
/// large reads on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Demand,
    Bulk,
}

struct Link {
    client: Option<Arc<Client>>,
    status: RemoteStatus,
}

struct Lanes<T> {
    demand: T,
    bulk: T,
}

impl<T> Lanes<T> {
    fn get(&self, lane: Lane) -> &T {
        match lane {
            Lane::Demand => &self.demand,
            Lane::Bulk => &self.bulk,
        }
    }
}

pub struct Remote {
    uri: NbdUri,
    opts: Lanes<ConnectOptions>,
    identity: RemoteIdentity,
    timeout: Duration,
    links: Lanes<Mutex<Link>>,
    /// One reconnect at a time per lane; the others wait for its outcome.
    reconnecting: Lanes<tokio::sync::Mutex<()>>,
    /// Where the background lane's connections run their tasks (None: on
    /// the runtime of whoever connects).
    bulk_runtime: Option<tokio::runtime::Handle>,
    /// Let go (see [`Remote::close`]): no connection is opened again.
    closed: AtomicBool,
}

/// First retry after this, doubling up to `BACKOFF_MAX`, each with up to
/// half of it added at random so that many destinations do not come back
/// in step.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// Errors that mean "this connection is gone", as opposed to the server
/// answering a request with an error.
fn connection_lost(e: &nbd_client::Error) -> bool {
    !matches!(
        e,
        nbd_client::Error::Server { .. }
            | nbd_client::Error::InvalidRequest(_)
            | nbd_client::Error::Unsupported(_)
    )
}

impl Remote {
    /// Connects once (one handshake; the background pass's connections
    /// are opened when it first needs them). With `recorded`, the source
    /// must be that disk; without, what it is now is returned, to record.
    /// `opts` are for the background pass; clients' reads get one
    /// connection of their own.
    pub async fn connect(
        uri: NbdUri,
        mut opts: ConnectOptions,
        timeout: Duration,
        recorded: Option<RemoteIdentity>,
    ) -> Result<Remote, RemoteError> {
        opts.list_contexts = true;
        if !opts.meta_contexts.iter().any(|c| c == BASE_ALLOCATION) {
            opts.meta_contexts.push(BASE_ALLOCATION.to_string());
        }
        let demand_opts = ConnectOptions {
            connections: 1,
            ..opts.clone()
        };
        let client = Client::connect(&uri, &demand_opts)
            .await
            .map_err(|e| RemoteError::Unavailable(e.to_string(), Duration::ZERO))?;
        let found = RemoteIdentity::of(&uri, &client);
        if let Some(expected) = recorded
            && expected != found
        {
            return Err(RemoteError::Changed { expected, found });
        }
        tracing::info!(source = %uri, size = found.size, "connected to the source");
        let link = |client: Option<Client>| {
            Mutex::new(Link {
                status: RemoteStatus {
                    connected: client.is_some(),
                    ..RemoteStatus::default()
                },
                client: client.map(Arc::new),
            })
        };
        Ok(Remote {
            uri,
            opts: Lanes {
                demand: demand_opts,
                bulk: opts,
            },
            identity: found,
            timeout,
            links: Lanes {
                demand: link(Some(client)),
                bulk: link(None),
            },
            reconnecting: Lanes {
                demand: tokio::sync::Mutex::new(()),
                bulk: tokio::sync::Mutex::new(()),
            },
            bulk_runtime: None,
            closed: AtomicBool::new(false),
        })
    }

    /// The background lane's connections run on `runtime` (the pass's, see
    /// [`crate::background`]), whoever opens them: a reader's fetch of
    /// the rest of its block may be first.
    pub fn with_bulk_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.bulk_runtime = Some(runtime);
        self
    }

    /// Opens the background lane's connections now, beside the rest of
    /// the start-up, for the pass that starts next: it took them 3-4 ms
    /// after it started on loopback, and waited for them. Whoever needs
    /// the lane meanwhile waits for this attempt (see [`Self::client`]).
    pub fn open_bulk_ahead(self: &Arc<Self>) {
        let me = self.clone();
        let deadline = Instant::now() + self.timeout;
        tokio::spawn(async move {
            // A failure is recorded in the status; the pass tries again.
            let _ = me.client(Lane::Bulk, deadline).await;
        });
    }

    async fn open(&self, lane: Lane) -> nbd_client::Result<Client> {
        let (uri, opts) = (self.uri.clone(), self.opts.get(lane).clone());
        match (&self.bulk_runtime, lane) {
            (Some(rt), Lane::Bulk) => rt
                .spawn(async move { Client::connect(&uri, &opts).await })
                .await
                .unwrap_or_else(|e| Err(nbd_client::Error::Io(std::io::Error::other(e)))),
            _ => Client::connect(&uri, &opts).await,
        }
    }

    pub fn identity(&self) -> &RemoteIdentity {
        &self.identity
    }

    /// The clients' lane's view (the background one comes and goes).
    pub fn status(&self) -> RemoteStatus {
        let mut st = self.link(Lane::Demand).status.clone();
        let bulk = self.link(Lane::Bulk).status.clone();
        st.reconnects += bulk.reconnects;
        st.last_error = st.last_error.or(bulk.last_error);
        st
    }

    fn link(&self, lane: Lane) -> MutexGuard<'_, Link> {
        self.links
            .get(lane)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the connections (a complete disk needs the source no more).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for lane in [Lane::Demand, Lane::Bulk] {
            let mut l = self.link(lane);
            l.client = None;
            l.status.connected = false;
        }
    }

    fn lost(&self, lane: Lane, client: &Arc<Client>, e: &nbd_client::Error) {
        let mut l = self.link(lane);
        if l.client.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            tracing::warn!(source = %self.uri, "lost the source: {e}");
            l.client = None;
            l.status.connected = false;
            l.status.last_error = Some(e.to_string());
        }
    }

    /// The lane's live connection, reconnecting (with back-off) until
    /// `deadline`.
    async fn client(&self, lane: Lane, deadline: Instant) -> Result<Arc<Client>, RemoteError> {
        if let Some(c) = self.link(lane).client.clone() {
            return Ok(c);
        }
        let _one = self.reconnecting.get(lane).lock().await;
        let mut wait = BACKOFF_MIN;
        let let_go = || RemoteError::Unavailable("the source was let go".into(), Duration::ZERO);
        loop {
            if let Some(c) = self.link(lane).client.clone() {
                return Ok(c);
            }
            // A question or an early connection still under way when the
            // disk completed must not open the source again.
            if self.closed.load(Ordering::Acquire) {
                return Err(let_go());
            }
            let attempt = tokio::time::timeout_at(deadline.into(), self.open(lane)).await;
            let why = match attempt {
                Ok(Ok(client)) => {
                    let found = RemoteIdentity::of(&self.uri, &client);
                    if found != self.identity {
                        let e = RemoteError::Changed {
                            expected: self.identity.clone(),
                            found,
                        };
                        tracing::error!(source = %self.uri, "{e}");
                        self.link(lane).status.last_error = Some(e.to_string());
                        return Err(e);
                    }
                    let client = Arc::new(client);
                    let mut l = self.link(lane);
                    // Under the link's lock, which `close` takes after
                    // setting the flag.
                    if self.closed.load(Ordering::Acquire) {
                        return Err(let_go());
                    }
                    let again = l.status.last_error.is_some();
                    l.client = Some(client.clone());
                    l.status.connected = true;
                    if again {
                        l.status.reconnects += 1;
                        tracing::info!(source = %self.uri, ?lane, "reconnected to the source");
                    }
                    return Ok(client);
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connect timed out".to_string(),
            };
            self.link(lane).status.last_error = Some(why.clone());
            let now = Instant::now();
            if now >= deadline {
                return Err(RemoteError::Unavailable(why, self.timeout));
            }
            tokio::time::sleep(jitter(wait).min(deadline - now)).await;
            wait = (wait * 2).min(BACKOFF_MAX);
        }
    }

    /// Runs `op` on the connection, again on a new one after a failure,
    /// until the source timeout.
    async fn with_client<T, F, Fut>(&self, lane: Lane, mut op: F) -> Result<T, RemoteError>
    where
        F: FnMut(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = nbd_client::Result<T>>,
    {
        let deadline = Instant::now() + self.timeout;
        loop {
            let client = self.client(lane, deadline).await?;
            let Ok(answer) = tokio::time::timeout_at(deadline.into(), op(client.clone())).await
            else {
                // Silent past the deadline (a cut link, say): this request
                // fails, and the connection is not trusted again.
                let e = nbd_client::Error::Timeout(self.timeout);
                self.lost(lane, &client, &e);
                return Err(RemoteError::Unavailable(e.to_string(), self.timeout));
            };
            match answer {
                Ok(v) => return Ok(v),
                Err(e) if connection_lost(&e) => {
                    self.lost(lane, &client, &e);
                    if Instant::now() >= deadline {
                        return Err(RemoteError::Unavailable(e.to_string(), self.timeout));
                    }
                }
                Err(e) => return Err(RemoteError::Refused(e)),
            }
        }
    }

    /// `len` bytes at `offset`.
    pub async fn read(&self, lane: Lane, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        self.read_into(lane, offset, vec![0u8; len as usize]).await
    }

    /// `buf.len()` bytes at `offset`, into `buf` (whatever it holds: the
    /// reply must cover it all, holes come back zeroed). A retry on a new
    /// connection reads into a fresh buffer.
    pub async fn read_into(
        &self,
        lane: Lane,
        offset: u64,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>, RemoteError> {
        let len = buf.len();
        let mut first = Some(buf);
        self.with_client(lane, |c| {
            let buf = first.take().unwrap_or_else(|| vec![0u8; len]);
            async move { c.read(offset, buf).await }
        })
        .await
    }

    /// `base:allocation` extents from `offset`, for up to `len` bytes.
    pub async fn allocation(
        &self,
        lane: Lane,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, RemoteError> {
        let found = match self
            .with_client(lane, |c| async move { c.block_status(offset, len).await })
            .await
        {
            // A source that agreed to no meta context: all data.
            Err(RemoteError::Refused(nbd_client::Error::Unsupported(_))) => Vec::new(),
            r => r?,
        };
        let Some(ctx) = found.into_iter().find(|c| c.name == BASE_ALLOCATION) else {
            return Ok(vec![Extent {
                length: len,
                flags: 0,
            }]);
        };
        // Servers may answer past the range asked for: clip.
        let mut out = Vec::new();
        let mut left = len;
        for e in ctx.extents {
            let length = e.length.min(left);
            if length == 0 {
                break;
            }
            out.push(Extent {
                length,
                flags: e.flags as u32,
            });
            left -= length;
        }
        Ok(out)
    }
}

impl Remote {
    /// Writes `data` at `offset`.
    pub async fn write(&self, lane: Lane, offset: u64, data: Bytes) -> Result<(), RemoteError> {
        self.with_client(lane, |c| {
            let data = data.clone();
            async move { c.write(offset, data, false).await }
        })
        .await
    }

    /// Zeroes `[offset, offset+len)` (holes allowed).
    pub async fn write_zeroes(&self, lane: Lane, offset: u64, len: u64) -> Result<(), RemoteError> {
        self.with_client(lane, |c| async move {
            c.write_zeroes(offset, len, false, false).await
        })
        .await
    }

    /// Makes every write acknowledged so far durable.
    pub async fn flush(&self, lane: Lane) -> Result<(), RemoteError> {
        self.with_client(lane, |c| async move { c.flush().await })
            .await
    }

    /// Fails unless the remote takes writes.
    pub fn check_writable(&self) -> Result<(), RemoteError> {
        let l = self.link(Lane::Demand);
        match &l.client {
            Some(c) if c.info().read_only() => Err(RemoteError::ReadOnly(self.uri.to_string())),
            _ => Ok(()),
        }
    }
}

/// The source as a (read-only, blocking) device, for the copy-on-read
/// layer: each call waits for the source on the runtime, without holding
/// up the runtime's other work.
pub struct SourceDev {
    source: Arc<Remote>,
    handle: tokio::runtime::Handle,
}

impl SourceDev {
    pub fn new(source: Arc<Remote>, handle: tokio::runtime::Handle) -> Self {
        SourceDev { source, handle }
    }

    /// The source's reads to await on the runtime instead of blocking a
    /// thread (for [`ferry_store::CopyOnRead::with_async_reads`]).
    pub fn async_reads(&self) -> ferry_store::AsyncRead {
        let source = self.source.clone();
        Arc::new(move |offset, len, waited| {
            let source = source.clone();
            // What no reader waits for goes the background pass's way.
            let lane = if waited { Lane::Demand } else { Lane::Bulk };
            Box::pin(async move {
                source
                    .read(lane, offset, len)
                    .await
                    .map_err(std::io::Error::other)
            })
        })
    }

    fn wait<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, RemoteError>>,
    ) -> BlockResult<T> {
        // block_in_place lets an async worker block (its other tasks move
        // to another thread); on a blocking-pool thread it just runs.
        tokio::task::block_in_place(|| self.handle.block_on(fut))
            .map_err(|e| BlockError::Io(std::io::Error::other(e.to_string())))
    }
}

impl BlockDev for SourceDev {
    fn size(&self) -> u64 {
        self.source.identity.size
    }

    fn caps(&self) -> Caps {
        Caps::READ_ONLY
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let data = self.wait(self.source.read(Lane::Demand, offset, buf.len() as u64))?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    /// Nothing about the source is known without asking it.
    fn local_allocation(&self, _offset: u64, _len: u64, _max: usize) -> Option<Vec<Extent>> {
        None
    }

    fn contexts(&self) -> Vec<String> {
        vec![BASE_ALLOCATION.to_string()]
    }

    fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max: usize,
    ) -> BlockResult<Vec<Extent>> {
        if context != BASE_ALLOCATION {
            return Err(BlockError::UnknownContext(context.to_string()));
        }
        check_range(self.size(), offset, len)?;
        let mut v = self.wait(self.source.allocation(Lane::Demand, offset, len))?;
        v.truncate(max.max(1));
        Ok(v)
    }
}
