//! PostgreSQL schema: weft's metadata tables (schema `weft`) and the capture triggers.
//!
//! `install` is idempotent. Each replicated table gets a row trigger that writes the row's
//! whole image (`to_jsonb`) to `weft.outbox` in the application's own transaction, and a
//! statement trigger that wakes the sidecar with `NOTIFY weft_capture`. Both skip writes
//! made by the applier, whose transactions `SET LOCAL weft.applying = 'on'`. Because every
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
CREATE OR REPLACE FUNCTION weft.capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_image jsonb;
    new_image jsonb;
    i int;
BEGIN
    IF current_setting('weft.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_image := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_image := to_jsonb(NEW);
    END IF;
    -- A key change moves the row: the old key is deleted. TG_ARGV lists the key columns.
    IF TG_OP = 'UPDATE' THEN
        FOR i IN 0 .. TG_NARGS - 1 LOOP
            IF old_image -> TG_ARGV[i] IS DISTINCT FROM new_image -> TG_ARGV[i] THEN
                INSERT INTO weft.outbox (tbl, deleted, image, at)
                VALUES (TG_TABLE_NAME, true, old_image, weft.now_micros());
                EXIT;
            END IF;
        END LOOP;
    END IF;
    INSERT INTO weft.outbox (tbl, deleted, image, at)
    VALUES (TG_TABLE_NAME, TG_OP = 'DELETE', coalesce(new_image, old_image), weft.now_micros());
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION weft.wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('weft.applying', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('weft_capture', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END $$;
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
        let args = table.key.iter().map(|k| literal(k)).collect::<Vec<_>>().join(", ");
        let q = table.qualified();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE OR REPLACE TRIGGER weft_capture AFTER INSERT OR UPDATE OR DELETE ON {q} \
             FOR EACH ROW EXECUTE FUNCTION weft.capture({args}); \
             CREATE OR REPLACE TRIGGER weft_wake AFTER INSERT OR UPDATE OR DELETE ON {q} \
             FOR EACH STATEMENT EXECUTE FUNCTION weft.wake();"
        )))
        .execute(&mut *conn)
        .await?;
        out.push(table);
    }
    // Tables no longer replicated lose their triggers.
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT c.relname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND t.tgname IN ('weft_capture', 'weft_wake')",
    )
    .fetch_all(&mut *conn)
    .await?;
    for name in stale.iter().filter(|n| !tables.iter().any(|t| &t.name == *n)) {
        tracing::info!(table = %name, "dropping capture triggers of a table no longer replicated");
        let q = format!("public.{}", quote(name));
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP TRIGGER IF EXISTS weft_capture ON {q}; DROP TRIGGER IF EXISTS weft_wake ON {q};"
        )))
        .execute(&mut *conn)
        .await?;
    }
    Ok(out)
}
