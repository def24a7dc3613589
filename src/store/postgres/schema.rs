//! PostgreSQL schema: weft's metadata tables (schema `weft`) and the capture triggers.
//!
//! `install` is idempotent. Each replicated table gets statement-level triggers (one per
//! event, with transition tables) that write every changed row's whole image (`to_jsonb`)
//! to `weft.outbox` in the application's own transaction and wake the sidecar with
//! `NOTIFY weft_capture`. They skip writes made by the applier, whose transactions
//! `SET LOCAL weft.applying = 'on'`. Because every
//! outbox row carries its image, a drain reads each source transaction exactly as it
//! committed, whatever commits while it runs. Generated columns are not replicated: each
//! region computes them. Ownership tables also get a row-level `weft_owner` trigger that
//! refuses writes outside the owner region (see `owner_sql`), and `install` checks each
//! table's strategy settings against its column types.
use sqlx::{AssertSqlSafe, PgConnection, Row as _};

use super::values::Kind;
use crate::config::{OwnerRule, TableConfig};
use crate::store::StoreError;
use crate::store::engine::TableRules as _;
use crate::store::schema::{self, META_TABLES, Step, Type, create_table};
use crate::store::sql::rule_case;
pub use crate::store::sql::{literal, quote};
use crate::store::table::{ColumnTypes, Need, Table};

/// The notification channel the capture triggers signal.
pub const CHANNEL: &str = "weft_capture";

/// What only PostgreSQL has, or has its own way: the node record, the outbox of row images
/// (vacuumed often: it is a queue), owner records with the key as text for the ownership
/// triggers, and the `now` function the triggers and audit records use.
const DIALECT_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS weft.outbox (
    id bigserial PRIMARY KEY,
    tbl text NOT NULL,
    deleted boolean NOT NULL,
    image jsonb NOT NULL,
    at bigint NOT NULL
);
ALTER TABLE weft.outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000);
CREATE TABLE IF NOT EXISTS weft.owners (
    tbl text NOT NULL,
    key bytea NOT NULL,
    owner text NOT NULL,
    epoch bigint NOT NULL,
    moving_to text,
    ktext text[] NOT NULL,
    PRIMARY KEY (tbl, key)
);
CREATE INDEX IF NOT EXISTS owners_by_key ON weft.owners (tbl, ktext);
CREATE OR REPLACE FUNCTION weft.now_micros() RETURNS bigint LANGUAGE sql VOLATILE AS
$$ SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint $$;
"#;

/// The schema and the node record come first: the record holds the schema version.
const NODE_TABLE: &str = "CREATE SCHEMA IF NOT EXISTS weft; CREATE TABLE IF NOT EXISTS weft.node (name text PRIMARY KEY, value text NOT NULL)";

fn column_type(ty: Type) -> &'static str {
    match ty {
        Type::Text => "text",
        Type::Int => "bigint",
        Type::Bool => "boolean",
        Type::Bytes => "bytea",
        Type::Serial => "bigserial PRIMARY KEY",
    }
}

/// Every metadata table and index, as this version has them.
fn baseline() -> String {
    let mut sql = String::from(DIALECT_TABLES);
    for def in META_TABLES {
        let name = format!("weft.{}", def.name);
        sql += &create_table(def, &name, column_type, column_type(Type::Serial), "");
    }
    sql += "CREATE UNIQUE INDEX IF NOT EXISTS queue_open ON weft.queue (tbl, key) WHERE closed_at IS NULL;\n";
    sql
}

