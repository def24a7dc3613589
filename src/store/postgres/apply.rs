//! PostgreSQL apply IO: the applier's mark, row locks, grouped `unnest` writes and row reads.
//!
//! The applier marks its transaction `SET LOCAL weft.applying = 'on'`, so the capture
//! triggers skip its writes, and where the role may, runs it with `session_replication_role
//! = replica` (see `replica_role` in the parent module): no application trigger and no
//! foreign-key check fires on applied writes. `lock_rows` takes `SELECT ... FOR UPDATE` of every row the run
//! touches (with `NOWAIT` while the caller asks for it), so no application change to one of
//! them can commit before the run. Rows absent when locked are written with `ON CONFLICT DO
//! NOTHING`: if the application inserted one meanwhile, the count comes up short and the run
//! stops with `Stop::Raced` (the caller retries it), so that insert is drained and compared,
//! never overwritten. A write PostgreSQL refuses for its content (a cast, a constraint) is a
//! `Written::Refused`; event by event, writes run under savepoints so a refusal leaves
//! nothing behind.
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use sqlx::{AssertSqlSafe, PgConnection};

use super::capture::read_image;
use super::schema::{PgTable, quote};
use crate::event::{Event, Key, Row};
use crate::store::StoreError;
use crate::store::admit::{Frontier, frontiers_from};
use crate::store::backend::Tables;
use crate::store::engine::{Halt, Stop, Written};

/// Marks the transaction as the applier's and reads the frontiers, in one round trip.
pub(super) async fn begin_apply(conn: &mut PgConnection) -> Result<BTreeMap<String, Frontier>, StoreError> {
    let known: Vec<(Option<String>, Option<i64>, Option<i64>)> = sqlx::query_as(
        "WITH mark AS (SELECT set_config('weft.applying', 'on', true), \
           CASE WHEN current_setting('weft.replica_role', true) = 'on' \
             THEN set_config('session_replication_role', 'replica', true) END) \
         SELECT f.origin, f.seq, f.processed FROM mark LEFT JOIN weft.frontier f ON true",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(frontiers_from(
        known.into_iter().filter_map(|(o, s, p)| Some((o?, s?, p?))),
    ))
}

/// Nothing to clear: `SET LOCAL weft.applying` ends with the transaction.
pub(super) async fn end_apply(_conn: &mut PgConnection) -> Result<(), StoreError> {
    Ok(())
}

/// Whether a database error refuses the event itself (dead-letter it, the rest of the run
/// flows) rather than saying the database cannot work right now (fail the run; the peer
/// resends it).
///
/// Only the classes retrying can fix are transient: 08 connection, 25 transaction state,
/// 40 serialization failure and deadlock, 53 insufficient resources (disk full, out of
/// memory), 55 object in use (a lock), 57P operator intervention (shutdown, restart), 58
/// system error, XX internal error. Every other SQLSTATE is the same on every retry: data
/// exceptions (22), constraints (23), an application trigger raising (P0001), a revoked
/// privilege or a dropped table (42), an index row too large (54000), a statement timeout on
/// a write that can only be retried alone (57014: a grouped run is replayed event by event
/// first, so only the event that is too slow by itself is refused).
pub(super) fn rejects_event(error: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = error else { return None };
    let code = db.code()?;
    let transient = ["08", "25", "40", "53", "55", "57P", "58", "XX"];
    (!transient.iter().any(|class| code.starts_with(class))).then(|| format!("{} (SQLSTATE {code})", db.message()))
}

/// `FOR UPDATE NOWAIT` met a row another transaction holds (SQLSTATE 55P03).
fn is_lock_not_available(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

#[derive(PartialEq)]
pub(super) enum Shape {
    /// Rows that existed (locked) or that this run created.
    Upsert {
        table: String,
        columns: Vec<String>,
    },
    /// Rows absent when locked.
    Insert {
        table: String,
        columns: Vec<String>,
    },
    Delete {
        table: String,
    },
}

/// Writes waiting to be executed, all of one shape, no key twice.
#[derive(Default)]
pub(super) struct Batch {
    shape: Option<(Shape, Arc<PgTable>)>,
    /// Column values as text, one vector per column.
    columns: Vec<Vec<Option<String>>>,
    keys: HashSet<Vec<u8>>,
}

/// Keys of one table: their canonical bytes, and their values as text, column by column.
type KeyColumns = (Vec<Vec<u8>>, Vec<Vec<Option<String>>>);

impl Batch {
    /// Queues a write; flushes first if the shape changes or the key repeats.
    pub(super) async fn push(
        &mut self,
        tx: &mut PgConnection,
        shape: Shape,
        table: &Arc<PgTable>,
        key: Vec<u8>,
        values: Vec<Option<String>>,
    ) -> Result<Written, Halt> {
        if self.shape.as_ref().is_some_and(|(s, _)| *s != shape) || self.keys.contains(&key) {
            let written = self.flush(tx).await?;
            if written != Written::Done {
                return Ok(written);
            }
        }
        if self.shape.is_none() {
            self.shape = Some((shape, table.clone()));
            self.columns = vec![Vec::new(); values.len()];
        }
        for (column, value) in self.columns.iter_mut().zip(values) {
            column.push(value);
        }
        self.keys.insert(key);
        Ok(Written::Done)
    }

    /// Executes the queued writes; `Stop::Raced` if an insert found its row already there.
    pub(super) async fn flush(&mut self, tx: &mut PgConnection) -> Result<Written, Halt> {
        let Some((shape, table)) = self.shape.take() else {
            return Ok(Written::Done);
        };
        let columns = std::mem::take(&mut self.columns);
        self.keys.clear();
        let rows = columns.first().map_or(0, Vec::len) as u64;
        let names = |cols: &[String]| cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
        let unnest = |cols: &[String]| {
            let casts = cols
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let ty = &table.types[table.columns.iter().position(|x| x == c).expect("checked column")];
                    format!("u.c{i}::{ty}")
                })
                .collect::<Vec<_>>()
                .join(", ");
            let arrays = (1..=cols.len())
                .map(|i| format!("${i}::text[]"))
                .collect::<Vec<_>>()
                .join(", ");
            let aliases = (0..cols.len()).map(|i| format!("c{i}")).collect::<Vec<_>>().join(", ");
            format!("SELECT {casts} FROM unnest({arrays}) AS u({aliases})")
        };
        let key_names = names(&table.key);
        let sql = match &shape {
            Shape::Upsert { columns: cols, .. } | Shape::Insert { columns: cols, .. } => {
                let updates: Vec<String> = cols
                    .iter()
                    .filter(|c| !table.key.contains(c))
                    .map(|c| format!("{0} = excluded.{0}", quote(c)))
                    .collect();
                let on_conflict = match (&shape, updates.is_empty()) {
                    (Shape::Upsert { .. }, false) => {
                        format!("ON CONFLICT ({key_names}) DO UPDATE SET {}", updates.join(", "))
                    }
                    // Only the key: another UNIQUE value taken is a refusal (a collision
                    // between two regions' rows, `store::engine`), not the application's race.
                    _ => format!("ON CONFLICT ({key_names}) DO NOTHING"),
                };
                format!(
                    "INSERT INTO {} ({}) {} {on_conflict}",
                    table.qualified(),
                    names(cols),
                    unnest(cols)
                )
            }
            Shape::Delete { .. } => format!(
                "DELETE FROM {} WHERE ({key_names}) IN ({})",
                table.qualified(),
                unnest(&table.key)
            ),
        };
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for column in columns {
            query = query.bind(column);
        }
        match query.execute(&mut *tx).await {
            Ok(done) => {
                if matches!(shape, Shape::Insert { .. }) && done.rows_affected() < rows {
                    return Err(Halt::Stop(Stop::Raced));
                }
                Ok(Written::Done)
            }
            Err(error) => match rejects_event(&error) {
                Some(reason) => Ok(Written::Refused(reason)),
                None => Err(error.into()),
            },
        }
    }
}

