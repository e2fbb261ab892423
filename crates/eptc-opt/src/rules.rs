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
//! | `reshape-reshape`, `reshape-id`, `broadcast-id`, `permute-permute` | layout simplifications |

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

fn shape_attr(s: &Shape) -> String {
    let d: Vec<String> = s.dims().iter().map(|d| d.to_string()).collect();
    format!("s:{}", d.join(","))
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
                let sh = attr(eg, shape_attr(&out.shape));
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
                    |eg: &G, s: &Subst| last_axis(eg, s, "?q"),
                    vec![var("?ax"), var("?q")],
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

    // Layout simplifications.
    r.push(rw!("reshape-reshape"; "(reshape ?a (reshape ?b ?x))" => "(reshape ?a ?x)"));
    r.push(
        Rewrite::new(
            "reshape-id",
            pat("(reshape ?sh ?x)"),
            ConditionalApplier {
                condition: If(
                    |eg: &G, s: &Subst| Some(ty(eg, s[var("?x")])?.shape == parse_target(eg, s)?),
                    vec![var("?x"), var("?sh")],
                ),
                applier: pat("?x"),
            },
        )
        .expect("valid rule"),
    );
    r.push(
        Rewrite::new(
            "broadcast-id",
            pat("(broadcast ?sh ?x)"),
            ConditionalApplier {
                condition: If(
                    |eg: &G, s: &Subst| Some(ty(eg, s[var("?x")])?.shape == parse_target(eg, s)?),
                    vec![var("?x"), var("?sh")],
                ),
                applier: pat("?x"),
            },
        )
        .expect("valid rule"),
    );
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

fn parse_target(eg: &G, s: &Subst) -> Option<Shape> {
    let sym = lang::leaf_symbol(eg, s[var("?sh")])?;
    let body = sym.as_str().strip_prefix("s:")?;
    if body.is_empty() {
        return Some(Shape(vec![]));
    }
    body.split(',')
        .map(|d| {
            if d == "B" {
                Some(Dim::Batch)
            } else {
                d.parse().ok().map(Dim::Fixed)
            }
        })
        .collect::<Option<Vec<_>>>()
        .map(Shape)
}

fn perm_of(eg: &G, id: Id) -> Option<Vec<usize>> {
    let sym = lang::leaf_symbol(eg, id)?;
    sym.as_str()
        .strip_prefix("p:")?
        .split(',')
        .map(|x| x.parse().ok())
        .collect()
}
