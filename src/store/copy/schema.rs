//! The tables `tasuki store copy` moves, as both schemas have them (PostgreSQL's
//! migration 0001 is SQLite's schema after its migration 13, column for column), and
//! the backend-neutral row they are read into: one `Value` per column, flags as
//! booleans whichever side they came from. Also the canonical text of a row, which the
//! verification's checksums are taken over.

use sha2::{Digest, Sha256};

/// What a column holds. Both schemas agree on it, except that a flag is an INTEGER 0/1
/// in SQLite and a BOOLEAN in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Int,
    Real,
    Text,
    Flag,
}

/// One column: its name and what it holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Column {
    pub name: &'static str,
    pub kind: Kind,
}

const fn int(name: &'static str) -> Column {
    Column {
        name,
        kind: Kind::Int,
    }
}
const fn real(name: &'static str) -> Column {
    Column {
        name,
        kind: Kind::Real,
    }
}
const fn text(name: &'static str) -> Column {
    Column {
        name,
        kind: Kind::Text,
    }
}
const fn flag(name: &'static str) -> Column {
    Column {
        name,
        kind: Kind::Flag,
    }
}

/// A table as the copy reads and writes it.
#[derive(Debug)]
pub(super) struct Table {
    pub name: &'static str,
    /// Every column the copy moves, the primary key's first (in key order).
    pub columns: &'static [Column],
    /// How many of `columns`, from the first, make the primary key.
    pub key: usize,
    /// The key is an `id` PostgreSQL numbers from a sequence (BIGSERIAL), which must be
    /// set past the largest copied id.
    pub serial: bool,
}

impl Table {
    pub fn key_columns(&self) -> &'static [Column] {
        &self.columns[..self.key]
    }

    /// The key of one of this table's rows.
    pub fn key_of<'r>(&self, row: &'r Row) -> &'r [Value] {
        &row[..self.key]
    }
}

/// Every table of the schema that holds an installation's state, parents before
/// children (attempts, outbox rows, keys, deliveries and replies name their run). Left
/// out: what only a running process needs (PostgreSQL's `duty_leases`, and
/// `outbox.claimed_until`, a relay's hold on a pending publish), and the logs, which go
/// through the log sinks.
pub(super) const TABLES: &[Table] = &[
    Table {
        name: "runs",
        columns: &[
            text("id"),
            text("job"),
            text("params"),
            text("spec"),
            text("status"),
            int("attempt"),
            int("epoch"),
            int("exit_code"),
            text("reason"),
            text("reason_code"),
            flag("cancel_requested"),
            int("not_before"),
            int("created_at"),
            int("started_at"),
            int("finished_at"),
            text("retry"),
            int("log_dropped_bytes"),
            text("trigger"),
            text("admission"),
            flag("admitted"),
            text("callback_url"),
            text("requested_by"),
            flag("output_gap"),
        ],
        key: 1,
        serial: false,
    },
    ATTEMPTS,
    Table {
        name: "outbox",
        columns: &[
            int("id"),
            text("run_id"),
            int("attempt"),
            int("created_at"),
            int("sent_at"),
            int("tries"),
            text("last_error"),
            int("not_before"),
            flag("last_try_failed"),
        ],
        key: 1,
        serial: true,
    },
    Table {
        name: "idempotency_keys",
        columns: &[
            text("scope"),
            text("key"),
            text("job"),
            text("params"),
            text("run_id"),
            int("created_at"),
        ],
        key: 2,
        serial: false,
    },
    Table {
        name: "worker_sessions",
        columns: &[
            text("worker_id"),
            text("instance"),
            text("host"),
            int("pid"),
            int("started_at"),
            int("expires_at"),
            int("ended_at"),
            text("build"),
        ],
        key: 1,
        serial: false,
    },
    Table {
        name: "schedule_slots",
        columns: &[
            text("job"),
            text("schedule"),
            int("nominal"),
            int("fire_at"),
            text("business_date"),
            text("outcome"),
            text("run_id"),
            text("reason"),
            text("detail"),
            int("recorded_at"),
        ],
        key: 3,
        serial: false,
    },
    Table {
        name: "schedule_cursors",
        columns: &[
            text("job"),
            text("schedule"),
            int("evaluated_until"),
            text("definition"),
        ],
        key: 2,
        serial: false,
    },
    Table {
        name: "schedule_pauses",
        columns: &[text("job"), text("schedule"), text("note"), int("at")],
        key: 2,
        serial: false,
    },
    Table {
        name: "callback_deliveries",
        columns: &[
            int("id"),
            text("run_id"),
            text("url"),
            text("event"),
            text("event_id"),
            int("created_at"),
            int("tries"),
            int("last_status"),
            text("last_error"),
            int("next_try_at"),
            int("delivered_at"),
            flag("gave_up"),
        ],
        key: 1,
        serial: true,
    },
    Table {
        name: "run_replies",
        columns: &[
            int("id"),
            text("run_id"),
            text("kind"),
            text("reply_to"),
            text("correlation_id"),
            text("state"),
            int("tries"),
            text("last_error"),
            int("next_try_at"),
            int("created_at"),
            int("sent_at"),
        ],
        key: 1,
        serial: true,
    },
];

