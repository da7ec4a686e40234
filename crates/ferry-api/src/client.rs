//! The client side of the admin API: one HTTP/1 request per call, over the
//! daemon's Unix socket or over TCP with mutual TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::routes::{path_segment, validate_name};
use crate::types::*;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the nbdferry daemon at {endpoint} (is `nbdferry serve` running? see --admin): {source}"
    )]
    Unreachable {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Usage(String),
    #[error("admin API {0}")]
    Http(String),
    /// The daemon refused: its one-line message.
    #[error("{message}")]
    Api { status: u16, message: String },
}

/// Where a daemon's admin API is.
#[derive(Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `https://HOST:PORT`, with the client's TLS configuration.
    Https {
        host: String,
        port: u16,
        tls: Arc<nbd_tls::ClientConfig>,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Https { host, port, .. } => write!(f, "https://{host}:{port}"),
        }
    }
}

impl Endpoint {
    /// `--admin`: a socket path, or `https://HOST:PORT` with the
    /// credentials in `tls_creds` (ca-cert.pem, client-cert.pem,
    /// client-key.pem, the directory `nbdferry certs` writes).
    pub fn parse(admin: &str, tls_creds: Option<&Path>) -> Result<Endpoint, ClientError> {
        let Some(rest) = admin.strip_prefix("https://") else {
            if admin.contains("://") {
                return Err(ClientError::Usage(format!(
                    "--admin {admin}: use a socket path or https://HOST:PORT"
                )));
            }
            return Ok(Endpoint::Unix(PathBuf::from(admin)));
        };
        let hostport = rest.trim_end_matches('/');
        let (host, port) = hostport
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| {
                ClientError::Usage(format!("--admin {admin}: want https://HOST:PORT"))
            })?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let dir = tls_creds.ok_or_else(|| {
            ClientError::Usage(format!(
                "--admin {admin} needs --tls-creds DIR (ca-cert.pem, client-cert.pem, client-key.pem)"
            ))
        })?;
        let tls = nbd_tls::client_config(&nbd_tls::ClientCreds::from_dir(dir), true)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Endpoint::Https {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

/// A client of one daemon.
#[derive(Clone)]
pub struct AdminClient {
    endpoint: Endpoint,
}

/// `/v1/disks/DISK/KINDs`, after checking the disk name (so bad names are
/// refused before the daemon is bothered; it checks again).
fn collection(disk: &str, kind: &str) -> Result<String, ClientError> {
    validate_name("disk", disk).map_err(ClientError::Usage)?;
    Ok(format!("/v1/disks/{}/{kind}s", path_segment(disk)))
}

/// `/v1/disks/DISK/KINDs/NAME`, after checking both names.
fn item(disk: &str, kind: &str, name: &str) -> Result<String, ClientError> {
    let base = collection(disk, kind)?;
    validate_name(kind, name).map_err(ClientError::Usage)?;
    Ok(format!("{base}/{}", path_segment(name)))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

impl AdminClient {
    pub fn new(endpoint: Endpoint) -> Self {
        AdminClient { endpoint }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            endpoint: self.endpoint.to_string(),
            source,
        };
        match &self.endpoint {
            Endpoint::Unix(p) => Ok(Box::new(
                tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(unreachable)?,
            )),
            Endpoint::Https { host, port, tls } => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(unreachable)?;
                let name = nbd_tls::ServerName::try_from(host.clone()).map_err(|_| {
                    ClientError::Tls(format!("'{host}' is not a valid TLS server name"))
                })?;
                let tls = nbd_tls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        ClientError::Tls(nbd_tls::describe_handshake_error(
                            &e,
                            nbd_tls::Side::Client,
                        ))
                    })?;
                Ok(Box::new(tls))
            }
        }
    }

    /// Sends one request and decodes the JSON answer; an error answer
    /// becomes [`ClientError::Api`] with the daemon's one-line message.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| ClientError::Http(format!("handshake failed: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("admin connection: {e}");
            }
        });
        let data = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Http(e.to_string()))?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.host())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(data)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.request_failed(&e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(format!("answer cut short: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("admin API answered {status}"));
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Http(format!("answered {status} with unexpected data: {e}")))
    }

    /// Over TLS 1.3 the daemon judges our certificate after our side of
    /// the handshake is done: a refusal shows up as the first request
    /// failing, not as a handshake error.
    fn request_failed(&self, e: &hyper::Error) -> ClientError {
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(s) = src {
            detail = s.to_string();
            src = s.source();
        }
        match &self.endpoint {
            Endpoint::Https { .. } => ClientError::Tls(format!(
                "the daemon at {} ended the TLS session ({detail}): it probably refused our \
                 client certificate (client-cert.pem in --tls-creds, signed by its CA?)",
                self.endpoint
            )),
            Endpoint::Unix(_) => ClientError::Http(format!("request failed: {detail}")),
        }
    }

    fn host(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(_) => "localhost".into(),
            Endpoint::Https { host, port, .. } => format!("{host}:{port}"),
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// Liveness; an error when the daemon does not answer.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get(crate::HEALTH).await
    }

    /// Readiness; [`ClientError::Api`] (503) with the reason when the
    /// daemon is starting or shutting down.
    pub async fn ready(&self) -> Result<Ready, ClientError> {
        self.get(crate::READY).await
    }

    /// Asks the daemon to re-read its configuration and certificates;
    /// [`ClientError::Api`] (422) with the reason when it refused them.
    pub async fn reload(&self) -> Result<Reloaded, ClientError> {
        self.call(Method::POST, crate::RELOAD, None::<&()>).await
    }

    pub async fn exports(&self) -> Result<ExportList, ClientError> {
        self.get("/v1/exports").await
    }

    pub async fn snapshots(&self, disk: &str) -> Result<SnapshotList, ClientError> {
        self.get(&collection(disk, "snapshot")?).await
    }

    pub async fn create_snapshot(
        &self,
        disk: &str,
        req: &CreateSnapshot,
    ) -> Result<SnapshotCreated, ClientError> {
        let path = collection(disk, "snapshot")?;
        validate_name("snapshot", &req.name).map_err(ClientError::Usage)?;
        self.call(Method::POST, &path, Some(req)).await
    }

    pub async fn delete_snapshot(
        &self,
        disk: &str,
        name: &str,
    ) -> Result<SnapshotDeleted, ClientError> {
        let path = item(disk, "snapshot", name)?;
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn revert(&self, disk: &str, name: &str) -> Result<Reverted, ClientError> {
        let path = format!("{}/revert", item(disk, "snapshot", name)?);
        self.call(Method::POST, &path, None::<&()>).await
    }

    pub async fn hydration(&self, disk: &str) -> Result<HydrationStatus, ClientError> {
        validate_name("disk", disk).map_err(ClientError::Usage)?;
        self.get(&format!("/v1/disks/{}/hydration", path_segment(disk)))
            .await
    }

    fn mirror_path(disk: &str, tail: &str) -> Result<String, ClientError> {
        validate_name("disk", disk).map_err(ClientError::Usage)?;
        Ok(format!("/v1/disks/{}/mirror{tail}", path_segment(disk)))
    }

    pub async fn start_mirror(
        &self,
        disk: &str,
        req: &StartMirror,
    ) -> Result<MirrorStatus, ClientError> {
        self.call(Method::POST, &Self::mirror_path(disk, "")?, Some(req))
            .await
    }

    pub async fn mirror(&self, disk: &str) -> Result<MirrorStatus, ClientError> {
        self.get(&Self::mirror_path(disk, "")?).await
    }

    pub async fn set_mirror(
        &self,
        disk: &str,
        req: &SetMirror,
    ) -> Result<MirrorStatus, ClientError> {
        self.call(Method::POST, &Self::mirror_path(disk, "/set")?, Some(req))
            .await
    }

    pub async fn complete_mirror(
        &self,
        disk: &str,
        req: &CompleteMirror,
    ) -> Result<MirrorCompleted, ClientError> {
        self.call(
            Method::POST,
            &Self::mirror_path(disk, "/complete")?,
            Some(req),
        )
        .await
    }

    /// Makes `disk` a post-copy disk arriving from `req.source` (the end
    /// of a hybrid migration, on the destination's daemon).
    pub async fn arrive(&self, disk: &str, req: &Arrive) -> Result<Arriving, ClientError> {
        validate_name("disk", disk).map_err(ClientError::Usage)?;
        let path = format!("/v1/disks/{}/arrive", path_segment(disk));
        self.call(Method::POST, &path, Some(req)).await
    }

    pub async fn cancel_mirror(&self, disk: &str) -> Result<MirrorCancelled, ClientError> {
        self.call(Method::DELETE, &Self::mirror_path(disk, "")?, None::<&()>)
            .await
    }

    pub async fn checkpoints(&self, disk: &str) -> Result<CheckpointList, ClientError> {
        self.get(&collection(disk, "checkpoint")?).await
    }

    pub async fn create_checkpoint(
        &self,
        disk: &str,
        req: &CreateCheckpoint,
    ) -> Result<CheckpointCreated, ClientError> {
        let path = collection(disk, "checkpoint")?;
        validate_name("checkpoint", &req.name).map_err(ClientError::Usage)?;
        self.call(Method::POST, &path, Some(req)).await
    }

    pub async fn delete_checkpoint(
        &self,
        disk: &str,
        name: &str,
    ) -> Result<CheckpointDeleted, ClientError> {
        let path = item(disk, "checkpoint", name)?;
        self.call(Method::DELETE, &path, None::<&()>).await
    }
}
