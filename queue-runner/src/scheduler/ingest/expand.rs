//! Expanding a group of queued builds (one build, or the builds of a job set) into one plan:
//! their closures verified, the steps they need created in bulk with their edges, the builds
//! whose outcome is already known ended, and the rest handed to the core with their shared
//! steps, each once.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use drover_scheduler::{BuildPlan, PlannedBuild, PlannedStep, Requirements, StepId};
use futures_util::StreamExt as _;
use nix_primitives::StorePath;

use super::closure::{SharedClosure, load_closures};
use super::{Ingest, IngestError};
use crate::cache::{BinaryCache, CacheError};
use crate::db::DbError;
use crate::db::queries::{self, QueuedBuild, StepRow, StepSpec};
use crate::db::status::{BuildStatus, StepStatus};
use crate::history::gate::Planning;
use crate::verify::VerifiedClosure;

/// Upstream cache lookups in flight at once while planning.
const UPSTREAM_LOOKUPS: usize = 64;

/// The step rows a plan needs, by derivation: hashed store paths, not absolute strings in a
/// B-tree, whose shared `/nix/store/` prefix made every lookup a run of `memcmp` (a third of a
/// 100k-step plan's CPU).
type Steps = HashMap<StorePath, StepRow>;

impl Ingest {
    /// Loads and verifies the closures of `group`, creates or finds the steps they need, and
    /// plans the builds still to build. A build whose closure does not verify or lacks a source
    /// fails, with the reason stored; a build whose outcome is already known ends here.
    /// `planning` (the gate history pruning respects) is let go once the plan is committed.
    pub(super) async fn expand(
        &self,
        client: &mut deadpool_postgres::Client,
        group: &[QueuedBuild],
        shared: &mut SharedClosure,
        snapshot: u64,
        planning: Planning<'_>,
    ) -> Result<Option<BuildPlan>, IngestError> {
        let started = Instant::now();
        let (closure, specs) = shared.for_group(group, &self.handoff);
        let tops = verified_tops(client, group, closure).await?;
        let closure = &*closure;
        let (tops, order) = with_sources(client, &self.cache, closure, tops).await?;
        if tops.is_empty() {
            return Ok(None);
        }
        let loaded = started.elapsed();
        let available = available_derivations(&self.cache, closure, &order).await;
        let looked_up = started.elapsed();
        let transaction = client
            .transaction()
            .await
            .map_err(DbError::query("starting an ingest transaction"))?;
        let paths: Vec<String> = order.iter().map(|path| path.to_absolute()).collect();
        let mut recorded: HashMap<String, StepRow> = queries::existing_steps(&transaction, &paths)
            .await?
            .into_iter()
            .map(|row| (row.drv_path.clone(), row))
            .collect();
        planning.name_steps(recorded.values().map(|row| row.id));
        planning.name_derivations(paths);
        let done = |path: &StorePath| {
            let path = path.to_absolute();
            match recorded.get(&path).map(|row| row.status) {
                Some(StepStatus::Succeeded) => true,
                Some(StepStatus::Failed) => false,
                _ => available.contains(&path),
            }
        };
        let needed = needed_derivations(closure, &order, tops.iter().map(|(_, top)| top), done);
        // Only the steps no build needed before are written: a job set planned slice by slice,
        // and a restarted runner, find most of theirs.
        let mut steps: Steps = HashMap::with_capacity(needed.len());
        // Created in dependency order, so step ids (the last tie-break of the queue's order) stay
        // oldest-first from the bottom up.
        let mut to_create: Vec<&StorePath> = Vec::new();
        let mut missing: HashMap<String, &StorePath> = HashMap::new();
        for path in &needed {
            let absolute = path.to_absolute();
            if let Some(row) = recorded.remove(&absolute) {
                steps.insert((*path).clone(), row);
            } else {
                missing.insert(absolute, *path);
                to_create.push(*path);
            }
        }
        for row in queries::ensure_steps(&transaction, &step_specs(closure, &to_create)).await? {
            if let Some(path) = missing.get(&row.drv_path) {
                steps.insert((*path).clone(), row);
            }
        }
        queries::record_step_inputs(&transaction, &new_edges(closure, &needed, &steps)).await?;
        let substituted = mark_available_steps(&available, &mut steps);
        let outputs = substituted_outputs(closure, &needed, &steps, &substituted);
        queries::record_substituted_outputs(&transaction, &outputs).await?;
        let planned = plan_steps(closure, &needed, &steps, specs);
        let blocked = Blocked::find(&planned);
        let (ended, builds) = outcomes(&transaction, &tops, &steps, &planned, &blocked).await?;
        let planned: Vec<PlannedStep> = planned
            .into_iter()
            .filter(|step| !blocked.contains(step.id))
            .collect();
        // Other ends (cancelled, dep_failed, unsupported) are tried again.
        let fresh: Vec<StepId> = planned
            .iter()
            .filter(|step| step.recorded_status.is_terminal())
            .map(|step| step.id)
            .collect();
        let ids: Vec<i64> = tops.iter().map(|(build, _)| build.id).collect();
        queries::record_ingested_builds(
            &transaction,
            &ids,
            &substituted,
            &fresh,
            &blocked.above_failures(),
        )
        .await?;
        queries::finish_builds(&transaction, &ended).await?;
        transaction
            .commit()
            .await
            .map_err(DbError::query("committing ingested builds"))?;
        // What it named is spared by the pruning under way; a later one's mark sees the commit.
        drop(planning);
        for (build, status, reason) in &ended {
            tracing::info!(build, %status, ?reason, "build ended at ingest");
        }
        tracing::info!(
            builds = builds.len(),
            steps = planned.len(),
            ?loaded,
            ?looked_up,
            total = ?started.elapsed(),
            "builds planned"
        );
        Ok((!builds.is_empty()).then_some(BuildPlan {
            builds,
            steps: planned,
            available: substituted,
            snapshot,
        }))
    }
}

