//! The text format: one node per line in topological order, printed and parsed back
//! exactly (`print(parse(print(g))) == print(g)`).
//!
//! ```text
//! eptc-ir 1 "vit"
//! %0 = input "pixel_values" : f32[B,3,32,32]
//! %1 = param "blocks.0.attn.qkv.weight" frozen checkpoint : f32[144,48]
//! %2 = param "ept.prompts.0" trainable normal(0.02) : f32[17,6] @ept
//! %3 = matmul %0, %1 transpose_b : f32[B,17,144]
//! output "logits" = %3
//! ```
//! See `ir-specs/README.md` for the grammar.

use std::collections::HashMap;
use std::fmt::Write;

use crate::error::{IrError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::{Activation, BinaryOp, Init, Op, ReduceOp, UnaryOp};
use crate::types::{DType, Dim, Shape, TensorType};

/// The format's version, the first line of every file.
pub const FORMAT_VERSION: u32 = 1;

fn quote(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn float(v: f32) -> String {
    format!("{v:?}")
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    let parts: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(","))
}

fn init_str(i: &Init) -> String {
    match i {
        Init::Checkpoint => "checkpoint".into(),
        Init::Zeros => "zeros".into(),
        Init::Ones => "ones".into(),
        Init::Normal(s) => format!("normal({})", float(*s)),
        Init::Uniform(b) => format!("uniform({})", float(*b)),
        Init::Kaiming => "kaiming".into(),
        Init::Token => "token".into(),
    }
}

/// Print a graph in the text format (nodes renumbered in topological order).
pub fn print(g: &Graph) -> Result<String> {
    let order = g.topo_order()?;
    let num: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut s = String::new();
    writeln!(s, "eptc-ir {FORMAT_VERSION} {}", quote(&g.name)).unwrap();
    for &id in &order {
        let n = g.node(id);
        let mut line = format!("%{} = {}", num[&id], n.op.kind());
        let mut head = Vec::<String>::new();
        match &n.op {
            Op::Input { name } => head.push(quote(name)),
            Op::Param {
                name,
                trainable,
                init,
            } => {
                head.push(quote(name));
                head.push(if *trainable { "trainable" } else { "frozen" }.into());
                head.push(init_str(init));
            }
            Op::Const { values } => {
                let v: Vec<String> = values.iter().map(|x| float(*x)).collect();
                head.push(format!("[{}]", v.join(",")));
            }
            _ => {}
        }
        let operands: Vec<String> = g
            .operands(id)
            .iter()
            .map(|o| format!("%{}", num[o]))
            .collect();
        if !operands.is_empty() {
            head.push(operands.join(", "));
        }
        match &n.op {
            Op::Patchify { patch } => head.push(format!("patch={patch}")),
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => {
                if *transpose_a {
                    head.push("transpose_a".into());
                }
                if *transpose_b {
                    head.push("transpose_b".into());
                }
            }
            Op::Reduce { axes, keepdim, .. } => {
                head.push(format!("axes={}", list(axes)));
                if *keepdim {
                    head.push("keepdim".into());
                }
            }
            Op::Softmax { axis } | Op::Concat { axis } => head.push(format!("axis={axis}")),
            Op::LayerNorm { eps } | Op::LayerNormGrad { eps } => {
                head.push(format!("eps={}", float(*eps)))
            }
            Op::Permute { perm } => head.push(format!("perm={}", list(perm))),
            Op::Slice { axis, start, end } => {
                head.push(format!("axis={axis} start={start} end={end}"))
            }
            Op::Attention { scale, sink } | Op::AttentionLse { scale, sink } => {
                head.push(format!("scale={}", float(*scale)));
                if *sink {
                    head.push("sink".into());
                }
            }
            Op::AttentionGrad { scale, wrt } => {
                head.push(format!("scale={} wrt={}", float(*scale), wrt.name()));
            }
            Op::Linear {
                bias,
                activation,
                residual,
            } => {
                if *bias {
                    head.push("bias".into());
                }
                if *residual {
                    head.push("residual".into());
                }
                if *activation != Activation::None {
                    head.push(format!("act={}", activation.name()));
                }
            }
            _ => {}
        }
        if !head.is_empty() {
            line.push(' ');
            line.push_str(&head.join(" "));
        }
        write!(line, " : {}", n.ty).unwrap();
        if let Some(t) = &n.tag {
            write!(line, " @{t}").unwrap();
        }
        s.push_str(&line);
        s.push('\n');
    }
    for (name, id) in g.outputs() {
        writeln!(s, "output {} = %{}", quote(name), num[id]).unwrap();
    }
    Ok(s)
}

// ---- parsing ----------------------------------------------------------------------------

struct Cur<'a> {
    s: &'a str,
    pos: usize,
    line: usize,
}

