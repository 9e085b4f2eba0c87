//! One step the runner gave this builder, as executors, uploads and the running jobs see it:
//! the wire's `Build` message decoded once, its limits as durations and byte counts. It sits
//! below everything that runs a step, so none of them needs the tunnel.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_proto::v1::Build;

/// One step the runner gave this builder.
#[derive(Debug, Clone)]
pub struct Job {
    /// The attempt id to quote.
    pub attempt_id: String,
    /// The derivation.
    pub drv_path: String,
    /// Its text.
    pub drv_text: Vec<u8>,
    /// Its outputs, name to path.
    pub outputs: BTreeMap<String, String>,
    /// The paths the build reads, to substitute first.
    pub input_paths: Vec<String>,
    /// The most log bytes to keep.
    pub max_log_bytes: u64,
    /// Longest the build may run.
    pub timeout: Option<Duration>,
    /// Longest the build may print nothing.
    pub max_silent: Option<Duration>,
    /// The largest NAR an output may have.
    pub max_output_bytes: u64,
    /// The trace context of its dispatch (W3C `traceparent`), empty if none.
    pub traceparent: String,
}

impl From<Build> for Job {
    /// A step as the runner sent it; a limit of 0, or none sent, is no limit.
    fn from(build: Build) -> Self {
        let limits = build.limits.unwrap_or_default();
        let bytes = |limit: u64| if limit == 0 { u64::MAX } else { limit };
        let duration =
            |milliseconds: u64| (milliseconds > 0).then(|| Duration::from_millis(milliseconds));
        Self {
            attempt_id: build.attempt_id,
            drv_path: build.drv_path,
            drv_text: build.drv_text,
            outputs: build.outputs.into_iter().collect(),
            input_paths: build.input_paths,
            max_log_bytes: bytes(limits.max_log_bytes),
            timeout: duration(limits.timeout_ms),
            max_silent: duration(limits.max_silent_ms),
            max_output_bytes: bytes(limits.max_output_bytes),
            traceparent: build.traceparent,
        }
    }
}

#[cfg(test)]
mod tests {
    use drover_proto::v1::BuildLimits;

    use super::*;

    #[test]
    fn zero_limits_are_no_limits() {
        let job = Job::from(Build {
            limits: Some(BuildLimits::default()),
            ..Build::default()
        });
        assert_eq!(job.timeout, None);
        assert_eq!(job.max_silent, None);
        assert_eq!(job.max_log_bytes, u64::MAX);
        assert_eq!(job.max_output_bytes, u64::MAX);
    }

    #[test]
    fn limits_are_carried_over_in_their_units() {
        let job = Job::from(Build {
            attempt_id: "a".to_owned(),
            outputs: [("out".to_owned(), "/nix/store/x-out".to_owned())].into(),
            limits: Some(BuildLimits {
                timeout_ms: 1_500,
                max_silent_ms: 200,
                max_log_bytes: 4_096,
                max_output_bytes: 1 << 20,
            }),
            ..Build::default()
        });
        assert_eq!(job.attempt_id, "a");
        assert_eq!(job.outputs["out"], "/nix/store/x-out");
        assert_eq!(job.timeout, Some(Duration::from_millis(1_500)));
        assert_eq!(job.max_silent, Some(Duration::from_millis(200)));
        assert_eq!(job.max_log_bytes, 4_096);
        assert_eq!(job.max_output_bytes, 1 << 20);
    }
}
