//! Metadata statements both dialects run alike: the same SQL but for the table prefix
//! (`_weft_` or `weft.`) and the expression for "now", the same binds and the same rows
//! back. They are written once here and rendered into each dialect by [`metadata_io!`],
//! which each dialect invokes with its database type, connection type, prefix and "now".
//!
//! Placeholders are `$1`, `$2`, ...: PostgreSQL's form, which SQLite reads as named
//! parameters numbered in order of first use, so one text serves both. Statements that
//! differ in more than names (upserts with `max` vs `greatest`, `unnest` batches, the
//! outbox) stay in the dialects.

use crate::event::Hlc;
use crate::replicate::RowVersion;
use crate::store::StoreError;
use crate::version::VersionVector;

/// A row version as `{w}rows` stores it: the vector as JSON, the HLC, the origin, deleted,
/// and the digest of the row's image (`image_sum`, NULL when unknown).
pub fn stored_version(
    table: &str,
    version: &str,
    hlc: i64,
    origin: String,
    (deleted, image): (bool, Option<i64>),
) -> Result<RowVersion, StoreError> {
    Ok(RowVersion {
        version: VersionVector::from_json(version)
            .map_err(|e| StoreError::Corrupt(format!("version of a {table} row: {e}")))?,
        hlc: Hlc(hlc as u64),
        origin,
        deleted,
        image,
    })
}

