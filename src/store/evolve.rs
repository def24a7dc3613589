//! Schema evolution of replicated tables while the sidecar runs.
//!
//! Every drain and every apply opens its write transaction by comparing the database's schema
//! stamp (`Backend::schema_stamp`: SQLite's `schema_version`, a digest of PostgreSQL's
//! catalogue for the replicated tables) with the one the store last saw. On a change, still
//! inside that transaction and so before any outbox row is read, the store installs again:
//! table descriptions are read afresh and capture triggers recreated where they are missing or
//! differ. A table whose triggers were gone (SQLite's table-rebuild procedure drops them with
//! the old table; so does a PostgreSQL `DROP TABLE`/`RENAME`) is re-captured whole: every row
//! it holds and every key weft knows as live goes through the outbox again, so a write the
//! application made while capture was missing reaches the other regions. Dead letters are made
//! due at once, since their cause may have gone with the change.
//!
//! What changed is worked out against the columns recorded at the last check (the node-table
//! entry [`HISTORY_KEY`], so changes made while the sidecar was down count too), and each
//! change is logged:
//! - an added column is captured from the next drain and applied from the next apply;
//! - a dropped column is remembered: values peers still send for it are left out, quietly,
//!   because this region chose to drop them;
//! - a renamed column is remembered too: values peers still send under the old name are
//!   applied under the new one. A rename is never guessed from names, places or types (a
//!   column dropped and another of the same type added in its place looks the same): it is
//!   proven by the database (PostgreSQL keeps a renamed column's `attnum`; a drop and an add
//!   give the new column a new one) or declared in the table's config (`renamed_from`);
//!   otherwise it is a drop plus an add;
//! - a changed type is logged; values travel as they did and the database converts or refuses
//!   them (a refusal is a dead letter with the database's reason, retried after the next
//!   schema change).
//!
//! An event naming a column this region's table does not have is handled by the table's
//! `unknown_columns` setting ([`UnknownColumns`]): it waits as a dead letter and applies by
//! itself once the column is here (the default), or applies without those values, counted.
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::UnknownColumns;
use crate::event::{Event, Op, Row};
use crate::store::StoreError;
use crate::store::backend::Txn;
use crate::store::engine::TableRules;

/// The node-table entry holding every replicated table's [`TableHistory`], as JSON.
pub const HISTORY_KEY: &str = "schema_history";

/// What this region remembers of a table's columns across schema changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableHistory {
    /// Replicated columns and their declared types at the last check, in table order.
    pub columns: Vec<(String, String)>,
    /// The database's identity of each of `columns` (PostgreSQL's `attnum`), where the
    /// dialect has one: it survives a rename and not a drop.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<i64>,
    /// Columns this region's table had and dropped: peers' values for them are left out.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub dropped: BTreeSet<String>,
    /// Renamed columns, old name to current name: peers' values under the old name are
    /// applied under the current one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub renamed: BTreeMap<String, String>,
}

/// The recorded history of every table, keyed by table name.
pub type Histories = BTreeMap<String, TableHistory>;

/// How a table's columns changed between two checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<String>,
    pub dropped: Vec<String>,
    /// (old name, new name).
    pub renamed: Vec<(String, String)>,
    /// (column, old type, new type).
    pub retyped: Vec<(String, String, String)>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.dropped.is_empty() && self.renamed.is_empty() && self.retyped.is_empty()
    }
}

/// A table's columns at one check: names with declared types in table order, and the
/// database's identity of each where it has one (else empty).
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    pub typed: &'a [(String, String)],
    pub ids: &'a [i64],
}

