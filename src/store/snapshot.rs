//! Snapshots: how a node that cannot catch up from its peers' logs (rebuilt, added after the
//! logs were trimmed, back from an outage longer than the logs keep) gets every replicated
//! table from one peer, with the metadata that makes the copy a replica and not a file copy.
//!
//! Serving (`snapshot_start`, `snapshot_page`): the frontiers are read first, then the rows
//! page by page, each page in its own short read transaction, in (table name, key bytes)
//! order. A row travels as an event of seq 1: its image or tombstone, version vector, HLC and
//! last writer, its CRDT states and owner; a queue row also carries its open siblings. Pages
//! are not one point in time, and need not be: every row is at least as new as the
//! frontiers, and the joiner catches up from the logs from those frontiers, where events a
//! copied row already includes are stale by their version vectors and change nothing.
//!
//! Installing (`install_page`): each page is one run of the applier (`store::apply`,
//! [`RunKind::Snapshot`]) through the strategy engine, so a row the joiner already holds
//! (its own writes, an older copy) meets the copy as any remote version does: newer wins,
//! concurrent is a logged conflict. The same transaction records the join's progress
//! ([`JoinState`]), so a crash resumes after the last page installed, never twice and never
//! with a hole. The last page raises the frontiers to the snapshot's (never lowers one), then
//! clears the join; this node's own seq is raised to what the source had of it before the
//! first page (`raise_own_seq`), so nothing drained meanwhile reuses a seq.
//!
//! Dead letters (`snapshot_letters`, `copy_letters`): the source's frontiers count the events
//! it dead-lettered, which its rows lack; the joiner's frontiers are raised to them, so no log
//! will bring those events again. The source hands its letters over (read after its
//! frontiers, before any row) and the joiner keeps them as its own, once each, retrying them
//! as it does its own. A row the joiner holds and the source lacks only because it holds the
//! row's event as a letter is kept, not swept as a purged delete ([`Sweep`]).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::Strategy;
use crate::event::{Event, Key, NodeId, Op, Ownership};
use crate::store::StoreError;
use crate::store::admit::Frontier;
use crate::store::apply::RunKind;
use crate::store::backend::{Backend, Tables, Txn};
use crate::store::engine::TableRules;
use crate::store::replica::Replica;

/// The node-table entry that holds a join in progress.
const JOIN_KEY: &str = "join";

/// One row of a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    /// The row as an event of seq 1 whose origin is its last writer.
    pub row: Event,
    /// A queue row's open siblings (two or more), else none.
    pub siblings: Vec<Event>,
}

/// What a snapshot is consistent with, read before any of its rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotStart {
    /// Per origin, the source's applied frontier; its own origin at its last seq.
    pub frontiers: BTreeMap<NodeId, u64>,
    /// Rows (tombstones included) per table, for progress.
    pub table_rows: BTreeMap<String, u64>,
}

/// A join in progress, as the joining node's database records it after every page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinState {
    /// The peer the snapshot comes from.
    pub source: NodeId,
    /// Why the join started (for the log and `weft status`).
    pub reason: String,
    /// The frontiers the snapshot is consistent with, from its first chunk. A resumed join
    /// keeps them: the source's frontiers only grow, so the first are the ones to catch up
    /// from.
    pub frontiers: BTreeMap<NodeId, u64>,
    /// The table being copied and the key bytes (hex) of the last row installed.
    pub table: String,
    pub after_hex: String,
    pub rows_done: u64,
    pub rows_total: u64,
    pub started_micros: i64,
}

impl JoinState {
    pub fn after_key(&self) -> Vec<u8> {
        (0..self.after_hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(&self.after_hex[2 * i..2 * i + 2], 16).ok())
            .collect()
    }

    pub fn set_after_key(&mut self, key: &[u8]) {
        self.after_hex = key.iter().map(|b| format!("{b:02x}")).collect();
    }
}

/// Rows the joiner holds that the source deleted and purged (`store::gc`): in `table`, with
/// key bytes after `after` and up to `upto` (`None`: to the end of the table), not among
/// `keys` (the chunk's), with a version at or below the source's purge `floor`. The source
/// has applied every write such a version holds, and has no metadata for the row: only a
/// purge removes it. Those rows are deleted here too, as tombstones (purged in turn).
#[derive(Debug, Clone)]
pub struct Sweep {
    pub table: String,
    pub after: Vec<u8>,
    pub upto: Option<Vec<u8>>,
    pub keys: std::collections::HashSet<Vec<u8>>,
    pub floor: crate::version::VersionVector,
}

