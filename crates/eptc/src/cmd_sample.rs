//! `eptc sample`: K-shot training (and validation) splits of an annotation file, from a
//! seed, for data sets that come without them (the rule: eptc_runtime::sample).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use eptc_runtime::data::Task;
use eptc_runtime::sample;

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// The annotation file to sample from (MedFMC format, as `train` reads it)
    #[arg(long)]
    pub ann: PathBuf,
    /// Training images per class, K >= 1 (multi-label: at least K per label)
    #[arg(long)]
    pub shots: usize,
    /// Seed of the sampling: the same file, K, V and seed give the same split
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the training split (the input's lines, in input order)
    #[arg(short, long)]
    pub output: PathBuf,
    /// Validation images per class, disjoint from the training split
    #[arg(long, requires = "val_out")]
    pub val_per_class: Option<usize>,
    /// Where to write the validation split
    #[arg(long, requires = "val_per_class")]
    pub val_out: Option<PathBuf>,
    /// multiclass (`image 3`) or multilabel (`image 1,0,1` or `image 1 0 1`)
    #[arg(long, default_value = "multiclass")]
    pub task: String,
    /// Classes (multi-class) or labels (multi-label) [default: the largest class id + 1,
    /// or the label count of the first line]
    #[arg(long)]
    pub classes: Option<usize>,
}

pub fn cmd_sample(a: &SampleArgs) -> Result<()> {
    let task = match a.task.as_str() {
        "multiclass" => Task::MultiClass,
        "multilabel" => Task::MultiLabel,
        t => bail!("--task {t:?}: expected multiclass or multilabel"),
    };
    if a.val_per_class == Some(0) {
        bail!("--val-per-class 0: give V >= 1, or leave out --val-per-class and --val-out");
    }
    if a.val_out.as_ref() == Some(&a.output) {
        bail!(
            "--val-out {} is also -o: the two splits need two files",
            a.output.display()
        );
    }
    let v = a.val_per_class.unwrap_or(0);
    let s = sample::sample_file(&a.ann, task, a.classes, a.shots, v, a.seed)?;
    std::fs::write(&a.output, &s.train)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    print!(
        "wrote {} training images ({}-shot, {} {}, seed {}) to {}",
        s.train_images,
        a.shots,
        s.classes,
        if task == Task::MultiLabel {
            "labels"
        } else {
            "classes"
        },
        a.seed,
        a.output.display()
    );
    if let Some(val) = &a.val_out {
        std::fs::write(val, &s.val).with_context(|| format!("cannot write {}", val.display()))?;
        print!(
            " and {} validation images to {}",
            s.val_images,
            val.display()
        );
    }
    println!();
    Ok(())
}
