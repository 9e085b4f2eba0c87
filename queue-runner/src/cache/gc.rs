//! Garbage collection of the cache directory: list every narinfo, let the core
//! ([`drover_scheduler::retention`]) mark what the roots and young paths need, then delete the
//! rest in small batches, narinfos first (flushed) and NAR files after, so a client never finds
//! a narinfo whose NAR is gone. Blocking file-system work: run it on a blocking thread.
//!
//! A path published after the sweep began, or found published by ingest or a publisher while
//! it runs ([`super::marks`]), stays with its closure. One sweep at a time.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_scheduler::retention::{self, CachedPath, Marked, Root, RootKind};
use nix_primitives::StorePath;
use nix_primitives::narinfo::NarInfo;

use super::marks::Touched;
use super::{BinaryCache, CacheError};

/// Paths deleted while the sweep's lock is held, at most: short enough that a lookup waits
/// milliseconds.
const BATCH: usize = 256;

/// A build's paths as the database names them.
#[derive(Debug, Clone)]
pub struct RootPaths {
    /// The build (`None`: every live build).
    pub build: Option<i64>,
    /// Why it is a root.
    pub kind: RootKind,
    /// When it finished, seconds since the epoch.
    pub finished_at: Option<i64>,
    /// Store paths it needs (absolute); those not in the cache are ignored.
    pub paths: Vec<String>,
}

/// One narinfo of the cache.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its path.
    pub path: StorePath,
    /// Its NAR file, relative to the cache.
    pub url: String,
    /// What it refers to.
    pub references: Vec<StorePath>,
    /// Its NAR file's size.
    pub bytes: u64,
    /// When its narinfo appeared (the inode's change time: a rename into place sets it).
    pub published: SystemTime,
}

/// What a sweep decided.
#[derive(Debug)]
pub struct Plan {
    /// The cache as listed.
    pub listed: Vec<Listed>,
    /// What stays.
    pub marked: Marked,
    /// Roots given.
    pub roots: usize,
}

impl Plan {
    /// The paths that go, with their sizes.
    pub fn doomed(&self) -> impl Iterator<Item = &Listed> {
        self.listed
            .iter()
            .zip(&self.marked.keep)
            .filter(|(_, keep)| !**keep)
            .map(|(listed, _)| listed)
    }
}

/// What a sweep deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Narinfos deleted.
    pub paths: u64,
    /// NAR bytes deleted.
    pub bytes: u64,
}

/// Reads every narinfo of the cache in `directory`. A narinfo that cannot be read is kept and
/// logged: GC never deletes what it does not understand.
pub fn list(directory: &Path) -> Result<Vec<Listed>, CacheError> {
    let mut listed = Vec::new();
    for entry in fs_err::read_dir(directory).map_err(CacheError::Io)? {
        let entry = entry.map_err(CacheError::Io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|name| name.ends_with(".narinfo")) else {
            continue;
        };
        let published = match entry.metadata() {
            Ok(metadata) => UNIX_EPOCH + Duration::from_secs(metadata.ctime().unsigned_abs()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(CacheError::Io(error)),
        };
        let text = match fs_err::read_to_string(entry.path()) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(CacheError::Io(error)),
        };
        match NarInfo::parse(&text) {
            Ok(info) => listed.push(Listed {
                bytes: info.file_size.unwrap_or(info.nar_size),
                url: info.url,
                references: info.references.into_iter().collect(),
                path: info.store_path,
                published,
            }),
            Err(error) => tracing::warn!(file = name, %error, "narinfo kept: it cannot be read"),
        }
    }
    Ok(listed)
}

