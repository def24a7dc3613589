//! Capture: turning committed outbox rows into events.
//!
//! The drain runs in one `BEGIN IMMEDIATE` transaction, so it sees only whole committed
//! application transactions and no writer can commit halfway through it. Several changes to
//! one row in one drain coalesce into one event carrying the row's image at drain time (the
//! intermediate images were never visible to anyone after the drain either). Each event gets
//! the next seq, a fresh HLC and the row's vector plus one for this node; row metadata, log
//! append and outbox delete commit together.
use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{AssertSqlSafe, Row as _, SqliteConnection};

use super::bulk;
use super::run::SqliteRows;
use super::schema::TableInfo;
use super::values::{bind, value_at};
use super::{SqliteStore, Writer};
use crate::event::{Key, Row, Value};
use crate::replicate::RowVersion;
use crate::store::{DrainReport, StoreError};
use crate::wire;

struct Pending {
    table: Arc<TableInfo>,
    key: Key,
    key_bytes: Vec<u8>,
    committed_at: i64,
    last_id: i64,
    /// The row's image at drain time; `None` if it no longer exists.
    image: Option<Row>,
}

/// The row's current image, or `None` if it does not exist.
pub(super) async fn read_row(
    conn: &mut SqliteConnection,
    table: &TableInfo,
    key: &Key,
) -> Result<Option<Row>, StoreError> {
    let mut query = sqlx::query(AssertSqlSafe(table.select_sql.as_str()));
    for value in &key.0 {
        query = bind(query, value);
    }
    let Some(row) = query.fetch_optional(&mut *conn).await? else {
        return Ok(None);
    };
    let mut columns = Vec::with_capacity(table.columns.len());
    for (i, name) in table.columns.iter().enumerate() {
        columns.push((name.clone(), value_at(&row, i)?));
    }
    Ok(Some(Row(columns)))
}

impl SqliteStore {
    /// Persists the clock's high-water mark with the events stamped by it, so a restart
    /// never issues a smaller timestamp.
    pub(super) async fn persist_clock(&self, tx: &mut SqliteConnection) -> Result<(), StoreError> {
        sqlx::query("UPDATE _weft_node SET value = ? WHERE name = 'hlc'")
            .bind(self.clock.last().0 as i64)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Drains the outbox into the log in its own transaction.
    pub async fn drain(&self) -> Result<DrainReport, StoreError> {
        let mut guard = self.writer.lock().await;
        let writer: &mut Writer = &mut guard;
        let pending: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM _weft_outbox)")
            .fetch_one(&mut writer.conn)
            .await?;
        if !pending {
            return Ok(DrainReport {
                events: 0,
                last_seq: writer.last_seq,
            });
        }
        let mut tx = sqlx::Connection::begin_with(&mut writer.conn, "BEGIN IMMEDIATE").await?;
        let report = self.drain_in(&mut tx, writer.last_seq).await?;
        tx.commit().await?;
        writer.last_seq = report.last_seq;
        Ok(report)
    }

