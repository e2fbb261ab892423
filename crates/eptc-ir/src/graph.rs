//! The graph: a petgraph of typed nodes whose edges are ordered operands.

use std::collections::{HashMap, HashSet};

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::error::{IrError, Result};
use crate::infer::infer;
use crate::op::{Activation, BinaryOp, Init, Op, ReduceOp, UnaryOp};
use crate::types::{DType, Shape, TensorType};

/// A node's handle.
pub type NodeId = NodeIndex<u32>;

/// One node: an op, the type of its output, and the pass that inserted it (`None` for
/// nodes the frontend imported).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    pub tag: Option<String>,
}

/// A graph of ops. Edges go from operand to user; the edge weight is the operand's
/// position, so operand order survives any rewiring.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    g: StableDiGraph<Node, u32>,
    outputs: Vec<(String, NodeId)>,
    /// The tag given to nodes added from now on (the pass at work).
    tag: Option<String>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Tag nodes added from now on with the inserting pass's name (`None`: imported).
    pub fn set_tag(&mut self, tag: Option<&str>) {
        self.tag = tag.map(str::to_owned);
    }

    /// The tag nodes added now get (see [`Graph::set_tag`]).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    // ---- building -------------------------------------------------------------------

    /// Add a node whose type is declared (leaves, or a node read from text).
    pub fn add_typed(&mut self, op: Op, operands: &[NodeId], ty: TensorType) -> Result<NodeId> {
        for &o in operands {
            if !self.g.contains_node(o) {
                return Err(IrError::Invalid(format!(
                    "operand %{} does not exist",
                    o.index()
                )));
            }
        }
        let id = self.g.add_node(Node {
            op,
            ty,
            tag: self.tag.clone(),
        });
        for (i, &o) in operands.iter().enumerate() {
            self.g.add_edge(o, id, i as u32);
        }
        Ok(id)
    }

    /// Add a non-leaf op; its type comes from the op's shape rule.
    pub fn add(&mut self, op: Op, operands: &[NodeId]) -> Result<NodeId> {
        let tys: Vec<&TensorType> = operands.iter().map(|&o| &self.g[o].ty).collect();
        let ty = infer(&op, &tys).map_err(|msg| IrError::Shape {
            op: op.kind().to_string(),
            node: self.g.node_count(),
            msg,
        })?;
        self.add_typed(op, operands, ty)
    }

    pub fn input(&mut self, name: &str, ty: TensorType) -> NodeId {
        self.add_typed(Op::Input { name: name.into() }, &[], ty)
            .expect("leaves have no operands")
    }

    pub fn param(&mut self, name: &str, trainable: bool, init: Init, ty: TensorType) -> NodeId {
        let op = Op::Param {
            name: name.into(),
            trainable,
            init,
        };
        self.add_typed(op, &[], ty)
            .expect("leaves have no operands")
    }

    /// A constant of a fixed shape; `values` must hold one value per element.
    pub fn constant(&mut self, values: Vec<f32>, shape: &[usize]) -> Result<NodeId> {
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(IrError::Invalid(format!(
                "constant of shape {shape:?} needs {n} values, got {}",
                values.len()
            )));
        }
        self.add_typed(
            Op::Const { values },
            &[],
            TensorType::f32(Shape::fixed(shape)),
        )
    }

    /// A scalar constant (shape `[]`).
    pub fn scalar(&mut self, v: f32) -> NodeId {
        self.constant(vec![v], &[]).expect("one value for a scalar")
    }

    pub fn matmul(
        &mut self,
        a: NodeId,
        b: NodeId,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Result<NodeId> {
        self.add(
            Op::MatMul {
                transpose_a,
                transpose_b,
            },
            &[a, b],
        )
    }
    pub fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.add(Op::Binary(op), &[a, b])
    }
    pub fn unary(&mut self, op: UnaryOp, a: NodeId) -> Result<NodeId> {
        self.add(Op::Unary(op), &[a])
    }
    pub fn reduce(
        &mut self,
        op: ReduceOp,
        a: NodeId,
        axes: &[usize],
        keepdim: bool,
    ) -> Result<NodeId> {
        self.add(
            Op::Reduce {
                op,
                axes: axes.to_vec(),
                keepdim,
            },
            &[a],
        )
    }
    pub fn softmax(&mut self, a: NodeId, axis: usize) -> Result<NodeId> {
        self.add(Op::Softmax { axis }, &[a])
    }
    pub fn layernorm(
        &mut self,
        x: NodeId,
        gamma: NodeId,
        beta: NodeId,
        eps: f32,
    ) -> Result<NodeId> {
        self.add(Op::LayerNorm { eps }, &[x, gamma, beta])
    }
    pub fn reshape(&mut self, a: NodeId, shape: Shape) -> Result<NodeId> {
        self.add(Op::Reshape { shape }, &[a])
    }
    pub fn permute(&mut self, a: NodeId, perm: &[usize]) -> Result<NodeId> {
        self.add(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[a],
        )
    }
    pub fn concat(&mut self, parts: &[NodeId], axis: usize) -> Result<NodeId> {
        self.add(Op::Concat { axis }, parts)
    }
    pub fn slice(&mut self, a: NodeId, axis: usize, start: usize, end: usize) -> Result<NodeId> {
        self.add(Op::Slice { axis, start, end }, &[a])
    }
    pub fn broadcast(&mut self, a: NodeId, shape: Shape) -> Result<NodeId> {
        self.add(Op::Broadcast { shape }, &[a])
    }
    pub fn patchify(&mut self, a: NodeId, patch: usize) -> Result<NodeId> {
        self.add(Op::Patchify { patch }, &[a])
    }

    // ---- fused ops ------------------------------------------------------------------

    pub fn softmax_sink(&mut self, s: NodeId, z: NodeId) -> Result<NodeId> {
        self.add(Op::SoftmaxSink, &[s, z])
    }
    /// `attention(q, k, v[, z])`; `sink` is set iff `z` is given.
    pub fn attention(
        &mut self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        z: Option<NodeId>,
        scale: f32,
    ) -> Result<NodeId> {
        let mut ops = vec![q, k, v];
        ops.extend(z);
        let sink = z.is_some();
        self.add(Op::Attention { scale, sink }, &ops)
    }
    /// `linear(x, w[, b][, r])`; `bias` and `residual` are set iff `b` and `r` are given.
    pub fn linear(
        &mut self,
        x: NodeId,
        w: NodeId,
        b: Option<NodeId>,
        activation: Activation,
        r: Option<NodeId>,
    ) -> Result<NodeId> {
        let mut ops = vec![x, w];
        ops.extend(b);
        ops.extend(r);
        let op = Op::Linear {
            bias: b.is_some(),
            activation,
            residual: r.is_some(),
        };
        self.add(op, &ops)
    }

    // ---- outputs --------------------------------------------------------------------

    /// Name `id` as a graph output (replacing an output of the same name).
    pub fn set_output(&mut self, name: &str, id: NodeId) {
        if let Some(o) = self.outputs.iter_mut().find(|(n, _)| n == name) {
            o.1 = id;
        } else {
            self.outputs.push((name.to_string(), id));
        }
    }

    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs.iter().find(|(n, _)| n == name).map(|o| o.1)
    }

    pub fn remove_output(&mut self, name: &str) {
        self.outputs.retain(|(n, _)| n != name);
    }

    // ---- reading --------------------------------------------------------------------

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id)
    }

    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.g[id].ty
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// The underlying petgraph (edges: operand -> user, weight = operand position).
    pub fn petgraph(&self) -> &StableDiGraph<Node, u32> {
        &self.g
    }

    /// A node's operands, in order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(u32, NodeId)> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        e.sort_by_key(|x| x.0);
        e.into_iter().map(|x| x.1).collect()
    }

    /// The nodes using `id` (each once), in index order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self.g.neighbors_directed(id, Direction::Outgoing).collect();
        u.sort();
        u.dedup();
        u
    }

    /// All node ids in index order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.g.node_indices().collect()
    }

    /// A deterministic topological order that reads well: a depth-first post-order from
    /// the outputs (in output order), operands visited in operand order, so every node
    /// comes right after what it needs. Nodes no output reaches follow, in index order.
    /// The order depends only on the graph's structure, not on how it was built.
    /// Errors on a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeId>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Open,
            Done,
        }
        let mut mark: HashMap<NodeId, Mark> = HashMap::with_capacity(self.g.node_count());
        let mut order = Vec::with_capacity(self.g.node_count());
        let roots: Vec<NodeId> = self
            .outputs
            .iter()
            .map(|o| o.1)
            .chain(self.g.node_indices())
            .collect();
        for root in roots {
            if mark.contains_key(&root) {
                continue;
            }
            // (node, operands, next operand to visit)
            let mut stack = vec![(root, self.operands(root), 0usize)];
            mark.insert(root, Mark::Open);
            while let Some((n, ops, i)) = stack.last_mut() {
                if let Some(&o) = ops.get(*i) {
                    *i += 1;
                    match mark.get(&o) {
                        Some(Mark::Done) => {}
                        Some(Mark::Open) => {
                            return Err(IrError::Invalid(format!(
                                "the graph has a cycle through %{}",
                                o.index()
                            )))
                        }
                        None => {
                            mark.insert(o, Mark::Open);
                            let ops = self.operands(o);
                            stack.push((o, ops, 0));
                        }
                    }
                } else {
                    let n = *n;
                    mark.insert(n, Mark::Done);
                    order.push(n);
                    stack.pop();
                }
            }
        }
        Ok(order)
    }

    /// Parameters: `(id, name, trainable)` in topological order.
    pub fn params(&self) -> Vec<(NodeId, &str, bool)> {
        self.topo_order()
            .unwrap_or_else(|_| self.node_ids())
            .into_iter()
            .filter_map(|id| match &self.g[id].op {
                Op::Param {
                    name, trainable, ..
                } => Some((id, name.as_str(), *trainable)),
                _ => None,
            })
            .collect()
    }

    pub fn find_param(&self, name: &str) -> Option<NodeId> {
        self.g
            .node_indices()
            .find(|&id| matches!(&self.g[id].op, Op::Param { name: n, .. } if n == name))
    }

    pub fn find_input(&self, name: &str) -> Option<NodeId> {
        self.g
            .node_indices()
            .find(|&id| matches!(&self.g[id].op, Op::Input { name: n } if n == name))
    }

    /// The number of trainable scalars (batch-free shapes only).
    pub fn trainable_count(&self) -> usize {
        self.params()
            .into_iter()
            .filter(|p| p.2)
            .map(|(id, _, _)| self.g[id].ty.shape.numel(1))
            .sum()
    }

    // ---- rewriting ------------------------------------------------------------------

    /// Make operand `pos` of `user` be `new`.
    pub fn set_operand(&mut self, user: NodeId, pos: usize, new: NodeId) {
        let old: Vec<_> = self
            .g
            .edges_directed(user, Direction::Incoming)
            .filter(|e| *e.weight() as usize == pos)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
        self.g.add_edge(new, user, pos as u32);
    }

    /// Redirect every use of `old` (operands and outputs) to `new`, except uses by the
    /// nodes in `except` (typically `new`'s own subgraph, which reads `old`).
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId, except: &[NodeId]) {
        let except: HashSet<NodeId> = except.iter().copied().collect();
        let edges: Vec<_> = self
            .g
            .edges_directed(old, Direction::Outgoing)
            .filter(|e| !except.contains(&e.target()) && e.target() != new)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (e, target, w) in edges {
            self.g.remove_edge(e);
            self.g.add_edge(new, target, w);
        }
        for o in &mut self.outputs {
            if o.1 == old {
                o.1 = new;
            }
        }
    }

    /// Remove node `id` and its edges, returning it (`None` if it does not exist). Its
    /// users are left without that operand and an output naming it dangles: redirect
    /// them first ([`Graph::replace_uses`]).
    pub fn remove_node(&mut self, id: NodeId) -> Option<Node> {
        self.g.remove_node(id)
    }

    /// Remove every node no output depends on. Returns how many were removed.
    pub fn remove_dead(&mut self) -> usize {
        let mut live: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|o| o.1).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.g.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<NodeId> = self
            .g
            .node_indices()
            .filter(|n| !live.contains(n))
            .collect();
        for &n in &dead {
            self.g.remove_node(n);
        }
        dead.len()
    }

    /// A copy with nodes renumbered densely in topological order (what the text format
    /// prints), so that two graphs built in different orders compare equal.
    pub fn compacted(&self) -> Result<Graph> {
        let order = self.topo_order()?;
        let mut map = HashMap::new();
        let mut out = Graph::new(self.name.clone());
        for id in order {
            let ops: Vec<NodeId> = self.operands(id).iter().map(|o| map[o]).collect();
            let n = &self.g[id];
            out.tag = n.tag.clone();
            let new = out.add_typed(n.op.clone(), &ops, n.ty.clone())?;
            map.insert(id, new);
        }
        out.tag = self.tag.clone();
        out.outputs = self
            .outputs
            .iter()
            .map(|(n, id)| (n.clone(), map[id]))
            .collect();
        Ok(out)
    }

    /// The element type most of the graph computes in (that of its first input).
    pub fn dtype(&self) -> DType {
        self.g
            .node_indices()
            .find(|&n| matches!(self.g[n].op, Op::Input { .. }))
            .map(|n| self.g[n].ty.dtype)
            .unwrap_or(DType::F32)
    }
}