impl<'a> Cur<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T> {
        Err(IrError::Parse {
            line: self.line,
            msg: format!("{} (at column {})", msg.into(), self.pos + 1),
        })
    }
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }
    fn ws(&mut self) {
        while self.rest().starts_with(' ') || self.rest().starts_with('\t') {
            self.pos += 1;
        }
    }
    fn eat(&mut self, t: &str) -> bool {
        self.ws();
        if self.rest().starts_with(t) {
            self.pos += t.len();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, t: &str) -> Result<()> {
        if self.eat(t) {
            Ok(())
        } else {
            self.err(format!("expected {t:?}"))
        }
    }
    fn at_end(&mut self) -> bool {
        self.ws();
        self.rest().is_empty()
    }
    /// A bare word: letters, digits, `_`, `.`, `-`, `+`.
    fn word(&mut self) -> Result<&'a str> {
        self.ws();
        let r = self.rest();
        let n = r
            .find(|c: char| !(c.is_ascii_alphanumeric() || "_.-+".contains(c)))
            .unwrap_or(r.len());
        if n == 0 {
            return self.err("expected a word");
        }
        self.pos += n;
        Ok(&r[..n])
    }
    fn usize(&mut self) -> Result<usize> {
        let w = self.word()?;
        w.parse()
            .or_else(|_| self.err(format!("expected a number, got {w:?}")))
    }
    fn f32(&mut self) -> Result<f32> {
        let w = self.word()?;
        w.parse()
            .or_else(|_| self.err(format!("expected a float, got {w:?}")))
    }
    fn string(&mut self) -> Result<String> {
        self.ws();
        if !self.rest().starts_with('"') {
            return self.err("expected a quoted string");
        }
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, '"')) => out.push('"'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, 'n')) => out.push('\n'),
                    _ => return self.err("bad escape in string"),
                },
                c => out.push(c),
            }
        }
        self.err("unterminated string")
    }
    fn usize_list(&mut self) -> Result<Vec<usize>> {
        self.expect("[")?;
        let mut v = Vec::new();
        if self.eat("]") {
            return Ok(v);
        }
        loop {
            v.push(self.usize()?);
            if self.eat("]") {
                return Ok(v);
            }
            self.expect(",")?;
        }
    }
    fn f32_list(&mut self) -> Result<Vec<f32>> {
        self.expect("[")?;
        let mut v = Vec::new();
        if self.eat("]") {
            return Ok(v);
        }
        loop {
            v.push(self.f32()?);
            if self.eat("]") {
                return Ok(v);
            }
            self.expect(",")?;
        }
    }
    fn node_ref(&mut self) -> Result<usize> {
        self.expect("%")?;
        let w = self.word()?;
        w.parse()
            .or_else(|_| self.err(format!("bad node reference %{w}")))
    }
    fn ty(&mut self) -> Result<TensorType> {
        let w = self.word()?;
        let dtype = match DType::from_name(w) {
            Some(d) => d,
            None => return self.err(format!("unknown element type {w:?}")),
        };
        self.expect("[")?;
        let mut dims = Vec::new();
        if !self.eat("]") {
            loop {
                let w = self.word()?;
                dims.push(if w == "B" {
                    Dim::Batch
                } else {
                    match w.parse() {
                        Ok(n) => Dim::Fixed(n),
                        Err(_) => return self.err(format!("bad dimension {w:?}")),
                    }
                });
                if self.eat("]") {
                    break;
                }
                self.expect(",")?;
            }
        }
        Ok(TensorType::new(dtype, Shape(dims)))
    }
    fn init(&mut self) -> Result<Init> {
        let w = self.word()?;
        let arg = |c: &mut Self| -> Result<f32> {
            c.expect("(")?;
            let v = c.f32()?;
            c.expect(")")?;
            Ok(v)
        };
        Ok(match w {
            "checkpoint" => Init::Checkpoint,
            "zeros" => Init::Zeros,
            "ones" => Init::Ones,
            "kaiming" => Init::Kaiming,
            "token" => Init::Token,
            "normal" => Init::Normal(arg(self)?),
            "uniform" => Init::Uniform(arg(self)?),
            _ => return self.err(format!("unknown initialiser {w:?}")),
        })
    }
}

/// Named attributes after the operands: `key=value` or a bare flag.
#[derive(Default)]
struct Attrs {
    flags: Vec<String>,
    values: HashMap<String, usize>,
}

