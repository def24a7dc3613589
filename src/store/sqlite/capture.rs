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

use super::schema::TableInfo;
use super::values::{bind, value_at};
use super::{SqliteStore, Writer};
use crate::event::{Event, Key, Op, Row};
use crate::replicate::RowVersion;
use crate::store::{DrainReport, StoreError};
use crate::version::VersionVector;
use crate::wire;

struct Pending {
    table: Arc<TableInfo>,
    key: Key,
    key_bytes: Vec<u8>,
    committed_at: i64,
    last_id: i64,
}

pub(super) async fn load_version(
    conn: &mut SqliteConnection,
    table: &str,
    key: &[u8],
) -> Result<Option<RowVersion>, StoreError> {
    let row = sqlx::query("SELECT version, hlc, origin, deleted FROM _weft_rows WHERE tbl = ? AND key = ?")
        .bind(table)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let version: String = row.try_get(0)?;
    Ok(Some(RowVersion {
        version: VersionVector::from_json(&version)
            .map_err(|e| StoreError::Corrupt(format!("version of {table} row: {e}")))?,
        hlc: crate::event::Hlc(row.try_get::<i64, _>(1)? as u64),
        origin: row.try_get(2)?,
        deleted: row.try_get::<i64, _>(3)? != 0,
    }))
}

pub(super) async fn store_version(
    conn: &mut SqliteConnection,
    table: &str,
    key: &[u8],
    version: &RowVersion,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT OR REPLACE INTO _weft_rows (tbl, key, version, hlc, origin, deleted) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(table)
    .bind(key)
    .bind(version.version.to_json())
    .bind(version.hlc.0 as i64)
    .bind(&version.origin)
    .bind(i64::from(version.deleted))
    .execute(&mut *conn)
    .await?;
    Ok(())
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
        let rows = sqlx::query("SELECT id, tbl, k1, k2, k3, k4, at FROM _weft_outbox ORDER BY id")
            .fetch_all(&mut *tx)
            .await?;
        let Some(last_row) = rows.last() else {
            return Ok(DrainReport { events: 0, last_seq });
        };
        let max_id: i64 = last_row.try_get(0)?;

        // Coalesce per row; the event takes the position of the row's last change, which
        // keeps parent/child order for foreign keys (insert parent, then child; delete child,
        // then parent).
        let mut pending: Vec<Pending> = Vec::new();
        let mut index: HashMap<(String, Vec<u8>), usize> = HashMap::new();
        let mut orphans = 0u64;
        for row in &rows {
            let id: i64 = row.try_get(0)?;
            let table_name: String = row.try_get(1)?;
            let Some(table) = self.tables.get(&table_name) else {
                orphans += 1;
                continue;
            };
            let key = Key((0..table.key.len())
                .map(|i| value_at(row, 2 + i))
                .collect::<Result<_, _>>()?);
            let key_bytes = key.to_bytes();
            let committed_at: i64 = row.try_get(6)?;
            match index.get(&(table_name.clone(), key_bytes.clone())) {
                Some(&i) => {
                    pending[i].committed_at = pending[i].committed_at.max(committed_at);
                    pending[i].last_id = id;
                }
                None => {
                    index.insert((table_name, key_bytes.clone()), pending.len());
                    pending.push(Pending {
                        table: table.clone(),
                        key,
                        key_bytes,
                        committed_at,
                        last_id: id,
                    });
                }
            }
        }
        if orphans > 0 {
            tracing::warn!(orphans, "dropped outbox rows of tables no longer replicated");
        }

        pending.sort_by_key(|p| p.last_id);

        let me = &self.identity.node;
        let mut events = Vec::with_capacity(pending.len());
        for p in &pending {
            let image = read_row(tx, &p.table, &p.key).await?;
            let local = load_version(tx, &p.table.name, &p.key_bytes).await?;
            if image.is_none() && local.is_none() {
                // Inserted and deleted between two drains: nobody ever saw it.
                continue;
            }
            let mut version = local.map(|l| l.version).unwrap_or_default();
            version.increment(me);
            events.push(Event {
                origin: me.clone(),
                origin_region: self.identity.region.clone(),
                seq: 0,
                batch_end: 0,
                hlc: self.clock.now(),
                table: p.table.name.clone(),
                key: p.key.clone(),
                op: image.map(Op::Upsert).unwrap_or(Op::Delete),
                version,
                path: vec![me.clone()],
                committed_at_micros: p.committed_at,
            });
        }
        let batch_end = last_seq + events.len() as u64;
        for (i, event) in events.iter_mut().enumerate() {
            event.seq = last_seq + 1 + i as u64;
            event.batch_end = batch_end;
            store_version(tx, &event.table, &event.key.to_bytes(), &RowVersion::of_event(event)).await?;
            sqlx::query("INSERT INTO _weft_log (origin, seq, batch_end, committed_at, event) VALUES (?, ?, ?, ?, ?)")
                .bind(me)
                .bind(event.seq as i64)
                .bind(batch_end as i64)
                .bind(event.committed_at_micros)
                .bind(wire::encode_event(event))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE _weft_node SET value = ? WHERE name = 'last_seq'")
            .bind(batch_end as i64)
            .execute(&mut *tx)
            .await?;
        self.persist_clock(tx).await?;
        sqlx::query("DELETE FROM _weft_outbox WHERE id <= ?")
            .bind(max_id)
            .execute(&mut *tx)
            .await?;
        Ok(DrainReport {
            events: events.len() as u64,
            last_seq: batch_end,
        })
    }
}
