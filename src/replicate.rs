//! The apply decision: what a replica does with one admitted remote event for one row.
//!
//! Pure: given the row's local version (or none) and the event, returns whether the event is
//! stale, fast-forwards the row, or conflicts, and the row version to store afterwards. Version
//! vectors decide causality; the table's strategy decides concurrent writes; the stored
//! vector after a conflict is the pointwise max, so any later write that has seen both sides
//! dominates the result. Stores call this and only perform the IO it asks for.
use crate::config::Strategy;
use crate::event::{Event, Hlc, NodeId};
use crate::resolve::{Winner, lww};
use crate::version::{Causality, VersionVector};

/// What a replica knows of a row's current version (including tombstones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowVersion {
    pub version: VersionVector,
    /// Stamp of the write whose content is visible (the winner so far).
    pub hlc: Hlc,
    pub origin: NodeId,
    pub deleted: bool,
    /// The digest of the image weft last wrote or captured for the row
    /// (`store::checksum::recorded_image`), if that image was the whole row as the table
    /// holds it; `None` if unknown (a tombstone, a partial image, merged CRDT columns, a row
    /// recorded before digests were kept). Not part of the version: the store sets it when
    /// it writes the row, and a version that keeps the local row keeps its digest.
    pub image: Option<i64>,
}

impl RowVersion {
    /// The event's version, its image's digest unknown (the store records it, if it knows).
    pub fn of_event(event: &Event) -> Self {
        Self {
            version: event.version.clone(),
            hlc: event.hlc,
            origin: event.origin.clone(),
            deleted: event.op.is_delete(),
            image: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The event is already included in the local version: nothing to do.
    Stale,
    /// The event descends from the local version: write it and store `next`.
    FastForward { next: RowVersion },
    /// Concurrent versions: `winner` is visible afterwards; store `next` either way.
    Conflict { winner: Winner, next: RowVersion },
    /// Exact (hlc, origin) tie: call again with the local row's canonical content.
    NeedsLocalContent,
}

/// Decides one event. `local_content` is the canonical content of the local row
/// (`Op::content_bytes`) and is only needed after `NeedsLocalContent`.
pub fn decide(strategy: Strategy, local: Option<&RowVersion>, event: &Event, local_content: Option<&[u8]>) -> Decision {
    let Some(local) = local else {
        return Decision::FastForward {
            next: RowVersion::of_event(event),
        };
    };
    match event.version.compare(&local.version) {
        Causality::Equal | Causality::Dominated => Decision::Stale,
        Causality::Dominates => Decision::FastForward {
            next: RowVersion::of_event(event),
        },
        Causality::Concurrent => {
            let winner = match strategy {
                // CRDT tables merge their CRDT columns (see the store); the rest of the row
                // follows LWW.
                Strategy::Lww | Strategy::Crdt | Strategy::Queue | Strategy::Ownership => {
                    let stamp_local = lww::Stamp {
                        hlc: local.hlc,
                        origin: &local.origin,
                    };
                    let stamp_remote = lww::Stamp {
                        hlc: event.hlc,
                        origin: &event.origin,
                    };
                    match lww::pick(stamp_local, stamp_remote) {
                        Some(winner) => winner,
                        None => match local_content {
                            Some(content) => lww::tie_break(content, &event.op.content_bytes()),
                            None => return Decision::NeedsLocalContent,
                        },
                    }
                }
            };
            let version = local.version.merged(&event.version);
            let next = match winner {
                Winner::Remote => RowVersion {
                    version,
                    ..RowVersion::of_event(event)
                },
                Winner::Local => RowVersion {
                    version,
                    ..local.clone()
                },
            };
            Decision::Conflict { winner, next }
        }
    }
}
