//! Replicated tables in a node config: each table's conflict strategy, its CRDT columns, and
//! how an ownership table finds each row's owner (owner column or owner rule).
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Topology, invalid};

/// How concurrent writes to a table are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Greatest (hlc, origin node) wins; exact ties by row content.
    Lww,
    /// Listed columns are CRDTs (`columns`), merged; the other columns follow LWW.
    Crdt,
    /// Concurrent versions are kept as siblings for a person to resolve (`weft conflicts`);
    /// the row shows the LWW winner meanwhile.
    Queue,
    /// Each row belongs to one region, named by `owner_column` or computed by `owner_rule`
    /// from the key; only that region writes it, and ownership moves by
    /// `weft ownership transfer`.
    Ownership,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub name: String,
    pub strategy: Strategy,
    /// `crdt` tables: the CRDT type of each CRDT column (`qty = "counter"`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub columns: std::collections::BTreeMap<String, crate::crdt::CrdtType>,
    /// `ownership` tables: the column holding each row's owner region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_column: Option<String>,
    /// `ownership` tables: the rule that finds a row's owner region from its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_rule: Option<OwnerRule>,
    /// What an event naming a column this region's table lacks does (a rolling
    /// `ALTER TABLE ... ADD COLUMN` that reached the sender first).
    #[serde(default, skip_serializing_if = "UnknownColumns::is_wait")]
    pub unknown_columns: UnknownColumns,
    /// Columns renamed in this region's table, new name to old name: values peers still
    /// send under the old name apply under the new one. SQLite cannot tell a rename from a
    /// column dropped and another added, so weft never guesses one there; PostgreSQL's
    /// renames are recognised without this.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub renamed_from: std::collections::BTreeMap<String, String>,
    /// The regions of the mesh, from the topology (not from the file): the owners a SQLite
    /// capture trigger can name when it refuses a write (it cannot quote a value it reads).
    #[serde(skip)]
    pub mesh_regions: Vec<String>,
}

/// What a receiver does with an event naming a column its table does not have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownColumns {
    /// The event waits (as a dead letter saying so) and applies by itself as soon as the
    /// column exists here: nothing is lost, the row lags until the migration reaches this
    /// region.
    #[default]
    Wait,
    /// The event applies at once without the unknown columns' values, with a warning per
    /// column and the `unknown_columns_dropped` counter: the row is current here, those
    /// values are not (and stay lost here even once the column is added).
    Drop,
}

impl UnknownColumns {
    fn is_wait(&self) -> bool {
        *self == UnknownColumns::Wait
    }
}