/// Parse the text format. The graph is verified before it is returned.
pub fn parse(text: &str) -> Result<Graph> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let mut g = Graph::new("");
    let mut ids: HashMap<usize, NodeId> = HashMap::new();
    let mut saw_header = false;
    for (ln, raw) in &mut lines {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut c = Cur {
            s: l,
            pos: 0,
            line: ln,
        };
        if !saw_header {
            if !matches!(c.word(), Ok("eptc-ir")) {
                return c.err("expected the header `eptc-ir <version> \"name\"`");
            }
            let v = c.usize()?;
            if v != FORMAT_VERSION as usize {
                return c.err(format!(
                    "format version {v}, this eptc reads {FORMAT_VERSION}"
                ));
            }
            g.name = c.string()?;
            if !c.at_end() {
                return c.err("trailing text");
            }
            saw_header = true;
            continue;
        }
        if c.eat("output") {
            let name = c.string()?;
            c.expect("=")?;
            let r = c.node_ref()?;
            let id = *ids
                .get(&r)
                .map_or_else(|| c.err(format!("%{r} is not defined")), Ok)?;
            if !c.at_end() {
                return c.err("trailing text");
            }
            if g.output(&name).is_some() {
                return c.err(format!("output {name:?} defined twice"));
            }
            g.set_output(&name, id);
            continue;
        }
        let num = c.node_ref()?;
        if ids.contains_key(&num) {
            return c.err(format!("%{num} defined twice"));
        }
        c.expect("=")?;
        let kind = c.word()?;
        if !Op::all_kinds().contains(&kind) {
            return c.err(format!("unknown op {kind:?}"));
        }
        // The attributes `kind` takes: bare flags, then `key=value`s.
        let (flags, keys): (&[&str], &[&str]) = match kind {
            "patchify" => (&[], &["patch"]),
            "matmul" => (&["transpose_a", "transpose_b"], &[]),
            "softmax" | "concat" => (&[], &["axis"]),
            "layernorm" | "layernorm_grad" => (&[], &["eps"]),
            "permute" => (&[], &["perm"]),
            "slice" => (&[], &["axis", "start", "end"]),
            "attention" | "attention_lse" => (&["sink"], &["scale"]),
            "attention_grad" => (&[], &["scale", "wrt"]),
            "linear" => (&["bias", "residual"], &["act"]),
            k if k.starts_with("reduce_") => (&["keepdim"], &["axes"]),
            _ => (&[], &[]),
        };
        // Leaf heads.
        let mut leaf: Option<Op> = None;
        match kind {
            "input" => leaf = Some(Op::Input { name: c.string()? }),
            "param" => {
                let name = c.string()?;
                let trainable = match c.word()? {
                    "trainable" => true,
                    "frozen" => false,
                    w => return c.err(format!("expected trainable or frozen, got {w:?}")),
                };
                let init = c.init()?;
                leaf = Some(Op::Param {
                    name,
                    trainable,
                    init,
                });
            }
            "const" => {
                leaf = Some(Op::Const {
                    values: c.f32_list()?,
                })
            }
            _ => {}
        }
        let mut operands = Vec::new();
        if leaf.is_none() {
            loop {
                let r = c.node_ref()?;
                let id = *ids
                    .get(&r)
                    .map_or_else(|| c.err(format!("%{r} is not defined")), Ok)?;
                operands.push(id);
                if !c.eat(",") {
                    break;
                }
            }
        }
        let mut attrs = Attrs::default();
        let mut lists: HashMap<String, Vec<usize>> = HashMap::new();
        let mut floats: HashMap<String, f32> = HashMap::new();
        let mut act = None;
        let mut wrt = None;
        while !c.eat(":") {
            if c.at_end() {
                return c.err("expected `: type`");
            }
            let key = c.word()?.to_string();
            if DType::from_name(&key).is_some() {
                return c.err(format!("expected `:` before the type {key}[...]"));
            }
            if !flags.contains(&key.as_str()) && !keys.contains(&key.as_str()) {
                return c.err(format!("{kind} has no attribute {key:?}"));
            }
            if attrs.flags.contains(&key)
                || attrs.values.contains_key(&key)
                || lists.contains_key(&key)
                || floats.contains_key(&key)
                || (key == "act" && act.is_some())
                || (key == "wrt" && wrt.is_some())
            {
                return c.err(format!("attribute {key:?} given twice"));
            }
            if c.eat("=") != keys.contains(&key.as_str()) {
                return if keys.contains(&key.as_str()) {
                    c.err(format!("expected {key}=<value>"))
                } else {
                    c.err(format!("{key} is a flag and takes no value"))
                };
            }
            if keys.contains(&key.as_str()) {
                match key.as_str() {
                    "axes" | "perm" => {
                        let v = c.usize_list()?;
                        lists.insert(key, v);
                    }
                    "eps" | "scale" => {
                        let v = c.f32()?;
                        floats.insert(key, v);
                    }
                    "wrt" => {
                        let w = c.word()?;
                        wrt = Some(crate::op::AttnWrt::from_name(w).map_or_else(
                            || c.err(format!("unknown operand {w:?} (q, k or v)")),
                            Ok,
                        )?);
                    }
                    "act" => {
                        let w = c.word()?;
                        act = Some(Activation::from_name(w).map_or_else(
                            || c.err(format!("unknown activation {w:?} (none or gelu)")),
                            Ok,
                        )?);
                    }
                    _ => {
                        let v = c.usize()?;
                        attrs.values.insert(key, v);
                    }
                }
            } else {
                attrs.flags.push(key);
            }
        }
        let ty = c.ty()?;
        let tag = if c.eat("@") {
            Some(c.word()?.to_string())
        } else {
            None
        };
        if !c.at_end() {
            return c.err("trailing text");
        }
        let need = |c: &Cur, k: &str| -> Result<usize> {
            attrs
                .values
                .get(k)
                .copied()
                .map_or_else(|| c.err(format!("{kind} needs {k}=")), Ok)
        };
        let need_f32 = |c: &Cur, k: &str| -> Result<f32> {
            floats
                .get(k)
                .copied()
                .map_or_else(|| c.err(format!("{kind} needs {k}=")), Ok)
        };
        let flag = |f: &str| attrs.flags.iter().any(|x| x == f);
        let op = if let Some(op) = leaf {
            op
        } else if let Some(b) = BinaryOp::ALL.iter().find(|b| b.name() == kind) {
            Op::Binary(*b)
        } else if let Some(u) = UnaryOp::ALL.iter().find(|u| u.name() == kind) {
            Op::Unary(*u)
        } else if let Some(r) = ReduceOp::ALL.iter().find(|r| r.name() == kind) {
            Op::Reduce {
                op: *r,
                axes: lists
                    .remove("axes")
                    .map_or_else(|| c.err("reduce needs axes="), Ok)?,
                keepdim: flag("keepdim"),
            }
        } else {
            match kind {
                "patchify" => Op::Patchify {
                    patch: need(&c, "patch")?,
                },
                "matmul" => Op::MatMul {
                    transpose_a: flag("transpose_a"),
                    transpose_b: flag("transpose_b"),
                },
                "softmax" => Op::Softmax {
                    axis: need(&c, "axis")?,
                },
                "layernorm" => Op::LayerNorm {
                    eps: need_f32(&c, "eps")?,
                },
                "layernorm_grad" => Op::LayerNormGrad {
                    eps: need_f32(&c, "eps")?,
                },
                "reshape" => Op::Reshape {
                    shape: ty.shape.clone(),
                },
                "broadcast" => Op::Broadcast {
                    shape: ty.shape.clone(),
                },
                "permute" => Op::Permute {
                    perm: lists
                        .remove("perm")
                        .map_or_else(|| c.err("permute needs perm="), Ok)?,
                },
                "concat" => Op::Concat {
                    axis: need(&c, "axis")?,
                },
                "slice" => Op::Slice {
                    axis: need(&c, "axis")?,
                    start: need(&c, "start")?,
                    end: need(&c, "end")?,
                },
                "softmax_sink" => Op::SoftmaxSink,
                "attention" => Op::Attention {
                    scale: need_f32(&c, "scale")?,
                    sink: flag("sink"),
                },
                "attention_lse" => Op::AttentionLse {
                    scale: need_f32(&c, "scale")?,
                    sink: flag("sink"),
                },
                "attention_grad" => Op::AttentionGrad {
                    scale: need_f32(&c, "scale")?,
                    wrt: wrt.map_or_else(|| c.err("attention_grad needs wrt="), Ok)?,
                },
                "linear" => Op::Linear {
                    bias: flag("bias"),
                    activation: act.unwrap_or(Activation::None),
                    residual: flag("residual"),
                },
                _ => return c.err(format!("unknown op {kind:?}")),
            }
        };
        g.set_tag(tag.as_deref());
        let id = g.add_typed(op, &operands, ty).map_err(|e| IrError::Parse {
            line: ln,
            msg: e.to_string(),
        })?;
        ids.insert(num, id);
    }
    if !saw_header {
        return Err(IrError::Parse {
            line: 1,
            msg: "empty input: expected the header `eptc-ir <version> \"name\"`".into(),
        });
    }
    g.set_tag(None);
    crate::verify::verify(&g)?;
    Ok(g)
}