/// The builds of `group` whose closure verifies, with their top-level derivations, once their
/// closures are in `closure`; the others fail, saying why.
async fn verified_tops<'a>(
    client: &deadpool_postgres::Client,
    group: &'a [QueuedBuild],
    closure: &mut VerifiedClosure,
) -> Result<Vec<(&'a QueuedBuild, StorePath)>, DbError> {
    let paths: Vec<&str> = group.iter().map(|build| build.drv_path.as_str()).collect();
    let outcomes = load_closures(client, &paths, closure).await?;
    let mut tops = Vec::with_capacity(group.len());
    for (build, outcome) in group.iter().zip(outcomes) {
        match outcome {
            Ok(top) => tops.push((build, top)),
            Err(error) => refuse(client, build, &error).await?,
        }
    }
    Ok(tops)
}

/// How each build of `tops` goes on: ended already (its top built or found in a cache, or a
/// step it needs failed in an earlier build), as (build, status, reason), or planned.
async fn outcomes(
    client: &impl deadpool_postgres::GenericClient,
    tops: &[(&QueuedBuild, StorePath)],
    steps: &Steps,
    planned: &[PlannedStep],
    blocked: &Blocked,
) -> Result<(Vec<(i64, BuildStatus, Option<String>)>, Vec<PlannedBuild>), DbError> {
    let mut ended = Vec::new();
    let mut builds = Vec::new();
    let mut reasons: HashMap<StepId, String> = HashMap::new();
    for (build, top) in tops {
        let top = &steps[top];
        if top.status == StepStatus::Succeeded {
            ended.push((build.id, BuildStatus::Succeeded, None));
        } else if let Some(failed) = blocked.origin(top.id) {
            let reason = match reasons.entry(failed) {
                Entry::Occupied(known) => known.get().clone(),
                Entry::Vacant(unknown) => unknown
                    .insert(cached_failure(client, failed, planned).await?)
                    .clone(),
            };
            ended.push((build.id, BuildStatus::CachedFailure, Some(reason)));
        } else {
            builds.push(PlannedBuild {
                build: build.id,
                priority: build.priority,
                global_priority: build.global_priority,
                top: top.id,
                keep_going: build.keep_going,
            });
        }
    }
    Ok((ended, builds))
}

