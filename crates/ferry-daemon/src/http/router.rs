//! The routes of the admin API (listed with their shapes in the README):
//! ```text
//! GET    /v1/health                                 any caller; 200 while alive
//! GET    /v1/ready                                  any caller; 200 or 503
//! GET    /v1/exports
//! GET    /v1/disks/{disk}/snapshots
//! POST   /v1/disks/{disk}/snapshots                {"name": N, "checkpoint": bool}
//! DELETE /v1/disks/{disk}/snapshots/{name}
//! POST   /v1/disks/{disk}/snapshots/{name}/revert
//! GET    /v1/disks/{disk}/checkpoints
//! POST   /v1/disks/{disk}/checkpoints              {"name": N}
//! DELETE /v1/disks/{disk}/checkpoints/{name}
//! GET    /v1/disks/{disk}/hydration
//! POST   /v1/disks/{disk}/mirror                   {"to": URI, "mode", "rate", "max_downtime_ms", "auto_active"}
//! GET    /v1/disks/{disk}/mirror
//! POST   /v1/disks/{disk}/mirror/set               {"mode", "rate"}
//! POST   /v1/disks/{disk}/mirror/complete          {"after": "read-only"|"stop"|"keep", "postcopy": bool}
//! DELETE /v1/disks/{disk}/mirror
//! POST   /v1/disks/{disk}/arrive                   {"source": URI, "absent": [[offset, length]...]} (admin)
//! ```
//! Answers are the `ferry_api` types as JSON; errors are
//! `{"error": "one line"}` with a 4xx/5xx status chosen here, from the
//! kind of [`ServiceError`].

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, middleware};
use ferry_api::{
    CheckpointCreated, CheckpointDeleted, CheckpointList, CompleteMirror, CreateCheckpoint,
    CreateSnapshot, ErrorBody, ExportList, HEALTH, Health, HydrationStatus, METRICS,
    MirrorCancelled, MirrorCompleted, MirrorStatus, READY, RELOAD, Ready, Reloaded, Reverted,
    SetMirror, SnapshotCreated, SnapshotDeleted, SnapshotList, StartMirror,
};
use serde::de::DeserializeOwned;

use super::auth::{Caller, Grants, authorize};
use crate::error::ServiceError;
use crate::service::Daemon;

static EMPTY: Bytes = Bytes::from_static(b"{}");

/// A failed request, as the API answers it.
struct ApiError(StatusCode, String);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let status = match &e {
            ServiceError::InvalidName(_) => StatusCode::BAD_REQUEST,
            ServiceError::NoSuchDisk(_) | ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
            ServiceError::ReadOnlyDisk(_) | ServiceError::Exists(_) | ServiceError::Busy(_) => {
                StatusCode::CONFLICT
            }
            ServiceError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ServiceError::Config(_) | ServiceError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

type Answer<T> = Result<Json<T>, ApiError>;
type Created<T> = Result<(StatusCode, Json<T>), ApiError>;

#[derive(Clone)]
struct App {
    daemon: Arc<Daemon>,
    grants: Arc<Grants>,
}

/// Runs blocking disk work (fsyncs, copies) off the async workers.
async fn blocking<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&Daemon) -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ApiError> {
    let daemon = app.daemon.clone();
    tokio::task::spawn_blocking(move || f(&daemon))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("admin task failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// Liveness: answering at all is the answer.
async fn health() -> Json<Health> {
    Json(Health { alive: true })
}

/// Readiness, for service managers and load balancers: 503 until the
/// listeners are up and again once shutdown begins.
async fn ready(State(app): State<App>) -> Answer<Ready> {
    match app.daemon.phase().not_ready_reason() {
        None => Ok(Json(Ready { ready: true })),
        Some(why) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}"),
        )),
    }
}

/// Re-reads the configuration file and certificates, as SIGHUP does.
async fn reload(State(app): State<App>) -> Answer<Reloaded> {
    Ok(Json(app.daemon.reload().await?))
}

/// Prometheus text exposition format, version 0.0.4.
async fn metrics(State(app): State<App>) -> Result<Response, ApiError> {
    let text = blocking(&app, |d| d.metrics()).await?;
    let kind = [(
        axum::http::header::CONTENT_TYPE,
        "text/plain; version=0.0.4; charset=utf-8",
    )];
    Ok((kind, text).into_response())
}

