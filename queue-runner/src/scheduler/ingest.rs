//! Ingest, a task of its own: expanding queued builds into plans for the scheduler core.
//! Durable, not payload-driven: builds waiting for the runner are the rows with
//! `ingested_at IS NULL`, drained on every wake-up from [`super::listen`], every 30 s, and at
//! start, so nothing queued while the runner was down or disconnected is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_scheduler::{BuildPlan, Event, PlannedStep, Requirements, StepId};
use error_context::{Classify, ResultExt as _, Severity, WithContext};
use futures_util::StreamExt as _;
use nix_primitives::{Derivation, DerivationOutput, Hash, IngestionMethod, StorePath};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::driver::{Committed, CommittedChanges};
use super::handoff::Handoff;
use crate::cache::{BinaryCache, CacheError};
use crate::db::queries::{self, BuildSelection, QueuedBuild, StepRow, StepSpec};
use crate::db::status::{BuildStatus, StepStatus};
use crate::db::{DbError, Pool};
use crate::verify::{self, VerifiedClosure, VerifyError};

/// Why ingest stopped. Fatal: queued builds would never be seen.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The database failed.
    #[error("the database failed")]
    Database(#[from] DbError),
    /// The scheduler stopped taking plans.
    #[error("the scheduler stopped taking plans")]
    SchedulerGone,
}

impl Classify for IngestError {
    fn severity(&self) -> Severity {
        Severity::Fatal
    }
}

/// How often ingest looks for queued builds without a notification: a safety net for a
/// notification lost with its connection, and the moment the core may forget old completions.
const RESCAN: Duration = Duration::from_secs(30);

/// Upstream cache lookups in flight at once while planning one build.
const UPSTREAM_LOOKUPS: usize = 64;

/// Builds expanded per query.
const BATCH: i64 = 200;

/// The verified closure builds are expanded from. A build of its own gets a fresh one (Submit's,
/// from the handoff, when it left one); consecutive builds of one job set share theirs, so a
/// derivation they share is loaded and verified once.
#[derive(Debug, Default)]
struct SharedClosure {
    job_set: Option<i64>,
    closure: VerifiedClosure,
}

impl SharedClosure {
    /// The closure to expand `build` from.
    fn for_build(&mut self, build: &QueuedBuild, handoff: &Handoff) -> &mut VerifiedClosure {
        if build.job_set.is_none() || build.job_set != self.job_set {
            self.job_set = build.job_set;
            self.closure = handoff.take(build.id).unwrap_or_default();
        }
        &mut self.closure
    }
}

/// Builds expanded into plans: the ingest task. It owns no scheduling state; the core takes
/// each plan in one event.
pub struct Ingest {
    pool: Pool,
    cache: Arc<BinaryCache>,
    plans: mpsc::Sender<Event>,
    committed: Arc<AtomicU64>,
    handoff: Handoff,
    expanded: CommittedChanges,
}

impl Ingest {
    /// An ingest task feeding `plans`; `committed` is the driver's count of durable step
    /// completions; `handoff` holds the closures Submit verified already; every build it
    /// expands is announced on `expanded`, for Watch streams.
    #[must_use]
    pub fn new(
        pool: Pool,
        cache: Arc<BinaryCache>,
        plans: mpsc::Sender<Event>,
        committed: Arc<AtomicU64>,
        handoff: Handoff,
        expanded: CommittedChanges,
    ) -> Self {
        Self {
            pool,
            cache,
            plans,
            committed,
            handoff,
            expanded,
        }
    }

