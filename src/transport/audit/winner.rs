//! The winner of a row the audit found differing (`decide`): a pure function of what each
//! node holds, so every auditor picks the same one (the rules are in `transport::audit`'s
//! module doc).
use std::collections::BTreeMap;

use super::Winner;
use crate::event::{NodeId, Op};
use crate::store::checksum::{AuditRow, Sum};
use crate::version::{Causality, VersionVector};

/// The winning version of a row the nodes hold differently (see the module doc). A node
/// that has no metadata for the row counts as holding it deleted at its purge floor
/// (`floors`, one per node): it may have purged the row's tombstone.
pub fn decide(rows: &[(NodeId, AuditRow)], floors: &[VersionVector], prefer: Option<&str>) -> Result<Winner, String> {
    let implied: BTreeMap<&str, &VersionVector> = rows.iter().map(|(n, _)| n.as_str()).zip(floors).collect();
    let empty = VersionVector::new();
    let vector_of = |node: &str, row: &AuditRow| match &row.version {
        Some(v) => v.version.clone(),
        None => implied.get(node).copied().unwrap_or(&empty).clone(),
    };
    let mut floor = VersionVector::new();
    for (node, row) in rows {
        floor.merge(&vector_of(node, row));
    }
    let consistent: Vec<&(NodeId, AuditRow)> = rows.iter().filter(|(_, r)| r.consistent()).collect();
    let pool = match consistent.is_empty() {
        true => rows.iter().collect(),
        false => consistent,
    };
    let newest: Vec<&(NodeId, AuditRow)> = pool
        .iter()
        .filter(|(n, r)| {
            !pool
                .iter()
                .any(|(m, other)| vector_of(m, other).compare(&vector_of(n, r)) == Causality::Dominates)
        })
        .copied()
        .collect();
    let behind_back = pool.len() < rows.len();
    let mut images: BTreeMap<Sum, Vec<&(NodeId, AuditRow)>> = BTreeMap::new();
    for entry in &newest {
        images
            .entry(crate::store::checksum::image_part(
                b"",
                entry.1.image.as_ref().unwrap_or(&crate::event::Row(Vec::new())),
            ))
            .or_default()
            .push(entry);
    }
    let same_version = newest
        .iter()
        .all(|(n, r)| vector_of(n, r).compare(&vector_of(&newest[0].0, &newest[0].1)) == Causality::Equal);
    let (chosen, why) = match (images.len(), same_version) {
        (1, _) => {
            let why = match behind_back {
                true => "the other nodes' rows disagree with their own metadata: changed behind weft's back",
                false => "it holds the newest version",
            };
            (newest[0], why.to_owned())
        }
        (_, true) => by_majority(&newest, &images, prefer)?,
        (_, false) => {
            let greatest = newest
                .iter()
                .max_by_key(|(_, r)| r.version.as_ref().map(|v| (v.hlc, v.origin.clone())))
                .expect("not empty");
            (
                *greatest,
                "concurrent versions: the greatest (hlc, origin) wins, as under lww".to_owned(),
            )
        }
    };
    let op = match &chosen.1.image {
        Some(row) => Op::Upsert(row.clone()),
        None => Op::Delete,
    };
    Ok(Winner {
        node: chosen.0.clone(),
        op,
        floor,
        why,
    })
}

