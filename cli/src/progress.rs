//! What `drover submit --watch` shows while builds run: for each build, its steps done out of
//! all, the running steps with their builders, and the time since the watch began. On a
//! terminal it is one line rewritten in place; otherwise a plain line each time something
//! other than the clock changed, so logs of CI jobs stay readable.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use drover_proto::v1::{GetResponse, StepStatus};

/// Running steps named on the line, at most.
const RUNNING_SHOWN: usize = 3;

/// The progress display.
pub struct Progress<W: Write> {
    out: W,
    terminal: bool,
    /// The last line shown for each build, without its clock.
    last: HashMap<i64, String>,
    /// Whether a line is on screen (terminal only).
    drawn: bool,
}

impl Progress<std::io::Stderr> {
    /// Progress on stderr, redrawn in place if stderr is a terminal.
    #[must_use]
    pub fn on_stderr() -> Self {
        use std::io::IsTerminal as _;
        let out = std::io::stderr();
        let terminal = out.is_terminal();
        Self::new(out, terminal)
    }
}

impl<W: Write> Progress<W> {
    /// Progress written to `out`, redrawn in place when `terminal`.
    pub fn new(out: W, terminal: bool) -> Self {
        Self {
            out,
            terminal,
            last: HashMap::new(),
            drawn: false,
        }
    }

    /// Shows a build that has not ended, `elapsed` into the watch.
    pub fn update(&mut self, build: &GetResponse, elapsed: Duration) {
        let line = summary(build);
        let changed = self.last.get(&build.build_id) != Some(&line);
        let shown = format!("{line} [{} s]", elapsed.as_secs());
        // Progress is a courtesy: a closed stderr must not fail the watch.
        let _ = if self.terminal {
            self.drawn = true;
            write!(self.out, "\r\x1b[2K{shown}").and_then(|()| self.out.flush())
        } else if changed {
            writeln!(self.out, "{shown}")
        } else {
            Ok(())
        };
        self.last.insert(build.build_id, line);
    }

    /// Clears the line drawn on a terminal, before other output.
    pub fn clear(&mut self) {
        if self.drawn {
            let _ = write!(self.out, "\r\x1b[2K").and_then(|()| self.out.flush());
            self.drawn = false;
        }
    }
}

/// A build's progress without the clock.
fn summary(build: &GetResponse) -> String {
    let done = build
        .steps
        .iter()
        .filter(|step| step.typed_status() == StepStatus::Succeeded)
        .count();
    let running: Vec<String> = build
        .steps
        .iter()
        .filter(|step| step.typed_status() == StepStatus::Running)
        .map(|step| {
            let name = step
                .drv_path
                .rsplit('/')
                .next()
                .and_then(|base| base.split_once('-'))
                .map_or(step.drv_path.as_str(), |(_, name)| name)
                .trim_end_matches(".drv");
            format!("{name} on {}", step.builder)
        })
        .collect();
    let mut line = format!(
        "build {}: {done}/{} steps done",
        build.build_id,
        build.steps.len()
    );
    if !running.is_empty() {
        let more = running.len().saturating_sub(RUNNING_SHOWN);
        line.push_str("; running: ");
        line.push_str(&running[..running.len().min(RUNNING_SHOWN)].join(", "));
        if more > 0 {
            line.push_str(" and ");
            line.push_str(&more.to_string());
            line.push_str(" more");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use drover_proto::v1::StepState;

    use super::*;

    fn build(statuses: &[(&str, &str)]) -> GetResponse {
        GetResponse {
            build_id: 7,
            steps: statuses
                .iter()
                .enumerate()
                .map(|(index, (status, builder))| StepState {
                    drv_path: format!("/nix/store/{}-step{index}.drv", "0".repeat(32)),
                    status: (*status).to_owned(),
                    step_status: StepStatus::from_label(status).into(),
                    builder: (*builder).to_owned(),
                    ..StepState::default()
                })
                .collect(),
            ..GetResponse::default()
        }
    }

    #[test]
    fn plain_output_prints_a_line_only_when_something_but_the_clock_changed() {
        let mut out = Vec::new();
        let mut progress = Progress::new(&mut out, false);
        let running = build(&[("succeeded", ""), ("running", "b1"), ("waiting", "")]);
        progress.update(&running, Duration::from_secs(1));
        progress.update(&running, Duration::from_secs(2));
        progress.update(
            &build(&[("succeeded", ""), ("succeeded", ""), ("running", "b2")]),
            Duration::from_secs(3),
        );
        progress.clear();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "build 7: 1/3 steps done; running: step1 on b1 [1 s]\n\
             build 7: 2/3 steps done; running: step2 on b2 [3 s]\n"
        );
    }

    #[test]
    fn a_terminal_gets_one_line_redrawn_in_place_and_cleared() {
        let mut out = Vec::new();
        let mut progress = Progress::new(&mut out, true);
        let running = build(&[("running", "b1")]);
        progress.update(&running, Duration::from_secs(1));
        progress.update(&running, Duration::from_secs(2));
        progress.clear();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "\r\x1b[2Kbuild 7: 0/1 steps done; running: step0 on b1 [1 s]\
             \r\x1b[2Kbuild 7: 0/1 steps done; running: step0 on b1 [2 s]\r\x1b[2K"
        );
        assert!(!text.contains('\n'));
    }
}
