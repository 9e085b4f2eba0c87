//! The `verified_derivations` table: what the runner keeps of each derivation it verified, read
//! back by later job sets and a restarted runner instead of parsing and hashing the text again.

use deadpool_postgres::GenericClient;
use nix_primitives::{ContentAddress, Hash, HashAlgorithm, StorePath};
use tokio_postgres::types::ToSql;

use super::DbError;
use crate::verify::{StoredDerivation, VerifiedDerivation};

/// Rows written per statement.
const CHUNK: usize = 5_000;

/// The stored rows of `paths`. A row that does not read back (written by hand, say) is left out,
/// so its derivation is verified again from its text.
pub async fn load(
    client: &impl GenericClient,
    paths: &[String],
) -> Result<Vec<StoredDerivation>, DbError> {
    let rows = client
        .query(
            "SELECT path, system, required_features, output_names, output_paths,
                    input_derivations, input_sources, input_outputs, fixed_output, hash_modulo
             FROM verified_derivations WHERE path = ANY($1)",
            &[&paths],
        )
        .await
        .map_err(DbError::query("loading verified derivations"))?;
    Ok(rows.iter().filter_map(read_row).collect())
}

/// One row, if every path and hash in it parses.
fn read_row(row: &tokio_postgres::Row) -> Option<StoredDerivation> {
    let paths = |column: usize| -> Option<Vec<StorePath>> {
        row.get::<_, Vec<String>>(column)
            .iter()
            .map(|path| StorePath::from_absolute(path).ok())
            .collect()
    };
    let names: Vec<String> = row.get(3);
    let fixed = match row.get::<_, Option<String>>(8) {
        None => None,
        Some(text) => match ContentAddress::parse(&text).ok()? {
            ContentAddress::Fixed { method, hash } => Some((method, hash)),
            ContentAddress::Text(_) => return None,
        },
    };
    Some(StoredDerivation {
        path: StorePath::from_absolute(row.get(0)).ok()?,
        derivation: VerifiedDerivation {
            system: row.get(1),
            features: row.get::<_, Vec<String>>(2).into_iter().collect(),
            outputs: names.into_iter().zip(paths(4)?).collect(),
            inputs: paths(5)?,
            input_sources: paths(6)?,
            input_outputs: paths(7)?,
            fixed,
        },
        hash_modulo: Hash::from_digest(HashAlgorithm::Sha256, row.get(9))?,
    })
}

/// Stores `derivations`, each of which must be in the `derivations` table; a row stored already
/// is kept.
pub async fn store(
    client: &impl GenericClient,
    derivations: &[StoredDerivation],
) -> Result<(), DbError> {
    for chunk in derivations.chunks(CHUNK) {
        let mut columns: [Vec<String>; 8] = Default::default();
        let mut fixed: Vec<Option<String>> = Vec::with_capacity(chunk.len());
        let mut hashes: Vec<&[u8]> = Vec::with_capacity(chunk.len());
        for stored in chunk {
            let derivation = &stored.derivation;
            let lists = [
                stored.path.to_absolute(),
                derivation.system.clone(),
                spaced(&derivation.features),
                spaced(derivation.outputs.keys()),
                spaced(derivation.outputs.values().map(StorePath::to_absolute)),
                spaced(derivation.inputs.iter().map(StorePath::to_absolute)),
                spaced(derivation.input_sources.iter().map(StorePath::to_absolute)),
                spaced(derivation.input_outputs.iter().map(StorePath::to_absolute)),
            ];
            for (column, value) in columns.iter_mut().zip(lists) {
                column.push(value);
            }
            fixed.push(
                derivation
                    .fixed
                    .map(|(method, hash)| ContentAddress::Fixed { method, hash }.to_string()),
            );
            hashes.push(stored.hash_modulo.as_bytes());
        }
        let mut parameters: Vec<&(dyn ToSql + Sync)> = columns
            .iter()
            .map(|column| column as &(dyn ToSql + Sync))
            .collect();
        parameters.push(&fixed);
        parameters.push(&hashes);
        client
            .execute(
                "INSERT INTO verified_derivations (path, system, required_features, output_names,
                     output_paths, input_derivations, input_sources, input_outputs, fixed_output,
                     hash_modulo)
                 SELECT path, system, string_to_array(features, ' '), string_to_array(names, ' '),
                        string_to_array(outputs, ' '), string_to_array(inputs, ' '),
                        string_to_array(sources, ' '), string_to_array(input_outputs, ' '),
                        fixed, hash
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::text[], $9::text[], $10::bytea[])
                   AS given (path, system, features, names, outputs, inputs, sources,
                             input_outputs, fixed, hash)
                 ON CONFLICT DO NOTHING",
                &parameters,
            )
            .await
            .map_err(DbError::query("storing verified derivations"))?;
    }
    Ok(())
}

/// A list as one string, for `string_to_array(…, ' ')`: arrays of arrays must be rectangular in
/// PostgreSQL, and store paths, output names and features hold no spaces.
fn spaced(items: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let mut text = String::new();
    for item in items {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(item.as_ref());
    }
    text
}
