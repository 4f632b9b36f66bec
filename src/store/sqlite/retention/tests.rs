//! The store's retention calls against a real (temporary) SQLite file: the shared
//! retention suite, and how SQLite plans the look for prunable runs.

use super::*;
use crate::domain::run::RunId;
use crate::store::suite::retention::{RowCounts, retention_suite};

impl RowCounts for SqliteStore {
    async fn rows(&self, table: &str, run: RunId) -> i64 {
        let sql = sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table} WHERE run_id = ?"));
        sqlx::query_scalar(sql)
            .bind(run.to_string())
            .fetch_one(&self.reader)
            .await
            .unwrap()
    }
}

async fn open() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).await.unwrap();
    (store, dir)
}

retention_suite!(open);

/// A batch finds the oldest-ended runs through `runs_by_finished`, never by sorting
/// every final run (which held the writer for seconds on a large store).
#[tokio::test]
async fn the_prunable_runs_are_read_oldest_first_from_their_index() {
    let (store, _dir) = open().await;
    let sql = format!("EXPLAIN QUERY PLAN {}", super::PRUNABLE_RUNS);
    let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(0_i64)
        .bind("[\"succeeded\"]")
        .bind(10_i64)
        .fetch_all(store.writer())
        .await
        .unwrap();
    assert!(
        plan.iter()
            .any(|(_, _, _, d)| d.contains("runs_by_finished")),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|(_, _, _, d)| d.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}