    /// Plans every unfinished build (what a starting runner must rebuild its graph from), then
    /// every newly queued one on each wake-up and every [`RESCAN`], until `shutdown`.
    pub async fn run(
        self,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<(), WithContext<IngestError>> {
        let recovered = self
            .drain(BuildSelection::Unfinished)
            .await
            .context("recovering the queue at start")?;
        tracing::info!(builds = recovered, "queue recovered");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = wake.notified() => {}
                () = tokio::time::sleep(RESCAN) => {}
            }
            self.drain(BuildSelection::NotIngested)
                .await
                .context("ingesting queued builds")?;
        }
    }

    /// Plans every build `selection` names; returns how many builds were handled.
    async fn drain(&self, selection: BuildSelection) -> Result<usize, WithContext<IngestError>> {
        let snapshot = self.committed.load(Ordering::Acquire);
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|error| IngestError::Database(DbError::Connection(error)))?;
        let mut after = 0;
        let mut handled = 0;
        let mut shared = SharedClosure::default();
        loop {
            let builds = queries::queued_builds(&client, selection, after, BATCH)
                .await
                .map_err(IngestError::Database)?;
            let Some(last) = builds.last() else {
                break;
            };
            after = last.id;
            for build in builds {
                let plan = self
                    .expand(&mut client, &build, &mut shared, snapshot)
                    .await
                    .with_context(|| format!("expanding build {}", build.id))?;
                // Before the plan goes to the scheduler, so a watcher reads the build's steps
                // before any change of them. Nobody watching is not an error.
                let _ = self
                    .expanded
                    .send(Arc::from([Committed::Expanded(build.id)]));
                if let Some(plan) = plan {
                    self.send(Event::BuildPlanned(plan)).await?;
                }
                handled += 1;
            }
        }
        drop(shared);
        self.supersede(&client).await?;
        self.send(Event::IngestCaughtUp { snapshot }).await?;
        Ok(handled)
    }

    /// Cancels the unfinished builds of the older job sets of each superseding job set's series
    /// once every build of it is planned (so the core keeps the steps they share), then marks
    /// the job set as done superseding.
    async fn supersede(&self, client: &deadpool_postgres::Client) -> Result<(), IngestError> {
        for (job_set, builds) in queries::superseded_builds(client).await? {
            for &build in &builds {
                let by = format!("job set {job_set}, which supersedes it");
                self.send(Event::CancelBuild { build, by }).await?;
            }
            queries::mark_superseded(client, job_set).await?;
            tracing::info!(
                job_set,
                cancelled = builds.len(),
                "older job sets superseded"
            );
        }
        Ok(())
    }

    async fn send(&self, event: Event) -> Result<(), IngestError> {
        self.plans
            .send(event)
            .await
            .map_err(|_| IngestError::SchedulerGone)
    }

    /// Loads and verifies a build's closure, creates or finds its steps, and plans it. A
    /// closure that does not verify fails the build, with the reason stored; a build whose
    /// outcome is already known ends here. Either way there is no plan.
    async fn expand(
        &self,
        client: &mut deadpool_postgres::Client,
        build: &QueuedBuild,
        shared: &mut SharedClosure,
        snapshot: u64,
    ) -> Result<Option<BuildPlan>, IngestError> {
        let started = std::time::Instant::now();
        let closure = shared.for_build(build, &self.handoff);
        let top = match load_closure(&*client, &build.drv_path, closure).await? {
            Ok(top) => top,
            Err(error) => {
                refuse(client, build, &error).await?;
                return Ok(None);
            }
        };
        let closure = &*closure;
        let order = closure.closure_of(&top);
        let loaded = started.elapsed();
        if let Err(error) = check_sources(&self.cache, closure, &order) {
            refuse(client, build, &error).await?;
            return Ok(None);
        }
        let specs: Vec<StepSpec> = order
            .iter()
            .map(|path| {
                let verified = &closure.derivations[*path];
                StepSpec {
                    drv_path: path.to_absolute(),
                    system: String::from_utf8_lossy(&verified.derivation.system).into_owned(),
                    features: verified
                        .features
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" "),
                }
            })
            .collect();
        let checked = started.elapsed();
        let available = available_derivations(&self.cache, closure, &order).await;
        let looked_up = started.elapsed();
        let transaction = client
            .transaction()
            .await
            .map_err(DbError::query("starting an ingest transaction"))?;
        let rows = queries::ensure_steps(&transaction, &specs).await?;
        let mut steps: BTreeMap<String, StepRow> = rows
            .into_iter()
            .map(|row| (row.drv_path.clone(), row))
            .collect();
        let substituted = mark_available_steps(&available, &mut steps);
        let outputs = substituted_outputs(closure, &order, &steps, &substituted);
        queries::record_substituted_outputs(&transaction, &outputs).await?;
        let top = top.to_absolute();
        let planned = plan_steps(closure, &order, &steps);
        let needed: Vec<StepId> = planned.iter().map(|step| step.id).collect();
        let known = known_outcome(&transaction, steps[&top].status, &planned).await?;
        if let Some((status, reason)) = known {
            // Linked to its steps, so that restarting it clears a cached failure.
            queries::record_ingested_build(&transaction, build.id, &needed, &substituted, &[])
                .await?;
            queries::finish_build(&transaction, build.id, status, reason.as_deref()).await?;
            transaction
                .commit()
                .await
                .map_err(DbError::query("committing an ingested build"))?;
            tracing::info!(build = build.id, %status, ?reason, "build ended at ingest");
            return Ok(None);
        }
        // Other ends (cancelled, dep_failed, unsupported) are tried again.
        let reset: Vec<StepId> = planned
            .iter()
            .filter(|step| step.recorded_status.is_terminal())
            .map(|step| step.id)
            .collect();
        queries::record_ingested_build(&transaction, build.id, &needed, &substituted, &reset)
            .await?;
        transaction
            .commit()
            .await
            .map_err(DbError::query("committing an ingested build"))?;
        tracing::info!(
            build = build.id,
            steps = planned.len(),
            ?loaded,
            ?checked,
            ?looked_up,
            total = ?started.elapsed(),
            "build planned"
        );
        Ok(Some(BuildPlan {
            build: build.id,
            priority: build.priority,
            global_priority: build.global_priority,
            keep_going: build.keep_going,
            top: steps[&top].id,
            steps: planned,
            available: substituted,
            snapshot,
        }))
    }
}