/// Runs the migrations this database has not run yet, recording each (see `store::schema`).
async fn migrate(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql(NODE_TABLE).execute(&mut *conn).await?;
    let version: Option<String> = sqlx::query_scalar("SELECT value FROM weft.node WHERE name = 'schema_version'")
        .fetch_optional(&mut *conn)
        .await?;
    let version = version.and_then(|v| v.parse().ok()).unwrap_or(0);
    for (number, name, step) in schema::pending(version) {
        tracing::info!(migration = number, name, "upgrading weft's metadata schema");
        match step {
            Step::Baseline => {
                sqlx::raw_sql(AssertSqlSafe(baseline())).execute(&mut *conn).await?;
            }
            // PostgreSQL owner records had their key columns from the start.
            Step::OwnerKeys => {}
            Step::DeadLetterRetries => {
                sqlx::raw_sql(
                    "ALTER TABLE weft.dead_letters ADD COLUMN IF NOT EXISTS attempts bigint NOT NULL DEFAULT 0, \
                     ADD COLUMN IF NOT EXISTS retry_at bigint NOT NULL DEFAULT 0",
                )
                .execute(&mut *conn)
                .await?;
            }
            Step::NewTables => {
                sqlx::raw_sql(AssertSqlSafe(baseline())).execute(&mut *conn).await?;
            }
            Step::ImageSums => {
                sqlx::raw_sql("ALTER TABLE weft.rows ADD COLUMN IF NOT EXISTS image_sum bigint")
                    .execute(&mut *conn)
                    .await?;
            }
            Step::DeadLetterCauses => {
                sqlx::raw_sql(
                    "ALTER TABLE weft.dead_letters ADD COLUMN IF NOT EXISTS cause text NOT NULL DEFAULT 'other'; \
                     CREATE INDEX IF NOT EXISTS dead_letters_cause ON weft.dead_letters (cause)",
                )
                .execute(&mut *conn)
                .await?;
            }
        }
        sqlx::query(
            "INSERT INTO weft.node (name, value) VALUES ('schema_version', $1) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(number.to_string())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The column lists of a table's UNIQUE constraints and indexes besides the primary key,
/// leaving out partial and expression indexes.
async fn unique_indexes(conn: &mut PgConnection, table: &str) -> Result<Vec<Vec<String>>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT array_agg(a.attname::text ORDER BY k.n) \
         FROM pg_index i \
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, n) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att \
         WHERE i.indrelid = to_regclass($1) AND i.indisunique AND NOT i.indisprimary \
           AND i.indpred IS NULL AND i.indexprs IS NULL \
         GROUP BY i.indexrelid ORDER BY i.indexrelid",
    )
    .bind(format!("public.{}", quote(table)))
    .fetch_all(&mut *conn)
    .await?)
}

/// What PostgreSQL adds to a table description: the declared type of each replicated
/// (non-generated) column, in table order, and how its values are read.
#[derive(Debug, Clone)]
pub struct PgColumns {
    pub types: Vec<String>,
    pub kinds: Vec<Kind>,
    /// Index into `columns` of each key column.
    pub key_index: Vec<usize>,
    /// The replicated columns again, so a type can be found by name.
    names: Vec<String>,
    /// The columns of each UNIQUE constraint or index besides the primary key (not partial,
    /// no expressions): what a unique collision between two regions' rows is found by.
    pub unique: Vec<Vec<String>>,
}

/// A replicated table of a PostgreSQL database.
pub type PgTable = Table<PgColumns>;

impl ColumnTypes for PgColumns {
    fn fits(&self, column: &str, need: Need) -> Result<(), String> {
        let Some(i) = self.names.iter().position(|c| c == column) else {
            return Err("missing".into());
        };
        let fits = match need {
            Need::Counter | Need::IntegerKey => self.kinds[i] == Kind::Int,
            Need::Text | Need::TextKey => self.kinds[i] == Kind::Text,
        };
        if fits { Ok(()) } else { Err(self.types[i].clone()) }
    }

