//! API tokens over HTTP, for admins (a certificate or a token of role admin): create one (its
//! secret in the answer, once), list them, revoke one by name; the same use cases as
//! `drover token` calls over gRPC.

use axum::Json;
use axum::extract::{Path, State};
use drover_proto::v1::{CreateTokenRequest, CreateTokenResponse, ListTokensResponse};
use drover_tls::Role;
use tonic::Status;

use super::WebState;
use super::auth::Caller;
use super::errors::{ApiError, JsonBody};
use crate::grpc::admin_service::wire_token;

/// Roles that may manage tokens.
const ADMINS: &[Role] = &[Role::Admin];

/// `POST /api/v1/tokens`: `CreateToken`.
pub async fn create(
    State(state): State<WebState>,
    caller: Caller,
    JsonBody(request): JsonBody<CreateTokenRequest>,
) -> Result<Json<CreateTokenResponse>, ApiError> {
    let caller = caller.require(ADMINS, &state)?;
    let token = state
        .tokens
        .create(&caller.identity, &request.name, &request.role)
        .await
        .map_err(Status::from)?;
    Ok(Json(CreateTokenResponse { token }))
}

/// `GET /api/v1/tokens`: `ListTokens`.
pub async fn list(
    State(state): State<WebState>,
    caller: Caller,
) -> Result<Json<ListTokensResponse>, ApiError> {
    caller.require(ADMINS, &state)?;
    let tokens = state.tokens.list().await.map_err(Status::from)?;
    Ok(Json(ListTokensResponse {
        tokens: tokens.into_iter().map(wire_token).collect(),
    }))
}

/// `POST /api/v1/tokens/{name}/revoke`: `RevokeToken`.
pub async fn revoke(
    State(state): State<WebState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = caller.require(ADMINS, &state)?;
    state
        .tokens
        .revoke(&caller.identity, &name)
        .await
        .map_err(Status::from)?;
    Ok(Json(serde_json::json!({})))
}
