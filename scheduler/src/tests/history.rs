//! Which finished builds' rows pruning removes: only old ones nothing else keeps.

use proptest::prelude::*;

use crate::history::{FinishedBuild, HistoryPolicy, retired};

const DAY: i64 = 86_400;
const NOW: i64 = 1_000 * DAY;

fn build(id: i64, days_ago: i64) -> FinishedBuild {
    FinishedBuild {
        id,
        finished_at: NOW - days_ago * DAY,
        pinned: false,
        newest_of_key: false,
    }
}

const POLICY: HistoryPolicy = HistoryPolicy {
    keep_days: 90,
    cache_keep_days: 30,
};

#[test]
fn only_builds_past_the_days_kept_go() {
    let builds = [build(1, 91), build(2, 89), build(3, 90)];
    assert_eq!(retired(&builds, &POLICY, NOW), vec![1]);
}

#[test]
fn pinned_builds_and_the_newest_of_a_key_stay_whatever_their_age() {
    let pinned = FinishedBuild {
        pinned: true,
        ..build(1, 400)
    };
    let newest = FinishedBuild {
        newest_of_key: true,
        ..build(2, 400)
    };
    assert!(retired(&[pinned, newest], &POLICY, NOW).is_empty());
}

#[test]
fn rows_stay_while_the_cache_keeps_the_outputs() {
    let policy = HistoryPolicy {
        keep_days: 7,
        cache_keep_days: 30,
    };
    let builds = [build(1, 20), build(2, 31)];
    assert_eq!(retired(&builds, &policy, NOW), vec![2]);
}

proptest! {
    #[test]
    fn nothing_kept_for_any_reason_goes(
        builds in prop::collection::vec((0_i64..400, any::<bool>(), any::<bool>()), 0..50),
        keep_days in 0_u32..200,
        cache_keep_days in 0_u32..200,
    ) {
        let builds: Vec<FinishedBuild> = builds
            .iter()
            .enumerate()
            .map(|(id, &(days_ago, pinned, newest_of_key))| FinishedBuild {
                pinned,
                newest_of_key,
                ..build(i64::try_from(id).unwrap_or(i64::MAX), days_ago)
            })
            .collect();
        let policy = HistoryPolicy { keep_days, cache_keep_days };
        let gone = retired(&builds, &policy, NOW);
        let oldest_kept = i64::from(keep_days.max(cache_keep_days)) * DAY;
        for build in &builds {
            let goes = gone.contains(&build.id);
            let old = NOW - build.finished_at > oldest_kept;
            prop_assert_eq!(goes, old && !build.pinned && !build.newest_of_key);
        }
    }
}