impl TableConfig {
    /// Checks the table's settings (entry `i` of `tables`) without IO: a plain name, CRDT
    /// columns only on `crdt` tables, exactly one owner source on `ownership` tables, and an
    /// owner rule naming regions of `topology`.
    pub fn validate(&self, i: usize, topology: &Topology, path: &Path) -> Result<(), ConfigError> {
        let ok = !self.name.is_empty()
            && !self.name.starts_with("_weft")
            && !self.name.starts_with("sqlite_")
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(invalid(
                path,
                format!("tables[{i}].name"),
                format!(
                    "`{}` must be a plain table name (letters, digits, '_'; not _weft*/sqlite_*)",
                    self.name
                ),
            ));
        }
        self.validate_columns(i, path)?;
        self.validate_owner(i, topology, path)
    }

    /// CRDT columns: required on `crdt` tables, refused elsewhere.
    fn validate_columns(&self, i: usize, path: &Path) -> Result<(), ConfigError> {
        match (self.strategy, self.columns.is_empty()) {
            (Strategy::Crdt, true) => {
                return Err(invalid(
                    path,
                    format!("tables[{i}].columns"),
                    "a crdt table lists its CRDT columns, for example columns = { qty = \"counter\" }",
                ));
            }
            (Strategy::Lww | Strategy::Queue | Strategy::Ownership, false) => {
                return Err(invalid(
                    path,
                    format!("tables[{i}].columns"),
                    "only applies to strategy = \"crdt\"",
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Exactly one owner source on `ownership` tables, none elsewhere; a rule names regions
    /// of the topology.
    fn validate_owner(&self, i: usize, topology: &Topology, path: &Path) -> Result<(), ConfigError> {
        match (self.strategy, &self.owner_column, &self.owner_rule) {
            (Strategy::Ownership, None, None) => {
                return Err(invalid(
                    path,
                    format!("tables[{i}].owner_column"),
                    "an ownership table finds each row's owner region: name the column holding it (owner_column = \"home\") or give a rule on the key (owner_rule = { prefix = \"-\" })",
                ));
            }
            (Strategy::Ownership, Some(_), Some(_)) => {
                return Err(invalid(
                    path,
                    format!("tables[{i}].owner_rule"),
                    "give owner_column or owner_rule, not both",
                ));
            }
            (Strategy::Ownership, _, _) | (_, None, None) => {}
            (_, column, _) => {
                let field = if column.is_some() { "owner_column" } else { "owner_rule" };
                return Err(invalid(
                    path,
                    format!("tables[{i}].{field}"),
                    "only applies to strategy = \"ownership\"",
                ));
            }
        }
        if let Some(rule) = &self.owner_rule {
            if let Some(problem) = rule.problem() {
                return Err(invalid(path, format!("tables[{i}].owner_rule"), problem));
            }
            for region in rule.named_regions() {
                if !topology.nodes.iter().any(|n| n.region == region) {
                    return Err(invalid(
                        path,
                        format!("tables[{i}].owner_rule"),
                        format!("`{region}` is not a region of the topology"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Finds a row's owner region from one primary-key column. Exactly one of `prefix` and
/// `ranges` is given. A key the rule maps to no region is writable nowhere. Transfers
/// (`weft ownership transfer`) override the rule for the rows they move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRule {
    /// The primary-key column the rule reads; default: the first key column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// Text keys: the text before the first `prefix` names the owner (`"eu-1042"` with
    /// `prefix = "-"` belongs to region `eu`), through `regions` when that is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// With `prefix`: key prefix → region (`{ e = "eu-west" }`). Prefixes not listed map to
    /// no region.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub regions: std::collections::BTreeMap<String, String>,
    /// Integer keys: inclusive ranges, each owned by a region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<OwnerRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRange {
    pub from: i64,
    pub to: i64,
    pub region: String,
}

impl OwnerRule {
    /// The regions this rule can name.
    pub fn named_regions(&self) -> Vec<&str> {
        if !self.ranges.is_empty() {
            self.ranges.iter().map(|r| r.region.as_str()).collect()
        } else {
            self.regions.values().map(String::as_str).collect()
        }
    }

    /// What is wrong with the rule, if anything (the regions are checked by the caller).
    pub fn problem(&self) -> Option<String> {
        match (&self.prefix, self.ranges.is_empty()) {
            (Some(_), false) | (None, true) => {
                return Some("give exactly one of prefix = \"-\" or ranges = [{ from, to, region }]".into());
            }
            (Some(p), true) if p.is_empty() => return Some("prefix must not be empty".into()),
            (None, false) if !self.regions.is_empty() => {
                return Some("regions applies to prefix rules; ranges name their region".into());
            }
            _ => {}
        }
        let mut ranges: Vec<&OwnerRange> = self.ranges.iter().collect();
        ranges.sort_by_key(|r| r.from);
        for r in &ranges {
            if r.from > r.to {
                return Some(format!("range {}..={} is empty; from must be <= to", r.from, r.to));
            }
        }
        for pair in ranges.windows(2) {
            if pair[1].from <= pair[0].to {
                return Some(format!(
                    "ranges {}..={} and {}..={} overlap; every key has one owner",
                    pair[0].from, pair[0].to, pair[1].from, pair[1].to
                ));
            }
        }
        None
    }
}

impl TableConfig {
    /// A last-writer-wins table.
    pub fn lww(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            strategy: Strategy::Lww,
            columns: Default::default(),
            owner_column: None,
            owner_rule: None,
            unknown_columns: UnknownColumns::Wait,
            renamed_from: Default::default(),
            mesh_regions: Vec::new(),
        }
    }

    /// A `queue` table: concurrent versions wait for a person.
    pub fn queue(name: &str) -> Self {
        Self {
            strategy: Strategy::Queue,
            ..Self::lww(name)
        }
    }

    /// A `crdt` table with these CRDT columns.
    pub fn crdt(name: &str, columns: &[(&str, crate::crdt::CrdtType)]) -> Self {
        Self {
            strategy: Strategy::Crdt,
            columns: columns.iter().map(|(c, t)| ((*c).to_owned(), *t)).collect(),
            ..Self::lww(name)
        }
    }

    /// An `ownership` table whose rows name their owner region in `column`.
    pub fn owned_by_column(name: &str, column: &str) -> Self {
        Self {
            strategy: Strategy::Ownership,
            owner_column: Some(column.to_owned()),
            ..Self::lww(name)
        }
    }

    /// An `ownership` table whose rows' owner follows `rule`.
    pub fn owned_by_rule(name: &str, rule: OwnerRule) -> Self {
        Self {
            strategy: Strategy::Ownership,
            owner_rule: Some(rule),
            ..Self::lww(name)
        }
    }
}