    /// The drain, inside the caller's write transaction. The caller adopts
    /// `report.last_seq` only once that transaction commits.
    pub(super) async fn drain_in(&self, tx: &mut SqliteConnection, last_seq: u64) -> Result<DrainReport, StoreError> {
        let unchanged = DrainReport { events: 0, last_seq };
        let Some(max_id): Option<i64> = sqlx::query_scalar("SELECT max(id) FROM _weft_outbox")
            .fetch_one(&mut *tx)
            .await?
        else {
            return Ok(unchanged);
        };

        // One statement per table returns its outbox rows joined with the rows' current
        // images. Several changes to one row coalesce; the event takes the position of the
        // row's last change, which keeps parent/child order for foreign keys (insert parent,
        // then child; delete child, then parent).
        let mut pending: Vec<Pending> = Vec::new();
        let mut index: HashMap<(&str, Vec<u8>), usize> = HashMap::new();
        let mut matched = 0u64;
        for table in self.tables.values() {
            let rows = sqlx::query(AssertSqlSafe(table.drain_sql.as_str()))
                .bind(max_id)
                .fetch_all(&mut *tx)
                .await?;
            matched += rows.len() as u64;
            let n = table.key.len();
            for row in &rows {
                let id: i64 = row.try_get(0)?;
                let committed_at: i64 = row.try_get(1)?;
                let key = Key((0..n).map(|i| value_at(row, 2 + i)).collect::<Result<_, _>>()?);
                let key_bytes = key.to_bytes();
                if let Some(&i) = index.get(&(table.name.as_str(), key_bytes.clone())) {
                    pending[i].committed_at = pending[i].committed_at.max(committed_at);
                    pending[i].last_id = id;
                    continue;
                }
                let present: bool = row.try_get(2 + n)?;
                let image = if present {
                    let mut columns = Vec::with_capacity(table.columns.len());
                    for (j, name) in table.columns.iter().enumerate() {
                        columns.push((name.clone(), value_at(row, 3 + n + j)?));
                    }
                    Some(Row(columns))
                } else {
                    None
                };
                index.insert((table.name.as_str(), key_bytes.clone()), pending.len());
                pending.push(Pending {
                    table: table.clone(),
                    key,
                    key_bytes,
                    committed_at,
                    last_id: id,
                    image,
                });
            }
        }
        pending.sort_by_key(|p| p.last_id);

        let mut local = HashMap::new();
        for table in self.tables.values() {
            let keys: Vec<Vec<u8>> = pending
                .iter()
                .filter(|p| p.table.name == table.name)
                .map(|p| p.key_bytes.clone())
                .collect();
            if !keys.is_empty() {
                local.insert(table.name.as_str(), bulk::load_versions(tx, &table.name, &keys).await?);
            }
        }

        let me = &self.identity.node;
        let changes = pending.into_iter().map(|p| crate::store::admit::LocalChange {
            previous: local.get(p.table.name.as_str()).and_then(|m| m.get(&p.key_bytes)),
            table: p.table.name.clone(),
            key: p.key,
            key_bytes: p.key_bytes,
            image: p.image,
            committed_at: p.committed_at,
        });
        let mut events = crate::store::admit::local_events(&self.identity, &self.clock, last_seq, changes);
        let batch_end = last_seq + events.len() as u64;
        let mut versions = Vec::with_capacity(events.len());
        let mut log = Vec::with_capacity(events.len());
        for (key_bytes, event) in events.iter_mut() {
            if let Some(table) = self.tables.get(&event.table) {
                let mut rows = SqliteRows::new(self, tx);
                crate::store::engine::settle_local(&mut rows, &self.identity, table, key_bytes, event, true).await?;
            }
            versions.push(RowVersion::of_event(event));
            log.push(vec![
                Value::Text(me.clone()),
                Value::Integer(event.seq as i64),
                Value::Integer(batch_end as i64),
                Value::Integer(event.committed_at_micros),
                Value::Blob(wire::encode_event(event)),
            ]);
        }
        let stored: Vec<(&str, &[u8], &RowVersion)> = events
            .iter()
            .zip(&versions)
            .map(|((key, event), version)| (event.table.as_str(), key.as_slice(), version))
            .collect();
        bulk::store_versions(tx, &stored).await?;
        bulk::insert(
            tx,
            "INSERT INTO _weft_log (origin, seq, batch_end, committed_at, event) VALUES",
            "",
            5,
            &log,
        )
        .await?;
        sqlx::query("UPDATE _weft_node SET value = ? WHERE name = 'last_seq'")
            .bind(batch_end as i64)
            .execute(&mut *tx)
            .await?;
        self.persist_clock(tx).await?;
        let removed = sqlx::query("DELETE FROM _weft_outbox WHERE id <= ?")
            .bind(max_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if removed > matched {
            tracing::warn!(
                orphans = removed - matched,
                "dropped outbox rows of tables no longer replicated"
            );
        }
        Ok(DrainReport {
            events: events.len() as u64,
            last_seq: batch_end,
        })
    }
}
