//! Capture: turning committed outbox rows into events, in one write transaction.
//!
//! The dialect lists committed source transactions only (`Txn::take_outbox`), at most
//! [`DRAIN_PIECE`] outbox rows at a time, so memory and the message sizes on the wire stay
//! bounded whatever the application commits: a source transaction larger than that becomes
//! several capture batches, each applied atomically at the receivers, in order (the README
//! says what this means for atomicity). A drain of its own takes one piece per transaction,
//! and commits between pieces, so the application is never held up long; the drain an apply
//! runs first takes every piece, so that no remote event lands on an undrained local change.
//! Several changes to one row in one piece coalesce into one event carrying the row's last image
//! (the intermediate images were never visible to anyone after the drain either); the event
//! takes the position of the row's last change, which keeps parent/child order for foreign
//! keys (insert parent, then child; delete child, then parent). Each event gets the next seq,
//! a fresh HLC and the row's vector with this node's entry at the seq. Strategy state (CRDT states,
//! owners, queue entries) is settled by `store::engine`; row metadata, log append, last seq,
//! clock and outbox delete commit together, so a drain happens entirely or not at all.
use std::collections::HashMap;

use crate::clock::Clock;
use crate::config::Strategy;
use crate::event::{Event, Identity, Key, Op, Row, Value};
use crate::replicate::RowVersion;
use crate::store::backend::{Backend, Captured, Conn, Meta, Txn};
use crate::store::engine::{self, TableRules};
use crate::store::replica::Replica;
use crate::store::{DrainReport, StoreError};
use crate::version::VersionVector;

/// Most outbox rows one capture batch takes: the size of a batch on the wire by default
/// (`batch_max_events`), so a sender's window holds a few megabytes, not a transaction. A
/// million-row source transaction is five hundred capture batches, each under a megabyte of
/// 300-byte rows.
pub const DRAIN_PIECE: i64 = 2_000;

/// How much of the outbox a drain takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drain {
    /// One piece (the capture loop comes back at once for the rest).
    Piece,
    /// Everything, piece by piece in the same transaction.
    All,
}

impl<B: Backend> Replica<B> {
    /// Drains the outbox into the log in its own transaction.
    pub async fn drain(&self) -> Result<DrainReport, StoreError> {
        self.with_writer(async |store: &Self, conn: &mut Conn<B>, last_seq: &mut u64| {
            if !B::may_have_changes(conn).await? && !store.schema_moved(conn).await? {
                return Ok(DrainReport {
                    events: 0,
                    last_seq: *last_seq,
                    more: false,
                });
            }
            let started = std::time::Instant::now();
            let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
            let report = {
                let tables = store.current_tables(&mut tx).await?;
                let mut txn = store.backend.txn(&tables, &mut tx);
                store.drain_in(&mut txn, Drain::Piece).await?
            };
            tx.commit().await?;
            if report.events > 0 && crate::crashpoint::reply_lost(B::DRAIN_REPLY_LOST) {
                return Err(StoreError::Failpoint("the drain's commit reply was lost"));
            }
            tracing::debug!(
                events = report.events,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "drained"
            );
            *last_seq = report.last_seq;
            Ok(report)
        })
        .await
    }

    /// The drain, inside the caller's write transaction. It numbers after the last seq the
    /// database holds (read in this transaction); the caller's in-memory copy is for
    /// reporting only, and is updated once the transaction commits.
    pub(crate) async fn drain_in<T: Txn<Table = B::Table>>(
        &self,
        txn: &mut T,
        how: Drain,
    ) -> Result<DrainReport, StoreError> {
        let mut total = DrainReport::default();
        loop {
            let piece = self.drain_piece(txn).await?;
            total.events += piece.events;
            total.last_seq = piece.last_seq;
            total.more = piece.more;
            if !piece.more || how == Drain::Piece {
                return Ok(total);
            }
        }
    }

