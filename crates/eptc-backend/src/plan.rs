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
    // The root owning each node's storage, and the last position reading each root
    // (through any alias; outputs: `n`, never freed).
    let (root, last) = lifetimes(nodes, outputs);
    // Roots to free after each position.
    let mut free_after: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (r, &l) in last.iter().enumerate() {
        if l < n && l > r && root[r] == r {
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

/// Computed values placed at offsets in one arena (for a backend whose buffers can be
/// addressed by pointer, as CUDA's): [`Loc::Slot`]`(k)` lives at `offsets[k]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ArenaPlan {
    /// Per node (same positions as the input).
    pub loc: Vec<Loc>,
    /// Per slot: the offset of its value in the arena (a multiple of the alignment).
    pub offsets: Vec<u64>,
    /// Per slot: its value's bytes.
    pub bytes: Vec<u64>,
    /// The arena's size.
    pub arena: u64,
}

/// Each value's lifetime under [`plan`]'s rules (computed at its position, alive until the
/// last read of any alias; outputs to the end, `n`): the root of every node (itself, or a
/// view's operand's root) and the last position reading each root.
pub fn lifetimes(nodes: &[(Role, u64)], outputs: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let n = nodes.len();
    let mut root: Vec<usize> = (0..n).collect();
    for (i, (role, _)) in nodes.iter().enumerate() {
        if let Role::View(o) = role {
            root[i] = root[*o];
        }
    }
    let mut last: Vec<usize> = (0..n).collect();
    for (i, (role, _)) in nodes.iter().enumerate() {
        if let Role::Compute(ops) = role {
            for &o in ops {
                last[root[o]] = last[root[o]].max(i);
            }
        }
    }
    for &o in outputs {
        last[root[o]] = n;
    }
    (root, last)
}

/// Place every computed value in one arena, greedy by size ("Efficient Memory Management
/// for Deep Neural Net Inference", Pisarchyk & Lee, 2020): the largest values first, each
/// at the lowest offset where it overlaps no placed value alive at the same time (a
/// value is alive from its computation through its last read, so a kernel's output never
/// shares bytes with its operands). Unlike [`plan`]'s size classes nothing is rounded
/// beyond `align`, and a freed range serves a value of any size: the arena comes close to
/// [`live_peak`]. `pad` bytes are kept free before and after every value (guard bytes for
/// an emulator; 0 on a device).
pub fn plan_arena(nodes: &[(Role, u64)], outputs: &[usize], align: u64, pad: u64) -> ArenaPlan {
    let align = align.max(1);
    let (root, last) = lifetimes(nodes, outputs);
    let mut loc = vec![Loc::Empty; nodes.len()];
    let mut items: Vec<(usize, u64)> = Vec::new();
    for (i, (role, bytes)) in nodes.iter().enumerate() {
        match role {
            _ if *bytes == 0 => {}
            Role::Leaf => loc[i] = Loc::Leaf(i),
            Role::View(_) => {}
            Role::Compute(_) => {
                loc[i] = Loc::Slot(items.len());
                items.push((i, (bytes + 2 * pad).next_multiple_of(align)));
            }
        }
    }
    for i in 0..nodes.len() {
        if matches!(nodes[i].0, Role::View(_)) && nodes[i].1 > 0 {
            loc[i] = loc[root[i]];
        }
    }
    // Largest first; ties by computation order (deterministic).
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&k| (std::cmp::Reverse(items[k].1), items[k].0));
    let mut start = vec![0u64; items.len()];
    let mut placed: Vec<usize> = Vec::new();
    let mut arena = 0u64;
    for k in order {
        let (i, size) = items[k];
        let (a, b) = (i, last[i]);
        // Placed values alive at the same time, by offset.
        let mut busy: Vec<(u64, u64)> = placed
            .iter()
            .filter(|&&j| {
                let (c, d) = (items[j].0, last[items[j].0]);
                a <= d && c <= b
            })
            .map(|&j| (start[j], start[j] + items[j].1))
            .collect();
        busy.sort_unstable();
        // The smallest gap that fits (best fit), else above everything.
        let (mut at, mut best): (u64, Option<(u64, u64)>) = (0, None);
        for &(lo, hi) in &busy {
            if lo >= at + size && best.is_none_or(|(_, g)| lo - at < g) {
                best = Some((at, lo - at));
            }
            at = at.max(hi);
        }
        let off = best.map_or(at, |(o, _)| o);
        start[k] = off;
        arena = arena.max(off + size);
        placed.push(k);
    }
    ArenaPlan {
        loc,
        offsets: start.iter().map(|&s| s + pad).collect(),
        bytes: items.iter().map(|&(i, _)| nodes[i].1).collect(),
        arena,
    }
}

