//! Conflict strategies: pure functions from the concurrent versions of a row to the winner.
//!
//! Every strategy's result depends only on the set of versions, never on arrival order, so
//! all replicas converge. A conflict is a value here, never an error.
pub mod crdt;
pub mod lww;
pub mod ownership;

/// Which side of a conflict becomes the visible row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    Local,
    Remote,
}
