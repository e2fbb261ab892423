//! The rewrite rules, each named and readable as math. They are directed (fusions and
//! simplifications); none is associative or commutative, so saturation stays small.
//!
//! | rule | rewrite |
//! |---|---|
//! | `ept-sink` | `slice(softmax(concat(R, S)), L..L+M) = softmax_sink(S, logsumexp(R))` (R: `[.., N, L]`) |
//! | `lse-of-broadcast` | `logsumexp(broadcast(P)) = broadcast(logsumexp(P))` along the last axis |
//! | `sink-drop-broadcast` | `softmax_sink(S, broadcast(z)) = softmax_sink(S, z)` |
//! | `attention` | `softmax(c · Q Kᵀ) V = attention_c(Q, K, V)` |
//! | `attention-sink` | `softmax_sink(c · Q Kᵀ, z) V = attention_c(Q, K, V, z)` |
//! | `linear-bias` | `x Wᵀ + b = linear(x, W, b)` |
//! | `linear-gelu` | `gelu(linear(x, W, b)) = linear_gelu(x, W, b)` |
//! | `linear-residual`, `linear-residual-r` | `r + linear(..) = linear(.., r)` |
//! | `layernorm-affine-fold[-residual]` | `linear(LN_{g,β}(x), W, b) = linear(LN_{1,0}(x), W·diag(g), b + Wβ)` |
//! | `scale-fold-qkv[-sink]`, `scale-fold-q[-sink]` | `attention_c(Q, K, V) = attention_1(cQ, K, V)`, `c` folded into the frozen query weights and bias (fused qkv rows `0..D`, or a separate query projection) |
//! | `scale-fold-qkv-scores`, `scale-fold-q-scores` | `c · Q Kᵀ = (cQ) Kᵀ` with the same folded projection, for graphs that read the logits (multi-cat) |
//! | `reshape-reshape`, `reshape-id`, `broadcast-id`, `permute-permute` | layout simplifications |
//!
//! Folds leave expressions over frozen weights only; `fold::split_constants` computes
//! them once at compile time.

use egg::{
    rewrite as rw, Applier, Condition, ConditionalApplier, Id, Pattern, PatternAst, Rewrite, Subst,
    Symbol, SymbolLang, Var,
};
use eptc_ir::infer::broadcasts_to;
use eptc_ir::{Dim, Shape};

use crate::lang::{self, float_attr, scalar_const, ty, Types};

type G = lang::Graph;
type Rw = Rewrite<SymbolLang, Types>;

fn var(s: &str) -> Var {
    s.parse().expect("valid variable")
}

fn pat(s: &str) -> Pattern<SymbolLang> {
    s.parse().expect("valid pattern")
}

fn attr(eg: &mut G, s: impl Into<String>) -> Id {
    eg.add(SymbolLang::leaf(s.into()))
}

fn int_of(eg: &G, id: Id) -> Option<usize> {
    lang::leaf_symbol(eg, id)?.as_str().parse().ok()
}

/// A condition written as a closure over the e-graph and the match.
struct If<F>(F, Vec<Var>);

impl<F: Fn(&G, &Subst) -> Option<bool>> Condition<SymbolLang, Types> for If<F> {
    fn check(&self, eg: &mut G, _eclass: Id, s: &Subst) -> bool {
        (self.0)(eg, s).unwrap_or(false)
    }
    fn vars(&self) -> Vec<Var> {
        self.1.clone()
    }
}

/// An applier that builds the right-hand side in code (for computed attributes).
struct Build<F>(F);

impl<F: Fn(&mut G, Id, &Subst) -> Option<Id>> Applier<SymbolLang, Types> for Build<F> {
    fn apply_one(
        &self,
        eg: &mut G,
        eclass: Id,
        s: &Subst,
        _: Option<&PatternAst<SymbolLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        match (self.0)(eg, eclass, s) {
            Some(new) if eg.union(eclass, new) => vec![eclass],
            _ => vec![],
        }
    }
}

/// The fused-attention rewrite: reads the scale from the scalar constant `?c`.
fn attention(eg: &mut G, s: &Subst, sink: bool) -> Option<Id> {
    let scale = scalar_const(eg, s[var("?c")])?;
    let mut children = vec![
        attr(eg, float_attr(scale)),
        s[var("?q")],
        s[var("?k")],
        s[var("?v")],
    ];
    if sink {
        children.push(s[var("?z")]);
    }
    Some(eg.add(SymbolLang::new("attention", children)))
}