/// The most bytes of computed values alive at once under [`plan`]'s lifetimes (each value
/// from its computation to its last read through any alias; outputs to the end), and the
/// position where that peak is reached: the floor any buffer assignment of this order
/// needs, against which [`BufferPlan::slots`]' total shows the pooling's waste.
pub fn live_peak(nodes: &[(Role, u64)], outputs: &[usize]) -> (u64, usize) {
    let n = nodes.len();
    let (root, last) = lifetimes(nodes, outputs);
    // +bytes at its computation, -bytes after its last read (the output is allocated
    // before the operands are released, as in `plan`).
    let mut delta = vec![0i128; n + 2];
    for (i, (role, bytes)) in nodes.iter().enumerate() {
        if matches!(role, Role::Compute(_)) && root[i] == i {
            delta[i] += i128::from(*bytes);
            delta[last[i] + 1] -= i128::from(*bytes);
        }
    }
    let (mut now, mut peak, mut at) = (0i128, 0i128, 0usize);
    for (i, d) in delta.iter().enumerate().take(n) {
        now += d;
        if now > peak {
            (peak, at) = (now, i);
        }
    }
    (peak as u64, at)
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

    /// Random DAGs: values alive at the same time never share a byte, every offset is
    /// aligned, and the arena is at least the live peak and at most what [`plan`] takes.
    #[test]
    fn arena_values_alive_together_never_overlap() {
        let mut seed = 7u64;
        let mut rnd = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for case in 0..200 {
            let n = 2 + rnd(60) as usize;
            let mut nodes = vec![(Role::Leaf, 64)];
            for i in 1..n {
                let bytes = if rnd(10) == 0 { 0 } else { 4 * (1 + rnd(5000)) };
                let role = if rnd(6) == 0 {
                    Role::View(rnd(i as u64) as usize)
                } else {
                    let k = 1 + rnd(3) as usize;
                    Role::Compute((0..k).map(|_| rnd(i as u64) as usize).collect())
                };
                nodes.push((role, bytes));
            }
            let outs = vec![n - 1, rnd(n as u64) as usize];
            let pad = if case % 2 == 0 { 0 } else { 64 };
            let p = plan_arena(&nodes, &outs, 256, pad);
            let (_, last) = lifetimes(&nodes, &outs);
            let mut live: Vec<(usize, usize, u64, u64)> = Vec::new();
            for (i, l) in p.loc.iter().enumerate() {
                if let (Loc::Slot(k), Role::Compute(_)) = (l, &nodes[i].0) {
                    assert_eq!(p.offsets[*k] % 256, pad % 256, "case {case}");
                    assert_eq!(p.bytes[*k], nodes[i].1);
                    let (lo, hi) = (p.offsets[*k] - pad, p.offsets[*k] + p.bytes[*k] + pad);
                    assert!(hi <= p.arena, "case {case}");
                    live.push((i, last[i], lo, hi));
                }
            }
            for x in &live {
                for y in &live {
                    if x.0 < y.0 && x.0 <= y.1 && y.0 <= x.1 {
                        assert!(
                            x.3 <= y.2 || y.3 <= x.2,
                            "case {case}: {x:?} and {y:?} overlap"
                        );
                    }
                }
            }
            // Views share their root's place.
            for (i, (role, bytes)) in nodes.iter().enumerate() {
                if let Role::View(o) = role {
                    if *bytes > 0 && nodes[*o].1 > 0 {
                        assert_eq!(p.loc[i], p.loc[*o], "case {case}");
                    }
                }
            }
            if pad == 0 {
                let (peak, _) = live_peak(&nodes, &outs);
                let pooled: u64 = plan(&nodes, &outs, u64::MAX).slots.iter().sum();
                assert!(p.arena >= peak, "case {case}");
                assert!(p.arena <= pooled.max(peak) + 256 * n as u64, "case {case}");
            }
        }
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
        // The arena: two values of 512 (400 aligned) at a time, the live peak 800.
        let a = plan_arena(&nodes, &[4], 256, 0);
        assert_eq!(a.arena, 1024);
        assert_eq!(live_peak(&nodes, &[4]).0, 800);
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
