//! The operator's admin API over a node's database, SQLite or PostgreSQL: the resolution
//! queue (list, show, resolve, history), ownership transfers and dead letters (list, show,
//! retry, discard; a retry makes the letter due, and the running sidecar applies it).
//! `weft conflicts`, `weft ownership` and `weft dead-letters` only parse and print around
//! it; a console would call it too.
//!
//! It works on the database directly, as an application does, so it serves a running node
//! and a stopped one alike; it never installs anything. Every change it makes is an ordinary
//! application write, captured by the triggers, so it replicates like any change:
//! - a resolution writes the chosen row (its version then covers every sibling, which closes
//!   the entry in every region) and records who decided what, and when;
//! - a transfer writes the owner column inside a transfer-marked transaction (the only place
//!   the ownership triggers allow it), or for a rule table records the new owner as
//!   `moving_to` and queues the row for capture; the drain numbers it as the row's next epoch.
#![allow(async_fn_in_trait)]
use crate::config::{Database, NodeConfig, OwnerRule, Strategy, TableConfig};
use crate::event::{Event, Key, Op, Row, Value};
use crate::resolve::ownership::{Owner, rule_owner};
use crate::store::backend::{Backend, Conn, Tables, Txn};
use crate::store::engine::{KnownOwner, TableRules};
use crate::store::{StoreError, postgres, sqlite};

/// An open entry of the resolution queue, with its siblings (oldest first).
#[derive(Debug, Clone)]
pub struct OpenConflict {
    pub id: i64,
    pub table: String,
    pub key: Key,
    pub key_text: String,
    pub opened_at_micros: i64,
    pub siblings: Vec<Event>,
    /// The table's columns, in table order.
    pub columns: Vec<String>,
}

/// How a person resolves a conflict.
#[derive(Debug, Clone)]
pub enum Choice {
    /// Sibling N (from 1, as `OpenConflict::siblings` lists them).
    Take(usize),
    /// A row of the person's own: column values; the key columns are the conflict's.
    Edit { row: Vec<(String, Value)>, source: String },
}

/// A row `weft audit --repair` re-emits: its winning image (or deletion) becomes a change
/// of this node whose version covers `floor` (every region's version of the row), so it
/// replaces the row everywhere as any newer write does.
#[derive(Debug, Clone)]
pub struct Repair {
    pub table: String,
    pub key: Key,
    pub op: Op,
    pub floor: crate::version::VersionVector,
}

/// A resolution as recorded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resolved {
    #[serde(rename = "conflict")]
    pub queue_id: i64,
    pub table: String,
    pub key: String,
    pub decided_by: String,
    pub decision: String,
    pub at_micros: i64,
}

/// A conflict resolved automatically (LWW, CRDT, ownership), from the conflict log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AutoResolved {
    pub id: i64,
    pub table: String,
    pub key: String,
    pub strategy: String,
    pub winner: serde_json::Value,
    pub loser: serde_json::Value,
    pub at_micros: i64,
}

/// Who resolved what, and every automatic resolution.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct History {
    pub resolved: Vec<Resolved>,
    pub automatic: Vec<AutoResolved>,
}

impl History {
    /// From the rows of the resolutions table (queue id, table, key, by, decision, at) and
    /// of the conflict log (id, table, key, strategy, winner JSON, loser JSON, at).
    pub fn from_rows(
        resolved: Vec<(i64, String, String, String, String, i64)>,
        automatic: Vec<(i64, String, String, String, String, String, i64)>,
    ) -> Self {
        let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap_or_default();
        History {
            resolved: resolved
                .into_iter()
                .map(|r| Resolved {
                    queue_id: r.0,
                    table: r.1,
                    key: r.2,
                    decided_by: r.3,
                    decision: r.4,
                    at_micros: r.5,
                })
                .collect(),
            automatic: automatic
                .into_iter()
                .map(|r| AutoResolved {
                    id: r.0,
                    table: r.1,
                    key: r.2,
                    strategy: r.3,
                    winner: parse(&r.4),
                    loser: parse(&r.5),
                    at_micros: r.6,
                })
                .collect(),
        }
    }
}

