//! Rendering an error with its whole cause chain, for logs and fatal exits.

use std::error::Error;
use std::fmt;

/// Displays an error followed by every error in its `source()` chain, one per line, each cause
/// prefixed with `caused by: `. A cause an earlier line already said is left out: the same text,
/// or a line that is that text and more after a colon (libraries that print their source in
/// their own message, or their own message before it's).
pub struct Report<'a>(&'a (dyn Error + 'static));

/// Wraps `error` so that displaying it renders the whole chain.
#[must_use]
pub fn report<'a>(error: &'a (dyn Error + 'static)) -> Report<'a> {
    Report(error)
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = vec![self.0.to_string()];
        f.write_str(&said[0])?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let text = error.to_string();
            let (suffix, prefix) = (format!(": {text}"), format!("{text}: "));
            let repeated = said
                .iter()
                .any(|line| *line == text || line.ends_with(&suffix) || line.starts_with(&prefix));
            if !repeated {
                write!(f, "\n  caused by: {text}")?;
                said.push(text);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a message and, perhaps, a source.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1
                .as_deref()
                .map(|layer| layer as &(dyn Error + 'static))
        }
    }

    #[test]
    fn causes_already_said_are_left_out() {
        let chain = Layer(
            "could not reach the runner at https://localhost:1",
            Some(Box::new(Layer(
                "transport error",
                Some(Box::new(Layer(
                    "tcp connect error: Connection refused",
                    Some(Box::new(Layer(
                        "tcp connect error",
                        Some(Box::new(Layer(
                            "Connection refused",
                            Some(Box::new(Layer("Connection refused", None))),
                        ))),
                    ))),
                ))),
            ))),
        );
        assert_eq!(
            report(&chain).to_string(),
            "could not reach the runner at https://localhost:1\n  caused by: transport error\n  \
             caused by: tcp connect error: Connection refused"
        );
    }
}