    fn key_advisory(&self, table: &str, key: &[String]) -> Option<String> {
        let texts = ["text", "character varying", "varchar"];
        let inexact: Vec<String> = key
            .iter()
            .filter_map(|k| {
                let i = self.names.iter().position(|c| c == k)?;
                let exact = matches!(self.kinds[i], Kind::Int | Kind::Bytes)
                    || texts.iter().any(|t| self.types[i].starts_with(t));
                (!exact).then(|| format!("`{k}` ({})", self.types[i]))
            })
            .collect();
        (!inexact.is_empty()).then(|| {
            format!(
                "table `{table}` is keyed by {}: such a key travels as PostgreSQL's text, and a SQLite region \
                 stores what its application writes as a number or in another spelling, so one row can get two \
                 identities in a mesh with SQLite regions. Key replicated tables by integers or text there",
                inexact.join(", ")
            )
        })
    }
}

impl PgTable {
    /// The declared type of a column.
    pub fn type_of(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        Some(&self.types[i])
    }

    /// The kind of a column.
    pub fn kind_of(&self, column: &str) -> Option<Kind> {
        let i = self.columns.iter().position(|c| c == column)?;
        Some(self.kinds[i])
    }

    /// `ARRAY[$first::text::type::text, ...]` over the key columns: the key as the text the
    /// ownership triggers compare (`ARRAY[row.k::text, ...]`).
    pub fn key_text_array(&self, first: usize) -> String {
        let items = self
            .key_index
            .iter()
            .enumerate()
            .map(|(i, &c)| format!("${}::text::{}::text", first + i, self.types[c]))
            .collect::<Vec<_>>()
            .join(", ");
        format!("ARRAY[{items}]::text[]")
    }

    /// `values` as text for `columns`, to bind and cast to their declared types; `Err` says
    /// why a column cannot hold its value (or does not exist).
    pub fn texts(&self, columns: &[String], values: &[&crate::event::Value]) -> Result<Vec<Option<String>>, String> {
        columns
            .iter()
            .zip(values)
            .map(|(c, v)| match self.kind_of(c) {
                Some(kind) => kind.text(v).map_err(|e| format!("column `{c}`: {e}")),
                None => Err(format!("column `{c}` does not exist in table `{}`", self.name)),
            })
            .collect()
    }

