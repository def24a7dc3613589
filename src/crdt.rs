//! CRDT column state: the data every CRDT column of a row carries in events and metadata,
//! built on the `crdts` crate. States merge commutatively, associatively and idempotently.
//!
//! - `counter`: a PN-counter; two regions each running `qty = qty - 1` end at -2 together.
//! - `set`: an observed-remove set, stored in the column as a JSON array (sorted).
//! - `register`: a last-writer-wins register per column, ordered by (HLC, node, content).
//!
//! This is the data layer: how a state reads, merges and renders. Which columns are CRDTs and
//! how a local write folds into its state is policy, in `resolve::crdt`.
use std::collections::{BTreeMap, BTreeSet};

use crdts::{CmRDT, CvRDT, LWWReg, Orswot, PNCounter};
use num_bigint::BigInt;
use serde::{Deserialize, Serialize};

use crate::event::{Hlc, Value};

/// The CRDT type of one column, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrdtType {
    Counter,
    Set,
    Register,
}

/// (HLC, node, canonical content): a total order of register writes.
pub type Marker = (u64, String, Vec<u8>);

/// The replicated state of one CRDT column of one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColumnState {
    Counter(PNCounter<String>),
    Set(Orswot<String, String>),
    Register(LWWReg<Value, Marker>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    #[error("column `{column}` is a {kind:?} column, but holds {value}; {hint}")]
    BadValue {
        column: String,
        kind: CrdtType,
        value: String,
        hint: &'static str,
    },
    #[error("column `{0}`: states of different CRDT types cannot merge (was the column's type changed?)")]
    TypeMismatch(String),
    #[error("column `{0}`: counter out of the 64-bit range")]
    Overflow(String),
    #[error("column `{0}`: corrupt state: {1}")]
    Corrupt(String, String),
}

/// The states of one row's CRDT columns, by column.
pub type States = BTreeMap<String, ColumnState>;
impl ColumnState {
    pub fn new(kind: CrdtType) -> Self {
        match kind {
            CrdtType::Counter => ColumnState::Counter(PNCounter::new()),
            CrdtType::Set => ColumnState::Set(Orswot::new()),
            CrdtType::Register => ColumnState::Register(LWWReg {
                val: Value::Null,
                marker: (0, String::new(), Vec::new()),
            }),
        }
    }

    pub fn kind(&self) -> CrdtType {
        match self {
            ColumnState::Counter(_) => CrdtType::Counter,
            ColumnState::Set(_) => CrdtType::Set,
            ColumnState::Register(_) => CrdtType::Register,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("CRDT states always serialize")
    }

    pub fn from_json(column: &str, text: &str) -> Result<Self, CrdtError> {
        serde_json::from_str(text).map_err(|e| CrdtError::Corrupt(column.to_owned(), e.to_string()))
    }

    /// Folds a value the local application wrote into this node's part of the state.
    pub fn observe_local(&mut self, column: &str, me: &str, written: &Value, hlc: Hlc) -> Result<(), CrdtError> {
        let bad = |kind, hint| CrdtError::BadValue {
            column: column.to_owned(),
            kind,
            value: written.to_string(),
            hint,
        };
        match self {
            ColumnState::Counter(counter) => {
                let target = match written {
                    Value::Integer(i) => BigInt::from(*i),
                    Value::Null => BigInt::from(0),
                    _ => return Err(bad(CrdtType::Counter, "write integers to counter columns")),
                };
                // Against the value the column shows, so writing back what it shows is no op.
                let delta = target - clamped(&counter.read());
                let steps = u64::try_from(delta.magnitude()).map_err(|_| CrdtError::Overflow(column.to_owned()))?;
                if steps > 0 {
                    let op = if delta.sign() == num_bigint::Sign::Minus {
                        counter.dec_many(me.to_owned(), steps)
                    } else {
                        counter.inc_many(me.to_owned(), steps)
                    };
                    counter.apply(op);
                }
            }
            ColumnState::Set(set) => {
                let wanted = set_members(written).ok_or_else(|| {
                    bad(
                        CrdtType::Set,
                        "write a JSON array (for example [\"a\",\"b\"]) to set columns",
                    )
                })?;
                let present: BTreeSet<String> = set.read().val.into_iter().collect();
                for member in wanted.difference(&present) {
                    let ctx = set.read_ctx().derive_add_ctx(me.to_owned());
                    let op = set.add(member.clone(), ctx);
                    set.apply(op);
                }
                for member in present.difference(&wanted) {
                    let ctx = set.contains(member).derive_rm_ctx();
                    let op = set.rm(member.clone(), ctx);
                    set.apply(op);
                }
            }
            ColumnState::Register(register) => {
                if register.val != *written {
                    let mut content = Vec::new();
                    written.encode(&mut content);
                    register.update(written.clone(), (hlc.0, me.to_owned(), content));
                }
            }
        }
        Ok(())
    }

    /// Merges another replica's state of the same column.
    pub fn merge(&mut self, column: &str, other: &ColumnState) -> Result<(), CrdtError> {
        match (self, other) {
            (ColumnState::Counter(a), ColumnState::Counter(b)) => a.merge(b.clone()),
            (ColumnState::Set(a), ColumnState::Set(b)) => a.merge(b.clone()),
            (ColumnState::Register(a), ColumnState::Register(b)) => a.merge(b.clone()),
            _ => return Err(CrdtError::TypeMismatch(column.to_owned())),
        }
        Ok(())
    }

    /// The column value this state stands for.
    pub fn materialize(&self, column: &str) -> Result<Value, CrdtError> {
        Ok(match self {
            ColumnState::Counter(counter) => {
                let exact = counter.read();
                if i64::try_from(&exact).is_err() {
                    tracing::warn!(column, value = %exact, "counter beyond the 64-bit range; the column shows the nearest bound");
                }
                Value::Integer(clamped(&exact))
            }
            ColumnState::Set(set) => {
                let members: BTreeSet<String> = set.read().val.into_iter().collect();
                let items: Vec<serde_json::Value> = members
                    .iter()
                    .map(|m| serde_json::from_str(m).unwrap_or_else(|_| m.clone().into()))
                    .collect();
                Value::Text(serde_json::Value::Array(items).to_string())
            }
            ColumnState::Register(register) => register.val.clone(),
        })
    }
}

/// A counter's exact value as the nearest 64-bit integer. Concurrent increments may add up
/// past `i64::MAX` (each region's write was in range): the state keeps the exact sum, so
/// every region converges on it, and the column shows the bound instead of refusing to
/// materialize (which would stop every apply and drain of the row).
fn clamped(exact: &BigInt) -> i64 {
    i64::try_from(exact).unwrap_or(if exact.sign() == num_bigint::Sign::Minus {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// A set column's members, each as its canonical JSON text; NULL is the empty set.
fn set_members(value: &Value) -> Option<BTreeSet<String>> {
    match value {
        Value::Null => Some(BTreeSet::new()),
        Value::Text(text) => match serde_json::from_str::<serde_json::Value>(text).ok()? {
            serde_json::Value::Array(items) => Some(items.iter().map(|i| i.to_string()).collect()),
            _ => None,
        },
        _ => None,
    }
}