/// The builds of `tops` whose every input source is in the cache, where builders will
/// substitute it, with the union of their closures in dependency order; the others fail now,
/// naming the source, not each of their steps on a builder. `.drv` files are not published: the
/// Build message carries each step's derivation.
async fn with_sources<'a, 'c>(
    client: &deadpool_postgres::Client,
    cache: &BinaryCache,
    closure: &'c VerifiedClosure,
    tops: Vec<(&'a QueuedBuild, StorePath)>,
) -> Result<(Vec<(&'a QueuedBuild, StorePath)>, Vec<&'c StorePath>), DbError> {
    let all = closure.closure_of(tops.iter().map(|(_, top)| top));
    if missing_source(cache, closure, &all).is_none() {
        return Ok((tops, all));
    }
    let mut kept = Vec::with_capacity(tops.len());
    for (build, top) in tops {
        match missing_source(cache, closure, &closure.closure_of([&top])) {
            Some(error) => refuse(client, build, &error).await?,
            None => kept.push((build, top)),
        }
    }
    let all = closure.closure_of(kept.iter().map(|(_, top)| top));
    Ok((kept, all))
}

/// The first input source of `order` the cache lacks, as the error that says so.
fn missing_source(
    cache: &BinaryCache,
    closure: &VerifiedClosure,
    order: &[&StorePath],
) -> Option<CacheError> {
    order.iter().find_map(|path| {
        closure.derivations[*path]
            .input_sources
            .iter()
            .find(|source| !cache.is_published(source))
            .map(|source| CacheError::ReferenceNotPublished {
                path: (*path).clone(),
                reference: source.clone(),
            })
    })
}

/// The derivations of `order` the builds of `tops` need, in dependency order: their closures,
/// not descending below a derivation that is `done` (built, or found in a cache), whose inputs
/// nobody needs.
fn needed_derivations<'a>(
    closure: &VerifiedClosure,
    order: &[&'a StorePath],
    tops: impl IntoIterator<Item = &'a StorePath>,
    done: impl Fn(&StorePath) -> bool,
) -> Vec<&'a StorePath> {
    let mut needed: HashSet<&StorePath> = HashSet::new();
    let mut pending: Vec<&StorePath> = tops.into_iter().collect();
    while let Some(path) = pending.pop() {
        if !needed.insert(path) || done(path) {
            continue;
        }
        if let Some(verified) = closure.derivations.get(path) {
            pending.extend(&verified.inputs);
        }
    }
    order
        .iter()
        .copied()
        .filter(|path| needed.contains(path))
        .collect()
}

/// What the steps of `needed` are created from.
fn step_specs(closure: &VerifiedClosure, needed: &[&StorePath]) -> Vec<StepSpec> {
    // Its dispatch and the builder's spans continue the plan's trace.
    let trace_parent = drover_daemon::traces::traceparent(&tracing::Span::current());
    needed
        .iter()
        .map(|path| {
            let verified = &closure.derivations[*path];
            StepSpec {
                drv_path: path.to_absolute(),
                system: verified.system.clone(),
                features: verified
                    .features
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" "),
                trace_parent: trace_parent.clone(),
            }
        })
        .collect()
}

/// The edges of the steps just created, as (step, input step): a step that existed already has
/// its edges.
fn new_edges(closure: &VerifiedClosure, needed: &[&StorePath], steps: &Steps) -> Vec<(i64, i64)> {
    let mut edges = Vec::new();
    for path in needed {
        let Some(row) = steps.get(*path).filter(|row| row.created) else {
            continue;
        };
        for input in &closure.derivations[*path].inputs {
            if let Some(input) = steps.get(input) {
                edges.push((row.id, input.id));
            }
        }
    }
    edges
}

/// The planned steps that can never run because a step below them failed in an earlier build,
/// each with that failed step.
struct Blocked {
    /// Every failed step and every planned step above one, to the failed step below it.
    origins: HashMap<StepId, StepId>,
    failed: HashSet<StepId>,
}

