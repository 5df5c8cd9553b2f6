//! The HTTP API of `ferry serve` (docs/API.md): JSON over HTTP/1.1, every
//! error `{"error": "..."}` with its status.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::manager::{is_backward, lag, Manager, TaskError, TaskReading};
use super::task::{TaskSpec, TaskState};
use crate::node::two_way::Pair;
use crate::precheck::Report;
use crate::secret::Secret;
use crate::status::NodeStatus;

/// Largest request body read.
pub const BODY_MAX: usize = 1 << 20;

#[derive(Clone)]
pub struct Api {
    pub manager: Arc<Manager>,
    /// Required as `Authorization: Bearer <token>` on every route but the
    /// dashboard's assets, when set.
    pub token: Option<Arc<Secret>>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

impl IntoResponse for TaskError {
    fn into_response(self) -> Response {
        let status = match &self {
            TaskError::Spec(_) => StatusCode::BAD_REQUEST,
            TaskError::NotFound(_) => StatusCode::NOT_FOUND,
            TaskError::Conflict(_) => StatusCode::CONFLICT,
            TaskError::Precheck(_) => StatusCode::UNPROCESSABLE_ENTITY,
            TaskError::Store(_) | TaskError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self.to_string())
    }
}

/// `{ "verdict", "table", "checks" }`.
fn precheck_json(report: &Report) -> Value {
    json!({
        "verdict": report.verdict().as_str(),
        "table": report.render(),
        "checks": report.to_json().get("checks").cloned().unwrap_or(Value::Null),
    })
}

/// The full-sync progress of a reading: summed over the source's
/// partitions; `applied` once every applier of the source's partitions
/// loaded it (`pair`: [`is_backward`]).
fn full_sync(status: &NodeStatus, pair: Option<Pair>) -> Value {
    let received: u64 = status
        .listeners
        .iter()
        .map(|l| l.full_sync_bytes_received)
        .sum();
    let started = status
        .listeners
        .iter()
        .any(|l| l.full_syncs > 0 || l.full_sync_bytes_received > 0);
    if !started {
        return Value::Null;
    }
    let total: Option<u64> = status
        .listeners
        .iter()
        .map(|l| l.full_sync_bytes_total)
        .sum();
    let applied = !status.drainers.is_empty()
        && status
            .drainers
            .iter()
            .filter(|d| !is_backward(pair, d.partition))
            .all(|d| d.epoch > 0 && d.snapshot_load.as_ref().map_or(true, |l| l.done));
    json!({ "bytes_received": received, "bytes_total": total, "applied": applied })
}

/// A task's view (docs/API.md, "View").
fn view(reading: &TaskReading) -> Value {
    let record = &reading.record;
    let (lag_entries, latency_ms, full) = match &reading.status {
        Some(status) => {
            let (lag, latency) = lag(status);
            (json!(lag), json!(latency), full_sync(status, reading.pair))
        }
        None => (Value::Null, Value::Null, Value::Null),
    };
    json!({
        "id": record.name,
        "name": record.name,
        "source": record.source,
        "target": record.target,
        "mode": record.mode,
        "options": record.options,
        "state": record.state,
        "error": record.error,
        "created_unix_ms": record.created_unix_ms,
        "updated_unix_ms": record.updated_unix_ms,
        "lag_entries": lag_entries,
        "latency_ms": latency_ms,
        "full_sync": full,
    })
}

/// Which way a partition replicates: the source into the target, or (a
/// two-way task's backward direction) the target into the source.
fn direction(pair: Option<Pair>, partition: u32) -> &'static str {
    match is_backward(pair, partition) {
        true => "target-to-source",
        false => "source-to-target",
    }
}

/// A task's view with its partitions, lag history, precheck and status.
fn detail(reading: &TaskReading) -> Value {
    let mut value = view(reading);
    let mut partitions = Vec::new();
    if let Some(status) = &reading.status {
        for l in &status.listeners {
            partitions.push(json!({
                "part_id": l.partition,
                "side": "listener",
                "direction": direction(reading.pair, l.partition),
                "sync_status": l.source_state,
                "log_id_lag": Value::Null,
                "time_latency_ms": l.heartbeat_latency_ms,
                "source": l.source,
                "error": l.source_error,
                "full_sync_bytes_received": l.full_sync_bytes_received,
                "full_sync_bytes_total": l.full_sync_bytes_total,
                "last_log_id": l.last_log_id,
            }));
        }
        for d in &status.drainers {
            let loading = d.snapshot_load.as_ref().is_some_and(|l| !l.done);
            partitions.push(json!({
                "part_id": d.partition,
                "side": "drainer",
                "direction": direction(reading.pair, d.partition),
                "sync_status": if loading && d.state == "ONLINE" { "LOADING" } else { d.state.as_str() },
                "log_id_lag": d.lag,
                "time_latency_ms": d.latency_ms,
                "target": d.target,
                "error": d.last_error,
                "applied_log_id": d.applied,
                "snapshot_load": d.snapshot_load,
            }));
        }
    }
    if let Value::Object(map) = &mut value {
        map.insert("partitions".into(), Value::Array(partitions));
        map.insert("lag_history".into(), json!(reading.history));
        map.insert("precheck".into(), json!(reading.record.precheck));
        let conflicts = reading.status.as_ref().and_then(|s| s.two_way.as_ref());
        map.insert("conflicts".into(), json!(conflicts.map(|t| t.conflicts)));
        map.insert("status".into(), json!(reading.status));
    }
    value
}

