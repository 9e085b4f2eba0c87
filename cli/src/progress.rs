//! What `drover submit --watch` and `drover watch` show while builds run: for each build, its
//! steps done out of all (once it is planned), the running steps with their builders, and the
//! time since the watch began. On a terminal it is a block of one line per build, each cut to
//! the terminal's width, redrawn in place; otherwise a plain line each time something other than
//! the clock changed, so logs of CI jobs stay readable.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::Duration;

use drover_proto::v1::{BuildPhase, GetResponse, StepStatus};

use crate::inspect::derivation_name;

/// Running steps named on a line, at most.
const RUNNING_SHOWN: usize = 3;

/// The width assumed when a terminal does not say its own.
const DEFAULT_WIDTH: usize = 80;

/// The progress display.
pub struct Progress<W: Write> {
    out: W,
    /// The terminal's width, when drawing on one.
    terminal: Option<usize>,
    /// The last line shown for each build, without its clock.
    last: HashMap<i64, String>,
    /// The lines of the block, by build (terminal only).
    lines: BTreeMap<i64, String>,
    /// How many lines of the block are on screen (terminal only).
    drawn: usize,
}

impl Progress<std::io::Stderr> {
    /// Progress on stderr, redrawn in place if stderr is a terminal.
    #[must_use]
    pub fn on_stderr() -> Self {
        use std::io::IsTerminal as _;
        let out = std::io::stderr();
        let width = out.is_terminal().then(|| {
            rustix::termios::tcgetwinsize(&out)
                .ok()
                .map(|size| usize::from(size.ws_col))
                .filter(|columns| *columns > 0)
                .unwrap_or(DEFAULT_WIDTH)
        });
        Self::new(out, width)
    }
}

impl<W: Write> Progress<W> {
    /// Progress written to `out`, redrawn in place on a terminal `width` columns wide.
    pub fn new(out: W, width: Option<usize>) -> Self {
        Self {
            out,
            terminal: width,
            last: HashMap::new(),
            lines: BTreeMap::new(),
            drawn: 0,
        }
    }

    /// Shows a build that has not ended, `elapsed` into the watch.
    pub fn update(&mut self, build: &GetResponse, elapsed: Duration) {
        let line = summary(build);
        let changed = self.last.get(&build.build_id) != Some(&line);
        let clock = clock(elapsed, build.estimated_end_ms, crate::times::now_ms());
        if let Some(width) = self.terminal {
            // The line is cut, not its clock.
            let room = width.saturating_sub(clock.chars().count());
            self.lines
                .insert(build.build_id, format!("{}{clock}", cut(&line, room)));
            self.redraw();
        } else if changed {
            // Progress is a courtesy: a closed stderr must not fail the watch.
            let _ = writeln!(self.out, "{line}{clock}");
        }
        self.last.insert(build.build_id, line);
    }

    /// Takes an ended build off the block.
    pub fn forget(&mut self, build: i64) {
        self.lines.remove(&build);
    }

    /// Clears the block drawn on a terminal, before other output.
    pub fn clear(&mut self) {
        if self.drawn > 0 {
            let _ =
                write!(self.out, "\x1b[{}A\r\x1b[J", self.drawn).and_then(|()| self.out.flush());
            self.drawn = 0;
        }
    }

    /// Draws the block again over the one on screen.
    fn redraw(&mut self) {
        let mut text = if self.drawn > 0 {
            format!("\x1b[{}A", self.drawn)
        } else {
            String::new()
        };
        for line in self.lines.values() {
            text.push_str("\r\x1b[2K");
            text.push_str(line);
            text.push('\n');
        }
        self.drawn = self.lines.len();
        let _ = self
            .out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush());
    }
}

/// The time since the watch began and, when the runner predicts the build's end, the time left
/// until then: ` [12 s, ~1m 05s left]`. A predicted end that has passed is not shown: the
/// build is taking longer than its history said.
fn clock(elapsed: Duration, estimated_end_ms: i64, now_ms: i64) -> String {
    let seconds = elapsed.as_secs();
    let left = estimated_end_ms - now_ms;
    if estimated_end_ms > 0 && left > 0 {
        format!(" [{seconds} s, ~{} left]", crate::times::duration(left))
    } else {
        format!(" [{seconds} s]")
    }
}

/// `line` cut to fit in `width` columns (one left free, so the terminal never wraps).
fn cut(line: &str, width: usize) -> String {
    let room = width.saturating_sub(1).max(1);
    if line.chars().count() <= room {
        return line.to_owned();
    }
    let mut kept: String = line.chars().take(room.saturating_sub(1)).collect();
    kept.push('…');
    kept
}

/// How a build is named on its lines: `build 7`, and its job when a job set queued it
/// (`build 7 (tests.simple)`).
#[must_use]
pub fn label(build: &GetResponse) -> String {
    if build.job_name.is_empty() {
        format!("build {}", build.build_id)
    } else {
        format!("build {} ({})", build.build_id, build.job_name)
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
            let name = derivation_name(&step.drv_path).unwrap_or(&step.drv_path);
            format!("{name} on {}", step.builder)
        })
        .collect();
    if build.steps.is_empty() && build.phase() == BuildPhase::Accepted {
        return format!("{}: queued, being planned", label(build));
    }
    let mut line = format!("{}: {done}/{} steps done", label(build), build.steps.len());
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

    #[test]
    fn the_clock_says_how_long_is_left_when_the_runner_predicts_it() {
        let elapsed = Duration::from_secs(12);
        assert_eq!(clock(elapsed, 0, 1_000), " [12 s]", "no prediction");
        assert_eq!(clock(elapsed, 66_000, 1_000), " [12 s, ~1m 05s left]");
        assert_eq!(
            clock(elapsed, 900, 1_000),
            " [12 s]",
            "a predicted end that has passed"
        );
    }

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
        let mut progress = Progress::new(&mut out, None);
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
    fn a_terminal_gets_a_line_per_build_redrawn_in_place_cut_before_its_clock_and_cleared() {
        let mut out = Vec::new();
        let mut progress = Progress::new(&mut out, Some(40));
        let running = build(&[("running", "b1")]);
        progress.update(&running, Duration::from_secs(1));
        let mut other = build(&[("running", "a-builder-with-a-long-name")]);
        other.build_id = 8;
        progress.update(&other, Duration::from_secs(1));
        progress.forget(7);
        progress.update(&other, Duration::from_secs(2));
        progress.clear();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "\r\x1b[2Kbuild 7: 0/1 steps done; running… [1 s]\n\
             \x1b[1A\r\x1b[2Kbuild 7: 0/1 steps done; running… [1 s]\n\
             \r\x1b[2Kbuild 8: 0/1 steps done; running… [1 s]\n\
             \x1b[2A\r\x1b[2Kbuild 8: 0/1 steps done; running… [2 s]\n\
             \x1b[1A\r\x1b[J"
        );
        for line in text.split('\n') {
            let visible = line.rsplit("\x1b[2K").next().unwrap_or_default();
            assert!(visible.chars().count() < 40, "{visible:?}");
        }
    }

    #[test]
    fn a_build_not_planned_yet_shows_no_total() {
        let mut queued = build(&[]);
        queued.status = drover_proto::v1::BuildStatus::Queued.into();
        queued.phase = BuildPhase::Accepted.into();
        assert_eq!(summary(&queued), "build 7: queued, being planned");
    }
}