/// Marks what stays: the closure of `roots` and of every path published within `grace` of
/// `started` (or after it), and under `max_bytes`, the newest roots that fit.
#[must_use]
pub fn plan(
    listed: Vec<Listed>,
    roots: &[RootPaths],
    started: SystemTime,
    grace: Duration,
    max_bytes: Option<u64>,
) -> Plan {
    let index: HashMap<&StorePath, usize> = listed
        .iter()
        .enumerate()
        .map(|(at, listed)| (&listed.path, at))
        .collect();
    let young_after = started.checked_sub(grace).unwrap_or(UNIX_EPOCH);
    let paths: Vec<CachedPath> = listed
        .iter()
        .map(|listed| CachedPath {
            bytes: listed.bytes,
            references: listed
                .references
                .iter()
                .filter_map(|reference| index.get(reference).copied())
                .collect(),
            young: listed.published >= young_after,
        })
        .collect();
    let core_roots: Vec<Root> = roots
        .iter()
        .map(|root| Root {
            build: root.build,
            kind: root.kind,
            finished_at: root.finished_at,
            paths: root
                .paths
                .iter()
                .filter_map(|path| StorePath::from_absolute(path).ok())
                .filter_map(|path| index.get(&path).copied())
                .collect(),
        })
        .collect();
    let marked = retention::mark(&paths, &core_roots, max_bytes);
    drop(index);
    Plan {
        listed,
        marked,
        roots: roots.len(),
    }
}

/// Deletes what `plan` does not keep, less what was looked up or published meanwhile.
pub fn sweep(cache: &BinaryCache, plan: &mut Plan) -> Result<Swept, CacheError> {
    let index: HashMap<StorePath, usize> = plan
        .listed
        .iter()
        .enumerate()
        .map(|(at, listed)| (listed.path.clone(), at))
        .collect();
    let doomed: Vec<usize> = (0..plan.listed.len())
        .filter(|&at| !plan.marked.keep[at])
        .collect();
    let mut deleted = Vec::new();
    for batch in doomed.chunks(BATCH) {
        let (_held, noted) = cache.marks().hold();
        protect(cache, plan, &index, &noted)?;
        for &at in batch {
            if plan.marked.keep[at] {
                continue;
            }
            remove(&cache.narinfo_file(&plan.listed[at].path))?;
            deleted.push(at);
        }
    }
    cache.flush()?;
    let kept_nars: HashSet<&str> = (0..plan.listed.len())
        .filter(|&at| plan.marked.keep[at])
        .map(|at| plan.listed[at].url.as_str())
        .collect();
    let mut orphaned: Vec<(&str, u64)> = deleted
        .iter()
        .map(|&at| (plan.listed[at].url.as_str(), plan.listed[at].bytes))
        .filter(|(url, _)| !kept_nars.contains(url))
        .collect();
    orphaned.sort_unstable();
    orphaned.dedup_by_key(|(url, _)| *url);
    let mut swept = Swept {
        paths: u64::try_from(deleted.len()).unwrap_or(u64::MAX),
        bytes: 0,
    };
    let mut placed = HashSet::new();
    for batch in orphaned.chunks(BATCH) {
        let (_held, noted) = cache.marks().hold();
        placed.extend(noted.nars);
        for (url, bytes) in batch {
            if !placed.contains(*url) {
                remove(&cache.directory().join(url))?;
                swept.bytes += bytes;
            }
        }
    }
    Ok(swept)
}

/// Keeps every path noted since the last batch, with its closure: read from the listing, or
/// from its narinfo for a path published after the listing.
fn protect(
    cache: &BinaryCache,
    plan: &mut Plan,
    index: &HashMap<StorePath, usize>,
    noted: &Touched,
) -> Result<(), CacheError> {
    let mut pending: Vec<StorePath> = noted.paths.iter().cloned().collect();
    let mut seen = HashSet::new();
    while let Some(path) = pending.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        match index.get(&path) {
            Some(&at) if plan.marked.keep[at] => {}
            Some(&at) => {
                plan.marked.keep[at] = true;
                plan.marked.kept_bytes += plan.listed[at].bytes;
                pending.extend(plan.listed[at].references.iter().cloned());
            }
            None => {
                if let Ok(text) = fs_err::read_to_string(cache.narinfo_file(&path)) {
                    let info = NarInfo::parse(&text).map_err(CacheError::NarInfo)?;
                    pending.extend(info.references);
                }
            }
        }
    }
    Ok(())
}

