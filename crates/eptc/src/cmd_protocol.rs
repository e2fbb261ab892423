//! `eptc protocol`: the MedFMC protocol in one command — data sets × K-shot × samplings ×
//! methods (× method options chosen on the validation set), resumable, summarised as the
//! paper's Table 1 (Markdown and CSV, mean ± std over samplings).
//!
//! The plan is a TOML file (README, "eptc protocol"):
//!
//! - top level: `model` (required), `target` (cpu), `dtype` (f32), `shots` ([1, 5, 10]),
//!   `samplings` (5), tables `[compile]` and `[train]` (options of `eptc compile` and
//!   `eptc train` shared by every method, by their flag names with `_` or `-`), and the
//!   arrays of tables `[[datasets]]` and `[[methods]]`;
//! - a data set: `name`, `images`, `task`, `classes`, `test`, and either the split files
//!   it comes with, as patterns (`train = "chest_{shot}-shot_train_exp{exp}.txt"`,
//!   `val = ...`), or a `pool` annotation file the K-shot training split (and, without
//!   `val`, `val_per_class` validation images per class, default K) of sampling k is drawn
//!   from with `eptc_runtime::sample`, seed `seed + k` (`seed` default 0);
//! - a method: `peft`, an optional `name` (the row; default the `peft` value), and any
//!   option of `eptc compile` or `eptc train`; a list value (`prompt_len = [5, 10, 20]`)
//!   is chosen on the validation set: each value is trained, the best validation metric
//!   wins (the first on a tie), and its test metric is reported.
//!
//! Paths in the plan are relative to the plan's folder. The output folder holds
//! `artifacts/<data set>/<method>/<compile options>/` (one compile each),
//! `splits/<data set>/` (sampled splits), `runs/<data set>/<method>/<K>-shot/exp<k>/`
//! (one `eptc train` run per option value, `test.json`, `result.json`), `results.jsonl`,
//! `table.md` and `table.csv`. A cell (data set, method, K, k) with a `result.json` made
//! from the same settings is skipped; an unfinished one continues its training runs
//! (`eptc train --resume`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::artifact;
use crate::cmd_compile::{self, CompileArgs};
use crate::cmd_train::{self, EvalArgs, TrainArgs};

#[derive(Args, Debug)]
pub struct ProtocolArgs {
    /// The plan (TOML): model, training settings, shots, samplings, data sets and methods
    /// (README, "eptc protocol"; examples/medfmc-plan.toml)
    pub plan: PathBuf,
    /// Output folder: artifacts/, splits/, runs/, results.jsonl, table.md, table.csv.
    /// Running again with the same folder skips the finished cells and continues the rest
    #[arg(short, long)]
    pub output: PathBuf,
    /// Check the plan (files, options, sampled splits) and list the cells; run nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Show every training's progress bars and epoch lines (default: one line per cell)
    #[arg(short, long)]
    pub verbose: bool,
    /// Print the summary as one JSON object (the per-cell lines go to stderr)
    #[arg(long)]
    pub json: bool,
}

// ---- options of `eptc compile` / `eptc train` by name ----------------------------------

/// `eptc compile`'s options, parsed as its command line is.
#[derive(Parser, Debug)]
#[command(name = "compile", no_binary_name = true)]
struct CompileCli {
    #[command(flatten)]
    a: CompileArgs,
}

/// `eptc train`'s options, parsed as its command line is.
#[derive(Parser, Debug)]
#[command(name = "train", no_binary_name = true)]
struct TrainCli {
    #[command(flatten)]
    a: TrainArgs,
}

/// Compile options the protocol sets itself.
const COMPILE_RESERVED: &[&str] = &[
    "model",
    "target",
    "dtype",
    "output",
    "emit",
    "json",
    "num_classes",
    "task",
    "peft",
];
/// Train options the protocol sets itself.
const TRAIN_RESERVED: &[&str] = &[
    "artifact",
    "data",
    "train",
    "val",
    "output",
    "adapter",
    "resume",
    "stop_after",
];
/// Train options that do not change the results (left out of a cell's settings).
const TRAIN_NO_EFFECT: &[&str] = &["workers", "threads", "eval_batch_size"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Compile,
    Train,
}

impl Side {
    fn command(self) -> &'static str {
        match self {
            Side::Compile => "compile",
            Side::Train => "train",
        }
    }
}

/// One option of a command: its flag and how it takes a value.
#[derive(Clone, Debug)]
struct ArgSpec {
    long: String,
    /// A switch (`--no-augment`): true or false in the plan.
    flag: bool,
    /// A comma-separated list (`--mean 0.5,0.5,0.5`): a TOML array in the plan.
    list: bool,
}

fn specs<A: clap::Args>() -> BTreeMap<String, ArgSpec> {
    let cmd = A::augment_args(clap::Command::new("x"));
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            Some((
                a.get_id().to_string(),
                ArgSpec {
                    long: long.to_string(),
                    flag: matches!(a.get_action(), clap::ArgAction::SetTrue),
                    list: a.get_value_delimiter().is_some(),
                },
            ))
        })
        .collect()
}

/// An option's value as the command line takes it.
#[derive(Clone, Debug, PartialEq)]
struct OptVal {
    text: String,
    /// `Some` for switches.
    flag: Option<bool>,
}

/// Options by id (`prompt_len`), ordered.
type Opts = BTreeMap<String, OptVal>;

fn push_opt(argv: &mut Vec<String>, spec: &ArgSpec, v: &OptVal) {
    match v.flag {
        Some(true) => argv.push(format!("--{}", spec.long)),
        Some(false) => {}
        None => {
            argv.push(format!("--{}", spec.long));
            argv.push(v.text.clone());
        }
    }
}

/// The first line of a clap error, without its `error: `.
fn clap_message(e: &clap::Error) -> String {
    let s = e.to_string();
    let line = s.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// A TOML scalar (or, for list options, array) as an option value.
fn opt_value(v: &toml::Value, spec: &ArgSpec) -> std::result::Result<OptVal, String> {
    let scalar = |v: &toml::Value| -> std::result::Result<String, String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(format!("{f}")),
            toml::Value::Boolean(_) => Err(format!(
                "takes a value, not true or false (--{} VALUE)",
                spec.long
            )),
            toml::Value::Datetime(_) => Err("takes a number or a string, not a date".into()),
            toml::Value::Array(_) | toml::Value::Table(_) => {
                Err("takes a number or a string".into())
            }
        }
    };
    if spec.flag {
        return match v {
            toml::Value::Boolean(b) => Ok(OptVal {
                text: b.to_string(),
                flag: Some(*b),
            }),
            _ => Err(format!(
                "is a switch (--{}): write true or false",
                spec.long
            )),
        };
    }
    if spec.list {
        return match v {
            toml::Value::Array(a) => Ok(OptVal {
                text: a
                    .iter()
                    .map(scalar)
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
                flag: None,
            }),
            _ => Err("takes a list, e.g. [0.5, 0.5, 0.5]".into()),
        };
    }
    Ok(OptVal {
        text: scalar(v)?,
        flag: None,
    })
}

/// The base command line (every required argument, placeholders) of `side`.
fn base_argv(side: Side) -> Vec<String> {
    let v: &[&str] = match side {
        Side::Compile => &["MODEL", "--num-classes", "2", "--task", "multiclass"],
        Side::Train => &[
            "ARTIFACT", "--data", "DIR", "--train", "T", "--val", "V", "--output", "O",
        ],
    };
    v.iter().map(|s| s.to_string()).collect()
}

/// Whether clap takes `v` for the option `spec` of `side`.
fn check_value(side: Side, spec: &ArgSpec, v: &OptVal) -> std::result::Result<(), String> {
    let mut argv = base_argv(side);
    push_opt(&mut argv, spec, v);
    let r = match side {
        Side::Compile => CompileCli::try_parse_from(argv).map(|_| ()),
        Side::Train => TrainCli::try_parse_from(argv).map(|_| ()),
    };
    r.map_err(|e| clap_message(&e))
}

// ---- the plan --------------------------------------------------------------------------

/// How a data set's training and validation splits are found.
#[derive(Clone, Debug)]
enum Splits {
    /// Files it comes with: patterns with `{shot}` and `{exp}`.
    Provided { train: String, val: String },
    /// Sampled from a pool annotation file; `val`: a validation pattern instead of
    /// sampled validation images.
    Pool {
        pool: PathBuf,
        val: Option<String>,
        val_per_class: Option<usize>,
        seed: u64,
    },
}

#[derive(Clone, Debug)]
struct DataSpec {
    name: String,
    images: PathBuf,
    multilabel: bool,
    classes: usize,
    test: PathBuf,
    splits: Splits,
}

impl DataSpec {
    fn task(&self) -> &'static str {
        if self.multilabel {
            "multilabel"
        } else {
            "multiclass"
        }
    }
    /// The paper's metric: mAP (multi-label), accuracy (multi-class).
    fn metric(&self) -> &'static str {
        if self.multilabel {
            "mAP"
        } else {
            "accuracy"
        }
    }
}