/// The exports the caller may see.
async fn exports(
    State(app): State<App>,
    ConnectInfo(caller): ConnectInfo<Caller>,
) -> Json<ExportList> {
    let mut list = app.daemon.exports();
    list.exports.retain(|e| {
        let disk = e.disk.as_deref().or(e.snapshot_of.as_deref());
        app.grants.sees(&caller, disk)
    });
    Json(list)
}

async fn list_snapshots(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
) -> Answer<SnapshotList> {
    Ok(Json(app.daemon.snapshots(&disk)?))
}

async fn create_snapshot(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
    req: Bytes,
) -> Created<SnapshotCreated> {
    let req: CreateSnapshot = body(&req)?;
    let done = blocking(&app, move |d| d.create_snapshot(&disk, &req)).await?;
    Ok((StatusCode::CREATED, Json(done)))
}

async fn delete_snapshot(
    State(app): State<App>,
    UrlPath((disk, name)): UrlPath<(String, String)>,
) -> Answer<SnapshotDeleted> {
    Ok(Json(
        blocking(&app, move |d| d.delete_snapshot(&disk, &name)).await?,
    ))
}

async fn revert(
    State(app): State<App>,
    UrlPath((disk, name)): UrlPath<(String, String)>,
) -> Answer<Reverted> {
    Ok(Json(blocking(&app, move |d| d.revert(&disk, &name)).await?))
}

async fn list_checkpoints(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
) -> Answer<CheckpointList> {
    Ok(Json(app.daemon.checkpoints(&disk)?))
}

async fn create_checkpoint(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
    req: Bytes,
) -> Created<CheckpointCreated> {
    let req: CreateCheckpoint = body(&req)?;
    let done = blocking(&app, move |d| d.create_checkpoint(&disk, &req)).await?;
    Ok((StatusCode::CREATED, Json(done)))
}

async fn delete_checkpoint(
    State(app): State<App>,
    UrlPath((disk, name)): UrlPath<(String, String)>,
) -> Answer<CheckpointDeleted> {
    Ok(Json(
        blocking(&app, move |d| d.delete_checkpoint(&disk, &name)).await?,
    ))
}

async fn hydration(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
) -> Answer<HydrationStatus> {
    Ok(Json(app.daemon.hydration(&disk)?))
}

async fn start_mirror(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
    req: Bytes,
) -> Created<MirrorStatus> {
    let req: StartMirror = body(&req)?;
    let status = app.daemon.start_mirror(&disk, &req).await?;
    Ok((StatusCode::CREATED, Json(status)))
}

async fn mirror_status(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
) -> Answer<MirrorStatus> {
    Ok(Json(app.daemon.mirror_status(&disk)?))
}

async fn set_mirror(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
    req: Bytes,
) -> Answer<MirrorStatus> {
    let req: SetMirror = body(&req)?;
    Ok(Json(
        blocking(&app, move |d| d.set_mirror(&disk, &req)).await?,
    ))
}

async fn complete_mirror(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
    req: Bytes,
) -> Answer<MirrorCompleted> {
    // An empty body takes every default.
    let req: CompleteMirror = body(if req.is_empty() { &EMPTY } else { &req })?;
    Ok(Json(app.daemon.complete_mirror(&disk, &req).await?))
}

async fn arrive(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
    req: Bytes,
) -> Answer<ferry_api::Arriving> {
    let req: ferry_api::Arrive = body(&req)?;
    let hydrate = ferry_jobs::HydrateOptions::default();
    Ok(Json(app.daemon.arrive(&disk, &req, &hydrate).await?))
}

async fn cancel_mirror(
    State(app): State<App>,
    UrlPath(disk): UrlPath<String>,
) -> Answer<MirrorCancelled> {
    Ok(Json(blocking(&app, move |d| d.cancel_mirror(&disk)).await?))
}

async fn fallback() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such API route".into())
}