const ATTEMPTS: Table = Table {
    name: "attempts",
    columns: &[
        text("run_id"),
        int("attempt"),
        text("worker_id"),
        int("epoch"),
        int("lease_expires_at"),
        text("container_id"),
        text("status"),
        int("exit_code"),
        text("reason"),
        text("reason_code"),
        int("claimed_at"),
        int("started_at"),
        int("finished_at"),
        int("log_dropped_bytes"),
        int("log_undelivered_bytes"),
        int("usage_samples"),
        int("usage_peak_memory_bytes"),
        real("usage_cpu_seconds"),
        int("usage_memory_limit_bytes"),
        real("usage_cpu_limit"),
        flag("output_gap"),
        text("worker_build"),
    ],
    key: 2,
    serial: false,
};

/// The attempts' keys alone: which logs there are to copy and compare.
pub(super) const ATTEMPT_KEYS: Table = Table {
    name: "attempts",
    columns: ATTEMPTS.columns.split_at(2).0,
    key: 2,
    serial: false,
};

/// Tables a store has that the copy leaves alone on purpose (runtime state, logs,
/// bookkeeping of the migrations and of SQLite itself); the schema test checks that
/// every other table is in `TABLES`.
#[cfg(test)]
pub(super) const NOT_COPIED: &[&str] = &[
    "_sqlx_migrations",
    "sqlite_sequence",
    "duty_leases",
    "log_heads",
    "log_chunks",
];

/// Columns of copied tables the copy leaves alone on purpose: (table, column).
#[cfg(test)]
pub(super) const COLUMNS_NOT_COPIED: &[(&str, &str)] = &[("outbox", "claimed_until")];

/// One column's value. NULL is `None` of the column's kind, so a NULL is bound with
/// the type PostgreSQL expects for the column.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Flag(Option<bool>),
}

/// One row: a value per column of its table, in the table's column order.
pub(super) type Row = Vec<Value>;