    /// One piece of the outbox, at most [`DRAIN_PIECE`] rows, into the log.
    async fn drain_piece<T: Txn<Table = B::Table>>(&self, txn: &mut T) -> Result<DrainReport, StoreError> {
        let last_seq = txn.last_seq().await?;
        let Some(mut captured) = txn.take_outbox(DRAIN_PIECE).await? else {
            return Ok(DrainReport {
                events: 0,
                last_seq,
                more: false,
            });
        };
        let mut more = captured.len() as i64 >= DRAIN_PIECE;
        captured.sort_by_key(|c| c.id);
        if let Some(cut) = piece_end(&captured, self.messages.piece_bytes) {
            txn.take_only_through(captured[cut - 1].id, cut as u64);
            captured.truncate(cut);
            more = true;
        }
        let mut changes = coalesce(captured);
        self.refuse_oversized(txn, &mut changes).await?;
        let mut keys: HashMap<&str, Vec<Vec<u8>>> = HashMap::new();
        for (key, change) in &changes {
            keys.entry(change.table.name()).or_default().push(key.clone());
        }
        let mut stored: HashMap<String, HashMap<Vec<u8>, RowVersion>> = HashMap::new();
        for (table, keys) in keys {
            stored.insert(table.to_owned(), txn.versions(table, &keys).await?);
        }
        leave_foreign_rows(txn, &self.identity, &mut changes, &stored).await?;
        let unknown = changes
            .iter()
            .any(|(key, c)| !stored.get(c.table.name()).is_some_and(|m| m.contains_key(key)));
        // A row this node has no version of may be one whose tombstone it purged: its new
        // version starts from the purge floor, above every tombstone this node purged, so
        // the write replaces the row where the tombstone is still kept (`store::gc`).
        let floor = match unknown {
            true => crate::store::gc::floor(txn).await?,
            false => VersionVector::new(),
        };
        let local = changes.iter().map(|(key, c)| LocalChange {
            previous: stored.get(c.table.name()).and_then(|m| m.get(key)),
            table: c.table.name().to_owned(),
            key: c.key.clone(),
            key_bytes: key.clone(),
            image: c.image.clone(),
            committed_at: c.committed_at,
        });
        let mut events = local_events(&self.identity, &self.clock, last_seq, &floor, local);
        for (key, event) in events.iter_mut() {
            if let Some(table) = txn.table(&event.table).filter(|t| t.strategy() != Strategy::Lww) {
                let was_deleted = stored
                    .get(&event.table)
                    .and_then(|versions| versions.get(key))
                    .is_some_and(|v| v.deleted);
                let held = T::DRAIN_HOLDS_ROWS;
                let actor = self.crdt_actor();
                engine::settle_local(txn, &self.identity, &table, key, event, (held, was_deleted), &actor).await?;
            }
        }
        let batch_end = last_seq + events.len() as u64;
        let versions = drained_versions(txn, &events);
        let meta = Meta {
            versions: events
                .iter()
                .zip(&versions)
                .map(|((key, event), version)| (event.table.as_str(), key.as_slice(), version))
                .collect(),
            log: events.iter().map(|(_, e)| e).collect(),
            frontiers: Vec::new(),
            outbox_taken: true,
            last_seq: Some(batch_end),
            hlc: self.clock.last().0,
        };
        txn.write_meta(meta).await?;
        Ok(DrainReport {
            more,
            events: events.len() as u64,
            last_seq: batch_end,
        })
    }
}

/// About how many bytes a change's event takes on the wire: its key and image, CRDT columns
/// counted three times (their states travel beside the values), and room for the rest.
fn wire_size<T: TableRules>(change: &Captured<T>) -> usize {
    let value = |v: &Value| {
        4 + match v {
            Value::Text(t) => t.len(),
            Value::Blob(b) => b.len(),
            _ => 9,
        }
    };
    let crdt = change.table.crdt();
    let image = change.image.as_ref().map_or(0, |row| {
        row.0
            .iter()
            .map(|(c, v)| c.len() + value(v) * if crdt.contains_key(c) { 3 } else { 1 })
            .sum()
    });
    256 + change.key.0.iter().map(value).sum::<usize>() + image
}

/// Where a piece of outbox rows (in id order) ends so that its events hold at most `budget`
/// bytes: the count of rows to take, if fewer than all. A piece takes at least one row.
fn piece_end<T: TableRules>(captured: &[Captured<T>], budget: usize) -> Option<usize> {
    let mut total = 0usize;
    for (i, change) in captured.iter().enumerate() {
        total = total.saturating_add(wire_size(change));
        if total > budget && i > 0 {
            return Some(i);
        }
    }
    None
}