/// A dead letters row: id, origin, seq, table, key, reason, event, at, attempts, retry at,
/// cause.
pub type LetterRow = (i64, String, i64, String, String, String, Vec<u8>, i64, i64, i64, String);

/// An event the node could not apply, as the operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub origin: String,
    pub seq: i64,
    pub table: String,
    pub key: String,
    pub reason: String,
    pub at_micros: i64,
    /// Retries so far (the sidecar retries with backoff, from a second to an hour).
    pub attempts: i64,
    /// When the sidecar tries it next (0: at its next round).
    pub retry_at_micros: i64,
    /// Why, in one word: `ownership`, `refused`, `fenced` (lost to a forced failover; never
    /// retried), ...
    pub cause: String,
    /// The event as stored, decoded: its op and row, version, HLC; `null` if it does not
    /// decode.
    pub event: serde_json::Value,
}

impl DeadLetter {
    pub fn from_row(row: LetterRow) -> Self {
        let (id, origin, seq, table, key, reason, bytes, at_micros, attempts, retry_at_micros, cause) = row;
        let event = crate::wire::decode_event(&bytes).map_or(serde_json::Value::Null, |e| {
            serde_json::json!({
                "op": e.op.to_json(),
                "version": serde_json::from_str::<serde_json::Value>(&e.version.to_json()).unwrap_or_default(),
                "hlc": e.hlc.to_string(),
                "origin_region": e.origin_region,
                "path": e.path,
            })
        });
        DeadLetter {
            id,
            origin,
            seq,
            table,
            key,
            reason,
            at_micros,
            attempts,
            retry_at_micros,
            cause,
            event,
        }
    }
}

/// Which dead letters a command acts on.
#[derive(Debug, Clone)]
pub enum Letters {
    All,
    Ids(Vec<i64>),
}

/// Rows of an ownership table to move to another region.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub table: String,
    /// The rows' keys; `None`: every row this region owns.
    pub keys: Option<Vec<Key>>,
    pub to: String,
    pub by: String,
    /// What was asked for, as the person put it, for the transfers table.
    pub asked: String,
}

/// A forced failover: every row (or a table's rows) a lost region owns, fenced over to
/// another region from a surviving node.
#[derive(Debug, Clone)]
pub struct Failover {
    /// The lost region.
    pub from: String,
    pub to: String,
    /// One ownership table, or (`None`) all of them.
    pub table: Option<String>,
    pub by: String,
}

/// A transfer as recorded in the transfers table.
pub struct TransferRecord<'a> {
    pub table: &'a str,
    /// What was asked for ("all rows of eu-west", or the keys).
    pub rows: String,
    pub moved: u64,
    pub from: &'a str,
    pub to: &'a str,
    pub by: &'a str,
}