    /// `t.k1 = $first::text::type AND ...` over the key columns.
    pub fn key_predicate(&self, first: usize) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, k)| {
                format!(
                    "t.{} = ${}::text::{}",
                    quote(k),
                    first + i,
                    self.types[self.key_index[i]]
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    pub fn qualified(&self) -> String {
        format!("public.{}", quote(&self.name))
    }

    /// `alias.c1::kind, alias.c2::kind, ...` over all replicated columns.
    pub fn select_list(&self, alias: &str) -> String {
        self.columns
            .iter()
            .zip(&self.kinds)
            .map(|(c, k)| k.select(&format!("{alias}.{}", quote(c))))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The capture triggers of a table: (name, event).
/// The trigger refusing TRUNCATE of a replicated table.
const TRUNCATE_TRIGGER: &str = "weft_refuse_truncate";

const TRIGGERS: [(&str, &str); 3] = [
    ("weft_capture_ins", "INSERT"),
    ("weft_capture_upd", "UPDATE"),
    ("weft_capture_del", "DELETE"),
];

/// Functions and statement-level triggers capturing `table`. Each statement's rows are
/// written to the outbox in one `INSERT ... SELECT` from its transition tables (far cheaper
/// than a trigger call per row), followed by one `NOTIFY`. An update that changes a key
/// first records the old key as deleted.
fn capture_sql(table: &PgTable) -> String {
    let name = literal(&table.name);
    let q = table.qualified();
    let record = |deleted: bool, source: &str, filter: &str| {
        format!(
            "INSERT INTO weft.outbox (tbl, deleted, image, at) SELECT {name}, {deleted}, to_jsonb(r), stamp FROM {source} r{filter};"
        )
    };
    let key_kept = table
        .key
        .iter()
        .map(|k| format!("n.{0} = r.{0}", quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let bodies = [
        record(false, "weft_new", ""),
        format!(
            "{} {}",
            record(
                true,
                "weft_old",
                &format!(" WHERE NOT EXISTS (SELECT 1 FROM weft_new n WHERE {key_kept})")
            ),
            record(false, "weft_new", "")
        ),
        record(true, "weft_old", ""),
    ];
    // TRUNCATE fires no row or transition-table trigger, so it would empty this region's
    // table and no other: it is refused, with what to do instead.
    let mut sql = format!(
        "CREATE OR REPLACE FUNCTION weft.{function}() RETURNS trigger LANGUAGE plpgsql AS $weft$\n\
         BEGIN\n\
         RAISE EXCEPTION 'weft: TRUNCATE of % is not replicated; DELETE FROM % instead (it replicates), or stop replicating the table first', {name}, {name} USING ERRCODE = 'feature_not_supported';\n\
         END $weft$;\n\
         CREATE OR REPLACE TRIGGER {TRUNCATE_TRIGGER} BEFORE TRUNCATE ON {q} FOR EACH STATEMENT EXECUTE FUNCTION weft.{function}();\n",
        function = quote(&format!("{TRUNCATE_TRIGGER}_{}", table.name)),
    );
    for ((trigger, event), body) in TRIGGERS.iter().zip(bodies) {
        let function = format!("weft.{}", quote(&format!("{trigger}_{}", table.name)));
        let referencing = match *event {
            "INSERT" => "NEW TABLE AS weft_new",
            "UPDATE" => "OLD TABLE AS weft_old NEW TABLE AS weft_new",
            _ => "OLD TABLE AS weft_old",
        };
        sql += &format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql {CANONICAL_TEXT} AS $weft$\n\
             DECLARE stamp bigint := weft.now_micros();\n\
             BEGIN\n\
             IF current_setting('weft.applying', true) = 'on' THEN RETURN NULL; END IF;\n\
             {body}\n\
             PERFORM pg_notify('{CHANNEL}', {name});\n\
             RETURN NULL;\n\
             END $weft$;\n\
             CREATE OR REPLACE TRIGGER {trigger} AFTER {event} ON {q} REFERENCING {referencing} \
             FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n"
        );
    }
    sql
}

/// The capture functions render row images in weft's canonical text whatever the
/// application's session says: floats exact (an old driver's `extra_float_digits = 0` would
/// round them), intervals in ISO 8601 (`sql_standard` output changes meaning when read back
/// in another style), times in UTC.
const CANONICAL_TEXT: &str = "SET extra_float_digits = 3 SET intervalstyle = 'iso_8601' SET timezone = 'UTC'";

/// Reads a table's replicated columns, their types and its primary key.
pub async fn describe(conn: &mut PgConnection, table: &str) -> Result<PgTable, StoreError> {
    let problem = |message: String| StoreError::Table {
        table: table.to_owned(),
        message,
    };
    let rows = sqlx::query(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                coalesce(bt.typname, t.typname)::text, \
                coalesce((SELECT k.n FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, n) WHERE k.att = a.attnum), 0)::int4, a.attgenerated::text, \
                (a.attidentity <> '' OR coalesce(pg_get_expr(d.adbin, d.adrelid), '') LIKE 'nextval(%'), \
                a.attnum::int8 \
         FROM pg_attribute a \
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         JOIN pg_type t ON t.oid = a.atttypid \
         LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype \
         LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(format!("public.{}", quote(table)))
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Err(problem(
            "does not exist in schema public; create it before starting weft, or remove it from the config".into(),
        ));
    }
    let (mut columns, mut types, mut kinds, mut ids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut key: Vec<(i32, String)> = Vec::new();
    let mut auto_key = false;
    for row in rows {
        let name: String = row.try_get(0)?;
        let generated: String = row.try_get(4)?;
        let position: i32 = row.try_get(3)?;
        if !generated.is_empty() {
            if position > 0 {
                return Err(problem(format!(
                    "key column `{name}` is generated; weft needs a stored key"
                )));
            }
            continue;
        }
        if position > 0 {
            key.push((position, name.clone()));
            auto_key |= row.try_get::<bool, _>(5)?;
        }
        columns.push(name);
        types.push(row.try_get(1)?);
        kinds.push(Kind::of(&row.try_get::<String, _>(2)?));
        ids.push(row.try_get::<i64, _>(6)?);
    }
    if key.is_empty() {
        return Err(problem(
            "has no primary key; weft identifies rows by primary key, so add one (for example `id bigint PRIMARY KEY`)"
                .into(),
        ));
    }
    key.sort();
    let key: Vec<String> = key.into_iter().map(|(_, k)| k).collect();
    let key_index = key
        .iter()
        .map(|k| columns.iter().position(|c| c == k).expect("key columns are columns"))
        .collect();
    let unique = unique_indexes(conn, table).await?;
    let dialect = PgColumns {
        types,
        kinds,
        key_index,
        names: columns.clone(),
        unique,
    };
    let typed = columns.iter().cloned().zip(dialect.types.iter().cloned()).collect();
    let mut described = Table::described(table, typed, key, dialect);
    described.auto_key = auto_key;
    // attnum survives RENAME COLUMN, and a dropped column's number is never given again.
    described.column_ids = ids;
    Ok(described)
}

/// Queues, as deletions, the keys weft knows as live rows of a table that no longer has
/// them: the table lost its capture triggers (dropped and recreated, or swapped in by a
/// rename) and rows went while nothing captured. Returns how many were queued.
async fn recapture_deletes(conn: &mut PgConnection, table: &PgTable, region: &str) -> Result<u64, StoreError> {
    // Rows another region owns are not this region's to delete (`store::table::left_foreign`).
    let live: Vec<(Vec<u8>, bool)> = sqlx::query_as(
        "SELECT r.key, EXISTS (SELECT 1 FROM weft.owners w WHERE w.tbl = r.tbl AND w.key = r.key \
          AND w.moving_to IS NULL AND w.owner IS DISTINCT FROM $2) \
         FROM weft.rows r WHERE r.tbl = $1 AND NOT r.deleted",
    )
    .bind(&table.name)
    .bind(region)
    .fetch_all(&mut *conn)
    .await?;
    let (mut images, mut foreign) = (Vec::new(), Vec::new());
    for (bytes, elsewhere) in live {
        let key = crate::event::Key::from_bytes(&bytes).map_err(StoreError::Corrupt)?;
        let values: Vec<&crate::event::Value> = key.0.iter().collect();
        // A key this table cannot hold any more cannot be one of its rows either.
        let Ok(texts) = table.texts(&table.key, &values) else {
            continue;
        };
        let image: serde_json::Map<String, serde_json::Value> = table
            .key
            .iter()
            .zip(texts)
            .map(|(k, t)| (k.clone(), t.map_or(serde_json::Value::Null, serde_json::Value::String)))
            .collect();
        let image = serde_json::Value::Object(image).to_string();
        match elsewhere {
            true => foreign.push(image),
            false => images.push(image),
        }
    }
    let same_key = table
        .key
        .iter()
        .map(|k| format!("r.{0} = x.{0}", quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let missing = format!(
        "FROM unnest($1::text[]) AS k(image) \
         CROSS JOIN LATERAL jsonb_populate_record(NULL::{q}, k.image::jsonb) x \
         WHERE NOT EXISTS (SELECT 1 FROM {q} r WHERE {same_key})",
        q = table.qualified()
    );
    let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) {missing}")))
        .bind(foreign)
        .fetch_one(&mut *conn)
        .await?;
    crate::store::table::left_foreign(&table.name, left as u64);
    let sql = format!(
        "INSERT INTO weft.outbox (tbl, deleted, image, at) SELECT {}, true, k.image::jsonb, {} {missing}",
        literal(&table.name),
        crate::store::capture::UNKNOWN_COMMIT,
    );
    Ok(sqlx::query(AssertSqlSafe(sql))
        .bind(images)
        .execute(&mut *conn)
        .await?
        .rows_affected())
}

/// Queues a table's rows for capture when weft starts capturing it: adopted rows (a table
/// weft never captured) with the time of adoption, or, for a table weft knew whose triggers
/// were gone (dropped and recreated), every row this region may write with an unknown commit
/// time, and the live rows it no longer has as deletions (see `store::table::adopted`).
async fn capture_again(conn: &mut PgConnection, table: &PgTable, region: &str) -> Result<(), StoreError> {
    let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM weft.rows WHERE tbl = $1)")
        .bind(&table.name)
        .fetch_one(&mut *conn)
        .await?;
    let at = match known {
        true => crate::store::capture::UNKNOWN_COMMIT.to_string(),
        false => "weft.now_micros()".to_owned(),
    };
    let filter = match table.is_owned() {
        true => format!("{} IS NOT DISTINCT FROM {}", owner_of(table, "r"), literal(region)),
        false => "true".into(),
    };
    // The writer's session renders images as the capture functions do.
    let sql = format!(
        "INSERT INTO weft.outbox (tbl, deleted, image, at) SELECT {}, false, to_jsonb(r), {at} FROM {} r WHERE {filter}",
        literal(&table.name),
        table.qualified()
    );
    let rows = sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let deleted = match known {
        true => recapture_deletes(conn, table, region).await?,
        false => 0,
    };
    crate::store::table::adopted(table, known, rows, deleted);
    Ok(())
}

/// Creates or updates weft's schema and triggers. Runs inside the caller's transaction.
pub async fn install(
    conn: &mut PgConnection,
    tables: &[TableConfig],
    region: &str,
) -> Result<Vec<PgTable>, StoreError> {
    // Concurrent installs of CREATE OR REPLACE FUNCTION collide; the sidecar lock already
    // keeps out a second sidecar, this keeps out a concurrent `weft status`/CLI install.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('weft.install'))")
        .execute(&mut *conn)
        .await?;
    migrate(conn).await?;
    let mut out = Vec::new();
    for config in tables {
        let mut table = describe(conn, &config.name).await?;
        table.configure(config)?;
        let captured_before: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = $1 AND tgrelid = $2::regclass)")
                .bind(TRIGGERS[0].0)
                .bind(table.qualified())
                .fetch_one(&mut *conn)
                .await?;
        sqlx::raw_sql(AssertSqlSafe(capture_sql(&table)))
            .execute(&mut *conn)
            .await?;
        if !captured_before {
            capture_again(conn, &table, region).await?;
        }
        if let Some(sql) = owner_sql(&table, region) {
            sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn).await?;
        }
        out.push(table);
    }
    // Triggers of tables no longer replicated (or of an older weft) go.
    let installed: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, t.tgname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND t.tgname LIKE 'weft\\_%'",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (table, trigger) in installed {
        let wanted = out.iter().any(|t| {
            t.name == table
                && (TRIGGERS.iter().any(|(name, _)| *name == trigger)
                    || trigger == TRUNCATE_TRIGGER
                    || (trigger == OWNER_TRIGGER && t.is_owned()))
        });
        if !wanted {
            tracing::info!(%table, %trigger, "dropping a capture trigger weft no longer uses");
            sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP TRIGGER IF EXISTS {} ON public.{}",
                quote(&trigger),
                quote(&table)
            )))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(out)
}

