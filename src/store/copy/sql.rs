//! The statements the copy runs, written for either backend from a table's description:
//! a batch read in primary-key order past the last key read, a count, a multi-row
//! insert. Identifiers are always quoted (`trigger` is a keyword in both).

use super::schema::{Kind, Table};

/// The two spellings the statements differ in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

/// At most this many bound values in one statement: under SQLite's limit (32766) and
/// PostgreSQL's (65535), so a wide table's batch is inserted in a few statements.
pub(super) const MAX_BINDS: usize = 30_000;

impl Dialect {
    /// The `n`-th (1-based) placeholder.
    fn param(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }

    /// A key column as it is ordered and compared: text byte-wise on PostgreSQL too
    /// (`COLLATE "C"`, SQLite's `BINARY`), so both sides walk, and checksum, the rows
    /// in one order whatever the database's locale.
    fn key(self, name: &str, kind: Kind) -> String {
        match (self, kind) {
            (Dialect::Postgres, Kind::Text) => format!("\"{name}\" COLLATE \"C\""),
            _ => format!("\"{name}\""),
        }
    }
}

/// `"a", "b", ...`: every column of the table.
fn column_list(table: &Table) -> String {
    let names: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("\"{}\"", c.name))
        .collect();
    names.join(", ")
}

/// Up to `?limit` rows in key order, the first batch (`after: false`), or the rows past
/// a key (`after: true`, bound to the first placeholders, the limit after them).
pub(super) fn select_batch(table: &Table, dialect: Dialect, after: bool) -> String {
    let keys: Vec<String> = table
        .key_columns()
        .iter()
        .map(|c| dialect.key(c.name, c.kind))
        .collect();
    let mut sql = format!("SELECT {} FROM \"{}\"", column_list(table), table.name);
    let mut n = 0;
    if after {
        let params: Vec<String> = (1..=keys.len()).map(|i| dialect.param(i)).collect();
        n = keys.len();
        sql.push_str(&format!(
            " WHERE ({}) > ({})",
            keys.join(", "),
            params.join(", ")
        ));
    }
    sql.push_str(&format!(
        " ORDER BY {} LIMIT {}",
        keys.join(", "),
        dialect.param(n + 1)
    ));
    sql
}

pub(super) fn count(table: &Table) -> String {
    format!("SELECT COUNT(*) FROM \"{}\"", table.name)
}

/// An insert of `rows` rows of every column.
pub(super) fn insert(table: &Table, dialect: Dialect, rows: usize) -> String {
    let width = table.columns.len();
    let mut sql = format!(
        "INSERT INTO \"{}\" ({}) VALUES ",
        table.name,
        column_list(table)
    );
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        let params: Vec<String> = (1..=width).map(|c| dialect.param(r * width + c)).collect();
        sql.push('(');
        sql.push_str(&params.join(", "));
        sql.push(')');
    }
    sql
}

/// How many rows of the table one insert statement takes.
pub(super) fn rows_per_insert(table: &Table) -> usize {
    (MAX_BINDS / table.columns.len().max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::super::schema::TABLES;
    use super::*;

    #[test]
    fn reads_walk_the_key_byte_wise_and_inserts_bind_every_column() {
        let slots = TABLES
            .iter()
            .find(|t| t.name == "schedule_slots")
            .unwrap_or_else(|| panic!("no schedule_slots"));
        assert_eq!(
            select_batch(slots, Dialect::Postgres, true)
                .split(" FROM ")
                .nth(1),
            Some(
                "\"schedule_slots\" WHERE (\"job\" COLLATE \"C\", \"schedule\" COLLATE \"C\", \
                 \"nominal\") > ($1, $2, $3) ORDER BY \"job\" COLLATE \"C\", \"schedule\" \
                 COLLATE \"C\", \"nominal\" LIMIT $4"
            )
        );
        assert!(
            select_batch(slots, Dialect::Sqlite, false)
                .ends_with("ORDER BY \"job\", \"schedule\", \"nominal\" LIMIT ?1")
        );
        let runs = &TABLES[0];
        let sql = insert(runs, Dialect::Postgres, 2);
        assert!(sql.contains("\"trigger\""), "{sql}");
        assert!(
            sql.ends_with(&format!("${})", 2 * runs.columns.len())),
            "{sql}"
        );
        assert!(rows_per_insert(runs) * runs.columns.len() <= MAX_BINDS);
    }
}