/// The admin operations of a dialect's transaction, beside the `Txn` row IO they reuse. The
/// transaction is the application's, not the applier's: its writes are captured.
pub trait AdminTxn: Txn {
    /// Whether weft's schema is installed in this database.
    async fn installed(&mut self) -> Result<bool, StoreError>;
    /// Open queue entries (or just `id`), oldest first: (id, table, key bytes, key text,
    /// opened at).
    async fn queue_entries(&mut self, id: Option<i64>) -> Result<Vec<(i64, String, Vec<u8>, String, i64)>, StoreError>;
    /// Writes `op` for the row `key` as the application does; returns the rows changed.
    async fn write_as_application(&mut self, table: &Self::Table, key: &Key, op: &Op) -> Result<u64, StoreError>;
    /// Queues the deletion of the row `key`, which does not exist, for capture: a delete
    /// that finds no row fires no trigger, yet its version must replicate.
    async fn queue_deleted(&mut self, table: &Self::Table, key: &Key) -> Result<(), StoreError>;
    async fn insert_resolution(&mut self, resolved: &Resolved, row: &str) -> Result<(), StoreError>;
    /// Every resolution, or (`recent`) the latest of each kind.
    async fn history(&mut self, recent: Option<i64>) -> Result<History, StoreError>;
    /// Dead letters (all, or just `id`), oldest first.
    async fn dead_letters(&mut self, id: Option<i64>) -> Result<Vec<LetterRow>, StoreError>;
    /// Makes the letters `ids` (or all) due for a retry now, or (`discard`) deletes them;
    /// returns how many there were.
    async fn act_on_letters(&mut self, ids: Option<&[i64]>, discard: bool) -> Result<u64, StoreError>;
    /// Allows owner changes in this transaction (the ownership triggers check the mark);
    /// `forced`: also of rows another region owns (a forced failover).
    async fn begin_transfer(&mut self, forced: bool) -> Result<(), StoreError>;
    /// Sets `column` to `to` on the row `key`, or on every row whose owner is `from`;
    /// returns how many rows changed.
    async fn move_owner_column(
        &mut self,
        table: &Self::Table,
        column: &str,
        key: Option<&Key>,
        from: &str,
        to: &str,
    ) -> Result<u64, StoreError>;
    /// The keys of the table's rows: the row `key` if it exists, or every row.
    async fn row_keys(&mut self, table: &Self::Table, key: Option<&Key>) -> Result<Vec<Key>, StoreError>;
    /// Queues the row for capture, as if the application had written it.
    async fn queue_capture(&mut self, table: &Self::Table, key: &Key) -> Result<(), StoreError>;
    /// Records the transfer, ends the transfer mark, and wakes the sidecar.
    async fn end_transfer(&mut self, record: &TransferRecord<'_>) -> Result<(), StoreError>;
}

/// The admin side of a dialect: an application connection and the tables as configured.
pub trait AdminBackend: Backend
where
    for<'t> Self::Txn<'t>: AdminTxn,
{
    /// A connection as an application has it (it waits for the sidecar's transactions).
    async fn connect_app(&self) -> Result<Conn<Self>, StoreError>;
    /// The table as the catalogue describes it, with its config applied; installs nothing.
    async fn describe(conn: &mut Conn<Self>, config: &TableConfig) -> Result<Self::Table, StoreError>;
}

/// The admin API of one node's database. One per command, so the variants' sizes do not
/// matter.
#[allow(clippy::large_enum_variant)]
pub enum Admin {
    Sqlite(On<sqlite::Sqlite>),
    Postgres(On<postgres::Postgres>),
}

/// The admin API over one dialect.
pub struct On<B: AdminBackend>
where
    for<'t> B::Txn<'t>: AdminTxn,
{
    backend: B,
    config: NodeConfig,
}

macro_rules! on {
    ($self:expr, $on:ident => $body:expr) => {
        match $self {
            Admin::Sqlite($on) => $body,
            Admin::Postgres($on) => $body,
        }
    };
}

impl Admin {
    /// Opens the node's database as `config` names it.
    pub async fn open(config: NodeConfig) -> Result<Self, StoreError> {
        let admin = match &config.database {
            Database::Sqlite(path) => {
                if !path.exists() {
                    return Err(StoreError::NotInstalled(format!(
                        "{}: no database there; is this the node's config?",
                        path.display()
                    )));
                }
                Admin::Sqlite(On {
                    backend: sqlite::Sqlite::for_tools(path),
                    config,
                })
            }
            Database::Postgres(url) => Admin::Postgres(On {
                backend: postgres::Postgres::for_tools(url)?,
                config,
            }),
        };
        Ok(admin)
    }

    /// Open conflicts, oldest first, with their siblings.
    pub async fn open_conflicts(&self) -> Result<Vec<OpenConflict>, StoreError> {
        on!(self, on => on.open_conflicts(None).await)
    }

    /// One open conflict, or an error saying it is not open.
    pub async fn conflict(&self, id: i64) -> Result<OpenConflict, StoreError> {
        on!(self, on => on.conflict(id).await)
    }

    /// Resolves an open conflict; returns what was decided, as recorded.
    pub async fn resolve(&self, id: i64, choice: Choice, by: &str) -> Result<Resolved, StoreError> {
        on!(self, on => on.resolve(id, choice, by).await)
    }