/// What a page's run records beside its rows (`RunKind::Snapshot`).
pub struct Install {
    /// The queue rows' sibling sets: (table, key bytes, key text, siblings).
    siblings: Vec<(String, Vec<u8>, String, Vec<Event>)>,
    /// The join's state after this page; `None` on the last page, which ends the join.
    state: Option<JoinState>,
    /// The snapshot's frontiers, raised to on the last page.
    frontiers: BTreeMap<NodeId, u64>,
    me: NodeId,
    sweep: Option<Sweep>,
}

impl Install {
    /// Records, in the page's transaction, the siblings, the progress or the end of the join.
    /// At the end, raises `frontiers` to the snapshot's. (This node's own seq was raised to
    /// the snapshot's before the first page, by `raise_own_seq`.)
    pub(crate) async fn record<T: Txn>(
        &self,
        txn: &mut T,
        frontiers: &mut BTreeMap<String, Frontier>,
    ) -> Result<(), StoreError> {
        for (table, key, key_text, set) in &self.siblings {
            txn.replace_siblings(table, key, key_text, set).await?;
        }
        if let Some(sweep) = &self.sweep {
            sweep_purged(txn, sweep).await?;
        }
        if let Some(state) = &self.state {
            let json = serde_json::to_string(state).expect("a join state serializes");
            return txn.set_node_text(JOIN_KEY, Some(&json)).await;
        }
        txn.set_node_text(JOIN_KEY, None).await?;
        for (origin, &seq) in self.frontiers.iter().filter(|(origin, _)| **origin != self.me) {
            let frontier = frontiers.entry(origin.clone()).or_insert(Frontier {
                seq: 0,
                processed: 0,
                changed: false,
            });
            if seq > frontier.seq {
                frontier.seq = seq;
                frontier.changed = true;
            }
        }
        Ok(())
    }
}

/// Deletes the rows `sweep` names (see [`Sweep`]), in the page's transaction.
async fn sweep_purged<T: Txn>(txn: &mut T, sweep: &Sweep) -> Result<(), StoreError> {
    let Some(table) = txn.table(&sweep.table) else {
        return Ok(());
    };
    let mut victims = Vec::new();
    let mut after = sweep.after.clone();
    'pages: loop {
        let page = txn.row_page(&sweep.table, &after, 1_000).await?;
        let full = page.len() == 1_000;
        for (key, version) in page {
            if sweep.upto.as_ref().is_some_and(|upto| key > *upto) {
                break 'pages;
            }
            after.clone_from(&key);
            let purged = !version.deleted
                && !sweep.keys.contains(&key)
                && crate::stability::below(&version.version, &sweep.floor);
            if purged {
                victims.push((key, version));
            }
        }
        if !full {
            break;
        }
    }
    // A row the source lacks because it holds the row's event as a dead letter was never
    // applied there, not deleted: its letters were copied here before any table's rows.
    let waiting = match victims.is_empty() {
        true => Default::default(),
        false => txn.dead_letter_keys().await?,
    };
    for (key_bytes, version) in victims {
        let key = Key::from_bytes(&key_bytes)
            .map_err(|e| StoreError::Corrupt(format!("a key of {} in the row metadata: {e}", sweep.table)))?;
        if waiting.contains(&(sweep.table.clone(), key.to_string())) {
            tracing::info!(table = %sweep.table, %key, "joining: kept a row the source holds as a dead letter");
            continue;
        }
        let event = Event {
            origin: version.origin.clone(),
            origin_region: String::new(),
            seq: 1,
            batch_end: 1,
            hlc: version.hlc,
            table: sweep.table.clone(),
            key,
            op: Op::Delete,
            version: version.version.clone(),
            path: Vec::new(),
            committed_at_micros: 0,
            crdt: Vec::new(),
            ownership: None,
        };
        match txn
            .write(&table, &event, crate::store::engine::Mode::EventByEvent)
            .await
        {
            Ok(crate::store::engine::Written::Done) => {
                txn.mark_deleted(&sweep.table, &key_bytes).await?;
                tracing::info!(table = %sweep.table, key = %event.key, "joining: deleted a row the source deleted and purged");
            }
            Ok(crate::store::engine::Written::Refused(why)) => {
                tracing::warn!(table = %sweep.table, key = %event.key, %why, "joining: cannot delete a row the source deleted and purged");
            }
            Err(crate::store::engine::Halt::Store(e)) => return Err(e),
            Err(crate::store::engine::Halt::Stop(stop)) => {
                return Err(StoreError::Refused(format!("deleting a purged row stopped: {stop:?}")));
            }
        }
    }
    Ok(())
}

