//! `PgLogSink`: run logs in the PostgreSQL database the store uses, so every control
//! plane replica reads and appends the same logs (tables from
//! `migrations/postgres/0002_logs.sql`).

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};

use crate::domain::ports::{LogError, LogSink, OutputChunk};
use crate::domain::run::RunId;

/// An attempt's log is the rows of `log_chunks`, each one append's new bytes at the
/// offset it starts at; its head row in `log_heads` holds the length. An append locks
/// the head row for its transaction, so appends to one attempt from several replicas
/// (a worker that failed over and sent a batch again) run one after the other, and
/// each sees what the one before stored.
pub struct PgLogSink {
    pool: PgPool,
}

/// How often an append looks for its head row again when a concurrent delete of the
/// run's logs removes it between the insert and the lock.
const HEAD_TRIES: u32 = 3;

/// Appends run at READ COMMITTED whatever the database's default: each statement sees
/// what committed before it, and `FOR UPDATE` waits for a concurrent append and then
/// reads its length (SERIALIZABLE would fail it instead).
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// A failure of `what` on the log of `run_id`'s attempt.
fn failed(run_id: RunId, attempt: u32, what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Io(format!(
        "log of run {run_id} attempt {attempt}: {what}: {e}"
    ))
}

/// A length or offset as the database stores it; past `i64::MAX` it is further than
/// any log reaches.
fn to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgLogSink {
    /// `pool`: the store's (`PgStore::shared_pool`), whose migrations made the tables.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The attempt's length, its head row locked until the transaction ends; `None`
    /// when there is no head (no output yet), which is then left unmade.
    async fn lock_len(
        c: &mut PgConnection,
        run_id: RunId,
        attempt: u32,
    ) -> Result<Option<u64>, LogError> {
        let len: Option<i64> = sqlx::query_scalar(
            "SELECT len FROM log_heads WHERE run_id = $1 AND attempt = $2 FOR UPDATE",
        )
        .bind(run_id.to_string())
        .bind(i64::from(attempt))
        .fetch_optional(&mut *c)
        .await
        .map_err(|e| failed(run_id, attempt, "locking its length", e))?;
        len.map(|n| u64::try_from(n).map_err(|e| failed(run_id, attempt, "its length", e)))
            .transpose()
    }

    /// The attempt's length with its head row locked, the row made (length 0) first
    /// when there is none. A concurrent append making it too waits for this one.
    async fn make_and_lock_len(
        c: &mut PgConnection,
        run_id: RunId,
        attempt: u32,
    ) -> Result<u64, LogError> {
        for _ in 0..HEAD_TRIES {
            sqlx::query(
                "INSERT INTO log_heads (run_id, attempt, len) VALUES ($1, $2, 0) \
                 ON CONFLICT (run_id, attempt) DO NOTHING",
            )
            .bind(run_id.to_string())
            .bind(i64::from(attempt))
            .execute(&mut *c)
            .await
            .map_err(|e| failed(run_id, attempt, "making its head", e))?;
            // The row a concurrent append made is there now; one a concurrent delete
            // removed after the insert found it is not, and is made again.
            if let Some(len) = Self::lock_len(c, run_id, attempt).await? {
                return Ok(len);
            }
        }
        Err(failed(
            run_id,
            attempt,
            "making its head",
            "deleted concurrently each time",
        ))
    }
}

/// The bytes of `pieces` (which start at `offset`) that lie at or past `len`, as one
/// buffer; empty when all of them are stored already. `offset <= len`.
fn new_bytes(pieces: &[OutputChunk], offset: u64, len: u64) -> Vec<u8> {
    let mut skip = len - offset;
    let mut out = Vec::new();
    for piece in pieces {
        let n = piece.bytes.len() as u64;
        if skip >= n {
            skip -= n;
            continue;
        }
        // `skip < n`, a piece's length, so it fits a usize.
        out.extend_from_slice(&piece.bytes[skip as usize..]);
        skip = 0;
    }
    out
}