/// One version holding different rows: the row most nodes hold, else `--prefer`'s.
fn by_majority<'r>(
    newest: &[&'r (NodeId, AuditRow)],
    images: &BTreeMap<Sum, Vec<&'r (NodeId, AuditRow)>>,
    prefer: Option<&str>,
) -> Result<(&'r (NodeId, AuditRow), String), String> {
    let mut groups: Vec<_> = images.values().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
    if groups[0].len() > groups[1].len() {
        return Ok((
            groups[0][0],
            "the same version holds different rows, and most nodes hold this one".to_owned(),
        ));
    }
    match prefer.and_then(|p| newest.iter().find(|(n, _)| n == p)) {
        Some(entry) => Ok((
            entry,
            "the same version holds different rows; --prefer chose this node".to_owned(),
        )),
        None => Err(format!(
            "the same version holds different rows and no row has a majority: choose with --prefer <node> (one of {})",
            newest.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Hlc, Row, Value};
    use crate::replicate::RowVersion;

    fn row(counts: &[(&str, u64)], hlc: u64, value: Option<&str>) -> AuditRow {
        let mut version = VersionVector::new();
        for (node, count) in counts {
            version.set(node, *count);
        }
        AuditRow {
            key: vec![1],
            version: Some(RowVersion {
                version,
                hlc: Hlc(hlc),
                origin: "a".into(),
                deleted: value.is_none(),
                image: None,
            }),
            image: value.map(|v| Row(vec![("v".into(), Value::Text(v.into()))])),
            waiting: false,
            edited: false,
        }
    }

    fn nodes(rows: Vec<AuditRow>) -> Vec<(NodeId, AuditRow)> {
        ["a", "b", "c"].iter().map(|n| (*n).to_owned()).zip(rows).collect()
    }

    #[test]
    fn a_row_that_disagrees_with_its_metadata_loses() {
        let mut vanished = row(&[("a", 1)], 1, Some("x"));
        vanished.image = None;
        let winner = decide(&nodes(vec![row(&[("a", 1)], 1, Some("x")), vanished]), &[], None).unwrap();
        assert_eq!(winner.node, "a");
        assert!(matches!(winner.op, Op::Upsert(_)));
    }

    #[test]
    fn a_row_edited_in_place_loses_to_the_recorded_one_without_a_majority() {
        let v = &[("a", 1)];
        let mut edited = row(v, 1, Some("y"));
        edited.edited = true;
        let two = nodes(vec![row(v, 1, Some("x")), edited.clone()]);
        let winner = decide(&two, &[], None).unwrap();
        assert_eq!(winner.node, "a");
        assert!(winner.why.contains("behind weft's back"), "{}", winner.why);
        let mut other = row(v, 1, Some("z"));
        other.edited = true;
        let winner = decide(&nodes(vec![edited, other, row(v, 1, Some("x"))]), &[], None).unwrap();
        assert_eq!(winner.node, "c");
    }

    #[test]
    fn the_newest_version_wins_and_the_floor_covers_every_version() {
        let winner = decide(
            &nodes(vec![
                row(&[("a", 1)], 1, Some("old")),
                row(&[("a", 1), ("b", 1)], 2, Some("new")),
            ]),
            &[],
            None,
        )
        .unwrap();
        assert_eq!(winner.node, "b");
        assert_eq!(winner.floor.get("b"), 1);
    }

    #[test]
    fn one_version_with_two_images_goes_by_majority_then_by_prefer() {
        let v = &[("a", 1)];
        let majority = decide(
            &nodes(vec![row(v, 1, Some("x")), row(v, 1, Some("y")), row(v, 1, Some("x"))]),
            &[],
            None,
        )
        .unwrap();
        assert_eq!(majority.node, "a");
        let tie = nodes(vec![row(v, 1, Some("x")), row(v, 1, Some("y"))]);
        assert!(decide(&tie, &[], None).unwrap_err().contains("--prefer"));
        assert_eq!(decide(&tie, &[], Some("b")).unwrap().node, "b");
    }

    #[test]
    fn a_node_without_the_row_wins_when_its_purge_floor_covers_the_others_version() {
        let stale = row(&[("a", 3)], 1, Some("x"));
        let purged = AuditRow {
            key: vec![1],
            version: None,
            image: None,
            waiting: false,
            edited: false,
        };
        let floors = |b: u64| {
            vec![
                VersionVector::new(),
                VersionVector::from_json(&format!(r#"{{"a":{b}}}"#)).unwrap(),
            ]
        };
        let rows = || nodes(vec![stale.clone(), purged.clone()]);
        let winner = decide(&rows(), &floors(5), None).unwrap();
        assert_eq!((winner.node.as_str(), matches!(winner.op, Op::Delete)), ("b", true));
        // A floor below the version says nothing of it: the row is newer than any purge.
        let winner = decide(&rows(), &floors(2), None).unwrap();
        assert_eq!((winner.node.as_str(), matches!(winner.op, Op::Upsert(_))), ("a", true));
    }
}
