//! SQLite schema: weft's metadata tables and the capture triggers on replicated tables.
//!
//! `install` is idempotent: it creates what is missing, replaces triggers whose text changed,
//! drops triggers of tables no longer replicated, and refuses a table without a primary key.
//! Triggers record only the primary key of each changed row (plus the commit time); the drain
//! reads the row image itself, so triggers never depend on non-key columns and a schema change
//! to a replicated table needs no trigger change.
use sqlx::{AssertSqlSafe, Row as _, SqliteConnection};

use crate::config::{OwnerRule, TableConfig};
use crate::event::{Event, Op, Value};
use crate::store::StoreError;
use crate::store::schema::{self, META_TABLES, Step, Type, create_table};
pub use crate::store::sql::quote;
use crate::store::sql::{literal, rule_case};
use crate::store::table::{ColumnTypes, Table};

/// At most this many primary-key columns (the outbox has one typed slot per key column).
pub const MAX_KEY_COLUMNS: usize = 4;

/// The tables only SQLite has, or has its own way: the node record (untyped values), the
/// outbox of keys, the applier's and the transfer's marks, and owner records with typed key
/// slots for the triggers.
const DIALECT_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS _weft_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    k1, k2, k3, k4,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _weft_applying (marker INTEGER);
CREATE TABLE IF NOT EXISTS _weft_owners (
    tbl TEXT NOT NULL,
    key BLOB NOT NULL,
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    k1, k2, k3, k4,
    moving_to TEXT,
    PRIMARY KEY (tbl, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _weft_transfer (marker INTEGER);
"#;

/// The node record comes first: it holds the schema version.
const NODE_TABLE: &str = "CREATE TABLE IF NOT EXISTS _weft_node (name TEXT PRIMARY KEY, value) WITHOUT ROWID";

fn column_type(ty: Type) -> &'static str {
    match ty {
        Type::Text => "TEXT",
        Type::Int | Type::Bool => "INTEGER",
        Type::Bytes => "BLOB",
        Type::Serial => "INTEGER PRIMARY KEY AUTOINCREMENT",
    }
}

/// Every metadata table and index, as this version has them.
fn baseline() -> String {
    let mut sql = String::from(DIALECT_TABLES);
    for def in META_TABLES {
        let suffix = if def.key.is_empty() { "" } else { " WITHOUT ROWID" };
        let name = format!("_weft_{}", def.name);
        sql += &create_table(def, &name, column_type, column_type(Type::Serial), suffix);
    }
    sql += "CREATE UNIQUE INDEX IF NOT EXISTS _weft_queue_open ON _weft_queue (tbl, key) WHERE closed_at IS NULL;\n";
    sql
}

/// Runs the migrations this database has not run yet, recording each (see `store::schema`).
async fn migrate(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::raw_sql(NODE_TABLE).execute(&mut *conn).await?;
    let version: Option<i64> = sqlx::query_scalar("SELECT value FROM _weft_node WHERE name = 'schema_version'")
        .fetch_optional(&mut *conn)
        .await?;
    for (number, name, step) in schema::pending(version.unwrap_or(0) as u32) {
        tracing::info!(migration = number, name, "upgrading weft's metadata schema");
        match step {
            Step::Baseline => {
                sqlx::raw_sql(AssertSqlSafe(baseline())).execute(&mut *conn).await?;
            }
            Step::OwnerKeys => owner_keys(conn).await?,
            Step::DeadLetterRetries => dead_letter_retries(conn).await?,
            Step::DeadLetterCauses => dead_letter_causes(conn).await?,
            Step::NewTables => {
                sqlx::raw_sql(AssertSqlSafe(baseline())).execute(&mut *conn).await?;
            }
            Step::ImageSums => image_sums(conn).await?,
        }
        sqlx::query("INSERT OR REPLACE INTO _weft_node (name, value) VALUES ('schema_version', ?)")
            .bind(*number as i64)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Dead letters made before retries lack `attempts` and `retry_at`.
async fn dead_letter_retries(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    let present: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pragma_table_info('_weft_dead_letters') WHERE name = 'retry_at'")
            .fetch_one(&mut *conn)
            .await?;
    if present == 0 {
        sqlx::raw_sql(
            "ALTER TABLE _weft_dead_letters ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0; \
             ALTER TABLE _weft_dead_letters ADD COLUMN retry_at INTEGER NOT NULL DEFAULT 0;",
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Row metadata made before image digests lacks `image_sum` (NULL: unknown).
async fn image_sums(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    let present: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pragma_table_info('_weft_rows') WHERE name = 'image_sum'")
            .fetch_one(&mut *conn)
            .await?;
    if present == 0 {
        sqlx::raw_sql("ALTER TABLE _weft_rows ADD COLUMN image_sum INTEGER")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Dead letters made before causes lack `cause` (they count as `other`).
async fn dead_letter_causes(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    let present: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pragma_table_info('_weft_dead_letters') WHERE name = 'cause'")
            .fetch_one(&mut *conn)
            .await?;
    if present == 0 {
        sqlx::raw_sql("ALTER TABLE _weft_dead_letters ADD COLUMN cause TEXT NOT NULL DEFAULT 'other'")
            .execute(&mut *conn)
            .await?;
    }
    sqlx::raw_sql("CREATE INDEX IF NOT EXISTS _weft_dead_letters_cause ON _weft_dead_letters (cause)")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Owner records made before owner rules lack the key slots and `moving_to`.
async fn owner_keys(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    let present: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pragma_table_info('_weft_owners') WHERE name = 'moving_to'")
            .fetch_one(&mut *conn)
            .await?;
    if present == 0 {
        sqlx::raw_sql(
            "ALTER TABLE _weft_owners ADD COLUMN k1; ALTER TABLE _weft_owners ADD COLUMN k2; \
             ALTER TABLE _weft_owners ADD COLUMN k3; ALTER TABLE _weft_owners ADD COLUMN k4; \
             ALTER TABLE _weft_owners ADD COLUMN moving_to TEXT;",
        )
        .execute(&mut *conn)
        .await?;
    }
    sqlx::raw_sql("CREATE INDEX IF NOT EXISTS _weft_owners_by_key ON _weft_owners (tbl, k1, k2, k3, k4)")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// SQL for "now" in µs since the Unix epoch, valid in every SQLite an application may link.
pub const NOW_MICROS: &str = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

/// What SQLite adds to a table description: its prepared statements.
#[derive(Debug, Clone)]
pub struct SqliteSql {
    /// `SELECT cols FROM t WHERE k1 = ? AND ...`
    pub select_sql: String,
    /// Outbox rows of this table up to an id, each with the row's current image:
    /// `id, at, k1..kn, present, columns...`.
    pub drain_sql: String,
    /// The columns of each UNIQUE constraint or index besides the primary key (not partial,
    /// no expressions): the rows `INSERT OR REPLACE` may delete.
    pub unique: Vec<Vec<String>>,
}

/// A replicated table of a SQLite database.
pub type TableInfo = Table<SqliteSql>;

impl ColumnTypes for SqliteSql {
    fn refuses(&self, event: &Event) -> Option<String> {
        if let Op::Upsert(row) = &event.op
            && let Some((column, _)) = row.0.iter().find(|(_, v)| matches!(v, Value::Real(f) if f.is_nan()))
        {
            return Some(format!(
                "column `{column}` holds NaN, which SQLite cannot store (it would read back as NULL)"
            ));
        }
        None
    }
}

/// The region `rule` gives the row `row` (NEW or OLD), in SQL; NULL for none.
fn rule_sql(rule: &OwnerRule, info: &TableInfo, row: &str) -> String {
    let column = rule.column.as_ref().unwrap_or(&info.key[0]);
    let v = format!("{row}.{}", quote(column));
    let prefix_of = |v: &str, sep: &str| {
        format!(
            "CASE WHEN typeof({v}) = 'text' AND instr({v}, {sep}) > 0 THEN substr({v}, 1, instr({v}, {sep}) - 1) END"
        )
    };
    rule_case(rule, &v, prefix_of, Some(format!("typeof({v}) = 'integer'")))
}

/// The owner of row `row` (NEW or OLD) of a rule table, in SQL: a transfer in progress, else
/// the recorded owner (moved by a transfer), else the rule.
fn rule_owner_sql(rule: &OwnerRule, info: &TableInfo, row: &str) -> String {
    let slots = info
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!(" AND w.k{} = {row}.{}", i + 1, quote(k)))
        .collect::<String>();
    format!(
        "coalesce((SELECT coalesce(w.moving_to, w.owner) FROM _weft_owners w WHERE w.tbl = {}{slots}), {})",
        literal(&info.name),
        rule_sql(rule, info, row)
    )
}

/// `k1 = ? AND k2 = ? ...` over the primary-key columns, for binding key values in order.
pub fn key_predicate(key: &[String]) -> String {
    key.iter()
        .map(|k| format!("{} = ?", quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Reads a table's columns and primary key.
pub async fn describe(conn: &mut SqliteConnection, table: &str) -> Result<TableInfo, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!("PRAGMA table_info({})", quote(table))))
        .fetch_all(&mut *conn)
        .await?;
    let problem = |message: String| StoreError::Table {
        table: table.to_owned(),
        message,
    };
    if rows.is_empty() {
        return Err(problem(
            "does not exist in the database; create it before starting weft, or remove it from the config".into(),
        ));
    }
    let mut columns = Vec::new();
    let mut declared = Vec::new();
    let mut key: Vec<(i64, String)> = Vec::new();
    let mut integer_key = false;
    for row in rows {
        let name: String = row.try_get("name")?;
        let pk: i64 = row.try_get("pk")?;
        if pk > 0 {
            key.push((pk, name.clone()));
            integer_key = row.try_get::<String, _>("type")?.eq_ignore_ascii_case("INTEGER");
        }
        columns.push(name);
        declared.push(row.try_get::<String, _>("type")?.to_ascii_uppercase());
    }
    // A lone `INTEGER PRIMARY KEY` is the rowid: SQLite assigns it when an insert omits it.
    let auto_key = integer_key && key.len() == 1;
    if key.is_empty() {
        return Err(problem(
            "has no primary key; weft identifies rows by primary key, so add one (for example `id INTEGER PRIMARY KEY`)".into(),
        ));
    }
    if key.len() > MAX_KEY_COLUMNS {
        return Err(problem(format!(
            "has a primary key of {} columns; weft supports at most {MAX_KEY_COLUMNS}",
            key.len()
        )));
    }
    key.sort();
    let key: Vec<String> = key.into_iter().map(|(_, name)| name).collect();
    let column_list = columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let join = key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("t.{} = o.k{}", quote(k), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    let slots = (1..=key.len())
        .map(|i| format!("o.k{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let image = columns
        .iter()
        .map(|c| format!("t.{}", quote(c)))
        .collect::<Vec<_>>()
        .join(", ");
    // Capture triggers refuse NULL keys, so a matched row always has a non-NULL first key.
    let drain_sql = format!(
        "SELECT o.id, o.at, {slots}, t.{} IS NOT NULL, {image} FROM _weft_outbox o LEFT JOIN {} t ON {join} \
         WHERE o.tbl = '{}' AND o.id <= ? ORDER BY o.id",
        quote(&key[0]),
        quote(table),
        table.replace('\'', "''"),
    );
    let select_sql = format!(
        "SELECT {column_list} FROM {} WHERE {}",
        quote(table),
        key_predicate(&key)
    );
    let unique = unique_indexes(conn, table).await?;
    let dialect = SqliteSql {
        select_sql,
        drain_sql,
        unique,
    };
    let typed = columns.into_iter().zip(declared).collect();
    let mut described = Table::described(table, typed, key, dialect);
    described.auto_key = auto_key;
    Ok(described)
}

/// The column lists of a table's UNIQUE constraints and indexes besides the primary key,
/// leaving out partial and expression indexes.
async fn unique_indexes(conn: &mut SqliteConnection, table: &str) -> Result<Vec<Vec<String>>, StoreError> {
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM pragma_index_list(?) WHERE \"unique\" = 1 AND origin <> 'pk' AND partial = 0 ORDER BY name",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::new();
    for index in indexes {
        let columns: Vec<Option<String>> = sqlx::query_scalar("SELECT name FROM pragma_index_info(?) ORDER BY seqno")
            .bind(&index)
            .fetch_all(&mut *conn)
            .await?;
        if let Some(columns) = columns.into_iter().collect::<Option<Vec<_>>>() {
            out.push(columns);
        }
    }
    Ok(out)
}

fn trigger_name(table: &str, event: &str) -> String {
    format!("_weft_capture_{table}_{event}")
}

/// The pieces of a table's capture triggers, for the row `NEW` or `OLD`.
struct Capture<'a> {
    info: &'a TableInfo,
    region: &'a str,
}

impl Capture<'_> {
    /// The key columns of `row` in the outbox's four key slots.
    fn slots(&self, row: &str) -> String {
        (0..MAX_KEY_COLUMNS)
            .map(|i| match self.info.key.get(i) {
                Some(k) => format!("{row}.{}", quote(k)),
                None => "0".into(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Refuses a NULL key: weft identifies rows by primary key.
    fn null_guard(&self, row: &str) -> String {
        let table = &self.info.name;
        self.info
            .key
            .iter()
            .map(|k| {
                format!(
                    "SELECT RAISE(ABORT, 'weft: {table}.{k} is NULL; weft replicates rows by primary key, so give it a value') WHERE {row}.{} IS NULL;",
                    quote(k)
                )
            })
            .collect::<Vec<_>>()
            .join("\n  ")
    }

    /// Records `row`'s key in the outbox.
    fn record(&self, row: &str) -> String {
        format!(
            "INSERT INTO _weft_outbox (tbl, k1, k2, k3, k4, at) VALUES ('{}', {}, {NOW_MICROS});",
            self.info.name,
            self.slots(row)
        )
    }

    fn key_changed(&self) -> String {
        self.info
            .key
            .iter()
            .map(|k| format!("OLD.{0} IS NOT NEW.{0}", quote(k)))
            .collect::<Vec<_>>()
            .join(" OR ")
    }

    /// `RAISE(ABORT, ...)` naming the owner `o` (an SQL expression) in `message`. SQLite
    /// before 3.47 takes only a literal there, so each region weft can name (the mesh's and
    /// the owner rule's) gets a literal of its own, and any other owner the fallback words.
    fn refusal(&self, o: &str, fallback: &str, message: impl Fn(&str) -> String) -> String {
        let mut arms = format!("WHEN {o} IS NULL THEN RAISE(ABORT, {})", literal(&message("no region")));
        let mut named: Vec<&str> = self
            .info
            .owner_rule
            .as_ref()
            .map(|r| r.named_regions())
            .unwrap_or_default();
        named.extend(self.info.mesh_regions.iter().map(String::as_str));
        named.sort_unstable();
        named.dedup();
        for region in named.into_iter().filter(|r| *r != self.region) {
            arms += &format!(
                " WHEN {o} = {} THEN RAISE(ABORT, {})",
                literal(region),
                literal(&message(region))
            );
        }
        format!("CASE {arms} ELSE RAISE(ABORT, {}) END", literal(&message(fallback)))
    }

    /// What a refusal calls an owner it cannot name.
    fn unnamed_owner(&self) -> String {
        match &self.info.owner_column {
            Some(column) => format!("the region in its `{column}` column"),
            None => "another region (by its owner rule or a transfer)".into(),
        }
    }

    /// Ownership tables: only the owner region writes a row (`when`: an extra condition).
    fn owned(&self, row: &str, when: &str) -> String {
        let (table, region) = (&self.info.name, self.region);
        let message = |owner: &str| {
            let owner = match owner {
                "no region" if self.info.owner_rule.is_some() => "no region (the owner rule maps its key to none)",
                other => other,
            };
            format!(
                "weft: this {table} row is owned by {owner}, not by {region}: write it in its owner region, or move it there with weft ownership transfer"
            )
        };
        let here = literal(region);
        match (&self.info.owner_column, &self.info.owner_rule) {
            (None, None) => String::new(),
            (None, Some(rule)) => format!(
                "SELECT {} FROM (SELECT {} AS o) WHERE o IS NOT {here}{when};\n  ",
                self.refusal("o", &self.unnamed_owner(), message),
                rule_owner_sql(rule, self.info, row)
            ),
            (Some(column), _) => {
                let o = format!("{row}.{}", quote(column));
                format!(
                    "SELECT {} WHERE {o} IS NOT {here}{when};\n  ",
                    self.refusal(&o, &self.unnamed_owner(), message)
                )
            }
        }
    }

    /// The owner column changes only inside `weft ownership transfer` (the _weft_transfer mark).
    fn owner_kept(&self) -> String {
        match &self.info.owner_column {
            None => String::new(),
            Some(column) => format!(
                "SELECT RAISE(ABORT, {}) WHERE NEW.{1} IS NOT OLD.{1} AND NOT EXISTS (SELECT 1 FROM _weft_transfer);\n  ",
                literal(&format!(
                    "weft: the owner of a {} row changes only by weft ownership transfer",
                    self.info.name
                )),
                quote(column)
            ),
        }
    }

    /// The rows of the table (as `r`) that inserting `NEW` may replace: the row with its key,
    /// and with `others`, rows that share a value of a unique index with it.
    fn replaced(&self, others: bool) -> String {
        let same_key = self
            .info
            .key
            .iter()
            .map(|k| format!("r.{0} IS NEW.{0}", quote(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let shares = self
            .info
            .unique
            .iter()
            .map(|columns| {
                let all = columns
                    .iter()
                    .map(|c| format!("r.{0} = NEW.{0}", quote(c)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                format!("({all})")
            })
            .collect::<Vec<_>>()
            .join(" OR ");
        match (others, shares.is_empty()) {
            (false, _) => format!("({same_key})"),
            (true, true) => "0".into(),
            (true, false) => format!("({shares}) AND NOT ({same_key})"),
        }
    }

    /// The rows of `row`'s table this region adopts when capture starts: all of them, or in
    /// an ownership table those it owns.
    fn adoptable(&self, row: &str) -> String {
        let region = literal(self.region);
        match (&self.info.owner_column, &self.info.owner_rule) {
            (Some(column), _) => format!("{row}.{} IS {region}", quote(column)),
            (None, Some(rule)) => format!("{} IS {region}", rule_owner_sql(rule, self.info, row)),
            (None, None) => "1".into(),
        }
    }

    /// Before an insert: an ownership table refuses to replace a row another region owns
    /// (`INSERT OR REPLACE` deletes it without firing a delete trigger), and the rows a
    /// REPLACE would delete through a unique index are queued for capture (a row that the
    /// insert then leaves in place, as `OR IGNORE` or an upsert may, drains as an unchanged
    /// upsert).
    fn before_insert(&self) -> Option<String> {
        let (table, region) = (&self.info.name, self.region);
        let any = format!("({} OR {})", self.replaced(false), self.replaced(true));
        let owner = match (&self.info.owner_column, &self.info.owner_rule) {
            (None, None) => None,
            (Some(column), _) => Some(format!("r.{}", quote(column))),
            (None, Some(rule)) => Some(rule_owner_sql(rule, self.info, "r")),
        };
        let mut body = String::new();
        if let Some(owner) = owner {
            let message = |o: &str| {
                format!(
                    "weft: this insert would replace a {table} row owned by {o}, not by {region} (INSERT OR REPLACE deletes the rows it conflicts with): write it in its owner region"
                )
            };
            body += &format!(
                "SELECT {} FROM (SELECT {owner} AS o FROM {} r WHERE {any}) WHERE o IS NOT {};\n  ",
                self.refusal("o", &self.unnamed_owner(), message),
                quote(table),
                literal(region)
            );
        }
        if !self.info.unique.is_empty() {
            body += &format!(
                "INSERT INTO _weft_outbox (tbl, k1, k2, k3, k4, at) SELECT '{table}', {}, {NOW_MICROS} FROM {} r WHERE {};",
                self.slots("r"),
                quote(table),
                self.replaced(true)
            );
        }
        (!body.is_empty()).then_some(body)
    }

    /// A key change moves the row: under a rule, the new key must be this region's too.
    fn owned_new_key(&self) -> String {
        match &self.info.owner_rule {
            Some(_) => self.owned("NEW", &format!(" AND ({})", self.key_changed())),
            None => String::new(),
        }
    }
}

/// Unless `weft ownership failover` is moving rows another region owns (its mark, 2).
const FORCED_ELSEWHERE: &str = " AND NOT EXISTS (SELECT 1 FROM _weft_transfer WHERE marker = 2)";

/// The three capture triggers of a table, as (name, full SQL).
fn trigger_sql(info: &TableInfo, region: &str) -> Vec<(String, String)> {
    let c = Capture { info, region };
    let table = &info.name;
    let q = quote(table);
    let skip = "WHEN NOT EXISTS (SELECT 1 FROM _weft_applying)";
    let insert = trigger_name(table, "insert");
    let update = trigger_name(table, "update");
    let delete = trigger_name(table, "delete");
    let insert_sql = format!(
        "CREATE TRIGGER {insert} AFTER INSERT ON {q} {skip}\nBEGIN\n  {}\n  {}{}\nEND",
        c.null_guard("NEW"),
        c.owned("NEW", ""),
        c.record("NEW")
    );
    // A key change moves the row: capture the old key (now gone) and the new one.
    let update_sql = format!(
        "CREATE TRIGGER {update} AFTER UPDATE ON {q} {skip}\nBEGIN\n  {}{}{}{}\n  INSERT INTO _weft_outbox (tbl, k1, k2, k3, k4, at) SELECT '{table}', {}, {NOW_MICROS} WHERE {};\n  {}\nEND",
        c.null_guard("NEW"),
        c.owned("OLD", FORCED_ELSEWHERE),
        c.owned_new_key(),
        c.owner_kept(),
        c.slots("OLD"),
        c.key_changed(),
        c.record("NEW")
    );
    let delete_sql = format!(
        "CREATE TRIGGER {delete} AFTER DELETE ON {q} {skip}\nBEGIN\n  {}{}\nEND",
        c.owned("OLD", ""),
        c.record("OLD")
    );
    let mut triggers = vec![(insert, insert_sql), (update, update_sql), (delete, delete_sql)];
    if let Some(body) = c.before_insert() {
        let replace = trigger_name(table, "replace");
        let sql = format!("CREATE TRIGGER {replace} BEFORE INSERT ON {q} {skip}\nBEGIN\n  {body}\nEND");
        triggers.push((replace, sql));
    }
    triggers
}

/// Queues, as deletions, the keys weft knows as live rows of a table that no longer has
/// them: the table lost its capture triggers (a rebuild: create new, copy, drop, rename) and
/// rows went while nothing captured. Their commit time is unknown (`UNKNOWN_COMMIT`). Rows
/// another region owns are not this region's to delete: left alone (`capture` says so).
/// Returns how many were queued.
async fn recapture_deletes(conn: &mut SqliteConnection, info: &TableInfo, region: &str) -> Result<u64, StoreError> {
    let foreign = match info.owner_column.is_some() || info.owner_rule.is_some() {
        true => format!(
            "EXISTS (SELECT 1 FROM _weft_owners w WHERE w.tbl = r.tbl AND w.key = r.key \
             AND w.moving_to IS NULL AND w.owner IS NOT {})",
            literal(region)
        ),
        false => "0".into(),
    };
    let live: Vec<(Vec<u8>, bool)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT r.key, {foreign} FROM _weft_rows r WHERE r.tbl = ? AND NOT r.deleted"
    )))
    .bind(&info.name)
    .fetch_all(&mut *conn)
    .await?;
    let slots = (0..MAX_KEY_COLUMNS)
        .map(|i| if i < info.key.len() { "?" } else { "0" })
        .collect::<Vec<_>>()
        .join(", ");
    let missing = format!(
        "NOT EXISTS (SELECT 1 FROM {} WHERE {})",
        quote(&info.name),
        key_predicate(&info.key)
    );
    let queue = format!(
        "INSERT INTO _weft_outbox (tbl, k1, k2, k3, k4, at) SELECT {}, {slots}, {} WHERE {missing}",
        literal(&info.name),
        crate::store::capture::UNKNOWN_COMMIT,
    );
    let count = format!("SELECT {missing}");
    let (mut queued, mut left) = (0, 0);
    for (bytes, foreign) in live {
        let key = crate::event::Key::from_bytes(&bytes).map_err(StoreError::Corrupt)?;
        if key.0.len() != info.key.len() {
            continue;
        }
        let sql = if foreign { &count } else { &queue };
        let mut query = sqlx::query(AssertSqlSafe(sql.as_str()));
        let binds = if foreign { 1 } else { 2 };
        for value in std::iter::repeat_n(&key.0, binds).flatten() {
            query = super::values::bind(query, value);
        }
        match foreign {
            true => left += u64::from(query.fetch_one(&mut *conn).await?.try_get::<bool, _>(0)?),
            false => queued += query.execute(&mut *conn).await?.rows_affected(),
        }
    }
    crate::store::table::left_foreign(&info.name, left);
    Ok(queued)
}

/// Queues a table's rows for capture when weft starts capturing it: adopted rows (a table
/// weft never captured) with the time of adoption, or, for a table weft knew whose triggers
/// were gone (rebuilt or recreated), every row this region may write with an unknown commit
/// time, and the live rows it no longer has as deletions (see `store::table::adopted`).
async fn capture_again(conn: &mut SqliteConnection, info: &TableInfo, region: &str) -> Result<(), StoreError> {
    let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM _weft_rows WHERE tbl = ? LIMIT 1")
        .bind(&info.name)
        .fetch_optional(&mut *conn)
        .await?;
    let at = match known {
        Some(_) => crate::store::capture::UNKNOWN_COMMIT.to_string(),
        None => NOW_MICROS.to_owned(),
    };
    let c = Capture { info, region };
    let sql = format!(
        "INSERT INTO _weft_outbox (tbl, k1, k2, k3, k4, at) SELECT {}, {}, {at} FROM {} r WHERE {}",
        literal(&info.name),
        c.slots("r"),
        quote(&info.name),
        c.adoptable("r")
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let deleted = match known {
        Some(_) => recapture_deletes(conn, info, region).await?,
        None => 0,
    };
    crate::store::table::adopted(info, known.is_some(), rows, deleted);
    Ok(())
}

/// Creates or updates weft's tables and triggers. Runs inside the caller's transaction.
pub async fn install(
    conn: &mut SqliteConnection,
    tables: &[TableConfig],
    region: &str,
) -> Result<Vec<TableInfo>, StoreError> {
    migrate(conn).await?;
    let mut infos = Vec::new();
    let mut wanted = std::collections::HashSet::new();
    for config in tables {
        let table = &config.name;
        let mut info = describe(conn, table).await?;
        info.configure(config)?;
        let insert_trigger = trigger_name(table, "insert");
        let captured_before: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?")
                .bind(&insert_trigger)
                .fetch_optional(&mut *conn)
                .await?;
        for (name, sql) in trigger_sql(&info, region) {
            let existing: Option<String> =
                sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?")
                    .bind(&name)
                    .fetch_optional(&mut *conn)
                    .await?;
            if existing.as_deref() != Some(sql.as_str()) {
                if existing.is_some() {
                    sqlx::query(AssertSqlSafe(format!("DROP TRIGGER {name}")))
                        .execute(&mut *conn)
                        .await?;
                }
                sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await?;
            }
            wanted.insert(name);
        }
        if captured_before.is_none() {
            capture_again(conn, &info, region).await?;
        }
        infos.push(info);
    }
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '\\_weft\\_capture\\_%' ESCAPE '\\'",
    )
    .fetch_all(&mut *conn)
    .await?;
    for name in stale.into_iter().filter(|n| !wanted.contains(n)) {
        tracing::info!(trigger = %name, "dropping capture trigger of a table no longer replicated");
        sqlx::query(AssertSqlSafe(format!("DROP TRIGGER {}", quote(&name))))
            .execute(&mut *conn)
            .await?;
    }
    Ok(infos)
}
