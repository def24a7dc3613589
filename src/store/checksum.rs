//! Checksums of what a region holds, for `weft audit` (`transport::audit` compares them
//! between regions and narrows a difference down to its keys).
//!
//! A row's digest covers what must be equal in every region once they converge: its key, its
//! version vector and its visible image (columns by name, so the column order of each
//! database does not matter). Tombstones count for nothing: one region may have purged a
//! tombstone another still keeps (`store::gc`), and a deleted row is absent either way. It is the wrapping sum of two parts, one
//! from the row metadata and one from the table, so a row the table has without metadata
//! (written with the triggers off) or metadata without its row (deleted behind weft's back)
//! counts too, and each side can be streamed on its own without a join.
//!
//! Rows fall into [`LEAVES`] buckets by a hash of their key; a tree node's digest is the
//! wrapping sum of the digests below it, [`FANOUT`] children per node, [`LEVELS`] levels
//! under the root. [`Replica::audit_tree`] reads every bucket in one read transaction (one
//! consistent view, memory for the buckets only); [`Replica::audit_keys`] lists the keys of
//! some buckets with their digests, and [`Replica::audit_rows`] reads some rows in full with
//! the frontiers they are at least as new as. The last two are fresh reads: the caller
//! compares two of them to tell a row being written from one that differs.
//!
//! Every read takes the columns to compare ([`Compared`]): during a rolling `ADD COLUMN` or
//! `DROP COLUMN` the regions' tables differ by a column, and the auditor compares only the
//! columns every region has. A row read in full also says whether the node holds a dead
//! letter of its key ([`AuditRow::waiting`]): an event it has not applied, so its row is
//! unknown there, not deleted.
//!
//! It also says whether the row was changed in place behind weft's back
//! ([`AuditRow::edited`]): the row metadata keeps a digest of the image weft last wrote or
//! captured for the row ([`recorded_image`], `RowVersion::image`), and the node's row, all
//! its columns (not only the compared ones), no longer matches it. The digest itself stays
//! on the node. Such a row disagrees with its metadata ([`AuditRow::consistent`]) as much as
//! one that vanished or appeared; a row with no digest recorded is never edited.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest as _, Sha256};

use crate::event::{Key, NodeId, Row, Value};
use crate::replicate::RowVersion;
use crate::store::StoreError;
use crate::store::backend::{Backend, Txn};
use crate::store::engine::TableRules;
use crate::store::replica::Replica;

/// Children per tree node.
pub const FANOUT: u32 = 16;
/// Levels under the root; the last one is the buckets.
pub const LEVELS: u32 = 4;
/// Buckets (leaves) of a table's tree: `FANOUT ^ LEVELS`.
pub const LEAVES: u32 = FANOUT.pow(LEVELS);
/// The node-table entry holding what the last background audit found.
pub const LAST_AUDIT: &str = "last_audit";
/// Row metadata read per statement while summing a table.
const PAGE: i64 = 5_000;

/// A digest: a row's, or the wrapping sum of a tree node's rows.
pub type Sum = u128;

/// The bucket of the row whose key bytes are `key`.
pub fn bucket(key: &[u8]) -> u32 {
    let hash = Sha256::digest(key);
    u32::from_be_bytes([0, 0, hash[0], hash[1]]) % LEAVES
}

fn hash(tag: &[u8], key: &[u8], body: &[u8]) -> Sum {
    let mut h = Sha256::new();
    h.update(tag);
    h.update((key.len() as u64).to_be_bytes());
    h.update(key);
    h.update(body);
    let out = h.finalize();
    u128::from_be_bytes(out[..16].try_into().expect("sha-256 has 32 bytes"))
}

/// The metadata part of a row's digest: its vector (zero counters left out) and whether it
/// is a tombstone. The HLC and last writer are left out: they follow from the vector.
pub fn version_part(key: &[u8], version: &RowVersion) -> Sum {
    let mut body = Vec::new();
    for (node, count) in version.version.iter().filter(|(_, c)| *c > 0) {
        body.extend_from_slice(&(node.len() as u64).to_be_bytes());
        body.extend_from_slice(node.as_bytes());
        body.extend_from_slice(&count.to_be_bytes());
    }
    body.push(u8::from(version.deleted));
    hash(b"version", key, &body)
}

