//! Job sets: an evaluation's derivations staged in chunks (each stored once, by its path, so a
//! chunk sent again changes nothing), then one call that verifies every job's closure together
//! (a derivation the jobs share is verified once) and queues one build per job, all or none.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use drover_daemon::traces;
use drover_proto::v1::{StageDerivationsRequest, SubmitJobSetRequest};
use drover_tls::Identity;
use error_context::{Classify, Severity};
use nix_primitives::StorePath;

use super::Builds;
use super::submit::{SubmitError, refuse_unknown_systems};
use crate::db::{self, DbError, queries};
use crate::scheduler::ingest::load_closures;
use crate::verify::{self, Loaded, StoredDerivation, VerifiedClosure};

/// Why a job set was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum JobSetError {
    /// It names no job.
    #[error("a job set names at least one job")]
    NoJobs,
    /// A job's name is empty or taken by another job.
    #[error("job name {0:?} is empty or given twice: each job of a job set has its own name")]
    JobName(String),
    /// It asks to supersede without saying what it supersedes.
    #[error("a job set that supersedes others needs a series (a branch, a jobset name)")]
    SupersedeWithoutSeries,
    /// One job's closure is refused; nothing was queued.
    #[error("job {job} ({drv}) cannot be queued, so no job of the set was")]
    Job {
        /// The job.
        job: String,
        /// Its top-level derivation.
        drv: String,
        /// Why.
        #[source]
        source: Box<SubmitError>,
    },
    /// What any submission can fail with: a derivation too large, no room, the database.
    #[error(transparent)]
    Submit(#[from] SubmitError),
}

impl From<DbError> for JobSetError {
    fn from(error: DbError) -> Self {
        Self::Submit(SubmitError::Database(error))
    }
}

impl Classify for JobSetError {
    fn severity(&self) -> Severity {
        match self {
            Self::NoJobs | Self::JobName(_) | Self::SupersedeWithoutSeries => Severity::Reject,
            Self::Job { source, .. } => source.severity(),
            Self::Submit(source) => source.severity(),
        }
    }
}

/// A queued job set: its id, its builds as (job name, build id) in the order of the request, and
/// whether an earlier call with the same idempotency key queued it.
#[derive(Debug, Clone)]
pub struct QueuedJobSet {
    /// The job set.
    pub id: i64,
    /// Its builds.
    pub builds: Vec<(String, i64)>,
    /// Whether this call queued nothing.
    pub existing: bool,
}

impl Builds {
    /// Stores derivations (each checked to hash to its path) and input sources for a job set to
    /// come; returns how many derivations were new. Those whose inputs are verified already
    /// (stored, or earlier in the request) are verified now, so the upload and the verification
    /// overlap; the others are verified by the job set, which names any that fails.
    pub async fn stage(&self, request: StageDerivationsRequest) -> Result<u64, SubmitError> {
        let mut checked = Vec::with_capacity(request.derivations.len());
        let mut loaded = BTreeMap::new();
        for given in request.derivations {
            self.check_size(&given.path, &given.text)?;
            let path = verify::parse_path(&given.path)?;
            let derivation = verify::parse_derivation(&path, &given.text)?;
            checked.push((path.to_absolute(), given.text));
            loaded.insert(path, Loaded::Parsed(derivation));
        }
        self.publish_sources(request.sources).await?;
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let stored = queries::store_derivations(&client, &checked).await?;
        let verified = verify_staged(&client, loaded).await?;
        db::verified::store(&client, &verified).await?;
        Ok(stored)
    }

