//! `eptc`: compile, run and inspect prompt-tuned Vision Transformers.

mod args;
mod artifact;
mod backends;
mod cmd_analyze;
mod cmd_bench;
mod cmd_compile;
mod cmd_export;
mod cmd_info;
mod cmd_plot;
mod cmd_protocol;
mod cmd_sample;
mod cmd_train;
mod demo;
mod pipeline;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// eptc — a compiler and runtime for prompt-tuned Vision Transformers.
///
/// Takes a pretrained ViT checkpoint (safetensors with timm, Hugging Face or mmcls keys),
/// inserts Embedded Prompt Tuning into its graph and runs it on a backend.
///
/// Typical use:
///   eptc inspect vit_b16.safetensors
///   eptc compile vit_b16.safetensors --peft ept --num-classes 19 --target cpu -o vit-ept
///   eptc run vit-ept --input batch.safetensors --output out.safetensors
///   eptc train vit-ept --data DIR --train train.txt --val val.txt -o run1
///   eptc eval vit-ept --adapter run1/best.safetensors --data DIR --ann test.txt
///   eptc infer vit-ept --adapter run1/best.safetensors --data DIR --ann test.txt -o preds.csv
///   eptc export vit-ept --adapter run1/best.safetensors -o for-pytorch
///   eptc analyze vit-ept --adapter run1/best.safetensors --data DIR --ann test.txt -o analysis
///   eptc protocol examples/medfmc-plan.toml -o table1
#[derive(Parser, Debug)]
#[command(name = "eptc", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Load a backend plugin (a dynamic library speaking eptc's plugin ABI; see
    /// plugins/README.md) from this path; repeatable. EPTC_PLUGIN_PATH adds more
    /// (paths separated by `:`). Its backend is then a `--target` by name.
    #[arg(long, global = true, value_name = "PATH")]
    plugin: Vec<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a checkpoint's key layout, architecture and parameter count
    Inspect(cmd_info::InspectArgs),
    /// Import a checkpoint, insert the PEFT method, and write an artifact folder
    Compile(cmd_compile::CompileArgs),
    /// Run a compiled artifact on a tensor file: pixel_values in, logits and features out
    Run(cmd_compile::RunArgs),
    /// Loss and gradients of every trainable tensor on one batch file
    Grad(cmd_train::GradArgs),
    /// Few-shot training of the trainable tensors on MedFMC-layout data
    Train(cmd_train::TrainArgs),
    /// mAP, AUC and accuracy of an adapter on an annotated data set, as JSON
    Eval(cmd_train::EvalArgs),
    /// Score images with an adapter and write the MedFMC submission CSV
    Infer(cmd_train::InferArgs),
    /// Generate a small few-shot image data set (MedFMC layout) to try every command on
    GenData(cmd_train::GenDataArgs),
    /// K-shot training (and validation) splits of an annotation file, from a seed
    Sample(cmd_sample::SampleArgs),
    /// Run the MedFMC protocol: data sets x K-shot x samplings x methods, one table
    Protocol(cmd_protocol::ProtocolArgs),
    /// Write a trained adapter in the layouts PyTorch users load (official EPT, HF peft)
    Export(cmd_export::ExportArgs),
    /// Class-wise feature statistics (Sigma_W, PCA) with and without adapters, with plots
    Analyze(cmd_analyze::AnalyzeArgs),
    /// Training curves of a run (loss, lr, validation metric) as PNG and SVG
    Plot(cmd_plot::PlotArgs),
    /// Time a compiled artifact's forward pass on its backend (median, spread, images/s,
    /// peak memory)
    Bench(cmd_bench::BenchArgs),
    /// Print the IR of a compilation stage
    Ir(cmd_info::IrArgs),
    /// List backends, built in and loaded, and whether each is available here
    Plugins(cmd_info::PluginsArgs),
    /// The main job on an embedded default: a generated ViT and images, compiled with
    /// EPT for the best available backend and run
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("eptc: internal error: {info}\nThis is a bug in eptc; please report it with the command line that caused it.");
    }));
    let cli = Cli::parse();
    if let Err(e) = backends::load_user_plugins(&cli.plugin) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let result = match &cli.command {
        Command::Inspect(a) => cmd_info::cmd_inspect(a),
        Command::Compile(a) => cmd_compile::cmd_compile(a),
        Command::Run(a) => cmd_compile::cmd_run(a),
        Command::Grad(a) => cmd_train::cmd_grad(a),
        Command::Train(a) => cmd_train::cmd_train(a),
        Command::Eval(a) => cmd_train::cmd_eval(a),
        Command::Infer(a) => cmd_train::cmd_infer(a),
        Command::GenData(a) => cmd_train::cmd_gen_data(a),
        Command::Sample(a) => cmd_sample::cmd_sample(a),
        Command::Protocol(a) => cmd_protocol::cmd_protocol(a),
        Command::Export(a) => cmd_export::cmd_export(a),
        Command::Analyze(a) => cmd_analyze::cmd_analyze(a),
        Command::Plot(a) => cmd_plot::cmd_plot(a),
        Command::Bench(a) => cmd_bench::cmd_bench(a),
        Command::Ir(a) => cmd_info::cmd_ir(a),
        Command::Plugins(a) => cmd_info::cmd_plugins(a),
        Command::Demo(a) => demo::cmd_demo(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