/// The table part of a row's digest: its image, columns by name.
pub fn image_part(key: &[u8], row: &Row) -> Sum {
    hash(b"image", key, &row.to_bytes())
}

/// The digest row metadata records of a row's image (`RowVersion::image`): the low 64 bits
/// of [`image_part`] over its columns that are not NULL, so a column added with no default
/// does not change the digest of the rows written before.
pub fn recorded_image(key: &[u8], row: &Row) -> i64 {
    let set = Row(row
        .0
        .iter()
        .filter(|(_, v)| !matches!(v, Value::Null))
        .cloned()
        .collect());
    image_part(key, &set) as u64 as i64
}

/// The key of a table row.
pub fn key_of(key_columns: &[String], row: &Row) -> Key {
    Key(key_columns
        .iter()
        .map(|k| {
            row.0
                .iter()
                .find(|(c, _)| c == k)
                .map_or(Value::Null, |(_, v)| v.clone())
        })
        .collect())
}

/// A table's buckets, summed in one read.
#[derive(Debug, Clone)]
pub struct Tree {
    pub leaves: Vec<Sum>,
    /// Rows read: metadata entries plus table rows.
    pub rows: u64,
}

impl Tree {
    /// The digest of tree node `index` at `level` (0: the root), or `None` past the tree.
    pub fn node(&self, level: u32, index: u32) -> Option<Sum> {
        if level > LEVELS || index >= FANOUT.pow(level) {
            return None;
        }
        let span = (LEAVES / FANOUT.pow(level)) as usize;
        let first = index as usize * span;
        Some(
            self.leaves[first..first + span]
                .iter()
                .fold(0, |sum: Sum, leaf| sum.wrapping_add(*leaf)),
        )
    }
}

/// One row as a region holds it: its metadata and its image, either possibly missing.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub key: Vec<u8>,
    pub version: Option<RowVersion>,
    pub image: Option<Row>,
    /// The node holds a dead letter of this key (see the module doc).
    pub waiting: bool,
    /// The node's row no longer matches the digest its metadata recorded (see the module
    /// doc): it was changed in place behind weft's back.
    pub edited: bool,
}

/// The columns an audit compares: `None` for every column of the table.
pub type Compared<'c> = Option<&'c [String]>;

/// `row` with only the `compared` columns.
pub fn restrict(mut row: Row, compared: Compared<'_>) -> Row {
    if let Some(columns) = compared {
        row.0.retain(|(c, _)| columns.contains(c));
    }
    row
}

impl AuditRow {
    pub fn digest(&self) -> Sum {
        let v = self
            .version
            .as_ref()
            .filter(|v| !v.deleted)
            .map_or(0, |v| version_part(&self.key, v));
        let r = self.image.as_ref().map_or(0, |r| image_part(&self.key, r));
        v.wrapping_add(r)
    }

    /// Whether the table agrees with the metadata: a live row has its image, unchanged since
    /// weft recorded it (when it recorded a digest), a tombstone or an unknown key has none.
    /// A row that disagrees was changed behind weft's back.
    pub fn consistent(&self) -> bool {
        !self.edited
            && match &self.version {
                Some(v) => v.deleted == self.image.is_none(),
                None => self.image.is_none(),
            }
    }
}

impl<B: Backend> Replica<B> {
    fn audited(&self, table: &str) -> Result<std::sync::Arc<B::Table>, StoreError> {
        self.tables()
            .get(table)
            .cloned()
            .ok_or_else(|| StoreError::Refused(format!("table `{table}` is not replicated by this node")))
    }

