//! PostgreSQL schema: weft's metadata tables (schema `weft`) and the capture triggers.
//!
//! `install` is idempotent. Each replicated table gets statement-level triggers (one per
//! event, with transition tables) that write every changed row's whole image (`to_jsonb`)
//! to `weft.outbox` in the application's own transaction and wake the sidecar with
//! `NOTIFY weft_capture`. They skip writes made by the applier, whose transactions
//! `SET LOCAL weft.applying = 'on'`. Because every
//! outbox row carries its image, a drain reads each source transaction exactly as it
//! committed, whatever commits while it runs. Generated columns are not replicated: each
//! region computes them.
use sqlx::{AssertSqlSafe, PgConnection, Row as _};

use super::values::Kind;
use crate::config::{Strategy, TableConfig};
use crate::store::StoreError;

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
}

pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl PgTable {
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
pub async fn install(conn: &mut PgConnection, tables: &[TableConfig]) -> Result<Vec<PgTable>, StoreError> {
    // Concurrent installs of CREATE OR REPLACE FUNCTION collide; the sidecar lock already
    // keeps out a second sidecar, this keeps out a concurrent `weft status`/CLI install.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('weft.install'))")
        .execute(&mut *conn)
        .await?;
    sqlx::raw_sql(METADATA).execute(&mut *conn).await?;
    let mut out = Vec::new();
    for config in tables {
        if config.strategy != Strategy::Lww {
            return Err(StoreError::Table {
                table: config.name.clone(),
                message: format!(
                    "strategy `{}` is not available on PostgreSQL regions yet (only lww); keep this table on SQLite regions or use lww",
                    crate::store::admit::strategy_name(config.strategy)
                ),
            });
        }
        let mut table = describe(conn, &config.name).await?;
        table.strategy = config.strategy;
        sqlx::raw_sql(AssertSqlSafe(capture_sql(&table)))
            .execute(&mut *conn)
            .await?;
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
        let wanted = tables.iter().any(|t| t.name == table) && TRIGGERS.iter().any(|(name, _)| *name == trigger);
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
