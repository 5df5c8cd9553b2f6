//! [`AdminService`]: the server end of the `Admin` gRPC service, answering
//! from a [`NodeControl`], and the plain HTTP routes served on the same port
//! ([`admin_routes`]: `GET /metrics`), behind the bearer token when there
//! is one ([`authorize`]); plain or over TLS ([`serve_admin`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request as HttpRequest;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response as HttpResponse};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::{AdminAccess, AdminError, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES};
use crate::record::pb;
use crate::record::pb::admin_server::{Admin, AdminServer};
use crate::secret::Secret;
use crate::status::{ControlError, NodeControl, SkipRequest, SyncSelector};
use crate::tls::TlsConnection;

/// How long a graceful shutdown waits for open admin connections before
/// dropping them: admin calls are short, a client that holds a connection
/// longer must not hold the process's exit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Longest time the server spends on one call: a switchover's longest
/// pause and the time to stop and start the stages around it.
const SERVER_REQUEST_TIMEOUT: Duration =
    Duration::from_secs(super::SWITCHOVER_MAX_TIMEOUT.as_secs() + 120);

/// The admin service of one process.
#[derive(Clone)]
pub struct AdminService {
    node: Arc<dyn NodeControl>,
}

impl AdminService {
    pub fn new(node: Arc<dyn NodeControl>) -> AdminService {
        AdminService { node }
    }