/// The admin API; serve it with connect info of type [`Caller`].
pub fn router(daemon: Arc<Daemon>, grants: Arc<Grants>) -> Router {
    let app = App {
        daemon,
        grants: grants.clone(),
    };
    Router::new()
        .route(HEALTH, get(health))
        .route(READY, get(ready))
        .route(RELOAD, post(reload))
        .route(METRICS, get(metrics))
        .route("/v1/exports", get(exports))
        .route(
            "/v1/disks/{disk}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route("/v1/disks/{disk}/snapshots/{name}", delete(delete_snapshot))
        .route("/v1/disks/{disk}/snapshots/{name}/revert", post(revert))
        .route(
            "/v1/disks/{disk}/checkpoints",
            get(list_checkpoints).post(create_checkpoint),
        )
        .route(
            "/v1/disks/{disk}/checkpoints/{name}",
            delete(delete_checkpoint),
        )
        .route("/v1/disks/{disk}/hydration", get(hydration))
        .route(
            "/v1/disks/{disk}/mirror",
            get(mirror_status).post(start_mirror).delete(cancel_mirror),
        )
        .route("/v1/disks/{disk}/mirror/set", post(set_mirror))
        .route("/v1/disks/{disk}/mirror/complete", post(complete_mirror))
        .route("/v1/disks/{disk}/arrive", post(arrive))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(grants, authorize))
        .with_state(app)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// A caller over mutual TLS that has no grant on anything.
    fn stranger() -> Caller {
        Caller::Remote {
            addr: "127.0.0.1:1".parse().unwrap(),
            identities: vec!["monitor".into()],
        }
    }

    async fn call(app: &Router, caller: Caller, method: &str, path: &str) -> (StatusCode, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        req.extensions_mut().insert(ConnectInfo(caller));
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn probes_answer_any_caller_and_follow_the_phase() {
        let state = tempfile::tempdir().unwrap();
        let registry = Arc::new(nbd_server::Registry::new(1 << 25));
        let daemon = Arc::new(Daemon::new(registry, state.path()));
        let app = router(daemon.clone(), Arc::new(Grants::default()));

        for caller in [Caller::Local, stranger()] {
            let (status, body) = call(&app, caller, "GET", "/v1/health").await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, r#"{"alive":true}"#)
            );
        }
        let (status, body) = call(&app, stranger(), "GET", "/v1/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("not ready: starting"), "{body}");

        daemon.set_phase(crate::Phase::Ready);
        let (status, body) = call(&app, stranger(), "GET", "/v1/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, r#"{"ready":true}"#)
        );

        daemon.set_phase(crate::Phase::Stopping);
        let (status, body) = call(&app, Caller::Local, "GET", "/v1/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("shutting down"), "{body}");

        // The probes are free; nothing else is for an identity without a
        // grant.
        let (status, _) = call(&app, stranger(), "GET", "/v1/exports").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _) = call(&app, stranger(), "POST", "/v1/ready").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    /// Reload and metrics act on the whole daemon: a grant limited to
    /// some disks does not reach them.
    #[tokio::test]
    async fn daemon_wide_routes_need_a_grant_on_every_disk() {
        let state = tempfile::tempdir().unwrap();
        let registry = Arc::new(nbd_server::Registry::new(1 << 25));
        let daemon = Arc::new(Daemon::new(registry, state.path()));
        let grant = |client: &str, role, disks: Option<Vec<String>>| super::super::auth::Grant {
            client: client.into(),
            role,
            disks,
        };
        let grants = Grants(vec![
            grant("ops", ferry_api::Role::Operator, None),
            grant("ops-d", ferry_api::Role::Operator, Some(vec!["d".into()])),
        ]);
        let app = router(daemon.clone(), Arc::new(grants));
        let who = |id: &str| Caller::Remote {
            addr: "127.0.0.1:1".parse().unwrap(),
            identities: vec![id.into()],
        };
        for path in ["/v1/reload", "/metrics"] {
            let method = if path == "/metrics" { "GET" } else { "POST" };
            let (status, body) = call(&app, who("ops-d"), method, path).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
            // Allowed through; nothing here reloads or records.
            let (status, body) = call(&app, who("ops"), method, path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        }
        daemon.set_metrics(Box::new(|_| "# EOF\n".into()));
        let (status, body) = call(&app, Caller::Local, "GET", "/metrics").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "# EOF\n"));
    }
}
