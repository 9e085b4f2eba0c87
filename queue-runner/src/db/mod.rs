//! PostgreSQL access: the connection pool, the embedded migrations and the queries, each a small
//! function named after what it does. Nothing here holds a transaction across network I/O to a
//! builder.

pub mod certificates;
pub mod connect;
pub mod history;
pub mod machines;
mod migrations;
pub mod queries;
pub mod retention;
pub mod snapshot;
pub mod status;
pub mod status_page;
pub mod tokens;
pub mod transitions;
pub mod verified;

use error_context::{Classify, Severity};

pub use connect::{Connector, ConnectorError, DatabaseConfig, SslMode};
pub use migrations::migrate;

/// A pool of connections.
pub type Pool = deadpool_postgres::Pool;

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The pool could not be created from the connection string.
    #[error("configuring the database pool")]
    Configure(#[source] deadpool_postgres::CreatePoolError),
    /// No connection could be had.
    #[error("getting a database connection")]
    Connection(#[source] deadpool_postgres::PoolError),
    /// A connection the runner keeps open closed.
    #[error("{0} closed")]
    ConnectionClosed(&'static str),
    /// Something the database had to answer took too long.
    #[error("{0} took too long")]
    TimedOut(&'static str),
    /// A row holds a status this version does not know (a newer runner wrote it).
    #[error("unknown {sql_type} {label:?}")]
    UnknownStatus {
        /// The PostgreSQL enum.
        sql_type: &'static str,
        /// The label read.
        label: String,
    },
    /// A row a statement just relied on is not there (another transaction removed it).
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A statement failed.
    #[error("{what}")]
    Query {
        /// What the statement was for.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl DbError {
    /// Wraps a driver error with what the statement was for.
    pub fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Self {
        move |source| Self::Query { what, source }
    }
}

impl Classify for DbError {
    /// Serialization failures and deadlocks can be retried; anything else means the database is
    /// gone or broken, which the runner cannot work without.
    fn severity(&self) -> Severity {
        match self {
            Self::Query { source, .. }
                if source
                    .code()
                    .is_some_and(|code| code.code().starts_with("40")) =>
            {
                Severity::Step
            }
            Self::Missing(_) => Severity::Step,
            Self::Configure(_)
            | Self::UnknownStatus { .. }
            | Self::Connection(_)
            | Self::ConnectionClosed(_)
            | Self::TimedOut(_)
            | Self::Query { .. } => Severity::Fatal,
        }
    }
}
