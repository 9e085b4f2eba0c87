//! `docs/schema.md` is generated from the comments of a freshly migrated database (tables,
//! views, their columns, enums and functions), and this test fails when it is stale. To write it
//! again after a migration: `DROVER_WRITE_SCHEMA_DOC=1 cargo nextest run -p drover-queue-runner
//! --test schema_doc`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

use std::fmt::Write as _;
use std::path::Path;

mod common;

/// The kinds of relation the document lists, in its order, with their headings.
const RELATIONS: [(&str, &str); 2] = [("r", "Tables"), ("v", "Views")];

/// A comment as one line of a table cell.
fn cell(comment: Option<String>) -> String {
    comment
        .unwrap_or_default()
        .replace('|', "\\|")
        .replace('\n', " ")
}

/// The document, from the comments of the database `client` is connected to.
async fn render(client: &tokio_postgres::Client) -> String {
    let mut text = String::from(
        "# The schema\n\n\
         Generated from the comments of a freshly migrated database by \
         `queue-runner/tests/schema_doc.rs`, which fails when this file is stale; write it again \
         with `DROVER_WRITE_SCHEMA_DOC=1 cargo nextest run -p drover-queue-runner --test \
         schema_doc`. `\\d+ NAME` in psql shows the same comments.\n",
    );
    for (kind, heading) in RELATIONS {
        writeln!(text, "\n## {heading}").unwrap();
        let relations = client
            .query(
                &format!(
                    "SELECT c.oid, c.relname, obj_description(c.oid, 'pg_class')
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'public' AND c.relkind = '{kind}'
                     ORDER BY c.relname"
                ),
                &[],
            )
            .await
            .unwrap();
        for relation in relations {
            let (oid, name): (u32, String) = (relation.get(0), relation.get(1));
            writeln!(text, "\n### `{name}`\n\n{}\n", cell(relation.get(2))).unwrap();
            writeln!(text, "| column | type | what |\n|---|---|---|").unwrap();
            for column in client
                .query(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod)
                            || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END,
                            col_description(a.attrelid, a.attnum)
                     FROM pg_attribute a
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                     ORDER BY a.attnum",
                    &[&oid],
                )
                .await
                .unwrap()
            {
                let (column_name, kind): (String, String) = (column.get(0), column.get(1));
                writeln!(
                    text,
                    "| `{column_name}` | {kind} | {} |",
                    cell(column.get(2))
                )
                .unwrap();
            }
        }
    }
    writeln!(
        text,
        "\n## Enums\n\n| enum | values | what |\n|---|---|---|"
    )
    .unwrap();
    for row in client
        .query(
            "SELECT t.typname, string_agg(e.enumlabel, ', ' ORDER BY e.enumsortorder),
                    obj_description(t.oid, 'pg_type')
             FROM pg_type t
             JOIN pg_namespace n ON n.oid = t.typnamespace
             JOIN pg_enum e ON e.enumtypid = t.oid
             WHERE n.nspname = 'public'
             GROUP BY t.oid, t.typname ORDER BY t.typname",
            &[],
        )
        .await
        .unwrap()
    {
        let (name, values): (String, String) = (row.get(0), row.get(1));
        writeln!(text, "| `{name}` | {values} | {} |", cell(row.get(2))).unwrap();
    }
    writeln!(text, "\n## Functions\n\n| function | what |\n|---|---|").unwrap();
    for row in client
        .query(
            "SELECT p.proname || '(' || pg_get_function_arguments(p.oid) || ')',
                    obj_description(p.oid, 'pg_proc')
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
    {
        let signature: String = row.get(0);
        writeln!(text, "| `{signature}` | {} |", cell(row.get(1))).unwrap();
    }
    text
}

#[tokio::test]
async fn the_schema_document_is_generated_from_the_comments_and_up_to_date() {
    let (database, _pool) = common::migrated_database().await;
    let client = database.connect().await;
    let rendered = render(&client).await;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schema.md");
    if std::env::var_os("DROVER_WRITE_SCHEMA_DOC").is_some() {
        fs_err::write(&path, &rendered).unwrap();
    }
    let written = fs_err::read_to_string(&path).unwrap_or_default();
    assert!(
        written == rendered,
        "docs/schema.md is stale: write it again with DROVER_WRITE_SCHEMA_DOC=1 cargo nextest \
         run -p drover-queue-runner --test schema_doc"
    );
}
