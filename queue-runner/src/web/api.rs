//! The build API as JSON: each handler authenticates the caller, calls the same use case of
//! [`crate::builds`] as the gRPC service, and answers with the same message, in the protobuf
//! JSON mapping (`docs/web.md`). Watch and `FollowLog` answer with server-sent events.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::IntoResponse;
use drover_proto::v1::{
    GetLogResponse, GetResponse, ListResponse, RestartResponse, StageDerivationsRequest,
    StageDerivationsResponse, SubmitJobSetRequest, SubmitJobSetResponse, SubmitRequest,
    SubmitResponse,
};
use serde::Deserialize;
use tonic::Status;

use super::auth::{BUILD_API as CALLERS, Caller, Reader};
use super::errors::{ApiError, JsonBody};
use super::{WebState, events, query};
use crate::builds::view;
use crate::grpc::shutdown::{Outbound, cut_when, until_shutdown};
use crate::grpc::{follow_log, list_filter, watch};

/// A step's derivation, named in the query.
#[derive(Debug, Deserialize)]
pub struct Step {
    drv_path: String,
}

/// A restart's options, in the query.
#[derive(Debug, Default, Deserialize)]
pub struct RestartOptions {
    #[serde(default)]
    dependents: bool,
}

/// `POST /api/v1/builds`: Submit.
pub async fn submit(
    State(state): State<WebState>,
    caller: Caller,
    JsonBody(request): JsonBody<SubmitRequest>,
) -> Result<Json<SubmitResponse>, ApiError> {
    let caller = caller.require(CALLERS, &state)?;
    let (build_id, existing) = state
        .builds
        .submit(request, &caller.identity)
        .await
        .map_err(Status::from)?;
    Ok(Json(SubmitResponse { build_id, existing }))
}

/// `GET /api/v1/builds/{id}`: Get.
pub async fn get(
    State(state): State<WebState>,
    _: Reader,
    Path(id): Path<i64>,
) -> Result<Json<GetResponse>, ApiError> {
    Ok(Json(state.builds.get(id).await.map_err(Status::from)?))
}

/// `GET /api/v1/builds`: List, filtered by the query ([`query::list_request`]).
pub async fn list(
    State(state): State<WebState>,
    _: Reader,
    RawQuery(raw): RawQuery,
) -> Result<Json<ListResponse>, ApiError> {
    let request = query::list_request(raw.as_deref())?;
    let filter = list_filter::filter(&request).map_err(Status::from)?;
    Ok(Json(
        state.builds.list(&filter).await.map_err(Status::from)?,
    ))
}

/// `POST /api/v1/builds/{id}/cancel`: Cancel.
pub async fn cancel(
    State(state): State<WebState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<impl IntoResponse, ApiError> {
    let caller = caller.require(CALLERS, &state)?;
    let ended = state
        .builds
        .cancel(&caller.identity, id)
        .await
        .map_err(Status::from)?;
    Ok(Json(view::cancel_response(ended)))
}

/// `POST /api/v1/builds/{id}/restart[?dependents=true]`: Restart.
pub async fn restart(
    State(state): State<WebState>,
    caller: Caller,
    Path(id): Path<i64>,
    axum::extract::Query(options): axum::extract::Query<RestartOptions>,
) -> Result<Json<RestartResponse>, ApiError> {
    let caller = caller.require(CALLERS, &state)?;
    let dependents = state
        .builds
        .restart(&caller.identity, id, options.dependents)
        .await
        .map_err(Status::from)?;
    Ok(Json(RestartResponse { dependents }))
}

/// `GET /api/v1/builds/{id}/events`: Watch, as server-sent events.
pub async fn watch(
    State(state): State<WebState>,
    reader: Reader,
    Path(id): Path<i64>,
) -> Result<impl IntoResponse, ApiError> {
    let sources = watch::Sources::of(&state.builds);
    let stream = watch::open(id, &state.changes, sources, state.heartbeat).await?;
    Ok(events::watch(until_revoked(stream, &reader, &state)))
}

/// `GET /api/v1/logs?drv_path=…`: `GetLog`.
pub async fn log(
    State(state): State<WebState>,
    _: Reader,
    axum::extract::Query(step): axum::extract::Query<Step>,
) -> Result<Json<GetLogResponse>, ApiError> {
    let log = state
        .builds
        .log(&step.drv_path)
        .await
        .map_err(Status::from)?;
    Ok(Json(view::log_response(log)))
}

/// `GET /api/v1/logs/events?drv_path=…`: `FollowLog`, as server-sent events.
pub async fn follow_log(
    State(state): State<WebState>,
    reader: Reader,
    axum::extract::Query(step): axum::extract::Query<Step>,
) -> Result<impl IntoResponse, ApiError> {
    let stream = follow_log::open(
        state.builds.pool().clone(),
        state.builds.logs().clone(),
        step.drv_path,
        state.heartbeat,
    )
    .await?;
    Ok(events::log(until_revoked(stream, &reader, &state)))
}

/// `stream`, ended at shutdown, and once the reader's credential is revoked.
fn until_revoked<T: Send + 'static>(
    stream: Outbound<T>,
    reader: &Reader,
    state: &WebState,
) -> Outbound<T> {
    cut_when(
        until_shutdown(stream, &state.shutdown),
        reader.revoked(state),
    )
}

/// `POST /api/v1/derivations`: `StageDerivations`.
pub async fn stage(
    State(state): State<WebState>,
    caller: Caller,
    JsonBody(request): JsonBody<StageDerivationsRequest>,
) -> Result<Json<StageDerivationsResponse>, ApiError> {
    caller.require(CALLERS, &state)?;
    let stored = state.builds.stage(request).await.map_err(Status::from)?;
    Ok(Json(view::stage_response(stored)))
}

/// `POST /api/v1/job-sets`: `SubmitJobSet`.
pub async fn submit_job_set(
    State(state): State<WebState>,
    caller: Caller,
    JsonBody(request): JsonBody<SubmitJobSetRequest>,
) -> Result<Json<SubmitJobSetResponse>, ApiError> {
    let caller = caller.require(CALLERS, &state)?;
    let queued = state
        .builds
        .submit_job_set(request, &caller.identity)
        .await
        .map_err(Status::from)?;
    Ok(Json(view::job_set_response(queued)))
}
