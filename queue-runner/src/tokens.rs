//! API tokens, for HTTP clients without a certificate (`docs/web.md`): an admin creates one for a
//! role and a name, its secret is shown once and only its SHA-256 is stored; a request with it
//! acts as that role and name, as a certificate of them would, until an admin revokes it.
//! Checked against the database on every request, so a revocation holds at once.

use drover_tls::{Identity, IdentityError, Role};
use nix_primitives::Hash;

use crate::db::tokens::{self, TokenRow};
use crate::db::{DbError, Pool};

/// What every secret starts with, so one found in a log or a repository is recognisable.
const PREFIX: &str = "drover_";

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The name is not one an identity can have.
    #[error("{0:?} is not a token name")]
    Name(String, #[source] IdentityError),
    /// Tokens are for clients and admins only.
    #[error("{0:?} is not a token role: client or admin")]
    Role(String),
    /// A valid token has that name already.
    #[error("a valid token named {0:?} exists: revoke it first, or choose another name")]
    Exists(String),
    /// No valid token has that name.
    #[error("no valid token is named {0:?}")]
    NoSuchToken(String),
    /// The system's random source failed.
    #[error("drawing a token's secret: {0}")]
    Random(String),
    /// The database failed.
    #[error("reading or changing the API tokens")]
    Database(#[from] DbError),
}

/// A request's token holder: who it acts as, and which token (to notice its revocation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Token id.
    pub token: i64,
    /// Who its requests act as.
    pub identity: Identity,
}

/// The API tokens of one farm.
#[derive(Debug, Clone)]
pub struct Tokens {
    pool: Pool,
    /// Moved by every revocation through this runner, so the streams a token opened end at once.
    revocations: tokio::sync::watch::Sender<u64>,
}

impl Tokens {
    /// The tokens in `pool`'s database.
    #[must_use]
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            revocations: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Creates a token named `name` with `role` for `caller`; returns its secret.
    pub async fn create(
        &self,
        caller: &Identity,
        name: &str,
        role: &str,
    ) -> Result<String, TokenError> {
        let Ok(role @ (Role::Client | Role::Admin)) = Role::parse(role) else {
            return Err(TokenError::Role(role.to_owned()));
        };
        Identity::new(role, name).map_err(|error| TokenError::Name(name.to_owned(), error))?;
        let mut random = [0_u8; 32];
        getrandom::fill(&mut random).map_err(|error| TokenError::Random(error.to_string()))?;
        let secret = format!("{PREFIX}{}", hex(&random));
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let hash = digest(&secret);
        if !tokens::create(&client, name, role.as_str(), &hash, &caller.to_string()).await? {
            return Err(TokenError::Exists(name.to_owned()));
        }
        tracing::info!(name, %role, by = %caller, "API token created");
        Ok(secret)
    }

    /// Revokes the valid token named `name` for `caller`.
    pub async fn revoke(&self, caller: &Identity, name: &str) -> Result<(), TokenError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        if !tokens::revoke(&client, name, &caller.to_string()).await? {
            return Err(TokenError::NoSuchToken(name.to_owned()));
        }
        self.revocations.send_modify(|count| *count += 1);
        tracing::warn!(name, by = %caller, "API token revoked");
        Ok(())
    }

    /// Every token, the newest first.
    pub async fn list(&self) -> Result<Vec<TokenRow>, TokenError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        Ok(tokens::all(&client).await?)
    }

    /// Who a request presenting `secret` acts as; `None` if no valid token has that secret.
    pub async fn holder(&self, secret: &str) -> Result<Option<Holder>, DbError> {
        if !secret.starts_with(PREFIX) {
            return Ok(None);
        }
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let Some(row) = tokens::holder(&client, &digest(secret)).await? else {
            return Ok(None);
        };
        // Rows are written with a valid role and name only; one that is not is no token.
        let identity = Role::parse(&row.role)
            .and_then(|role| Identity::new(role, &row.name))
            .ok();
        Ok(identity.map(|identity| Holder {
            token: row.id,
            identity,
        }))
    }

    /// Resolves once token `id` is revoked (for streams that outlive their request's check):
    /// at once when this runner revokes it, within `every` when SQL does.
    pub async fn revoked(&self, id: i64, every: std::time::Duration) {
        let mut revocations = self.revocations.subscribe();
        loop {
            tokio::select! {
                _ = revocations.changed() => {}
                () = tokio::time::sleep(every) => {}
            }
            // A database that does not answer is not a revocation.
            if matches!(self.valid(id).await, Ok(false)) {
                return;
            }
        }
    }

    async fn valid(&self, id: i64) -> Result<bool, DbError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        tokens::valid(&client, id).await
    }
}

/// SHA-256 of a secret, as stored.
fn digest(secret: &str) -> Vec<u8> {
    Hash::sha256(secret.as_bytes()).as_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

#[cfg(test)]
mod tests {
    use super::{digest, hex};

    #[test]
    fn secrets_are_stored_as_their_sha256() {
        assert_eq!(
            hex(&digest("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