/// A constant leaf (added to the leaf table once per distinct value).
fn constant(eg: &mut G, values: Vec<f32>, shape: &[usize]) -> Id {
    let ty = eptc_ir::TensorType::f32(Shape::fixed(shape));
    let table = &mut eg.analysis.table.leaves;
    let k = match table.iter().position(|(op, t, _)| {
        *t == ty && matches!(op, eptc_ir::Op::Const { values: v } if *v == values)
    }) {
        Some(k) => k,
        None => {
            table.push((
                eptc_ir::Op::Const { values },
                ty,
                Some(crate::convert::TAG.to_string()),
            ));
            table.len() - 1
        }
    };
    eg.add(SymbolLang::leaf(format!("${k}")))
}

/// A frozen param of the checkpoint (not a constant the optimizer made).
fn frozen_param(eg: &G, id: Id) -> bool {
    matches!(
        lang::ir_leaf(eg, id),
        Some((
            eptc_ir::Op::Param {
                trainable: false,
                ..
            },
            _,
            _
        ))
    )
}

fn node(eg: &mut G, op: &str, children: Vec<Id>) -> Id {
    eg.add(SymbolLang::new(op, children))
}

/// LayerNorm's affine folded into the next linear layer (frozen weights only):
/// `linear(LN_{g,β}(x), W, b) = linear(LN_{1,0}(x), W·diag(g), b + W β)`.
fn fold_layernorm(eg: &mut G, s: &Subst, residual: bool) -> Option<Id> {
    let (g, beta, w, b) = (s[var("?g")], s[var("?beta")], s[var("?w")], s[var("?b")]);
    // g, β: the checkpoint's own (so a folded LayerNorm is not folded again); W, b: any
    // compile-time constant (e.g. already scaled).
    if !(frozen_param(eg, g)
        && frozen_param(eg, beta)
        && lang::is_constant(eg, w)
        && lang::is_constant(eg, b))
    {
        return None;
    }
    let wt = ty(eg, w)?.shape.as_fixed()?;
    let (out, inp) = (wt[0], wt[1]);
    let ones = constant(eg, vec![1.0; inp], &[inp]);
    let zeros = constant(eg, vec![0.0; inp], &[inp]);
    let ln = node(
        eg,
        "layernorm",
        vec![s[var("?eps")], s[var("?x")], ones, zeros],
    );
    let w2 = node(eg, "mul", vec![w, g]);
    let col = attr(eg, format!("s:{inp},1"));
    let beta_col = node(eg, "reshape", vec![col, beta]);
    let (f, t) = (attr(eg, "0"), attr(eg, "0"));
    let wb = node(eg, "matmul", vec![f, t, w, beta_col]);
    let flat = attr(eg, format!("s:{out}"));
    let wb = node(eg, "reshape", vec![flat, wb]);
    let b2 = node(eg, "add", vec![b, wb]);
    let mut children = vec![s[var("?spec")], ln, w2, b2];
    if residual {
        children.push(s[var("?r")]);
    }
    Some(node(eg, "linear", children))
}

/// `?spec` is a linear with bias and nothing after it (a scale commutes with it, not with
/// an activation or a residual).
fn plain_linear(eg: &G, s: &Subst) -> bool {
    lang::leaf_symbol(eg, s[var("?spec")]).is_some_and(|sym| sym.as_str() == "lin:1:none:0")
}

/// The scale of an attention's `f:` attribute.
fn scale_attr(eg: &G, id: Id) -> Option<f32> {
    lang::leaf_symbol(eg, id)?
        .as_str()
        .strip_prefix("f:")?
        .parse()
        .ok()
}

