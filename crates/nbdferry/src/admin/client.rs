//! The CLI's side of the admin API: one HTTP/1 request per command over
//! the daemon's Unix socket.

use std::path::Path;

use anyhow::{Context, bail};
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Percent-encodes a path segment so any name reaches the daemon, which
/// validates it (the CLI checks names first, but the API is the boundary).
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Sends one request and returns the JSON answer; an error answer becomes
/// an error carrying the daemon's one-line message.
pub async fn request(
    sock: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .with_context(|| {
            format!(
                "cannot reach the nbdferry daemon at {} (is `nbdferry serve` running? see --admin)",
                sock.display()
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin API handshake failed")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("admin connection: {e}");
        }
    });
    let data = match &body {
        Some(v) => serde_json::to_vec(v)?,
        None => Vec::new(),
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(data)))?;
    let resp = sender
        .send_request(req)
        .await
        .context("admin API request failed")?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .context("admin API answer cut short")?
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("admin API answered {status} with non-JSON data"))?;
    if !status.is_success() {
        match v.get("error").and_then(Value::as_str) {
            Some(msg) => bail!("{msg}"),
            None => bail!("admin API answered {status}"),
        }
    }
    Ok(v)
}