#[async_trait]
impl LogSink for PgLogSink {
    async fn append(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, LogError> {
        let total: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
        if total == 0 {
            // Nothing to add: no head row made, no lock taken.
            let len = self.len(run_id, attempt).await?;
            return if offset > len {
                Err(LogError::Gap { offset, len })
            } else {
                Ok(len)
            };
        }
        let mut tx = self
            .pool
            .begin_with(BEGIN)
            .await
            .map_err(|e| failed(run_id, attempt, "starting an append", e))?;
        let len = match Self::lock_len(&mut tx, run_id, attempt).await? {
            Some(len) => len,
            // Only bytes at 0 begin a log: a gap makes no head.
            None if offset > 0 => return Err(LogError::Gap { offset, len: 0 }),
            None => Self::make_and_lock_len(&mut tx, run_id, attempt).await?,
        };
        if offset > len {
            return Err(LogError::Gap { offset, len });
        }
        let data = new_bytes(chunks, offset, len);
        if data.is_empty() {
            // All of it is stored already (a batch sent again); dropping the
            // transaction rolls it back, writing nothing.
            return Ok(len);
        }
        let end = len
            .checked_add(data.len() as u64)
            .filter(|&end| end <= i64::MAX as u64)
            .ok_or_else(|| failed(run_id, attempt, "appending", "the log would be too long"))?;
        sqlx::query(
            "INSERT INTO log_chunks (run_id, attempt, \"offset\", data) VALUES ($1, $2, $3, $4)",
        )
        .bind(run_id.to_string())
        .bind(i64::from(attempt))
        .bind(to_db(len))
        .bind(&data[..])
        .execute(&mut *tx)
        .await
        .map_err(|e| failed(run_id, attempt, "storing a chunk", e))?;
        sqlx::query("UPDATE log_heads SET len = $3 WHERE run_id = $1 AND attempt = $2")
            .bind(run_id.to_string())
            .bind(i64::from(attempt))
            .bind(to_db(end))
            .execute(&mut *tx)
            .await
            .map_err(|e| failed(run_id, attempt, "storing its length", e))?;
        tx.commit()
            .await
            .map_err(|e| failed(run_id, attempt, "committing an append", e))?;
        Ok(end)
    }

    async fn sync(&self, _run_id: RunId, _attempt: u32) -> Result<(), LogError> {
        // Nothing to do: an append returns only once its transaction committed, and a
        // committed transaction is durable (the database's WAL was flushed for it).
        Ok(())
    }

    async fn len(&self, run_id: RunId, attempt: u32) -> Result<u64, LogError> {
        let len: Option<i64> =
            sqlx::query_scalar("SELECT len FROM log_heads WHERE run_id = $1 AND attempt = $2")
                .bind(run_id.to_string())
                .bind(i64::from(attempt))
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| failed(run_id, attempt, "reading its length", e))?;
        len.map_or(Ok(0), |n| {
            u64::try_from(n).map_err(|e| failed(run_id, attempt, "its length", e))
        })
    }

    async fn delete_run(&self, run_id: RunId, attempts: u32) -> Result<bool, LogError> {
        let gone = |what: &str, e: sqlx::Error| {
            LogError::Io(format!(
                "logs of run {run_id} attempts 1..={attempts}: {what}: {e}"
            ))
        };
        let mut tx = self
            .pool
            .begin_with(BEGIN)
            .await
            .map_err(|e| gone("starting the delete", e))?;
        // Heads first: deleting one waits for an append holding it, so the chunks'
        // delete after it sees that append's chunk too. The other way round it could
        // miss the chunk, and leave one with no head to say where the log ends.
        let heads =
            sqlx::query("DELETE FROM log_heads WHERE run_id = $1 AND attempt BETWEEN 1 AND $2")
                .bind(run_id.to_string())
                .bind(i64::from(attempts))
                .execute(&mut *tx)
                .await
                .map_err(|e| gone("deleting the heads", e))?;
        let chunks =
            sqlx::query("DELETE FROM log_chunks WHERE run_id = $1 AND attempt BETWEEN 1 AND $2")
                .bind(run_id.to_string())
                .bind(i64::from(attempts))
                .execute(&mut *tx)
                .await
                .map_err(|e| gone("deleting the chunks", e))?;
        tx.commit()
            .await
            .map_err(|e| gone("committing the delete", e))?;
        Ok(heads.rows_affected() > 0 || chunks.rows_affected() > 0)
    }

