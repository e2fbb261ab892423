//! The interpreter: a graph compiled into a list of slots in topological order, each a
//! leaf or an op reading earlier slots. Every value is moved out of its slot by its last
//! reader, so intermediates die as early as possible and a kernel can reuse the buffer
//! of an operand it was the last to read.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use eptc_backend::{bind_batch, check_param, BackendError, Executable, Result};
use eptc_ir::{DType, Graph, HostTensor, Op, Shape, WeightStore};
use rayon::ThreadPool;

use crate::eval::eval;
use crate::pool::BufferPool;
use crate::value::Value;

enum Kind {
    Input(String),
    Param(Value),
    Const(Value),
    Compute {
        op: Op,
        operands: Vec<usize>,
        /// Per operand: this is its slot's last read, so move the value out.
        take: Vec<bool>,
    },
}

struct Slot {
    /// The node's index in the graph, for error messages.
    node: usize,
    shape: Shape,
    kind: Kind,
    /// Some output depends on it (dead nodes are never computed).
    live: bool,
}

/// A graph compiled for the CPU.
pub struct CpuExecutable {
    graph: Graph,
    pool: Arc<ThreadPool>,
    slots: Vec<Slot>,
    outputs: Vec<(String, usize)>,
    params: HashMap<String, Vec<usize>>,
    /// Intermediate buffers freed by earlier runs, handed out again.
    buffers: Arc<BufferPool>,
    /// `EPTC_CPU_PROFILE` set at compile time: print time per op kind after each run.
    profile: bool,
}

fn other(node: usize, kind: &str, msg: impl std::fmt::Display) -> BackendError {
    BackendError::Other(format!("{kind} (node %{node}): {msg}"))
}

impl CpuExecutable {
    /// Check `graph` against the CPU backend and `weights`, and plan its execution.
    pub fn new(graph: &Graph, weights: &WeightStore, pool: Arc<ThreadPool>) -> Result<Self> {
        let order = graph
            .topo_order()
            .map_err(|e| BackendError::Other(e.to_string()))?;
        let pos: HashMap<_, _> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let outputs: Vec<(String, usize)> = graph
            .outputs()
            .iter()
            .map(|(n, id)| {
                pos.get(id)
                    .map(|&p| (n.clone(), p))
                    .ok_or_else(|| BackendError::Other(format!("output {n:?} has no node")))
            })
            .collect::<Result<_>>()?;
        let is_output: HashSet<usize> = outputs.iter().map(|o| o.1).collect();

        let mut slots = Vec::with_capacity(order.len());
        let mut params: HashMap<String, Vec<usize>> = HashMap::new();
        let mut last_read = vec![None::<(usize, usize)>; order.len()];
        for (i, &id) in order.iter().enumerate() {
            let node = graph.node(id);
            let (kind_name, n) = (node.op.kind(), id.index());
            if node.ty.dtype != DType::F32 {
                return Err(BackendError::Unsupported {
                    backend: "cpu".into(),
                    op: format!("{kind_name} in {}", node.ty.dtype),
                    node: n,
                });
            }
            let operands: Vec<usize> = graph.operands(id).iter().map(|o| pos[o]).collect();
            let arity_ok = match node.op.arity() {
                Some(k) => operands.len() == k,
                None => operands.len() >= 2,
            };
            if !arity_ok {
                return Err(other(n, kind_name, format!("{} operands", operands.len())));
            }
            let fixed = || {
                node.ty
                    .shape
                    .as_fixed()
                    .ok_or_else(|| other(n, kind_name, "a leaf's shape cannot depend on B"))
            };
            let kind = match &node.op {
                Op::Input { name } => Kind::Input(name.clone()),
                Op::Param { name, .. } => {
                    let t = weights
                        .get(name)
                        .ok_or_else(|| BackendError::MissingParam(name.clone()))?;
                    check_param(name, &fixed()?, t)?;
                    params.entry(name.clone()).or_default().push(i);
                    Kind::Param(Value::host(t.clone()))
                }
                Op::Const { values } => {
                    let shape = fixed()?;
                    if values.len() != shape.iter().product::<usize>() {
                        return Err(other(n, kind_name, "value count does not match shape"));
                    }
                    Kind::Const(Value::new(shape, values.clone()))
                }
                op => {
                    for (j, &o) in operands.iter().enumerate() {
                        last_read[o] = Some((i, j));
                    }
                    Kind::Compute {
                        op: op.clone(),
                        take: vec![false; operands.len()],
                        operands,
                    }
                }
            };
            slots.push(Slot {
                node: n,
                shape: node.ty.shape.clone(),
                kind,
                live: false,
            });
        }
        // Last reads move the value out (outputs stay until the end).
        for (o, lr) in last_read.iter().enumerate() {
            if let (Some((i, j)), false) = (lr, is_output.contains(&o)) {
                if let Kind::Compute { take, .. } = &mut slots[*i].kind {
                    take[*j] = true;
                }
            }
        }
        // Liveness: backwards from the outputs.
        let mut stack: Vec<usize> = outputs.iter().map(|o| o.1).collect();
        while let Some(s) = stack.pop() {
            if !std::mem::replace(&mut slots[s].live, true) {
                if let Kind::Compute { operands, .. } = &slots[s].kind {
                    stack.extend(operands);
                }
            }
        }
        Ok(CpuExecutable {
            graph: graph.clone(),
            pool,
            slots,
            outputs,
            params,
            buffers: Arc::default(),
            profile: std::env::var_os("EPTC_CPU_PROFILE").is_some(),
        })
    }