/// One option value of a method, chosen on the validation set.
#[derive(Clone, Debug)]
struct Variant {
    /// `prompt_len=10` (`default` without choices); the run folder's name.
    label: String,
    /// Only the compile options' part: the artifact folder's name.
    compile_label: String,
    compile: Opts,
    train: Opts,
}

#[derive(Clone, Debug)]
struct MethodSpec {
    name: String,
    peft: String,
    variants: Vec<Variant>,
}

#[derive(Debug)]
struct Plan {
    /// As given on the command line (for messages).
    file: PathBuf,
    model: PathBuf,
    target: String,
    dtype: String,
    shots: Vec<usize>,
    samplings: usize,
    datasets: Vec<DataSpec>,
    methods: Vec<MethodSpec>,
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a table",
    }
}

/// Reads the plan's values, with errors naming the file, the table and the key.
struct Reader<'a> {
    file: &'a Path,
    dir: &'a Path,
}

impl Reader<'_> {
    fn err(&self, at: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        if at.is_empty() {
            anyhow!("{}: {msg}", self.file.display())
        } else {
            anyhow!("{}: {at}: {msg}", self.file.display())
        }
    }

    fn string(&self, t: &mut toml::Table, key: &str, at: &str) -> Result<Option<String>> {
        match t.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(s)),
            Some(toml::Value::String(_)) => Err(self.err(at, format!("`{key}` is empty"))),
            Some(v) => Err(self.err(
                at,
                format!("`{key}` must be a string, found {}", type_name(&v)),
            )),
        }
    }

    fn required(&self, t: &mut toml::Table, key: &str, at: &str) -> Result<String> {
        self.string(t, key, at)?
            .ok_or_else(|| self.err(at, format!("`{key}` is missing")))
    }

    fn uint(&self, t: &mut toml::Table, key: &str, at: &str, min: i64) -> Result<Option<usize>> {
        match t.remove(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if i >= min => Ok(Some(i as usize)),
            Some(v) => Err(self.err(
                at,
                format!(
                    "`{key}` must be an integer >= {min}, found {}",
                    match &v {
                        toml::Value::Integer(i) => i.to_string(),
                        v => type_name(v).to_string(),
                    }
                ),
            )),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    /// Keys left after the known ones were taken.
    fn no_more(&self, t: &toml::Table, at: &str, known: &[&str]) -> Result<()> {
        if let Some(k) = t.keys().next() {
            return Err(self.err(
                at,
                format!("unknown key `{k}` (expected {})", known.join(", ")),
            ));
        }
        Ok(())
    }
}

/// Options of one command from a TOML table (`[compile]`, `[train]`): no choices.
fn read_opts(r: &Reader, t: toml::Table, side: Side, at: &str) -> Result<Opts> {
    let specs = match side {
        Side::Compile => specs::<CompileArgs>(),
        Side::Train => specs::<TrainArgs>(),
    };
    let mut out = Opts::new();
    for (key, v) in t {
        let mut id = key.replace('-', "_");
        if side == Side::Compile && id == "init_seed" {
            id = "seed".into();
        }
        let reserved = match side {
            Side::Compile => COMPILE_RESERVED,
            Side::Train => TRAIN_RESERVED,
        };
        if reserved.contains(&id.as_str()) {
            return Err(r.err(at, reserved_message(&key)));
        }
        let spec = specs.get(&id).ok_or_else(|| {
            r.err(
                at,
                format!(
                    "unknown key `{key}`: eptc {} has no --{}",
                    side.command(),
                    id.replace('_', "-")
                ),
            )
        })?;
        if matches!(v, toml::Value::Array(ref a) if !spec.list || a.first().is_some_and(|x| x.is_array()))
        {
            return Err(r.err(
                at,
                format!("`{key}`: a list of values to choose from goes in a [[methods]] table"),
            ));
        }
        let ov = opt_value(&v, spec).map_err(|m| r.err(at, format!("`{key}` {m}")))?;
        check_value(side, spec, &ov).map_err(|m| r.err(at, format!("`{key}`: {m}")))?;
        out.insert(id, ov);
    }
    Ok(out)
}

fn reserved_message(key: &str) -> String {
    format!(
        "`{key}` is set by the protocol (the plan's `model`, `target`, `dtype`, a method's \
         `peft`, a data set's `classes`, `task` and files, or the output folder's layout)"
    )
}

/// A split pattern: only `{shot}` and `{exp}` placeholders.
fn check_pattern(p: &str) -> std::result::Result<(), String> {
    let mut rest = p;
    while let Some(i) = rest.find(['{', '}']) {
        if rest[i..].starts_with('}') {
            return Err(format!("{p:?} has a `}}` without `{{`"));
        }
        let Some(j) = rest[i..].find('}') else {
            return Err(format!("{p:?} has a `{{` without `}}`"));
        };
        let name = &rest[i + 1..i + j];
        if name != "shot" && name != "exp" {
            return Err(format!(
                "{p:?} has the placeholder {{{name}}}; patterns know {{shot}} (K) and {{exp}} (the sampling, 1..)"
            ));
        }
        rest = &rest[i + j + 1..];
    }
    Ok(())
}

fn expand(pattern: &str, shot: usize, exp: usize) -> String {
    pattern
        .replace("{shot}", &shot.to_string())
        .replace("{exp}", &exp.to_string())
}

/// A name used as a table label and a folder name.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
}