impl<B: Backend> Replica<B> {
    /// Takes out of the piece every change too large for any message, each kept as a `too
    /// large` dead letter here with an error: no link could carry it (a frame or record over
    /// `max_message_mib` is refused and resent forever), and nothing behind it may wait. The
    /// row stays as it is in this region only, until it is written smaller or the limit is
    /// raised on every node and the row written again.
    async fn refuse_oversized<T: Txn<Table = B::Table>>(
        &self,
        txn: &mut T,
        changes: &mut Vec<(Vec<u8>, Captured<B::Table>)>,
    ) -> Result<(), StoreError> {
        let limit = self.messages.event_bytes;
        if changes.iter().all(|(_, c)| wire_size(c) <= limit) {
            return Ok(());
        }
        let mut report = crate::store::ApplyReport {
            dead_letter_limit: u64::MAX,
            ..Default::default()
        };
        let mut kept = Vec::with_capacity(changes.len());
        for (key, change) in changes.drain(..) {
            let size = wire_size(&change);
            if size <= limit {
                kept.push((key, change));
                continue;
            }
            let reason = format!(
                "this change of {} row {} is about {} MiB on the wire, more than any message may carry \
                 (max_message_mib allows {} MiB of events): it is not replicated, and stays in this region only. \
                 Write the row smaller, or raise max_message_mib on every node and write it again",
                change.table.name(),
                change.key,
                size >> 20,
                limit >> 20
            );
            tracing::error!(table = %change.table.name(), key = %change.key, bytes = size, "{reason}");
            let event = Event {
                origin: self.identity.node.clone(),
                origin_region: self.identity.region.clone(),
                seq: 0,
                batch_end: 0,
                hlc: self.clock.now(),
                table: change.table.name().to_owned(),
                key: change.key.clone(),
                op: Op::Delete,
                version: VersionVector::new(),
                path: Vec::new(),
                committed_at_micros: change.committed_at,
                crdt: Vec::new(),
                ownership: None,
            };
            crate::store::audit::dead_letter(
                txn,
                &event,
                &reason,
                crate::store::backend::Cause::TooLarge,
                &mut report,
            )
            .await?;
        }
        *changes = kept;
        Ok(())
    }
}

/// The commit time of an outbox row queued by a re-capture (a table that lost weft's
/// triggers): unknown, so the drain stamps it just after the row's recorded version.
pub const UNKNOWN_COMMIT: i64 = 0;

/// Leaves out re-captured changes of rows another region owns: the capture triggers would
/// have refused such a change, and every peer refuses a batch carrying one (for its owner's
/// claim), which stopped this node's streams for good. The row is left as it is here, said
/// once per table, for the audit to find.
async fn leave_foreign_rows<T: Txn>(
    txn: &mut T,
    identity: &Identity,
    changes: &mut Vec<(Vec<u8>, Captured<T::Table>)>,
    stored: &HashMap<String, HashMap<Vec<u8>, RowVersion>>,
) -> Result<(), StoreError> {
    let mut left: HashMap<String, u64> = HashMap::new();
    let mut kept = Vec::with_capacity(changes.len());
    for (key, change) in changes.drain(..) {
        let recaptured = change.committed_at == UNKNOWN_COMMIT && change.table.is_owned();
        let live = stored
            .get(change.table.name())
            .and_then(|m| m.get(&key))
            .is_some_and(|v| !v.deleted);
        if recaptured && live {
            let known = txn.owner(&change.table, &key).await?;
            if known.is_some_and(|k| k.moving_to.is_none() && k.owner.region != identity.region) {
                *left.entry(change.table.name().to_owned()).or_default() += 1;
                continue;
            }
        }
        kept.push((key, change));
    }
    *changes = kept;
    for (table, rows) in left {
        tracing::warn!(
            %table,
            rows,
            "rows owned by another region changed here while capture was missing (the table was rebuilt or \
             recreated); they are not this region's to change, so nothing is sent for them and they stay as they \
             are here: `weft audit --repair` brings them back in line with their owner"
        );
    }
    Ok(())
}

