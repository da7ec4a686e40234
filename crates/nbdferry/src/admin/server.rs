//! The admin API server: axum on a Unix socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::disks::{ApiError, ApiResult, Disks, snapshot_export};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

type Shared = State<Arc<Disks>>;

/// Runs blocking volume work (fsyncs, copies) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError {
        status: 500,
        message: format!("admin task failed: {e}"),
    })?
}

fn body<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| ApiError {
        status: 400,
        message: format!("bad request body: {e}"),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSnapshot {
    name: String,
    #[serde(default)]
    checkpoint: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCheckpoint {
    name: String,
}

async fn exports(State(d): Shared) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(json!({ "exports": d.exports() })))
}

async fn list_snapshots(
    State(d): Shared,
    UrlPath(disk): UrlPath<String>,
) -> ApiResult<axum::Json<Value>> {
    let list = d.snapshots(&disk)?;
    let list: Vec<Value> = list
        .into_iter()
        .map(|s| {
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["export"] = snapshot_export(&disk, &s.name).into();
            v
        })
        .collect();
    Ok(axum::Json(json!({ "disk": disk, "snapshots": list })))
}

async fn create_snapshot(
    State(d): Shared,
    UrlPath(disk): UrlPath<String>,
    req: Bytes,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let req: CreateSnapshot = body(&req)?;
    let disk2 = disk.clone();
    let info = blocking(move || d.create_snapshot(&disk2, &req.name, req.checkpoint)).await?;
    let export = snapshot_export(&disk, &info.name);
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "disk": disk, "snapshot": info, "export": export })),
    ))
}

async fn delete_snapshot(
    State(d): Shared,
    UrlPath((disk, name)): UrlPath<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let disk2 = disk.clone();
    let info = blocking(move || d.delete_snapshot(&disk2, &name)).await?;
    Ok(axum::Json(json!({ "disk": disk, "deleted": info })))
}

async fn revert(
    State(d): Shared,
    UrlPath((disk, name)): UrlPath<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let disk2 = disk.clone();
    let info = blocking(move || d.revert(&disk2, &name)).await?;
    Ok(axum::Json(json!({ "disk": disk, "reverted": info })))
}

async fn list_checkpoints(
    State(d): Shared,
    UrlPath(disk): UrlPath<String>,
) -> ApiResult<axum::Json<Value>> {
    let list = d.checkpoints(&disk)?;
    Ok(axum::Json(json!({ "disk": disk, "checkpoints": list })))
}

async fn create_checkpoint(
    State(d): Shared,
    UrlPath(disk): UrlPath<String>,
    req: Bytes,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let req: CreateCheckpoint = body(&req)?;
    let disk2 = disk.clone();
    let info = blocking(move || d.create_checkpoint(&disk2, &req.name)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "disk": disk, "checkpoint": info })),
    ))
}

async fn delete_checkpoint(
    State(d): Shared,
    UrlPath((disk, name)): UrlPath<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let (disk2, name2) = (disk.clone(), name.clone());
    blocking(move || d.delete_checkpoint(&disk2, &name2)).await?;
    Ok(axum::Json(json!({ "disk": disk, "deleted": name })))
}

async fn fallback() -> ApiError {
    ApiError {
        status: 404,
        message: "no such API route".into(),
    }
}

pub fn router(disks: Arc<Disks>) -> Router {
    Router::new()
        .route("/v1/exports", get(exports))
        .route(
            "/v1/disks/{disk}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/disks/{disk}/snapshots/{name}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/v1/disks/{disk}/snapshots/{name}/revert", post(revert))
        .route(
            "/v1/disks/{disk}/checkpoints",
            get(list_checkpoints).post(create_checkpoint),
        )
        .route(
            "/v1/disks/{disk}/checkpoints/{name}",
            axum::routing::delete(delete_checkpoint),
        )
        .fallback(fallback)
        .with_state(disks)
}

/// A bound admin socket; the file is removed when it is dropped.
pub struct AdminSocket {
    listener: tokio::net::UnixListener,
    path: RemoveOnDrop,
}

/// Removes the socket file on drop, unless another daemon has replaced it
/// since (same path, different inode).
struct RemoveOnDrop(PathBuf, Option<(u64, u64)>);

fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.1.is_some() && identity(&self.0) == self.1 {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Binds `path` (mode 0600). A socket file left by a dead daemon is
/// replaced; one a live daemon answers on is an error.
pub fn bind(path: &Path) -> anyhow::Result<AdminSocket> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "admin socket {} is in use by another daemon",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(AdminSocket {
        listener,
        path: RemoveOnDrop(path.to_path_buf(), identity(path)),
    })
}

pub async fn run(sock: AdminSocket, disks: Arc<Disks>, shutdown: CancellationToken) {
    let AdminSocket { listener, path } = sock;
    tracing::info!(socket = %path.0.display(), "admin API listening");
    let served = axum::serve(listener, router(disks))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!("admin API stopped: {e}");
    }
    drop(path);
}
