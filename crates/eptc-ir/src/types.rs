//! Element types, dimensions and tensor types.

use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    #[default]
    F32,
    F16,
    BF16,
}

impl DType {
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: the symbolic batch `B` (bound at run time) or a fixed size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Batch,
    Fixed(usize),
}

impl Dim {
    /// The size once the batch is bound to `batch`.
    pub fn resolve(self, batch: usize) -> usize {
        match self {
            Dim::Batch => batch,
            Dim::Fixed(n) => n,
        }
    }

    pub fn fixed(self) -> Option<usize> {
        match self {
            Dim::Batch => None,
            Dim::Fixed(n) => Some(n),
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Self {
        Dim::Fixed(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => f.write_str("B"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// A shape: a list of dimensions, possibly containing the symbolic batch.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn new(dims: impl IntoIterator<Item = Dim>) -> Self {
        Shape(dims.into_iter().collect())
    }

    /// A shape of fixed sizes only.
    pub fn fixed(dims: &[usize]) -> Self {
        Shape(dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }

    /// `[B, dims...]`.
    pub fn batched(dims: &[usize]) -> Self {
        let mut v = vec![Dim::Batch];
        v.extend(dims.iter().map(|&d| Dim::Fixed(d)));
        Shape(v)
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    pub fn has_batch(&self) -> bool {
        self.0.contains(&Dim::Batch)
    }

    /// Concrete sizes once the batch is bound.
    pub fn resolve(&self, batch: usize) -> Vec<usize> {
        self.0.iter().map(|d| d.resolve(batch)).collect()
    }

    /// The fixed sizes, or `None` if the shape mentions the batch.
    pub fn as_fixed(&self) -> Option<Vec<usize>> {
        self.0.iter().map(|d| d.fixed()).collect()
    }

    /// Number of elements once the batch is bound.
    pub fn numel(&self, batch: usize) -> usize {
        self.resolve(batch).iter().product()
    }

    /// The number of elements as a multiple of the batch: `(batch_power, fixed_product)`,
    /// i.e. `numel = B^batch_power * fixed_product`.
    pub fn symbolic_numel(&self) -> (usize, usize) {
        let mut p = 0;
        let mut n = 1;
        for d in &self.0 {
            match d {
                Dim::Batch => p += 1,
                Dim::Fixed(k) => n *= k,
            }
        }
        (p, n)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// The type of a node's output: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> Self {
        TensorType { dtype, shape }
    }

    pub fn f32(shape: Shape) -> Self {
        TensorType::new(DType::F32, shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}
