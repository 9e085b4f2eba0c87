//! How a refusal or failure looks over HTTP: the gRPC status the same error maps to (one table
//! for both front ends, [`crate::grpc::status`]), as an HTTP status and a JSON body
//! `{"error": {"code": "NOT_FOUND", "message": "…"}}`; a full farm's refusal says when to retry
//! in `Retry-After`. The router's own refusals under `/api/` (no such path or method, a path or
//! query parameter of the wrong type) get the same body ([`json_refusals`]).

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// An error a handler answers with: a status, and the HTTP status it is sent as.
#[derive(Debug)]
pub struct ApiError {
    status: Status,
    http: StatusCode,
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        Self {
            http: http_status(status.code()),
            status,
        }
    }
}

/// A JSON request body, refused as the API refuses anything (`400`, or `413` past the body
/// limit) rather than with axum's plain-text answers.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError {
                http: if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                },
                status: Status::invalid_argument(rejection.body_text()),
            }),
        }
    }
}

/// The HTTP status of a gRPC code: `422` for a precondition (an unknown system), `503` for a
/// full farm and for an unavailable database.
#[must_use]
pub const fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::UNPROCESSABLE_ENTITY,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted | Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// The JSON body of an error.
#[must_use]
pub fn body(status: &Status) -> serde_json::Value {
    serde_json::json!({
        "error": {
            "code": code_name(status.code()),
            "message": status.message(),
        }
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.http, axum::Json(body(&self.status))).into_response();
        let retry = self
            .status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay);
        if let Some(delay) = retry {
            // Whole seconds, rounded up: a client that waits less is refused again.
            let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

/// Gives the plain-text refusals of the router and of axum's extractors under `/api/` the
/// API's JSON body, keeping their HTTP status.
pub async fn json_refusals(request: Request, next: Next) -> Response {
    let api = request.uri().path().starts_with("/api/");
    let response = next.run(request).await;
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    let status = response.status();
    if !api || json || !status.is_client_error() {
        return response;
    }
    let code = match status {
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => Code::Unimplemented,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        _ => Code::InvalidArgument,
    };
    let (parts, said) = response.into_parts();
    let text = axum::body::to_bytes(said, 64 * 1024)
        .await
        .unwrap_or_default();
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("refused").to_owned(),
        text => text.to_owned(),
    };
    let mut refused = (status, axum::Json(body(&Status::new(code, message)))).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            refused.headers_mut().insert(name.clone(), value.clone());
        }
    }
    refused
}

/// `ResourceExhausted` as `RESOURCE_EXHAUSTED`: gRPC's own spelling of its codes.
fn code_name(code: Code) -> String {
    let mut name = String::new();
    for (index, character) in format!("{code:?}").chars().enumerate() {
        if character.is_ascii_uppercase() && index > 0 {
            name.push('_');
        }
        name.push(character.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_spelled_as_grpc_spells_them() {
        let status = Status::resource_exhausted("full");
        assert_eq!(body(&status)["error"]["code"], "RESOURCE_EXHAUSTED");
        assert_eq!(body(&Status::not_found("x"))["error"]["code"], "NOT_FOUND");
    }

    #[test]
    fn a_full_farm_is_503_and_a_precondition_422() {
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            http_status(Code::FailedPrecondition),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}