impl Blocked {
    /// Walks up from every step recorded as failed.
    fn find(planned: &[PlannedStep]) -> Self {
        let mut dependents: HashMap<StepId, Vec<StepId>> = HashMap::new();
        for step in planned {
            for input in &step.inputs {
                dependents.entry(*input).or_default().push(step.id);
            }
        }
        let failed: HashSet<StepId> = planned
            .iter()
            .filter(|step| step.recorded_status == StepStatus::Failed)
            .map(|step| step.id)
            .collect();
        let mut origins = HashMap::new();
        for &origin in &failed {
            let mut pending = vec![origin];
            while let Some(step) = pending.pop() {
                if origins.contains_key(&step) {
                    continue;
                }
                origins.insert(step, origin);
                pending.extend(dependents.get(&step).into_iter().flatten().copied());
            }
        }
        Self { origins, failed }
    }

    /// The failed step that keeps `step` from running, if one does.
    fn origin(&self, step: StepId) -> Option<StepId> {
        self.origins.get(&step).copied()
    }

    /// Whether `step` cannot run.
    fn contains(&self, step: StepId) -> bool {
        self.origins.contains_key(&step)
    }

    /// The blocked steps that did not fail themselves: they end `dep_failed`.
    fn above_failures(&self) -> Vec<StepId> {
        self.origins
            .keys()
            .filter(|step| !self.failed.contains(step))
            .copied()
            .collect()
    }
}

/// Why a build needing `failed` is a cached failure: the step, the build it first failed and its
/// reason.
async fn cached_failure(
    client: &impl deadpool_postgres::GenericClient,
    failed: StepId,
    planned: &[PlannedStep],
) -> Result<String, DbError> {
    let (origin, reason) = queries::failure_origin(client, failed).await?;
    let drv = planned
        .iter()
        .find(|step| step.id == failed)
        .map(|step| step.spec.drv_path.to_absolute())
        .unwrap_or_default();
    let reason = reason.unwrap_or_else(|| "no reason recorded".to_owned());
    Ok(match origin {
        Some(origin) => format!("{drv} failed in build {origin}: {reason}"),
        None => format!("{drv} failed in an earlier build: {reason}"),
    })
}

/// The outputs of the steps done without building, as (step, output name, path).
fn substituted_outputs(
    closure: &VerifiedClosure,
    order: &[&StorePath],
    steps: &Steps,
    substituted: &[StepId],
) -> Vec<(StepId, String, String)> {
    order
        .iter()
        .filter_map(|path| {
            let verified = &closure.derivations[*path];
            let row = steps.get(*path)?;
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

/// The unfinished steps of a closure, inputs first, with their specs taken from `specs` or made
/// and added there. A step that ended for good in an earlier life (cancelled, dependency
/// failed) starts again with fresh counters.
fn plan_steps(
    closure: &VerifiedClosure,
    order: &[&StorePath],
    steps: &Steps,
    specs: &mut HashMap<StorePath, Arc<drover_scheduler::StepSpec>>,
) -> Vec<PlannedStep> {
    let mut planned = Vec::new();
    for path in order {
        let row = &steps[*path];
        if row.status == StepStatus::Succeeded {
            continue;
        }
        let verified = &closure.derivations[*path];
        let inputs: Vec<StepId> = verified
            .inputs
            .iter()
            .filter_map(|input| steps.get(input))
            .filter(|input| input.status != StepStatus::Succeeded)
            .map(|input| input.id)
            .collect();
        let spec = specs
            .entry((*path).clone())
            .or_insert_with(|| {
                Arc::new(drover_scheduler::StepSpec {
                    drv_path: (*path).clone(),
                    outputs: verified.outputs.clone(),
                    requirements: Requirements {
                        system: verified.system.clone(),
                        features: verified.features.clone(),
                    },
                    input_paths: verified
                        .input_sources
                        .iter()
                        .chain(&verified.input_outputs)
                        .cloned()
                        .collect(),
                    fixed: verified.fixed,
                })
            })
            .clone();
        let fresh = row.status.is_terminal();
        planned.push(PlannedStep {
            id: row.id,
            spec,
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
fn mark_available_steps(available: &BTreeSet<String>, steps: &mut Steps) -> Vec<StepId> {
    let mut substituted = Vec::new();
    for row in steps.values_mut() {
        let finished = matches!(row.status, StepStatus::Succeeded | StepStatus::Failed);
        if !finished && available.contains(&row.drv_path) {
            row.status = StepStatus::Succeeded;
            substituted.push(row.id);
        }
    }
    substituted
}
