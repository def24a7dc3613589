//! Entity ownership: each row belongs to one region, and only that region writes it.
//!
//! Writes are refused at the source by the capture triggers. This module holds the rules that
//! run everywhere else: which (owner, epoch) a local write carries, and whether a remote write
//! may be applied. An epoch counts the row's transfers; a transfer is a write by the current
//! owner that names a new one. Events carry their (owner, epoch) claim, so a receiver can
//! judge a write even when the transfer it depends on has not arrived yet (that transfer
//! then arrives as a stale event). Concurrent claims are resolved, never refused: the higher
//! epoch wins, and at equal epochs (two regions insert a new key at once) LWW decides,
//! identically everywhere, and the conflict is logged (see [`judge_remote`]).
//!
//! A forced failover (`weft ownership failover`, run on a survivor when an owner region is
//! lost) moves a row without its owner: its claim jumps to the next *term* boundary (a
//! multiple of [`TERM`]), so it outranks every claim the lost owner can still make. A write
//! that lost to a claim of a higher term was fenced: the receiver records it as a fenced dead
//! letter besides the conflict ([`Verdict::fenced`]), which is what the returning region
//! loses, counted and listed, never merged into the row.
use crate::config::OwnerRule;
use crate::event::{Key, Ownership, Value};

/// The epochs of one term: a forced failover moves a row to the first epoch of the next one.
pub const TERM: u64 = 1 << 32;

/// The epoch a forced failover gives a row last claimed at `epoch`: the next term's first.
pub fn fence_after(epoch: u64) -> u64 {
    (epoch / TERM + 1) * TERM
}

/// Whether a claim at `epoch` is a forced failover's fence.
pub fn is_fence(claim: &Ownership) -> bool {
    claim.transfer && claim.epoch > 0 && claim.epoch.is_multiple_of(TERM)
}

/// What a node knows of a row's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub region: String,
    pub epoch: u64,
}

/// The region `rule` gives a key, before any transfer. `key_columns` names the key's values
/// in order. Store triggers compute the same thing in SQL; `tests/ownership.rs` holds them
/// to agreement.
pub fn rule_owner(rule: &OwnerRule, key_columns: &[String], key: &Key) -> Option<String> {
    let index = match &rule.column {
        Some(column) => key_columns.iter().position(|c| c == column)?,
        None => 0,
    };
    match (key.0.get(index)?, &rule.prefix) {
        (Value::Text(text), Some(separator)) => {
            let (prefix, _) = text.split_once(separator.as_str())?;
            if rule.regions.is_empty() {
                Some(prefix.to_owned())
            } else {
                rule.regions.get(prefix).cloned()
            }
        }
        (Value::Integer(i), None) => rule
            .ranges
            .iter()
            .find(|r| r.from <= *i && *i <= r.to)
            .map(|r| r.region.clone()),
        _ => None,
    }
}

/// What a receiver makes of a remote write to an ownership table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// The owner to record if the write wins.
    pub owner: Option<Owner>,
    /// For a write concurrent with the local version: the side whose claim has the higher
    /// epoch, which wins whatever LWW says (`None`: equal epochs, LWW decides).
    pub by_epoch: Option<crate::resolve::Winner>,
    /// The side that loses because its claim is of an earlier term than the other's: a
    /// write its region made after a forced failover moved the row, without knowing of it.
    pub fenced: Option<Fenced>,
}

/// A write that loses to a forced failover it did not know of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub loser: crate::resolve::Winner,
    /// Why, for the fenced dead letter.
    pub reason: String,
}