    /// Verifies every job's closure and queues one build per job for `caller`, all or none.
    pub async fn submit_job_set(
        &self,
        request: SubmitJobSetRequest,
        caller: &Identity,
    ) -> Result<QueuedJobSet, JobSetError> {
        let jobs = checked_jobs(&request)?;
        let submitted_by = caller.to_string();
        let key = (!request.idempotency_key.is_empty()).then_some(request.idempotency_key.as_str());
        let mut client = self.pool.get().await.map_err(DbError::Connection)?;
        if let Some(key) = key
            && let Some((id, builds)) =
                queries::job_set_with_key(&client, &submitted_by, key).await?
        {
            return Ok(QueuedJobSet {
                id,
                builds,
                existing: true,
            });
        }
        // The closures read below must still be there when the job set commits.
        let planning = self.handoff.gate().plan().await;
        let mut closure = VerifiedClosure::default();
        let tops: Vec<&str> = jobs.iter().map(|(_, top)| top.as_str()).collect();
        let outcomes = load_closures(&client, &tops, &mut closure).await?;
        for ((name, top), outcome) in jobs.iter().zip(outcomes) {
            if let Err(refused) = outcome {
                return Err(JobSetError::Job {
                    job: name.clone(),
                    drv: top.clone(),
                    source: Box::new(SubmitError::Verify(refused)),
                });
            }
        }
        planning.name_derivations(closure.derivations.keys().map(StorePath::to_absolute));
        if self.limits.refuse_unknown_systems {
            refuse_unknown_systems(&client, &closure).await?;
        }
        self.admit(&client, closure.derivations.len()).await?;
        let metadata = serde_json::to_value(&request.metadata).map_err(SubmitError::Metadata)?;
        let derivations = closure.derivations.len();
        let series = (!request.series.is_empty()).then_some(request.series.as_str());
        let transaction = client
            .transaction()
            .await
            .map_err(DbError::query("starting a job set"))?;
        let (id, builds, existing) = queries::insert_job_set(
            &transaction,
            &queries::NewJobSet {
                jobs: &jobs,
                priority: request.priority,
                metadata: &metadata,
                submitted_by: &submitted_by,
                keep_going: request.keep_going,
                idempotency_key: key,
                series,
                supersede: request.supersede,
                trace_parent: &traces::traceparent(&tracing::Span::current()),
            },
        )
        .await?;
        // Offered before the commit, so ingest (woken by the commit) plans the job set from the
        // closure verified here instead of verifying it again.
        let first = builds.first().map(|(_, build)| *build);
        let offered = match first {
            Some(first) if !existing => self.handoff.offer(first, closure),
            _ => false,
        };
        if let Err(error) = transaction.commit().await {
            if let (true, Some(first)) = (offered, first) {
                self.handoff.withdraw(first);
            }
            return Err(DbError::query("committing a job set")(error).into());
        }
        drop(planning);
        if !existing {
            tracing::info!(
                job_set = id,
                jobs = builds.len(),
                derivations,
                ?series,
                supersede = request.supersede,
                "job set submitted"
            );
        }
        Ok(QueuedJobSet {
            id,
            builds,
            existing,
        })
    }
}

/// The jobs as (name, top-level derivation), once each name is checked.
fn checked_jobs(request: &SubmitJobSetRequest) -> Result<Vec<(String, String)>, JobSetError> {
    if request.jobs.is_empty() {
        return Err(JobSetError::NoJobs);
    }
    if request.supersede && request.series.is_empty() {
        return Err(JobSetError::SupersedeWithoutSeries);
    }
    let mut names = BTreeSet::new();
    let mut jobs = Vec::with_capacity(request.jobs.len());
    for job in &request.jobs {
        if job.name.is_empty() || !names.insert(job.name.as_str()) {
            return Err(JobSetError::JobName(job.name.clone()));
        }
        jobs.push((job.name.clone(), job.drv_path.clone()));
    }
    Ok(jobs)
}

/// Verifies the staged derivations whose closures are staged and verified: each one's inputs
/// are in `staged` or stored verified already. Returns what was verified.
async fn verify_staged(
    client: &impl deadpool_postgres::GenericClient,
    mut staged: BTreeMap<StorePath, Loaded>,
) -> Result<Vec<StoredDerivation>, DbError> {
    let tops: Vec<StorePath> = staged.keys().cloned().collect();
    let outside: BTreeSet<String> = staged
        .values()
        .flat_map(Loaded::inputs)
        .filter(|input| !staged.contains_key(*input))
        .map(StorePath::to_absolute)
        .collect();
    let outside: Vec<String> = outside.into_iter().collect();
    let mut closure = VerifiedClosure::default();
    for stored in db::verified::load(client, &outside).await? {
        closure.add_stored(stored);
    }
    drop_incomplete(&mut staged, &closure);
    let mut verified = Vec::new();
    for top in &tops {
        // One that does not verify waits for the job set, which names it.
        if let Ok(mut more) = closure.add(top, &mut staged) {
            verified.append(&mut more);
        }
    }
    Ok(verified)
}

/// Drops from `staged` each derivation with an input neither staged nor in `stored` (sent in a
/// later chunk, say), and every one above it: they are verified by the job set.
fn drop_incomplete(staged: &mut BTreeMap<StorePath, Loaded>, stored: &VerifiedClosure) {
    let mut dependents: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
    let mut pending = Vec::new();
    for (path, found) in staged.iter() {
        for input in found.inputs() {
            if staged.contains_key(input) {
                dependents.entry(input).or_default().push(path);
            } else if !stored.derivations.contains_key(input) {
                pending.push(path);
            }
        }
    }
    let mut incomplete = HashSet::new();
    while let Some(path) = pending.pop() {
        if incomplete.insert(path.clone()) {
            pending.extend(dependents.get(path).into_iter().flatten().copied());
        }
    }
    staged.retain(|path, _| !incomplete.contains(path));
}
