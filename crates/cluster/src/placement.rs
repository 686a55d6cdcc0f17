//! Where the session shards' voters and leaders should be, decided from plain values so the
//! rules are tested without a network.
//!
//! Every member replicates every shard (a voter or a learner), so which nodes *vote* in a
//! shard and which node *leads* it is only a question of load: a shard's leader takes its
//! proposals, and each voter fsyncs its log. The plan spreads both evenly and moves as little
//! as it can: a current voter or leader stays unless its node is dead, gone, or carries more
//! than its share. Each shard's leader applies its own row of the plan; since they all
//! compute the same plan from the same membership, they converge.
//!
//! Like [`crate::rebalance::plan_voters`], a dead voter is only ever *replaced*: with no live
//! substitute it keeps its seat, because a group of two voters tolerates no failure at all.

use std::collections::{BTreeMap, BTreeSet};

/// Voters per shard for `members` (live and dead), `dead` among them, and the `current`
/// voters of each shard, with at most `replicas` voters each.
pub fn plan_shard_voters(
    members: &BTreeSet<u64>,
    dead: &BTreeSet<u64>,
    current: &BTreeMap<u64, BTreeSet<u64>>,
    replicas: usize,
) -> BTreeMap<u64, BTreeSet<u64>> {
    let live: BTreeSet<u64> = members.difference(dead).copied().collect();
    let want = replicas.min(members.len()).max(1);
    let mut load: BTreeMap<u64, usize> = live.iter().map(|n| (*n, 0)).collect();
    // Keep the live current voters (at most `want`, least loaded kept first).
    let mut plan: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (g, voters) in current {
        let mut keep: Vec<u64> = voters.intersection(&live).copied().collect();
        keep.sort_by_key(|n| (load[n], *n));
        keep.truncate(want);
        for n in &keep {
            *load.entry(*n).or_default() += 1;
        }
        plan.insert(*g, keep.into_iter().collect());
    }
    // Fill each shard up to `want` with the least-loaded live members.
    for (g, voters) in plan.iter_mut() {
        while voters.len() < want {
            let Some(n) = least_loaded(&load, voters, *g) else {
                break;
            };
            voters.insert(n);
            *load.entry(n).or_default() += 1;
        }
    }
    // Even out: move a seat from a node above its share to one below it.
    let seats: usize = plan.values().map(|v| v.len()).sum();
    if !live.is_empty() {
        let ceil = seats.div_ceil(live.len());
        let floor = seats / live.len();
        for _ in 0..seats {
            let over = load
                .iter()
                .filter(|(_, c)| **c > ceil)
                .map(|(n, _)| *n)
                .next();
            let under = load
                .iter()
                .filter(|(_, c)| **c < floor)
                .map(|(n, _)| *n)
                .next();
            // Either side of the band is enough to move: a node above the ceiling gives to the
            // least loaded, a node below the floor takes from the most loaded.
            let (from, to) = match (over, under) {
                (Some(o), _) => (o, min_node(&load)),
                (None, Some(u)) => (max_node(&load), Some(u)),
                (None, None) => break,
            };
            let Some(to) = to else {
                break;
            };
            if load[&from] <= load[&to] + 1 {
                break;
            }
            let Some((_, voters)) = plan
                .iter_mut()
                .find(|(_, v)| v.contains(&from) && !v.contains(&to))
            else {
                break;
            };
            voters.remove(&from);
            voters.insert(to);
            *load.entry(from).or_default() -= 1;
            *load.entry(to).or_default() += 1;
        }
    }
    // A shard short of live voters keeps its dead ones rather than shrink.
    for (g, voters) in plan.iter_mut() {
        if voters.len() < want {
            if let Some(cur) = current.get(g) {
                for n in cur.intersection(members) {
                    if voters.len() >= want {
                        break;
                    }
                    voters.insert(*n);
                }
            }
        }
    }
    plan
}

fn least_loaded(load: &BTreeMap<u64, usize>, except: &BTreeSet<u64>, g: u64) -> Option<u64> {
    // Ties rotate with the shard id, so equal nodes do not all land on the lowest id.
    let n = load.len().max(1) as u64;
    load.iter()
        .filter(|(node, _)| !except.contains(node))
        .min_by_key(|(node, c)| (**c, (**node + n - g % n) % n, **node))
        .map(|(node, _)| *node)
}

fn min_node(load: &BTreeMap<u64, usize>) -> Option<u64> {
    load.iter().min_by_key(|(n, c)| (**c, **n)).map(|(n, _)| *n)
}

fn max_node(load: &BTreeMap<u64, usize>) -> u64 {
    load.iter()
        .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))
        .map(|(n, _)| *n)
        .unwrap_or(0)
}