/// How `old` became `new`. A column gone while another appeared is a rename only when that is
/// proven (both checks carry the database's column identities, and the two share one) or
/// `declared` (new name to old name, the table's `renamed_from`); everything else is a drop
/// plus an add.
pub fn diff(old: Columns, new: Columns, declared: &BTreeMap<String, String>) -> Change {
    let old_names: BTreeSet<&str> = old.typed.iter().map(|(c, _)| c.as_str()).collect();
    let new_names: BTreeSet<&str> = new.typed.iter().map(|(c, _)| c.as_str()).collect();
    let gone: Vec<&str> = old_names.difference(&new_names).copied().collect();
    let came: Vec<&str> = new_names.difference(&old_names).copied().collect();
    let id_of = |columns: Columns, name: &str| {
        let at = columns.typed.iter().position(|(c, _)| c == name)?;
        (columns.ids.len() == columns.typed.len()).then(|| columns.ids[at])
    };
    let mut change = Change::default();
    for now in &came {
        let proven = gone
            .iter()
            .find(|was| id_of(old, was).is_some_and(|id| Some(id) == id_of(new, now)));
        let said = declared.get(*now).map(String::as_str).filter(|was| gone.contains(was));
        if let Some(was) = proven.copied().or(said) {
            change.renamed.push(((*was).to_owned(), (*now).to_owned()));
        }
    }
    let renamed_from: BTreeSet<&str> = change.renamed.iter().map(|(o, _)| o.as_str()).collect();
    let renamed_to: BTreeSet<&str> = change.renamed.iter().map(|(_, n)| n.as_str()).collect();
    change.dropped = old
        .typed
        .iter()
        .map(|(c, _)| c)
        .filter(|c| !new_names.contains(c.as_str()) && !renamed_from.contains(c.as_str()))
        .cloned()
        .collect();
    change.added = new
        .typed
        .iter()
        .map(|(c, _)| c)
        .filter(|c| !old_names.contains(c.as_str()) && !renamed_to.contains(c.as_str()))
        .cloned()
        .collect();
    for (column, now_type) in new.typed {
        let was_type = old
            .typed
            .iter()
            .find(|(c, _)| c == column)
            .or_else(|| {
                let (was, _) = change.renamed.iter().find(|(_, n)| n == column)?;
                old.typed.iter().find(|(c, _)| c == was)
            })
            .map(|(_, t)| t);
        if let Some(was_type) = was_type.filter(|t| *t != now_type) {
            change
                .retyped
                .push((column.clone(), was_type.clone(), now_type.clone()));
        }
    }
    change
}

impl TableHistory {
    /// The history after the table's columns became `now` (with the database's column
    /// identities `ids`, or none), and what changed; `declared` are the table's configured
    /// renames (new name to old name). The first check of a table (no recorded columns)
    /// changes nothing.
    pub fn advance(
        &self,
        now: Vec<(String, String)>,
        ids: Vec<i64>,
        declared: &BTreeMap<String, String>,
    ) -> (TableHistory, Change) {
        let change = if self.columns.is_empty() {
            Change::default()
        } else {
            let old = Columns {
                typed: &self.columns,
                ids: &self.ids,
            };
            diff(old, Columns { typed: &now, ids: &ids }, declared)
        };
        let mut next = TableHistory {
            columns: now,
            ids,
            dropped: self.dropped.clone(),
            renamed: self.renamed.clone(),
        };
        for (old, new) in &change.renamed {
            for target in next.renamed.values_mut() {
                if target == old {
                    target.clone_from(new);
                }
            }
            next.renamed.insert(old.clone(), new.clone());
        }
        next.dropped.extend(change.dropped.iter().cloned());
        // A name the table has (again) is no longer dropped or an alias.
        for (column, _) in &next.columns {
            next.dropped.remove(column);
            next.renamed.remove(column);
        }
        // A declared rename holds whenever the old name is not a column here and the new one
        // is, also when the table was created with the new name.
        for (new, old) in declared {
            let has = |c: &str| next.columns.iter().any(|(name, _)| name == c);
            if has(new) && !has(old) {
                next.dropped.remove(old);
                next.renamed.insert(old.clone(), new.clone());
            }
        }
        next.renamed
            .retain(|_, target| next.columns.iter().any(|(c, _)| c == target));
        (next, change)
    }
}

/// Advances the recorded history of each of `tables` (just described) to its columns now,
/// logs what changed, records the histories and gives each table its own. Returns whether
/// any table changed since the last check.
pub(crate) async fn record<T: Txn>(txn: &mut T, tables: &mut [T::Table]) -> Result<bool, StoreError> {
    let mut histories: Histories = match txn.node_text(HISTORY_KEY).await? {
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| StoreError::Corrupt(format!("the recorded schema history does not parse: {e}")))?,
        None => Histories::new(),
    };
    let mut changed = false;
    for table in tables.iter_mut() {
        let recorded = histories.get(table.name()).cloned().unwrap_or_default();
        let (next, change) = recorded.advance(table.typed_columns(), table.column_ids(), table.renamed_from());
        log_change(table.name(), &change);
        changed |= !change.is_empty();
        table.set_history(next.clone());
        histories.insert(table.name().to_owned(), next);
    }
    let json = serde_json::to_string(&histories).expect("histories serialize");
    txn.set_node_text(HISTORY_KEY, Some(&json)).await?;
    Ok(changed)
}

