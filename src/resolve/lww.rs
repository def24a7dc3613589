//! Last-write-wins: the version with the greatest (hlc, origin node) wins.
//!
//! (hlc, origin) is a total order on writes of distinct nodes; an exact tie (only possible
//! when one node's history was restored from a backup) is broken by canonical row content,
//! and a tombstone's content sorts lowest. `max` is commutative and associative, which is
//! what makes the result independent of arrival order.
use super::Winner;
use crate::event::Hlc;

/// The ordering stamp of one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp<'a> {
    pub hlc: Hlc,
    pub origin: &'a str,
}

/// `None` on an exact tie: call `tie_break` with both contents.
pub fn pick(local: Stamp<'_>, remote: Stamp<'_>) -> Option<Winner> {
    match (remote.hlc, remote.origin).cmp(&(local.hlc, local.origin)) {
        std::cmp::Ordering::Greater => Some(Winner::Remote),
        std::cmp::Ordering::Less => Some(Winner::Local),
        std::cmp::Ordering::Equal => None,
    }
}

/// Greater canonical content wins; equal content keeps the local row (nothing to change).
pub fn tie_break(local_content: &[u8], remote_content: &[u8]) -> Winner {
    if remote_content > local_content {
        Winner::Remote
    } else {
        Winner::Local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greater_hlc_wins_then_origin() {
        let s = |hlc, origin| Stamp { hlc: Hlc(hlc), origin };
        assert_eq!(pick(s(1, "b"), s(2, "a")), Some(Winner::Remote));
        assert_eq!(pick(s(2, "a"), s(1, "b")), Some(Winner::Local));
        assert_eq!(pick(s(2, "a"), s(2, "b")), Some(Winner::Remote));
        assert_eq!(pick(s(2, "b"), s(2, "a")), Some(Winner::Local));
        assert_eq!(pick(s(2, "a"), s(2, "a")), None);
    }

    #[test]
    fn tie_break_is_symmetric() {
        assert_eq!(tie_break(b"a", b"b"), Winner::Remote);
        assert_eq!(tie_break(b"b", b"a"), Winner::Local);
        assert_eq!(tie_break(b"", b"a"), Winner::Remote);
        assert_eq!(tie_break(b"a", b"a"), Winner::Local);
    }
}