/// The leader each shard should have: one of its voters, spread evenly over the live voters,
/// keeping a current leader where it does not carry more than its share.
pub fn plan_leaders(
    voters: &BTreeMap<u64, BTreeSet<u64>>,
    current: &BTreeMap<u64, u64>,
    down: &BTreeSet<u64>,
) -> BTreeMap<u64, u64> {
    let nodes: BTreeSet<u64> = voters
        .values()
        .flatten()
        .filter(|n| !down.contains(n))
        .copied()
        .collect();
    if nodes.is_empty() {
        return BTreeMap::new();
    }
    let ceil = voters.len().div_ceil(nodes.len());
    let mut count: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    let mut plan = BTreeMap::new();
    // Current leaders first, up to the share of their node.
    for (g, v) in voters {
        if let Some(l) = current.get(g) {
            if v.contains(l) && nodes.contains(l) && count[l] < ceil {
                *count.entry(*l).or_default() += 1;
                plan.insert(*g, *l);
            }
        }
    }
    for (g, v) in voters {
        if plan.contains_key(g) {
            continue;
        }
        let pick = v
            .iter()
            .filter(|n| nodes.contains(n))
            .min_by_key(|n| (count[*n], **n));
        if let Some(n) = pick {
            *count.entry(*n).or_default() += 1;
            plan.insert(*g, *n);
        }
    }
    // A node below its share takes a shard from the most loaded voter-mate (keeping current
    // leaders above let one node keep `ceil` while another has none).
    let floor = voters.len() / nodes.len();
    for _ in 0..voters.len() {
        let Some(under) = nodes.iter().find(|n| count[*n] < floor).copied() else {
            break;
        };
        let moved = plan
            .iter()
            .filter(|(g, l)| voters[*g].contains(&under) && count[*l] > floor)
            .max_by_key(|(g, l)| (count[*l], std::cmp::Reverse(**g)))
            .map(|(g, l)| (*g, *l));
        let Some((g, from)) = moved else {
            break;
        };
        plan.insert(g, under);
        *count.entry(from).or_default() -= 1;
        *count.entry(under).or_default() += 1;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    fn loads(plan: &BTreeMap<u64, BTreeSet<u64>>) -> BTreeMap<u64, usize> {
        let mut l = BTreeMap::new();
        for v in plan.values() {
            for n in v {
                *l.entry(*n).or_default() += 1;
            }
        }
        l
    }

    #[test]
    fn a_fourth_node_takes_an_even_share_of_the_seats() {
        // Four shards on nodes 1-3, all three voting everywhere; node 4 joins.
        let current: BTreeMap<u64, BTreeSet<u64>> = (1..=4).map(|g| (g, set(&[1, 2, 3]))).collect();
        let plan = plan_shard_voters(&set(&[1, 2, 3, 4]), &set(&[]), &current, 3);
        let l = loads(&plan);
        assert_eq!(l.values().sum::<usize>(), 12);
        assert_eq!(l[&4], 3, "{plan:?}");
        for v in plan.values() {
            assert_eq!(v.len(), 3);
        }
        // Balanced already: nothing moves.
        assert_eq!(
            plan_shard_voters(&set(&[1, 2, 3, 4]), &set(&[]), &plan, 3),
            plan
        );
    }

    /// Each shard's leader applies only its own row of the plan, one shard at a time, each
    /// from the layout the previous changes left: the layout still converges to an even one.
    #[test]
    fn rows_applied_one_shard_at_a_time_converge() {
        for order in [[1u64, 2, 3, 4], [4, 3, 2, 1], [2, 4, 1, 3]] {
            let mut layout: BTreeMap<u64, BTreeSet<u64>> =
                (1..=4).map(|g| (g, set(&[1, 2, 3]))).collect();
            let members = set(&[1, 2, 3, 4]);
            for _ in 0..10 {
                for g in order {
                    let plan = plan_shard_voters(&members, &set(&[]), &layout, 3);
                    layout.insert(g, plan[&g].clone());
                }
            }
            let l = loads(&layout);
            assert!(l.values().all(|c| *c == 3), "{order:?}: {layout:?}");
        }
    }

    #[test]
    fn a_dead_voter_is_replaced_and_kept_without_substitute() {
        let current: BTreeMap<u64, BTreeSet<u64>> = (1..=2).map(|g| (g, set(&[1, 2, 3]))).collect();
        let plan = plan_shard_voters(&set(&[1, 2, 3, 4]), &set(&[2]), &current, 3);
        for v in plan.values() {
            assert_eq!(v, &set(&[1, 3, 4]));
        }
        let plan = plan_shard_voters(&set(&[1, 2, 3]), &set(&[2]), &current, 3);
        for v in plan.values() {
            assert_eq!(v, &set(&[1, 2, 3]));
        }
        // A node that left (not a member) is not kept.
        let plan = plan_shard_voters(&set(&[1, 3]), &set(&[]), &current, 3);
        for v in plan.values() {
            assert_eq!(v, &set(&[1, 3]));
        }
    }

    #[test]
    fn a_new_shard_and_a_first_node_get_voters() {
        let current = BTreeMap::from([(1, set(&[])), (2, set(&[1]))]);
        let plan = plan_shard_voters(&set(&[1]), &set(&[]), &current, 3);
        assert_eq!(plan[&1], set(&[1]));
        assert_eq!(plan[&2], set(&[1]));
        let plan = plan_shard_voters(&set(&[1, 2, 3]), &set(&[]), &plan, 3);
        assert_eq!(plan[&1], set(&[1, 2, 3]));
    }

    #[test]
    fn leaders_spread_and_stay_where_they_are_fair() {
        let voters: BTreeMap<u64, BTreeSet<u64>> = (1..=6).map(|g| (g, set(&[1, 2, 3]))).collect();
        // All on node 1: two move to each of 2 and 3.
        let current: BTreeMap<u64, u64> = (1..=6).map(|g| (g, 1)).collect();
        let plan = plan_leaders(&voters, &current, &set(&[]));
        let mut per = BTreeMap::new();
        for l in plan.values() {
            *per.entry(*l).or_insert(0) += 1;
        }
        assert_eq!(per, BTreeMap::from([(1, 2), (2, 2), (3, 2)]));
        assert_eq!(plan[&1], 1, "a fair current leader stays");
        // Stable once spread.
        assert_eq!(plan_leaders(&voters, &plan, &set(&[])), plan);
        // Four shards on three nodes: the one without a leadership takes one.
        let four: BTreeMap<u64, BTreeSet<u64>> = (1..=4).map(|g| (g, set(&[1, 2, 3]))).collect();
        let current = BTreeMap::from([(1, 1), (2, 1), (3, 2), (4, 2)]);
        let plan4 = plan_leaders(&four, &current, &set(&[]));
        let mut per = BTreeMap::new();
        for l in plan4.values() {
            *per.entry(*l).or_insert(0) += 1;
        }
        assert_eq!(per.get(&3), Some(&1), "{plan4:?}");
        assert_eq!(plan_leaders(&four, &plan4, &set(&[])), plan4);
        // A down node leads nothing.
        let plan = plan_leaders(&voters, &plan, &set(&[3]));
        assert!(plan.values().all(|l| *l != 3));
    }

    /// Seeded random layouts: every shard gets min(replicas, members) voters, all members,
    /// live ones wherever enough are live; loads end within one of each other; a second plan
    /// of the result changes nothing; every leader is one of its shard's live voters.
    #[test]
    fn random_layouts_keep_the_invariants() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3_000 {
            let n = 1 + rnd() % 7;
            let members: BTreeSet<u64> = (1..=n).collect();
            let dead: BTreeSet<u64> = members.iter().filter(|_| rnd() % 5 == 0).copied().collect();
            let shards = 1 + rnd() % 12;
            let mut current = BTreeMap::new();
            for g in 1..=shards {
                let v: BTreeSet<u64> = (1..=9).filter(|_| rnd() % 3 == 0).take(3).collect();
                current.insert(g, v);
            }
            let plan = plan_shard_voters(&members, &dead, &current, 3);
            let want = 3.min(members.len());
            let live: BTreeSet<u64> = members.difference(&dead).copied().collect();
            for (g, v) in &plan {
                assert!(v.is_subset(&members), "{g}: {v:?} not members");
                assert!(v.len() <= want);
                let live_in = v.intersection(&live).count();
                assert_eq!(live_in, want.min(live.len()), "{g}: {v:?} dead {dead:?}");
            }
            if !live.is_empty() && dead.is_empty() {
                let l = loads(&plan);
                let max = l.values().max().copied().unwrap_or(0);
                let min = live
                    .iter()
                    .map(|n| l.get(n).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(0);
                assert!(max - min <= 1, "uneven {l:?} for {plan:?}");
                assert_eq!(plan_shard_voters(&members, &dead, &plan, 3), plan);
            }
            let leaders = plan_leaders(&plan, &BTreeMap::new(), &dead);
            for (g, l) in &leaders {
                assert!(plan[g].contains(l) && !dead.contains(l));
            }
            // Stable: planning again from its own result moves nothing.
            assert_eq!(plan_leaders(&plan, &leaders, &dead), leaders);
        }
    }
}