/// Judges a remote write to an ownership table: `Err(reason)` if it must be dead-lettered,
/// else its [`Verdict`]. `known` is the recorded owner; with a `rule`, a row never
/// transferred belongs at epoch 0 to the region the rule gives, and an epoch-0 claim must
/// name that region. `concurrent`: the write is concurrent with the local version.
///
/// The outcome is a function of the set of writes, not of their arrival order:
/// - A write that descends from the local version was checked at its source against a state
///   that includes everything known here (the capture triggers allow only the owner's
///   writes, a transfer by the owner, and a new row, or a deleted row inserted anew, claimed
///   by the writer's own region). It is taken as it claims, unless its claim cannot have
///   been made by such a source.
/// - Of two concurrent writes, the one whose claim has the higher epoch wins (a transfer
///   beats the old owner's writes it did not see, everywhere); at equal epochs LWW decides.
///   The loser is a logged conflict, not a dead letter, so its version is merged and the row
///   converges.
pub fn judge_remote(
    rule: Option<(&OwnerRule, &[String])>,
    key: &Key,
    known: Option<Owner>,
    origin_region: &str,
    claim: Option<&Ownership>,
    concurrent: bool,
) -> Result<Verdict, String> {
    let mut known = known;
    if let Some((rule, key_columns)) = rule {
        let by_rule = rule_owner(rule, key_columns, key);
        if known.is_none() {
            known = by_rule.clone().map(|region| Owner { region, epoch: 0 });
        }
        if let Some(claim) = claim.filter(|c| c.epoch == 0)
            && by_rule.as_deref() != Some(claim.owner.as_str())
        {
            return Err(format!(
                "{origin_region} claims the row at epoch 0, but the owner rule gives {}; align the owner rules in the node configs",
                by_rule.as_deref().unwrap_or("no region")
            ));
        }
    }
    if let Some(reason) = refusal(known.as_ref(), origin_region, claim, concurrent) {
        return Err(reason);
    }
    let claim = claim.ok_or_else(|| format!("{origin_region} sent no ownership with this write"))?;
    use crate::resolve::Winner;
    let by_epoch = match known.as_ref().filter(|_| concurrent) {
        Some(k) if claim.epoch > k.epoch => Some(Winner::Remote),
        Some(k) if claim.epoch < k.epoch => Some(Winner::Local),
        _ => None,
    };
    let fenced = match known.as_ref().filter(|_| concurrent) {
        Some(k) if claim.epoch / TERM > k.epoch / TERM => Some(Fenced {
            loser: Winner::Local,
            reason: fenced_reason(&k.region, k.epoch, &claim.owner, claim.epoch),
        }),
        Some(k) if claim.epoch / TERM < k.epoch / TERM => Some(Fenced {
            loser: Winner::Remote,
            reason: fenced_reason(&claim.owner, claim.epoch, &k.region, k.epoch),
        }),
        _ => None,
    };
    Ok(Verdict {
        owner: Some(Owner {
            region: claim.owner.clone(),
            epoch: claim.epoch,
        }),
        by_epoch,
        fenced,
    })
}

fn fenced_reason(lost: &str, lost_epoch: u64, owner: &str, fence: u64) -> String {
    format!(
        "fenced: written under {lost}'s ownership (epoch {lost_epoch}) without knowing that a forced failover had moved the row to {owner} (epoch {fence}); it is not applied anywhere, and this letter holds its data: write it again in {owner} if it is still wanted, then discard the letter"
    )
}

/// The owner a local write leaves the row with, as the capture trigger allowed it: the
/// owner column's value after the write (`written`; `None` for a delete or a rule table), or
/// a transfer recorded by `weft ownership transfer` (`moving_to`), else the known owner,
/// else this region (`here`: a new row).
pub fn owner_after_local_write(
    known: Option<&Owner>,
    moving_to: Option<&str>,
    written: Option<&Value>,
    here: &str,
) -> String {
    match (written, moving_to) {
        (Some(Value::Text(region)), _) => region.clone(),
        (Some(_), _) => here.to_owned(),
        (None, Some(to)) => to.to_owned(),
        (None, None) => known.map(|k| k.region.clone()).unwrap_or_else(|| here.to_owned()),
    }
}