impl<B: Backend> Replica<B> {
    /// What a snapshot served now is consistent with; read before its first page.
    pub async fn snapshot_start(&self) -> Result<SnapshotStart, StoreError> {
        let mut frontiers = self.frontiers().await?;
        let tables = self.tables();
        let mut read = self.backend.begin_read().await?;
        let mut txn = self.backend.txn(&tables, &mut read);
        let own = txn.last_seq().await?;
        let mut table_rows = txn.row_counts().await?;
        drop(txn);
        read.commit().await?;
        table_rows.retain(|table, _| tables.contains_key(table));
        for table in tables.keys() {
            table_rows.entry(table.clone()).or_insert(0);
        }
        if own > 0 {
            frontiers.insert(self.identity.node.clone(), own);
        }
        Ok(SnapshotStart { frontiers, table_rows })
    }

    /// Up to `limit` rows of `table` after the key bytes `after`, in one read transaction,
    /// ending early once they hold `max_bytes` on the wire (at least one row); and whether
    /// rows of the table may follow them.
    pub async fn snapshot_page(
        &self,
        table: &str,
        after: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<SnapshotRow>, bool), StoreError> {
        let tables = self.tables();
        let rules = tables
            .get(table)
            .cloned()
            .ok_or_else(|| StoreError::Refused(format!("table `{table}` is not replicated by this node")))?;
        let mut read = self.backend.begin_read().await?;
        let mut txn = self.backend.txn(&tables, &mut read);
        let versions = txn.row_page(table, after, limit as i64).await?;
        let mut more = versions.len() == limit;
        let mut rows = Vec::with_capacity(versions.len());
        let mut bytes = 0usize;
        for (key_bytes, version) in versions {
            if bytes >= max_bytes {
                more = true;
                break;
            }
            let key = Key::from_bytes(&key_bytes)
                .map_err(|e| StoreError::Corrupt(format!("a key of {table} in the row metadata: {e}")))?;
            let op = match version.deleted {
                true => Op::Delete,
                false => txn.read_row(&rules, &key).await?.map_or(Op::Delete, Op::Upsert),
            };
            let crdt = match rules.crdt().is_empty() {
                true => Vec::new(),
                false => txn.crdt_states(table, &key_bytes).await?.into_iter().collect(),
            };
            let ownership = match rules.is_owned() {
                true => txn.owner(&rules, &key_bytes).await?.map(|known| Ownership {
                    owner: known.owner.region,
                    epoch: known.owner.epoch,
                    transfer: false,
                }),
                false => None,
            };
            let siblings = match rules.strategy() {
                Strategy::Queue => txn.siblings(table, &key_bytes).await?,
                _ => Vec::new(),
            };
            let row = SnapshotRow {
                row: Event {
                    origin: version.origin,
                    // An owned row is claimed by its owner; the claim is the owner's to make.
                    origin_region: ownership.as_ref().map(|o| o.owner.clone()).unwrap_or_default(),
                    seq: 1,
                    batch_end: 1,
                    hlc: version.hlc,
                    table: table.to_owned(),
                    key,
                    op,
                    version: version.version,
                    path: vec![self.identity.node.clone()],
                    committed_at_micros: 0,
                    crdt,
                    ownership,
                },
                siblings,
            };
            bytes += crate::wire::encode_event(&row.row).len()
                + row
                    .siblings
                    .iter()
                    .map(|s| crate::wire::encode_event(s).len())
                    .sum::<usize>();
            rows.push(row);
        }
        drop(txn);
        read.commit().await?;
        Ok((rows, more))
    }