fn parse_plan(text: &str, file: &Path, dir: &Path) -> Result<Plan> {
    let r = Reader { file, dir };
    let mut top: toml::Table = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {col}: ")
            })
            .unwrap_or_default();
        anyhow!(
            "{}: {at}{}",
            file.display(),
            e.message().trim().replace('\n', " ")
        )
    })?;
    let model = r.path(&r.required(&mut top, "model", "")?);
    let target = r.string(&mut top, "target", "")?.unwrap_or("cpu".into());
    let dtype = r.string(&mut top, "dtype", "")?.unwrap_or("f32".into());
    let shots = match top.remove("shots") {
        None => vec![1, 5, 10],
        Some(toml::Value::Array(a)) if !a.is_empty() => {
            let mut out = Vec::new();
            for v in a {
                match v {
                    toml::Value::Integer(i) if i >= 1 => {
                        if out.contains(&(i as usize)) {
                            return Err(r.err("", format!("`shots` lists {i} twice")));
                        }
                        out.push(i as usize)
                    }
                    v => {
                        return Err(r.err("", format!("`shots` must list integers >= 1, found {v}")))
                    }
                }
            }
            out
        }
        Some(v) => {
            return Err(r.err(
                "",
                format!(
                    "`shots` must be a non-empty list like [1, 5, 10], found {}",
                    type_name(&v)
                ),
            ))
        }
    };
    let samplings = r.uint(&mut top, "samplings", "", 1)?.unwrap_or(5);
    let table = |top: &mut toml::Table, key: &str| -> Result<toml::Table> {
        match top.remove(key) {
            None => Ok(toml::Table::new()),
            Some(toml::Value::Table(t)) => Ok(t),
            Some(v) => Err(r.err(
                "",
                format!("`{key}` must be a table ([{key}]), found {}", type_name(&v)),
            )),
        }
    };
    let compile = read_opts(&r, table(&mut top, "compile")?, Side::Compile, "[compile]")?;
    let train = read_opts(&r, table(&mut top, "train")?, Side::Train, "[train]")?;
    let tables = |top: &mut toml::Table, key: &str| -> Result<Vec<toml::Table>> {
        let bad = || {
            r.err(
                "",
                format!("`{key}` must be an array of tables: one [[{key}]] per entry"),
            )
        };
        match top.remove(key) {
            None => Err(r.err("", format!("no [[{key}]]: the plan needs at least one"))),
            Some(toml::Value::Array(a)) if !a.is_empty() => a
                .into_iter()
                .map(|v| match v {
                    toml::Value::Table(t) => Ok(t),
                    _ => Err(bad()),
                })
                .collect(),
            Some(_) => Err(bad()),
        }
    };
    let dtabs = tables(&mut top, "datasets")?;
    let mtabs = tables(&mut top, "methods")?;
    r.no_more(
        &top,
        "",
        &[
            "model",
            "target",
            "dtype",
            "shots",
            "samplings",
            "[compile]",
            "[train]",
            "[[datasets]]",
            "[[methods]]",
        ],
    )?;

    let mut datasets: Vec<DataSpec> = Vec::new();
    for (i, mut t) in dtabs.into_iter().enumerate() {
        let at0 = format!("[[datasets]] #{}", i + 1);
        let name = r.required(&mut t, "name", &at0)?;
        let at = format!("[[datasets]] {name}");
        if !valid_name(&name) {
            return Err(r.err(
                &at,
                "`name` may hold letters, digits and - _ . + only (it names folders)",
            ));
        }
        if datasets.iter().any(|d| d.name == name) {
            return Err(r.err(&at, "two data sets have this `name`"));
        }
        let images = r.path(&r.required(&mut t, "images", &at)?);
        let task = r.required(&mut t, "task", &at)?;
        let multilabel = match task.as_str() {
            "multilabel" => true,
            "multiclass" => false,
            t => {
                return Err(r.err(
                    &at,
                    format!("`task` = {t:?}: expected multilabel or multiclass"),
                ))
            }
        };
        let classes = r
            .uint(&mut t, "classes", &at, 1)?
            .ok_or_else(|| r.err(&at, "`classes` is missing"))?;
        let test = r.path(&r.required(&mut t, "test", &at)?);
        let train = r.string(&mut t, "train", &at)?;
        let val = r.string(&mut t, "val", &at)?;
        let pool = r.string(&mut t, "pool", &at)?;
        let val_per_class = r.uint(&mut t, "val_per_class", &at, 1)?;
        let seed = r.uint(&mut t, "seed", &at, 0)?;
        for (k, p) in [("train", &train), ("val", &val)] {
            if let Some(p) = p {
                check_pattern(p).map_err(|m| r.err(&at, format!("`{k}` = {m}")))?;
            }
        }
        let splits = match (train, pool) {
            (Some(_), Some(_)) => {
                return Err(r.err(
                    &at,
                    "give either `train` and `val` (the split files it comes with) or `pool` (a file to sample splits from), not both",
                ))
            }
            (None, None) => {
                return Err(r.err(
                    &at,
                    "no splits: give `train` and `val` (patterns of the split files, e.g. \"chest_{shot}-shot_train_exp{exp}.txt\") or `pool` (a file to sample K-shot splits from)",
                ))
            }
            (Some(train), None) => {
                let val = val.ok_or_else(|| {
                    r.err(&at, "`train` is given without `val` (the validation pattern)")
                })?;
                if let Some(k) = [("val_per_class", val_per_class), ("seed", seed)]
                    .iter()
                    .find(|(_, v)| v.is_some())
                    .map(|(k, _)| k)
                {
                    return Err(r.err(
                        &at,
                        format!("`{k}` is for sampled splits (`pool`); this data set comes with its splits"),
                    ));
                }
                if shots.len() > 1 && !train.contains("{shot}") {
                    return Err(r.err(&at, format!("`train` = {train:?} has no {{shot}}: every K would train on the same file")));
                }
                if samplings > 1 && !train.contains("{exp}") {
                    return Err(r.err(&at, format!("`train` = {train:?} has no {{exp}}: every sampling would train on the same file")));
                }
                Splits::Provided { train, val }
            }
            (None, Some(pool)) => {
                if val.is_some() && val_per_class.is_some() {
                    return Err(r.err(
                        &at,
                        "`val_per_class` samples validation images; `val` names them: give one",
                    ));
                }
                Splits::Pool {
                    pool: r.path(&pool),
                    val,
                    val_per_class,
                    seed: seed.unwrap_or(0) as u64,
                }
            }
        };
        r.no_more(
            &t,
            &at,
            &[
                "name",
                "images",
                "task",
                "classes",
                "test",
                "train",
                "val",
                "pool",
                "val_per_class",
                "seed",
            ],
        )?;
        datasets.push(DataSpec {
            name,
            images,
            multilabel,
            classes,
            test,
            splits,
        });
    }

    let cspecs = specs::<CompileArgs>();
    let tspecs = specs::<TrainArgs>();
    let mut methods: Vec<MethodSpec> = Vec::new();
    for (i, mut t) in mtabs.into_iter().enumerate() {
        let at0 = format!("[[methods]] #{}", i + 1);
        let peft = r.required(&mut t, "peft", &at0)?;
        let name = r.string(&mut t, "name", &at0)?.unwrap_or(peft.clone());
        let at = format!("[[methods]] {name}");
        if !valid_name(&name) {
            return Err(r.err(
                &at,
                "`name` may hold letters, digits and - _ . + only (it names folders)",
            ));
        }
        if methods.iter().any(|m| m.name == name) {
            return Err(r.err(
                &at,
                "two methods have this name: give each a distinct `name`",
            ));
        }
        check_value(
            Side::Compile,
            &cspecs["peft"],
            &OptVal {
                text: peft.clone(),
                flag: None,
            },
        )
        .map_err(|m| r.err(&at, format!("`peft`: {m}")))?;
        let mut fixed_c = compile.clone();
        let mut fixed_t = train.clone();
        // (side, id, values) of the options chosen on the validation set.
        let mut choices: Vec<(Side, String, Vec<OptVal>)> = Vec::new();
        for (key, v) in t {
            let id = key.replace('-', "_");
            let (side, id) = match id.as_str() {
                "seed" => {
                    return Err(r.err(
                        &at,
                        "`seed` is ambiguous here: write `init_seed` (the adapter's initialisation, compile --seed) or `train_seed` (train --seed; [train] `seed` sets it for every method)",
                    ))
                }
                "init_seed" => (Side::Compile, "seed".to_string()),
                "train_seed" => (Side::Train, "seed".to_string()),
                _ if COMPILE_RESERVED.contains(&id.as_str())
                    || TRAIN_RESERVED.contains(&id.as_str()) =>
                {
                    return Err(r.err(&at, reserved_message(&key)))
                }
                _ if cspecs.contains_key(&id) => (Side::Compile, id),
                _ if tspecs.contains_key(&id) => (Side::Train, id),
                _ => {
                    return Err(r.err(
                        &at,
                        format!(
                            "unknown key `{key}`: neither eptc compile nor eptc train has --{}",
                            id.replace('_', "-")
                        ),
                    ))
                }
            };
            let spec = match side {
                Side::Compile => &cspecs[&id],
                Side::Train => &tspecs[&id],
            };
            let values: Vec<toml::Value> = match v {
                toml::Value::Array(a) if !spec.list || a.first().is_some_and(|x| x.is_array()) => {
                    if a.is_empty() {
                        return Err(r.err(&at, format!("`{key}` is an empty list of choices")));
                    }
                    a
                }
                v => vec![v],
            };
            let mut vals = Vec::new();
            for v in &values {
                let ov = opt_value(v, spec).map_err(|m| r.err(&at, format!("`{key}` {m}")))?;
                check_value(side, spec, &ov).map_err(|m| r.err(&at, format!("`{key}`: {m}")))?;
                if vals.contains(&ov) {
                    return Err(r.err(&at, format!("`{key}` lists {} twice", ov.text)));
                }
                vals.push(ov);
            }
            if vals.len() == 1 {
                let ov = vals.pop().expect("one value");
                match side {
                    Side::Compile => fixed_c.insert(id, ov),
                    Side::Train => fixed_t.insert(id, ov),
                };
            } else {
                choices.push((side, id, vals));
            }
        }
        // The variants: every combination of the choices (keys in alphabetical order, the
        // first varying slowest; values in the plan's order).
        let mut variants = vec![(fixed_c, fixed_t, Vec::<String>::new(), Vec::<String>::new())];
        for (side, id, vals) in &choices {
            let mut next = Vec::new();
            for (c, t, label, clabel) in &variants {
                for v in vals {
                    let (mut c, mut t, mut label, mut clabel) =
                        (c.clone(), t.clone(), label.clone(), clabel.clone());
                    let part = format!("{id}={}", v.text);
                    match side {
                        Side::Compile => {
                            c.insert(id.clone(), v.clone());
                            clabel.push(part.clone());
                        }
                        Side::Train => {
                            t.insert(id.clone(), v.clone());
                        }
                    }
                    label.push(part);
                    next.push((c, t, label, clabel));
                }
            }
            variants = next;
        }
        let join = |l: &[String]| {
            if l.is_empty() {
                "default".to_string()
            } else {
                l.join(",")
            }
        };
        let variants = variants
            .into_iter()
            .map(|(c, t, label, clabel)| Variant {
                label: join(&label),
                compile_label: join(&clabel),
                compile: c,
                train: t,
            })
            .collect::<Vec<_>>();
        for v in &variants {
            if !valid_name(&v.label.replace([',', '='], "_")) {
                return Err(r.err(
                    &at,
                    format!(
                        "the choice {:?} cannot name a folder: use letters, digits and - _ . +",
                        v.label
                    ),
                ));
            }
        }
        methods.push(MethodSpec {
            name,
            peft,
            variants,
        });
    }
    Ok(Plan {
        file: file.to_path_buf(),
        model,
        target,
        dtype,
        shots,
        samplings,
        datasets,
        methods,
    })
}

// ---- cells -----------------------------------------------------------------------------

/// One cell of the table: a data set, a method, K and a sampling (1-based).
#[derive(Clone, Copy, Debug)]
struct Cell {
    ds: usize,
    method: usize,
    shot: usize,
    exp: usize,
}

fn cells(plan: &Plan) -> Vec<Cell> {
    let mut out = Vec::new();
    for ds in 0..plan.datasets.len() {
        for method in 0..plan.methods.len() {
            for &shot in &plan.shots {
                for exp in 1..=plan.samplings {
                    out.push(Cell {
                        ds,
                        method,
                        shot,
                        exp,
                    });
                }
            }
        }
    }
    out
}

/// The output folder's layout.
struct Layout {
    out: PathBuf,
}