/// The fused qkv projection (`[3D, dim]`, rows `0..D` the queries, as timm and mmcls lay
/// them out) with its query rows scaled by `c`: the new `permute(reshape(linear))` value.
fn scaled_qkv(eg: &mut G, s: &Subst, c: f32) -> Option<Id> {
    let (w, b) = (s[var("?w")], s[var("?b")]);
    if c == 1.0 || !plain_linear(eg, s) || !lang::is_constant(eg, w) || !lang::is_constant(eg, b) {
        return None;
    }
    // reshape [B, N, 3D] to [B, N, 3, H, hd] (features only), permute [2,0,3,1,4]: the
    // leading 3 is q, k, v.
    let s5 = shape_of_attr(eg, s[var("?s5")])?;
    let perm = perm_of(eg, s[var("?p")])?;
    let rows = ty(eg, w)?.shape.as_fixed()?[0];
    let x = ty(eg, s[var("?x")])?.shape.clone();
    let split_features = x.rank() == 3
        && s5.rank() == 5
        && s5.dims()[..2] == x.dims()[..2]
        && s5.dims()[2] == Dim::Fixed(3)
        && s5.dims()[2..]
            .iter()
            .map(|d| d.fixed().unwrap_or(0))
            .product::<usize>()
            == rows;
    if !split_features || perm != [2, 0, 3, 1, 4] {
        return None;
    }
    let d = rows / 3;
    let cc = constant(eg, vec![c], &[]);
    let scaled = |eg: &mut G, t: Id| {
        let (z, a0, dd, rr) = (
            attr(eg, "0"),
            attr(eg, "0"),
            attr(eg, d.to_string()),
            attr(eg, rows.to_string()),
        );
        let q = node(eg, "slice", vec![z, a0, dd, t]);
        let q = node(eg, "mul", vec![q, cc]);
        let kv = node(eg, "slice", vec![z, dd, rr, t]);
        node(eg, "concat", vec![z, q, kv])
    };
    let (w2, b2) = (scaled(eg, w), scaled(eg, b));
    let lin = node(eg, "linear", vec![s[var("?spec")], s[var("?x")], w2, b2]);
    let t5 = node(eg, "reshape", vec![s[var("?s5")], lin]);
    Some(node(eg, "permute", vec![s[var("?p")], t5]))
}

/// `reshape(slice(t, j..j+1))`: the j-th of q, k, v from a `[3, ..]` value.
fn qkv_part(eg: &mut G, t: Id, j: usize, shape: Id) -> Id {
    let (ax, a, e) = (
        attr(eg, "0"),
        attr(eg, j.to_string()),
        attr(eg, (j + 1).to_string()),
    );
    let sl = node(eg, "slice", vec![ax, a, e, t]);
    node(eg, "reshape", vec![shape, sl])
}

/// `attention_c(Q, K, V) = attention_1(c Q, K, V)` with `c` folded into the frozen query
/// rows of a fused qkv projection.
fn fold_scale_fused(eg: &mut G, s: &Subst, sink: bool) -> Option<Id> {
    let c = scale_attr(eg, s[var("?c")])?;
    let t = scaled_qkv(eg, s, c)?;
    let (q, k, v) = (
        qkv_part(eg, t, 0, s[var("?sq")]),
        qkv_part(eg, t, 1, s[var("?sk")]),
        qkv_part(eg, t, 2, s[var("?sv")]),
    );
    let one = attr(eg, float_attr(1.0));
    let mut children = vec![one, q, k, v];
    if sink {
        children.push(s[var("?z")]);
    }
    Some(node(eg, "attention", children))
}

/// The same fold for the scaled logits `c · Q Kᵀ` themselves (multi-cat reads them), so
/// the original projection is not kept alive beside the folded one.
fn fold_scale_scores(eg: &mut G, s: &Subst) -> Option<Id> {
    let c = scalar_const(eg, s[var("?c")])?;
    let t = scaled_qkv(eg, s, c)?;
    let (q, k) = (
        qkv_part(eg, t, 0, s[var("?sq")]),
        qkv_part(eg, t, 1, s[var("?sk")]),
    );
    let (f, tb) = (attr(eg, "0"), attr(eg, "1"));
    Some(node(eg, "matmul", vec![f, tb, q, k]))
}

