//! Ingest: expanding queued builds into steps. Durable, not payload-driven: builds waiting for the
//! runner are the rows with `ingested_at IS NULL`, and the runner drains them on every wake-up
//! (NOTIFY on a dedicated LISTEN connection) and every (re)connect, so nothing queued while the
//! runner was down or disconnected is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use error_context::{ResultExt as _, WithContext};
use futures_util::StreamExt as _;
use nix_primitives::{
    ContentAddress, Derivation, DerivationOutput, Hash, IngestionMethod, StorePath,
};
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::SchedulerError;
use super::graph::{NewStep, Requirements, StepGraph, StepId};
use crate::cache::{BinaryCache, CacheError, Publication};
use crate::db::queries::{self, BuildSelection, QueuedBuild, StepSpec};
use crate::db::{DbError, Pool};
use crate::verify::{self, VerifiedClosure, VerifyError};

/// The channel the builds trigger notifies.
pub const CHANNEL: &str = "drover_builds_queued";

/// Builds expanded per query.
const BATCH: i64 = 200;

/// Consecutive failed (re)connections of the LISTEN connection before the database counts as
/// lost, which is fatal.
const LISTEN_RECONNECTS: u32 = 5;

/// Keeps a dedicated connection listening on [`CHANNEL`] and wakes the scheduler on every
/// notification and after every (re)connect.
pub async fn listen(
    url: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<(), WithContext<DbError>> {
    let mut failures = 0;
    loop {
        match listen_once(&url, &wake, &shutdown, &mut failures).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                failures += 1;
                if failures >= LISTEN_RECONNECTS {
                    return Err(error).context("the LISTEN connection failed repeatedly");
                }
                tracing::warn!(error = %error.report(), "LISTEN connection lost; reconnecting");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_millis(200 << failures)) => {}
                }
            }
        }
    }
}

/// One LISTEN connection's life; `Ok` only on shutdown. A connection that subscribed resets
/// the count of consecutive failures.
async fn listen_once(
    url: &str,
    wake: &Notify,
    shutdown: &CancellationToken,
    failures: &mut u32,
) -> Result<(), WithContext<DbError>> {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(DbError::query("opening the LISTEN connection"))?;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {CHANNEL}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    loop {
        tokio::select! {
            result = &mut listen => {
                result.map_err(DbError::query("subscribing to build notifications"))?;
                break;
            }
            message = messages.next() => handle_message(message, wake)?,
        }
    }
    *failures = 0;
    wake.notify_one();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = messages.next() => handle_message(message, wake)?,
        }
    }
}

fn handle_message(
    message: Option<Result<AsyncMessage, tokio_postgres::Error>>,
    wake: &Notify,
) -> Result<(), WithContext<DbError>> {
    match message {
        Some(Ok(AsyncMessage::Notification(_))) => {
            wake.notify_one();
            Ok(())
        }
        Some(Ok(_)) => Ok(()),
        Some(Err(source)) => Err(DbError::Query {
            what: "receiving notifications",
            source,
        }
        .into()),
        None => Err(DbError::ConnectionClosed("the LISTEN connection").into()),
    }
}

/// Expands every build `selection` names into the graph; returns how many builds were handled.
pub async fn drain(
    pool: &Pool,
    graph: &mut StepGraph,
    cache: &Arc<BinaryCache>,
    selection: BuildSelection,
) -> Result<usize, WithContext<SchedulerError>> {
    let mut client = pool
        .get()
        .await
        .map_err(|error| SchedulerError::from(DbError::Connection(error)))?;
    let mut after = 0;
    let mut handled = 0;
    loop {
        let builds = queries::queued_builds(&client, selection, after, BATCH)
            .await
            .map_err(SchedulerError::from)?;
        let Some(last) = builds.last() else {
            return Ok(handled);
        };
        after = last.id;
        for build in builds {
            expand(&mut client, graph, cache, &build)
                .await
                .with_context(|| format!("expanding build {}", build.id))?;
            handled += 1;
        }
    }
}