impl Layout {
    fn cell_dir(&self, plan: &Plan, c: Cell) -> PathBuf {
        self.out
            .join("runs")
            .join(&plan.datasets[c.ds].name)
            .join(&plan.methods[c.method].name)
            .join(format!("{}-shot", c.shot))
            .join(format!("exp{}", c.exp))
    }
    fn artifact_dir(&self, ds: &DataSpec, m: &MethodSpec, v: &Variant) -> PathBuf {
        self.out
            .join("artifacts")
            .join(&ds.name)
            .join(&m.name)
            .join(&v.compile_label)
    }
    fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.out)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    }
}

/// The training and validation files of a cell.
#[derive(Clone, Debug)]
struct SplitFiles {
    train: PathBuf,
    val: PathBuf,
}

/// Where a data set's split files are for K = `shot` and sampling `exp`; for a pool,
/// also the seed and validation images per class it is sampled with.
fn split_files(
    plan_dir: &Path,
    out: &Path,
    ds: &DataSpec,
    shot: usize,
    exp: usize,
) -> (SplitFiles, Option<(u64, usize)>) {
    match &ds.splits {
        Splits::Provided { train, val } => (
            SplitFiles {
                train: plan_dir.join(expand(train, shot, exp)),
                val: plan_dir.join(expand(val, shot, exp)),
            },
            None,
        ),
        Splits::Pool {
            val,
            val_per_class,
            seed,
            ..
        } => {
            let dir = out.join("splits").join(&ds.name);
            let train = dir.join(format!("{shot}-shot_train_exp{exp}.txt"));
            let (val, v) = match val {
                Some(p) => (plan_dir.join(expand(p, shot, exp)), 0),
                None => (
                    dir.join(format!("{shot}-shot_val_exp{exp}.txt")),
                    val_per_class.unwrap_or(shot),
                ),
            };
            (SplitFiles { train, val }, Some((seed + exp as u64, v)))
        }
    }
}

/// Everything a cell needs, checked before anything runs.
struct Prepared {
    plan: Plan,
    plan_dir: PathBuf,
    layout: Layout,
}

impl Prepared {
    fn splits(&self, c: Cell) -> SplitFiles {
        split_files(
            &self.plan_dir,
            &self.layout.out,
            &self.plan.datasets[c.ds],
            c.shot,
            c.exp,
        )
        .0
    }

    fn compile_args(&self, ds: &DataSpec, m: &MethodSpec, v: &Variant) -> Result<CompileArgs> {
        let p = &self.plan;
        let specs = specs::<CompileArgs>();
        let mut argv = vec![
            p.model.to_string_lossy().into_owned(),
            "--peft".into(),
            m.peft.clone(),
            "--num-classes".into(),
            ds.classes.to_string(),
            "--task".into(),
            ds.task().into(),
            "--target".into(),
            p.target.clone(),
            "--dtype".into(),
            p.dtype.clone(),
            "--output".into(),
            self.layout
                .artifact_dir(ds, m, v)
                .to_string_lossy()
                .into_owned(),
        ];
        for (k, val) in &v.compile {
            push_opt(&mut argv, &specs[k], val);
        }
        let mut a = CompileCli::try_parse_from(argv)
            .map_err(|e| {
                anyhow!(
                    "{}: [[methods]] {} ({}): {}",
                    p.file.display(),
                    m.name,
                    v.label,
                    clap_message(&e)
                )
            })?
            .a;
        if let Some(f) = &a.peft.init_input {
            a.peft.init_input = Some(self.plan_dir.join(f));
        }
        Ok(a)
    }

    fn train_args(&self, c: Cell, v: &Variant, artifact: &Path, run: &Path) -> Result<TrainArgs> {
        let p = &self.plan;
        let ds = &p.datasets[c.ds];
        let m = &p.methods[c.method];
        let specs = specs::<TrainArgs>();
        let sp = self.splits(c);
        let mut argv: Vec<String> = vec![
            artifact.to_string_lossy().into_owned(),
            "--data".into(),
            ds.images.to_string_lossy().into_owned(),
            "--train".into(),
            sp.train.to_string_lossy().into_owned(),
            "--val".into(),
            sp.val.to_string_lossy().into_owned(),
            "--output".into(),
            run.to_string_lossy().into_owned(),
        ];
        for (k, val) in &v.train {
            push_opt(&mut argv, &specs[k], val);
        }
        let mut a = TrainCli::try_parse_from(argv)
            .map_err(|e| {
                anyhow!(
                    "{}: [[methods]] {} ({}): {}",
                    p.file.display(),
                    m.name,
                    v.label,
                    clap_message(&e)
                )
            })?
            .a;
        // Sampling k trains with seed `seed + k`.
        a.seed = a.seed.wrapping_add(c.exp as u64);
        Ok(a)
    }

    /// What decides a cell's result; a `result.json` with other settings is redone.
    fn settings(&self, c: Cell) -> Value {
        let p = &self.plan;
        let ds = &p.datasets[c.ds];
        let m = &p.methods[c.method];
        let opts = |o: &Opts, skip: &[&str]| -> Value {
            o.iter()
                .filter(|(k, _)| !skip.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), Value::String(v.text.clone())))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let (sp, sampled) = split_files(&self.plan_dir, &self.layout.out, ds, c.shot, c.exp);
        let data = match (&ds.splits, sampled) {
            (Splits::Pool { pool, val, .. }, Some((seed, v))) => json!({
                "pool": pool, "seed": seed, "val_per_class": v,
                "val": val.as_ref().map(|_| &sp.val),
            }),
            _ => json!({"train": sp.train, "val": sp.val}),
        };
        json!({
            "model": p.model, "target": p.target, "dtype": p.dtype,
            "dataset": {"images": ds.images, "task": ds.task(), "classes": ds.classes,
                        "test": ds.test, "splits": data},
            "method": {"peft": m.peft, "variants": m.variants.iter().map(|v| json!({
                "label": v.label, "compile": opts(&v.compile, &[]),
                "train": opts(&v.train, TRAIN_NO_EFFECT)})).collect::<Vec<_>>()},
            "shot": c.shot, "exp": c.exp,
        })
    }
}