/// The attention scale folded into a separate frozen query projection (Hugging Face):
/// the new query `permute(reshape(linear(x, c W, c b)))`.
fn scaled_q(eg: &mut G, s: &Subst, c: f32) -> Option<Id> {
    let (w, b) = (s[var("?w")], s[var("?b")]);
    if c == 1.0 || !plain_linear(eg, s) || !lang::is_constant(eg, w) || !lang::is_constant(eg, b) {
        return None;
    }
    let cc = constant(eg, vec![c], &[]);
    let (w2, b2) = (node(eg, "mul", vec![w, cc]), node(eg, "mul", vec![b, cc]));
    let lin = node(eg, "linear", vec![s[var("?spec")], s[var("?x")], w2, b2]);
    let r = node(eg, "reshape", vec![s[var("?s")], lin]);
    Some(node(eg, "permute", vec![s[var("?p")], r]))
}

fn fold_scale_split(eg: &mut G, s: &Subst, sink: bool) -> Option<Id> {
    let c = scale_attr(eg, s[var("?c")])?;
    let q = scaled_q(eg, s, c)?;
    let one = attr(eg, float_attr(1.0));
    let mut children = vec![one, q, s[var("?k")], s[var("?v")]];
    if sink {
        children.push(s[var("?z")]);
    }
    Some(node(eg, "attention", children))
}

fn fold_scale_split_scores(eg: &mut G, s: &Subst) -> Option<Id> {
    let c = scalar_const(eg, s[var("?c")])?;
    let q = scaled_q(eg, s, c)?;
    let (f, tb) = (attr(eg, "0"), attr(eg, "1"));
    Some(node(eg, "matmul", vec![f, tb, q, s[var("?k")]]))
}

/// `?ax` is the last axis of `?x`.
fn last_axis(eg: &G, s: &Subst, x: &str) -> Option<bool> {
    Some(int_of(eg, s[var("?ax")])? + 1 == ty(eg, s[var(x)])?.rank())
}