/// Loads and verifies a build's closure, creates or finds its steps, and adds it to the graph.
/// A closure that does not verify fails the build, with the reason stored.
async fn expand(
    client: &mut deadpool_postgres::Client,
    graph: &mut StepGraph,
    cache: &Arc<BinaryCache>,
    build: &QueuedBuild,
) -> Result<(), SchedulerError> {
    let closure = match load_closure(&*client, &build.drv_path).await? {
        Ok(closure) => closure,
        Err(error) => return Ok(refuse(client, build, &error).await?),
    };
    if let Err(error) = publish_derivations(cache, &closure).await? {
        return Ok(refuse(client, build, &error).await?);
    }
    let specs: Vec<StepSpec> = closure
        .order
        .iter()
        .map(|path| {
            let verified = &closure.derivations[path];
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
    let available = available_derivations(cache, &closure).await;
    let transaction = client
        .transaction()
        .await
        .map_err(DbError::query("starting an ingest transaction"))?;
    let rows = queries::ensure_steps(&transaction, &specs).await?;
    let mut steps: BTreeMap<String, (StepId, String)> = rows
        .into_iter()
        .map(|row| (row.drv_path, (row.id, row.status)))
        .collect();
    let substituted = mark_available_steps(&available, &mut steps);
    let substituted_outputs: Vec<(StepId, String, String)> = closure
        .derivations
        .iter()
        .filter_map(|(path, verified)| {
            let (id, _) = steps.get(&path.to_absolute())?;
            substituted.contains(id).then(|| {
                verified
                    .outputs
                    .iter()
                    .map(|(name, output)| (*id, name.clone(), output.to_absolute()))
                    .collect::<Vec<_>>()
            })
        })
        .flatten()
        .collect();
    queries::record_substituted_outputs(&transaction, &substituted_outputs).await?;
    let top = closure
        .order
        .last()
        .map(StorePath::to_absolute)
        .unwrap_or_default();
    let finished = cached_outcome(&closure, &steps, &top);
    if let Some((status, reason)) = finished {
        queries::finish_build(&transaction, build.id, status, reason.as_deref()).await?;
        transaction
            .commit()
            .await
            .map_err(DbError::query("committing an ingested build"))?;
        return Ok(());
    }

    let mut plan = plan_steps(&closure, &specs, &steps, graph);
    plan.statuses
        .extend(substituted.into_iter().map(|id| (id, "succeeded")));
    queries::record_ingested_build(&transaction, build.id, &plan.needed, &plan.statuses).await?;
    transaction
        .commit()
        .await
        .map_err(DbError::query("committing an ingested build"))?;
    let top_id = steps[&top].0;
    graph.add_build(
        build.id,
        build.priority,
        top_id,
        &plan.in_graph,
        plan.new_steps,
    );
    Ok(())
}

/// What a build adds to the graph.
struct Plan {
    /// Steps of the closure that are not in the graph yet.
    new_steps: Vec<NewStep>,
    /// Steps of the closure already in the graph (shared with other builds).
    in_graph: Vec<StepId>,
    /// The status each new step enters with.
    statuses: BTreeMap<StepId, &'static str>,
    /// Every unfinished step the build needs.
    needed: Vec<StepId>,
}

fn plan_steps(
    closure: &VerifiedClosure,
    specs: &[StepSpec],
    steps: &BTreeMap<String, (StepId, String)>,
    graph: &StepGraph,
) -> Plan {
    let mut plan = Plan {
        new_steps: Vec::new(),
        in_graph: Vec::new(),
        statuses: BTreeMap::new(),
        needed: Vec::new(),
    };
    for (path, spec) in closure.order.iter().zip(specs) {
        let (id, status) = &steps[&spec.drv_path];
        if status == "succeeded" {
            continue;
        }
        plan.needed.push(*id);
        if graph.contains(*id) {
            plan.in_graph.push(*id);
            continue;
        }
        let verified = &closure.derivations[path];
        let inputs: Vec<StepId> = verified
            .derivation
            .input_derivations
            .keys()
            .filter_map(|input| steps.get(&input.to_absolute()))
            .filter(|(_, status)| status != "succeeded")
            .map(|(id, _)| *id)
            .collect();
        let status = if inputs.is_empty() {
            "runnable"
        } else {
            "waiting"
        };
        plan.statuses.insert(*id, status);
        plan.new_steps.push(NewStep {
            id: *id,
            drv_path: path.clone(),
            drv_text: verified.text.clone(),
            outputs: verified.outputs.clone(),
            requirements: Requirements {
                system: spec.system.clone(),
                features: verified.features.clone(),
            },
            input_paths: input_paths(closure, &verified.derivation),
            fixed: fixed_output(&verified.derivation),
            inputs,
        });
    }
    plan
}

/// Refuses a queued build whose closure does not verify or cannot be published, storing why.
async fn refuse(
    client: &deadpool_postgres::Client,
    build: &QueuedBuild,
    error: &(dyn std::error::Error + Send + Sync + 'static),
) -> Result<(), DbError> {
    let reason = error_context::report(error).to_string();
    tracing::warn!(build = build.id, %reason, "refusing a queued build");
    queries::finish_build(client, build.id, "failed", Some(&reason)).await
}

/// Publishes every `.drv` of the closure in the cache (inputs first), as content-addressed text,
/// so builders can substitute them. The outer error is the cache failing; the inner one a
/// derivation that cannot be published (it refers to a source nobody uploaded).
async fn publish_derivations(
    cache: &Arc<BinaryCache>,
    closure: &VerifiedClosure,
) -> Result<Result<(), CacheError>, CacheError> {
    let unpublished: Vec<(StorePath, Vec<u8>, BTreeSet<StorePath>)> = closure
        .order
        .iter()
        .filter(|path| !cache.is_published(path))
        .map(|path| {
            let verified = &closure.derivations[path];
            (
                path.clone(),
                verified.text.clone(),
                verified.derivation.references(),
            )
        })
        .collect();
    if unpublished.is_empty() {
        return Ok(Ok(()));
    }
    let cache = cache.clone();
    let published = tokio::task::spawn_blocking(move || {
        for (path, text, references) in unpublished {
            let mut nar = Vec::new();
            nix_primitives::nar::write_file_nar(&text, false, &mut nar).map_err(CacheError::Io)?;
            let publication = Publication {
                content_address: Some(ContentAddress::Text(Hash::sha256(&text))),
                store_path: path,
                references,
                upstream_references: BTreeSet::new(),
                deriver: None,
                fixed: None,
            };
            cache.publish(&publication, nar.as_slice(), &|| true)?;
        }
        Ok(())
    })
    .await
    .map_err(|error| CacheError::Io(std::io::Error::other(error)))?;
    match published {
        Ok(()) => Ok(Ok(())),
        Err(error @ CacheError::ReferenceNotPublished { .. }) => Ok(Err(error)),
        Err(error) => Err(error),
    }
}

/// The derivations of a closure whose outputs are all in the farm's cache or an upstream one:
/// looked up before the ingest transaction, which must not wait on the network.
async fn available_derivations(cache: &BinaryCache, closure: &VerifiedClosure) -> BTreeSet<String> {
    let mut available = BTreeSet::new();
    for (path, verified) in &closure.derivations {
        let mut all = true;
        for output in verified.outputs.values() {
            if !cache.is_available(output).await {
                all = false;
                break;
            }
        }
        if all {
            available.insert(path.to_absolute());
        }
    }
    available
}

/// Unfinished steps whose outputs are all available are done without building: marks them
/// succeeded in `steps` and returns their ids.
fn mark_available_steps(
    available: &BTreeSet<String>,
    steps: &mut BTreeMap<String, (StepId, String)>,
) -> Vec<StepId> {
    let mut substituted = Vec::new();
    for (path, (id, status)) in steps.iter_mut() {
        let finished = matches!(status.as_str(), "succeeded" | "failed");
        if !finished && available.contains(path) {
            "succeeded".clone_into(status);
            substituted.push(*id);
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

/// A build whose closure holds a step that already failed fails at once, and one whose
/// top-level step already succeeded succeeds at once: the terminal status and reason, if so.
fn cached_outcome(
    closure: &VerifiedClosure,
    steps: &BTreeMap<String, (StepId, String)>,
    top: &str,
) -> Option<(&'static str, Option<String>)> {
    let failed = closure.order.iter().find(|path| {
        let (_, status) = &steps[&path.to_absolute()];
        status == "failed"
    });
    if let Some(failed) = failed {
        let status = if failed.to_absolute() == top {
            "failed"
        } else {
            "dep_failed"
        };
        Some((status, Some(format!("{failed} failed in an earlier build"))))
    } else if steps[top].1 == "succeeded" {
        Some(("succeeded", None))
    } else {
        None
    }
}

/// Reads the closure of `top` from the `derivations` table and verifies it. The outer error is
/// the database's; the inner one says why the closure is refused.
pub async fn load_closure(
    client: &impl deadpool_postgres::GenericClient,
    top: &str,
) -> Result<Result<VerifiedClosure, VerifyError>, DbError> {
    let top = match verify::parse_path(top) {
        Ok(top) => top,
        Err(error) => return Ok(Err(error)),
    };
    let mut parsed = BTreeMap::new();
    if let Err(error) = complete_closure(client, &top, &mut parsed).await? {
        return Ok(Err(error));
    }
    Ok(verify::verify_closure(&top, &parsed))
}

/// Adds to `parsed` every derivation of the closure of `top` that it lacks, from the database,
/// breadth-first with one query per level.
pub async fn complete_closure(
    client: &impl deadpool_postgres::GenericClient,
    top: &StorePath,
    parsed: &mut BTreeMap<StorePath, (Vec<u8>, Derivation)>,
) -> Result<Result<(), VerifyError>, DbError> {
    let mut seen: BTreeSet<StorePath> = BTreeSet::from([top.clone()]);
    let mut frontier = vec![top.clone()];
    while !frontier.is_empty() {
        let wanted: Vec<String> = frontier
            .iter()
            .filter(|path| !parsed.contains_key(*path))
            .map(StorePath::to_absolute)
            .collect();
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
