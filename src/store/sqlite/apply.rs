//! Apply: remote events into the local database, exactly once.
//!
//! One `BEGIN IMMEDIATE` transaction per run of events: mark the transaction as the applier's
//! (so capture triggers skip its writes), drain pending local changes first (so a remote event
//! never overwrites an undrained local change: the race becomes a visible conflict), then per
//! origin in seq order: drop duplicates, stop at a gap, decide with `replicate::decide`, write,
//! and advance the frontier. Frontier, data, metadata and clock commit together; the caller
//! acknowledges only after commit. An event that cannot be applied goes to
//! `_weft_dead_letters` with the reason and still advances the frontier: it never blocks the
//! stream and is never silently lost.

use sqlx::{AssertSqlSafe, Connection as _, SqliteConnection};

use super::bulk;
use super::run::SqliteRows;
use super::schema::{NOW_MICROS, TableInfo};
use super::{SqliteStore, Writer};
use crate::event::{Event, Row, Value};
use crate::replicate::RowVersion;
use crate::resolve::Winner;
use crate::store::admit::{admit, conflict_record, frontiers_from, strategy_name};
use crate::store::engine::{self, Mode};
use crate::store::{ApplyReport, StoreError};
use crate::wire;

/// Whether a database error is about this event's content (dead-letter it) rather than about
/// the database itself (fail the run, retry later).
pub(super) fn rejects_event(error: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = error else { return None };
    let code: i32 = db.code()?.parse().ok()?;
    // SQLITE_ERROR (e.g. no such column), TOOBIG, CONSTRAINT, MISMATCH, RANGE.
    matches!(code & 0xff, 1 | 18 | 19 | 20 | 25).then(|| db.message().to_owned())
}

impl SqliteStore {
    /// Applies a run of remote events (one stream's frame) in one transaction.
    ///
    /// Writes are grouped first; if the database refuses any grouped write for its
    /// content, the whole transaction rolls back and the run is replayed event by event,
    /// which finds and dead-letters exactly the refused events.
    pub async fn apply(&self, events: Vec<Event>) -> Result<ApplyReport, StoreError> {
        let mut guard = self.writer.lock().await;
        if let Some(report) = self.attempt(&mut guard, &events, Mode::Grouped).await? {
            return Ok(report);
        }
        tracing::debug!("a grouped write was refused; replaying the run event by event");
        let report = self.attempt(&mut guard, &events, Mode::EventByEvent).await?;
        Ok(report.expect("the event-by-event path dead-letters instead of refusing"))
    }

    /// One try at applying `events`; `None` when `Mode::Grouped` met a refused write (nothing
    /// was committed).
    async fn attempt(
        &self,
        writer: &mut Writer,
        events: &[Event],
        mode: Mode,
    ) -> Result<Option<ApplyReport>, StoreError> {
        let mut tx = writer.conn.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT INTO _weft_applying (marker) VALUES (1)")
            .execute(&mut *tx)
            .await?;
        let mut report = ApplyReport {
            drained: self.drain_in(&mut tx, writer.last_seq).await?,
            ..ApplyReport::default()
        };

        let known: Vec<(String, i64, i64)> = sqlx::query_as("SELECT origin, seq, processed FROM _weft_frontier")
            .fetch_all(&mut *tx)
            .await?;
        let mut frontiers = frontiers_from(known);
        let admitted = admit(&self.identity.node, &self.clock, events, &mut frontiers, &mut report);

        let written = {
            let mut rows = SqliteRows::new(self, &mut tx);
            match engine::apply_events(&mut rows, &admitted, &mut report, mode).await? {
                Ok(written) => written,
                Err(_) => return Ok(None),
            }
        };
        let stored: Vec<(&str, &[u8], &RowVersion)> =
            written.iter().map(|(t, k, v)| (t.as_str(), k.as_slice(), v)).collect();
        bulk::store_versions(&mut tx, &stored).await?;
        self.keep_for_relay(&mut tx, &admitted).await?;

        for (origin, frontier) in frontiers.iter().filter(|(_, f)| f.changed) {
            sqlx::query(
                "INSERT INTO _weft_frontier (origin, seq, processed) VALUES (?, ?, ?) \
                 ON CONFLICT (origin) DO UPDATE SET seq = excluded.seq, processed = excluded.processed",
            )
            .bind(origin)
            .bind(frontier.seq as i64)
            .bind(frontier.processed as i64)
            .execute(&mut *tx)
            .await?;
        }
        self.persist_clock(&mut tx).await?;
        sqlx::query("DELETE FROM _weft_applying").execute(&mut *tx).await?;
        tx.commit().await?;
        writer.last_seq = report.drained.last_seq;
        report.frontiers = frontiers.into_iter().map(|(o, f)| (o, f.seq)).collect();
        Ok(Some(report))
    }

    /// Appends admitted events of relayed origins to the log, unchanged but for this node
    /// added to their path. Every admitted event is kept, whatever its local outcome: a
    /// table this node does not replicate may well be replicated further along.
    async fn keep_for_relay(&self, tx: &mut SqliteConnection, admitted: &[&Event]) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        for event in admitted.iter().filter(|e| self.relayed.contains(&e.origin)) {
            let mut relayed = (*event).clone();
            relayed.path.push(self.identity.node.clone());
            rows.push(vec![
                Value::Text(relayed.origin.clone()),
                Value::Integer(relayed.seq as i64),
                Value::Integer(relayed.batch_end as i64),
                Value::Integer(relayed.committed_at_micros),
                Value::Blob(wire::encode_event(&relayed)),
            ]);
        }
        bulk::insert(tx, bulk::LOG_INSERT, "", 5, &rows).await?;
        Ok(())
    }

    /// Records a resolved conflict with both versions, for audit.
    pub(super) async fn log_conflict(
        &self,
        tx: &mut SqliteConnection,
        table: &TableInfo,
        event: &Event,
        local: &RowVersion,
        local_row: Option<&Row>,
        winner: Winner,
    ) -> Result<(), StoreError> {
        let (won, lost) = conflict_record(event, local, local_row, winner);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO _weft_conflicts (tbl, key, strategy, winner, loser, at) VALUES (?, ?, ?, ?, ?, {NOW_MICROS})"
        )))
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
        tx: &mut SqliteConnection,
        event: &Event,
        reason: &str,
        report: &mut ApplyReport,
    ) -> Result<(), StoreError> {
        tracing::warn!(origin = %event.origin, seq = event.seq, table = %event.table, key = %event.key, reason, "dead-lettered event");
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO _weft_dead_letters (origin, seq, tbl, key, reason, event, at) VALUES (?, ?, ?, ?, ?, ?, {NOW_MICROS})"
        )))
        .bind(&event.origin)
        .bind(event.seq as i64)
        .bind(&event.table)
        .bind(event.key.to_string())
        .bind(reason)
        .bind(wire::encode_event(event))
        .execute(&mut *tx)
        .await?;
        report.dead_lettered += 1;
        Ok(())
    }
}
