//! Where a device's session lives by default: its *home* node, by rendezvous (highest random
//! weight) hashing of `(tenant, device)` over the members. Rendezvous hashing moves only the
//! keys of a node that joins or leaves, and needs no ring to keep in sync: every node computes
//! the same order from the same member list.

/// A stable 64-bit hash (FNV-1a then a mix): the same on every node and every build, unlike
/// `std`'s randomly keyed hasher.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator, so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser: FNV's low bits are weak for short keys.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The members in the order a key prefers them: the first live one is its home.
pub fn preference(tenant: &str, device: &str, members: &[u64]) -> Vec<u64> {
    let key = stable_hash(&[tenant.as_bytes(), device.as_bytes()]);
    let mut scored: Vec<(u64, u64)> = members
        .iter()
        .map(|&m| (stable_hash(&[&key.to_be_bytes(), &m.to_be_bytes()]), m))
        .collect();
    // Ties (practically impossible) break by node id, so the order is total.
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().map(|(_, m)| m).collect()
}

/// The home of a key among `live` members (`None` when there are none).
pub fn home(tenant: &str, device: &str, live: &[u64]) -> Option<u64> {
    preference(tenant, device, live).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_inputs_same_home_whatever_the_member_order() {
        let a = home("t1", "dev-1", &[1, 2, 3]);
        let b = home("t1", "dev-1", &[3, 1, 2]);
        assert_eq!(a, b);
        assert!(a.is_some());
    }

    #[test]
    fn keys_spread_over_members() {
        let members = [1, 2, 3];
        let mut counts = [0usize; 4];
        for i in 0..3000 {
            let h = home("t", &format!("d{i}"), &members).expect("home");
            counts[h as usize] += 1;
        }
        for c in &counts[1..] {
            assert!((800..1200).contains(c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn a_joining_node_takes_keys_only_for_itself() {
        // Rendezvous: adding node 4 moves a key only if its new home is 4.
        for i in 0..2000 {
            let d = format!("d{i}");
            let before = home("t", &d, &[1, 2, 3]).expect("home");
            let after = home("t", &d, &[1, 2, 3, 4]).expect("home");
            assert!(after == before || after == 4, "{d}: {before} -> {after}");
        }
    }

    #[test]
    fn a_dead_node_s_keys_go_to_their_next_preference() {
        for i in 0..500 {
            let d = format!("d{i}");
            let pref = preference("t", &d, &[1, 2, 3]);
            let live: Vec<u64> = [1, 2, 3].into_iter().filter(|&n| n != 2).collect();
            let expected = pref.into_iter().find(|n| *n != 2);
            assert_eq!(home("t", &d, &live), expected);
        }
    }

    #[test]
    fn no_members_no_home() {
        assert_eq!(home("t", "d", &[]), None);
    }
}