/// Reads a JSON body of at most [`BODY_MAX`] bytes.
async fn body_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, Response> {
    let bytes: Bytes = axum::body::to_bytes(body, BODY_MAX).await.map_err(|_| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {BODY_MAX} bytes"),
        )
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("request body: {e}")))
}

async fn list(State(api): State<Api>) -> Response {
    let tasks: Vec<Value> = api.manager.list().await.iter().map(view).collect();
    axum::Json(json!({ "tasks": tasks })).into_response()
}

async fn show(State(api): State<Api>, UrlPath(id): UrlPath<String>) -> Response {
    match api.manager.get(&id).await {
        Ok(reading) => axum::Json(detail(&reading)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn precheck(State(api): State<Api>, body: Body) -> Response {
    let spec: TaskSpec = match body_json(body).await {
        Ok(spec) => spec,
        Err(response) => return response,
    };
    match api.manager.precheck(&spec).await {
        Ok(report) => axum::Json(precheck_json(&report)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn create(State(api): State<Api>, body: Body) -> Response {
    let spec: TaskSpec = match body_json(body).await {
        Ok(spec) => spec,
        Err(response) => return response,
    };
    match api.manager.create(spec).await {
        Ok((reading, report)) => {
            let precheck = report.as_ref().map(precheck_json).unwrap_or(Value::Null);
            match reading.record.state {
                TaskState::Failed => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    axum::Json(json!({
                        "error": reading.record.error.clone().unwrap_or_default(),
                        "task": view(&reading),
                        "precheck": precheck,
                    })),
                )
                    .into_response(),
                _ => (
                    StatusCode::CREATED,
                    axum::Json(json!({ "task": view(&reading), "precheck": precheck })),
                )
                    .into_response(),
            }
        }
        Err(e) => e.into_response(),
    }
}

async fn stop(State(api): State<Api>, UrlPath(id): UrlPath<String>) -> Response {
    match api.manager.stop(&id).await {
        Ok(reading) => axum::Json(view(&reading)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn start(State(api): State<Api>, UrlPath(id): UrlPath<String>) -> Response {
    match api.manager.start(&id).await {
        Ok(reading) => axum::Json(view(&reading)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `?force=true` of a cancel.
#[derive(Debug, Default, serde::Deserialize)]
struct CancelQuery {
    #[serde(default)]
    force: bool,
}

async fn cancel(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    query: Option<axum::extract::Query<CancelQuery>>,
) -> Response {
    let force = query.is_some_and(|q| q.force);
    match api.manager.cancel(&id, force).await {
        Ok((reading, left)) => {
            axum::Json(json!({ "task": view(&reading), "keys_left": left })).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Every task's state, then the metrics of every running task's stages
/// (`crate::metrics`), each sample labelled `task`.
async fn metrics(State(api): State<Api>) -> Response {
    let readings = api.manager.list().await;
    let mut out = String::new();
    out.push_str("# HELP ferry_task_state A task's state: 1 for the one it is in.\n");
    out.push_str("# TYPE ferry_task_state gauge\n");
    for reading in &readings {
        for state in TaskState::ALL {
            let value = u8::from(reading.record.state == state);
            out.push_str(&format!(
                "ferry_task_state{{task=\"{}\",state=\"{}\"}} {value}\n",
                reading.record.name,
                state.as_str()
            ));
        }
    }
    let sets: Vec<(Vec<(&str, String)>, &NodeStatus)> = readings
        .iter()
        .filter_map(|r| {
            let status = r.status.as_ref()?;
            Some((vec![("task", r.record.name.clone())], status))
        })
        .collect();
    crate::metrics::render(&mut out, &sets);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], out).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

/// Refuses a request without the token (401, and nothing else).
async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    let Some(token) = &api.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|given| token.matches(given));
    match ok {
        true => next.run(request).await,
        false => {
            let mut response = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// The API's routes (the dashboard's and `/metrics` are added by
/// [`super::router`]).
pub fn api_routes(api: Api) -> Router {
    Router::new()
        .route("/api/v1/tasks", get(list).post(create))
        .route("/api/v1/precheck", post(precheck))
        .route("/api/v1/tasks/:id", get(show).delete(cancel))
        .route("/api/v1/tasks/:id/stop", post(stop))
        .route("/api/v1/tasks/:id/start", post(start))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(api.clone(), authorize))
        .with_state(api)
}