/// The row's current image, or `None`.
pub(super) async fn read_row(tx: &mut PgConnection, table: &PgTable, key: &Key) -> Result<Option<Row>, StoreError> {
    let sql = format!(
        "SELECT {} FROM {} t WHERE {}",
        table.select_list("t"),
        table.qualified(),
        table.key_predicate(1)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (i, value) in key.0.iter().enumerate() {
        let text = table.kinds[table.key_index[i]].text(value).unwrap_or(None);
        query = query.bind(text);
    }
    match query.fetch_optional(&mut *tx).await? {
        Some(row) => Ok(Some(read_image(table, &row, 0)?)),
        None => Ok(None),
    }
}

/// Another row of `table` than `key` holding `row`'s values (none NULL) in every column of
/// one of the table's UNIQUE constraints: the row a write of `row` collides with.
pub(super) async fn unique_holder(
    tx: &mut PgConnection,
    table: &PgTable,
    key: &Key,
    row: &Row,
) -> Result<Option<Row>, StoreError> {
    let Ok(key_texts) = table.texts(&table.key, &key.0.iter().collect::<Vec<_>>()) else {
        return Ok(None);
    };
    for set in &table.unique {
        let values: Option<Vec<&crate::event::Value>> = set
            .iter()
            .map(|c| row.get(c).filter(|v| !matches!(v, crate::event::Value::Null)))
            .collect();
        let Some(values) = values else { continue };
        let Ok(texts) = table.texts(set, &values) else { continue };
        let predicate = set
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "t.{} = ${}::text::{}",
                    quote(c),
                    i + 1,
                    table.type_of(c).unwrap_or("text")
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let sql = format!(
            "SELECT {} FROM {} t WHERE {predicate} AND NOT ({}) LIMIT 1",
            table.select_list("t"),
            table.qualified(),
            table.key_predicate(set.len() + 1)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for text in texts.into_iter().chain(key_texts.iter().cloned()) {
            query = query.bind(text);
        }
        if let Some(found) = query.fetch_optional(&mut *tx).await? {
            return Ok(Some(read_image(table, &found, 0)?));
        }
    }
    Ok(None)
}

/// Locks the existing rows the events touch, table by table in name order, and returns
/// their (table, key) set; `None` if `nowait` and another transaction holds one of them.
/// A key that cannot even be compared with its column (a bad cast) is taken as absent:
/// its write will be dead-lettered.
pub(super) async fn lock_rows(
    tx: &mut PgConnection,
    tables: &Tables<PgTable>,
    events: &[&Event],
    nowait: bool,
) -> Result<Option<HashSet<(String, Vec<u8>)>>, StoreError> {
    let wait = if nowait { " NOWAIT" } else { "" };
    let mut by_table: BTreeMap<&str, KeyColumns> = BTreeMap::new();
    let mut seen = HashSet::new();
    for event in events {
        let Some(table) = tables.get(&event.table) else {
            continue;
        };
        let bytes = event.key.to_bytes();
        if event.key.0.len() != table.key.len() || !seen.insert((event.table.as_str(), bytes.clone())) {
            continue;
        }
        let Ok(texts) = table.texts(&table.key, &event.key.0.iter().collect::<Vec<_>>()) else {
            continue;
        };
        let entry = by_table
            .entry(event.table.as_str())
            .or_insert_with(|| (Vec::new(), vec![Vec::new(); table.key.len()]));
        entry.0.push(bytes);
        for (column, text) in entry.1.iter_mut().zip(texts) {
            column.push(text);
        }
    }
    let mut exists = HashSet::new();
    for (name, (keys, columns)) in by_table {
        let table = &tables[name];
        let arrays = (1..=table.key.len())
            .map(|i| format!("${i}::text[]"))
            .collect::<Vec<_>>()
            .join(", ");
        let aliases = (0..table.key.len())
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let join = table
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("t.{} = u.c{i}::{}", quote(k), table.types[table.key_index[i]]))
            .collect::<Vec<_>>()
            .join(" AND ");
        let sql = format!(
            "SELECT u.ord FROM unnest({arrays}) WITH ORDINALITY AS u({aliases}, ord) \
                 JOIN {} t ON {join} FOR UPDATE OF t{wait}",
            table.qualified()
        );
        sqlx::raw_sql("SAVEPOINT weft_lock").execute(&mut *tx).await?;
        let mut query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql));
        for column in &columns {
            query = query.bind(column);
        }
        match query.fetch_all(&mut *tx).await {
            Ok(found) => {
                sqlx::raw_sql("RELEASE SAVEPOINT weft_lock").execute(&mut *tx).await?;
                for ord in found {
                    exists.insert((name.to_owned(), keys[ord as usize - 1].clone()));
                }
            }
            Err(error) if is_lock_not_available(&error) => return Ok(None),
            Err(error) if rejects_event(&error).is_some() => {
                // Some key does not fit its column: lock key by key instead.
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT weft_lock")
                    .execute(&mut *tx)
                    .await?;
                for (i, key) in keys.iter().enumerate() {
                    let values: Vec<Option<String>> = columns.iter().map(|c| c[i].clone()).collect();
                    match lock_one(tx, table, &values, wait).await? {
                        Some(true) => {
                            exists.insert((name.to_owned(), key.clone()));
                        }
                        Some(false) => {}
                        None => return Ok(None),
                    }
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(Some(exists))
}

async fn lock_one(
    tx: &mut PgConnection,
    table: &PgTable,
    key: &[Option<String>],
    wait: &str,
) -> Result<Option<bool>, StoreError> {
    let sql = format!(
        "SELECT 1 FROM {} t WHERE {} FOR UPDATE{wait}",
        table.qualified(),
        table.key_predicate(1)
    );
    sqlx::raw_sql("SAVEPOINT weft_lock_one").execute(&mut *tx).await?;
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for value in key {
        query = query.bind(value.clone());
    }
    match query.fetch_optional(&mut *tx).await {
        Ok(found) => {
            sqlx::raw_sql("RELEASE SAVEPOINT weft_lock_one")
                .execute(&mut *tx)
                .await?;
            Ok(Some(found.is_some()))
        }
        Err(error) if is_lock_not_available(&error) => Ok(None),
        Err(error) if rejects_event(&error).is_some() => {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT weft_lock_one")
                .execute(&mut *tx)
                .await?;
            Ok(Some(false))
        }
        Err(error) => Err(error.into()),
    }
}

/// Every row of `table`, streamed to `visit`; returns how many.
pub(super) async fn scan_rows(
    tx: &mut PgConnection,
    table: &PgTable,
    visit: &mut (dyn FnMut(Row) + Send),
) -> Result<u64, StoreError> {
    use futures_util::TryStreamExt as _;
    let sql = format!("SELECT {} FROM {} t", table.select_list("t"), table.qualified());
    let mut rows = sqlx::query(AssertSqlSafe(sql)).persistent(false).fetch(&mut *tx);
    let mut n = 0;
    while let Some(row) = rows.try_next().await? {
        visit(read_image(table, &row, 0)?);
        n += 1;
    }
    Ok(n)
}
