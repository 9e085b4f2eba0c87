//! What the builder tells the runner about its machine at each ping: free space in its Nix
//! store and memory pressure, read from the kernel.

use std::path::Path;

/// Free bytes for unprivileged use on the file system the Nix store is on (or will be on, where
/// no build has made it yet: its nearest existing parent's); `None` if unknown.
#[must_use]
pub fn free_store_bytes() -> Option<u64> {
    ["/nix/store", "/nix", "/"].into_iter().find_map(|path| {
        let stats = rustix::fs::statvfs(path).ok()?;
        Some(stats.f_bavail.saturating_mul(stats.f_frsize))
    })
}

/// The kernel's memory pressure: the share of the last 10 seconds in which some task stalled
/// waiting for memory (PSI, `/proc/pressure/memory`, "some avg10"), in percent. `None` on a
/// kernel without PSI.
#[must_use]
pub fn memory_pressure_percent() -> Option<f64> {
    memory_pressure_in(Path::new("/proc/pressure/memory"))
}

fn memory_pressure_in(file: &Path) -> Option<f64> {
    let text = fs_err::read_to_string(file).ok()?;
    parse_some_avg10(&text)
}

/// "some avg10" of a PSI file: `some avg10=1.53 avg60=… total=…`.
fn parse_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|line| line.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("avg10="))?
        .parse()
        .ok()
        .filter(|percent: &f64| percent.is_finite() && *percent >= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_some_line_s_ten_second_average_is_read() {
        let text = "some avg10=12.50 avg60=3.01 avg300=0.00 total=8375367\n\
                    full avg10=1.00 avg60=0.00 avg300=0.00 total=5277454\n";
        assert_eq!(parse_some_avg10(text), Some(12.5));
        assert_eq!(parse_some_avg10("full avg10=1.00\n"), None);
        assert_eq!(parse_some_avg10("some avg10=nan\n"), None);
        assert_eq!(parse_some_avg10(""), None);
    }

    #[test]
    fn this_machine_s_pressure_is_read_where_the_kernel_has_psi() {
        let file = Path::new("/proc/pressure/memory");
        if file.exists() {
            let percent = memory_pressure_in(file).expect("a PSI file the kernel wrote");
            assert!((0.0..=100.0).contains(&percent), "{percent}");
        } else {
            assert_eq!(memory_pressure_in(file), None);
        }
    }
}