    async fn read(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        max: usize,
    ) -> Result<Bytes, LogError> {
        // Nothing lies past i64::MAX, where no log reaches.
        let Ok(from) = i64::try_from(offset) else {
            return Ok(Bytes::new());
        };
        if max == 0 {
            return Ok(Bytes::new());
        }
        let until = from.saturating_add(i64::try_from(max).unwrap_or(i64::MAX));
        // One statement, so one snapshot: the head's length (a row with start -1), then
        // the chunk holding `from` (the last one starting at or before it, by the
        // primary key) and those starting before `until`, each cut to the range in the
        // database, so a short read of a long chunk does not fetch all of it.
        let rows = sqlx::query(
            "WITH head AS (SELECT len FROM log_heads WHERE run_id = $1 AND attempt = $2), \
                  c AS ((SELECT \"offset\", data FROM log_chunks \
                         WHERE run_id = $1 AND attempt = $2 AND \"offset\" <= $3 \
                         ORDER BY \"offset\" DESC LIMIT 1) \
                        UNION ALL \
                        (SELECT \"offset\", data FROM log_chunks \
                         WHERE run_id = $1 AND attempt = $2 \
                           AND \"offset\" > $3 AND \"offset\" < $4)) \
             SELECT -1::BIGINT AS start, NULL::BYTEA AS piece, len FROM head \
             UNION ALL \
             SELECT c.\"offset\", \
                    substring(c.data \
                        FROM (LEAST(GREATEST($3 - c.\"offset\", 0), length(c.data)) + 1)::INT \
                        FOR LEAST($4 - GREATEST(c.\"offset\", $3), length(c.data))::INT), \
                    NULL::BIGINT \
             FROM c WHERE c.\"offset\" + length(c.data) > $3 \
             ORDER BY start",
        )
        .bind(run_id.to_string())
        .bind(i64::from(attempt))
        .bind(from)
        .bind(until)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| failed(run_id, attempt, "reading chunks", e))?;
        let mut len = 0;
        let mut pieces = Vec::with_capacity(rows.len());
        for row in rows {
            let start: i64 = row
                .try_get("start")
                .map_err(|e| failed(run_id, attempt, "reading a chunk's offset", e))?;
            if start < 0 {
                len = row
                    .try_get("len")
                    .map_err(|e| failed(run_id, attempt, "reading its length", e))?;
            } else {
                let piece: Vec<u8> = row
                    .try_get("piece")
                    .map_err(|e| failed(run_id, attempt, "reading a chunk", e))?;
                pieces.push((start, piece));
            }
        }
        assemble(from, until, len, pieces).map_err(|why| failed(run_id, attempt, "reading", why))
    }
}

