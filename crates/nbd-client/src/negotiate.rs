//! Drives the sans-IO [`ClientHandshake`] over a stream, with a deadline so
//! a silent or slow server cannot stall the client forever.

use std::time::Duration;

use bytes::BytesMut;
use nbd_proto::client_handshake::{ClientConfig, ClientHandshake, ClientStep, HandshakeError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::stream::NbdStream;

/// Runs the handshake to completion (or failure) within `timeout`.
pub async fn negotiate<S: NbdStream>(
    stream: &mut S,
    cfg: ClientConfig,
    timeout: Duration,
) -> Result<ClientStep> {
    match tokio::time::timeout(timeout, run(stream, cfg)).await {
        Ok(r) => r,
        Err(_) => Err(Error::HandshakeTimeout(timeout)),
    }
}

async fn run<S: NbdStream>(stream: &mut S, cfg: ClientConfig) -> Result<ClientStep> {
    let mut hs = ClientHandshake::new(cfg);
    let mut input = BytesMut::with_capacity(4096);
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
                return Ok(step);
            }
            ClientStep::Listed(_) => {
                // Closing right after ABORT is fine; old servers do not ACK it.
                let _ = stream.shutdown().await;
                return Ok(step);
            }
        }
        if input.capacity() - input.len() < 1024 {
            input.reserve(4096);
        }
        let n = stream.read_buf(&mut input).await?;
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
