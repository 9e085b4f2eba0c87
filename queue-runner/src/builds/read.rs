//! Reading builds: one build's whole state (as Get and Watch answer), a page of builds, and a
//! step's stored log.

use deadpool_postgres::tokio_postgres::IsolationLevel;
use drover_proto::v1::{GetResponse, ListResponse};

use super::Builds;
use super::estimate::Estimator;
use super::view;
use crate::db::queries::{self, BuildFilter, LatestLog};
use crate::db::snapshot::Snapshot;
use crate::db::{DbError, Pool};
use crate::logs::LogText;

/// Why a build or a log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// There is no such build.
    #[error("no build {0}")]
    NoSuchBuild(i64),
    /// No attempt of the step has a log.
    #[error("no log for {0}")]
    NoLog(String),
    /// The step's log was deleted for its age.
    #[error(
        "the log of {drv_path} expired on {expired} (the runner keeps logs for [logs] keep_days)"
    )]
    LogExpired {
        /// The step's derivation.
        drv_path: String,
        /// The day it was deleted (UTC).
        expired: String,
    },
    /// The step's latest attempt has written no log yet.
    #[error("no log for {0} yet")]
    LogNotYet(String),
    /// The stored log could not be read.
    #[error("reading the stored log of {drv_path} failed")]
    ReadLog {
        /// The step's derivation.
        drv_path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database failed.
    #[error("reading builds")]
    Database(#[from] DbError),
}

impl Builds {
    /// Build `id`'s whole state.
    pub async fn get(&self, id: i64) -> Result<GetResponse, ReadError> {
        Ok(build_state(&self.pool, &self.estimator(), id).await?.0)
    }

    /// The builds `filter` selects, newest first, and the token of the next page.
    pub async fn list(&self, filter: &BuildFilter) -> Result<ListResponse, ReadError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let rows = queries::list_builds(&client, filter).await?;
        let next_page_token = view::next_page_token(&rows, filter);
        Ok(ListResponse {
            builds: rows.into_iter().map(view::summary).collect(),
            next_page_token,
        })
    }

    /// The log of the latest attempt of the step building `drv_path`: what has arrived so far
    /// while it runs.
    pub async fn log(&self, drv_path: &str) -> Result<LogText, ReadError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let latest = queries::latest_log_file(&client, drv_path)
            .await?
            .ok_or_else(|| ReadError::NoLog(drv_path.to_owned()))?;
        let (attempt, file) = match latest {
            LatestLog::Kept(attempt, file) => (attempt, file),
            LatestLog::Expired(expired) => {
                return Err(ReadError::LogExpired {
                    drv_path: drv_path.to_owned(),
                    expired,
                });
            }
        };
        self.logs.read_so_far(attempt, &file).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                return ReadError::LogNotYet(drv_path.to_owned());
            }
            tracing::error!(%file, error = %source, "reading a stored log failed");
            ReadError::ReadLog {
                drv_path: drv_path.to_owned(),
                source,
            }
        })
    }
}

/// Build `id`'s whole state, over `pool`, read in one snapshot, which it returns (Watch reads it
/// again while it streams, and skips the changes the snapshot shows), with the predicted end
/// `estimator` gives.
pub async fn build_state(
    pool: &Pool,
    estimator: &Estimator,
    id: i64,
) -> Result<(GetResponse, Snapshot), ReadError> {
    let mut client = pool.get().await.map_err(DbError::Connection)?;
    let transaction = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(DbError::query("starting to read a build"))?;
    let snapshot = queries::snapshot(&transaction).await?;
    let build = queries::build(&transaction, id)
        .await?
        .ok_or(ReadError::NoSuchBuild(id))?;
    let steps = queries::build_steps(&transaction, id).await?;
    transaction
        .commit()
        .await
        .map_err(DbError::query("ending the read of a build"))?;
    let status = view::wire_status(build.status);
    let mut state = GetResponse {
        build_id: id,
        status: status.into(),
        top_drv_path: build.drv_path,
        metadata: serde_json::from_value(build.metadata).unwrap_or_default(),
        failure_reason: build.failure_reason.unwrap_or_default(),
        outputs: build.outputs.into_iter().collect(),
        phase: status.phase().into(),
        steps: steps.into_iter().map(view::step_state).collect(),
        job_set_id: build.job_set.unwrap_or_default(),
        job_name: build.job_name.unwrap_or_default(),
        submitted_at_ms: build.times_ms.0,
        finished_at_ms: build.times_ms.1.unwrap_or_default(),
        keep_going: build.keep_going,
        estimated_end_ms: 0,
    };
    estimator.fill(&mut state).await;
    Ok((state, snapshot))
}