/// The log's bytes in `[from, until)` from the pieces read (each with the offset of its
/// chunk, already cut to the range, in order) and the log's length `len`. The pieces
/// must tile the range up to the log's end: a hole, an overlap or bytes past the length
/// is a damaged log, refused with the reason, not handed out as a short or long read.
fn assemble(
    from: i64,
    until: i64,
    len: i64,
    mut pieces: Vec<(i64, Vec<u8>)>,
) -> Result<Bytes, String> {
    let mut at = from;
    for (start, piece) in &pieces {
        if (*start).max(from) != at {
            return Err(format!(
                "the chunk at {start} does not continue the log at {at}"
            ));
        }
        at = at.saturating_add(i64::try_from(piece.len()).unwrap_or(i64::MAX));
    }
    let end = if from < len { until.min(len) } else { from };
    if at != end {
        return Err(format!(
            "the log holds {len} bytes, but its chunks from {from} end at {at}, not {end}"
        ));
    }
    if pieces.len() == 1 {
        // One chunk: its buffer as it came, not a copy.
        return Ok(Bytes::from(pieces.swap_remove(0).1));
    }
    let mut out = BytesMut::with_capacity(usize::try_from(at - from).unwrap_or(0));
    for (_, piece) in &pieces {
        out.extend_from_slice(piece);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logsink::suite;
    use crate::store::testdb::{self, TestDb};

    async fn open() -> (PgLogSink, TestDb) {
        let (store, db) = testdb::open().await;
        (PgLogSink::new(store.shared_pool()), db)
    }

    suite::log_sink_suite!(open);

    fn chunk(bytes: &'static [u8]) -> OutputChunk {
        OutputChunk {
            stream: crate::domain::ports::Stream::Stdout,
            bytes: Bytes::from_static(bytes),
        }
    }

    /// The attempt's rows: its head's length and each chunk's offset and bytes.
    async fn rows(pool: &PgPool, id: RunId) -> (Option<i64>, Vec<(i64, Vec<u8>)>) {
        let head = sqlx::query_scalar("SELECT len FROM log_heads WHERE run_id = $1")
            .bind(id.to_string())
            .fetch_optional(pool)
            .await
            .unwrap();
        let chunks = sqlx::query_as(
            "SELECT \"offset\", data FROM log_chunks WHERE run_id = $1 ORDER BY \"offset\"",
        )
        .bind(id.to_string())
        .fetch_all(pool)
        .await
        .unwrap();
        (head, chunks)
    }

    #[tokio::test]
    async fn an_append_stores_its_new_bytes_as_one_chunk_or_writes_nothing() {
        let (sink, _db) = open().await;
        let id = RunId::new();
        // Neither a gap nor an empty batch makes a head.
        assert!(matches!(
            sink.append(id, 1, 2, &[chunk(b"x")]).await,
            Err(LogError::Gap { offset: 2, len: 0 })
        ));
        assert_eq!(sink.append(id, 1, 0, &[]).await.unwrap(), 0);
        assert_eq!(rows(&sink.pool, id).await, (None, vec![]));

        sink.append(id, 1, 0, &[chunk(b"ab"), chunk(b"c")])
            .await
            .unwrap();
        sink.append(id, 1, 0, &[chunk(b"abc")]).await.unwrap();
        sink.append(id, 1, 1, &[chunk(b"b"), chunk(b"cd"), chunk(b"ef")])
            .await
            .unwrap();
        assert_eq!(
            rows(&sink.pool, id).await,
            (Some(6), vec![(0, b"abc".to_vec()), (3, b"def".to_vec())])
        );
    }

    #[test]
    fn pieces_that_do_not_tile_the_range_up_to_the_length_are_refused() {
        let p = |start: i64, bytes: &[u8]| (start, bytes.to_vec());
        let ok = assemble(1, 9, 6, vec![p(0, b"bc"), p(3, b"def")]).unwrap();
        assert_eq!(&ok[..], b"bcdef");
        assert_eq!(&assemble(2, 4, 6, vec![p(0, b"cd")]).unwrap()[..], b"cd");
        assert!(assemble(6, 9, 6, vec![]).unwrap().is_empty());
        assert!(assemble(0, 9, 0, vec![]).unwrap().is_empty());
        // A hole, an overlap, a short tail, bytes past the length or with no head.
        for (from, until, len, pieces) in [
            (0, 9, 6, vec![p(0, b"ab"), p(3, b"def")]),
            (0, 9, 6, vec![p(0, b"abc"), p(2, b"cdef")]),
            (0, 9, 6, vec![p(0, b"abc")]),
            (0, 4, 6, vec![]),
            (6, 9, 6, vec![p(6, b"g")]),
            (0, 9, 0, vec![p(0, b"a")]),
        ] {
            let why = assemble(from, until, len, pieces.clone()).unwrap_err();
            assert!(why.contains("chunk"), "{pieces:?}: {why}");
        }
    }

    #[tokio::test]
    async fn a_missing_chunk_is_a_damaged_log_not_a_short_one() {
        let (sink, _db) = open().await;
        let id = RunId::new();
        for (at, bytes) in [(0, b"ab"), (2, b"cd"), (4, b"ef")] {
            sink.append(id, 1, at, &[chunk(bytes)]).await.unwrap();
        }
        sqlx::query("DELETE FROM log_chunks WHERE run_id = $1 AND \"offset\" = 2")
            .bind(id.to_string())
            .execute(&sink.pool)
            .await
            .unwrap();
        assert_eq!(&sink.read(id, 1, 0, 2).await.unwrap()[..], b"ab");
        assert_eq!(&sink.read(id, 1, 4, 9).await.unwrap()[..], b"ef");
        for (offset, max) in [(0, 6), (1, 4), (2, 1), (3, 9)] {
            match sink.read(id, 1, offset, max).await {
                Err(LogError::Io(why)) => assert!(why.contains(&id.to_string()), "{why}"),
                other => panic!("read({offset}, {max}): {other:?}"),
            }
        }
    }
}
