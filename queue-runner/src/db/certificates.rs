//! The certificates the runner has seen at handshakes, and the ones revoked.

use deadpool_postgres::GenericClient;
use drover_tls::PeerCertificate;

use super::DbError;

/// A certificate as `drover admin certs` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRow {
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// The role it names; empty if it was revoked before it was ever seen.
    pub role: String,
    /// The name it names; empty likewise.
    pub name: String,
    /// Its first handshake, in Unix milliseconds.
    pub first_seen_at_ms: i64,
    /// Its latest handshake, in Unix milliseconds.
    pub last_seen_at_ms: i64,
    /// When it was revoked, in Unix milliseconds.
    pub revoked_at_ms: Option<i64>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
}

/// Records handshakes: each certificate's first and latest.
pub async fn record_seen(
    client: &impl GenericClient,
    seen: &[PeerCertificate],
) -> Result<(), DbError> {
    let serials: Vec<&str> = seen.iter().map(|peer| peer.serial.as_str()).collect();
    let roles: Vec<&str> = seen
        .iter()
        .map(|peer| peer.identity.role.as_str())
        .collect();
    let names: Vec<&str> = seen
        .iter()
        .map(|peer| peer.identity.name.as_str())
        .collect();
    client
        .execute(
            "INSERT INTO certificates (serial, role, name)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
             ON CONFLICT (serial) DO UPDATE
             SET last_seen_at = now(), role = excluded.role, name = excluded.name",
            &[&serials, &roles, &names],
        )
        .await
        .map_err(DbError::query("recording the certificates seen"))?;
    Ok(())
}

/// Every certificate seen or revoked, the latest seen first.
pub async fn all(client: &impl GenericClient) -> Result<Vec<CertificateRow>, DbError> {
    let rows = client
        .query(
            "SELECT serial, role, name,
                    (extract(epoch FROM first_seen_at) * 1000)::bigint,
                    (extract(epoch FROM last_seen_at) * 1000)::bigint,
                    (extract(epoch FROM revoked_at) * 1000)::bigint, revoked_by
             FROM certificates ORDER BY last_seen_at DESC, serial",
            &[],
        )
        .await
        .map_err(DbError::query("reading the certificates"))?;
    Ok(rows
        .iter()
        .map(|row| CertificateRow {
            serial: row.get(0),
            role: row.get(1),
            name: row.get(2),
            first_seen_at_ms: row.get(3),
            last_seen_at_ms: row.get(4),
            revoked_at_ms: row.get(5),
            revoked_by: row.get(6),
        })
        .collect())
}

/// Revokes `serial` for `by`; returns the certificate's role and name if it was ever seen.
/// Revoking it again keeps the first revocation.
pub async fn revoke(
    client: &impl GenericClient,
    serial: &str,
    by: &str,
) -> Result<Option<(String, String)>, DbError> {
    let row = client
        .query_one(
            "INSERT INTO certificates (serial, role, name, revoked_at, revoked_by)
             VALUES ($1, '', '', now(), $2)
             ON CONFLICT (serial) DO UPDATE
             SET revoked_at = coalesce(certificates.revoked_at, now()),
                 revoked_by = coalesce(certificates.revoked_by, $2)
             RETURNING role, name",
            &[&serial, &by],
        )
        .await
        .map_err(DbError::query("revoking a certificate"))?;
    let (role, name): (String, String) = (row.get(0), row.get(1));
    Ok((!role.is_empty()).then_some((role, name)))
}

/// The serials revoked.
pub async fn revoked(client: &impl GenericClient) -> Result<Vec<String>, DbError> {
    let rows = client
        .query(
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL",
            &[],
        )
        .await
        .map_err(DbError::query("reading the revoked certificates"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