/// The outputs of the steps done without building, as (step, output name, path).
fn substituted_outputs(
    closure: &VerifiedClosure,
    order: &[&StorePath],
    steps: &BTreeMap<String, StepRow>,
    substituted: &[StepId],
) -> Vec<(StepId, String, String)> {
    order
        .iter()
        .filter_map(|path| {
            let verified = &closure.derivations[*path];
            let row = steps.get(&path.to_absolute())?;
            substituted.contains(&row.id).then(|| {
                verified
                    .outputs
                    .iter()
                    .map(|(name, output)| (row.id, name.clone(), output.to_absolute()))
                    .collect::<Vec<_>>()
            })
        })
        .flatten()
        .collect()
}

/// The unfinished steps of a closure, inputs first. A step that ended for good in an earlier
/// life (cancelled, dependency failed) starts again with fresh counters.
fn plan_steps(
    closure: &VerifiedClosure,
    order: &[&StorePath],
    steps: &BTreeMap<String, StepRow>,
) -> Vec<PlannedStep> {
    let mut planned = Vec::new();
    for path in order {
        let row = &steps[&path.to_absolute()];
        if row.status == StepStatus::Succeeded {
            continue;
        }
        let verified = &closure.derivations[*path];
        let inputs: Vec<StepId> = verified
            .derivation
            .input_derivations
            .keys()
            .filter_map(|input| steps.get(&input.to_absolute()))
            .filter(|input| input.status != StepStatus::Succeeded)
            .map(|input| input.id)
            .collect();
        let fresh = row.status.is_terminal();
        planned.push(PlannedStep {
            id: row.id,
            spec: Arc::new(drover_scheduler::StepSpec {
                drv_path: (*path).clone(),
                drv_text: verified.text.clone(),
                outputs: verified.outputs.clone(),
                requirements: Requirements {
                    system: String::from_utf8_lossy(&verified.derivation.system).into_owned(),
                    features: verified.features.clone(),
                },
                input_paths: input_paths(closure, &verified.derivation),
                fixed: fixed_output(&verified.derivation),
            }),
            inputs,
            recorded_status: row.status,
            builder_losses: if fresh { 0 } else { row.builder_losses },
            infrastructure_failures: if fresh {
                0
            } else {
                row.infrastructure_failures
            },
            visible_in: row.visible_in,
        });
    }
    planned
}

