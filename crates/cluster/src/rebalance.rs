//! Which nodes vote in a group, decided from plain values so the rules are tested without a
//! network: keep at most [`MAX_VOTERS`](crate::durable::MAX_VOTERS) voters, put a learner in
//! the place of a voter that has been dead for a while, and promote learners while the group
//! has fewer voters than it should.
//!
//! A dead voter is only ever *replaced*, never just removed: dropping one of three voters
//! without a substitute leaves two, and two need both to agree, which tolerates no failure
//! at all where the three tolerated one. The dead node stays a learner, so when it comes back
//! it catches up and can vote again the next time a voter is needed.

use std::collections::BTreeSet;

/// The voters the group should have, or `None` when the current ones are right.
///
/// `dead` are nodes down for longer than the operator's threshold (`--dead-node-after`).
/// Learners take dead voters' places, lowest id first (any order is correct; a fixed one
/// makes every leader plan the same change).
pub fn plan_voters(
    voters: &BTreeSet<u64>,
    learners: &BTreeSet<u64>,
    dead: &BTreeSet<u64>,
    max_voters: usize,
) -> Option<BTreeSet<u64>> {
    let mut candidates = learners.difference(dead).copied();
    let mut next = BTreeSet::new();
    for v in voters {
        if !dead.contains(v) {
            next.insert(*v);
        } else if let Some(l) = candidates.next() {
            next.insert(l);
        } else {
            next.insert(*v); // no substitute: keep it (see the module comment)
        }
    }
    while next.len() < max_voters {
        match candidates.next() {
            Some(l) => {
                next.insert(l);
            }
            None => break,
        }
    }
    (next != *voters && !next.is_empty()).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_dead_voter_is_replaced_by_a_live_learner() {
        let plan = plan_voters(&set(&[1, 2, 3]), &set(&[4, 5]), &set(&[2]), 3);
        assert_eq!(plan, Some(set(&[1, 3, 4])));
        // The dead learner 4 is skipped.
        let plan = plan_voters(&set(&[1, 2, 3]), &set(&[4, 5]), &set(&[2, 4]), 3);
        assert_eq!(plan, Some(set(&[1, 3, 5])));
    }

    #[test]
    fn a_dead_voter_without_substitute_stays() {
        assert_eq!(
            plan_voters(&set(&[1, 2, 3]), &set(&[]), &set(&[3]), 3),
            None
        );
        assert_eq!(
            plan_voters(&set(&[1, 2, 3]), &set(&[4]), &set(&[3, 4]), 3),
            None
        );
    }

    #[test]
    fn learners_are_promoted_up_to_the_voter_count() {
        assert_eq!(
            plan_voters(&set(&[1]), &set(&[2, 3, 4]), &set(&[]), 3),
            Some(set(&[1, 2, 3]))
        );
        assert_eq!(
            plan_voters(&set(&[1, 2, 3]), &set(&[4]), &set(&[]), 3),
            None
        );
    }

    #[test]
    fn two_dead_voters_are_replaced_at_once_when_learners_allow() {
        assert_eq!(
            plan_voters(&set(&[1, 2, 3]), &set(&[4, 5]), &set(&[2, 3]), 3),
            Some(set(&[1, 4, 5]))
        );
    }

    /// Seeded random memberships: the plan never grows past the limit, never adds a dead
    /// node, never drops a live voter, and never lowers the number of live voters.
    #[test]
    fn random_memberships_keep_the_invariants() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5_000 {
            let nodes: Vec<u64> = (1..=(2 + rnd() % 6)).collect();
            let (mut voters, mut learners, mut dead) =
                (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
            for n in &nodes {
                if voters.len() < 3 && rnd() % 2 == 0 {
                    voters.insert(*n);
                } else {
                    learners.insert(*n);
                }
                if rnd() % 3 == 0 {
                    dead.insert(*n);
                }
            }
            if voters.is_empty() {
                continue;
            }
            let next = plan_voters(&voters, &learners, &dead, 3).unwrap_or(voters.clone());
            assert!(next.len() <= 3.max(voters.len()));
            let live = |s: &BTreeSet<u64>| s.difference(&dead).count();
            assert!(
                live(&next) >= live(&voters),
                "{voters:?} {learners:?} {dead:?}"
            );
            for v in voters.difference(&dead) {
                assert!(next.contains(v), "live voter {v} dropped");
            }
            for n in next.difference(&voters) {
                assert!(!dead.contains(n), "dead node {n} promoted");
            }
        }
    }
}