/// Deletes a file that may be gone already.
fn remove(file: &Path) -> Result<(), CacheError> {
    match fs_err::remove_file(file) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(CacheError::Io(error)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "a panic in a test is a failed assertion"
    )]

    use std::collections::BTreeSet;

    use nix_primitives::nar::write_file_nar;
    use nix_primitives::signing::SecretKey;
    use nix_primitives::{ContentAddress, Hash};

    use super::*;
    use crate::cache::upstream::Upstreams;

    /// Publishes a `builtins.toFile`-like text referring to `references`; returns its path.
    fn text(cache: &BinaryCache, name: &str, references: &[&StorePath]) -> StorePath {
        let references: BTreeSet<StorePath> = references.iter().map(|&path| path.clone()).collect();
        let contents = format!("{name} {references:?}");
        let path = ContentAddress::Text(Hash::sha256(contents.as_bytes()))
            .store_path(name, &references, false)
            .unwrap();
        let mut nar = Vec::new();
        write_file_nar(contents.as_bytes(), false, &mut nar).unwrap();
        cache.publish_source(&path, references, &nar).unwrap();
        path
    }

    fn open() -> (tempfile::TempDir, BinaryCache) {
        let directory = tempfile::tempdir().unwrap();
        let key = SecretKey::generate("gc-test-1").unwrap();
        let cache = BinaryCache::open(directory.path(), key, Upstreams::new(Vec::new())).unwrap();
        (directory, cache)
    }

    fn nar_files(cache: &BinaryCache) -> usize {
        fs_err::read_dir(cache.directory().join("nar"))
            .unwrap()
            .count()
    }

    #[test]
    fn a_path_looked_up_during_the_sweep_stays_with_its_closure() {
        let (_directory, cache) = open();
        let leaf = text(&cache, "leaf", &[]);
        let middle = text(&cache, "middle", &[&leaf]);
        let top = text(&cache, "top", &[&middle]);
        let lone = text(&cache, "lone", &[]);
        // Marked as if nothing were young or rooted: everything is doomed.
        let later = SystemTime::now() + Duration::from_hours(1);
        cache.marks().begin();
        let mut marked = plan(
            list(cache.directory()).unwrap(),
            &[],
            later,
            Duration::ZERO,
            None,
        );
        assert_eq!(marked.doomed().count(), 4);
        // Ingest finds `top` published between the marking and the deletion.
        assert!(cache.is_published(&top));
        let swept = sweep(&cache, &mut marked).unwrap();
        cache.marks().end();
        assert_eq!(swept.paths, 1);
        for kept in [&top, &middle, &leaf] {
            assert!(cache.is_published(kept), "{kept} was deleted");
        }
        assert!(!cache.is_published(&lone));
        assert_eq!(
            nar_files(&cache),
            3,
            "the lone path's NAR went with its narinfo"
        );
    }

    #[test]
    fn roots_and_young_paths_stay_and_the_rest_goes_narinfo_and_nar() {
        let (_directory, cache) = open();
        let leaf = text(&cache, "leaf", &[]);
        let rooted = text(&cache, "rooted", &[&leaf]);
        let gone = text(&cache, "gone", &[&leaf]);
        let roots = [RootPaths {
            build: Some(1),
            kind: RootKind::Recent,
            finished_at: Some(1),
            paths: vec![rooted.to_absolute()],
        }];
        let later = SystemTime::now() + Duration::from_hours(1);
        let mut marked = plan(
            list(cache.directory()).unwrap(),
            &roots,
            later,
            Duration::ZERO,
            None,
        );
        assert_eq!(sweep(&cache, &mut marked).unwrap().paths, 1);
        assert!(cache.is_published(&rooted) && cache.is_published(&leaf));
        assert!(!cache.is_published(&gone));
        assert_eq!(nar_files(&cache), 2);

        // Published now, within an hour's grace: young, so it stays.
        let fresh = text(&cache, "fresh", &[]);
        let mut marked = plan(
            list(cache.directory()).unwrap(),
            &[],
            SystemTime::now(),
            Duration::from_hours(1),
            None,
        );
        assert_eq!(sweep(&cache, &mut marked).unwrap().paths, 0);
        assert!(cache.is_published(&fresh));
    }
}