/// One change per row, keyed by its canonical key bytes: the last image, the latest commit
/// time and the position of the last change; in the order of those positions.
fn coalesce<T: TableRules>(captured: Vec<Captured<T>>) -> Vec<(Vec<u8>, Captured<T>)> {
    let mut out: Vec<(Vec<u8>, Captured<T>)> = Vec::with_capacity(captured.len());
    let mut index: HashMap<(String, Vec<u8>), usize> = HashMap::new();
    for change in captured {
        let key = change.key.to_bytes();
        match index.get(&(change.table.name().to_owned(), key.clone())) {
            Some(&i) => {
                let kept = &mut out[i].1;
                kept.committed_at = kept.committed_at.max(change.committed_at);
                kept.id = change.id;
                kept.image = change.image;
            }
            None => {
                index.insert((change.table.name().to_owned(), key.clone()), out.len());
                out.push((key, change));
            }
        }
    }
    out.sort_by_key(|(_, c)| c.id);
    out
}

/// A drained local change: the row's key, its image after the drain (`None`: deleted), its
/// stored version before it, and its commit time.
struct LocalChange<'a> {
    table: String,
    key: Key,
    key_bytes: Vec<u8>,
    image: Option<Row>,
    previous: Option<&'a RowVersion>,
    committed_at: i64,
}

/// One drain's changes as one capture batch of events, in order, numbered after `last_seq`:
/// each gets the row's stored vector with this node's entry set to the event's seq, and the
/// HLC of its commit. A row inserted
/// and deleted between two drains, which nobody ever saw, gives no event.
/// The row versions a drain records for its events, with the digests of their images: a
/// captured image is the whole row as the table holds it (`engine::image_digest` leaves out
/// tables with CRDT columns, whose values the drain may have normalized in the row).
fn drained_versions<T: Txn>(txn: &T, events: &[(Vec<u8>, Event)]) -> Vec<RowVersion> {
    events
        .iter()
        .map(|(key, e)| RowVersion {
            image: txn.table(&e.table).and_then(|t| engine::image_digest(&*t, key, &e.op)),
            ..RowVersion::of_event(e)
        })
        .collect()
}

fn local_events<'a>(
    identity: &Identity,
    clock: &Clock,
    last_seq: u64,
    floor: &VersionVector,
    changes: impl IntoIterator<Item = LocalChange<'a>>,
) -> Vec<(Vec<u8>, Event)> {
    let me = &identity.node;
    let mut events: Vec<(Vec<u8>, Event)> = changes
        .into_iter()
        .filter(|c| c.image.is_some() || c.previous.is_some())
        .map(|c| {
            let mut version = c.previous.map_or_else(|| floor.clone(), |l| l.version.clone());
            version.increment(me);
            // A commit time of 0 is unknown: a row captured again after a rebuild.
            let (hlc, committed_at) = match (c.committed_at, c.previous) {
                (UNKNOWN_COMMIT, Some(previous)) => (clock.stamp_after(previous.hlc), crate::clock::now_micros()),
                (UNKNOWN_COMMIT, None) => {
                    let now = crate::clock::now_micros();
                    (clock.stamp_commit(now), now)
                }
                (at, _) => (clock.stamp_commit(at), at),
            };
            let event = Event {
                origin: me.clone(),
                origin_region: identity.region.clone(),
                seq: 0,
                batch_end: 0,
                hlc,
                table: c.table,
                key: c.key,
                op: c.image.map(Op::Upsert).unwrap_or(Op::Delete),
                version,
                path: vec![me.clone()],
                committed_at_micros: committed_at,
                crdt: Vec::new(),
                ownership: None,
            };
            (c.key_bytes, event)
        })
        .collect();
    let batch_end = last_seq + events.len() as u64;
    for (i, (_, event)) in events.iter_mut().enumerate() {
        event.seq = last_seq + 1 + i as u64;
        event.batch_end = batch_end;
        // This node's entry is the event's seq, not a count of the row's writes: above every
        // entry this node ever gave the row, even after its database went back and lost some
        // of those writes (a restore), as long as seqs never go back, which the node sees to.
        let counter = event.version.get(me).max(event.seq);
        event.version.set(me, counter);
    }
    events
}
