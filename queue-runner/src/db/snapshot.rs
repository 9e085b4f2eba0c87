//! Which transactions a read saw committed: PostgreSQL's snapshot of a repeatable-read
//! transaction (`pg_current_snapshot()`). A Watch stream keeps the one its state was read in, and
//! skips every batch of changes committed in a transaction that snapshot already shows, so
//! nothing is sent twice and no step is seen going back.

/// The transactions a read saw committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every transaction below it had ended.
    xmin: u64,
    /// No transaction from it on had ended.
    xmax: u64,
    /// Transactions between the two still running.
    in_progress: Vec<u64>,
}

impl Snapshot {
    /// Reads `pg_current_snapshot()::text` (`xmin:xmax:xip,xip`).
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = parts
            .next()?
            .split(',')
            .filter(|xid| !xid.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        Some(Self {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Whether a read in this snapshot sees what transaction `xid` committed.
    #[must_use]
    pub fn shows(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_shows_what_ended_before_it_and_not_what_was_running() {
        let snapshot = Snapshot::parse("100:105:101,103").unwrap();
        assert!(snapshot.shows(99));
        assert!(snapshot.shows(100) && snapshot.shows(102) && snapshot.shows(104));
        assert!(!snapshot.shows(101) && !snapshot.shows(103));
        assert!(!snapshot.shows(105) && !snapshot.shows(200));
        assert_eq!(
            Snapshot::parse("7:7:"),
            Some(Snapshot {
                xmin: 7,
                xmax: 7,
                in_progress: Vec::new()
            })
        );
        assert_eq!(Snapshot::parse("7:x:"), None);
        assert!(
            !Snapshot::default().shows(1),
            "the empty snapshot shows nothing"
        );
    }
}
