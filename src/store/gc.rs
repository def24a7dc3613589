//! Tombstone GC: a deleted row's tombstone (its row metadata, CRDT states and siblings) is
//! purged once its version is below the causal stability horizon (`crate::stability`): every
//! node has applied the delete and every write concurrent with it, so no event that could
//! change the row's outcome is in flight, and nothing newer can be compared with it. Never by
//! age alone.
//!
//! After the purge this node no longer knows the row. A write to it here (a re-insert)
//! starts its version from the purge floor, the merge of every horizon this node purged
//! at, instead of from nothing (`store::capture`): that version is above the purged
//! tombstone, so it replaces the row in a region that still keeps the tombstone, as any
//! later write does, and every region ends the same. A remote event for a purged row
//! simply applies: nothing older than the horizon can still arrive. A tombstone whose row
//! has a dead letter waiting is kept (its retry is an old event).
use crate::event::Key;
use crate::stability::below;
use crate::store::StoreError;
use crate::store::backend::{Backend, Conn, Tables, Txn};
use crate::store::replica::Replica;
use crate::version::VersionVector;

/// The node-table entry holding the purge floor.
pub const FLOOR_KEY: &str = "purge_floor";
/// Tombstones looked at per purge transaction.
const PER_PASS: i64 = 20_000;

/// The purge floor: above every tombstone this node purged (empty if none).
pub(crate) async fn floor<T: Txn>(txn: &mut T) -> Result<VersionVector, StoreError> {
    match txn.node_text(FLOOR_KEY).await? {
        Some(json) => VersionVector::from_json(&json)
            .map_err(|e| StoreError::Corrupt(format!("the recorded purge floor does not parse: {e}"))),
        None => Ok(VersionVector::new()),
    }
}

/// What one purge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub purged: u64,
    /// Tombstones kept: above the horizon, or with a dead letter waiting.
    pub kept: u64,
}

impl<B: Backend> Replica<B> {
    /// The purge floor, read on its own.
    pub async fn purge_floor(&self) -> Result<VersionVector, StoreError> {
        let tables = Tables::new();
        let mut read = self.backend.begin_read().await?;
        let floor = floor(&mut self.backend.txn(&tables, &mut read)).await?;
        read.commit().await?;
        Ok(floor)
    }

    /// Purges the tombstones below `horizon`, in one transaction, and raises the floor.
    pub async fn purge_tombstones(&self, horizon: &VersionVector) -> Result<Purged, StoreError> {
        if horizon.iter().next().is_none() {
            return Ok(Purged::default());
        }
        self.with_writer(async |store: &Self, conn: &mut Conn<B>, _: &mut u64| {
            let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
            let tables = Tables::new();
            let mut txn = store.backend.txn(&tables, &mut tx);
            let tombstones = txn.tombstones(PER_PASS).await?;
            let waiting = match tombstones.is_empty() {
                true => Default::default(),
                false => txn.dead_letter_keys().await?,
            };
            let mut done = Purged::default();
            for (table, key, version) in &tombstones {
                let text = Key::from_bytes(key).map_or_else(|_| String::new(), |k| k.to_string());
                if !below(&version.version, horizon) || waiting.contains(&(table.clone(), text)) {
                    done.kept += 1;
                    continue;
                }
                txn.purge_tombstone(table, key).await?;
                done.purged += 1;
            }
            if done.purged > 0 {
                let mut floor = floor(&mut txn).await?;
                floor.merge(horizon);
                txn.set_node_text(FLOOR_KEY, Some(&floor.to_json())).await?;
            }
            drop(txn);
            tx.commit().await?;
            Ok(done)
        })
        .await
    }
}