    /// The tonic service with the admin API's message size limits.
    pub fn into_server(self) -> AdminServer<AdminService> {
        AdminServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Runs a control request on a blocking thread (a node may persist the
    /// stopped state before answering).
    async fn control(
        &self,
        request: pb::SyncControlRequest,
        verb: &'static str,
        apply: fn(&dyn NodeControl, &SyncSelector) -> Result<usize, ControlError>,
    ) -> Result<Response<pb::SyncControlReply>, Status> {
        let selector: SyncSelector = request.selector.map(Into::into).unwrap_or_default();
        let node = Arc::clone(&self.node);
        let which = selector.clone();
        let changed = tokio::task::spawn_blocking(move || apply(node.as_ref(), &which))
            .await
            .map_err(|error| Status::internal(format!("{verb} panicked: {error}")))?
            .map_err(control_error_status)?;
        info!(
            partition = ?selector.partition,
            drainer = ?selector.drainer_id,
            changed,
            "{verb}"
        );
        Ok(Response::new(pb::SyncControlReply {
            changed: u32::try_from(changed).unwrap_or(u32::MAX),
        }))
    }
}

/// The one place a [`ControlError`] becomes a gRPC status.
pub fn control_error_status(error: ControlError) -> Status {
    let message = error.to_string();
    match error {
        ControlError::NoListener(_) | ControlError::NoDrainer | ControlError::Refused(_) => {
            Status::failed_precondition(message)
        }
        ControlError::NoMatch { .. } | ControlError::NoApplier { .. } => Status::not_found(message),
        ControlError::Failed(_) => Status::internal(message),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let node = Arc::clone(&self.node);
        // `status()` may do point reads of the WAL.
        let status = tokio::task::spawn_blocking(move || node.status())
            .await
            .map_err(|error| Status::internal(format!("status panicked: {error}")))?;
        Ok(Response::new(pb::StatusReply {
            status: Some(status.into()),
        }))
    }

    async fn stop_sync(
        &self,
        request: Request<pb::SyncControlRequest>,
    ) -> Result<Response<pb::SyncControlReply>, Status> {
        self.control(request.into_inner(), "stop-sync", |node, which| {
            node.stop_sync(which)
        })
        .await
    }

    async fn restart_sync(
        &self,
        request: Request<pb::SyncControlRequest>,
    ) -> Result<Response<pb::SyncControlReply>, Status> {
        self.control(request.into_inner(), "restart-sync", |node, which| {
            node.restart_sync(which)
        })
        .await
    }

    async fn skip(
        &self,
        request: Request<pb::SkipRequest>,
    ) -> Result<Response<pb::SkipReply>, Status> {
        let request: SkipRequest = request.into_inner().into();
        let node = Arc::clone(&self.node);
        let asked = request.clone();
        // The node waits a little for the applier to have skipped it.
        let outcome = tokio::task::spawn_blocking(move || node.skip(&asked))
            .await
            .map_err(|error| Status::internal(format!("skip panicked: {error}")))?
            .map_err(control_error_status)?;
        info!(
            partition = request.partition,
            log_id = request.log_id,
            drainer = ?request.drainer_id,
            done = outcome.done,
            file = %outcome.dead_letter_file,
            "skip"
        );
        Ok(Response::new(outcome.into()))
    }

    async fn switchover(
        &self,
        request: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::SwitchoverReply>, Status> {
        let asked = request.into_inner().timeout_ms;
        let timeout = if asked == 0 {
            super::SWITCHOVER_DEFAULT_TIMEOUT
        } else {
            Duration::from_millis(asked)
        };
        if timeout > super::SWITCHOVER_MAX_TIMEOUT {
            return Err(Status::invalid_argument(format!(
                "a switchover timeout is at most {}s",
                super::SWITCHOVER_MAX_TIMEOUT.as_secs()
            )));
        }
        info!(timeout_ms = timeout.as_millis() as u64, "switchover asked");
        // The node runs the switchover on its own task: a caller that goes
        // away does not leave it half-done.
        let report = self
            .node
            .switchover(timeout)
            .await
            .map_err(control_error_status)?;
        Ok(Response::new(report.into()))
    }
}

/// Serves the admin API of `node` on `listener` until `shutdown` fires,
/// with `access`'s token and TLS.
///
/// The caller binds the listener (so it can write the address file with
/// [`write_addr_file`](super::write_addr_file) once it knows the port).
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    node: Arc<dyn NodeControl>,
    access: AdminAccess,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let local: Option<SocketAddr> = listener.local_addr().ok();
    let tls = access.tls_config().map_err(AdminError::Serve)?;
    // HTTP/1.1 too, for `GET /metrics` (gRPC stays on HTTP/2).
    let router = tonic::transport::Server::builder()
        .timeout(SERVER_REQUEST_TIMEOUT)
        .accept_http1(true)
        .add_routes(admin_routes(node, access.token));
    debug!(addr = ?local, tls = tls.is_some(), "admin API serving");
    let stopped = shutdown.clone().cancelled_owned();
    let accepting = shutdown.clone();
    let server = async move {
        match tls {
            Some(tls) => {
                let incoming = crate::tls::accept(listener, tls, accepting)
                    .map(Ok::<TlsConnection, std::io::Error>);
                router.serve_with_incoming_shutdown(incoming, stopped).await
            }
            None => {
                let incoming =
                    tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
                        .map_err(|error| AdminError::Serve(format!("listening socket: {error}")))?;
                router.serve_with_incoming_shutdown(incoming, stopped).await
            }
        }
        .map_err(|error| {
            AdminError::Serve(format!("serving: {}", crate::errors::error_chain(&error)))
        })
    };
    tokio::pin!(server);
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = &mut server => served,
        // Dropping the server closes the connections still open.
        _ = grace_over => Ok(()),
    }
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = SocketAddr;

    fn connect_info(&self) -> SocketAddr {
        self.peer()
    }
}

/// Everything the admin port answers: the `Admin` gRPC service, `GET
/// /metrics` (Prometheus text format, [`crate::metrics`]) and, for any
/// other path, `404 Not Found` (a gRPC request of an unknown method gets
/// gRPC's `UNIMPLEMENTED` instead); with a `token`, all of it behind
/// [`authorize`].
pub fn admin_routes(node: Arc<dyn NodeControl>, token: Option<Secret>) -> Routes {
    let grpc = Routes::new(AdminService::new(Arc::clone(&node)).into_server());
    let mut router = grpc
        .into_axum_router()
        .route(
            "/metrics",
            axum::routing::get(move || metrics_reply(Arc::clone(&node))),
        )
        .fallback(not_found);
    if let Some(token) = token {
        let token = Arc::new(token);
        router = router.layer(axum::middleware::from_fn(
            move |request: HttpRequest, next: Next| {
                let token = Arc::clone(&token);
                async move { authorize(&token, request, next).await }
            },
        ));
    }
    Routes::from(router)
}

/// Lets a request through when it carries `authorization: Bearer <token>`;
/// otherwise answers gRPC's `UNAUTHENTICATED` (a gRPC request) or `401`,
/// and nothing else.
async fn authorize(token: &Secret, request: HttpRequest, next: Next) -> HttpResponse {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if given.is_some_and(|given| token.matches(given)) {
        return next.run(request).await;
    }
    if is_grpc(request.headers()) {
        // A trailers-only reply, as tonic gives a `Status`.
        return (
            StatusCode::OK,
            [
                ("grpc-status", HeaderValue::from_static("16")),
                (
                    "grpc-message",
                    HeaderValue::from_static("a bearer token is required"),
                ),
                (
                    header::CONTENT_TYPE.as_str(),
                    HeaderValue::from_static("application/grpc"),
                ),
            ],
        )
            .into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
        "a bearer token is required\n",
    )
        .into_response()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

async fn metrics_reply(node: Arc<dyn NodeControl>) -> HttpResponse {
    // `status()` may do point reads of the WAL.
    let status = match tokio::task::spawn_blocking(move || node.status()).await {
        Ok(status) => status,
        Err(error) => {
            let body = format!("status panicked: {error}\n");
            return (StatusCode::INTERNAL_SERVER_ERROR, body).into_response();
        }
    };
    let body = crate::metrics::render_node(&status);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        body,
    )
        .into_response()
}

async fn not_found(headers: HeaderMap) -> HttpResponse {
    if is_grpc(&headers) {
        // What tonic answers for a method no service has.
        return (
            StatusCode::OK,
            [
                ("grpc-status", HeaderValue::from_static("12")),
                (
                    header::CONTENT_TYPE.as_str(),
                    HeaderValue::from_static("application/grpc"),
                ),
            ],
        )
            .into_response();
    }
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}
