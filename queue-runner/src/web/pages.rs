//! The status page: an overview of the farm (queues per system, builders with load, state and
//! quarantine, running steps with their elapsed time, recent builds) and a page per build (its
//! steps, why each waits, its predicted end, the live log of its running step), plain HTML
//! with a little JavaScript and no build step, served by the runner and live over its own
//! event streams. Read-only; behind a token login (the `drover_token` cookie) unless `[web]
//! public_status` is set.

use std::convert::Infallible;
use std::time::Duration;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, SET_COOKIE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use futures_util::StreamExt as _;
use serde::Deserialize;
use tokio_stream::Stream;
use tonic::Status;

use super::WebState;
use super::auth::{Reader, TOKEN_COOKIE};
use super::errors::ApiError;
use crate::db::{DbError, status_page};

const OVERVIEW: &str = include_str!("page/overview.html");
const BUILD: &str = include_str!("page/build.html");
const LOGIN: &str = include_str!("page/login.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

/// How often the overview's event stream sends it again.
const OVERVIEW_EVERY: Duration = Duration::from_secs(2);

/// How long an overview read serves every reader.
const OVERVIEW_FRESH: Duration = Duration::from_millis(1500);

/// Nothing but this origin: the pages fetch nothing from elsewhere and run no inline script.
const POLICY: &str = "default-src 'self'; frame-ancestors 'none'";

/// `GET /`: the overview, or the login page for a visitor without a credential.
pub async fn overview(reader: Result<Reader, ApiError>) -> Response {
    page(reader.is_ok(), OVERVIEW, "/")
}

/// `GET /builds/{id}`: a build's page (its id is read from the address by the script).
pub async fn build(reader: Result<Reader, ApiError>, Path(id): Path<i64>) -> Response {
    page(reader.is_ok(), BUILD, &format!("/builds/{id}"))
}

/// The page `html`, or the login page, which comes back to `here`.
fn page(admitted: bool, html: &'static str, here: &str) -> Response {
    if admitted {
        html_response(StatusCode::OK, html.to_owned())
    } else {
        Redirect::to(&format!("/login?next={here}")).into_response()
    }
}

/// Where the login page goes once signed in: a page of this site (`/…`, of letters, digits and
/// `/`), else the overview.
#[derive(Deserialize)]
pub struct Next {
    #[serde(default)]
    next: String,
}

impl Next {
    fn page(&self) -> &str {
        let local = self.next.starts_with('/')
            && self
                .next
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'/');
        if local { &self.next } else { "/" }
    }
}

/// `GET /login[?next=/builds/42]`.
pub async fn login_form(Query(next): Query<Next>) -> Response {
    html_response(StatusCode::OK, login_page(next.page(), ""))
}

/// The login page, coming back to `next` (checked by [`Next::page`]: no markup), saying
/// `message`.
fn login_page(next: &str, message: &str) -> String {
    LOGIN
        .replace("<!--next-->", next)
        .replace("<!--message-->", message)
}

/// The login form's fields.
#[derive(Deserialize)]
pub struct Login {
    token: String,
    #[serde(default)]
    next: String,
}

/// `POST /login`: a valid token is kept in a cookie only this site's requests send (never to
/// scripts), and the visitor goes to the overview.
pub async fn login(State(state): State<WebState>, Form(login): Form<Login>) -> Response {
    let token = login.token.trim();
    match state.tokens.holder(token).await {
        Ok(Some(_)) => {
            // Lax, so a link from elsewhere to a build's page opens it; the cookie authorises
            // reads only, so no other site can change anything with it.
            let cookie = format!("{TOKEN_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Lax");
            let next = Next { next: login.next };
            let mut response = Redirect::to(next.page()).into_response();
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(SET_COOKIE, cookie);
            }
            response
        }
        Ok(None) => html_response(
            StatusCode::UNAUTHORIZED,
            login_page(
                Next { next: login.next }.page(),
                "<p class=\"error\" role=\"alert\">That token is not valid (revoked, or \
                 unknown).</p>",
            ),
        ),
        Err(error) => ApiError::from(crate::grpc::status::unavailable(&error)).into_response(),
    }
}

/// `GET /status/app.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /status/style.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /api/v1/status`: the overview as JSON.
pub async fn status(
    State(state): State<WebState>,
    _: Reader,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    Ok(axum::Json(read_overview(&state).await?))
}

/// `GET /api/v1/status/events`: the overview as an `overview` event now and every 2 s, until
/// the reader's credential is revoked.
pub async fn status_events(
    State(state): State<WebState>,
    reader: Reader,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let first = read_overview(&state).await?;
    let revoked = reader.revoked(&state);
    let stream = futures_util::stream::unfold((state, Some(first)), |(state, ready)| async move {
        let overview = if let Some(overview) = ready {
            overview
        } else {
            tokio::select! {
                () = state.shutdown.cancelled() => return None,
                () = tokio::time::sleep(OVERVIEW_EVERY) => {}
            }
            read_overview(&state).await.ok()?
        };
        let event = Event::default()
            .event("overview")
            .data(overview.to_string());
        Some((Ok(event), (state, None)))
    })
    .take_until(revoked);
    Ok(Sse::new(stream))
}

/// The overview, read at most once per [`OVERVIEW_FRESH`] however many pages are open: the
/// first reader after that reads it again while the others wait for its answer.
async fn read_overview(state: &WebState) -> Result<serde_json::Value, Status> {
    let mut last = state.overview.lock().await;
    if let Some((read_at, overview)) = &*last
        && read_at.elapsed() < OVERVIEW_FRESH
    {
        return Ok(overview.clone());
    }
    let client = state
        .builds
        .pool()
        .get()
        .await
        .map_err(|error| crate::grpc::status::unavailable(&DbError::Connection(error)))?;
    let overview = status_page::overview(&client)
        .await
        .map_err(|error| crate::grpc::status::unavailable(&error))?;
    *last = Some((std::time::Instant::now(), overview.clone()));
    Ok(overview)
}

/// The last overview read, and when: shared by every page and stream of one listener.
pub type OverviewCache =
    std::sync::Arc<tokio::sync::Mutex<Option<(std::time::Instant, serde_json::Value)>>>;

fn html_response(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