impl Value {
    /// The value's canonical text: the same for the same value whichever backend it was
    /// read from. Text is a JSON string (so no separator can occur in it unquoted), a
    /// float Rust's shortest round-trip form, a flag `true`/`false`, NULL `null`.
    fn canonical(&self, out: &mut String) {
        use std::fmt::Write;
        match self {
            Value::Int(None) | Value::Real(None) | Value::Text(None) | Value::Flag(None) => {
                out.push_str("null")
            }
            Value::Int(Some(n)) => {
                let _ = write!(out, "{n}");
            }
            Value::Real(Some(x)) => {
                let _ = write!(out, "{x:?}");
            }
            Value::Text(Some(s)) => {
                // Serialising a string cannot fail.
                out.push_str(&serde_json::to_string(s).unwrap_or_default());
            }
            Value::Flag(Some(b)) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
}

/// A table's rows counted and hashed in primary-key order (SHA-256 over the column
/// names, then each row's canonical text: its values tab-separated, newline-ended).
pub(super) struct Summing {
    rows: u64,
    hash: Sha256,
    line: String,
}

/// A table's (or the logs') row count and checksum, on one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub rows: u64,
    pub sha256: [u8; 32],
}

impl Summary {
    /// The checksum's first `n` hex digits, for a report.
    pub fn prefix(&self, n: usize) -> String {
        hex(&self.sha256).chars().take(n).collect()
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl Summing {
    pub fn new(table: &Table) -> Summing {
        let mut hash = Sha256::new();
        let names: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
        hash.update(names.join("\t").as_bytes());
        hash.update(b"\n");
        Summing {
            rows: 0,
            hash,
            line: String::new(),
        }
    }

    pub fn add(&mut self, row: &Row) {
        self.line.clear();
        for (i, value) in row.iter().enumerate() {
            if i > 0 {
                self.line.push('\t');
            }
            value.canonical(&mut self.line);
        }
        self.line.push('\n');
        self.hash.update(self.line.as_bytes());
        self.rows += 1;
    }

    pub fn finish(self) -> Summary {
        Summary {
            rows: self.rows,
            sha256: self.hash.finalize().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_puts_its_key_first_and_numbers_only_an_id() {
        for table in TABLES {
            assert!(
                table.key >= 1 && table.key <= table.columns.len(),
                "{}",
                table.name
            );
            if table.serial {
                assert_eq!(table.key, 1, "{}", table.name);
                assert_eq!(table.columns[0].name, "id", "{}", table.name);
                assert_eq!(table.columns[0].kind, Kind::Int, "{}", table.name);
            }
        }
        assert_eq!(TABLES[0].name, "runs", "parents first");
        assert_eq!(ATTEMPT_KEYS.key_columns().len(), 2);
    }

    #[test]
    fn canonical_text_tells_values_apart_and_ignores_where_they_came_from() {
        // schedule_pauses: text, text, text, int
        let Some(table) = TABLES.iter().find(|t| t.name == "schedule_pauses") else {
            panic!("no schedule_pauses")
        };
        let sum = |rows: &[Row]| {
            let mut s = Summing::new(table);
            rows.iter().for_each(|r| s.add(r));
            s.finish()
        };
        let row = |a: &str, b: &str, note: Option<&str>, at: i64| {
            vec![
                Value::Text(Some(a.into())),
                Value::Text(Some(b.into())),
                Value::Text(note.map(Into::into)),
                Value::Int(Some(at)),
            ]
        };
        let one = sum(&[row("j", "s", None, 1)]);
        assert_eq!(one, sum(&[row("j", "s", None, 1)]));
        assert_eq!(one.rows, 1);
        // A tab or a quote inside a text cannot pass for a separator; NULL is not "null".
        assert_ne!(
            sum(&[row("j\ts", "", None, 1)]),
            sum(&[row("j", "s", None, 1)])
        );
        assert_ne!(
            sum(&[row("j", "s", Some("null"), 1)]),
            sum(&[row("j", "s", None, 1)])
        );
        // Order matters: the checksum is over rows in key order.
        let (a, b) = (row("a", "s", None, 1), row("b", "s", None, 1));
        assert_ne!(sum(&[a.clone(), b.clone()]), sum(&[b, a]));
        let mut line = String::new();
        Value::Real(Some(0.1)).canonical(&mut line);
        line.push(' ');
        Value::Flag(Some(false)).canonical(&mut line);
        assert_eq!(line, "0.1 false");
        assert_eq!(one.prefix(8).len(), 8);
    }
}
