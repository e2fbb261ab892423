//! `ir-specs/ops.toml` and the code agree: every op kind has exactly one spec entry, the
//! format version matches, and every entry's example line parses, verifies and prints back
//! verbatim.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use eptc_ir::text::{parse, print, FORMAT_VERSION};
use eptc_ir::Op;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    format_version: u32,
    op: Vec<OpSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpSpec {
    name: String,
    category: String,
    operands: Vec<String>,
    attributes: Vec<AttrSpec>,
    shape_rule: String,
    semantics: String,
    text: String,
    context: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttrSpec {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    syntax: String,
    meaning: String,
}

const CATEGORIES: [&str; 8] = [
    "leaf",
    "elementwise",
    "matmul",
    "reduce",
    "normalization",
    "shape",
    "vision",
    "fused",
];

fn spec_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../ir-specs/ops.toml")
}

fn load() -> Spec {
    let path = spec_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not valid: {e}", path.display()))
}

#[test]
fn format_version_matches_the_code() {
    assert_eq!(
        load().format_version,
        FORMAT_VERSION,
        "ir-specs/ops.toml format_version differs from eptc_ir::text::FORMAT_VERSION"
    );
}

#[test]
fn every_op_has_exactly_one_entry() {
    let spec = load();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for o in &spec.op {
        *counts.entry(o.name.as_str()).or_default() += 1;
    }
    let code: BTreeSet<&str> = Op::all_kinds().into_iter().collect();
    assert_eq!(
        code.len(),
        Op::all_kinds().len(),
        "Op::all_kinds() repeats a name"
    );
    let missing: Vec<&str> = code
        .iter()
        .filter(|k| !counts.contains_key(*k))
        .copied()
        .collect();
    let extra: Vec<&str> = counts
        .keys()
        .filter(|k| !code.contains(*k))
        .copied()
        .collect();
    let twice: Vec<&str> = counts
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(k, _)| *k)
        .collect();
    assert!(
        missing.is_empty(),
        "ops without an entry in ir-specs/ops.toml: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "ir-specs/ops.toml specifies ops the code does not know: {extra:?}"
    );
    assert!(
        twice.is_empty(),
        "ops specified more than once in ir-specs/ops.toml: {twice:?}"
    );
}

#[test]
fn entries_are_complete() {
    for o in load().op {
        let n = &o.name;
        assert!(
            CATEGORIES.contains(&o.category.as_str()),
            "{n}: unknown category {:?}",
            o.category
        );
        assert!(!o.shape_rule.trim().is_empty(), "{n}: empty shape_rule");
        assert!(!o.semantics.trim().is_empty(), "{n}: empty semantics");
        for a in &o.attributes {
            for (field, v) in [
                ("name", &a.name),
                ("type", &a.ty),
                ("syntax", &a.syntax),
                ("meaning", &a.meaning),
            ] {
                assert!(!v.trim().is_empty(), "{n}: attribute with an empty {field}");
            }
        }
        // Only the last operand may be variadic; optional operands come last, and only
        // fused ops have them.
        for (i, op) in o.operands.iter().enumerate() {
            assert!(
                !op.ends_with("...") || i + 1 == o.operands.len(),
                "{n}: only the last operand may be variadic"
            );
            assert!(
                !op.ends_with('?') || o.operands[i..].iter().all(|x| x.ends_with('?')),
                "{n}: optional operands must come last"
            );
            assert!(
                !op.ends_with('?') || o.category == "fused",
                "{n}: only fused ops have optional operands"
            );
        }
        assert_eq!(
            o.category == "leaf",
            o.operands.is_empty(),
            "{n}: leaves and only leaves take no operands"
        );
    }
}

/// The op kind an example line names: `%<n> = <kind> ...`.
fn kind_of(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('%')?;
    let (_, rhs) = rest.split_once(" = ")?;
    rhs.split([' ', ':']).next()
}

