//! A client for one export: one or more connections (several only when the
//! server advertises multi-conn), each with many requests in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use nbd_proto::client_handshake::{ClientConfig, ClientStep};
use nbd_proto::option::ServerEntry;
use nbd_proto::reply::Extent;

use crate::ExportInfo;
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::negotiate::negotiate;
use crate::stream::{BoxStream, NbdStream, connect_transport};
use crate::tls::{TlsOptions, TlsSetup};
use crate::uri::NbdUri;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Connections to open if the server allows multi-conn (else 1).
    pub connections: usize,
    /// Requests in flight per connection.
    pub requests: usize,
    /// Meta contexts to select (e.g. `base:allocation`).
    pub meta_contexts: Vec<String>,
    /// Also list every context the export offers.
    pub list_contexts: bool,
    pub structured: bool,
    pub extended: bool,
    pub handshake_timeout: Duration,
    /// Fail the connection once requests have waited this long without a
    /// byte from the server (None: wait forever).
    pub io_timeout: Option<Duration>,
    /// TLS settings for `nbds` URIs beyond what the URI itself says.
    pub tls: TlsOptions,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connections: 1,
            requests: 16,
            meta_contexts: Vec::new(),
            list_contexts: false,
            structured: true,
            extended: true,
            handshake_timeout: Duration::from_secs(30),
            io_timeout: Some(Duration::from_secs(60)),
            tls: TlsOptions::default(),
        }
    }
}

impl ConnectOptions {
    fn handshake_config(&self, export: &str) -> ClientConfig {
        ClientConfig {
            export: export.to_string(),
            structured: self.structured,
            extended: self.extended,
            meta_contexts: self.meta_contexts.clone(),
            list_contexts: self.list_contexts,
            list_exports: false,
            tls: false,
        }
    }
}

/// Extents of one meta context, as returned by [`Client::block_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextExtents {
    pub name: String,
    pub extents: Vec<Extent>,
}

pub struct Client {
    conns: Vec<Connection>,
    next: AtomicUsize,
}

impl Client {
    /// Connects to the export a URI names.
    pub async fn connect(uri: &NbdUri, opts: &ConnectOptions) -> Result<Client> {
        let first = open(uri, opts).await?;
        let mut conns = vec![first];
        let want = if conns[0].info().can_multi_conn() {
            opts.connections.max(1)
        } else {
            1
        };
        let mut more = opts.clone();
        // Listing contexts once is enough.
        more.list_contexts = false;
        // Dialled together: one after another, each handshake's round
        // trips add up (on a link with latency, or over TLS).
        let rest = futures_util::future::try_join_all((1..want).map(|_| open(uri, &more))).await?;
        for c in rest {
            let (a, b) = (conns[0].info(), c.info());
            if a.size != b.size || a.flags != b.flags || a.contexts.len() != b.contexts.len() {
                return Err(Error::Protocol(
                    "a second connection to the same export was negotiated differently".into(),
                ));
            }
            conns.push(c);
        }
        Ok(Client {
            conns,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs the handshake over an already open stream (one connection).
    pub async fn from_stream<S: NbdStream>(
        stream: S,
        export: &str,
        opts: &ConnectOptions,
    ) -> Result<Client> {
        let (info, stream) = handshake(
            Box::new(stream),
            opts.handshake_config(export),
            opts.handshake_timeout,
            None,
        )
        .await?;
        Ok(Client {
            conns: vec![Connection::start(
                stream,
                info,
                opts.requests,
                opts.io_timeout,
            )],
            next: AtomicUsize::new(0),
        })
    }

    /// What the (first) connection negotiated.
    pub fn info(&self) -> &ExportInfo {
        self.conns[0].info()
    }

    pub fn size(&self) -> u64 {
        self.info().size
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The connection with the most free request slots, starting the
    /// search round-robin so equal ones share the load.
    fn pick(&self) -> &Connection {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = &self.conns[start];
        for i in 1..n {
            let c = &self.conns[(start + i) % n];
            if c.idle_slots() > best.idle_slots() {
                best = c;
            }
        }
        best
    }

    pub async fn read(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.pick().read(offset, buf).await
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.pick().write(offset, data, fua).await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        no_hole: bool,
        fast: bool,
    ) -> Result<()> {
        self.pick()
            .write_zeroes(offset, length, no_hole, fast)
            .await
    }

    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.pick().trim(offset, length).await
    }

    /// Flushes every connection. The caller must have collected the replies
    /// of the writes it wants covered before calling this (spec §4.8).
    pub async fn flush(&self) -> Result<()> {
        if self.info().can_multi_conn() {
            // One flush covers all connections of a multi-conn export.
            self.conns[0].flush().await
        } else {
            for c in &self.conns {
                c.flush().await?;
            }
            Ok(())
        }
    }

    /// Block status of every selected context, named.
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<ContextExtents>> {
        let conn = self.pick();
        let raw = conn.block_status(offset, length, false).await?;
        let info = conn.info();
        Ok(raw
            .into_iter()
            .filter_map(|(id, extents)| {
                let name = info.contexts.iter().find(|(i, _)| *i == id)?.1.clone();
                Some(ContextExtents { name, extents })
            })
            .collect())
    }

    /// Soft disconnect of every connection.
    pub async fn disconnect(self) -> Result<()> {
        for c in &self.conns {
            c.disconnect().await?;
        }
        Ok(())
    }
}

async fn handshake(
    stream: BoxStream,
    cfg: ClientConfig,
    timeout: Duration,
    tls: Option<&TlsSetup>,
) -> Result<(ExportInfo, BoxStream)> {
    match negotiate(stream, cfg, timeout, tls).await? {
        (ClientStep::Done(n), stream) => Ok((*n, stream)),
        _ => Err(Error::Protocol(
            "handshake ended without opening the export".into(),
        )),
    }
}

async fn open(uri: &NbdUri, opts: &ConnectOptions) -> Result<Connection> {
    let tls = TlsSetup::for_uri(uri, &opts.tls)?;
    let stream = tokio::time::timeout(opts.handshake_timeout, connect_transport(uri))
        .await
        .map_err(|_| Error::HandshakeTimeout(opts.handshake_timeout))??;
    let (info, stream) = handshake(
        stream,
        opts.handshake_config(&uri.export),
        opts.handshake_timeout,
        tls.as_ref(),
    )
    .await?;
    tracing::debug!(size = info.size, flags = info.flags, mode = ?info.mode, "connected to {uri}");
    Ok(Connection::start(
        stream,
        info,
        opts.requests,
        opts.io_timeout,
    ))
}

/// The exports a server lists (NBD_OPT_LIST).
pub async fn list_exports(uri: &NbdUri, timeout: Duration) -> Result<Vec<ServerEntry>> {
    let tls = TlsSetup::for_uri(uri, &TlsOptions::default())?;
    let stream = tokio::time::timeout(timeout, connect_transport(uri))
        .await
        .map_err(|_| Error::HandshakeTimeout(timeout))??;
    let cfg = ClientConfig {
        export: String::new(),
        structured: false,
        extended: false,
        meta_contexts: Vec::new(),
        list_contexts: false,
        list_exports: true,
        tls: false,
    };
    match negotiate(stream, cfg, timeout, tls.as_ref()).await? {
        (ClientStep::Listed(v), _) => Ok(v),
        _ => Err(Error::Protocol("LIST did not produce a list".into())),
    }
}
