//! eptc's graph optimizer: equality saturation with `egg` over the IR.
//!
//! [`optimize`] loads a graph into an e-graph (one e-node per IR node, sharing kept),
//! saturates it with the named rules of [`rules`] under node, iteration and time limits,
//! and extracts the cheapest program by a cost model of bytes moved and flops in which
//! ops the backend does not support cost infinity. Fused ops keep their decomposition
//! (`eptc_ir::decompose`), so any backend can still run any extracted graph.

pub mod convert;
pub mod cost;
pub mod fold;
pub mod lang;
pub mod rules;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use egg::{Extractor, Runner};
use eptc_ir::{Graph, Op};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OptError {
    #[error(transparent)]
    Ir(#[from] eptc_ir::IrError),
    #[error("optimizer: {0}")]
    Internal(String),
}

/// Bounds on saturation.
#[derive(Clone, Debug)]
pub struct Limits {
    pub iterations: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            iterations: 30,
            nodes: 200_000,
            time: Duration::from_secs(10),
        }
    }
}

/// What the optimizer did, for the manifest and the compile summary.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Times each rule was applied (summed over iterations).
    pub rules_fired: BTreeMap<String, usize>,
    pub attention_fused: usize,
    pub attention_with_sink: usize,
    pub linear_fused: usize,
    /// Frozen weights computed at compile time by [`fold::split_constants`] (set by the
    /// caller that folds).
    #[serde(default)]
    pub folded_weights: usize,
    pub iterations: usize,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub stop_reason: String,
    pub seconds: f64,
}

/// Optimize `g` for a backend that supports the op kinds `supports` accepts.
///
/// Expressions over frozen weights only (what the folds leave) are extracted whatever
/// their ops, since they are computed once at compile time: cut them out with
/// [`fold::split_constants`] and compute them before running the graph.
pub fn optimize(
    g: &Graph,
    supports: &dyn Fn(&str) -> bool,
    limits: &Limits,
) -> Result<(Graph, Summary), OptError> {
    let t0 = Instant::now();
    // Fused ops the backend lacks enter as their decompositions.
    let mut input = g.clone();
    eptc_ir::decompose::lower_unsupported(&mut input, supports)?;
    let loaded = convert::load(&input)?;
    let root = loaded.root;
    let runner = Runner::default()
        .with_egraph(loaded.egraph)
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(limits.time)
        .run(&rules::rules());
    let mut rules_fired = BTreeMap::new();
    for it in &runner.iterations {
        for (name, n) in &it.applied {
            *rules_fired.entry(name.to_string()).or_insert(0) += n;
        }
    }
    let stop_reason = match &runner.stop_reason {
        Some(r) => format!("{r:?}"),
        None => "none".to_string(),
    };
    let iterations = runner.iterations.len();
    let egraph = runner.egraph;
    if egraph.analysis.conflicts > 0 {
        return Err(OptError::Internal(format!(
            "{} e-class merges joined values of different types (a rule is wrong)",
            egraph.analysis.conflicts
        )));
    }
    let (egraph_nodes, egraph_classes) = (egraph.total_size(), egraph.number_of_classes());
    let loaded = convert::Loaded { egraph, ..loaded };
    let out = {
        let cost = cost::Cost {
            eg: &loaded.egraph,
            supports,
        };
        let ex = Extractor::new(&loaded.egraph, cost);
        if !ex.find_best_cost(root).is_finite() {
            return Err(OptError::Internal(
                "no program of ops the backend supports".into(),
            ));
        }
        convert::extract(&loaded, &|c| ex.find_best_node(c).clone())?
    };
    let count = |f: &dyn Fn(&Op) -> bool| {
        out.node_ids()
            .into_iter()
            .filter(|&id| f(&out.node(id).op))
            .count()
    };
    let summary = Summary {
        nodes_before: g.len(),
        nodes_after: out.len(),
        rules_fired,
        attention_fused: count(&|o| matches!(o, Op::Attention { .. })),
        attention_with_sink: count(&|o| matches!(o, Op::Attention { sink: true, .. })),
        linear_fused: count(&|o| matches!(o, Op::Linear { .. })),
        folded_weights: 0,
        iterations,
        egraph_nodes,
        egraph_classes,
        stop_reason,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((out, summary))
}
