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

use std::collections::BTreeMap;

use super::values::Kind;
use crate::config::{OwnerRule, Strategy, TableConfig};
use crate::crdt::CrdtType;
use crate::store::StoreError;
use crate::store::engine::TableRules as _;
use crate::store::sql::rule_case;
pub use crate::store::sql::{literal, quote};

/// The notification channel the capture triggers signal.
pub const CHANNEL: &str = "weft_capture";

pub(crate) const METADATA: &str = r#"
CREATE SCHEMA IF NOT EXISTS weft;
CREATE TABLE IF NOT EXISTS weft.node (name text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS weft.outbox (
    id bigserial PRIMARY KEY,
    tbl text NOT NULL,
    deleted boolean NOT NULL,
    image jsonb NOT NULL,
    at bigint NOT NULL
);
-- A queue table: vacuum it often, or dead rows slow every drain.
ALTER TABLE weft.outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000);
CREATE TABLE IF NOT EXISTS weft.rows (
    tbl text NOT NULL,
    key bytea NOT NULL,
    version text NOT NULL,
    hlc bigint NOT NULL,
    origin text NOT NULL,
    deleted boolean NOT NULL,
    PRIMARY KEY (tbl, key)
);
CREATE TABLE IF NOT EXISTS weft.log (
    origin text NOT NULL,
    seq bigint NOT NULL,
    batch_end bigint NOT NULL,
    committed_at bigint NOT NULL,
    event bytea NOT NULL,
    PRIMARY KEY (origin, seq)
);
CREATE TABLE IF NOT EXISTS weft.frontier (
    origin text PRIMARY KEY,
    seq bigint NOT NULL,
    processed bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS weft.acks (
    peer text NOT NULL,
    origin text NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (peer, origin)
);
CREATE TABLE IF NOT EXISTS weft.dead_letters (
    id bigserial PRIMARY KEY,
    origin text NOT NULL,
    seq bigint NOT NULL,
    tbl text NOT NULL,
    key text NOT NULL,
    reason text NOT NULL,
    event bytea NOT NULL,
    at bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS weft.conflicts (
    id bigserial PRIMARY KEY,
    tbl text NOT NULL,
    key text NOT NULL,
    strategy text NOT NULL,
    winner text NOT NULL,
    loser text NOT NULL,
    at bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS weft.crdt (
    tbl text NOT NULL,
    key bytea NOT NULL,
    col text NOT NULL,
    state text NOT NULL,
    PRIMARY KEY (tbl, key, col)
);
CREATE TABLE IF NOT EXISTS weft.queue (
    id bigserial PRIMARY KEY,
    tbl text NOT NULL,
    key bytea NOT NULL,
    key_text text NOT NULL,
    opened_at bigint NOT NULL,
    closed_at bigint,
    closed_by text
);
CREATE UNIQUE INDEX IF NOT EXISTS queue_open ON weft.queue (tbl, key) WHERE closed_at IS NULL;
CREATE TABLE IF NOT EXISTS weft.siblings (
    tbl text NOT NULL,
    key bytea NOT NULL,
    origin text NOT NULL,
    hlc bigint NOT NULL,
    event bytea NOT NULL,
    PRIMARY KEY (tbl, key, origin, hlc)
);
CREATE TABLE IF NOT EXISTS weft.resolutions (
    id bigserial PRIMARY KEY,
    queue_id bigint NOT NULL,
    tbl text NOT NULL,
    key_text text NOT NULL,
    decided_by text NOT NULL,
    decision text NOT NULL,
    "row" text,
    at bigint NOT NULL
);
-- ktext: the key's values as text (canonical session settings), for the triggers' lookup.
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
CREATE TABLE IF NOT EXISTS weft.transfers (
    id bigserial PRIMARY KEY,
    tbl text NOT NULL,
    "rows" text NOT NULL,
    moved bigint NOT NULL,
    from_region text NOT NULL,
    to_region text NOT NULL,
    decided_by text NOT NULL,
    at bigint NOT NULL
);
CREATE OR REPLACE FUNCTION weft.now_micros() RETURNS bigint LANGUAGE sql VOLATILE AS
$$ SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint $$;
"#;

/// A replicated table as this node sees it.
#[derive(Debug, Clone)]
pub struct PgTable {
    pub name: String,
    /// Replicated (non-generated) columns in table order, with their declared types.
    pub columns: Vec<String>,
    pub types: Vec<String>,
    pub kinds: Vec<Kind>,
    /// Primary-key columns, in key order.
    pub key: Vec<String>,
    /// Index into `columns` of each key column.
    pub key_index: Vec<usize>,
    pub strategy: Strategy,
    /// CRDT columns and their types (`crdt` tables only).
    pub crdt: BTreeMap<String, CrdtType>,
    /// The column naming each row's owner region (`ownership` tables only).
    pub owner_column: Option<String>,
    /// The rule finding each row's owner region from its key (`ownership` tables only).
    pub owner_rule: Option<OwnerRule>,
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
    let mut sql = String::new();
    for ((trigger, event), body) in TRIGGERS.iter().zip(bodies) {
        let function = format!("weft.{}", quote(&format!("{trigger}_{}", table.name)));
        let referencing = match *event {
            "INSERT" => "NEW TABLE AS weft_new",
            "UPDATE" => "OLD TABLE AS weft_old NEW TABLE AS weft_new",
            _ => "OLD TABLE AS weft_old",
        };
        sql += &format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $weft$\n\
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

/// Reads a table's replicated columns, their types and its primary key.
pub async fn describe(conn: &mut PgConnection, table: &str) -> Result<PgTable, StoreError> {
    let problem = |message: String| StoreError::Table {
        table: table.to_owned(),
        message,
    };
    let rows = sqlx::query(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                coalesce(bt.typname, t.typname)::text, \
                coalesce((SELECT k.n FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, n) WHERE k.att = a.attnum), 0)::int4, a.attgenerated::text \
         FROM pg_attribute a \
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
    let mut out = PgTable {
        name: table.to_owned(),
        columns: Vec::new(),
        types: Vec::new(),
        kinds: Vec::new(),
        key: Vec::new(),
        key_index: Vec::new(),
        strategy: Strategy::Lww,
        crdt: BTreeMap::new(),
        owner_column: None,
        owner_rule: None,
    };
    let mut key: Vec<(i32, String)> = Vec::new();
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
        }
        out.columns.push(name);
        out.types.push(row.try_get(1)?);
        out.kinds.push(Kind::of(&row.try_get::<String, _>(2)?));
    }
    if key.is_empty() {
        return Err(problem(
            "has no primary key; weft identifies rows by primary key, so add one (for example `id bigint PRIMARY KEY`)"
                .into(),
        ));
    }
    key.sort();
    out.key = key.into_iter().map(|(_, k)| k).collect();
    out.key_index = out
        .key
        .iter()
        .map(|k| {
            out.columns
                .iter()
                .position(|c| c == k)
                .expect("key columns are columns")
        })
        .collect();
    Ok(out)
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
    sqlx::raw_sql(METADATA).execute(&mut *conn).await?;
    let mut out = Vec::new();
    for config in tables {
        let mut table = describe(conn, &config.name).await?;
        configure(&mut table, config)?;
        sqlx::raw_sql(AssertSqlSafe(capture_sql(&table)))
            .execute(&mut *conn)
            .await?;
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
                && (TRIGGERS.iter().any(|(name, _)| *name == trigger) || (trigger == OWNER_TRIGGER && t.is_owned()))
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

/// Applies a table's strategy settings from the config, checking them against the table.
fn configure(table: &mut PgTable, config: &TableConfig) -> Result<(), StoreError> {
    let problem = |message: String| StoreError::Table {
        table: config.name.clone(),
        message,
    };
    table.strategy = config.strategy;
    for (column, kind) in &config.columns {
        let Some(found) = table.kind_of(column).filter(|_| !table.key.contains(column)) else {
            return Err(problem(format!(
                "CRDT column `{column}` does not exist or is part of the primary key; list existing non-key columns under columns"
            )));
        };
        let fits = match kind {
            CrdtType::Counter => found == Kind::Int,
            CrdtType::Set => found == Kind::Text,
            CrdtType::Register => true,
        };
        if !fits {
            return Err(problem(format!(
                "CRDT column `{column}` is {}; a {kind:?} column needs {}",
                table.type_of(column).unwrap_or("?"),
                match kind {
                    CrdtType::Counter => "an integer type (smallint, integer, bigint)",
                    _ => "a text type (text, varchar; a set is stored as a JSON array)",
                }
            )));
        }
    }
    table.crdt = config.columns.clone();
    if let Some(column) = &config.owner_column {
        if table.kind_of(column) != Some(Kind::Text) || table.key.contains(column) {
            return Err(problem(format!(
                "owner column `{column}` must be an existing non-key text column"
            )));
        }
        table.owner_column = Some(column.clone());
    }
    if let Some(rule) = &config.owner_rule {
        let column = rule.column.clone().unwrap_or_else(|| table.key[0].clone());
        if !table.key.contains(&column) {
            return Err(problem(format!(
                "owner_rule column `{column}` is not a primary-key column (the key is {}); a rule reads the key",
                table.key.join(", ")
            )));
        }
        let (wanted, what) = match rule.prefix {
            Some(_) => (Kind::Text, "a prefix rule needs a text key column"),
            None => (Kind::Int, "a ranges rule needs an integer key column"),
        };
        if table.kind_of(&column) != Some(wanted) {
            return Err(problem(format!(
                "owner_rule column `{column}` is {}; {what}",
                table.type_of(&column).unwrap_or("?")
            )));
        }
        table.owner_rule = Some(rule.clone());
    }
    Ok(())
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
/// owner column changes only inside `weft ownership transfer` (which sets `weft.transfer`),
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
            "IF TG_OP = 'UPDATE' AND NEW.{0} IS DISTINCT FROM OLD.{0} AND current_setting('weft.transfer', true) IS DISTINCT FROM 'on' THEN
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
         IF holder IS DISTINCT FROM {here} THEN {refuse} END IF;\n\
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
