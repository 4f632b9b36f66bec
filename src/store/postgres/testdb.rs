//! A database of its own for each test, made on the PostgreSQL server the test set-up
//! started (`TASUKI_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and dropped when the test ends.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::PgStore;

/// The server's maintenance database, where test databases are made and dropped.
pub(crate) fn admin_url() -> String {
    std::env::var("TASUKI_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A test database; dropped (its connections closed) with this value.
pub(crate) struct TestDb {
    pub(crate) name: String,
    pub(crate) url: String,
}

impl TestDb {
    /// A new, empty database with a unique name.
    pub(crate) async fn create() -> TestDb {
        let name = format!(
            "tasuki_test_{}",
            crate::domain::run::RunId::new().to_string().to_lowercase()
        );
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} (tests/setup.sh ensure_postgres): {e}")
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        TestDb { name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A runtime of its own: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// A fresh store on a database of its own, and the database's guard.
pub(crate) async fn open() -> (PgStore, TestDb) {
    let db = TestDb::create().await;
    let store = PgStore::open(&db.url, 4).await.unwrap();
    (store, db)
}