/// The row trigger refusing writes of ownership tables outside the owner region.
const OWNER_TRIGGER: &str = "weft_owner";

/// The region `rule` gives the row `row` (NEW or OLD), in SQL; NULL for none. The column's
/// type is checked at start (text for a prefix, an integer type for ranges).
fn rule_sql(rule: &OwnerRule, table: &PgTable, row: &str) -> String {
    let column = rule.column.as_ref().unwrap_or(&table.key[0]);
    let v = format!("{row}.{}", quote(column));
    let prefix_of = |v: &str, sep: &str| {
        format!("CASE WHEN strpos({v}, {sep}) > 0 THEN substr({v}, 1, strpos({v}, {sep}) - 1) END")
    };
    rule_case(rule, &v, prefix_of, None)
}

/// The owner of row `row` (NEW or OLD), in SQL. Owner column: its value. Rule: a transfer in
/// progress, else the recorded owner (moved by a transfer), else the rule.
fn owner_of(table: &PgTable, row: &str) -> String {
    match (&table.owner_column, &table.owner_rule) {
        (Some(column), _) => format!("{row}.{}::text", quote(column)),
        (None, Some(rule)) => {
            let key = table
                .key
                .iter()
                .map(|k| format!("{row}.{}::text", quote(k)))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "coalesce((SELECT coalesce(w.moving_to, w.owner) FROM weft.owners w WHERE w.tbl = {} AND w.ktext = ARRAY[{key}]::text[]), {})",
                literal(&table.name),
                rule_sql(rule, table, row)
            )
        }
        (None, None) => "NULL".into(),
    }
}