    /// Calls `visit` with the key bytes and digest part of every metadata entry and every
    /// row of `table`, all in one read transaction.
    async fn sum_table(
        &self,
        table: &str,
        compared: Compared<'_>,
        visit: &mut (dyn FnMut(&[u8], Sum) + Send),
    ) -> Result<u64, StoreError> {
        let rules = self.audited(table)?;
        let tables = self.tables();
        let mut read = self.backend.begin_read().await?;
        let mut txn = self.backend.txn(&tables, &mut read);
        let mut rows = 0;
        let mut after = Vec::new();
        loop {
            let page = txn.row_page(table, &after, PAGE).await?;
            for (key, version) in page.iter().filter(|(_, v)| !v.deleted) {
                visit(key, version_part(key, version));
            }
            rows += page.len() as u64;
            let full = page.len() as i64 == PAGE;
            match page.into_iter().last() {
                Some((key, _)) if full => after = key,
                _ => break,
            }
        }
        let key_columns = rules.key().to_vec();
        rows += txn
            .scan_rows(&rules, &mut |row: Row| {
                let key = key_of(&key_columns, &row).to_bytes();
                visit(&key, image_part(&key, &restrict(row, compared)));
            })
            .await?;
        drop(txn);
        read.commit().await?;
        Ok(rows)
    }

    /// Records what the last background audit found (JSON), for `weft status`.
    pub async fn record_audit(&self, summary: &str) -> Result<(), StoreError> {
        self.with_writer(
            async |store: &Self, conn: &mut crate::store::backend::Conn<B>, _: &mut u64| {
                let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
                let tables = crate::store::backend::Tables::new();
                store
                    .backend
                    .txn(&tables, &mut tx)
                    .set_node_text(LAST_AUDIT, Some(summary))
                    .await?;
                tx.commit().await?;
                Ok(())
            },
        )
        .await
    }