/// Refuses a queued build whose closure does not verify or lacks a source, storing why.
async fn refuse(
    client: &deadpool_postgres::Client,
    build: &QueuedBuild,
    error: &(dyn std::error::Error + Send + Sync + 'static),
) -> Result<(), DbError> {
    let reason = error_context::report(error).to_string();
    tracing::warn!(build = build.id, %reason, "refusing a queued build");
    queries::finish_build(client, build.id, BuildStatus::Failed, Some(&reason)).await
}

/// Checks that every input source of the closure is in the cache, where its builders will
/// substitute it: a derivation referring to a source nobody uploaded fails its build now, not
/// each of its steps on a builder. `.drv` files are not published: the Build message carries
/// each step's derivation.
fn check_sources(
    cache: &BinaryCache,
    closure: &VerifiedClosure,
    order: &[&StorePath],
) -> Result<(), CacheError> {
    for path in order {
        let verified = &closure.derivations[*path];
        if let Some(source) = verified
            .derivation
            .input_sources
            .iter()
            .find(|source| !cache.is_published(source))
        {
            return Err(CacheError::ReferenceNotPublished {
                path: (*path).clone(),
                reference: source.clone(),
            });
        }
    }
    Ok(())
}

/// The derivations of a closure whose outputs are all in the farm's cache or an upstream one:
/// looked up before the ingest transaction, which must not wait on the network, at most
/// [`UPSTREAM_LOOKUPS`] at once (each lookup has its own timeout).
async fn available_derivations(
    cache: &BinaryCache,
    closure: &VerifiedClosure,
    order: &[&StorePath],
) -> BTreeSet<String> {
    let lookups: Vec<_> = order
        .iter()
        .map(|path| {
            let verified = &closure.derivations[*path];
            let outputs: Vec<StorePath> = verified.outputs.values().cloned().collect();
            all_available(cache, path.to_absolute(), outputs)
        })
        .collect();
    futures_util::stream::iter(lookups)
        .buffer_unordered(UPSTREAM_LOOKUPS)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// `drv_path` if every one of `outputs` is available.
async fn all_available(
    cache: &BinaryCache,
    drv_path: String,
    outputs: Vec<StorePath>,
) -> Option<String> {
    for output in &outputs {
        if !cache.is_available(output).await {
            return None;
        }
    }
    Some(drv_path)
}

/// Unfinished steps whose outputs are all available are done without building: marks them
/// succeeded in `steps` and returns their ids.
fn mark_available_steps(
    available: &BTreeSet<String>,
    steps: &mut BTreeMap<String, StepRow>,
) -> Vec<StepId> {
    let mut substituted = Vec::new();
    for (path, row) in steps.iter_mut() {
        let finished = matches!(row.status, StepStatus::Succeeded | StepStatus::Failed);
        if !finished && available.contains(path) {
            row.status = StepStatus::Succeeded;
            substituted.push(row.id);
        }
    }
    substituted
}

/// The store paths a derivation's build reads: its input sources and the outputs it uses of its
/// input derivations.
fn input_paths(closure: &VerifiedClosure, derivation: &Derivation) -> BTreeSet<StorePath> {
    let mut paths = derivation.input_sources.clone();
    for (input, wanted) in &derivation.input_derivations {
        if let Some(verified) = closure.derivations.get(input) {
            paths.extend(
                wanted
                    .iter()
                    .filter_map(|output| verified.outputs.get(output).cloned()),
            );
        }
    }
    paths
}

/// How a fixed-output derivation's output is hashed and the hash it must have.
fn fixed_output(derivation: &Derivation) -> Option<(IngestionMethod, Hash)> {
    derivation.outputs.values().find_map(|output| match output {
        DerivationOutput::Fixed { method, hash, .. } => Some((*method, *hash)),
        _ => None,
    })
}

/// The outcome of a build known before anything is built: it succeeded if its top-level step
/// did; it is a cached failure if it needs a step that failed on its own in an earlier build
/// (the reason names that build and its reason).
async fn known_outcome(
    client: &impl deadpool_postgres::GenericClient,
    top: StepStatus,
    planned: &[PlannedStep],
) -> Result<Option<(BuildStatus, Option<String>)>, DbError> {
    if top == StepStatus::Succeeded {
        return Ok(Some((BuildStatus::Succeeded, None)));
    }
    let Some(failed) = planned
        .iter()
        .find(|step| step.recorded_status == StepStatus::Failed)
    else {
        return Ok(None);
    };
    let (origin, reason) = queries::failure_origin(client, failed.id).await?;
    let drv = failed.spec.drv_path.to_absolute();
    let reason = reason.unwrap_or_else(|| "no reason recorded".to_owned());
    let reason = match origin {
        Some(origin) => format!("{drv} failed in build {origin}: {reason}"),
        None => format!("{drv} failed in an earlier build: {reason}"),
    };
    Ok(Some((BuildStatus::CachedFailure, Some(reason))))
}

/// Reads the closure of `top` from the `derivations` table, verifies what `closure` lacks of it
/// and adds it there. The outer error is the database's; the inner one says why the closure is
/// refused.
pub async fn load_closure(
    client: &impl deadpool_postgres::GenericClient,
    top: &str,
    closure: &mut VerifiedClosure,
) -> Result<Result<StorePath, VerifyError>, DbError> {
    let top = match verify::parse_path(top) {
        Ok(top) => top,
        Err(error) => return Ok(Err(error)),
    };
    let mut parsed = BTreeMap::new();
    if let Err(error) = complete_closure(client, &top, closure, &mut parsed).await? {
        return Ok(Err(error));
    }
    Ok(closure.add(&top, &mut parsed).map(|()| top))
}

/// Adds to `parsed` every derivation of the closure of `top` that neither it nor `known` has,
/// from the database, breadth-first with one query per level. The closure of a derivation
/// `known` has is complete, so the walk stops there.
pub async fn complete_closure(
    client: &impl deadpool_postgres::GenericClient,
    top: &StorePath,
    known: &VerifiedClosure,
    parsed: &mut BTreeMap<StorePath, (Vec<u8>, Derivation)>,
) -> Result<Result<(), VerifyError>, DbError> {
    let mut seen: BTreeSet<StorePath> = BTreeSet::from([top.clone()]);
    let mut frontier = vec![top.clone()];
    while !frontier.is_empty() {
        frontier.retain(|path| !known.derivations.contains_key(path));
        let wanted: Vec<String> = frontier
            .iter()
            .filter(|path| !parsed.contains_key(*path))
            .map(StorePath::to_absolute)
            .collect();
        if !wanted.is_empty() {
            for (path_text, text) in queries::derivation_texts(client, &wanted).await? {
                let path = match verify::parse_path(&path_text) {
                    Ok(path) => path,
                    Err(error) => return Ok(Err(error)),
                };
                match verify::parse_derivation(&path, &text) {
                    Ok(derivation) => {
                        parsed.insert(path, (text, derivation));
                    }
                    Err(error) => return Ok(Err(error)),
                }
            }
        }
        let mut next = Vec::new();
        for path in &frontier {
            let Some((_, derivation)) = parsed.get(path) else {
                return Ok(Err(VerifyError::Missing(path.clone())));
            };
            for input in derivation.input_derivations.keys() {
                if seen.insert(input.clone()) {
                    next.push(input.clone());
                }
            }
        }
        frontier = next;
    }
    Ok(Ok(()))
}