/// The ownership trigger of an ownership table: only the owner region writes a row, the
/// owner column changes only inside `weft ownership transfer` (which sets `weft.transfer`;
/// `weft ownership failover` sets it to `forced`, and may move rows another region owns),
/// and under a rule a key change must stay within this region's keys. Runs with weft's
/// canonical text settings, so key text matches `weft.owners.ktext`.
fn owner_sql(table: &PgTable, region: &str) -> Option<String> {
    if !table.is_owned() {
        return None;
    }
    let name = literal(&table.name);
    let here = literal(region);
    let refuse = format!(
        "RAISE EXCEPTION 'weft: this % row is owned by %, not by %: write it in its owner region, or move it there with weft ownership transfer', {name}, coalesce(holder, 'no region (the owner rule maps its key to none)'), {here} USING ERRCODE = 'insufficient_privilege';"
    );
    let key_changed = table
        .key
        .iter()
        .map(|k| format!("NEW.{0} IS DISTINCT FROM OLD.{0}", quote(k)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let check_new = match &table.owner_rule {
        Some(_) => format!("TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND ({key_changed}))"),
        None => "TG_OP = 'INSERT'".into(),
    };
    let owner_kept = match &table.owner_column {
        Some(column) => format!(
            "IF TG_OP = 'UPDATE' AND NEW.{0} IS DISTINCT FROM OLD.{0} AND coalesce(current_setting('weft.transfer', true), '') NOT IN ('on', 'forced') THEN
             RAISE EXCEPTION 'weft: the owner of a % row changes only by weft ownership transfer', {name} USING ERRCODE = 'insufficient_privilege';
             END IF;",
            quote(column)
        ),
        None => String::new(),
    };
    let function = format!("weft.{}", quote(&format!("{OWNER_TRIGGER}_{}", table.name)));
    Some(format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = 3 AS $weft$\n\
         DECLARE holder text;\n\
         BEGIN\n\
         IF current_setting('weft.applying', true) IS DISTINCT FROM 'on' THEN\n\
         IF TG_OP <> 'INSERT' THEN\n\
         holder := {old};\n\
         IF holder IS DISTINCT FROM {here} AND (TG_OP = 'DELETE' OR current_setting('weft.transfer', true) IS DISTINCT FROM 'forced') THEN {refuse} END IF;\n\
         END IF;\n\
         IF {check_new} THEN\n\
         holder := {new};\n\
         IF holder IS DISTINCT FROM {here} THEN {refuse} END IF;\n\
         END IF;\n\
         {owner_kept}\n\
         END IF;\n\
         IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;\n\
         RETURN NEW;\n\
         END $weft$;\n\
         CREATE OR REPLACE TRIGGER {OWNER_TRIGGER} BEFORE INSERT OR UPDATE OR DELETE ON {} \
         FOR EACH ROW EXECUTE FUNCTION {function}();\n",
        table.qualified(),
        old = owner_of(table, "OLD"),
        new = owner_of(table, "NEW"),
    ))
}