/// Check everything that can be checked before training: the target, the model, every
/// method's options on it, the training options, the data files; sample (and, unless
/// `dry`, write) the pool splits.
fn prepare(plan: Plan, plan_dir: PathBuf, out: PathBuf, dry: bool) -> Result<Prepared> {
    let f = plan.file.display().to_string();
    let backend = crate::backends::find(&plan.target).with_context(|| format!("{f}: `target`"))?;
    let dtype = eptc_ir::DType::from_name(&plan.dtype)
        .with_context(|| format!("{f}: `dtype` = {:?}: expected f32, f16 or bf16", plan.dtype))?;
    if !backend.capabilities().dtypes.contains(&dtype) {
        bail!(
            "{f}: `dtype` = {:?}: the {} backend stores tensors as {} only",
            plan.dtype,
            backend.name(),
            backend
                .capabilities()
                .dtypes
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let eptc_backend::Availability::Unavailable(why) = backend.availability() {
        bail!(
            "{f}: `target` = {:?}: the backend cannot run here ({why})",
            plan.target
        );
    }
    if !plan.model.is_file() {
        bail!("{f}: `model`: no file {}", plan.model.display());
    }
    let p = Prepared {
        plan,
        plan_dir,
        layout: Layout { out },
    };
    let plan = &p.plan;
    // Every method's options on the model, for every data set's head.
    let mut archs: HashMap<String, eptc_frontend::VitArch> = HashMap::new();
    for ds in &plan.datasets {
        for m in &plan.methods {
            for v in &m.variants {
                let a = p.compile_args(ds, m, v)?;
                let at = format!("{f}: [[methods]] {} ({})", m.name, v.label);
                let key = format!("{:?}", a.model_args);
                if !archs.contains_key(&key) {
                    let model = eptc_frontend::import(&plan.model, &a.model_args.import_options())
                        .with_context(|| format!("{f}: `model`"))?;
                    archs.insert(key.clone(), model.arch);
                }
                a.peft
                    .config(&archs[&key])
                    .with_context(|| format!("{at}, data set {}", ds.name))?;
                a.opt.limits().with_context(|| at.clone())?;
                if let Some(i) = &a.peft.init_input {
                    if !i.is_file() {
                        bail!("{at}: `init_input`: no file {}", i.display());
                    }
                }
                let t = p.train_args(
                    Cell {
                        ds: 0,
                        method: 0,
                        shot: plan.shots[0],
                        exp: 1,
                    },
                    v,
                    Path::new("A"),
                    Path::new("R"),
                )?;
                check_train(&t).with_context(|| at.clone())?;
            }
        }
    }
    // Sampled splits, written once everything is checked.
    let mut writes: Vec<(PathBuf, String)> = Vec::new();
    for ds in &plan.datasets {
        let at = format!("{f}: [[datasets]] {}", ds.name);
        if !ds.images.is_dir() {
            bail!("{at}: `images`: no folder {}", ds.images.display());
        }
        if !ds.test.is_file() {
            bail!("{at}: `test`: no file {}", ds.test.display());
        }
        for &shot in &plan.shots {
            for exp in 1..=plan.samplings {
                let (sp, sampled) = split_files(&p.plan_dir, &p.layout.out, ds, shot, exp);
                match &ds.splits {
                    Splits::Provided { .. } => {
                        for (k, file) in [("train", &sp.train), ("val", &sp.val)] {
                            if !file.is_file() {
                                bail!(
                                    "{at}: `{k}` ({shot}-shot, exp{exp}): no file {}",
                                    file.display()
                                );
                            }
                        }
                    }
                    Splits::Pool { pool, val, .. } => {
                        let (seed, v) = sampled.expect("a pool is sampled");
                        if !pool.is_file() {
                            bail!("{at}: `pool`: no file {}", pool.display());
                        }
                        if val.is_some() && !sp.val.is_file() {
                            bail!(
                                "{at}: `val` ({shot}-shot, exp{exp}): no file {}",
                                sp.val.display()
                            );
                        }
                        let task = if ds.multilabel {
                            eptc_runtime::data::Task::MultiLabel
                        } else {
                            eptc_runtime::data::Task::MultiClass
                        };
                        let s = eptc_runtime::sample::sample_file(
                            pool,
                            task,
                            Some(ds.classes),
                            shot,
                            v,
                            seed,
                        )
                        .with_context(|| {
                            format!("{at}: sampling {shot}-shot exp{exp} (seed {seed}) from `pool`")
                        })?;
                        writes.push((sp.train.clone(), s.train));
                        if val.is_none() {
                            writes.push((sp.val.clone(), s.val));
                        }
                    }
                }
            }
        }
    }
    if !dry {
        for (path, text) in &writes {
            write_split(path, text)?;
        }
    }
    Ok(p)
}

/// The checks `eptc train` makes on its options, before anything runs.
fn check_train(a: &TrainArgs) -> Result<()> {
    if a.epochs == 0 {
        bail!("`epochs` must be at least 1");
    }
    if a.batch_size == 0 || a.eval_batch_size == 0 {
        bail!("`batch_size` and `eval_batch_size` must be at least 1");
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("`lr` = {}: must be a positive number", a.lr);
    }
    if !["sgd", "adamw"].contains(&a.optimizer.as_str()) {
        bail!("`optimizer` = {:?}: expected sgd or adamw", a.optimizer);
    }
    if !["cosine", "constant"].contains(&a.schedule.as_str()) {
        bail!("`schedule` = {:?}: expected cosine or constant", a.schedule);
    }
    if a.data.std.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
        bail!("`std` = {:?}: every value must be positive", a.data.std);
    }
    Ok(())
}

/// Write a sampled split, or check that the one there is the same (a different one
/// means the pool or the plan changed under runs that trained on it).
fn write_split(path: &Path, text: &str) -> Result<()> {
    match fs::read_to_string(path) {
        Ok(old) if old == text => Ok(()),
        Ok(_) => bail!(
            "{}: differs from the split the plan draws now (the pool file or the sampling settings changed); delete it, and the runs that trained on it, to sample again",
            path.display()
        ),
        Err(_) => {
            fs::create_dir_all(path.parent().expect("in splits/"))
                .with_context(|| format!("cannot create {}", path.display()))?;
            artifact::write_atomic(path, text.as_bytes())
        }
    }
}

// ---- running a cell --------------------------------------------------------------------

/// What the table needs of a cell.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Pending,
    Failed(String),
    Done { test: f64, chosen: Option<String> },
}

/// A finished cell's `result.json`, if it holds `settings`.
fn finished(path: &Path, settings: &Value) -> Option<Value> {
    let v: Value = serde_json::from_str(&fs::read_to_string(path).ok()?).ok()?;
    (v.get("settings") == Some(settings) && v["test"].is_f64()).then_some(v)
}

fn outcome_of(result: &Value) -> Outcome {
    Outcome::Done {
        test: result["test"].as_f64().unwrap_or(f64::NAN),
        chosen: result["chosen"].as_str().map(str::to_string),
    }
}

/// The best validation figure of a finished run (`metrics.jsonl`) and its epoch.
fn best_val(run: &Path, multilabel: bool) -> Result<(f64, u64)> {
    let path = run.join("metrics.jsonl");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let key = if multilabel { "map" } else { "accuracy" };
    let mut best: Option<(f64, u64)> = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: malformed line", path.display()))?;
        let s = v["val"][key].as_f64().unwrap_or(f64::NEG_INFINITY);
        let e = v["epoch"].as_u64().unwrap_or(0);
        if best.is_none_or(|(b, _)| s > b) {
            best = Some((s, e));
        }
    }
    best.with_context(|| format!("{}: no epoch recorded", path.display()))
}

struct Runner<'a> {
    p: &'a Prepared,
    /// Artifacts compiled or checked in this invocation.
    compiled: BTreeSet<PathBuf>,
}

impl Runner<'_> {
    /// Compile the artifact of a variant, unless the one there was made with the same
    /// options.
    fn artifact(&mut self, ds: &DataSpec, m: &MethodSpec, v: &Variant) -> Result<PathBuf> {
        let dir = self.p.layout.artifact_dir(ds, m, v);
        if self.compiled.contains(&dir) {
            return Ok(dir);
        }
        let a = self.p.compile_args(ds, m, v)?;
        let stamp = dir.join("protocol.json");
        let want = json!({
            "model": self.p.plan.model, "target": self.p.plan.target, "dtype": self.p.plan.dtype,
            "peft": m.peft, "classes": ds.classes, "task": ds.task(),
            "options": v.compile.iter().map(|(k, v)| (k.clone(), Value::String(v.text.clone())))
                .collect::<serde_json::Map<_, _>>(),
        });
        let same = fs::read_to_string(&stamp)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .is_some_and(|v| v == want)
            && dir.join(artifact::MANIFEST).is_file();
        if !same {
            cmd_compile::compile(&a)
                .with_context(|| format!("compiling {}", self.p.layout.rel(&dir)))?;
            artifact::write_atomic(&stamp, format!("{want:#}\n").as_bytes())?;
        }
        self.compiled.insert(dir.clone());
        Ok(dir)
    }

    /// Train every variant of a cell (continuing unfinished runs), choose on validation,
    /// evaluate on the test set; returns `result.json`'s value and a one-line summary.
    fn run_cell(&mut self, c: Cell, pb: &ProgressBar, verbose: bool) -> Result<(Value, String)> {
        let t0 = Instant::now();
        let plan = &self.p.plan;
        let ds = plan.datasets[c.ds].clone();
        let m = plan.methods[c.method].clone();
        let cell_dir = self.p.layout.cell_dir(plan, c);
        fs::create_dir_all(&cell_dir)
            .with_context(|| format!("cannot create {}", cell_dir.display()))?;
        let sp = self.p.splits(c);
        let mut tried: Vec<(Variant, PathBuf, PathBuf, f64, u64)> = Vec::new();
        let mut eval_data = None;
        let what = format!("{} {} {}-shot exp{}", ds.name, m.name, c.shot, c.exp);
        for (i, v) in m.variants.iter().enumerate() {
            if m.variants.len() > 1 {
                pb.set_message(format!(
                    "{what}: {} ({} of {})",
                    v.label,
                    i + 1,
                    m.variants.len()
                ));
            }
            let art = self.artifact(&ds, &m, v)?;
            let run = cell_dir.join(&v.label);
            let mut t = self.p.train_args(c, v, &art, &run)?;
            t.resume = run.join("state.safetensors").is_file();
            let r = if verbose {
                pb.suspend(|| cmd_train::cmd_train(&t))
            } else {
                cmd_train::cmd_train(&t)
            };
            r.with_context(|| {
                format!(
                    "training {} (to retrain it from scratch, delete that folder)",
                    self.p.layout.rel(&run)
                )
            })?;
            let (val, epoch) = best_val(&run, ds.multilabel)?;
            eval_data.get_or_insert((t.data.clone(), t.eval_batch_size));
            tried.push((v.clone(), art, run, val, epoch));
        }
        // The best validation figure; the first on a tie.
        let best = tried
            .iter()
            .enumerate()
            .fold(0, |b, (i, x)| if x.3 > tried[b].3 { i } else { b });
        let (v, art, run, val, _) = &tried[best];
        let (data, batch_size) = eval_data.expect("a method has a variant");
        let test_json = cell_dir.join("test.json");
        pb.set_message(format!("{what}: test set"));
        let test = cmd_train::eval_to(&EvalArgs {
            artifact: art.clone(),
            adapter: Some(run.join("best.safetensors")),
            data,
            ann: ds.test.clone(),
            batch_size,
            output: Some(test_json.clone()),
        })
        .with_context(|| format!("evaluating {} on the test set", self.p.layout.rel(run)))?;
        let metrics: Value = fs::read_to_string(&test_json)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .map(|v| v["metrics"].clone())
            .unwrap_or(Value::Null);
        let choice = m.variants.len() > 1;
        let result = json!({
            "dataset": ds.name, "method": m.name, "shot": c.shot, "exp": c.exp,
            "metric": ds.metric(), "test": test, "test_metrics": metrics,
            "val": val, "chosen": if choice { Some(&v.label) } else { None },
            "variants": tried.iter().map(|(v, art, run, val, epoch)| json!({
                "options": v.label, "val": val, "best_epoch": epoch,
                "run": self.p.layout.rel(run), "artifact": self.p.layout.rel(art),
            })).collect::<Vec<_>>(),
            "adapter": self.p.layout.rel(&run.join("best.safetensors")),
            "train_ann": sp.train, "val_ann": sp.val, "test_ann": ds.test,
            "seconds": t0.elapsed().as_secs_f64(),
            "settings": self.p.settings(c),
        });
        artifact::write_atomic(
            &cell_dir.join("result.json"),
            format!("{result:#}\n").as_bytes(),
        )?;
        let metric = ds.metric();
        let summary = if choice {
            let vals: Vec<String> = tried
                .iter()
                .map(|(v, _, _, val, _)| format!("{} val {val:.2}", v.label))
                .collect();
            format!(
                "{} -> {}, test {metric} {test:.2}",
                vals.join(" | "),
                v.label
            )
        } else {
            format!("val {val:.2}, test {metric} {test:.2}")
        };
        Ok((result, summary))
    }
}