pub fn rules() -> Vec<Rw> {
    let mut r: Vec<Rw> = Vec::new();

    // EPT: softmax(concat(R, S))[.., L:] = softmax_sink(S, logsumexp(R)) along the last axis.
    r.push(
        Rewrite::new(
            "ept-sink",
            pat("(slice ?ax ?l ?e (softmax ?ax (concat ?ax ?r ?s)))"),
            ConditionalApplier {
                condition: If(
                    |eg: &G, s: &Subst| {
                        let (rt, st) = (ty(eg, s[var("?r")])?, ty(eg, s[var("?s")])?);
                        let n = rt.rank();
                        let l = rt.shape.dims()[n - 1].fixed()?;
                        let m = st.shape.dims()[n - 1].fixed()?;
                        Some(
                            last_axis(eg, s, "?s")?
                                && int_of(eg, s[var("?l")])? == l
                                && int_of(eg, s[var("?e")])? == l + m
                                && rt.shape.dims()[..n - 1] == st.shape.dims()[..n - 1],
                        )
                    },
                    vec![var("?ax"), var("?l"), var("?e"), var("?r"), var("?s")],
                ),
                applier: pat("(softmax_sink ?s (reduce_logsumexp ?ax 1 ?r))"),
            },
        )
        .expect("valid rule"),
    );

    // logsumexp over the last axis of a broadcast prompt: reduce the prompt, then broadcast.
    r.push(
        Rewrite::new(
            "lse-of-broadcast",
            pat("(reduce_logsumexp ?ax 1 (broadcast ?sh ?p))"),
            Build(|eg: &mut G, eclass: Id, s: &Subst| {
                let (pt, out) = (ty(eg, s[var("?p")])?.clone(), ty(eg, eclass)?.clone());
                let (pr, or) = (pt.rank(), out.rank());
                if pr == 0 || int_of(eg, s[var("?ax")])? + 1 != or {
                    return None;
                }
                // The reduced axis must be the prompt's own last axis, not a broadcast one.
                let mut inner_shape = pt.shape.dims().to_vec();
                if inner_shape[pr - 1] == Dim::Fixed(1) {
                    return None;
                }
                inner_shape[pr - 1] = Dim::Fixed(1);
                if !broadcasts_to(&Shape(inner_shape), &out.shape) {
                    return None;
                }
                let axes = attr(eg, (pr - 1).to_string());
                let keep = attr(eg, "1");
                let inner = eg.add(SymbolLang::new(
                    "reduce_logsumexp",
                    vec![axes, keep, s[var("?p")]],
                ));
                let sh = attr(eg, lang::shape_str(&out.shape));
                Some(eg.add(SymbolLang::new("broadcast", vec![sh, inner])))
            }),
        )
        .expect("valid rule"),
    );

    r.push(
        rw!("sink-drop-broadcast"; "(softmax_sink ?s (broadcast ?sh ?z))" => "(softmax_sink ?s ?z)"),
    );

    // Attention fusion.
    r.push(
        Rewrite::new(
            "attention",
            pat("(matmul 0 0 (softmax ?ax (mul (matmul 0 1 ?q ?k) ?c)) ?v)"),
            ConditionalApplier {
                condition: If(
                    |eg: &G, s: &Subst| {
                        // The logits `c · Q Kᵀ` have the broadcast rank of Q and K (c is a
                        // rank-0 scalar).
                        let rank = ty(eg, s[var("?q")])?
                            .rank()
                            .max(ty(eg, s[var("?k")])?.rank());
                        Some(int_of(eg, s[var("?ax")])? + 1 == rank)
                    },
                    vec![var("?ax"), var("?q"), var("?k")],
                ),
                applier: Build(|eg: &mut G, _: Id, s: &Subst| attention(eg, s, false)),
            },
        )
        .expect("valid rule"),
    );
    r.push(
        Rewrite::new(
            "attention-sink",
            pat("(matmul 0 0 (softmax_sink (mul (matmul 0 1 ?q ?k) ?c) ?z) ?v)"),
            Build(|eg: &mut G, _: Id, s: &Subst| attention(eg, s, true)),
        )
        .expect("valid rule"),
    );

    // Linear layers and their epilogues.
    r.push(
        Rewrite::new(
            "linear-bias",
            pat("(add (matmul 0 1 ?x ?w) ?b)"),
            ConditionalApplier {
                condition: If(
                    |eg: &G, s: &Subst| {
                        let (w, b) = (ty(eg, s[var("?w")])?, ty(eg, s[var("?b")])?);
                        Some(
                            w.rank() == 2
                                && b.rank() == 1
                                && b.shape.dims()[0] == w.shape.dims()[0],
                        )
                    },
                    vec![var("?w"), var("?b")],
                ),
                applier: pat("(linear lin:1:none:0 ?x ?w ?b)"),
            },
        )
        .expect("valid rule"),
    );
    r.push(rw!("linear-gelu"; "(gelu (linear lin:1:none:0 ?x ?w ?b))" => "(linear lin:1:gelu:0 ?x ?w ?b)"));
    for act in ["none", "gelu"] {
        for (name, lhs) in [
            (
                "linear-residual",
                format!("(add ?r (linear lin:1:{act}:0 ?x ?w ?b))"),
            ),
            (
                "linear-residual-r",
                format!("(add (linear lin:1:{act}:0 ?x ?w ?b) ?r)"),
            ),
        ] {
            let rhs = pat(&format!("(linear lin:1:{act}:1 ?x ?w ?b ?r)"));
            r.push(
                Rewrite::new(
                    format!("{name}-{act}"),
                    pat(&lhs),
                    ConditionalApplier {
                        condition: If(
                            |eg: &G, s: &Subst| {
                                let (rt, xt) = (ty(eg, s[var("?r")])?, ty(eg, s[var("?x")])?);
                                let w = ty(eg, s[var("?w")])?;
                                let mut out = xt.shape.dims().to_vec();
                                *out.last_mut()? = w.shape.dims()[0];
                                Some(rt.shape.dims() == out.as_slice())
                            },
                            vec![var("?r"), var("?x"), var("?w")],
                        ),
                        applier: rhs,
                    },
                )
                .expect("valid rule"),
            );
        }
    }

    // Folds into frozen weights (computed once at compile time, see `fold`).
    for (name, res) in [
        ("layernorm-affine-fold", false),
        ("layernorm-affine-fold-residual", true),
    ] {
        let lhs = if res {
            "(linear ?spec (layernorm ?eps ?x ?g ?beta) ?w ?b ?r)"
        } else {
            "(linear ?spec (layernorm ?eps ?x ?g ?beta) ?w ?b)"
        };
        r.push(
            Rewrite::new(
                name,
                pat(lhs),
                Build(move |eg: &mut G, _: Id, s: &Subst| fold_layernorm(eg, s, res)),
            )
            .expect("valid rule"),
        );
    }
    let t = "(permute ?p (reshape ?s5 (linear ?spec ?x ?w ?b)))";
    for (name, sink) in [("scale-fold-qkv", false), ("scale-fold-qkv-sink", true)] {
        let z = if sink { " ?z" } else { "" };
        let lhs = format!(
            "(attention ?c (reshape ?sq (slice 0 0 1 {t})) (reshape ?sk (slice 0 1 2 {t})) (reshape ?sv (slice 0 2 3 {t})){z})"
        );
        r.push(
            Rewrite::new(
                name,
                pat(&lhs),
                Build(move |eg: &mut G, _: Id, s: &Subst| fold_scale_fused(eg, s, sink)),
            )
            .expect("valid rule"),
        );
    }
    let lhs = format!(
        "(mul (matmul 0 1 (reshape ?sq (slice 0 0 1 {t})) (reshape ?sk (slice 0 1 2 {t}))) ?c)"
    );
    r.push(
        Rewrite::new(
            "scale-fold-qkv-scores",
            pat(&lhs),
            Build(|eg: &mut G, _: Id, s: &Subst| fold_scale_scores(eg, s)),
        )
        .expect("valid rule"),
    );
    let q = "(permute ?p (reshape ?s (linear ?spec ?x ?w ?b)))";
    for (name, sink) in [("scale-fold-q", false), ("scale-fold-q-sink", true)] {
        let z = if sink { " ?z" } else { "" };
        let lhs = format!("(attention ?c {q} ?k ?v{z})");
        r.push(
            Rewrite::new(
                name,
                pat(&lhs),
                Build(move |eg: &mut G, _: Id, s: &Subst| fold_scale_split(eg, s, sink)),
            )
            .expect("valid rule"),
        );
    }
    let lhs = format!("(mul (matmul 0 1 {q} ?k) ?c)");
    r.push(
        Rewrite::new(
            "scale-fold-q-scores",
            pat(&lhs),
            Build(|eg: &mut G, _: Id, s: &Subst| fold_scale_split_scores(eg, s)),
        )
        .expect("valid rule"),
    );

    // Layout simplifications.
    r.push(rw!("reshape-reshape"; "(reshape ?a (reshape ?b ?x))" => "(reshape ?a ?x)"));
    // A reshape or broadcast to the shape the value already has is the value.
    for (name, op) in [("reshape-id", "reshape"), ("broadcast-id", "broadcast")] {
        r.push(
            Rewrite::new(
                name,
                pat(&format!("({op} ?sh ?x)")),
                ConditionalApplier {
                    condition: If(
                        |eg: &G, s: &Subst| {
                            Some(ty(eg, s[var("?x")])?.shape == shape_of_attr(eg, s[var("?sh")])?)
                        },
                        vec![var("?x"), var("?sh")],
                    ),
                    applier: pat("?x"),
                },
            )
            .expect("valid rule"),
        );
    }
    r.push(
        Rewrite::new(
            "permute-permute",
            pat("(permute ?p1 (permute ?p2 ?x))"),
            Build(|eg: &mut G, _: Id, s: &Subst| {
                let p1 = perm_of(eg, s[var("?p1")])?;
                let p2 = perm_of(eg, s[var("?p2")])?;
                // out[i] = mid[p1[i]] = x[p2[p1[i]]]
                let p: Vec<usize> = p1.iter().map(|&i| p2[i]).collect();
                if p.iter().enumerate().all(|(i, &v)| i == v) {
                    return Some(s[var("?x")]);
                }
                let list: Vec<String> = p.iter().map(|v| v.to_string()).collect();
                let a = attr(eg, format!("p:{}", list.join(",")));
                Some(eg.add(SymbolLang::new("permute", vec![a, s[var("?x")]])))
            }),
        )
        .expect("valid rule"),
    );
    r
}

fn shape_of_attr(eg: &G, id: Id) -> Option<Shape> {
    lang::parse_shape(lang::leaf_symbol(eg, id)?.as_str())
}

fn perm_of(eg: &G, id: Id) -> Option<Vec<usize>> {
    lang::parse_list(lang::leaf_symbol(eg, id)?.as_str().strip_prefix("p:")?)
}
