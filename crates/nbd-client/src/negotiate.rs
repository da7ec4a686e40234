//! Drives the sans-IO [`ClientHandshake`] over a stream, with a deadline so
//! a silent or slow server cannot stall the client forever.

use std::time::Duration;

use bytes::BytesMut;
use nbd_proto::client_handshake::{ClientConfig, ClientHandshake, ClientStep, HandshakeError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use nbd_tls::Prefixed;

use crate::error::{Error, Result};
use crate::stream::BoxStream;
use crate::tls::TlsSetup;

/// Runs the handshake to completion (or failure) within `timeout`,
/// upgrading the stream to TLS on the way when `tls` is given. Returns the
/// final step and the stream transmission continues on.
pub async fn negotiate(
    stream: BoxStream,
    cfg: ClientConfig,
    timeout: Duration,
    tls: Option<&TlsSetup>,
) -> Result<(ClientStep, BoxStream)> {
    match tokio::time::timeout(timeout, run(stream, cfg, tls)).await {
        Ok(r) => r,
        Err(_) => Err(Error::HandshakeTimeout(timeout)),
    }
}

async fn run(
    mut stream: BoxStream,
    mut cfg: ClientConfig,
    tls: Option<&TlsSetup>,
) -> Result<(ClientStep, BoxStream)> {
    cfg.tls = tls.is_some();
    let mut hs = ClientHandshake::new(cfg);
    let mut input = BytesMut::with_capacity(4096);
    // TLS is up but the server has not said anything through it yet.
    let mut tls_unconfirmed = false;
    loop {
        let step = hs.feed(&mut input)?;
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await?;
            stream.flush().await?;
        }
        match step {
            ClientStep::NeedMore => {}
            ClientStep::Done(_) => {
                // Servers speak only when spoken to in transmission.
                if !input.is_empty() {
                    return Err(Error::Protocol(
                        "unexpected data after the handshake".into(),
                    ));
                }
                return Ok((step, stream));
            }
            ClientStep::Listed(_) => {
                // Closing right after ABORT is fine; old servers do not ACK it.
                let _ = stream.shutdown().await;
                return Ok((step, stream));
            }
            ClientStep::StartTls => {
                let Some(setup) = tls else {
                    return Err(Error::Protocol(
                        "STARTTLS accepted but never asked for".into(),
                    ));
                };
                let leftover = std::mem::take(&mut input).to_vec();
                let upgraded = setup
                    .connector
                    .connect(setup.server_name.clone(), Prefixed::new(leftover, stream))
                    .await
                    .map_err(|e| {
                        Error::Tls(nbd_tls::describe_handshake_error(&e, nbd_tls::Side::Client))
                    })?;
                stream = Box::new(upgraded);
                hs.tls_established()?;
                tls_unconfirmed = true;
                continue;
            }
        }
        if input.capacity() - input.len() < 1024 {
            input.reserve(4096);
        }
        // In TLS 1.3 the server judges our certificate after we think the
        // handshake is over: its verdict arrives as an alert on this read.
        // Some servers (gnutls: nbdkit, qemu-nbd) just drop the connection
        // instead of sending an alert.
        let n = stream.read_buf(&mut input).await.map_err(|e| match tls {
            Some(_) if e.to_string().contains("alert") => {
                Error::Tls(nbd_tls::describe_handshake_error(&e, nbd_tls::Side::Client))
            }
            Some(_) if tls_unconfirmed => Error::Tls(format!(
                "the server ended the TLS session right after the handshake ({e}): \
                 it probably rejected our client certificate (client-cert.pem/client-key.pem \
                 signed by the server's CA?)"
            )),
            _ => e.into(),
        })?;
        if n > 0 {
            tls_unconfirmed = false;
        }
        if n == 0 && tls_unconfirmed {
            return Err(Error::Tls(
                "the server closed the TLS session right after the handshake: it probably \
                 rejected our client certificate (client-cert.pem/client-key.pem signed by \
                 the server's CA?)"
                    .into(),
            ));
        }
        if n == 0 {
            if hs.awaiting_export_name() {
                return Err(HandshakeError::ExportNameRejected(hs.export().to_string()).into());
            }
            return Err(Error::Disconnected(
                "server closed the connection during the handshake".into(),
            ));
        }
    }
}
