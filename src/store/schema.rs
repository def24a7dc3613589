//! weft's metadata schema, described once and rendered per dialect, with numbered migrations.
//!
//! The tables every store keeps the same way (row versions, log, frontiers, acknowledgements,
//! audit tables, strategy state) are listed in [`META_TABLES`] with logical column types;
//! `sqlite::schema` and `postgres::schema` render them (`_weft_rows` vs `weft.rows`, `BLOB`
//! vs `bytea`) and add what only they have (the outbox, which captures differently, the
//! applier and transfer marks of SQLite, the owners' key columns the triggers read).
//!
//! [`MIGRATIONS`] is the ordered history of the schema. A database records the last one it
//! ran (`schema_version` in the node table; a database from before numbering counts as 0),
//! and `install` runs the later ones, in order, in the install transaction: a database made
//! by any earlier weft upgrades in place, and a crash mid-upgrade leaves it as it was. Every
//! migration is idempotent, so a database that already has what one adds is left alone.

/// A column's logical type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Text,
    /// A 64-bit integer.
    Int,
    Bytes,
    /// A boolean (SQLite stores 0/1).
    Bool,
    /// An id the database assigns, the table's primary key.
    Serial,
}

#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub ty: Type,
    pub nullable: bool,
}

const fn col(name: &'static str, ty: Type) -> Column {
    Column {
        name,
        ty,
        nullable: false,
    }
}

const fn null(name: &'static str, ty: Type) -> Column {
    Column {
        name,
        ty,
        nullable: true,
    }
}

/// A metadata table: its unqualified name, columns and primary key (none with a `Serial`).
#[derive(Debug, Clone, Copy)]
pub struct TableDef {
    pub name: &'static str,
    pub columns: &'static [Column],
    pub key: &'static [&'static str],
}

use Type::{Bool, Bytes, Int, Serial, Text};

/// The metadata tables both dialects keep the same way.
pub const META_TABLES: &[TableDef] = &[
    TableDef {
        name: "rows",
        columns: &[
            col("tbl", Text),
            col("key", Bytes),
            col("version", Text),
            col("hlc", Int),
            col("origin", Text),
            col("deleted", Bool),
            // The digest of the image weft last wrote or captured for the row
            // (`checksum::recorded_image`); NULL when unknown (see `RowVersion::image`).
            null("image_sum", Int),
        ],
        key: &["tbl", "key"],
    },
    TableDef {
        name: "log",
        columns: &[
            col("origin", Text),
            col("seq", Int),
            col("batch_end", Int),
            col("committed_at", Int),
            col("event", Bytes),
        ],
        key: &["origin", "seq"],
    },
    TableDef {
        name: "frontier",
        columns: &[col("origin", Text), col("seq", Int), col("processed", Int)],
        key: &["origin"],
    },
    TableDef {
        name: "acks",
        columns: &[col("peer", Text), col("origin", Text), col("seq", Int)],
        key: &["peer", "origin"],
    },
    TableDef {
        name: "dead_letters",
        columns: &[
            col("id", Serial),
            col("origin", Text),
            col("seq", Int),
            col("tbl", Text),
            col("key", Text),
            col("reason", Text),
            col("event", Bytes),
            col("at", Int),
            col("attempts", Int),
            col("retry_at", Int),
            col("cause", Text),
        ],
        key: &[],
    },
    TableDef {
        name: "positions",
        columns: &[col("source", Text), col("next", Int)],
        key: &["source"],
    },
    TableDef {
        name: "conflicts",
        columns: &[
            col("id", Serial),
            col("tbl", Text),
            col("key", Text),
            col("strategy", Text),
            col("winner", Text),
            col("loser", Text),
            col("at", Int),
        ],
        key: &[],
    },
    TableDef {
        name: "crdt",
        columns: &[
            col("tbl", Text),
            col("key", Bytes),
            col("col", Text),
            col("state", Text),
        ],
        key: &["tbl", "key", "col"],
    },
    TableDef {
        name: "queue",
        columns: &[
            col("id", Serial),
            col("tbl", Text),
            col("key", Bytes),
            col("key_text", Text),
            col("opened_at", Int),
            null("closed_at", Int),
            null("closed_by", Text),
        ],
        key: &[],
    },
    TableDef {
        name: "siblings",
        columns: &[
            col("tbl", Text),
            col("key", Bytes),
            col("origin", Text),
            col("hlc", Int),
            col("event", Bytes),
        ],
        key: &["tbl", "key", "origin", "hlc"],
    },
    TableDef {
        name: "resolutions",
        columns: &[
            col("id", Serial),
            col("queue_id", Int),
            col("tbl", Text),
            col("key_text", Text),
            col("decided_by", Text),
            col("decision", Text),
            null("row", Text),
            col("at", Int),
        ],
        key: &[],
    },
    TableDef {
        name: "transfers",
        columns: &[
            col("id", Serial),
            col("tbl", Text),
            col("rows", Text),
            col("moved", Int),
            col("from_region", Text),
            col("to_region", Text),
            col("decided_by", Text),
            col("at", Int),
        ],
        key: &[],
    },
];

