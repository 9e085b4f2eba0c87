//! Rendering an error with its whole cause chain, for logs and fatal exits.

use std::error::Error;
use std::fmt;

/// Displays an error followed by every error in its `source()` chain, one per line, each cause
/// prefixed with `caused by: `.
pub struct Report<'a>(&'a (dyn Error + 'static));

/// Wraps `error` so that displaying it renders the whole chain.
#[must_use]
pub fn report<'a>(error: &'a (dyn Error + 'static)) -> Report<'a> {
    Report(error)
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, "\n  caused by: {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