fn log_change(table: &str, change: &Change) {
    for column in &change.added {
        tracing::info!(table, column, "column added: captured and applied from now on");
    }
    for column in &change.dropped {
        tracing::warn!(
            table,
            column,
            "column dropped: this region no longer sends it, and values peers still send for it are left out here"
        );
    }
    for (old, new) in &change.renamed {
        tracing::warn!(
            table,
            column = %old,
            renamed_to = %new,
            "column renamed: values peers send under the old name are applied under the new one; regions that \
             have not renamed it yet treat the new name as an unknown column (unknown_columns) until they do"
        );
    }
    for (column, was, now) in &change.retyped {
        tracing::warn!(
            table,
            column,
            was = %was,
            now = %now,
            "column type changed: values travel as before; one the database cannot convert is dead-lettered \
             with its reason"
        );
    }
}

/// What the applier makes of an event for a table: renamed columns under their current
/// names, dropped ones left out, and unknown ones left out under `unknown_columns = "drop"`
/// (their names returned, for the warning and the counter). Under `"wait"` unknown columns
/// stay, and the shape check dead-letters the event until the column exists.
pub fn fit<'e, T: TableRules>(table: &T, event: &'e Event) -> (Cow<'e, Event>, Vec<String>) {
    let Op::Upsert(row) = &event.op else {
        return (Cow::Borrowed(event), Vec::new());
    };
    let columns = table.columns();
    let history = table.history();
    let known = |c: &String| columns.contains(c);
    if row.0.iter().all(|(c, _)| known(c)) && event.crdt.iter().all(|(c, _)| known(c)) {
        return (Cow::Borrowed(event), Vec::new());
    }
    let drop_unknown = table.unknown_columns() == UnknownColumns::Drop;
    let mut left_out = Vec::new();
    let mut place = |column: &String, has: &dyn Fn(&str) -> bool| -> Option<String> {
        if known(column) {
            return Some(column.clone());
        }
        if let Some(now) = history.renamed.get(column)
            && known(now)
            && !has(now)
        {
            return Some(now.clone());
        }
        if history.dropped.contains(column) {
            return None;
        }
        if drop_unknown {
            left_out.push(column.clone());
            return None;
        }
        Some(column.clone())
    };
    let mut out = event.clone();
    let has_in_row = |c: &str| row.0.iter().any(|(name, _)| name == c);
    out.op = Op::Upsert(Row(row
        .0
        .iter()
        .filter_map(|(c, v)| place(c, &has_in_row).map(|c| (c, v.clone())))
        .collect()));
    let has_state = |c: &str| event.crdt.iter().any(|(name, _)| name == c);
    out.crdt = event
        .crdt
        .iter()
        .filter_map(|(c, s)| place(c, &has_state).map(|c| (c, s.clone())))
        .collect();
    left_out.sort();
    left_out.dedup();
    (Cow::Owned(out), left_out)
}

/// [`fit`] over a run, with the warnings; adds the values left out to `left_out`.
pub fn fit_all<'e, T: TableRules>(
    tables: &crate::store::backend::Tables<T>,
    events: &[&'e Event],
    left_out: &mut u64,
) -> Vec<Cow<'e, Event>> {
    events
        .iter()
        .map(|event| match tables.get(&event.table) {
            Some(table) => {
                let (fitted, columns) = fit(table.as_ref(), event);
                warn_left_out(&event.table, &columns);
                *left_out += columns.len() as u64;
                fitted
            }
            None => Cow::Borrowed(*event),
        })
        .collect()
}

