//! Replicated tables in a node config: each table's conflict strategy, its CRDT columns, and
//! how an ownership table finds each row's owner (owner column or owner rule).
use serde::{Deserialize, Serialize};

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
    pub fn lww(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            strategy: Strategy::Lww,
            columns: Default::default(),
            owner_column: None,
            owner_rule: None,
        }
    }
}
