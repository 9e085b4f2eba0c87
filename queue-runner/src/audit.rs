//! Audit lines: who was refused, and why. Each refused RPC (caller, method, reason) and each
//! refused TLS handshake (peer address, reason) is logged once, at WARN with target
//! `drover_audit`, through one rate limit for the whole process: a burst of lines, then a
//! steady rate, so a flood of refusals cannot fill the disk. How many lines were left out is said
//! on the next line that gets through.

use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines logged at once before the rate applies.
const BURST: u32 = 20;

/// After a burst, one line per this interval.
const INTERVAL: Duration = Duration::from_millis(100);

/// The process's one limit: refusals come from every listener and connection.
static LIMIT: LazyLock<Mutex<RateLimit>> =
    LazyLock::new(|| Mutex::new(RateLimit::new(Instant::now())));

/// Logs a refused RPC.
pub fn refused_rpc(caller: &str, method: &str, reason: &str) {
    if let Some(left_out) = admit() {
        tracing::warn!(target: "drover_audit", %caller, %method, %reason, left_out, "refused an RPC");
    }
}

/// Logs a refused TLS handshake.
pub fn refused_handshake(peer: Option<SocketAddr>, reason: &str) {
    if let Some(left_out) = admit() {
        let peer = peer.map_or_else(|| "unknown".to_owned(), |peer| peer.to_string());
        tracing::warn!(target: "drover_audit", %peer, %reason, left_out, "refused a TLS handshake");
    }
}

/// Whether a line may be logged now; if so, how many were left out before it.
fn admit() -> Option<u64> {
    LIMIT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .admit(Instant::now())
}

/// A token bucket of [`BURST`] lines refilled one per [`INTERVAL`], counting what it refuses.
#[derive(Debug)]
struct RateLimit {
    tokens: u32,
    refilled: Instant,
    left_out: u64,
}

impl RateLimit {
    const fn new(now: Instant) -> Self {
        Self {
            tokens: BURST,
            refilled: now,
            left_out: 0,
        }
    }

    /// Takes a token at `now`: `Some(lines left out since the last admitted one)`, or `None`.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let earned = now.saturating_duration_since(self.refilled).as_nanos() / INTERVAL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.refilled = now;
        }
        if self.tokens == 0 {
            self.left_out += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_a_burst_then_a_steady_rate_and_the_gap_is_counted() {
        let start = Instant::now();
        let mut limit = RateLimit::new(start);
        let admitted = (0..1000).filter(|_| limit.admit(start).is_some()).count();
        assert_eq!(
            admitted, BURST as usize,
            "a burst, then nothing at the same instant"
        );
        assert_eq!(
            limit.admit(start + INTERVAL),
            Some(1000 - u64::from(BURST)),
            "the next line says how many were left out"
        );
        assert_eq!(limit.admit(start + INTERVAL), None);
        // A quiet spell refills the bucket, but never beyond one burst.
        let later = start + INTERVAL * 1000;
        let admitted = (0..1000).filter(|_| limit.admit(later).is_some()).count();
        assert_eq!(admitted, BURST as usize);
    }
}
