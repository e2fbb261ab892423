//! Strides of concrete row-major shapes, shared by the backends' kernels.

/// Row-major strides of a contiguous tensor.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Strides that read a contiguous tensor of shape `from` broadcast (numpy rules, aligned
/// on the right) to `to`: 0 along broadcast dimensions. `from` must broadcast to `to`.
pub fn broadcast_strides(from: &[usize], to: &[usize]) -> Vec<usize> {
    let own = contiguous_strides(from);
    let lead = to.len() - from.len();
    (0..to.len())
        .map(|d| {
            if d < lead || from[d - lead] == 1 {
                0
            } else {
                own[d - lead]
            }
        })
        .collect()
}

/// Merge the dims of an index space read through several stride sets: size-1 dims
/// vanish and neighbours fuse where every stride set steps through them as one.
/// May return no dims at all (a single element).
pub fn merge_dims(shape: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut dims: Vec<usize> = Vec::new();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        let fuse = !dims.is_empty()
            && strides
                .iter()
                .zip(&out)
                .all(|(s, o)| o.last().is_some_and(|&last| last == s[d] * shape[d]));
        if fuse {
            if let Some(l) = dims.last_mut() {
                *l *= shape[d];
            }
            for (s, o) in strides.iter().zip(out.iter_mut()) {
                if let Some(l) = o.last_mut() {
                    *l = s[d];
                }
            }
        } else {
            dims.push(shape[d]);
            for (s, o) in strides.iter().zip(out.iter_mut()) {
                o.push(s[d]);
            }
        }
    }
    (dims, out)
}