    /// Who resolved what and every automatic resolution, oldest first; `recent`: only the
    /// latest that many of each.
    pub async fn history(&self, recent: Option<i64>) -> Result<History, StoreError> {
        on!(self, on => on.history(recent).await)
    }

    /// Moves rows of an ownership table to another region; returns how many moved.
    pub async fn transfer(&self, transfer: &Transfer) -> Result<u64, StoreError> {
        on!(self, on => on.transfer(transfer).await)
    }

    /// Fences the rows a lost region owns over to another region (see
    /// [`crate::resolve::ownership`]); returns how many moved, per table.
    pub async fn failover(&self, failover: &Failover) -> Result<Vec<(String, u64)>, StoreError> {
        on!(self, on => on.failover(failover).await)
    }

    /// Re-emits a row's winning version, found by `weft audit`, as a change of this node
    /// (`Repair`).
    pub async fn repair(&self, repair: &Repair) -> Result<(), StoreError> {
        on!(self, on => on.repair(repair).await)
    }

    /// Dead letters (all, or just `id`), oldest first.
    pub async fn dead_letters(&self, id: Option<i64>) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = on!(self, on => on.in_transaction(&Tables::new(), async |txn| txn.dead_letters(id).await).await)?;
        if let (Some(id), true) = (id, rows.is_empty()) {
            return Err(refused(format!(
                "no dead letter {id}; `weft dead-letters list` shows them"
            )));
        }
        Ok(rows.into_iter().map(DeadLetter::from_row).collect())
    }

    /// Makes `letters` due for a retry now (the running sidecar retries them within seconds)
    /// or, with `discard`, deletes them; returns how many there were.
    pub async fn act_on_letters(&self, letters: &Letters, discard: bool) -> Result<u64, StoreError> {
        let ids = match letters {
            Letters::All => None,
            Letters::Ids(ids) => Some(ids.as_slice()),
        };
        if let (Some(ids), false) = (ids, discard) {
            let letters = self.dead_letters(None).await?;
            let never = |cause: &str| {
                letters
                    .iter()
                    .filter(|l| l.cause == cause && ids.contains(&l.id))
                    .map(|l| l.id.to_string())
                    .collect::<Vec<_>>()
            };
            let fenced = never("fenced");
            if !fenced.is_empty() {
                return Err(refused(format!(
                    "dead letter(s) {} lost to a forced ownership failover: a retry would lose again; write their data anew in the row's owner region if it is still wanted, then discard them",
                    fenced.join(", ")
                )));
            }
            let large = never("too large");
            if !large.is_empty() {
                return Err(refused(format!(
                    "dead letter(s) {} are changes too large for any message (max_message_mib): a retry would not fit either; write the row smaller, or raise max_message_mib on every node and write the row again, then discard them",
                    large.join(", ")
                )));
            }
        }
        on!(self, on => on.in_transaction(&Tables::new(), async |txn| txn.act_on_letters(ids, discard).await).await)
    }

    /// The number of key columns of a replicated table (to parse keys given by a person).
    pub async fn key_width(&self, table: &str) -> Result<usize, StoreError> {
        on!(self, on => Ok(on.table(table).await?.key().len()))
    }
}

/// An error about what a person asked for.
fn refused(message: String) -> StoreError {
    StoreError::Refused(message)
}

