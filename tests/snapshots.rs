//! Insta snapshots of the IR after each stage on the tiny ViT (depth 2): what the
//! frontend imports (timm's fused qkv, Hugging Face's separate q/k/v) and what each PEFT
//! configuration inserts (`@ept`, `@head` tags). Reviewed like code.

mod common;

use common::*;

fn ir(model: &str, args: &[&str]) -> String {
    let m = fixture(model);
    let mut a = vec!["ir", s(&m), "--heads", "3"];
    a.extend(args);
    eptc_ok(&a)
}

#[test]
fn imported_timm() {
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &["--stage", "imported"]));
}

#[test]
fn imported_hf() {
    insta::assert_snapshot!(ir("tiny_hf.safetensors", &["--stage", "imported"]));
}

#[test]
fn ept_cat_deep() {
    insta::assert_snapshot!(ir(
        "tiny_timm.safetensors",
        &["--prompt-len", "6", "--num-classes", "5"]
    ));
}

#[test]
fn ept_multi_cat_deep() {
    let a = [
        "--ept-mode",
        "multi-cat",
        "--prompt-len",
        "6",
        "--num-classes",
        "5",
    ];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

#[test]
fn ept_add_layer_1() {
    let a = ["--ept-mode", "add", "--layers", "1", "--num-classes", "5"];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

#[test]
fn ept_mul_shallow() {
    let a = [
        "--ept-mode",
        "mul",
        "--depth",
        "shallow",
        "--num-classes",
        "5",
    ];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

#[test]
fn ept_cat_layers_reversed_uniform() {
    let a = [
        "--layers",
        "1,0",
        "--prompt-len",
        "4",
        "--prompt-init",
        "uniform",
        "--num-classes",
        "3",
        "--task",
        "multilabel",
    ];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

#[test]
fn none_keeps_checkpoint_head() {
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &["--peft", "none"]));
}

/// The methods that train existing weights: the chosen checkpoint params become
/// `trainable checkpoint` and carry the method's tag; nothing else changes (`linear`
/// adds only the head).
#[test]
fn peft_full() {
    let a = ["--peft", "full", "--num-classes", "5"];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

#[test]
fn peft_linear() {
    let a = ["--peft", "linear", "--num-classes", "5"];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

#[test]
fn peft_partial_1() {
    let a = ["--peft", "partial-k", "--k", "1", "--num-classes", "5"];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

#[test]
fn peft_bias() {
    let a = ["--peft", "bias", "--num-classes", "5"];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

/// LoRA (r = 4, alpha = 8: scale 2) on timm's fused qkv: per block, `x Aᵀ Bᵀ · 2` added
/// to the q and v thirds of the qkv output (k passes through), every node `@lora`.
#[test]
fn peft_lora() {
    let a = [
        "--peft",
        "lora",
        "--rank",
        "4",
        "--lora-alpha",
        "8",
        "--num-classes",
        "5",
    ];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

/// VPT-deep (L = 3): at each block's input `[CLS, P_i, patches]` (`@vpt`; block 1 drops
/// block 0's prompt outputs), every block over 17 + 3 tokens, the head on the class token.
#[test]
fn peft_vpt_deep() {
    let a = [
        "--peft",
        "vpt",
        "--depth",
        "deep",
        "--prompt-len",
        "3",
        "--num-classes",
        "5",
    ];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

/// AdaptFormer (reduction 4: a 12-wide bottleneck): per block, `0.1 · up(relu(down(y)))`
/// on LN2's output `y`, added after the MLP's residual add, every node `@adapter`.
#[test]
fn peft_adapter() {
    let a = [
        "--peft",
        "adapter",
        "--reduction",
        "4",
        "--num-classes",
        "5",
    ];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

/// MLP-3 (hidden 16): `features` → Linear(48, 16) → ReLU → Linear(16, 16) → ReLU
/// (`@mlp`) → the head Linear(16, 5) (`@head`, keeping the names `head.*`).
#[test]
fn peft_mlp_3() {
    let a = ["--peft", "mlp-3", "--hidden", "16", "--num-classes", "5"];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

/// VP (p = 4 on 32 px): the frame `concat(up, concat(left, 0, right), down)` (`@vp`)
/// added to the image the patch embedding reads.
#[test]
fn peft_vp() {
    let a = ["--peft", "vp", "--pad-size", "4", "--num-classes", "5"];
    insta::assert_snapshot!(ir("tiny_timm.safetensors", &a));
}

/// The autodiff pass on the optimized graph: loss (`@loss`), backward (`@autodiff`) and
/// the gradient outputs, for EPT cat on layer 1 only with a multi-label head. Nothing
/// before layer 1's attention is differentiated except what its sink needs.
#[test]
fn train_stage_cat_layer_1_multilabel() {
    insta::assert_snapshot!(ir(
        "tiny_timm.safetensors",
        &[
            "--stage",
            "train",
            "--layers",
            "1",
            "--prompt-len",
            "4",
            "--num-classes",
            "3",
            "--task",
            "multilabel",
        ]
    ));
}