#[test]
fn example_lines_parse_verify_and_print_back() {
    for o in load().op {
        let n = &o.name;
        assert!(o.text.starts_with('%'), "{n}: text must start with `%`");
        assert_eq!(
            kind_of(&o.text),
            Some(n.as_str()),
            "{n}: text {:?} does not name the op",
            o.text
        );
        // Wrap the line into a minimal graph: header, operand definitions, the line, an
        // output. It must come back verbatim: the example is in canonical form.
        let id = o.text[1..].split(' ').next().unwrap();
        let mut file = format!("eptc-ir {FORMAT_VERSION} \"spec.{n}\"\n");
        for l in &o.context {
            file.push_str(l);
            file.push('\n');
        }
        file.push_str(&o.text);
        file.push('\n');
        file.push_str(&format!("output \"y\" = %{id}\n"));
        let g = parse(&file).unwrap_or_else(|e| panic!("{n}: example does not parse: {e}\n{file}"));
        let printed = print(&g).unwrap();
        assert_eq!(printed, file, "{n}: example is not in canonical form");

        // The node the line defines has the op and operand count the spec says.
        let node = g.output("y").unwrap();
        let op = &g.node(node).op;
        assert_eq!(op.kind(), n);
        let got = g.operands(node).len();
        let variadic = o.operands.last().is_some_and(|s| s.ends_with("..."));
        // The example shows every optional operand.
        match op.arity() {
            Some(k) => {
                assert!(
                    !variadic,
                    "{n}: spec says variadic, the code says {k} operands"
                );
                assert_eq!(o.operands.len(), k, "{n}: spec operands {:?}", o.operands);
            }
            None => assert!(
                variadic,
                "{n}: the code says variadic, spec {:?}",
                o.operands
            ),
        }
        if !variadic {
            assert_eq!(got, o.operands.len(), "{n}: the example has {got} operands");
        }
    }
}

#[test]
fn categories_match_the_op_enum() {
    // Coarse cross-check of the categories against the op enum.
    let spec = load();
    let cat: HashMap<&str, &str> = spec
        .op
        .iter()
        .map(|o| (o.name.as_str(), o.category.as_str()))
        .collect();
    for b in eptc_ir::BinaryOp::ALL {
        assert_eq!(cat.get(b.name()), Some(&"elementwise"), "{}", b.name());
    }
    for u in eptc_ir::UnaryOp::ALL {
        assert_eq!(cat.get(u.name()), Some(&"elementwise"), "{}", u.name());
    }
    for r in eptc_ir::ReduceOp::ALL {
        assert_eq!(cat.get(r.name()), Some(&"reduce"), "{}", r.name());
    }
    for l in ["input", "param", "const"] {
        assert_eq!(cat.get(l), Some(&"leaf"), "{l}");
    }
    for k in Op::all_kinds() {
        assert_eq!(
            cat.get(k) == Some(&"fused"),
            Op::fused_kinds().contains(&k),
            "{k}: category fused iff Op::fused_kinds() lists it"
        );
    }
}

#[test]
fn optional_operands_follow_the_flags() {
    // Each fused op's operand count without any optional operand is the spec's required
    // count, and each flag adds one.
    use eptc_ir::Activation;
    let spec = load();
    let required = |name: &str| {
        let o = spec.op.iter().find(|o| o.name == name).unwrap();
        o.operands.iter().filter(|x| !x.ends_with('?')).count()
    };
    let ops = [
        (Op::SoftmaxSink, 0),
        (
            Op::Attention {
                scale: 1.0,
                sink: false,
            },
            0,
        ),
        (
            Op::Attention {
                scale: 1.0,
                sink: true,
            },
            1,
        ),
        (
            Op::Linear {
                bias: false,
                activation: Activation::Gelu,
                residual: false,
            },
            0,
        ),
        (
            Op::Linear {
                bias: true,
                activation: Activation::None,
                residual: false,
            },
            1,
        ),
        (
            Op::Linear {
                bias: true,
                activation: Activation::None,
                residual: true,
            },
            2,
        ),
    ];
    for (op, extra) in ops {
        assert!(op.is_fused());
        assert_eq!(op.arity(), Some(required(op.kind()) + extra), "{op:?}");
    }
    assert!(!Op::Softmax { axis: 0 }.is_fused());
}