// ---- the table -------------------------------------------------------------------------

/// Mean and standard deviation (population, numpy's default `ddof = 0`).
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// A column of the table: one data set at one K.
#[derive(Clone, Debug)]
struct Column {
    dataset: String,
    metric: String,
    shot: usize,
}

/// The table's contents: `outcomes[method][column]` holds one outcome per sampling.
struct Table {
    title: String,
    methods: Vec<String>,
    columns: Vec<Column>,
    samplings: usize,
    outcomes: Vec<Vec<Vec<Outcome>>>,
}

/// A cell's summary over samplings.
#[derive(Debug, PartialEq)]
struct Summary {
    values: Vec<f64>,
    failed: usize,
    mean: Option<f64>,
    std: Option<f64>,
}

fn summarize(o: &[Outcome]) -> Summary {
    let values: Vec<f64> = o
        .iter()
        .filter_map(|x| match x {
            Outcome::Done { test, .. } => Some(*test),
            _ => None,
        })
        .collect();
    let failed = o.iter().filter(|x| matches!(x, Outcome::Failed(_))).count();
    let (mean, std) = if values.is_empty() {
        (None, None)
    } else {
        let (m, s) = mean_std(&values);
        (Some(m), Some(s))
    };
    Summary {
        values,
        failed,
        mean,
        std,
    }
}

impl Table {
    /// The mean of a row's column means, when every column is complete (the paper's avg).
    fn average(&self, row: &[Vec<Outcome>]) -> Option<f64> {
        let means: Vec<f64> = row
            .iter()
            .map(|o| {
                let s = summarize(o);
                (s.values.len() == self.samplings)
                    .then_some(s.mean)
                    .flatten()
            })
            .collect::<Option<Vec<_>>>()?;
        (!means.is_empty()).then(|| means.iter().sum::<f64>() / means.len() as f64)
    }

    fn cell_text(&self, o: &[Outcome]) -> String {
        let s = summarize(o);
        let n = self.samplings;
        match (s.failed, s.mean, s.std) {
            (f, _, _) if f > 0 => format!("failed ({f} of {n})"),
            (_, Some(m), Some(sd)) if s.values.len() == n => format!("{m:.2} ± {sd:.2}"),
            (_, Some(m), Some(sd)) => format!("{m:.2} ± {sd:.2} ({} of {n})", s.values.len()),
            _ => "–".into(),
        }
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# {}\n", self.title);
        let mut metrics: Vec<(String, Vec<String>)> = Vec::new();
        for c in &self.columns {
            match metrics.iter_mut().find(|(m, _)| *m == c.metric) {
                Some((_, d)) if d.contains(&c.dataset) => {}
                Some((_, d)) => d.push(c.dataset.clone()),
                None => metrics.push((c.metric.clone(), vec![c.dataset.clone()])),
            }
        }
        let _ = writeln!(
            s,
            "Test {} in percent; mean ± std over {} sampling{} (population std, as numpy's default); avg: the mean of the columns.\n",
            metrics
                .iter()
                .map(|(m, d)| format!("{m} ({})", d.join(", ")))
                .collect::<Vec<_>>()
                .join(", "),
            self.samplings,
            if self.samplings == 1 { "" } else { "s" }
        );
        let header = |s: &mut String| {
            s.push_str("| method |");
            for c in &self.columns {
                let _ = write!(s, " {} {}-shot |", c.dataset, c.shot);
            }
        };
        header(&mut s);
        s.push_str(" avg |\n|---|");
        s.push_str(&"---:|".repeat(self.columns.len() + 1));
        s.push('\n');
        for (m, row) in self.methods.iter().zip(&self.outcomes) {
            let _ = write!(s, "| {m} |");
            for o in row {
                let _ = write!(s, " {} |", self.cell_text(o));
            }
            let avg = self
                .average(row)
                .map_or("–".to_string(), |a| format!("{a:.2}"));
            let _ = writeln!(s, " {avg} |");
        }
        // The options chosen on the validation set, per sampling.
        let chosen_rows: Vec<(&String, &Vec<Vec<Outcome>>)> = self
            .methods
            .iter()
            .zip(&self.outcomes)
            .filter(|(_, row)| {
                row.iter().flatten().any(|o| {
                    matches!(
                        o,
                        Outcome::Done {
                            chosen: Some(_),
                            ..
                        }
                    )
                })
            })
            .collect();
        if !chosen_rows.is_empty() {
            let _ = writeln!(
                s,
                "\nChosen on the validation set (sampling 1 / 2 / ...):\n"
            );
            header(&mut s);
            s.push_str("\n|---|");
            s.push_str(&"---|".repeat(self.columns.len()));
            s.push('\n');
            for (m, row) in chosen_rows {
                let _ = write!(s, "| {m} |");
                for o in row {
                    let _ = write!(s, " {} |", chosen_list(o, " / "));
                }
                s.push('\n');
            }
        }
        s
    }

