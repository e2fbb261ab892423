//! Strided index spaces shared by the kernels: broadcast strides, dimension merging, an
//! odometer over rows, and how work is cut into parallel chunks.

pub use eptc_ir::strides::{broadcast_strides, contiguous_strides};

/// [`eptc_ir::strides::merge_dims`], with at least one dimension (a single element is
/// `[1]` with stride 0), as the CPU loops want.
pub fn merge_dims(shape: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let (mut dims, mut out) = eptc_ir::strides::merge_dims(shape, strides);
    if dims.is_empty() {
        dims.push(1);
        for o in out.iter_mut() {
            o.push(0);
        }
    }
    (dims, out)
}

/// Walks the rows (every index but the last) of a merged index space, keeping each
/// operand's offset at the start of the current row.
pub struct Odometer<'a, const K: usize> {
    dims: &'a [usize],
    strides: [&'a [usize]; K],
    idx: Vec<usize>,
    pub offs: [usize; K],
}

impl<'a, const K: usize> Odometer<'a, K> {
    /// Positioned at row `row` of the space `dims` (all but the last dimension count).
    pub fn new(dims: &'a [usize], strides: [&'a [usize]; K], row: usize) -> Self {
        let outer = dims.len() - 1;
        let mut idx = vec![0; outer];
        let mut rest = row;
        for d in (0..outer).rev() {
            idx[d] = rest % dims[d];
            rest /= dims[d];
        }
        let mut offs = [0; K];
        for (o, s) in offs.iter_mut().zip(&strides) {
            *o = idx.iter().zip(s.iter()).map(|(i, s)| i * s).sum();
        }
        Odometer {
            dims,
            strides,
            idx,
            offs,
        }
    }

    /// Step to the next row.
    pub fn advance(&mut self) {
        for d in (0..self.idx.len()).rev() {
            self.idx[d] += 1;
            for (o, s) in self.offs.iter_mut().zip(&self.strides) {
                *o += s[d];
            }
            if self.idx[d] < self.dims[d] {
                return;
            }
            for (o, s) in self.offs.iter_mut().zip(&self.strides) {
                *o -= s[d] * self.dims[d];
            }
            self.idx[d] = 0;
        }
    }
}

/// Elements per parallel task below which splitting costs more than it gains.
pub const MIN_TASK: usize = 1 << 14;

/// How many rows of `row_len` elements one parallel task takes: about four tasks per
/// thread, none smaller than [`MIN_TASK`] elements. Results never depend on it: every
/// output element is computed the same way whichever task holds it.
pub fn rows_per_task(rows: usize, row_len: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = rows.div_ceil(threads * 4);
    let by_size = MIN_TASK.div_ceil(row_len.max(1));
    by_threads.max(by_size).clamp(1, rows.max(1))
}

/// `out` split into chunks of whole rows, as `rows_per_task` sizes them.
pub fn chunk_len(total: usize, row_len: usize) -> usize {
    let rows = total / row_len.max(1);
    (rows_per_task(rows, row_len) * row_len).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_contiguous_and_drops_ones() {
        let shape = [2, 1, 3, 4];
        let s = contiguous_strides(&shape);
        let (d, st) = merge_dims(&shape, &[s]);
        assert_eq!(d, vec![24]);
        assert_eq!(st, vec![vec![1]]);
    }

    #[test]
    fn bias_broadcast_keeps_two_dims() {
        let out = [2, 3, 4];
        let a = contiguous_strides(&out);
        let b = broadcast_strides(&[4], &out);
        assert_eq!(b, vec![0, 0, 1]);
        let (d, st) = merge_dims(&out, &[a, b]);
        assert_eq!(d, vec![6, 4]);
        assert_eq!(st, vec![vec![4, 1], vec![0, 1]]);
    }

    #[test]
    fn odometer_walks_rows() {
        let dims = [2, 3, 5];
        let s = [15usize, 5, 1];
        let mut o = Odometer::new(&dims, [&s], 0);
        for r in 0..6 {
            assert_eq!(o.offs[0], r * 5);
            o.advance();
        }
        let o = Odometer::new(&dims, [&s], 4);
        assert_eq!(o.offs[0], 20);
    }
}