    fn run_inner(&self, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        let batch = bind_batch(&self.graph, inputs)?;
        let _active = self.buffers.activate();
        let mut vals: Vec<Option<Value>> = vec![None; self.slots.len()];
        let mut prof = eptc_backend::Profile::default();
        for (i, slot) in self.slots.iter().enumerate() {
            if !slot.live {
                continue;
            }
            let v = match &slot.kind {
                Kind::Input(name) => {
                    let t = inputs
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, t)| t)
                        .ok_or_else(|| BackendError::MissingInput(name.clone()))?;
                    if t.data().len() != t.numel() {
                        return Err(BackendError::InputShape {
                            name: name.clone(),
                            expected: format!("{} values", t.numel()),
                            found: vec![t.data().len()],
                        });
                    }
                    Value::host(t.clone())
                }
                Kind::Param(v) | Kind::Const(v) => v.clone(),
                Kind::Compute { op, operands, take } => {
                    let args = operands
                        .iter()
                        .zip(take)
                        .map(|(&o, &t)| if t { vals[o].take() } else { vals[o].clone() })
                        .collect::<Option<Vec<Value>>>()
                        .ok_or_else(|| other(slot.node, op.kind(), "operand not computed"))?;
                    let t0 = self.profile.then(std::time::Instant::now);
                    let v = eval(op, args, batch, &slot.shape)
                        .map_err(|msg| other(slot.node, op.kind(), msg))?;
                    if let Some(t0) = t0 {
                        prof.record(op.kind(), t0.elapsed().as_secs_f64());
                    }
                    v
                }
            };
            vals[i] = Some(v);
        }
        if self.profile {
            prof.print("eptc-cpu profile", "ops", "calls");
        }
        let mut out = Vec::with_capacity(self.outputs.len());
        for (k, (name, s)) in self.outputs.iter().enumerate() {
            let again = self.outputs[k + 1..].iter().any(|o| o.1 == *s);
            let v = if again {
                vals[*s].clone()
            } else {
                vals[*s].take()
            };
            let v = v.ok_or_else(|| BackendError::Other(format!("output {name:?} missing")))?;
            out.push((name.clone(), v.into_host()));
        }
        Ok(out)
    }
}

impl Executable for CpuExecutable {
    fn set_param(&mut self, name: &str, value: HostTensor) -> Result<()> {
        let slots = self
            .params
            .get(name)
            .ok_or_else(|| BackendError::Other(format!("the graph has no parameter {name:?}")))?;
        for &s in slots {
            let expected = self.slots[s].shape.as_fixed().unwrap_or_default();
            check_param(name, &expected, &value)?;
        }
        for &s in slots {
            self.slots[s].kind = Kind::Param(Value::host(value.clone()));
        }
        Ok(())
    }

    fn run(&mut self, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        let pool = Arc::clone(&self.pool);
        pool.install(|| self.run_inner(inputs))
    }
}
