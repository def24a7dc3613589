//! Apply on PostgreSQL: remote events into the local database, exactly once.
//!
//! One transaction per run, marked `SET LOCAL weft.applying = 'on'` so the capture triggers
//! skip its writes. Order inside it:
//! 1. admission against the frontiers (`store::admit`);
//! 2. `SELECT ... FOR UPDATE` of every row the run touches: an application transaction that
//!    changed one of them has committed by now, and no other can until we commit. The first
//!    tries use `NOWAIT` (a held row rolls the run back, and it is retried shortly), so the
//!    applier does not wait for a row while holding others, which could deadlock with an
//!    application taking the same rows in another order;
//! 3. the drain of local changes, so those changes become versions the run compares with;
//! 4. decisions with `replicate::decide`, writes grouped into `unnest` statements, row
//!    metadata, frontiers and clock; commit.
//!
//! Rows absent at step 2 are written with `ON CONFLICT DO NOTHING`. If the application
//! inserted one meanwhile, the count comes up short and the whole run is rolled back and
//! retried, so that insert is drained and compared, never overwritten. A write PostgreSQL
//! refuses for its content (a cast, a constraint) rolls the run back, and the run is replayed
//! event by event under savepoints, which dead-letters exactly the refused events.
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use sqlx::{AssertSqlSafe, PgConnection};

use super::PgStore;
use super::capture::{Meta, read_image, write_meta};
use super::rows::PgRows;
use super::schema::{PgTable, quote};
use crate::event::{Event, Key, Row};
use crate::replicate::RowVersion;
use crate::resolve::Winner;
use crate::store::admit::{admit, conflict_record, frontiers_from, strategy_name};
use crate::store::engine::{self, Mode, Step, Stop};
use crate::store::{ApplyReport, StoreError};

/// How many times a run is retried after losing a race with an application insert.
const MAX_RACES: usize = 20;

enum Outcome {
    Done(ApplyReport),
    Stopped(Stop),
    /// A row of the run is locked by another transaction (only when locking without waiting).
    Busy,
}