    /// Long form: one row per method, data set and K, then one `average` row per method.
    fn csv(&self) -> String {
        let mut s = String::from(
            "method,dataset,metric,shot,samplings,done,failed,mean,std,values,chosen\n",
        );
        for (m, row) in self.methods.iter().zip(&self.outcomes) {
            for (c, o) in self.columns.iter().zip(row) {
                let sm = summarize(o);
                let values: Vec<String> = o
                    .iter()
                    .map(|x| match x {
                        Outcome::Done { test, .. } => format!("{test:.4}"),
                        Outcome::Failed(_) => "failed".into(),
                        Outcome::Pending => String::new(),
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "{m},{},{},{},{},{},{},{},{},{},{}",
                    c.dataset,
                    c.metric,
                    c.shot,
                    self.samplings,
                    sm.values.len(),
                    sm.failed,
                    sm.mean.map_or(String::new(), |x| format!("{x:.4}")),
                    sm.std.map_or(String::new(), |x| format!("{x:.4}")),
                    values.join(";"),
                    chosen_list(o, ";")
                );
            }
            let _ = writeln!(
                s,
                "{m},average,,,{},,,{},,,",
                self.samplings,
                self.average(row)
                    .map_or(String::new(), |x| format!("{x:.4}"))
            );
        }
        s
    }
}

/// The chosen options of a cell's samplings (empty without choices).
fn chosen_list(o: &[Outcome], sep: &str) -> String {
    if !o.iter().any(|x| {
        matches!(
            x,
            Outcome::Done {
                chosen: Some(_),
                ..
            }
        )
    }) {
        return String::new();
    }
    o.iter()
        .map(|x| match x {
            Outcome::Done {
                chosen: Some(c), ..
            } => c.clone(),
            Outcome::Failed(_) => "failed".into(),
            _ => "–".into(),
        })
        .collect::<Vec<_>>()
        .join(sep)
}

fn table_of(plan: &Plan, all: &[Cell], outcomes: &[Outcome]) -> Table {
    let columns: Vec<Column> = plan
        .datasets
        .iter()
        .flat_map(|d| {
            plan.shots.iter().map(|&shot| Column {
                dataset: d.name.clone(),
                metric: d.metric().into(),
                shot,
            })
        })
        .collect();
    let col = |c: &Cell| {
        c.ds * plan.shots.len()
            + plan
                .shots
                .iter()
                .position(|&s| s == c.shot)
                .expect("a planned K")
    };
    let mut grid =
        vec![vec![vec![Outcome::Pending; plan.samplings]; columns.len()]; plan.methods.len()];
    for (c, o) in all.iter().zip(outcomes) {
        grid[c.method][col(c)][c.exp - 1] = o.clone();
    }
    Table {
        title: format!(
            "eptc protocol: {}",
            plan.file
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        methods: plan.methods.iter().map(|m| m.name.clone()).collect(),
        columns,
        samplings: plan.samplings,
        outcomes: grid,
    }
}

/// Write `table.md`, `table.csv` and `results.jsonl` (the finished and failed cells).
fn write_outputs(
    out: &Path,
    plan: &Plan,
    all: &[Cell],
    outcomes: &[Outcome],
    results: &[Option<Value>],
) -> Result<Table> {
    let t = table_of(plan, all, outcomes);
    artifact::write_atomic(&out.join("table.md"), t.markdown().as_bytes())?;
    artifact::write_atomic(&out.join("table.csv"), t.csv().as_bytes())?;
    let mut jsonl = String::new();
    for ((c, o), r) in all.iter().zip(outcomes).zip(results) {
        let line = match (o, r) {
            (Outcome::Done { .. }, Some(r)) => {
                let mut r = r.clone();
                if let Some(m) = r.as_object_mut() {
                    m.remove("settings");
                    m.insert("status".into(), "done".into());
                }
                r
            }
            (Outcome::Failed(e), _) => json!({
                "dataset": plan.datasets[c.ds].name, "method": plan.methods[c.method].name,
                "shot": c.shot, "exp": c.exp, "status": "failed", "error": e,
            }),
            _ => continue,
        };
        let _ = writeln!(jsonl, "{line}");
    }
    artifact::write_atomic(&out.join("results.jsonl"), jsonl.as_bytes())?;
    Ok(t)
}

// ---- the command -----------------------------------------------------------------------

pub fn cmd_protocol(a: &ProtocolArgs) -> Result<()> {
    let t0 = Instant::now();
    let text = fs::read_to_string(&a.plan)
        .with_context(|| format!("cannot read the plan {}", a.plan.display()))?;
    let plan_dir = fs::canonicalize(&a.plan)
        .with_context(|| format!("cannot read the plan {}", a.plan.display()))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let plan = parse_plan(&text, &a.plan, &plan_dir)?;
    // The output folder's absolute path (its parent's real path where it does not exist
    // yet): the runs record the paths they were started with.
    let out = match fs::canonicalize(&a.output) {
        Ok(o) => o,
        Err(_) => {
            let abs = std::path::absolute(&a.output)
                .with_context(|| format!("-o {}", a.output.display()))?;
            match (abs.parent().map(fs::canonicalize), abs.file_name()) {
                (Some(Ok(parent)), Some(name)) => parent.join(name),
                _ => abs,
            }
        }
    };
    let p = prepare(plan, plan_dir, out.clone(), a.dry_run)?;
    if !a.dry_run {
        fs::create_dir_all(&out)
            .with_context(|| format!("cannot create the output folder {}", out.display()))?;
    }
    let plan = &p.plan;
    let all = cells(plan);
    let settings: Vec<Value> = all.iter().map(|&c| p.settings(c)).collect();
    let mut results: Vec<Option<Value>> = all
        .iter()
        .zip(&settings)
        .map(|(&c, s)| finished(&p.layout.cell_dir(plan, c).join("result.json"), s))
        .collect();
    let before = results.iter().filter(|r| r.is_some()).count();
    let trainings: usize = plan.methods.iter().map(|m| m.variants.len()).sum::<usize>()
        * plan.datasets.len()
        * plan.shots.len()
        * plan.samplings;
    let say = |line: &str| {
        if a.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    say(&format!(
        "eptc protocol {} -> {}: {} data set(s) x {} method(s) x {} K x {} sampling(s) = {} cells ({} training runs); {} finished before",
        a.plan.display(),
        out.display(),
        plan.datasets.len(),
        plan.methods.len(),
        plan.shots.len(),
        plan.samplings,
        all.len(),
        trainings,
        before
    ));
    let label = |c: Cell| {
        format!(
            "{} {} {}-shot exp{}",
            plan.datasets[c.ds].name, plan.methods[c.method].name, c.shot, c.exp
        )
    };
    let width = all.len().to_string().len();
    if a.dry_run {
        for (i, &c) in all.iter().enumerate() {
            let sp = p.splits(c);
            let m = &plan.methods[c.method];
            say(&format!(
                "[{:>width$}/{}] {}: {}; train {}, val {}{}",
                i + 1,
                all.len(),
                label(c),
                if results[i].is_some() {
                    "finished"
                } else {
                    "to run"
                },
                sp.train.display(),
                sp.val.display(),
                if m.variants.len() > 1 {
                    format!(
                        "; choosing among {}",
                        m.variants
                            .iter()
                            .map(|v| v.label.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    String::new()
                }
            ));
        }
        say("dry run: the plan is valid; nothing was run or written");
        return Ok(());
    }
    artifact::write_atomic(&out.join("plan.toml"), text.as_bytes())?;
    let mut outcomes: Vec<Outcome> = results
        .iter()
        .map(|r| r.as_ref().map_or(Outcome::Pending, outcome_of))
        .collect();
    // The bar counts the cells this run does.
    let pb = ProgressBar::new((all.len() - before) as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "protocol [{bar:30}] {pos}/{len} cells, {elapsed}, ETA {eta} {wide_msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    cmd_train::set_quiet(!a.verbose);
    let mut runner = Runner {
        p: &p,
        compiled: BTreeSet::new(),
    };
    let (mut ran, mut failed) = (0usize, Vec::new());
    for (i, &c) in all.iter().enumerate() {
        let head = format!("[{:>width$}/{}] {}", i + 1, all.len(), label(c));
        if let Some(r) = &results[i] {
            pb.suspend(|| {
                say(&format!(
                    "{head}: finished before: test {} {:.2}",
                    r["metric"].as_str().unwrap_or("metric"),
                    r["test"].as_f64().unwrap_or(f64::NAN)
                ))
            });
            continue;
        }
        pb.set_message(label(c));
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runner.run_cell(c, &pb, a.verbose)
        }))
        .unwrap_or_else(|_| Err(anyhow!("internal error (a panic; see above)")));
        match r {
            Ok((v, summary)) => {
                ran += 1;
                outcomes[i] = outcome_of(&v);
                results[i] = Some(v);
                pb.suspend(|| {
                    say(&format!(
                        "{head}: {summary} ({:.1} s)",
                        t.elapsed().as_secs_f64()
                    ))
                });
            }
            Err(e) => {
                let msg = format!("{e:#}");
                pb.suspend(|| say(&format!("{head}: FAILED: {msg}")));
                outcomes[i] = Outcome::Failed(msg.clone());
                failed.push((label(c), msg));
            }
        }
        pb.inc(1);
        write_outputs(&out, plan, &all, &outcomes, &results)?;
    }
    pb.finish_and_clear();
    cmd_train::set_quiet(false);
    let table = write_outputs(&out, plan, &all, &outcomes, &results)?;
    let done = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Done { .. }))
        .count();
    if a.json {
        println!(
            "{}",
            json!({
                "plan": a.plan, "output": out, "cells": all.len(), "finished": done,
                "ran": ran, "finished_before": before, "failed": failed.len(),
                "failures": failed.iter().map(|(c, e)| json!({"cell": c, "error": e})).collect::<Vec<_>>(),
                "table_md": out.join("table.md"), "table_csv": out.join("table.csv"),
                "results": out.join("results.jsonl"), "seconds": t0.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!("\n{}", table.markdown());
        println!(
            "{done} of {} cells finished ({ran} now, {before} before){}, {:.1} s; wrote {}, {}, {}",
            all.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(", {} failed", failed.len())
            },
            t0.elapsed().as_secs_f64(),
            out.join("table.md").display(),
            out.join("table.csv").display(),
            out.join("results.jsonl").display()
        );
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} cells failed (first: {}: {}); the errors are in {}; run the same command again to retry them",
            failed.len(),
            all.len(),
            failed[0].0,
            failed[0].1,
            out.join("results.jsonl").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(x: f64) -> Outcome {
        Outcome::Done {
            test: x,
            chosen: None,
        }
    }

    #[test]
    fn mean_and_population_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
    }

    fn table(outcomes: Vec<Vec<Vec<Outcome>>>) -> Table {
        Table {
            title: "t".into(),
            methods: vec!["ept".into(), "linear".into()],
            columns: vec![
                Column {
                    dataset: "chest".into(),
                    metric: "mAP".into(),
                    shot: 1,
                },
                Column {
                    dataset: "colon".into(),
                    metric: "accuracy".into(),
                    shot: 1,
                },
            ],
            samplings: 2,
            outcomes,
        }
    }

    #[test]
    fn markdown_and_csv() {
        let ept = vec![
            vec![
                Outcome::Done {
                    test: 10.0,
                    chosen: Some("prompt_len=5".into()),
                },
                Outcome::Done {
                    test: 12.0,
                    chosen: Some("prompt_len=10".into()),
                },
            ],
            vec![done(70.0), done(80.0)],
        ];
        let linear = vec![
            vec![done(11.0), Outcome::Failed("boom".into())],
            vec![done(60.0), Outcome::Pending],
        ];
        let t = table(vec![ept, linear]);
        let md = t.markdown();
        assert!(
            md.contains("| method | chest 1-shot | colon 1-shot | avg |"),
            "{md}"
        );
        // ept: 11 ± 1, 75 ± 5, avg 43.
        assert!(
            md.contains("| ept | 11.00 ± 1.00 | 75.00 ± 5.00 | 43.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| linear | failed (1 of 2) | 60.00 ± 0.00 (1 of 2) | – |"),
            "{md}"
        );
        assert!(md.contains("mAP (chest), accuracy (colon)"), "{md}");
        assert!(
            md.contains("| ept | prompt_len=5 / prompt_len=10 |  |"),
            "{md}"
        );
        assert!(!md.contains("| linear | failed / "), "{md}");
        let csv = t.csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "method,dataset,metric,shot,samplings,done,failed,mean,std,values,chosen"
        );
        assert_eq!(
            lines[1],
            "ept,chest,mAP,1,2,2,0,11.0000,1.0000,10.0000;12.0000,prompt_len=5;prompt_len=10"
        );
        assert_eq!(
            lines[2],
            "ept,colon,accuracy,1,2,2,0,75.0000,5.0000,70.0000;80.0000,"
        );
        assert_eq!(lines[3], "ept,average,,,2,,,43.0000,,,");
        assert_eq!(
            lines[4],
            "linear,chest,mAP,1,2,1,1,11.0000,0.0000,11.0000;failed,"
        );
        assert_eq!(
            lines[5],
            "linear,colon,accuracy,1,2,1,0,60.0000,0.0000,60.0000;,"
        );
        assert_eq!(lines[6], "linear,average,,,2,,,,,,");
        assert!(lines.iter().all(|l| l.split(',').count() == 11));
    }

    #[test]
    fn best_validation_epoch_and_finished_cells() {
        let d = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"epoch": 1, "val": {"map": 40.0, "accuracy": 50.0}}"#,
            r#"{"epoch": 2, "val": {"map": 45.0, "accuracy": 50.0}}"#,
            r#"{"epoch": 3, "val": {"map": 45.0, "accuracy": 40.0}}"#,
        ];
        fs::write(d.path().join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
        // The first epoch at the best figure, as `eptc train` keeps best.safetensors.
        assert_eq!(best_val(d.path(), true).unwrap(), (45.0, 2));
        assert_eq!(best_val(d.path(), false).unwrap(), (50.0, 1));
        assert!(best_val(&d.path().join("none"), true).is_err());

        let settings = json!({"shot": 1, "exp": 2});
        let path = d.path().join("result.json");
        fs::write(
            &path,
            json!({"test": 12.5, "chosen": "prompt_len=5", "settings": settings}).to_string(),
        )
        .unwrap();
        let r = finished(&path, &settings).unwrap();
        assert_eq!(
            outcome_of(&r),
            Outcome::Done {
                test: 12.5,
                chosen: Some("prompt_len=5".into())
            }
        );
        // Made with other settings, or half written: not finished.
        assert!(finished(&path, &json!({"shot": 1, "exp": 3})).is_none());
        fs::write(&path, "{\"test\": 12.5, \"sett").unwrap();
        assert!(finished(&path, &settings).is_none());
    }