/// What one numbered migration does, rendered by each dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Every metadata table and index of this version, created where missing.
    Baseline,
    /// Owner records gain the key in columns the triggers can read, and `moving_to` (for
    /// databases made before owner rules and transfers on them).
    OwnerKeys,
    /// Dead letters gain `attempts` and `retry_at`: they are retried, with backoff.
    DeadLetterRetries,
    /// Dead letters gain their `cause`, indexed: storage is bounded per cause.
    DeadLetterCauses,
    /// Tables added since the baseline (`positions`): the baseline again, which creates
    /// only what is missing.
    NewTables,
    /// Row metadata gains `image_sum`, the digest of the image weft last wrote or captured
    /// for the row (NULL, unknown, for rows written before).
    ImageSums,
}

/// The schema's history, in order; a database's `schema_version` is the number of the last
/// one it ran (its index + 1).
pub const MIGRATIONS: &[(u32, &str, Step)] = &[
    (1, "baseline metadata tables", Step::Baseline),
    (2, "owner key columns and moving_to", Step::OwnerKeys),
    (3, "dead letter retries", Step::DeadLetterRetries),
    (4, "dead letter causes", Step::DeadLetterCauses),
    (5, "stream positions", Step::NewTables),
    (6, "row image digests", Step::ImageSums),
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The migrations a database at `version` still needs, in order.
pub fn pending(version: u32) -> impl Iterator<Item = &'static (u32, &'static str, Step)> {
    MIGRATIONS.iter().filter(move |(n, _, _)| *n > version)
}

/// `CREATE TABLE IF NOT EXISTS` of `def` as `name`, with `render` giving each column's SQL
/// type (and `serial` the whole definition of a `Serial` column).
pub fn create_table(
    def: &TableDef,
    name: &str,
    render: impl Fn(Type) -> &'static str,
    serial: &str,
    suffix: &str,
) -> String {
    let mut parts: Vec<String> = def
        .columns
        .iter()
        .map(|c| match c.ty {
            Serial => format!("{} {serial}", c.name),
            ty => format!(
                "{} {}{}",
                crate::store::sql::quote(c.name),
                render(ty),
                if c.nullable { "" } else { " NOT NULL" }
            ),
        })
        .collect();
    if !def.key.is_empty() {
        parts.push(format!("PRIMARY KEY ({})", def.key.join(", ")));
    }
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (\n    {}\n){suffix};\n",
        parts.join(",\n    ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, (n, _, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*n as usize, i + 1);
        }
        assert_eq!(pending(0).count(), MIGRATIONS.len());
        assert_eq!(pending(SCHEMA_VERSION).count(), 0);
        assert_eq!(pending(1).next().map(|m| m.0), Some(2));
    }

    #[test]
    fn a_table_renders_with_its_key_and_nullability() {
        let def = META_TABLES.iter().find(|t| t.name == "queue").unwrap();
        let sql = create_table(def, "q", |_| "T", "S", "");
        assert!(sql.contains("id S,"), "{sql}");
        assert!(sql.contains("\"closed_at\" T,"), "{sql}");
        assert!(sql.contains("\"tbl\" T NOT NULL"), "{sql}");
        let rows = META_TABLES.iter().find(|t| t.name == "rows").unwrap();
        assert!(
            create_table(rows, "r", |_| "T", "S", " WITHOUT ROWID")
                .contains("PRIMARY KEY (tbl, key)\n) WITHOUT ROWID;")
        );
    }
}
