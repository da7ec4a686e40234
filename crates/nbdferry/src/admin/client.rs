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

/// Where the CLI finds the daemon: `--admin PATH`, shared by the
/// `snapshot` and `checkpoint` commands.
#[derive(clap::Args)]
pub struct AdminArg {
    /// The daemon's admin socket [default: STATE_DIR/admin.sock].
    #[arg(long, value_name = "PATH", global = true)]
    admin: Option<std::path::PathBuf>,
}

impl AdminArg {
    /// Sends one request (see [`request`]) and prints the JSON answer.
    pub async fn call(self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<()> {
        let sock = self.admin.unwrap_or_else(super::default_admin_socket);
        let answer = request(&sock, method, path, body).await?;
        println!("{}", serde_json::to_string_pretty(&answer)?);
        Ok(())
    }
}

/// `/v1/disks/DISK/KIND`, after checking the disk name (so bad names are
/// refused before the daemon is bothered; it checks again).
pub fn collection(disk: &str, kind: &str) -> anyhow::Result<String> {
    ferry_store::validate_name("disk", disk)?;
    Ok(format!("/v1/disks/{}/{kind}s", segment(disk)))
}

/// `/v1/disks/DISK/KINDs/NAME`, after checking both names.
pub fn item(disk: &str, kind: &str, name: &str) -> anyhow::Result<String> {
    let base = collection(disk, kind)?;
    ferry_store::validate_name(kind, name)?;
    Ok(format!("{base}/{}", segment(name)))
}

/// Seconds since the epoch, for default snapshot and checkpoint names.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
