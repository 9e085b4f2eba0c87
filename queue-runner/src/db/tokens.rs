//! API tokens: created with a hash of their secret, looked up by that hash on every request,
//! revoked by name.

use deadpool_postgres::GenericClient;

use super::DbError;

/// A token as `drover token list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Who or what uses it.
    pub name: String,
    /// client or admin.
    pub role: String,
    /// When it was created, in Unix milliseconds.
    pub created_at_ms: i64,
    /// The admin who created it.
    pub created_by: String,
    /// Its latest use, in Unix milliseconds.
    pub last_used_at_ms: Option<i64>,
    /// When it was revoked, in Unix milliseconds.
    pub revoked_at_ms: Option<i64>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
}

/// A valid token's holder, as a request with it acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHolder {
    /// Token id.
    pub id: i64,
    /// client or admin.
    pub role: String,
    /// Its name.
    pub name: String,
}

/// Stores a token; false if a valid token already has that name.
pub async fn create(
    client: &impl GenericClient,
    name: &str,
    role: &str,
    secret_sha256: &[u8],
    admin: &str,
) -> Result<bool, DbError> {
    let created = client
        .execute(
            "INSERT INTO api_tokens (name, role, secret_sha256, created_by)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING",
            &[&name, &role, &secret_sha256, &admin],
        )
        .await
        .map_err(DbError::query("creating an API token"))?;
    Ok(created == 1)
}

/// Revokes the valid token named `name`; false if there is none.
pub async fn revoke(client: &impl GenericClient, name: &str, admin: &str) -> Result<bool, DbError> {
    let revoked = client
        .execute(
            "UPDATE api_tokens SET revoked_at = now(), revoked_by = $2
             WHERE name = $1 AND revoked_at IS NULL",
            &[&name, &admin],
        )
        .await
        .map_err(DbError::query("revoking an API token"))?;
    Ok(revoked == 1)
}

/// The holder of the valid token whose secret hashes to `secret_sha256`, noting its use (at
/// most once a minute); `None` if no valid token does.
pub async fn holder(
    client: &impl GenericClient,
    secret_sha256: &[u8],
) -> Result<Option<TokenHolder>, DbError> {
    let row = client
        .query_opt(
            "WITH valid AS (
                 SELECT id, role, name, last_used_at FROM api_tokens
                 WHERE secret_sha256 = $1 AND revoked_at IS NULL
             ),
             used AS (
                 UPDATE api_tokens t SET last_used_at = now() FROM valid v
                 WHERE t.id = v.id
                   AND (v.last_used_at IS NULL OR v.last_used_at < now() - interval '1 minute')
             )
             SELECT id, role, name FROM valid",
            &[&secret_sha256],
        )
        .await
        .map_err(DbError::query("checking an API token"))?;
    Ok(row.map(|row| TokenHolder {
        id: row.get(0),
        role: row.get(1),
        name: row.get(2),
    }))
}

/// Whether token `id` is still valid.
pub async fn valid(client: &impl GenericClient, id: i64) -> Result<bool, DbError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE id = $1 AND revoked_at IS NULL)",
            &[&id],
        )
        .await
        .map_err(DbError::query("checking an API token"))?;
    Ok(row.get(0))
}

/// Every token, the newest first.
pub async fn all(client: &impl GenericClient) -> Result<Vec<TokenRow>, DbError> {
    let rows = client
        .query(
            "SELECT name, role, (extract(epoch FROM created_at) * 1000)::bigint, created_by,
                    (extract(epoch FROM last_used_at) * 1000)::bigint,
                    (extract(epoch FROM revoked_at) * 1000)::bigint, revoked_by
             FROM api_tokens ORDER BY id DESC",
            &[],
        )
        .await
        .map_err(DbError::query("listing API tokens"))?;
    Ok(rows
        .iter()
        .map(|row| TokenRow {
            name: row.get(0),
            role: row.get(1),
            created_at_ms: row.get(2),
            created_by: row.get(3),
            last_used_at_ms: row.get(4),
            revoked_at_ms: row.get(5),
            revoked_by: row.get(6),
        })
        .collect())
}
