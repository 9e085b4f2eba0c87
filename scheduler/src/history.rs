//! Which finished builds' rows go when history is pruned: a build leaves the database once it
//! is past the days its rows are kept and nothing else keeps it: not pinned, not among the
//! newest builds of its key, and not within the days the cache keeps outputs (so pruning rows
//! never shortens what the cache keeps). Live builds are never offered. Plain data: times in
//! seconds since the epoch.

/// A finished build, as pruning sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishedBuild {
    /// Build id.
    pub id: i64,
    /// When it finished.
    pub finished_at: i64,
    /// Pinned by an admin.
    pub pinned: bool,
    /// Among the newest succeeded builds of its value of the cache's key.
    pub newest_of_key: bool,
}

/// How long finished builds are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Days a finished build's rows are kept (`history.keep_days`).
    pub keep_days: u32,
    /// Days the cache keeps a finished build's outputs (`gc.keep_days`).
    pub cache_keep_days: u32,
}

impl HistoryPolicy {
    /// The moment before which a build finished is old enough to go, given `now`.
    #[must_use]
    pub fn cutoff(&self, now: i64) -> i64 {
        let days = i64::from(self.keep_days.max(self.cache_keep_days));
        now.saturating_sub(days.saturating_mul(86_400))
    }
}

/// The builds of `builds` whose rows go, at `now`.
#[must_use]
pub fn retired(builds: &[FinishedBuild], policy: &HistoryPolicy, now: i64) -> Vec<i64> {
    let cutoff = policy.cutoff(now);
    builds
        .iter()
        .filter(|build| build.finished_at < cutoff && !build.pinned && !build.newest_of_key)
        .map(|build| build.id)
        .collect()
}
