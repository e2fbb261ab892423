//! Shared by the GPU backends (wgpu, cuda).
//! Buffer planning for one batch size, without a device: which storage every node's
//! value lives in. Computed values get a slot from a pool keyed by size class; a slot
//! goes back to the pool right after the last kernel that reads any alias of the value
//! (a `reshape` is a view: it aliases its operand's storage), so later nodes reuse it.
//! Graph outputs keep their slot until the end of the run (they are copied out last).

use std::collections::HashMap;

/// What a node is, for planning.
#[derive(Clone, Debug, PartialEq)]
pub enum Role {
    /// A leaf that owns its buffer (input, param, const): never recycled.
    Leaf,
    /// A view of the node at this position (`reshape`): shares its storage.
    View(usize),
    /// Computed by kernels reading the nodes at these positions.
    Compute(Vec<usize>),
}

/// Where a node's value lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// Zero elements: no buffer at all.
    Empty,
    /// The buffer owned by the leaf at this position.
    Leaf(usize),
    /// Pooled intermediate buffer number `k`.
    Slot(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub struct BufferPlan {
    /// Per node (same positions as the input).
    pub loc: Vec<Loc>,
    /// Per slot: its buffer's size in bytes (a size class, at least every user's bytes).
    pub slots: Vec<u64>,
}

/// The pool key of a buffer of `bytes`: at least 256 bytes, then rounded up to a quarter
/// step between powers of two (`1.25, 1.5, 1.75, 2 x 2^k`), so at most 25% is wasted;
/// never above `max_buffer` (a tensor that fits the limit keeps its exact size then).
pub fn size_class(bytes: u64, max_buffer: u64) -> u64 {
    let class = if bytes <= 256 {
        256
    } else {
        let k = 63 - (bytes - 1).leading_zeros(); // 2^k < bytes <= 2^(k+1), k >= 8
        let step = 1u64 << (k - 2);
        bytes.div_ceil(step) * step
    };
    if class > max_buffer {
        bytes.next_multiple_of(4)
    } else {
        class
    }
}

/// Plan the storage of `nodes` (in topological order, `bytes` per node) so that the
/// values at `outputs` survive to the end.
pub fn plan(nodes: &[(Role, u64)], outputs: &[usize], max_buffer: u64) -> BufferPlan {
    let n = nodes.len();
    // The node owning each node's storage (itself, or a view's operand's root).
    let mut root: Vec<usize> = (0..n).collect();
    for (i, (role, _)) in nodes.iter().enumerate() {
        if let Role::View(o) = role {
            root[i] = root[*o];
        }
    }
    // The last position reading each root (through any alias); outputs: never freed.
    let mut last: Vec<usize> = vec![0; n];
    for (i, (role, _)) in nodes.iter().enumerate() {
        if let Role::Compute(ops) = role {
            for &o in ops {
                last[root[o]] = last[root[o]].max(i);
            }
        }
    }
    for &o in outputs {
        last[root[o]] = usize::MAX;
    }
    // Roots to free after each position.
    let mut free_after: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (r, &l) in last.iter().enumerate() {
        if l != usize::MAX && l > r && root[r] == r {
            free_after[l].push(r);
        }
    }

    let mut loc = vec![Loc::Empty; n];
    let mut slots: Vec<u64> = Vec::new();
    let mut pool: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, (role, bytes)) in nodes.iter().enumerate() {
        loc[i] = match role {
            _ if *bytes == 0 => Loc::Empty,
            Role::Leaf => Loc::Leaf(i),
            Role::View(_) => loc[root[i]],
            Role::Compute(_) => {
                let class = size_class(*bytes, max_buffer);
                let k = match pool.get_mut(&class).and_then(Vec::pop) {
                    Some(k) => k,
                    None => {
                        slots.push(class);
                        slots.len() - 1
                    }
                };
                Loc::Slot(k)
            }
        };
        // The output is allocated before the operands are released: a kernel never
        // writes a buffer it reads.
        for &r in &free_after[i] {
            if let Loc::Slot(k) = loc[r] {
                pool.entry(slots[k]).or_default().push(k);
            }
        }
    }
    // A computed value nobody reads (only possible for dead-end nodes) frees nothing:
    // harmless, its slot simply stays taken.
    BufferPlan { loc, slots }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_by_quarters() {
        let m = u64::MAX;
        assert_eq!(size_class(4, m), 256);
        assert_eq!(size_class(256, m), 256);
        assert_eq!(size_class(260, m), 320);
        assert_eq!(size_class(512, m), 512);
        assert_eq!(size_class(513, m), 640);
        assert_eq!(size_class(1000, m), 1024);
        for b in (4..100_000u64).step_by(4) {
            let c = size_class(b, m);
            assert!(
                c >= b && (c <= 256 || c * 4 <= b * 5 + 4 * 256),
                "{b} -> {c}"
            );
        }
        // Never above the device's buffer limit.
        assert_eq!(size_class(1000, 1000), 1000);
    }

    #[test]
    fn chain_reuses_two_slots() {
        // x -> a -> b -> c -> d (output): ping-pong between two slots.
        let nodes = vec![
            (Role::Leaf, 400),
            (Role::Compute(vec![0]), 400),
            (Role::Compute(vec![1]), 400),
            (Role::Compute(vec![2]), 400),
            (Role::Compute(vec![3]), 400),
        ];
        let p = plan(&nodes, &[4], u64::MAX);
        assert_eq!(p.slots.len(), 2);
        assert_eq!(p.loc[0], Loc::Leaf(0));
        assert_eq!(p.loc[1], Loc::Slot(0));
        assert_eq!(p.loc[2], Loc::Slot(1));
        assert_eq!(p.loc[3], Loc::Slot(0));
        assert_eq!(p.loc[4], Loc::Slot(1));
    }

    #[test]
    fn views_extend_their_roots_life_and_outputs_live_to_the_end() {
        // a = f(x); v = reshape(a); b = g(x); c = h(v, b); out: c and a.
        let nodes = vec![
            (Role::Leaf, 64),
            (Role::Compute(vec![0]), 64),
            (Role::View(1), 64),
            (Role::Compute(vec![0]), 64),
            (Role::Compute(vec![2, 3]), 64),
            (Role::Compute(vec![4]), 64),
        ];
        let p = plan(&nodes, &[5, 1], u64::MAX);
        assert_eq!(p.loc[2], p.loc[1]);
        // b must not take a's slot while v (a) is still to be read.
        assert_ne!(p.loc[3], p.loc[1]);
        // a is an output: nobody after it takes its slot.
        assert_ne!(p.loc[4], p.loc[1]);
        assert_ne!(p.loc[5], p.loc[1]);
        // c's output slot is not one of its operands'.
        assert_ne!(p.loc[4], p.loc[3]);
    }

    #[test]
    fn zero_size_values_get_no_storage() {
        let nodes = vec![
            (Role::Leaf, 0),
            (Role::Compute(vec![0]), 0),
            (Role::View(1), 0),
        ];
        let p = plan(&nodes, &[2], u64::MAX);
        assert_eq!(p.loc, vec![Loc::Empty; 3]);
        assert!(p.slots.is_empty());
    }

    #[test]
    fn different_size_classes_do_not_mix() {
        let nodes = vec![
            (Role::Leaf, 4000),
            (Role::Compute(vec![0]), 4000),
            (Role::Compute(vec![1]), 40),
            (Role::Compute(vec![2]), 4000),
        ];
        let p = plan(&nodes, &[3], u64::MAX);
        // Node 3 reuses node 1's slot (freed after node 2), node 2 has its own.
        assert_eq!(p.loc[3], p.loc[1]);
        assert_eq!(p.slots.len(), 2);
    }
}