/// The claim a local write carries, given the row's owner column after the write. `forced`:
/// the write is a forced failover's move, which claims the next term (see [`fence_after`]).
pub fn local_write(previous: Option<&Owner>, owner_now: &str, forced: bool) -> Ownership {
    match previous {
        Some(p) if forced => Ownership {
            owner: owner_now.to_owned(),
            epoch: fence_after(p.epoch),
            transfer: true,
        },
        None => Ownership {
            owner: owner_now.to_owned(),
            epoch: 0,
            transfer: false,
        },
        Some(p) if p.region != owner_now => Ownership {
            owner: owner_now.to_owned(),
            epoch: p.epoch + 1,
            transfer: true,
        },
        Some(p) => Ownership {
            owner: p.region.clone(),
            epoch: p.epoch,
            transfer: false,
        },
    }
}

/// Why a remote write from `origin_region` must not be applied, if so: a write no honest
/// source makes (see [`judge_remote`]). `concurrent`: the write is concurrent with the local
/// version, so what its source knew of the owner may differ from `local`.
pub fn refusal(
    local: Option<&Owner>,
    origin_region: &str,
    claim: Option<&Ownership>,
    concurrent: bool,
) -> Option<String> {
    let Some(claim) = claim else {
        return Some(format!(
            "{origin_region} sent no ownership with this write: its node config does not make this an ownership table; align the configs"
        ));
    };
    if !claim.transfer && claim.owner != origin_region {
        return Some(format!("{origin_region} wrote a row owned by {}", claim.owner));
    }
    let (Some(l), false) = (local, concurrent) else {
        return None;
    };
    // A forced failover moves the row without its owner, from any surviving region.
    if is_fence(claim) && claim.epoch > l.epoch {
        return None;
    }
    if claim.epoch < l.epoch {
        return Some(format!(
            "{origin_region} wrote (epoch {}) after the row moved to {} (epoch {}), yet had seen that",
            claim.epoch, l.region, l.epoch
        ));
    }
    // A claim more than one epoch ahead comes after transfers not known here yet: whoever
    // made it owned the row then.
    if claim.transfer && claim.epoch == l.epoch + 1 && l.region != origin_region && claim.owner != origin_region {
        return Some(format!(
            "{origin_region} tried to move a row owned by {} (epoch {}) to {}",
            l.region, l.epoch, claim.owner
        ));
    }
    if claim.epoch == l.epoch && l.region != claim.owner {
        return Some(format!(
            "{origin_region} claims the row at epoch {} for {}, but it is {}'s at that epoch",
            l.epoch, claim.owner, l.region
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(region: &str, epoch: u64) -> Owner {
        Owner {
            region: region.into(),
            epoch,
        }
    }

    fn claim(owner: &str, epoch: u64, transfer: bool) -> Ownership {
        Ownership {
            owner: owner.into(),
            epoch,
            transfer,
        }
    }

    #[test]
    fn rules_map_keys_to_regions() {
        use crate::config::OwnerRange;
        let columns = vec!["tenant".to_owned(), "id".to_owned()];
        let key = |a: Value, b: Value| Key(vec![a, b]);
        let prefix = OwnerRule {
            column: None,
            prefix: Some("-".into()),
            regions: Default::default(),
            ranges: vec![],
        };
        let text = |s: &str| Value::Text(s.into());
        assert_eq!(
            rule_owner(&prefix, &columns, &key(text("eu-7"), Value::Integer(1))).as_deref(),
            Some("eu")
        );
        assert_eq!(
            rule_owner(&prefix, &columns, &key(text("eu-7-x"), Value::Integer(1))).as_deref(),
            Some("eu")
        );
        assert_eq!(
            rule_owner(&prefix, &columns, &key(text("eu7"), Value::Integer(1))),
            None
        );
        assert_eq!(
            rule_owner(&prefix, &columns, &key(Value::Integer(5), Value::Integer(1))),
            None
        );
        let mapped = OwnerRule {
            regions: [("e".to_owned(), "eu-west".to_owned())].into(),
            ..prefix.clone()
        };
        assert_eq!(
            rule_owner(&mapped, &columns, &key(text("e-1"), Value::Null)).as_deref(),
            Some("eu-west")
        );
        assert_eq!(rule_owner(&mapped, &columns, &key(text("u-1"), Value::Null)), None);
        let ranges = OwnerRule {
            column: Some("id".into()),
            prefix: None,
            regions: Default::default(),
            ranges: vec![
                OwnerRange {
                    from: 0,
                    to: 99,
                    region: "a".into(),
                },
                OwnerRange {
                    from: 100,
                    to: 199,
                    region: "b".into(),
                },
            ],
        };
        let at = |i: i64| rule_owner(&ranges, &columns, &key(text("t"), Value::Integer(i)));
        assert_eq!(at(0).as_deref(), Some("a"));
        assert_eq!(at(99).as_deref(), Some("a"));
        assert_eq!(at(100).as_deref(), Some("b"));
        assert_eq!(at(200), None);
        assert_eq!(at(-1), None);
    }

    #[test]
    fn the_owner_after_a_local_write() {
        let a0 = owner("a", 0);
        let text = |s: &str| Value::Text(s.into());
        assert_eq!(owner_after_local_write(None, None, Some(&text("b")), "a"), "b");
        assert_eq!(owner_after_local_write(Some(&a0), None, Some(&Value::Null), "a"), "a");
        assert_eq!(owner_after_local_write(Some(&a0), Some("c"), None, "a"), "c");
        assert_eq!(owner_after_local_write(Some(&owner("b", 2)), None, None, "a"), "b");
        assert_eq!(owner_after_local_write(None, None, None, "a"), "a");
    }

    #[test]
    fn remote_writes_under_a_rule() {
        use crate::config::OwnerRange;
        let rule = OwnerRule {
            column: None,
            prefix: None,
            regions: Default::default(),
            ranges: vec![OwnerRange {
                from: 0,
                to: 9,
                region: "a".into(),
            }],
        };
        let columns = vec!["id".to_string()];
        let key = |i: i64| Key(vec![Value::Integer(i)]);
        let judge = |k: i64, known: Option<Owner>, origin: &str, c: Ownership| {
            judge_remote(Some((&rule, &columns)), &key(k), known, origin, Some(&c), false)
        };
        // The rule's region creates; another region's epoch-0 claim is refused.
        let took = |o: Owner| {
            Ok(Verdict {
                owner: Some(o),
                by_epoch: None,
                fenced: None,
            })
        };
        assert_eq!(judge(1, None, "a", claim("a", 0, false)), took(owner("a", 0)));
        let err = judge(1, None, "b", claim("b", 0, false)).unwrap_err();
        assert!(err.contains("the owner rule gives a"), "{err}");
        assert!(
            judge(20, None, "a", claim("a", 0, false))
                .unwrap_err()
                .contains("gives no region")
        );
        // A transfer by the rule's owner, and the new owner's write before it arrives.
        assert_eq!(judge(1, None, "a", claim("b", 1, true)), took(owner("b", 1)));
        assert_eq!(judge(1, None, "b", claim("b", 1, false)), took(owner("b", 1)));
        assert!(judge(1, Some(owner("b", 1)), "a", claim("a", 0, false)).is_err());
        // Without a rule, nothing is known until a claim arrives.
        assert_eq!(
            judge_remote(None, &key(1), None, "b", Some(&claim("b", 0, false)), false),
            took(owner("b", 0))
        );
    }

    #[test]
    fn local_writes_keep_or_move_ownership() {
        assert_eq!(local_write(None, "a", false), claim("a", 0, false));
        assert_eq!(local_write(Some(&owner("a", 3)), "a", false), claim("a", 3, false));
        assert_eq!(local_write(Some(&owner("a", 3)), "b", false), claim("b", 4, true));
        assert_eq!(local_write(Some(&owner("a", 3)), "b", true), claim("b", TERM, true));
        assert_eq!(
            local_write(Some(&owner("b", TERM + 2)), "c", true),
            claim("c", 2 * TERM, true)
        );
    }

    /// Table: (local owner, origin, claim, concurrent, refused?)
    #[test]
    fn remote_writes_are_judged_by_their_claim() {
        let cases = [
            (Some(owner("a", 0)), "a", Some(claim("a", 0, false)), false, false),
            (None, "a", Some(claim("a", 0, false)), false, false),
            (Some(owner("a", 0)), "b", Some(claim("a", 0, false)), false, true),
            (Some(owner("a", 0)), "b", Some(claim("b", 0, false)), false, true),
            (Some(owner("a", 0)), "a", Some(claim("b", 1, true)), false, false),
            (Some(owner("a", 0)), "c", Some(claim("b", 1, true)), false, true),
            // A deleted row inserted anew by another region, which claims it for itself.
            (Some(owner("a", 0)), "b", Some(claim("b", 1, true)), false, false),
            (Some(owner("a", 0)), "b", Some(claim("b", 1, false)), false, false),
            // Concurrent writes are not refused: the higher epoch wins (see judge_remote).
            (Some(owner("b", 1)), "a", Some(claim("a", 0, false)), true, false),
            (Some(owner("b", 0)), "a", Some(claim("c", 1, true)), true, false),
            (Some(owner("a", 0)), "b", Some(claim("b", 0, false)), true, false),
            (Some(owner("b", 2)), "a", Some(claim("b", 1, true)), false, true),
            // b owns it by a transfer not known here yet: its move is two epochs ahead.
            (Some(owner("c", 0)), "b", Some(claim("c", 2, true)), false, false),
            (Some(owner("a", 0)), "a", None, false, true),
            (Some(owner("a", 0)), "a", None, true, true),
            // A forced failover: any region fences the row over to another, or to itself.
            (Some(owner("a", 3)), "c", Some(claim("b", TERM, true)), false, false),
            (Some(owner("a", 3)), "b", Some(claim("b", TERM, true)), false, false),
            (Some(owner("b", TERM)), "c", Some(claim("c", TERM, true)), false, true),
            // The fenced owner's write after it saw the fence.
            (Some(owner("b", TERM)), "a", Some(claim("a", 3, false)), false, true),
        ];
        for (local, origin, claim, concurrent, refused) in cases {
            let reason = refusal(local.as_ref(), origin, claim.as_ref(), concurrent);
            assert_eq!(
                reason.is_some(),
                refused,
                "{local:?} {origin} {claim:?} {concurrent}: {reason:?}"
            );
        }
    }

    #[test]
    fn concurrent_claims_are_ordered_by_epoch() {
        use crate::resolve::Winner;
        let judge = |known: Owner, origin: &str, c: Ownership| {
            judge_remote(None, &Key(vec![]), Some(known), origin, Some(&c), true)
                .unwrap()
                .by_epoch
        };
        assert_eq!(judge(owner("b", 0), "a", claim("c", 1, true)), Some(Winner::Remote));
        assert_eq!(judge(owner("c", 1), "b", claim("b", 0, false)), Some(Winner::Local));
        assert_eq!(judge(owner("a", 0), "b", claim("b", 0, false)), None);
    }

    #[test]
    fn a_fence_outranks_the_lost_owners_concurrent_writes() {
        use crate::resolve::Winner;
        let verdict = |known: Owner, origin: &str, c: Ownership| {
            judge_remote(None, &Key(vec![]), Some(known), origin, Some(&c), true).unwrap()
        };
        // At a survivor: the lost owner's write, made without knowing of the fence.
        let late = verdict(owner("b", TERM), "a", claim("a", 7, false));
        assert_eq!(late.by_epoch, Some(Winner::Local));
        assert_eq!(late.fenced.map(|f| f.loser), Some(Winner::Remote));
        // At the returning region: the fence arrives over its own write.
        let fence = verdict(owner("a", 7), "c", claim("b", TERM, true));
        assert_eq!(fence.by_epoch, Some(Winner::Remote));
        let fenced = fence.fenced.unwrap();
        assert_eq!(fenced.loser, Winner::Local);
        assert!(
            fenced.reason.contains("under a's ownership (epoch 7)"),
            "{}",
            fenced.reason
        );
        // A planned transfer within a term fences nothing.
        let planned = verdict(owner("a", 7), "a", claim("b", 8, true));
        assert_eq!(planned.fenced, None);
        assert_eq!(fence_after(0), TERM);
        assert_eq!(fence_after(TERM - 1), TERM);
        assert_eq!(fence_after(TERM), 2 * TERM);
    }
}