    /// Dead letters after id `after` for a joiner, up to about `max_bytes` (at least one);
    /// and whether more may follow.
    pub async fn snapshot_letters(
        &self,
        after: i64,
        max_bytes: usize,
    ) -> Result<(Vec<crate::store::backend::CopiedLetter>, bool), StoreError> {
        const PAGE: i64 = 500;
        let tables = Tables::new();
        let mut read = self.backend.begin_read().await?;
        let mut letters = self
            .backend
            .txn(&tables, &mut read)
            .letters_to_copy(after, PAGE)
            .await?;
        read.commit().await?;
        let mut more = letters.len() as i64 == PAGE;
        let mut bytes = 0;
        let fits = letters
            .iter()
            .take_while(|l| {
                let fits = bytes < max_bytes;
                bytes += l.event.len() + l.reason.len() + l.key.len();
                fits
            })
            .count();
        if fits < letters.len() {
            letters.truncate(fits);
            more = true;
        }
        Ok((letters, more))
    }

    /// Stores a snapshot source's dead letters as this node's own (each once), in one
    /// transaction; returns how many were new.
    pub async fn copy_letters(&self, letters: &[crate::store::backend::CopiedLetter]) -> Result<u64, StoreError> {
        self.with_writer(
            async |store: &Self, conn: &mut crate::store::backend::Conn<B>, _: &mut u64| {
                let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
                let tables = Tables::new();
                let mut txn = store.backend.txn(&tables, &mut tx);
                let mut copied = 0;
                for letter in letters {
                    copied += u64::from(txn.copy_letter(letter).await?);
                }
                drop(txn);
                tx.commit().await?;
                Ok(copied)
            },
        )
        .await
    }

    /// Raises this node's last own seq to `seq` (never lowers it), with the clock, in one
    /// transaction: the next change drained is numbered after it. A raise means the database
    /// lost changes of this node, so its CRDT actor name changes too (`Replica::crdt_actor`).
    pub async fn raise_own_seq(&self, seq: u64) -> Result<(), StoreError> {
        self.with_writer(
            async |store: &Self, conn: &mut crate::store::backend::Conn<B>, last_seq: &mut u64| {
                let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
                let tables = store.current_tables(&mut tx).await?;
                let mut txn = store.backend.txn(&tables, &mut tx);
                let now = txn.last_seq().await?;
                // The database lost some of this node's changes: its CRDT states lost the
                // increments those made under this node's name, which the peers still count.
                // New increments go under a new name, so they add to those, not merge.
                let actor = format!("{}#{seq}", store.identity.node);
                if seq > now {
                    let meta = crate::store::backend::Meta {
                        last_seq: Some(seq),
                        hlc: store.clock.last().0,
                        ..Default::default()
                    };
                    txn.write_meta(meta).await?;
                    txn.set_node_text(crate::store::replica::CRDT_ACTOR, Some(&actor))
                        .await?;
                }
                drop(txn);
                tx.commit().await?;
                if seq > now {
                    store.set_crdt_actor(actor);
                }
                *last_seq = seq.max(now);
                Ok(())
            },
        )
        .await
    }

    /// The join in progress, if any.
    pub async fn join_state(&self) -> Result<Option<JoinState>, StoreError> {
        let mut read = self.backend.begin_read().await?;
        let text = self.backend.txn(&Tables::new(), &mut read).node_text(JOIN_KEY).await?;
        read.commit().await?;
        text.map(|json| {
            serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("the join in progress: {e}")))
        })
        .transpose()
    }

    /// Installs one page of a snapshot with the join's state after it, in one transaction;
    /// `state: None` makes it the last page (see the module doc).
    pub async fn install_page(
        &self,
        rows: Vec<SnapshotRow>,
        state: Option<JoinState>,
        frontiers: &BTreeMap<NodeId, u64>,
    ) -> Result<crate::store::ApplyReport, StoreError> {
        self.install_page_swept(rows, state, frontiers, None).await
    }

    /// `install_page`, with the rows `sweep` names deleted in the same transaction.
    pub async fn install_page_swept(
        &self,
        rows: Vec<SnapshotRow>,
        state: Option<JoinState>,
        frontiers: &BTreeMap<NodeId, u64>,
        sweep: Option<Sweep>,
    ) -> Result<crate::store::ApplyReport, StoreError> {
        let mut events = Vec::with_capacity(rows.len());
        let mut siblings = Vec::new();
        for SnapshotRow { row, siblings: set } in rows {
            if set.len() > 1 {
                siblings.push((row.table.clone(), row.key.to_bytes(), row.key.to_string(), set));
            }
            events.push(row);
        }
        let install = Install {
            siblings,
            state,
            frontiers: frontiers.clone(),
            me: self.identity.node.clone(),
            sweep,
        };
        self.run(events, RunKind::Snapshot(&install)).await
    }
}
