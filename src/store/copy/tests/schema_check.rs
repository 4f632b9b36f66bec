//! `TABLES` against the schemas the migrations make: every table of either store is
//! copied or named as left alone, with every column, of the kind the copy reads.

use std::collections::BTreeMap;

use sqlx::Row as _;

use super::super::schema::{COLUMNS_NOT_COPIED, Kind, NOT_COPIED, TABLES};
use crate::store::{SqliteStore, testdb};

/// Table → column → declared type, as a store's catalog says.
type Catalog = BTreeMap<String, BTreeMap<String, String>>;

/// What the copy expects: table → column → kind, the columns left alone removed from
/// the catalog first.
fn compare(catalog: Catalog, kind_of: impl Fn(&str) -> Vec<Kind>, store: &str) {
    let mut catalog = catalog;
    for name in NOT_COPIED {
        catalog.remove(*name);
    }
    for (table, column) in COLUMNS_NOT_COPIED {
        if let Some(columns) = catalog.get_mut(*table) {
            columns.remove(*column);
        }
    }
    let copied: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
    let found: Vec<&str> = catalog.keys().map(String::as_str).collect();
    let mut want = copied.clone();
    want.sort_unstable();
    assert_eq!(found, want, "{store}: tables");
    for table in TABLES {
        let columns = &catalog[table.name];
        let mut names: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
        names.sort_unstable();
        let have: Vec<&str> = columns.keys().map(String::as_str).collect();
        assert_eq!(have, names, "{store}: columns of {}", table.name);
        for column in table.columns {
            let declared = &columns[column.name];
            assert!(
                kind_of(declared).contains(&column.kind),
                "{store}: {}.{} is {declared}, read as {:?}",
                table.name,
                column.name,
                column.kind
            );
        }
    }
}

#[tokio::test]
async fn every_sqlite_table_and_column_is_copied_or_left_alone_on_purpose() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).await.unwrap());
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("tasuki.db").display()
    ))
    .await
    .unwrap();
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut catalog = Catalog::new();
    for table in tables {
        let rows = sqlx::query("SELECT name, type FROM pragma_table_info(?1)")
            .bind(&table)
            .fetch_all(&pool)
            .await
            .unwrap();
        let columns = rows
            .iter()
            .map(|r| (r.get::<String, _>("name"), r.get::<String, _>("type")))
            .collect();
        catalog.insert(table, columns);
    }
    compare(
        catalog,
        |declared| match declared {
            "INTEGER" => vec![Kind::Int, Kind::Flag],
            "REAL" => vec![Kind::Real],
            "TEXT" => vec![Kind::Text],
            _ => vec![],
        },
        "SQLite",
    );
}

#[tokio::test]
async fn every_postgresql_table_and_column_is_copied_or_left_alone_on_purpose() {
    let (store, _db) = testdb::open().await;
    let rows = sqlx::query(
        "SELECT table_name::TEXT AS t, column_name::TEXT AS c, data_type::TEXT AS d \
         FROM information_schema.columns WHERE table_schema = current_schema()",
    )
    .fetch_all(&store.shared_pool())
    .await
    .unwrap();
    let mut catalog = Catalog::new();
    for row in rows {
        catalog
            .entry(row.get("t"))
            .or_default()
            .insert(row.get("c"), row.get("d"));
    }
    compare(
        catalog,
        |declared| match declared {
            "bigint" => vec![Kind::Int],
            "boolean" => vec![Kind::Flag],
            "double precision" => vec![Kind::Real],
            "text" => vec![Kind::Text],
            _ => vec![],
        },
        "PostgreSQL",
    );
}
