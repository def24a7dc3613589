//! A replicated table as a store sees it: columns and primary key read from the database
//! catalogue, the strategy settings of its config checked against them, and what the dialect
//! adds (prepared SQL on SQLite, column types on PostgreSQL) in `dialect`.
//!
//! The strategy checks are made here once for both stores, so the same mistake gets the same
//! message whatever the database; a dialect only says whether a column's type can hold what
//! a setting needs ([`ColumnTypes::fits`]).
use std::collections::BTreeMap;
use std::ops::Deref;

use crate::config::{OwnerRule, Strategy, TableConfig, UnknownColumns};
use crate::crdt::CrdtType;
use crate::event::Event;
use crate::store::StoreError;
use crate::store::engine::TableRules;

/// What a setting needs of a column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A CRDT counter: an integer type.
    Counter,
    /// A CRDT set (a JSON array) or an owner column: a text type.
    Text,
    /// The key column of a ranges owner rule: an integer type.
    IntegerKey,
    /// The key column of a prefix owner rule: a text type.
    TextKey,
}

/// The dialect's part of a table description.
pub trait ColumnTypes {
    /// `Err(what the column is)` if `column`'s declared type cannot hold what `need` says.
    fn fits(&self, _column: &str, _need: Need) -> Result<(), String> {
        Ok(())
    }
    /// Why the event does not fit this table in this database, if it does not.
    fn refuses(&self, _event: &Event) -> Option<String> {
        None
    }
    /// What an operator should know about table `table`'s key columns, if anything.
    fn key_advisory(&self, _table: &str, _key: &[String]) -> Option<String> {
        None
    }
}

#[derive(Debug, Clone)]
pub struct Table<D> {
    pub name: String,
    /// Replicated columns, in table order.
    pub columns: Vec<String>,
    /// Each replicated column's declared type, in `columns` order.
    pub declared: Vec<String>,
    /// Primary-key columns, in key order.
    pub key: Vec<String>,
    /// How concurrent writes to this table are resolved.
    pub strategy: Strategy,
    /// CRDT columns and their types (`crdt` tables only).
    pub crdt: BTreeMap<String, CrdtType>,
    /// The column naming each row's owner region (`ownership` tables only).
    pub owner_column: Option<String>,
    /// The rule finding each row's owner region from its key (`ownership` tables only).
    pub owner_rule: Option<OwnerRule>,
    /// The database assigns the key when an insert omits it (an autoincrement integer): two
    /// regions then give the same id to different rows.
    pub auto_key: bool,
    /// What events naming columns this table lacks do.
    pub unknown_columns: UnknownColumns,
    /// The mesh's regions, when the config knew them (`TableConfig::mesh_regions`).
    pub mesh_regions: Vec<String>,
    /// The database's identity of each column (PostgreSQL's `attnum`), or empty.
    pub column_ids: Vec<i64>,
    /// Renames the config declares (`TableConfig::renamed_from`).
    pub renamed_from: BTreeMap<String, String>,
    /// This region's dropped and renamed columns (`store::evolve`).
    pub history: crate::store::evolve::TableHistory,
    pub dialect: D,
}

/// The dialect's fields read as the table's own (`table.types` on PostgreSQL).
impl<D> Deref for Table<D> {
    type Target = D;
    fn deref(&self) -> &D {
        &self.dialect
    }
}

impl<D> Table<D> {
    /// A table as the catalogue describes it, before its config is applied (LWW).
    /// `columns` are (name, declared type) in table order.
    pub fn described(name: &str, columns: Vec<(String, String)>, key: Vec<String>, dialect: D) -> Self {
        let (columns, declared) = columns.into_iter().unzip();
        Self {
            name: name.to_owned(),
            columns,
            declared,
            key,
            strategy: Strategy::Lww,
            crdt: BTreeMap::new(),
            owner_column: None,
            owner_rule: None,
            auto_key: false,
            unknown_columns: UnknownColumns::Wait,
            mesh_regions: Vec::new(),
            column_ids: Vec::new(),
            renamed_from: BTreeMap::new(),
            history: Default::default(),
            dialect,
        }
    }

    /// What an operator should know about this table, if anything (logged at start).
    pub fn auto_key_advisory(&self) -> Option<String> {
        self.auto_key.then(|| {
            format!(
                "table `{}` is keyed by an integer the database assigns when an insert omits it: two regions \
                 inserting at once get the same id, and last-writer-wins keeps one of the two rows. Give rows \
                 keys that cannot collide across regions (a UUID, a region prefix, or per-region ranges)",
                self.name
            )
        })
    }
}