/// Warns, once per table and column in this process, that values of `columns` were left out
/// of applied events (`unknown_columns = "drop"`); the counter counts every value.
pub fn warn_left_out(table: &str, columns: &[String]) {
    static WARNED: std::sync::Mutex<BTreeSet<(String, String)>> = std::sync::Mutex::new(BTreeSet::new());
    for column in columns {
        let first = WARNED
            .lock()
            .expect("warned lock")
            .insert((table.to_owned(), column.clone()));
        if first {
            tracing::warn!(
                table,
                column,
                "events name a column this region's table lacks; applying them without its values \
                 (unknown_columns = \"drop\"; counted in unknown_columns_dropped). Add the column here to \
                 receive them from the next write on"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[(&str, &str)]) -> Vec<(String, String)> {
        names.iter().map(|(c, t)| ((*c).to_owned(), (*t).to_owned())).collect()
    }

    fn plain(typed: &[(String, String)]) -> Columns<'_> {
        Columns { typed, ids: &[] }
    }

    fn none() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    #[test]
    fn an_appended_column_is_added() {
        let change = diff(
            plain(&cols(&[("id", "INTEGER"), ("v", "TEXT")])),
            plain(&cols(&[("id", "INTEGER"), ("v", "TEXT"), ("extra", "TEXT")])),
            &none(),
        );
        assert_eq!(change.added, vec!["extra".to_string()]);
        assert!(change.dropped.is_empty() && change.renamed.is_empty());
    }

    #[test]
    fn a_rename_is_proven_by_the_column_s_identity_or_declared_never_guessed() {
        let old = cols(&[("id", "INTEGER"), ("v", "TEXT"), ("w", "INTEGER")]);
        let new = cols(&[("id", "INTEGER"), ("value", "TEXT"), ("w", "INTEGER")]);
        // Same place, same type, a new name: without proof, a drop and an add.
        let change = diff(plain(&old), plain(&new), &none());
        assert!(change.renamed.is_empty(), "{change:?}");
        assert_eq!(
            (change.dropped.clone(), change.added.clone()),
            (vec!["v".into()], vec!["value".into()])
        );
        // PostgreSQL keeps a renamed column's attnum.
        let ids = [1, 2, 3];
        let proven = diff(
            Columns { typed: &old, ids: &ids },
            Columns { typed: &new, ids: &ids },
            &none(),
        );
        assert_eq!(proven.renamed, vec![("v".to_string(), "value".to_string())]);
        assert!(proven.added.is_empty() && proven.dropped.is_empty());
        // A drop and an add give the new column a new one.
        let readded = diff(
            Columns { typed: &old, ids: &ids },
            Columns {
                typed: &new,
                ids: &[1, 4, 3],
            },
            &none(),
        );
        assert!(readded.renamed.is_empty());
        // Declared in the config.
        let declared = [("value".to_owned(), "v".to_owned())].into();
        let change = diff(plain(&old), plain(&new), &declared);
        assert_eq!(change.renamed, vec![("v".to_string(), "value".to_string())]);
        // A declaration naming a column that did not go is no rename.
        let declared = [("value".to_owned(), "w".to_owned())].into();
        assert!(diff(plain(&old), plain(&new), &declared).renamed.is_empty());
    }

    #[test]
    fn a_drop_and_an_add_are_not_a_rename() {
        let change = diff(
            plain(&cols(&[("id", "INTEGER"), ("v", "TEXT"), ("w", "INTEGER")])),
            plain(&cols(&[("id", "INTEGER"), ("w", "INTEGER"), ("x", "TEXT")])),
            &none(),
        );
        assert_eq!(change.dropped, vec!["v".to_string()]);
        assert_eq!(change.added, vec!["x".to_string()]);
        assert!(change.renamed.is_empty());
    }

    #[test]
    fn history_chains_renames_and_forgets_names_that_come_back() {
        let start = TableHistory {
            columns: cols(&[("id", "INTEGER"), ("a", "TEXT"), ("gone", "TEXT")]),
            ids: vec![1, 2, 3],
            ..TableHistory::default()
        };
        let (h, change) = start.advance(cols(&[("id", "INTEGER"), ("a", "TEXT")]), vec![1, 2], &none());
        assert_eq!(change.dropped, vec!["gone".to_string()]);
        assert!(change.renamed.is_empty() && change.added.is_empty(), "{change:?}");
        assert!(h.dropped.contains("gone"));
        // a -> b -> c: both old names lead to the name the table has now.
        let (h, change) = h.advance(cols(&[("id", "INTEGER"), ("b", "TEXT")]), vec![1, 2], &none());
        assert_eq!(change.renamed, vec![("a".to_string(), "b".to_string())]);
        let (h, _) = h.advance(cols(&[("id", "INTEGER"), ("c", "TEXT")]), vec![1, 2], &none());
        assert_eq!(h.renamed.get("a").map(String::as_str), Some("c"));
        assert_eq!(h.renamed.get("b").map(String::as_str), Some("c"));
        // A column added back under a dropped name is live again.
        let (h, change) = h.advance(
            cols(&[("id", "INTEGER"), ("c", "TEXT"), ("gone", "TEXT")]),
            vec![1, 2, 4],
            &none(),
        );
        assert_eq!(change.added, vec!["gone".to_string()]);
        assert!(!h.dropped.contains("gone"), "a column added back is live again");
        assert_eq!(h.renamed.len(), 2);
        // A declared rename holds even for a table created with the new name.
        let (h, _) = TableHistory::default().advance(
            cols(&[("id", "INTEGER"), ("email", "TEXT")]),
            Vec::new(),
            &[("email".to_owned(), "mail".to_owned())].into(),
        );
        assert_eq!(h.renamed.get("mail").map(String::as_str), Some("email"));
    }

    #[test]
    fn the_first_check_changes_nothing() {
        let (h, change) = TableHistory::default().advance(cols(&[("id", "INTEGER")]), Vec::new(), &none());
        assert!(change.is_empty());
        assert_eq!(h.columns.len(), 1);
    }
}