    #[test]
    fn patterns() {
        assert!(check_pattern("chest_{shot}-shot_train_exp{exp}.txt").is_ok());
        assert_eq!(
            expand("chest_{shot}-shot_train_exp{exp}.txt", 5, 3),
            "chest_5-shot_train_exp3.txt"
        );
        assert!(check_pattern("a_{k}.txt").unwrap_err().contains("{k}"));
        assert!(check_pattern("a_{shot.txt")
            .unwrap_err()
            .contains("without"));
        assert!(check_pattern("a_}.txt").unwrap_err().contains("without"));
    }

    fn parse(text: &str) -> Result<Plan> {
        parse_plan(text, Path::new("plan.toml"), Path::new("/d"))
    }

    const DATA: &str = r#"
[[datasets]]
name = "chest"
images = "img"
task = "multilabel"
classes = 19
test = "test.txt"
train = "chest_{shot}-shot_train_exp{exp}.txt"
val = "chest_{shot}-shot_val_exp{exp}.txt"
"#;

    #[test]
    fn plan_variants_and_defaults() {
        let p = parse(&format!(
            "model = \"m.safetensors\"\n[train]\nepochs = 2\nlr = 0.01\n{DATA}\n\
             [[methods]]\npeft = \"ept\"\nprompt_len = [5, 10]\nlr = [0.1, 0.2]\ninit_seed = 3\n\
             [[methods]]\npeft = \"lora\"\nname = \"lora-4\"\nrank = 4\nno_augment = true\n"
        ))
        .unwrap();
        assert_eq!(p.shots, vec![1, 5, 10]);
        assert_eq!(p.samplings, 5);
        assert_eq!(p.model, Path::new("/d/m.safetensors"));
        assert_eq!(p.target, "cpu");
        let ept = &p.methods[0];
        let labels: Vec<&str> = ept.variants.iter().map(|v| v.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "lr=0.1,prompt_len=5",
                "lr=0.1,prompt_len=10",
                "lr=0.2,prompt_len=5",
                "lr=0.2,prompt_len=10"
            ]
        );
        assert_eq!(ept.variants[1].compile_label, "prompt_len=10");
        assert_eq!(ept.variants[1].train["lr"].text, "0.1");
        assert_eq!(ept.variants[1].train["epochs"].text, "2");
        assert_eq!(ept.variants[1].compile["seed"].text, "3");
        let lora = &p.methods[1];
        assert_eq!(lora.name, "lora-4");
        assert_eq!(lora.variants.len(), 1);
        assert_eq!(lora.variants[0].label, "default");
        assert_eq!(lora.variants[0].train["no_augment"].flag, Some(true));
        match &p.datasets[0].splits {
            Splits::Provided { train, .. } => assert!(train.contains("{exp}")),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn example_plan_parses() {
        let text = include_str!("../../../examples/medfmc-plan.toml");
        let p = parse(text).unwrap();
        let names: Vec<&str> = p.datasets.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["chest", "colon", "endo"]);
        assert_eq!(p.methods.len(), 10);
        let ept = p.methods.iter().find(|m| m.name == "EPT").unwrap();
        assert_eq!(ept.variants.len(), 8);
        assert_eq!(ept.variants[0].label, "prompt_len=5");
        let (sp, _) = split_files(Path::new("/d"), Path::new("/o"), &p.datasets[0], 5, 3);
        assert_eq!(
            sp.train,
            Path::new("/d/data_anns/MedFMC/chest/chest_5-shot_train_exp3.txt")
        );
    }

    #[test]
    fn plan_errors_name_the_key() {
        let m = "[[methods]]\npeft = \"ept\"\n";
        let e = |text: &str| format!("{:#}", parse(text).unwrap_err());
        let base = format!("model = \"m\"\n{DATA}");
        assert!(e(&format!("{DATA}{m}")).contains("`model` is missing"));
        let x = e(&format!("{base}{m}promt_len = 5\n"));
        assert!(
            x.contains("plan.toml: [[methods]] ept: unknown key `promt_len`"),
            "{x}"
        );
        let x = e(&format!("{base}{m}prompt_len = \"ten\"\n"));
        assert!(x.contains("`prompt_len`") && x.contains("ten"), "{x}");
        let x = e(&format!("{base}{m}seed = 1\n"));
        assert!(x.contains("init_seed"), "{x}");
        let x = e(&format!("{base}{m}num_classes = 3\n"));
        assert!(x.contains("set by the protocol"), "{x}");
        let x = e(&format!(
            "model = \"m\"\n[train]\nepochs = [1, 2]\n{DATA}{m}"
        ));
        assert!(x.contains("[train]") && x.contains("[[methods]]"), "{x}");
        let x = e(&format!("model = \"m\"\nshots = [1, 1]\n{DATA}{m}"));
        assert!(x.contains("`shots` lists 1 twice"), "{x}");
        let x = e(&format!("{base}{m}{m}"));
        assert!(x.contains("distinct `name`"), "{x}");
        let x = e(&format!(
            "{}{m}",
            base.replace("classes = 19", "classes = \"19\"")
        ));
        assert!(
            x.contains("[[datasets]] chest: `classes` must be an integer"),
            "{x}"
        );
        let x = e(&format!(
            "{}{m}",
            base.replace("train = ", "pool = \"p.txt\"\ntrain = ")
        ));
        assert!(x.contains("not both"), "{x}");
        let x = e(&format!(
            "{}{m}",
            base.replace("{exp}.txt\"\nval", ".txt\"\nval")
        ));
        assert!(x.contains("has no {exp}"), "{x}");
        let x = e(&format!("{base}{m}\nbogus = 1\n"));
        assert!(x.contains("unknown key `bogus`"), "{x}");
        let x = e("model = \n");
        assert!(x.starts_with("plan.toml: line 1, column"), "{x}");
        assert!(!x.contains('\n'), "{x}");
        let x = e(&format!("model = \"m\"\n{m}"));
        assert!(x.contains("no [[datasets]]"), "{x}");
    }
}