/// How long a run keeps trying to lock its rows without waiting before it waits (up to
/// `lock_timeout`). A run that waits for a row while holding others can deadlock with an
/// application transaction that takes the same rows in another order; a run that takes its
/// locks without waiting never does, and application transactions are usually far shorter.
const NOWAIT_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a database error is about the event's content (dead-letter it) rather than the
/// database (fail the run and retry later).
pub(super) fn rejects_event(error: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = error else { return None };
    let code = db.code()?;
    // 22: data exception (bad input, out of range); 23: integrity constraint;
    // 42804 datatype mismatch; 42703 undefined column.
    (code.starts_with("22") || code.starts_with("23") || code == "42804" || code == "42703")
        .then(|| format!("{} (SQLSTATE {code})", db.message()))
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
pub(super) struct Pending {
    shape: Option<(Shape, Arc<PgTable>)>,
    /// Column values as text, one vector per column.
    columns: Vec<Vec<Option<String>>>,
    keys: HashSet<Vec<u8>>,
}

/// Keys of one table: their canonical bytes, and their values as text, column by column.
type KeyColumns = (Vec<Vec<u8>>, Vec<Vec<Option<String>>>);

impl Pending {
    /// Queues a write; flushes first if the shape changes or the key repeats.
    pub(super) async fn push(
        &mut self,
        tx: &mut PgConnection,
        shape: Shape,
        table: &Arc<PgTable>,
        key: Vec<u8>,
        values: Vec<Option<String>>,
    ) -> Step {
        if self.shape.as_ref().is_some_and(|(s, _)| *s != shape) || self.keys.contains(&key) {
            match self.flush(tx).await? {
                Ok(Ok(())) => {}
                other => return Ok(other),
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
        Ok(Ok(Ok(())))
    }

    pub(super) async fn flush(&mut self, tx: &mut PgConnection) -> Step {
        let Some((shape, table)) = self.shape.take() else {
            return Ok(Ok(Ok(())));
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
                    _ => "ON CONFLICT DO NOTHING".to_owned(),
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
                    return Ok(Err(Stop::Raced));
                }
                Ok(Ok(Ok(())))
            }
            Err(error) => match rejects_event(&error) {
                Some(reason) => Ok(Ok(Err(reason))),
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

impl PgStore {
    /// Applies a run of remote events (one stream's frame) in one transaction.
    pub async fn apply(&self, events: Vec<Event>) -> Result<ApplyReport, StoreError> {
        self.with_writer(async |store: &Self, conn: &mut PgConnection, last_seq: &mut u64| {
            let started = std::time::Instant::now();
            let mut mode = Mode::Grouped;
            let mut busy = 0u32;
            let mut races = 0;
            while races < MAX_RACES {
                let nowait = started.elapsed() < NOWAIT_FOR;
                match store.attempt(conn, &events, mode, last_seq, nowait).await? {
                    Outcome::Done(report) => {
                        tracing::debug!(
                            events = events.len(),
                            ms = started.elapsed().as_secs_f64() * 1e3,
                            "applied"
                        );
                        return Ok(report);
                    }
                    Outcome::Stopped(Stop::Refused) => {
                        tracing::debug!("a grouped write was refused; replaying the run event by event");
                        mode = Mode::EventByEvent;
                    }
                    Outcome::Stopped(Stop::Raced) => {
                        tracing::debug!("an application insert raced the run; retrying it");
                        races += 1;
                    }
                    Outcome::Busy => {
                        busy += 1;
                        tracing::debug!(busy, "a row of the run is locked by the application; retrying the run");
                        tokio::time::sleep(std::time::Duration::from_millis(1 << busy.min(6))).await;
                    }
                }
            }
            Err(StoreError::Busy(format!(
                "the application kept inserting rows this run was inserting ({MAX_RACES} tries); retrying later"
            )))
        })
        .await
    }

    async fn attempt(
        &self,
        conn: &mut PgConnection,
        events: &[Event],
        mode: Mode,
        last_seq: &mut u64,
        nowait: bool,
    ) -> Result<Outcome, StoreError> {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        // Marks the transaction as the applier's and reads the frontiers, in one round trip.
        let known: Vec<(Option<String>, Option<i64>, Option<i64>)> = sqlx::query_as(
            "WITH mark AS (SELECT set_config('weft.applying', 'on', true)) \
             SELECT f.origin, f.seq, f.processed FROM mark LEFT JOIN weft.frontier f ON true",
        )
        .fetch_all(&mut *tx)
        .await?;
        let known = known.into_iter().filter_map(|(o, s, p)| Some((o?, s?, p?)));
        let mut frontiers = frontiers_from(known);
        let mut report = ApplyReport::default();
        let admitted = admit(&self.identity.node, &self.clock, events, &mut frontiers, &mut report);
        let Some(mut exists) = self.lock_rows(&mut tx, &admitted, nowait).await? else {
            return Ok(Outcome::Busy);
        };
        report.drained = self.drain_in(&mut tx, *last_seq).await?;
        let written = {
            let mut rows = PgRows::new(self, &mut tx, &mut exists);
            match engine::apply_events(&mut rows, &admitted, &mut report, mode).await? {
                Ok(written) => written,
                Err(stop) => return Ok(Outcome::Stopped(stop)),
            }
        };
        let relayed: Vec<Event> = admitted
            .iter()
            .filter(|e| self.relayed.contains(&e.origin))
            .map(|e| {
                let mut relayed = (*e).clone();
                relayed.path.push(self.identity.node.clone());
                relayed
            })
            .collect();
        write_meta(
            &mut tx,
            Meta {
                versions: written.iter().map(|(t, k, v)| (t.as_str(), k.as_slice(), v)).collect(),
                log: relayed.iter().collect(),
                frontiers: frontiers
                    .iter()
                    .filter(|(_, f)| f.changed)
                    .map(|(o, f)| (o.as_str(), f.seq, f.processed))
                    .collect(),
                hlc: self.clock.last().0,
                ..Meta::default()
            },
        )
        .await?;
        tx.commit().await?;
        *last_seq = report.drained.last_seq;
        report.frontiers = frontiers.into_iter().map(|(o, f)| (o, f.seq)).collect();
        Ok(Outcome::Done(report))
    }

    /// Locks the existing rows the events touch, table by table in name order, and returns
    /// their (table, key) set; `None` if `nowait` and another transaction holds one of them.
    /// A key that cannot even be compared with its column (a bad cast) is taken as absent:
    /// its write will be dead-lettered.
    async fn lock_rows(
        &self,
        tx: &mut PgConnection,
        events: &[&Event],
        nowait: bool,
    ) -> Result<Option<HashSet<(String, Vec<u8>)>>, StoreError> {
        let wait = if nowait { " NOWAIT" } else { "" };
        let mut by_table: BTreeMap<&str, KeyColumns> = BTreeMap::new();
        let mut seen = HashSet::new();
        for event in events {
            let Some(table) = self.tables.get(&event.table) else {
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
            let table = &self.tables[name];
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
                        match self.lock_one(tx, table, &values, wait).await? {
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
        &self,
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

    pub(super) async fn log_conflict(
        &self,
        tx: &mut PgConnection,
        table: &PgTable,
        event: &Event,
        local: &RowVersion,
        local_row: Option<&Row>,
        winner: Winner,
    ) -> Result<(), StoreError> {
        let (won, lost) = conflict_record(event, local, local_row, winner);
        sqlx::query(
            "INSERT INTO weft.conflicts (tbl, key, strategy, winner, loser, at) VALUES ($1, $2, $3, $4, $5, weft.now_micros())",
        )
        .bind(&table.name)
        .bind(event.key.to_string())
        .bind(strategy_name(table.strategy))
        .bind(won)
        .bind(lost)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    pub(super) async fn dead_letter(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        reason: &str,
        report: &mut ApplyReport,
    ) -> Result<(), StoreError> {
        tracing::warn!(origin = %event.origin, seq = event.seq, table = %event.table, key = %event.key, reason, "dead-lettered event");
        sqlx::query(
            "INSERT INTO weft.dead_letters (origin, seq, tbl, key, reason, event, at) \
             VALUES ($1, $2, $3, $4, $5, $6, weft.now_micros())",
        )
        .bind(&event.origin)
        .bind(event.seq as i64)
        .bind(&event.table)
        .bind(event.key.to_string())
        .bind(reason)
        .bind(crate::wire::encode_event(event))
        .execute(&mut *tx)
        .await?;
        report.dead_lettered += 1;
        Ok(())
    }
}
