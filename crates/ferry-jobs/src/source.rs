//! The source of a disk that is still arriving (post-copy): an NBD export
//! that is reached again after every failure, and checked each time to
//! still be the same disk.
//!
//! A request waits for the source up to the source timeout: through
//! reconnects with capped, jittered back-off; past the timeout it fails
//! (the server answers that one request with EIO and keeps serving).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_block::{
    BASE_ALLOCATION, BlockDev, Caps, Error as BlockError, Extent, IDENTITY_PREFIX,
    Result as BlockResult, ZeroMode, check_range,
};
use nbd_client::{Client, ConnectOptions, NbdUri};
use serde::{Deserialize, Serialize};

/// What a source is: checked at every connection, recorded at the first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    pub size: u64,
    pub export: String,
    /// The `nbdferry:identity:...` context an nbdferry source publishes
    /// for its disk or snapshot (other servers publish none).
    pub id: Option<String>,
}

impl SourceIdentity {
    fn of(uri: &NbdUri, client: &Client) -> Self {
        let info = client.info();
        let id = info.available_contexts.as_ref().and_then(|list| {
            list.iter()
                .find(|c| c.starts_with(IDENTITY_PREFIX))
                .cloned()
        });
        SourceIdentity {
            size: info.size,
            export: uri.export.clone(),
            id,
        }
    }
}

/// Why the source could not answer.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("the source is not reachable ({0}) and did not come back within {1:?}")]
    Unavailable(String, Duration),
    /// Another disk answers at the source's address: never mixed in.
    #[error("the source is not the disk it was: it was {expected:?}, it is now {found:?}")]
    Changed {
        expected: SourceIdentity,
        found: SourceIdentity,
    },
    #[error("the source refused: {0}")]
    Refused(nbd_client::Error),
}

/// Connected or not, and the last failure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
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
    status: SourceStatus,
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

pub struct Source {
    uri: NbdUri,
    opts: Lanes<ConnectOptions>,
    identity: SourceIdentity,
    timeout: Duration,
    links: Lanes<Mutex<Link>>,
    /// One reconnect at a time per lane; the others wait for its outcome.
    reconnecting: Lanes<tokio::sync::Mutex<()>>,
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
        nbd_client::Error::Server { .. } | nbd_client::Error::InvalidRequest(_)
    )
}

impl Source {
    /// Connects once (one handshake; the background pass's connections
    /// are opened when it first needs them). With `recorded`, the source
    /// must be that disk; without, what it is now is returned, to record.
    /// `opts` are for the background pass; clients' reads get one
    /// connection of their own.
    pub async fn connect(
        uri: NbdUri,
        mut opts: ConnectOptions,
        timeout: Duration,
        recorded: Option<SourceIdentity>,
    ) -> Result<Source, SourceError> {
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
            .map_err(|e| SourceError::Unavailable(e.to_string(), Duration::ZERO))?;
        let found = SourceIdentity::of(&uri, &client);
        if let Some(expected) = recorded
            && expected != found
        {
            return Err(SourceError::Changed { expected, found });
        }
        tracing::info!(source = %uri, size = found.size, "connected to the source");
        let link = |client: Option<Client>| {
            Mutex::new(Link {
                status: SourceStatus {
                    connected: client.is_some(),
                    ..SourceStatus::default()
                },
                client: client.map(Arc::new),
            })
        };
        Ok(Source {
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
        })
    }

    pub fn identity(&self) -> &SourceIdentity {
        &self.identity
    }

    /// The clients' lane's view (the background one comes and goes).
    pub fn status(&self) -> SourceStatus {
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
    async fn client(&self, lane: Lane, deadline: Instant) -> Result<Arc<Client>, SourceError> {
        if let Some(c) = self.link(lane).client.clone() {
            return Ok(c);
        }
        let _one = self.reconnecting.get(lane).lock().await;
        let mut wait = BACKOFF_MIN;
        loop {
            if let Some(c) = self.link(lane).client.clone() {
                return Ok(c);
            }
            let attempt = tokio::time::timeout_at(
                deadline.into(),
                Client::connect(&self.uri, self.opts.get(lane)),
            )
            .await;
            let why = match attempt {
                Ok(Ok(client)) => {
                    let found = SourceIdentity::of(&self.uri, &client);
                    if found != self.identity {
                        let e = SourceError::Changed {
                            expected: self.identity.clone(),
                            found,
                        };
                        tracing::error!(source = %self.uri, "{e}");
                        self.link(lane).status.last_error = Some(e.to_string());
                        return Err(e);
                    }
                    let client = Arc::new(client);
                    let mut l = self.link(lane);
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
                return Err(SourceError::Unavailable(why, self.timeout));
            }
            tokio::time::sleep(jitter(wait).min(deadline - now)).await;
            wait = (wait * 2).min(BACKOFF_MAX);
        }
    }

    /// Runs `op` on the connection, again on a new one after a failure,
    /// until the source timeout.
    async fn with_client<T, F, Fut>(&self, lane: Lane, op: F) -> Result<T, SourceError>
    where
        F: Fn(Arc<Client>) -> Fut,
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
                return Err(SourceError::Unavailable(e.to_string(), self.timeout));
            };
            match answer {
                Ok(v) => return Ok(v),
                Err(e) if connection_lost(&e) => {
                    self.lost(lane, &client, &e);
                    if Instant::now() >= deadline {
                        return Err(SourceError::Unavailable(e.to_string(), self.timeout));
                    }
                }
                Err(e) => return Err(SourceError::Refused(e)),
            }
        }
    }

    /// `len` bytes at `offset`.
    pub async fn read(&self, lane: Lane, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        self.with_client(lane, |c| async move {
            c.read(offset, vec![0u8; len as usize]).await
        })
        .await
    }

    /// `base:allocation` extents from `offset`, for up to `len` bytes.
    pub async fn allocation(
        &self,
        lane: Lane,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, SourceError> {
        let found = self
            .with_client(lane, |c| async move { c.block_status(offset, len).await })
            .await?;
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

/// The source as a (read-only, blocking) device, for the copy-on-read
/// layer: each call waits for the source on the runtime, without holding
/// up the runtime's other work.
pub struct SourceDev {
    source: Arc<Source>,
    handle: tokio::runtime::Handle,
}

impl SourceDev {
    pub fn new(source: Arc<Source>, handle: tokio::runtime::Handle) -> Self {
        SourceDev { source, handle }
    }

    fn wait<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, SourceError>>,
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

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _mode: ZeroMode) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
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