/// Renders the shared metadata statements as `pub(super)` functions of the invoking module.
macro_rules! metadata_io {
    ($db:ty, $conn:ty, $prefix:expr, $now:expr) => {
        /// The statement in the dialect's names: its table prefix for `{w}`, its "now" for `{now}`.
        fn meta(sql: &str) -> sqlx::AssertSqlSafe<String> {
            sqlx::AssertSqlSafe(sql.replace("{w}", $prefix).replace("{now}", $now))
        }

        /// Where reading `source` (a Kafka topic) resumes, as the last apply from it left it.
        pub(super) async fn position(conn: &mut $conn, source: &str) -> Result<Option<i64>, $crate::store::StoreError> {
            let sql = meta("SELECT next FROM {w}positions WHERE source = $1");
            Ok(sqlx::query_scalar(sql).bind(source).fetch_optional(&mut *conn).await?)
        }

        /// Every stored position, by source: where reading each topic resumes, and how far
        /// each publisher's log is in its topic.
        pub(super) async fn positions(conn: &mut $conn) -> Result<Vec<(String, i64)>, $crate::store::StoreError> {
            let sql = meta("SELECT source, next FROM {w}positions ORDER BY source");
            Ok(sqlx::query_as(sql).fetch_all(&mut *conn).await?)
        }

        /// Records where reading `source` resumes, in the transaction of what was read.
        pub(super) async fn set_position(
            conn: &mut $conn,
            position: &$crate::store::Position,
        ) -> Result<(), $crate::store::StoreError> {
            let sql = meta(
                "INSERT INTO {w}positions (source, next) VALUES ($1, $2) \
                 ON CONFLICT (source) DO UPDATE SET next = excluded.next",
            );
            sqlx::query(sql)
                .bind(&position.source)
                .bind(position.next)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// This node's last own seq as the database holds it, in the caller's transaction.
        pub(super) async fn last_seq(conn: &mut $conn) -> Result<u64, $crate::store::StoreError> {
            let sql = meta("SELECT CAST(value AS BIGINT) FROM {w}node WHERE name = 'last_seq'");
            let seq: Option<i64> = sqlx::query_scalar(sql).fetch_optional(&mut *conn).await?;
            Ok(seq.unwrap_or(0) as u64)
        }

        /// Up to `limit` log entries of `origin` with seq > `after`, in seq order.
        pub(super) async fn read_log<'c>(
            executor: impl sqlx::Executor<'c, Database = $db>,
            origin: &str,
            after: u64,
            limit: i64,
        ) -> Result<Vec<$crate::store::LogEntry>, $crate::store::StoreError> {
            let sql = meta("SELECT seq, batch_end, event FROM {w}log WHERE origin = $1 AND seq > $2 ORDER BY seq LIMIT $3");
            let rows: Vec<(i64, i64, Vec<u8>)> = sqlx::query_as(sql)
                .bind(origin)
                .bind(after as i64)
                .bind(limit)
                .fetch_all(executor)
                .await?;
            Ok(rows
                .into_iter()
                .map(|(seq, batch_end, bytes)| $crate::store::LogEntry {
                    seq: seq as u64,
                    batch_end: batch_end as u64,
                    bytes,
                })
                .collect())
        }

        /// Applied frontier per origin.
        pub(super) async fn frontiers<'c>(
            executor: impl sqlx::Executor<'c, Database = $db>,
        ) -> Result<std::collections::BTreeMap<$crate::event::NodeId, u64>, $crate::store::StoreError> {
            let rows: Vec<(String, i64)> = sqlx::query_as(meta("SELECT origin, seq FROM {w}frontier"))
                .fetch_all(executor)
                .await?;
            Ok(rows.into_iter().map(|(origin, seq)| (origin, seq as u64)).collect())
        }

        /// Frontiers with the count of events processed, in origin order.
        pub(super) async fn frontier_status(
            conn: &mut $conn,
        ) -> Result<Vec<$crate::store::backend::FrontierStatus>, $crate::store::StoreError> {
            let rows: Vec<(String, i64, i64)> =
                sqlx::query_as(meta("SELECT origin, seq, processed FROM {w}frontier ORDER BY origin"))
                    .fetch_all(&mut *conn)
                    .await?;
            Ok(rows
                .into_iter()
                .map(|(origin, seq, processed)| $crate::store::backend::FrontierStatus {
                    origin,
                    seq: seq as u64,
                    processed: processed as u64,
                })
                .collect())
        }

        /// Drops log entries of `origin` up to `through`; returns how many went. The highest
        /// seq dropped raises the origin's high-water mark (`log_high`) first, so a log
        /// trimmed to nothing still says how far it went.
        pub(super) async fn trim_log(conn: &mut $conn, origin: &str, through: u64) -> Result<u64, $crate::store::StoreError> {
            let sql = meta("SELECT max(seq) FROM {w}log WHERE origin = $1 AND seq <= $2");
            let dropped: Option<i64> = sqlx::query_scalar(sql)
                .bind(origin)
                .bind(through.min(i64::MAX as u64) as i64)
                .fetch_one(&mut *conn)
                .await?;
            let key = log_high_key(origin);
            let high = node_text(conn, &key).await?.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            if let Some(dropped) = dropped.filter(|&d| d > high) {
                set_node_text(conn, &key, Some(&dropped.to_string())).await?;
            }
            let sql = meta("DELETE FROM {w}log WHERE origin = $1 AND seq <= $2");
            Ok(sqlx::query(sql)
                .bind(origin)
                .bind(through as i64)
                .execute(&mut *conn)
                .await?
                .rows_affected())
        }

        /// Per origin, the last seq to drop so that the log keeps no entry committed before
        /// `before_micros` and holds at most `max_bytes` of events (oldest first); empty if
        /// it is within both.
        pub(super) async fn retention_cutoffs(
            conn: &mut $conn,
            max_bytes: i64,
            before_micros: i64,
            kept: &std::collections::BTreeSet<String>,
        ) -> Result<std::collections::BTreeMap<String, u64>, $crate::store::StoreError> {
            let mut cut = std::collections::BTreeMap::<String, u64>::new();
            // Origins no longer kept (a node taken out of the topology): nobody needs them.
            let origins: Vec<String> = sqlx::query_scalar(meta("SELECT DISTINCT origin FROM {w}log"))
                .fetch_all(&mut *conn)
                .await?;
            for origin in origins.into_iter().filter(|o| !kept.contains(o)) {
                cut.insert(origin, i64::MAX as u64);
            }
            let old: Vec<(String, i64)> =
                sqlx::query_as(meta("SELECT origin, max(seq) FROM {w}log WHERE committed_at < $1 GROUP BY origin"))
                    .bind(before_micros)
                    .fetch_all(&mut *conn)
                    .await?;
            for (origin, seq) in old {
                cut.insert(origin, seq as u64);
            }
            let total: i64 = sqlx::query_scalar(meta("SELECT CAST(coalesce(sum(length(event)), 0) AS BIGINT) FROM {w}log"))
                .fetch_one(&mut *conn)
                .await?;
            let mut excess = total - max_bytes;
            if excess > 0 {
                // The oldest entries, up to 100,000 a round: the next round takes more.
                let sql = meta("SELECT origin, seq, CAST(length(event) AS BIGINT) FROM {w}log ORDER BY committed_at, seq LIMIT 100000");
                let rows: Vec<(String, i64, i64)> = sqlx::query_as(sql).fetch_all(&mut *conn).await?;
                for (origin, seq, len) in rows {
                    if excess <= 0 {
                        break;
                    }
                    let entry = cut.entry(origin).or_insert(0);
                    if (seq as u64) > *entry {
                        *entry = seq as u64;
                        excess -= len;
                    }
                }
            }
            Ok(cut)
        }

        /// What `peer` has acknowledged of `origin`, and the log backlog past it.
        pub(super) async fn backlog(
            conn: &mut $conn,
            peer: &str,
            origin: &str,
        ) -> Result<$crate::store::PeerStatus, $crate::store::StoreError> {
            let sql = meta("SELECT coalesce(max(seq), 0) FROM {w}acks WHERE peer = $1 AND origin = $2");
            let acked: i64 = sqlx::query_scalar(sql).bind(peer).bind(origin).fetch_one(&mut *conn).await?;
            let sql = meta("SELECT count(*), min(committed_at) FROM {w}log WHERE origin = $1 AND seq > $2");
            let (unacked, oldest): (i64, Option<i64>) =
                sqlx::query_as(sql).bind(origin).bind(acked).fetch_one(&mut *conn).await?;
            let sql = meta("SELECT value FROM {w}node WHERE name = $1");
            let needs_reseed: Option<String> = sqlx::query_scalar(sql)
                .bind(behind_log_key(peer, origin))
                .fetch_optional(&mut *conn)
                .await?;
            Ok($crate::store::PeerStatus {
                peer: peer.to_owned(),
                origin: origin.to_owned(),
                acked: acked as u64,
                unacked: unacked as u64,
                oldest_unacked_micros: oldest,
                needs_reseed,
            })
        }

        /// The conflict log by table and strategy, dead letters by cause, the open queue.
        pub(super) async fn breakdown(
            conn: &mut $conn,
        ) -> Result<$crate::store::Breakdown, $crate::store::StoreError> {
            let sql = meta("SELECT tbl, strategy, count(*) FROM {w}conflicts GROUP BY tbl, strategy ORDER BY tbl, strategy");
            let conflicts: Vec<(String, String, i64)> = sqlx::query_as(sql).fetch_all(&mut *conn).await?;
            let sql = meta("SELECT cause, count(*) FROM {w}dead_letters GROUP BY cause ORDER BY cause");
            let dead_letters: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(&mut *conn).await?;
            let sql = meta("SELECT count(*) FROM {w}queue WHERE closed_at IS NULL");
            let queue_open: i64 = sqlx::query_scalar(sql).fetch_one(&mut *conn).await?;
            let sql = meta(
                "SELECT count(*) FROM {w}siblings s JOIN {w}queue q ON q.tbl = s.tbl AND q.key = s.key \
                 WHERE q.closed_at IS NULL",
            );
            let queue_siblings: i64 = sqlx::query_scalar(sql).fetch_one(&mut *conn).await?;
            Ok($crate::store::Breakdown {
                conflicts: (conflicts.into_iter()).map(|(t, s, n)| (t, s, n as u64)).collect(),
                dead_letters: (dead_letters.into_iter()).map(|(c, n)| (c, n as u64)).collect(),
                queue_open: queue_open as u64,
                queue_siblings: queue_siblings as u64,
            })
        }

        fn log_high_key(origin: &str) -> String {
            format!("log_high:{origin}")
        }

        /// The highest seq of `origin` this node's log has dropped (0 if none): the log went
        /// at least that far, whatever it holds now.
        pub(super) async fn log_high<'c>(
            executor: impl sqlx::Executor<'c, Database = $db>,
            origin: &str,
        ) -> Result<u64, $crate::store::StoreError> {
            let sql = meta("SELECT CAST(value AS TEXT) FROM {w}node WHERE name = $1");
            let value: Option<String> = sqlx::query_scalar(sql).bind(log_high_key(origin)).fetch_optional(executor).await?;
            Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
        }

        fn behind_log_key(peer: &str, origin: &str) -> String {
            format!("behind_log:{peer}:{origin}")
        }

        /// Records (or with `None` clears) that `peer` is behind the log of `origin`.
        pub(super) async fn note_behind_log(
            conn: &mut $conn,
            peer: &str,
            origin: &str,
            note: Option<&str>,
        ) -> Result<(), $crate::store::StoreError> {
            set_node_text(conn, &behind_log_key(peer, origin), note).await
        }

        /// Up to `limit` row versions of `table` with key bytes after `after`, in key byte
        /// order (the snapshot's page order, the same in both dialects).
        pub(super) async fn row_page(
            conn: &mut $conn,
            table: &str,
            after: &[u8],
            limit: i64,
        ) -> Result<Vec<(Vec<u8>, $crate::replicate::RowVersion)>, $crate::store::StoreError> {
            let sql = meta(
                "SELECT key, version, hlc, origin, CAST(CASE WHEN deleted THEN 1 ELSE 0 END AS BIGINT), image_sum \
                 FROM {w}rows WHERE tbl = $1 AND key > $2 ORDER BY key LIMIT $3",
            );
            let rows: Vec<(Vec<u8>, String, i64, String, i64, Option<i64>)> = sqlx::query_as(sql)
                .bind(table)
                .bind(after)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?;
            rows.into_iter()
                .map(|(key, version, hlc, origin, deleted, image)| {
                    let version =
                        $crate::store::metadata::stored_version(table, &version, hlc, origin, (deleted != 0, image))?;
                    Ok((key, version))
                })
                .collect()
        }

        /// Up to `limit` tombstones: (table, key bytes, version).
        pub(super) async fn tombstones(
            conn: &mut $conn,
            limit: i64,
        ) -> Result<Vec<(String, Vec<u8>, $crate::replicate::RowVersion)>, $crate::store::StoreError> {
            let sql = meta("SELECT tbl, key, version, hlc, origin FROM {w}rows WHERE deleted LIMIT $1");
            let rows: Vec<(String, Vec<u8>, String, i64, String)> =
                sqlx::query_as(sql).bind(limit).fetch_all(&mut *conn).await?;
            rows.into_iter()
                .map(|(table, key, version, hlc, origin)| {
                    let version = $crate::store::metadata::stored_version(&table, &version, hlc, origin, (true, None))?;
                    Ok((table, key, version))
                })
                .collect()
        }

        /// (table, key text) of every dead letter.
        pub(super) async fn dead_letter_keys(
            conn: &mut $conn,
        ) -> Result<std::collections::HashSet<(String, String)>, $crate::store::StoreError> {
            let rows: Vec<(String, String)> = sqlx::query_as(meta("SELECT DISTINCT tbl, key FROM {w}dead_letters"))
                .fetch_all(&mut *conn)
                .await?;
            Ok(rows.into_iter().collect())
        }

        /// Up to `limit` dead letters after id `after` (oldest first), but those refused as
        /// too large: what a snapshot hands a joiner (`transport::join`).
        pub(super) async fn letters_to_copy(
            conn: &mut $conn,
            after: i64,
            limit: i64,
        ) -> Result<Vec<$crate::store::backend::CopiedLetter>, $crate::store::StoreError> {
            let sql = meta(
                "SELECT id, origin, seq, tbl, key, reason, cause, event FROM {w}dead_letters \
                 WHERE id > $1 AND cause <> $2 ORDER BY id LIMIT $3",
            );
            let rows: Vec<(i64, String, i64, String, String, String, String, Vec<u8>)> = sqlx::query_as(sql)
                .bind(after)
                .bind($crate::store::backend::Cause::TooLarge.as_str())
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?;
            Ok(rows
                .into_iter()
                .map(|(id, origin, seq, table, key, reason, cause, event)| $crate::store::backend::CopiedLetter {
                    id,
                    origin,
                    seq: seq as u64,
                    table,
                    key,
                    reason,
                    cause,
                    event,
                })
                .collect())
        }

        /// Inserts `letter` as a new dead letter, due for a retry at once unless its cause is
        /// never retried.
        async fn store_letter(
            conn: &mut $conn,
            letter: &$crate::store::backend::CopiedLetter,
        ) -> Result<(), $crate::store::StoreError> {
            let sql = meta(
                "INSERT INTO {w}dead_letters (origin, seq, tbl, key, reason, event, at, attempts, retry_at, cause) \
                 VALUES ($1, $2, $3, $4, $5, $6, {now}, 0, {now} + $7, $8)",
            );
            sqlx::query(sql)
                .bind(&letter.origin)
                .bind(letter.seq as i64)
                .bind(&letter.table)
                .bind(&letter.key)
                .bind(&letter.reason)
                .bind(&letter.event)
                .bind(match $crate::store::backend::Cause::retried_by_name(&letter.cause) {
                    false => $crate::store::backend::NEVER_MICROS,
                    true => $crate::store::backend::retry_backoff_micros(0),
                })
                .bind(&letter.cause)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// Stores `letter` (another node's) as a letter of this node, unless it holds that
        /// letter already (same event, key and cause). Returns whether it was new.
        pub(super) async fn copy_letter(
            conn: &mut $conn,
            letter: &$crate::store::backend::CopiedLetter,
        ) -> Result<bool, $crate::store::StoreError> {
            let held = meta(
                "SELECT count(*) FROM {w}dead_letters WHERE origin = $1 AND seq = $2 AND tbl = $3 AND key = $4 AND cause = $5",
            );
            let count: i64 = sqlx::query_scalar(held)
                .bind(&letter.origin)
                .bind(letter.seq as i64)
                .bind(&letter.table)
                .bind(&letter.key)
                .bind(&letter.cause)
                .fetch_one(&mut *conn)
                .await?;
            if count > 0 {
                return Ok(false);
            }
            store_letter(conn, letter).await?;
            Ok(true)
        }

        /// Makes the recorded version of `key` a tombstone.
        pub(super) async fn mark_deleted(
            conn: &mut $conn,
            table: &str,
            key: &[u8],
        ) -> Result<(), $crate::store::StoreError> {
            sqlx::query(meta("UPDATE {w}rows SET deleted = $3, image_sum = NULL WHERE tbl = $1 AND key = $2"))
                .bind(table)
                .bind(key)
                .bind(true)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// Removes the tombstone of `key` and what it kept.
        pub(super) async fn purge_tombstone(
            conn: &mut $conn,
            table: &str,
            key: &[u8],
        ) -> Result<(), $crate::store::StoreError> {
            for sql in [
                "DELETE FROM {w}rows WHERE tbl = $1 AND key = $2 AND deleted",
                "DELETE FROM {w}crdt WHERE tbl = $1 AND key = $2",
                "DELETE FROM {w}siblings WHERE tbl = $1 AND key = $2",
            ] {
                sqlx::query(meta(sql)).bind(table).bind(key).execute(&mut *conn).await?;
            }
            Ok(())
        }

        /// Sets the recorded vector of the row `key` to `version` (JSON), recording the row
        /// as a tombstone or a live row (`absent`) if it has no metadata yet.
        pub(super) async fn raise_row_version(
            conn: &mut $conn,
            table: &str,
            key: &[u8],
            version: &str,
            absent: bool,
        ) -> Result<(), $crate::store::StoreError> {
            let sql = meta(
                "INSERT INTO {w}rows (tbl, key, version, hlc, origin, deleted) VALUES ($1, $2, $3, 0, '', $4) \
                 ON CONFLICT (tbl, key) DO UPDATE SET version = excluded.version",
            );
            sqlx::query(sql)
                .bind(table)
                .bind(key)
                .bind(version)
                .bind(absent)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// Rows (tombstones included) per replicated table with any.
        pub(super) async fn row_counts(
            conn: &mut $conn,
        ) -> Result<std::collections::BTreeMap<String, u64>, $crate::store::StoreError> {
            let rows: Vec<(String, i64)> = sqlx::query_as(meta("SELECT tbl, count(*) FROM {w}rows GROUP BY tbl"))
                .fetch_all(&mut *conn)
                .await?;
            Ok(rows.into_iter().map(|(t, n)| (t, n as u64)).collect())
        }

        /// A text value of the node table.
        pub(super) async fn node_text(conn: &mut $conn, name: &str) -> Result<Option<String>, $crate::store::StoreError> {
            let sql = meta("SELECT CAST(value AS TEXT) FROM {w}node WHERE name = $1");
            Ok(sqlx::query_scalar(sql).bind(name).fetch_optional(&mut *conn).await?)
        }

        /// Sets (or, with `None`, removes) a text value of the node table.
        pub(super) async fn set_node_text(
            conn: &mut $conn,
            name: &str,
            value: Option<&str>,
        ) -> Result<(), $crate::store::StoreError> {
            sqlx::query(meta("DELETE FROM {w}node WHERE name = $1"))
                .bind(name)
                .execute(&mut *conn)
                .await?;
            if let Some(value) = value {
                sqlx::query(meta("INSERT INTO {w}node (name, value) VALUES ($1, $2)"))
                    .bind(name)
                    .bind(value)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        }

        /// The siblings of a `queue` row, oldest (hlc, origin) first.
        pub(super) async fn siblings(
            conn: &mut $conn,
            table: &str,
            key: &[u8],
        ) -> Result<Vec<$crate::event::Event>, $crate::store::StoreError> {
            let sql = meta("SELECT event FROM {w}siblings WHERE tbl = $1 AND key = $2 ORDER BY hlc, origin");
            let rows: Vec<Vec<u8>> = sqlx::query_scalar(sql).bind(table).bind(key).fetch_all(&mut *conn).await?;
            rows.iter()
                .map(|bytes| {
                    $crate::wire::decode_event(bytes)
                        .map_err(|e| $crate::store::StoreError::Corrupt(format!("sibling of a {table} row: {e}")))
                })
                .collect()
        }

        /// A write that covers every sibling: drop them and close the row's entry.
        pub(super) async fn close_queue(
            conn: &mut $conn,
            table: &str,
            key: &[u8],
            by: &str,
        ) -> Result<(), $crate::store::StoreError> {
            let sql = meta("DELETE FROM {w}siblings WHERE tbl = $1 AND key = $2");
            let removed = sqlx::query(sql).bind(table).bind(key).execute(&mut *conn).await?.rows_affected();
            if removed > 0 {
                let sql = meta(
                    "UPDATE {w}queue SET closed_at = {now}, closed_by = $1 WHERE tbl = $2 AND key = $3 AND closed_at IS NULL",
                );
                sqlx::query(sql).bind(by).bind(table).bind(key).execute(&mut *conn).await?;
            }
            Ok(())
        }

        /// The CRDT column states of one row.
        pub(super) async fn crdt_states(
            conn: &mut $conn,
            table: &str,
            key: &[u8],
        ) -> Result<$crate::crdt::States, $crate::store::StoreError> {
            let sql = meta("SELECT col, state FROM {w}crdt WHERE tbl = $1 AND key = $2");
            let rows: Vec<(String, String)> = sqlx::query_as(sql).bind(table).bind(key).fetch_all(&mut *conn).await?;
            let mut out = std::collections::BTreeMap::new();
            for (column, state) in rows {
                let state = $crate::crdt::ColumnState::from_json(&column, &state)?;
                out.insert(column, state);
            }
            Ok(out)
        }

        /// What is recorded of a row's owner.
        pub(super) async fn load_owner(
            conn: &mut $conn,
            table: &str,
            key: &[u8],
        ) -> Result<Option<$crate::store::engine::KnownOwner>, $crate::store::StoreError> {
            let sql = meta("SELECT owner, epoch, moving_to FROM {w}owners WHERE tbl = $1 AND key = $2");
            let row: Option<(String, i64, Option<String>)> =
                sqlx::query_as(sql).bind(table).bind(key).fetch_optional(&mut *conn).await?;
            Ok(row.map(|(region, epoch, moving_to)| $crate::store::engine::KnownOwner {
                owner: $crate::resolve::ownership::Owner {
                    region,
                    epoch: epoch as u64,
                },
                moving_to,
            }))
        }

        pub(super) async fn insert_conflict(
            conn: &mut $conn,
            record: &$crate::store::backend::ConflictRecord<'_>,
        ) -> Result<(), $crate::store::StoreError> {
            let sql =
                meta("INSERT INTO {w}conflicts (tbl, key, strategy, winner, loser, at) VALUES ($1, $2, $3, $4, $5, {now})");
            sqlx::query(sql)
                .bind(record.table)
                .bind(&record.key)
                .bind(record.strategy)
                .bind(&record.winner)
                .bind(&record.loser)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        pub(super) async fn insert_dead_letter(
            conn: &mut $conn,
            letter: &$crate::store::backend::DeadLetter<'_>,
        ) -> Result<(), $crate::store::StoreError> {
            let event = letter.event;
            if let Some((id, attempts)) = letter.retry {
                let sql = meta(
                    "UPDATE {w}dead_letters SET reason = $2, attempts = attempts + 1, retry_at = {now} + $3 WHERE id = $1",
                );
                sqlx::query(sql)
                    .bind(id)
                    .bind(letter.reason)
                    .bind($crate::store::backend::retry_backoff_micros(attempts + 1))
                    .execute(&mut *conn)
                    .await?;
                return Ok(());
            }
            let count_sql = meta("SELECT count(*) FROM {w}dead_letters WHERE cause = $1");
            let stored: i64 = sqlx::query_scalar(count_sql)
                .bind(letter.cause.as_str())
                .fetch_one(&mut *conn)
                .await?;
            if stored as u64 >= letter.limit {
                return Err($crate::store::StoreError::DeadLettersFull {
                    cause: letter.cause.as_str(),
                    stored: stored as u64,
                });
            }
            let row = $crate::store::backend::CopiedLetter {
                id: 0,
                origin: event.origin.clone(),
                seq: event.seq,
                table: event.table.clone(),
                key: event.key.to_string(),
                reason: letter.reason.to_owned(),
                cause: letter.cause.as_str().to_owned(),
                event: $crate::wire::encode_event(event),
            };
            store_letter(conn, &row).await?;
            Ok(())
        }

        /// Letters whose retry is due; with `parents`, also those a missing parent row
        /// refused (SQLSTATE 23503), backoff or not.
        pub(super) async fn due_dead_letters(
            conn: &mut $conn,
            limit: i64,
            parents: bool,
        ) -> Result<Vec<$crate::store::backend::DueLetter>, $crate::store::StoreError> {
            let sql = meta(
                "SELECT id, event, attempts FROM {w}dead_letters \
                 WHERE retry_at <= {now} OR ($2 AND reason LIKE '%(SQLSTATE 23503)%') ORDER BY id LIMIT $1",
            );
            let rows: Vec<(i64, Vec<u8>, i64)> =
                sqlx::query_as(sql).bind(limit).bind(parents).fetch_all(&mut *conn).await?;
            Ok(rows
                .into_iter()
                .map(|(id, event, attempts)| (id, event, attempts.clamp(0, i64::from(u32::MAX)) as u32))
                .collect())
        }

        pub(super) async fn group(
            conn: &mut $conn,
            step: $crate::store::backend::Group,
        ) -> Result<(), $crate::store::StoreError> {
            use $crate::store::backend::Group;
            let sql = match step {
                Group::Begin => "SAVEPOINT weft_group",
                Group::Keep => "RELEASE SAVEPOINT weft_group",
                Group::Undo => "ROLLBACK TO SAVEPOINT weft_group",
            };
            sqlx::raw_sql(sql).execute(&mut *conn).await?;
            Ok(())
        }

        pub(super) async fn dead_letters_due_now(conn: &mut $conn) -> Result<(), $crate::store::StoreError> {
            sqlx::query(meta("UPDATE {w}dead_letters SET retry_at = 0 WHERE retry_at > 0 AND cause NOT IN ('fenced', 'too large')"))
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        pub(super) async fn delete_dead_letter(conn: &mut $conn, id: i64) -> Result<(), $crate::store::StoreError> {
            sqlx::query(meta("DELETE FROM {w}dead_letters WHERE id = $1"))
                .bind(id)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// Dead letters (all, or just `id`), oldest first: id, origin, seq, table, key,
        /// reason, event, at, attempts, retry at, cause.
        pub(super) async fn dead_letters(
            conn: &mut $conn,
            id: Option<i64>,
        ) -> Result<Vec<$crate::store::admin::LetterRow>, $crate::store::StoreError> {
            let sql = meta(
                "SELECT id, origin, seq, tbl, key, reason, event, at, attempts, retry_at, cause FROM {w}dead_letters \
                 WHERE CAST($1 AS BIGINT) IS NULL OR id = $1 ORDER BY id",
            );
            Ok(sqlx::query_as(sql).bind(id).fetch_all(&mut *conn).await?)
        }

        /// Makes the dead letters `ids` (or all) due now, or deletes them; returns how many.
        pub(super) async fn act_on_letters(
            conn: &mut $conn,
            ids: Option<&[i64]>,
            discard: bool,
        ) -> Result<u64, $crate::store::StoreError> {
            // A fenced write would lose again: it is never retried, only discarded.
            let verb = if discard {
                "DELETE FROM {w}dead_letters WHERE TRUE"
            } else {
                "UPDATE {w}dead_letters SET retry_at = 0 WHERE cause NOT IN ('fenced', 'too large')"
            };
            let Some(ids) = ids else {
                return Ok(sqlx::query(meta(verb)).execute(&mut *conn).await?.rows_affected());
            };
            let mut done = 0;
            for id in ids {
                let sql = meta(&format!("{verb} AND id = $1"));
                done += sqlx::query(sql).bind(id).execute(&mut *conn).await?.rows_affected();
            }
            Ok(done)
        }

        /// Open queue entries (or just `id`), oldest first.
        pub(super) async fn queue_entries(
            conn: &mut $conn,
            id: Option<i64>,
        ) -> Result<Vec<(i64, String, Vec<u8>, String, i64)>, $crate::store::StoreError> {
            let sql = meta(
                "SELECT id, tbl, key, key_text, opened_at FROM {w}queue \
                 WHERE closed_at IS NULL AND (CAST($1 AS BIGINT) IS NULL OR id = $1) ORDER BY id",
            );
            Ok(sqlx::query_as(sql).bind(id).fetch_all(&mut *conn).await?)
        }

        pub(super) async fn insert_resolution(
            conn: &mut $conn,
            resolved: &$crate::store::admin::Resolved,
            row: &str,
        ) -> Result<(), $crate::store::StoreError> {
            let sql = meta(
                "INSERT INTO {w}resolutions (queue_id, tbl, key_text, decided_by, decision, \"row\", at) \
                 VALUES ($1, $2, $3, $4, $5, $6, {now})",
            );
            sqlx::query(sql)
                .bind(resolved.queue_id)
                .bind(&resolved.table)
                .bind(&resolved.key)
                .bind(&resolved.decided_by)
                .bind(&resolved.decision)
                .bind(row)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// Every resolution by a person and every automatic one.
        pub(super) async fn history(
            conn: &mut $conn,
            recent: Option<i64>,
        ) -> Result<$crate::store::admin::History, $crate::store::StoreError> {
            // The latest `recent` of each, read newest first and put back in order.
            let limit = recent.unwrap_or(i64::MAX);
            let sql = meta(
                "SELECT queue_id, tbl, key_text, decided_by, decision, at FROM {w}resolutions ORDER BY id DESC LIMIT $1",
            );
            let mut resolved: Vec<_> = sqlx::query_as(sql).bind(limit).fetch_all(&mut *conn).await?;
            resolved.reverse();
            let sql = meta("SELECT id, tbl, key, strategy, winner, loser, at FROM {w}conflicts ORDER BY id DESC LIMIT $1");
            let mut automatic: Vec<_> = sqlx::query_as(sql).bind(limit).fetch_all(&mut *conn).await?;
            automatic.reverse();
            Ok($crate::store::admin::History::from_rows(resolved, automatic))
        }

        pub(super) async fn insert_transfer(
            conn: &mut $conn,
            record: &$crate::store::admin::TransferRecord<'_>,
        ) -> Result<(), $crate::store::StoreError> {
            let sql = meta(
                "INSERT INTO {w}transfers (tbl, \"rows\", moved, from_region, to_region, decided_by, at) \
                 VALUES ($1, $2, $3, $4, $5, $6, {now})",
            );
            sqlx::query(sql)
                .bind(record.table)
                .bind(&record.rows)
                .bind(record.moved as i64)
                .bind(record.from)
                .bind(record.to)
                .bind(record.by)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }
    };
}

pub(crate) use metadata_io;
