//! [`WithContext`]: a typed root error with context messages around it, and the extension trait
//! that adds them.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;

use crate::report::{Report, report};
use crate::severity::{Classify, Severity};

/// A phase error `E` at the root, optionally wrapped in context messages.
///
/// Displaying it shows only the outermost message; `source()` walks inwards through the contexts to
/// the root and then on through the root's own sources, so [`report`] prints the chain top-down
/// without repeating itself.
pub enum WithContext<E> {
    /// The typed failure itself.
    Root(E),
    /// What was being done when `source` happened.
    Context {
        /// A message naming the operation, such as "reading derivation /nix/store/…-a.drv".
        context: Cow<'static, str>,
        /// The failure underneath.
        source: Box<WithContext<E>>,
    },
}

impl<E> WithContext<E> {
    /// The typed root, however many contexts surround it.
    #[must_use]
    pub fn root(&self) -> &E {
        let mut current = self;
        loop {
            match current {
                Self::Root(root) => return root,
                Self::Context { source, .. } => current = source,
            }
        }
    }

    /// Consumes the chain and returns its typed root.
    #[must_use]
    pub fn into_root(self) -> E {
        let mut current = self;
        loop {
            match current {
                Self::Root(root) => return root,
                Self::Context { source, .. } => current = *source,
            }
        }
    }

    /// Wraps this chain in one more context message.
    #[must_use]
    pub fn context(self, context: impl Into<Cow<'static, str>>) -> Self {
        Self::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

impl<E: Classify> WithContext<E> {
    /// The severity of the root: contexts never change how far a failure reaches.
    #[must_use]
    pub fn severity(&self) -> Severity {
        self.root().severity()
    }
}

impl<E: Error + 'static> WithContext<E> {
    /// Renders the whole chain, one cause per line.
    #[must_use]
    pub fn report(&self) -> Report<'_> {
        report(self)
    }
}

impl<E> From<E> for WithContext<E> {
    fn from(root: E) -> Self {
        Self::Root(root)
    }
}

impl<E: fmt::Display> fmt::Display for WithContext<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Root(root) => root.fmt(f),
            Self::Context { context, .. } => f.write_str(context),
        }
    }
}

impl<E: Error + 'static> fmt::Debug for WithContext<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.report(), f)
    }
}

impl<E: Error + 'static> Error for WithContext<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Root(root) => root.source(),
            Self::Context { source, .. } => Some(source.as_ref()),
        }
    }
}

/// Anything that can become a [`WithContext`] chain: a classified phase error (which becomes the
/// root) or an existing chain (which stays as it is).
pub trait IntoChain {
    /// The phase error at the root of the chain.
    type Root;
    /// Converts into a chain.
    fn into_chain(self) -> WithContext<Self::Root>;
}

impl<E: Classify> IntoChain for E {
    type Root = E;
    fn into_chain(self) -> WithContext<E> {
        WithContext::Root(self)
    }
}

impl<E> IntoChain for WithContext<E> {
    type Root = E;
    fn into_chain(self) -> WithContext<E> {
        self
    }
}

/// Adds context to the error of a `Result`.
pub trait ResultExt<T> {
    /// The phase error at the root of the resulting chain.
    type Root;

    /// Wraps an error in a fixed context message.
    fn context(self, context: impl Into<Cow<'static, str>>) -> Result<T, WithContext<Self::Root>>;

    /// Wraps an error in a context message built only when there is an error.
    fn with_context<C, F>(self, context: F) -> Result<T, WithContext<Self::Root>>
    where
        C: Into<Cow<'static, str>>,
        F: FnOnce() -> C;
}

impl<T, E: IntoChain> ResultExt<T> for Result<T, E> {
    type Root = E::Root;

    fn context(self, context: impl Into<Cow<'static, str>>) -> Result<T, WithContext<E::Root>> {
        self.map_err(|error| error.into_chain().context(context))
    }

    fn with_context<C, F>(self, context: F) -> Result<T, WithContext<E::Root>>
    where
        C: Into<Cow<'static, str>>,
        F: FnOnce() -> C,
    {
        self.map_err(|error| error.into_chain().context(context()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum StoreError {
        #[error("reading {path}")]
        Read {
            path: String,
            #[source]
            source: std::io::Error,
        },
        #[error("the store database is gone")]
        DatabaseGone,
    }

    impl Classify for StoreError {
        fn severity(&self) -> Severity {
            match self {
                Self::Read { .. } => Severity::Step,
                Self::DatabaseGone => Severity::Fatal,
            }
        }
    }

    fn read_failure() -> Result<(), StoreError> {
        Err(StoreError::Read {
            path: "/nix/store/x".to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        })
    }

    #[test]
    fn root_and_severity_survive_any_number_of_contexts() {
        let error = read_failure()
            .context("building step 7")
            .context("dispatching to builder b1")
            .unwrap_err();
        assert!(matches!(error.root(), StoreError::Read { .. }));
        assert_eq!(error.severity(), Severity::Step);
        let fatal = Err::<(), _>(StoreError::DatabaseGone)
            .context("claiming steps")
            .unwrap_err();
        assert_eq!(fatal.severity(), Severity::Fatal);
        assert!(matches!(fatal.into_root(), StoreError::DatabaseGone));
    }

    #[test]
    fn report_renders_contexts_then_root_then_its_sources() {
        let error = read_failure()
            .context("building step 7")
            .with_context(|| format!("dispatching to builder {}", "b1"))
            .unwrap_err();
        assert_eq!(
            error.report().to_string(),
            "dispatching to builder b1\n  caused by: building step 7\n  caused by: reading /nix/store/x\n  caused by: no such file"
        );
        assert_eq!(error.to_string(), "dispatching to builder b1");
    }

    #[test]
    fn with_context_is_lazy_on_success() {
        let ok: Result<u8, StoreError> = Ok(3);
        let value = ok
            .with_context(|| -> String { panic!("context built for a success") })
            .unwrap();
        assert_eq!(value, 3);
    }
}