impl<B: AdminBackend> On<B>
where
    for<'t> B::Txn<'t>: AdminTxn,
{
    fn table_config(&self, table: &str) -> TableConfig {
        let config = self.config.tables.iter().find(|t| t.name == table);
        config.cloned().unwrap_or_else(|| TableConfig::lww(table))
    }

    async fn table(&self, table: &str) -> Result<B::Table, StoreError> {
        let mut conn = self.backend.connect_app().await?;
        B::describe(&mut conn, &self.table_config(table)).await
    }

    /// Runs `f` in one application transaction over `tables`.
    async fn in_transaction<T>(
        &self,
        tables: &Tables<B::Table>,
        f: impl AsyncFnOnce(&mut B::Txn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.backend.connect_app().await?;
        let mut tx = sqlx::Connection::begin_with(&mut conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
        let result = {
            let mut txn = self.backend.txn(tables, &mut tx);
            if !txn.installed().await? {
                return Err(StoreError::NotInstalled(
                    "this database has no weft schema yet; start the node's sidecar once (weft run) first".into(),
                ));
            }
            f(&mut txn).await?
        };
        tx.commit().await?;
        Ok(result)
    }

    async fn open_conflicts(&self, id: Option<i64>) -> Result<Vec<OpenConflict>, StoreError> {
        let tables = Tables::new();
        let entries = self
            .in_transaction(&tables, async |txn| {
                let mut out = Vec::new();
                for (id, table, key, key_text, opened_at) in txn.queue_entries(id).await? {
                    let siblings = txn.siblings(&table, &key).await?;
                    out.push((id, table, key_text, opened_at, siblings));
                }
                Ok(out)
            })
            .await?;
        let mut out = Vec::new();
        for (id, table, key_text, opened_at_micros, siblings) in entries {
            let described = self.table(&table).await?;
            let key = siblings.first().map(|s| s.key.clone()).unwrap_or(Key(Vec::new()));
            out.push(OpenConflict {
                id,
                columns: described.columns().to_vec(),
                table,
                key,
                key_text,
                opened_at_micros,
                siblings,
            });
        }
        Ok(out)
    }

    async fn conflict(&self, id: i64) -> Result<OpenConflict, StoreError> {
        self.open_conflicts(Some(id)).await?.pop().ok_or_else(|| {
            refused(format!(
                "no open conflict {id}; `weft conflicts list` shows the open ones"
            ))
        })
    }

    async fn resolve(&self, id: i64, choice: Choice, by: &str) -> Result<Resolved, StoreError> {
        let open = self.conflict(id).await?;
        if open.siblings.is_empty() {
            return Err(refused(format!("conflict {id} has no siblings left")));
        }
        let table = self.table(&open.table).await?;
        let (op, decision) = match choice {
            Choice::Take(n) => {
                let s = open
                    .siblings
                    .get(n.wrapping_sub(1))
                    .ok_or_else(|| refused(format!("conflict {id} has siblings 1 to {}", open.siblings.len())))?;
                let decision = format!("took sibling {n} (origin {}, hlc {})", s.origin, s.hlc);
                (s.op.clone(), decision)
            }
            Choice::Edit { mut row, source } => {
                for (i, k) in table.key().iter().enumerate() {
                    row.retain(|(c, _)| c != k);
                    row.push((k.clone(), open.key.0[i].clone()));
                }
                (Op::Upsert(Row(row)), format!("edited from {source}"))
            }
        };
        let resolved = Resolved {
            queue_id: open.id,
            table: open.table.clone(),
            key: open.key_text.clone(),
            decided_by: by.to_owned(),
            decision,
            at_micros: crate::clock::now_micros(),
        };
        let tables = Tables::new();
        self.in_transaction(&tables, async |txn| {
            let changed = txn.write_as_application(&table, &open.key, &op).await?;
            if changed == 0 && op.is_delete() {
                // A delete sibling won already: the row is gone and no trigger fired, but
                // this resolution's version must still replicate and close the entry.
                txn.queue_deleted(&table, &open.key).await?;
            }
            txn.insert_resolution(&resolved, &op.to_json().to_string()).await
        })
        .await?;
        Ok(resolved)
    }

    async fn repair(&self, repair: &Repair) -> Result<(), StoreError> {
        let config = self.table_config(&repair.table);
        if config.strategy == Strategy::Crdt && !config.columns.is_empty() {
            return Err(refused(format!(
                "{} is a CRDT table: writing the winning image would add the difference to its \
                 counters in every region; its rows are reported, not repaired",
                repair.table
            )));
        }
        let table = self.table(&repair.table).await?;
        if config.strategy == Strategy::Ownership {
            let owner = match (&config.owner_column, &config.owner_rule, &repair.op) {
                (Some(column), _, Op::Upsert(row)) => {
                    row.0.iter().find(|(c, _)| c == column).and_then(|(_, v)| match v {
                        Value::Text(region) => Some(region.clone()),
                        _ => None,
                    })
                }
                (_, Some(rule), _) => rule_owner(rule, table.key(), &repair.key),
                _ => None,
            };
            let here = self.config.region();
            if owner.as_deref() != Some(here) {
                return Err(refused(format!(
                    "the row belongs to region {}, not {here}: run `weft audit --repair` on a node of its region",
                    owner.as_deref().unwrap_or("(none)")
                )));
            }
        }
        let tables = Tables::new();
        self.in_transaction(&tables, async |txn| {
            let key = repair.key.to_bytes();
            if txn.siblings(&repair.table, &key).await?.len() > 1 {
                return Err(refused(
                    "the row has an open conflict; resolve it with `weft conflicts` instead".into(),
                ));
            }
            let local = txn.read_row(&table, &repair.key).await?;
            txn.raise_row_version(&repair.table, &key, &repair.floor, local.is_none())
                .await?;
            match (&repair.op, &local) {
                (Op::Delete, None) => txn.queue_deleted(&table, &repair.key).await,
                (Op::Upsert(row), Some(here)) if row.to_bytes() == here.to_bytes() => {
                    txn.queue_capture(&table, &repair.key).await
                }
                (op, _) => txn.write_as_application(&table, &repair.key, op).await.map(drop),
            }
        })
        .await
    }

    async fn history(&self, recent: Option<i64>) -> Result<History, StoreError> {
        let tables = Tables::new();
        self.in_transaction(&tables, async |txn| txn.history(recent).await)
            .await
    }

    async fn failover(&self, failover: &Failover) -> Result<Vec<(String, u64)>, StoreError> {
        let me = self.config.region().to_owned();
        let mut described = Vec::new();
        for name in failover_tables(&self.config, failover, &me)? {
            described.push(self.table(&name).await?);
        }
        let tables = Tables::new();
        self.in_transaction(&tables, async |txn| {
            let mut moved = Vec::new();
            for table in &described {
                txn.begin_transfer(true).await?;
                let n = fence_rows(txn, table, failover).await?;
                let record = TransferRecord {
                    table: table.name(),
                    rows: format!("forced failover of all rows of {}", failover.from),
                    moved: n,
                    from: &failover.from,
                    to: &failover.to,
                    by: &failover.by,
                };
                txn.end_transfer(&record).await?;
                moved.push((table.name().to_owned(), n));
            }
            Ok(moved)
        })
        .await
    }

    async fn transfer(&self, transfer: &Transfer) -> Result<u64, StoreError> {
        let config = self.table_config(&transfer.table);
        let me = self.config.region().to_owned();
        check_transfer(&self.config, &config, transfer, &me)?;
        let table = self.table(&transfer.table).await?;
        let tables = Tables::new();
        self.in_transaction(&tables, async |txn| {
            txn.begin_transfer(false).await?;
            let moved = match (table.owner_column(), table.owner_rule()) {
                (Some(column), _) => by_column(txn, &table, column, transfer, &me).await?,
                (None, Some(rule)) => by_rule(txn, &table, rule, transfer, &me).await?,
                (None, None) => {
                    return Err(refused(format!(
                        "table `{}` has neither owner_column nor owner_rule",
                        transfer.table
                    )));
                }
            };
            let record = TransferRecord {
                table: &transfer.table,
                rows: transfer.asked.clone(),
                moved,
                from: &me,
                to: &transfer.to,
                by: &transfer.by,
            };
            txn.end_transfer(&record).await?;
            Ok(moved)
        })
        .await
    }
}

/// The ownership tables a failover moves rows of, or why it cannot run here.
fn failover_tables(config: &NodeConfig, failover: &Failover, me: &str) -> Result<Vec<String>, StoreError> {
    let regions: std::collections::BTreeSet<&str> = config.topology.nodes.iter().map(|n| n.region.as_str()).collect();
    for region in [&failover.from, &failover.to] {
        if !regions.contains(region.as_str()) {
            return Err(refused(format!(
                "`{region}` is not a region of mesh `{}`: its regions are {}",
                config.topology.mesh,
                regions.iter().copied().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    if failover.from == me {
        return Err(refused(format!(
            "this node is in `{me}`, the region to fail over from: run the failover on a node of a surviving region"
        )));
    }
    if failover.from == failover.to {
        return Err(refused("--from and --to name the same region".to_owned()));
    }
    let owned = config.tables.iter().filter(|t| t.strategy == Strategy::Ownership);
    let names: Vec<String> = match &failover.table {
        None => owned.map(|t| t.name.clone()).collect(),
        Some(table) => {
            let transfer = Transfer {
                table: table.clone(),
                keys: None,
                to: failover.to.clone(),
                by: failover.by.clone(),
                asked: String::new(),
            };
            let Some(config_of) = config.tables.iter().find(|t| &t.name == table) else {
                return Err(refused(format!("table `{table}` is not in the node's config")));
            };
            check_transfer(config, config_of, &transfer, "")?;
            vec![table.clone()]
        }
    };
    if names.is_empty() {
        return Err(refused("the node's config has no ownership table".to_owned()));
    }
    Ok(names)
}

/// Fences every row of `table` that `failover.from` owns over to `failover.to`: records the
/// move as `moving_to` on a row the lost region owns (which the drain numbers as the next
/// term, see `engine::settle_local`), writing the owner column under the forced mark.
async fn fence_rows<T: AdminTxn>(txn: &mut T, table: &T::Table, failover: &Failover) -> Result<u64, StoreError> {
    let mut moved = 0;
    for key in txn.row_keys(table, None).await? {
        let known = txn.owner(table, &key.to_bytes()).await?;
        let owner = match (known, table.owner_rule()) {
            (Some(known), _) => known.owner,
            (None, Some(rule)) => match rule_owner(rule, table.key(), &key) {
                Some(region) => Owner { region, epoch: 0 },
                None => continue,
            },
            // A row no owner record names was never written under weft's ownership.
            (None, None) => continue,
        };
        if owner.region != failover.from {
            continue;
        }
        match table.owner_column() {
            Some(column) => {
                txn.move_owner_column(table, column, Some(&key), &failover.from, &failover.to)
                    .await?;
            }
            None => txn.queue_capture(table, &key).await?,
        }
        txn.store_owner(table, &key, &owner, Some(&failover.to)).await?;
        moved += 1;
    }
    Ok(moved)
}

/// Refuses a transfer the mesh cannot carry out.
fn check_transfer(config: &NodeConfig, table: &TableConfig, transfer: &Transfer, me: &str) -> Result<(), StoreError> {
    if !config.tables.iter().any(|t| t.name == transfer.table) {
        return Err(refused(format!(
            "table `{}` is not in the node's config",
            transfer.table
        )));
    }
    if table.strategy != Strategy::Ownership {
        return Err(refused(format!(
            "table `{}` is not an ownership table (strategy = \"ownership\" with owner_column or owner_rule)",
            transfer.table
        )));
    }
    let regions: std::collections::BTreeSet<&str> = config.topology.nodes.iter().map(|n| n.region.as_str()).collect();
    if !regions.contains(transfer.to.as_str()) {
        // A row moved to a region no node serves could never be written again.
        return Err(refused(format!(
            "`{}` is not a region of mesh `{}`: its regions are {}",
            transfer.to,
            config.topology.mesh,
            regions.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    if transfer.to == me {
        return Err(refused(format!("this node is in `{}` already", transfer.to)));
    }
    Ok(())
}

/// Moves rows by writing their owner column; the trigger allows it inside the transfer.
async fn by_column<T: AdminTxn>(
    txn: &mut T,
    table: &T::Table,
    column: &str,
    transfer: &Transfer,
    me: &str,
) -> Result<u64, StoreError> {
    let Some(keys) = &transfer.keys else {
        return txn.move_owner_column(table, column, None, me, &transfer.to).await;
    };
    let mut moved = 0;
    for key in keys {
        let n = txn
            .move_owner_column(table, column, Some(key), me, &transfer.to)
            .await?;
        if n == 0 {
            return Err(refused(format!("{} has no row with key {key}", table.name())));
        }
        moved += n;
    }
    Ok(moved)
}

/// Moves rows of a rule table: records `moving_to` (the triggers refuse this region's writes
/// from now on) and queues each row for capture, where it becomes the next epoch.
async fn by_rule<T: AdminTxn>(
    txn: &mut T,
    table: &T::Table,
    rule: &OwnerRule,
    transfer: &Transfer,
    me: &str,
) -> Result<u64, StoreError> {
    let all = transfer.keys.is_none();
    let keys = match &transfer.keys {
        None => txn.row_keys(table, None).await?,
        Some(keys) => {
            let mut found = Vec::new();
            for key in keys {
                match txn.row_keys(table, Some(key)).await?.pop() {
                    Some(key) => found.push(key),
                    None => return Err(refused(format!("{} has no row with key {key}", table.name()))),
                }
            }
            found
        }
    };
    let mut moved = 0;
    for key in keys {
        let known = txn.owner(table, &key.to_bytes()).await?;
        let Some(owner) = movable(table.name(), (table.key(), &key), rule, known, me, all)? else {
            continue;
        };
        txn.store_owner(table, &key, &owner, Some(&transfer.to)).await?;
        txn.queue_capture(table, &key).await?;
        moved += 1;
    }
    Ok(moved)
}

/// The owner record of a row this region may move: `Ok(None)` to skip it under `--all`, or
/// why not (for a chosen key). `known`: the recorded owner and a transfer in progress.
fn movable(
    table: &str,
    (columns, key): (&[String], &Key),
    rule: &OwnerRule,
    known: Option<KnownOwner>,
    me: &str,
    all: bool,
) -> Result<Option<Owner>, StoreError> {
    if let Some(moving) = known.as_ref().and_then(|k| k.moving_to.as_ref()) {
        if all {
            return Ok(None);
        }
        return Err(refused(format!(
            "{table} {key} is being transferred to {moving} already; wait for the sidecar to capture it"
        )));
    }
    let owner = match known {
        Some(known) => known.owner,
        None => Owner {
            region: rule_owner(rule, columns, key).unwrap_or_else(|| "no region".into()),
            epoch: 0,
        },
    };
    if owner.region != me {
        if all {
            return Ok(None);
        }
        return Err(refused(format!(
            "{table} {key} is owned by {}, not by {me}: run the transfer on a node of {}",
            owner.region, owner.region
        )));
    }
    Ok(Some(owner))
}

/// The `AdminTxn` methods every dialect forwards, unchanged, to its `metadata` module.
/// Invoked inside each dialect's `impl AdminTxn`.
macro_rules! forward_admin_io {
    () => {
        async fn queue_entries(
            &mut self,
            id: Option<i64>,
        ) -> Result<Vec<(i64, String, Vec<u8>, String, i64)>, $crate::store::StoreError> {
            metadata::queue_entries(self.conn, id).await
        }

        async fn insert_resolution(
            &mut self,
            resolved: &$crate::store::admin::Resolved,
            row: &str,
        ) -> Result<(), $crate::store::StoreError> {
            metadata::insert_resolution(self.conn, resolved, row).await
        }

        async fn history(
            &mut self,
            recent: Option<i64>,
        ) -> Result<$crate::store::admin::History, $crate::store::StoreError> {
            metadata::history(self.conn, recent).await
        }

        async fn dead_letters(
            &mut self,
            id: Option<i64>,
        ) -> Result<Vec<$crate::store::admin::LetterRow>, $crate::store::StoreError> {
            metadata::dead_letters(self.conn, id).await
        }

        async fn act_on_letters(
            &mut self,
            ids: Option<&[i64]>,
            discard: bool,
        ) -> Result<u64, $crate::store::StoreError> {
            metadata::act_on_letters(self.conn, ids, discard).await
        }
    };
}

pub(crate) use forward_admin_io;