    /// The columns of `table` here, in the table's order.
    pub fn audit_shape(&self, table: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.audited(table)?.columns().to_vec())
    }

    /// Every bucket of `table`, from one consistent view.
    pub async fn audit_tree(&self, table: &str, compared: Compared<'_>) -> Result<Tree, StoreError> {
        let mut leaves: Vec<Sum> = vec![0; LEAVES as usize];
        let rows = self
            .sum_table(table, compared, &mut |key, part| {
                let leaf = &mut leaves[bucket(key) as usize];
                *leaf = leaf.wrapping_add(part);
            })
            .await?;
        Ok(Tree { leaves, rows })
    }

    /// The keys of `table` in `buckets`, with their digests, in key byte order.
    pub async fn audit_keys(
        &self,
        table: &str,
        buckets: &BTreeSet<u32>,
        compared: Compared<'_>,
    ) -> Result<Vec<(Vec<u8>, Sum)>, StoreError> {
        let mut keys: HashMap<Vec<u8>, Sum> = HashMap::new();
        self.sum_table(table, compared, &mut |key, part| {
            if buckets.contains(&bucket(key)) {
                let sum = keys.entry(key.to_vec()).or_default();
                *sum = sum.wrapping_add(part);
            }
        })
        .await?;
        let mut out: Vec<_> = keys.into_iter().collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The rows `keys` of `table` in full, and a watermark: frontiers (this node's own
    /// origin at its last seq) read after the rows, so the rows include nothing newer.
    pub async fn audit_rows(
        &self,
        table: &str,
        keys: &[Vec<u8>],
        compared: Compared<'_>,
    ) -> Result<(Vec<AuditRow>, BTreeMap<NodeId, u64>), StoreError> {
        let rules = self.audited(table)?;
        let tables = self.tables();
        let mut read = self.backend.begin_read().await?;
        let mut txn = self.backend.txn(&tables, &mut read);
        let mut versions = txn.versions(table, keys).await?;
        let letters = match keys.is_empty() {
            true => Default::default(),
            false => txn.dead_letter_keys().await?,
        };
        let mut rows = Vec::with_capacity(keys.len());
        for bytes in keys {
            let key = Key::from_bytes(bytes)
                .map_err(|e| StoreError::Refused(format!("an audited key of {table} does not decode: {e}")))?;
            let image = txn.read_row(&rules, &key).await?;
            let mut version = versions.remove(bytes);
            // Over the whole row, before the columns are restricted: the digest covers them all.
            let recorded = version.as_mut().and_then(|v| v.image.take().filter(|_| !v.deleted));
            let edited = matches!((recorded, &image), (Some(sum), Some(row)) if recorded_image(bytes, row) != sum);
            rows.push(AuditRow {
                key: bytes.clone(),
                version,
                image: image.map(|row| restrict(row, compared)),
                waiting: letters.contains(&(table.to_owned(), key.to_string())),
                edited,
            });
        }
        // In the rows' snapshot: everything of this node's the rows include is at or below it.
        let own = txn.last_seq().await?;
        drop(txn);
        read.commit().await?;
        let mut watermark = self.frontiers().await?;
        watermark.insert(self.identity.node.clone(), own);
        Ok((rows, watermark))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Hlc;
    use crate::version::VersionVector;

    fn version(counts: &[(&str, u64)], deleted: bool) -> RowVersion {
        let mut v = VersionVector::new();
        for (node, count) in counts {
            v.set(node, *count);
        }
        RowVersion {
            version: v,
            hlc: Hlc(1),
            origin: "a".into(),
            deleted,
            image: None,
        }
    }

    fn row(v: &str) -> Row {
        Row(vec![
            ("id".into(), Value::Integer(1)),
            ("v".into(), Value::Text(v.into())),
        ])
    }

    #[test]
    fn a_digest_covers_the_image_and_the_vector_but_not_column_order_nor_tombstones() {
        let key = Key(vec![Value::Integer(1)]).to_bytes();
        let base = AuditRow {
            key: key.clone(),
            version: Some(version(&[("a", 1)], false)),
            image: Some(row("x")),
            waiting: false,
            edited: false,
        };
        let mut reordered = base.clone();
        reordered.image.as_mut().unwrap().0.reverse();
        assert_eq!(base.digest(), reordered.digest());
        let mut other_value = base.clone();
        other_value.image = Some(row("y"));
        let mut other_version = base.clone();
        other_version.version = Some(version(&[("a", 1), ("b", 1)], false));
        let mut zero_counter = base.clone();
        zero_counter.version = Some(version(&[("a", 1), ("b", 0)], false));
        let mut no_row = base.clone();
        no_row.image = None;
        assert_ne!(base.digest(), other_value.digest());
        assert_ne!(base.digest(), other_version.digest());
        assert_eq!(base.digest(), zero_counter.digest());
        assert_ne!(base.digest(), no_row.digest());
        assert!(base.consistent() && !no_row.consistent());
        let mut edited = base.clone();
        edited.edited = true;
        assert!(
            !edited.consistent(),
            "a row edited in place disagrees with its metadata"
        );
        let tombstone = AuditRow {
            key: key.clone(),
            version: Some(version(&[("a", 2)], true)),
            image: None,
            waiting: false,
            edited: false,
        };
        let purged = AuditRow {
            key,
            version: None,
            image: None,
            waiting: false,
            edited: false,
        };
        assert_eq!(
            tombstone.digest(),
            purged.digest(),
            "a purged tombstone is no difference"
        );
    }

    #[test]
    fn a_recorded_image_ignores_column_order_and_null_columns_but_not_values() {
        let key = Key(vec![Value::Integer(1)]).to_bytes();
        let mut reordered = row("x");
        reordered.0.reverse();
        let mut added = row("x");
        added.0.push(("extra".into(), Value::Null));
        assert_eq!(recorded_image(&key, &row("x")), recorded_image(&key, &reordered));
        assert_eq!(recorded_image(&key, &row("x")), recorded_image(&key, &added));
        assert_ne!(recorded_image(&key, &row("x")), recorded_image(&key, &row("y")));
        let mut nulled = row("x");
        nulled.0[1].1 = Value::Null;
        assert_ne!(recorded_image(&key, &row("x")), recorded_image(&key, &nulled));
    }

    #[test]
    fn a_tree_node_sums_the_buckets_under_it() {
        let mut leaves = vec![0; LEAVES as usize];
        leaves[0] = 5;
        leaves[LEAVES as usize - 1] = 7;
        let tree = Tree { leaves, rows: 2 };
        assert_eq!(tree.node(0, 0), Some(12));
        assert_eq!(tree.node(1, 0), Some(5));
        assert_eq!(tree.node(1, FANOUT - 1), Some(7));
        assert_eq!(tree.node(LEVELS, LEAVES - 1), Some(7));
        assert_eq!(tree.node(1, FANOUT), None);
        assert_eq!(tree.node(LEVELS + 1, 0), None);
    }
}
