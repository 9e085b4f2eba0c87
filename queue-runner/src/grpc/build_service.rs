//! `BuildService`: each method authenticates the caller from its certificate, decodes the
//! request, calls one use case of [`crate::builds`], and maps its typed error through the one
//! conversion of its type ([`super::status`]). Watch and `FollowLog` open streams that live here.

use std::time::Duration;

use drover_daemon::traces;
use drover_proto::v1::build_service_server::BuildService;
use drover_proto::v1::{
    CancelRequest, CancelResponse, FollowLogRequest, GetLogRequest, GetLogResponse, GetRequest,
    GetResponse, ListRequest, ListResponse, RestartRequest, RestartResponse,
    StageDerivationsRequest, StageDerivationsResponse, SubmitJobSetRequest, SubmitJobSetResponse,
    SubmitRequest, SubmitResponse, WatchRequest,
};
use drover_tls::Role;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::shutdown::{cut_when, until_shutdown};
use super::{auth, follow_log, list_filter, watch};
use crate::builds::{Builds, view};
use crate::scheduler::driver::CommittedChanges;

/// Roles that may use the build service.
const CALLERS: &[Role] = &[Role::Client, Role::Admin];

/// The build service.
pub struct BuildServiceImpl {
    builds: Builds,
    /// What the scheduler and ingest commit, for Watch streams.
    changes: CommittedChanges,
    /// How often an idle Watch or `FollowLog` stream sends a heartbeat.
    heartbeat: Duration,
    /// Ends Watch and `FollowLog` streams when the runner shuts down.
    shutdown: CancellationToken,
}

impl BuildServiceImpl {
    /// The service over `builds`; Watch streams follow `changes` and send a heartbeat every
    /// `heartbeat` when idle; streams end at `shutdown`.
    #[must_use]
    pub fn new(
        builds: Builds,
        changes: CommittedChanges,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            builds,
            changes,
            heartbeat,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl BuildService for BuildServiceImpl {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let submitter = auth::require(&request, CALLERS)?;
        let span = tracing::info_span!("submit", %submitter);
        continue_trace(&span, &request);
        let (build_id, existing) = self
            .builds
            .submit(request.into_inner(), &submitter)
            .instrument(span)
            .await?;
        Ok(Response::new(SubmitResponse { build_id, existing }))
    }

    async fn stage_derivations(
        &self,
        request: Request<StageDerivationsRequest>,
    ) -> Result<Response<StageDerivationsResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let stored = self.builds.stage(request.into_inner()).await?;
        Ok(Response::new(view::stage_response(stored)))
    }

    async fn submit_job_set(
        &self,
        request: Request<SubmitJobSetRequest>,
    ) -> Result<Response<SubmitJobSetResponse>, Status> {
        let submitter = auth::require(&request, CALLERS)?;
        let span = tracing::info_span!("submit job set", %submitter);
        continue_trace(&span, &request);
        let queued = self
            .builds
            .submit_job_set(request.into_inner(), &submitter)
            .instrument(span)
            .await?;
        Ok(Response::new(view::job_set_response(queued)))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let ended = self
            .builds
            .cancel(&caller, request.into_inner().build_id)
            .await?;
        Ok(Response::new(view::cancel_response(ended)))
    }

    async fn restart(
        &self,
        request: Request<RestartRequest>,
    ) -> Result<Response<RestartResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let request = request.into_inner();
        let dependents = self
            .builds
            .restart(&caller, request.build_id, request.dependents)
            .await?;
        Ok(Response::new(RestartResponse { dependents }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let state = self.builds.get(request.into_inner().build_id).await?;
        Ok(Response::new(state))
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = auth::require_certificate(&request, CALLERS)?;
        let revoked = auth::revoked(&request, &peer)?;
        let build = request.into_inner().build_id;
        let sources = watch::Sources::of(&self.builds);
        let stream = watch::open(build, &self.changes, sources, self.heartbeat).await?;
        let stream = until_shutdown(stream, &self.shutdown);
        Ok(Response::new(cut_when(stream, revoked)))
    }

    type FollowLogStream = follow_log::LogStream;

    async fn follow_log(
        &self,
        request: Request<FollowLogRequest>,
    ) -> Result<Response<Self::FollowLogStream>, Status> {
        let peer = auth::require_certificate(&request, CALLERS)?;
        let revoked = auth::revoked(&request, &peer)?;
        let drv_path = request.into_inner().drv_path;
        let stream = follow_log::open(
            self.builds.pool().clone(),
            self.builds.logs().clone(),
            drv_path,
            self.heartbeat,
        )
        .await?;
        let stream = until_shutdown(stream, &self.shutdown);
        Ok(Response::new(cut_when(stream, revoked)))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let filter = list_filter::filter(request.get_ref())?;
        Ok(Response::new(self.builds.list(&filter).await?))
    }

    async fn get_log(
        &self,
        request: Request<GetLogRequest>,
    ) -> Result<Response<GetLogResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let log = self.builds.log(&request.into_inner().drv_path).await?;
        Ok(Response::new(view::log_response(log)))
    }
}

/// Makes `span` a child of the trace the caller sent in its `traceparent` metadata, if it did.
fn continue_trace<T>(span: &tracing::Span, request: &Request<T>) {
    if let Some(parent) = request
        .metadata()
        .get(traces::TRACEPARENT)
        .and_then(|value| value.to_str().ok())
    {
        traces::set_parent(span, parent);
    }
}