impl<D: ColumnTypes> Table<D> {
    /// Applies the table's strategy settings from its config, checking them against the
    /// table's columns and their types.
    pub fn configure(&mut self, config: &TableConfig) -> Result<(), StoreError> {
        let problem = |message: String| StoreError::Table {
            table: config.name.clone(),
            message,
        };
        self.strategy = config.strategy;
        self.unknown_columns = config.unknown_columns;
        self.mesh_regions = config.mesh_regions.clone();
        self.renamed_from = config.renamed_from.clone();
        for (column, kind) in &config.columns {
            let what = if !self.columns.contains(column) {
                Some("does not exist")
            } else if self.key.contains(column) {
                Some("is part of the primary key")
            } else {
                None
            };
            if let Some(what) = what {
                return Err(problem(format!(
                    "CRDT column `{column}` {what}; list existing non-key columns under columns"
                )));
            }
            let need = match kind {
                CrdtType::Counter => Need::Counter,
                CrdtType::Set => Need::Text,
                CrdtType::Register => continue,
            };
            self.dialect.fits(column, need).map_err(|is| {
                problem(format!(
                    "CRDT column `{column}` is {is}; a {kind:?} column needs {}",
                    match kind {
                        CrdtType::Counter => "an integer type (smallint, integer, bigint)",
                        _ => "a text type (text, varchar; a set is stored as a JSON array)",
                    }
                ))
            })?;
        }
        self.crdt = config.columns.clone();
        if let Some(column) = &config.owner_column {
            let text = self.dialect.fits(column, Need::Text);
            if !self.columns.contains(column) || self.key.contains(column) || text.is_err() {
                return Err(problem(format!(
                    "owner column `{column}` must be an existing non-key text column"
                )));
            }
            self.owner_column = Some(column.clone());
        }
        if let Some(rule) = &config.owner_rule {
            let column = rule.column.clone().unwrap_or_else(|| self.key[0].clone());
            if !self.key.contains(&column) {
                return Err(problem(format!(
                    "owner_rule column `{column}` is not a primary-key column (the key is {}); a rule reads the key",
                    self.key.join(", ")
                )));
            }
            let (need, what) = match rule.prefix {
                Some(_) => (Need::TextKey, "a prefix rule needs a text key column"),
                None => (Need::IntegerKey, "a ranges rule needs an integer key column"),
            };
            self.dialect
                .fits(&column, need)
                .map_err(|is| problem(format!("owner_rule column `{column}` is {is}; {what}")))?;
            self.owner_rule = Some(rule.clone());
        }
        Ok(())
    }
}

impl<D: ColumnTypes> TableRules for Table<D> {
    fn name(&self) -> &str {
        &self.name
    }
    fn columns(&self) -> &[String] {
        &self.columns
    }
    fn key(&self) -> &[String] {
        &self.key
    }
    fn strategy(&self) -> Strategy {
        self.strategy
    }
    fn crdt(&self) -> &BTreeMap<String, CrdtType> {
        &self.crdt
    }
    fn owner_column(&self) -> Option<&String> {
        self.owner_column.as_ref()
    }
    fn owner_rule(&self) -> Option<&OwnerRule> {
        self.owner_rule.as_ref()
    }
    fn refuses(&self, event: &Event) -> Option<String> {
        self.dialect.refuses(event)
    }
    fn unknown_columns(&self) -> UnknownColumns {
        self.unknown_columns
    }
    fn history(&self) -> &crate::store::evolve::TableHistory {
        &self.history
    }
    fn set_history(&mut self, history: crate::store::evolve::TableHistory) {
        self.history = history;
    }
    fn typed_columns(&self) -> Vec<(String, String)> {
        self.columns
            .iter()
            .cloned()
            .zip(self.declared.iter().cloned())
            .collect()
    }
    fn column_ids(&self) -> Vec<i64> {
        self.column_ids.clone()
    }
    fn renamed_from(&self) -> &BTreeMap<String, String> {
        &self.renamed_from
    }
    fn advisories(&self) -> Vec<String> {
        let keys = self.dialect.key_advisory(&self.name, &self.key);
        self.auto_key_advisory().into_iter().chain(keys).collect()
    }
}

/// Says what became of the rows a table held when weft started capturing it: `rows` were
/// queued as this region's writes (replicated like any, with versions from this node). When
/// weft had captured the table before (`recaptured`), it had lost its capture triggers
/// (rebuilt or recreated): it is captured again whole, `deleted` missing rows as deletions.
pub fn adopted<D>(table: &Table<D>, recaptured: bool, rows: u64, deleted: u64) {
    if recaptured {
        tracing::warn!(
            table = %table.name,
            rows,
            deleted,
            "the table's capture triggers were gone (the table was rebuilt or recreated); capturing it again \
             whole, so that writes made meanwhile replicate: its rows go out again as this region's writes, \
             stamped just after the version this region had of each (so they lose to any later write it had \
             not seen yet), and rows of this region it no longer has as deletions"
        );
        return;
    }
    if rows == 0 {
        return;
    }
    tracing::info!(
        table = %table.name,
        rows,
        "adopting rows that existed before weft captured this table: they replicate as this region's writes"
    );
    if !table.crdt.is_empty() {
        tracing::warn!(
            table = %table.name,
            "adopted rows of a crdt table add their counter values to those other regions adopt for the same keys; \
             adopt such a table's rows in one region only"
        );
    }
}

/// Says that `rows` rows another region owns are missing from a re-captured table: they are
/// not this region's to delete, so they are left out of the re-capture (peers refuse a
/// deletion by a region that does not own the row, and refused the whole batch with it).
pub fn left_foreign(table: &str, rows: u64) {
    if rows > 0 {
        tracing::warn!(
            table,
            rows,
            "rows owned by another region are missing from this region's rebuilt or recreated table; they are \
             not this region's to delete, so no deletion is sent for them and other regions keep them: \
             `weft audit --repair` brings them back here"
        );
    }
}
