#!/usr/bin/env python3
"""Generate the reference fixtures eptc's tests compare against.

Everything here is deterministic (fixed seeds, CPU only, nothing downloaded).

    python scripts/make_fixtures.py --out tests/fixtures     # tiny, committed fixtures
    python scripts/make_fixtures.py --peft-zoo tests/fixtures  # only the PEFT-zoo ones
    python scripts/make_fixtures.py --half-grad-errors tests/fixtures  # PyTorch's own bf16/f16 gradient errors
    python scripts/make_fixtures.py --export tests/fixtures/export  # `eptc export` (peft, transformers)
    python scripts/make_fixtures.py --vit-b16 DIR            # ViT-B/16 parity set (not committed)
    python scripts/make_fixtures.py --bench-torch            # PyTorch EPT timing, JSON on stdout
    python scripts/make_fixtures.py --vit-b16-grad DIR       # + ViT-B/16 gradients (after --vit-b16)
    python scripts/make_fixtures.py --bench-torch-train      # PyTorch EPT training step timing

Requirements: torch, timm (1.0.x), safetensors; transformers is optional (when present,
the Hugging Face key layout is proved by loading the files into ViTModel /
ViTForImageClassification and comparing outputs).

EPT (Embedded Prompt Tuning) follows the official mmcls-based code, per prompted layer
with prompt P of shape [N, L] (see DESIGN.md section 1):

    S = (Q @ K^T) * scale                                   # [B, H, N, N]
    A = softmax(concat([P expanded to [B, H, N, L], S], -1))[..., L:]
    O = A @ V

and in `multi-cat` mode the concatenated prompt is `alpha * P` with
`alpha = S.amax(-1) - S.amin(-1)` per batch, head and query row.

Weights, inputs and prompts are saved in float32. Expected outputs are computed in
float64 from exactly those float32 values and then rounded to float32, so they are a
tighter reference than any float32 run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import timm
from timm.models.vision_transformer import VisionTransformer

# ---------------------------------------------------------------------------------------
# Constants of the tiny model and its fixtures
# ---------------------------------------------------------------------------------------

TINY = dict(
    img_size=32,
    patch_size=8,
    embed_dim=48,
    depth=2,
    num_heads=3,
    mlp_ratio=4,
    qkv_bias=True,
    num_classes=5,
    global_pool="token",
    class_token=True,
)
PROMPT_LEN = 6
NUM_CLASSES = 5
MODES = ("cat", "multi-cat")
DEPTHS = {"deep": [0, 1], "shallow": [0]}
# LayerNorm eps per tag: timm / mmcls checkpoints use 1e-6, Hugging Face ViT uses 1e-12.
EPS = {"ln6": 1e-6, "ln12": 1e-12}

SEED_MODEL = 0
SEED_INPUT = 1
SEED_POOLER = 2


def seeded(name: str) -> torch.Generator:
    """A generator whose seed depends only on `name`, so fixtures are independent."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


# ---------------------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: nn.Module, gen: torch.Generator) -> None:
    """Give every parameter random, non-trivial values (activations of order 1).

    LayerNorm: weight 1 + 0.2 N(0,1), bias 0.2 N(0,1). Other biases: 0.1 N(0,1).
    cls_token N(0,1), pos_embed 0.5 N(0,1). Weights: N(0,1) / sqrt(fan_in).
    Parameters are visited in state_dict order, which makes the values reproducible.
    """
    ln_params = {
        f"{mod_name}.{p_name}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, nn.LayerNorm)
        for p_name, _ in mod.named_parameters(recurse=False)
    }
    params = dict(model.named_parameters())
    assert set(params) == set(model.state_dict()), "model has buffers; extend randomize_"
    for name in model.state_dict():
        p = params[name]
        r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name in ln_params:
            value = 1.0 + 0.2 * r if name.endswith("weight") else 0.2 * r
        elif name == "cls_token":
            value = r
        elif name == "pos_embed":
            value = 0.5 * r
        elif name.endswith("bias"):
            value = 0.1 * r
        else:
            fan_in = math.prod(p.shape[1:])
            value = r / math.sqrt(fan_in)
        p.copy_(value)


def set_ln_eps_(model: nn.Module, eps: float) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.eps = eps
    return model


def unfuse_attention_(model: nn.Module) -> nn.Module:
    """Make timm's Attention use its explicit softmax path instead of SDPA.

    timm 1.0.x decides per instance (`Attention.fused_attn`, a `Final[bool]` set from
    `use_fused_attn()` / env TIMM_FUSED_ATTN at construction). Setting the attribute in
    eager mode is enough. EPT layers do not depend on this (EPTAttention below computes
    by hand), but unprompted layers then use the same explicit float64 math too.
    """
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    return model


def tiny_model(img_size: int = 32) -> VisionTransformer:
    cfg = dict(TINY, img_size=img_size)
    return unfuse_attention_(VisionTransformer(**cfg)).eval()


def resize_pos_embed(pos: torch.Tensor, old_grid: int, new_grid: int) -> torch.Tensor:
    """mmcls `resize_pos_embed`: bicubic resize of the patch grid, CLS row untouched.

    pos: [1, 1 + old_grid**2, D] -> [1, 1 + new_grid**2, D]. Patch positions are laid out
    row-major as a [1, D, old_grid, old_grid] image; no antialiasing.
    """
    cls, grid = pos[:, :1], pos[:, 1:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d)
    return torch.cat([cls, grid], dim=1)


# ---------------------------------------------------------------------------------------
# EPT
# ---------------------------------------------------------------------------------------


class EPTAttention(nn.Module):
    """Wraps a timm Attention and applies EPT with a fixed prompt of shape [N, L]."""

    def __init__(self, attn: nn.Module, prompt: torch.Tensor, mode: str):
        super().__init__()
        assert mode in MODES, mode
        self.attn = attn
        self.mode = mode
        self.register_buffer("prompt", prompt)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        assert attn_mask is None and not is_causal
        a = self.attn
        B, N, C = x.shape
        H, hd = a.num_heads, a.head_dim
        L = self.prompt.shape[-1]
        assert self.prompt.shape[0] == N, (self.prompt.shape, N)

        qkv = a.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)  # Identity for plain ViTs
        s = (q @ k.transpose(-2, -1)) * a.scale  # [B, H, N, N]

        p = self.prompt.expand(B, H, N, L)  # shared by batch and heads
        if self.mode == "multi-cat":
            alpha = s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True)  # [B, H, N, 1]
            p = alpha * p
        attn = torch.cat([p, s], dim=-1).softmax(dim=-1)[..., L:]

        o = (attn @ v).transpose(1, 2).reshape(B, N, C)
        o = a.norm(o)  # Identity for plain ViTs
        return a.proj_drop(a.proj(o))


def with_ept(model: VisionTransformer, prompts: torch.Tensor, layers, mode: str):
    """A copy of `model` whose listed blocks run EPT; prompts[j] goes to layers[j]."""
    assert prompts.shape[0] == len(layers)
    m = copy.deepcopy(model)
    for j, layer in enumerate(layers):
        blk = m.blocks[layer]
        blk.attn = EPTAttention(blk.attn, prompts[j].to(m.pos_embed.dtype), mode)
    return m


@torch.no_grad()
def run(model: VisionTransformer, pixels: torch.Tensor, head=None):
    """(logits, features) in float32; computed in the model's dtype.

    features = final-norm CLS token; head = (weight, bias) or None for the model's own.
    """
    dtype = model.pos_embed.dtype
    feats = model.forward_head(model.forward_features(pixels.to(dtype)), pre_logits=True)
    if head is None:
        logits = model.head(feats)
    else:
        logits = F.linear(feats, head[0].to(dtype), head[1].to(dtype))
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all(), "NaN/Inf in outputs"
    return logits.float().contiguous(), feats.float().contiguous()


def f64_copy(model: nn.Module, eps: float) -> nn.Module:
    """Float64 copy with LayerNorm eps set; values equal the float32 weights exactly."""
    return set_ln_eps_(copy.deepcopy(model).double(), eps).eval()


def make_adapter(name: str, mode: str, layers, tokens: int, prompt_len: int, num_classes: int,
                 dim: int, prompt_std: float):
    """Random adapter tensors + safetensors metadata (DESIGN.md section 6)."""
    gen = seeded(name)
    tensors = {
        "ept.prompts": prompt_std * torch.randn(len(layers), tokens, prompt_len, generator=gen),
        "head.weight": 0.2 * torch.randn(num_classes, dim, generator=gen),
        "head.bias": 0.1 * torch.randn(num_classes, generator=gen),
    }
    peft = {
        "method": "ept",
        "mode": mode,
        "layers": list(layers),
        "prompt_len": prompt_len,
        "num_classes": num_classes,
        "task": "multiclass",
    }
    return tensors, {"peft": json.dumps(peft)}


# ---------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------


def to_hf(sd: dict, depth: int, prefix: str = "", pooler=None, classifier=None) -> dict:
    """timm state_dict -> Hugging Face ViTModel keys (checkpoint layout, as on the Hub).

    timm's fused qkv [3D, D] splits into query / key / value rows [0:D], [D:2D], [2D:3D].
    `pooler` = (weight, bias) adds `pooler.dense.*` (ViTModel);
    `classifier` = (weight, bias) adds `classifier.*` (ViTForImageClassification).
    """
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(depth):
        t, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = sd[f"{t}attn.qkv.{part}"].chunk(3, dim=0)
            out[f"{h}attention.attention.query.{part}"] = q
            out[f"{h}attention.attention.key.{part}"] = k
            out[f"{h}attention.attention.value.{part}"] = v
            out[f"{h}attention.output.dense.{part}"] = sd[f"{t}attn.proj.{part}"]
            out[f"{h}layernorm_before.{part}"] = sd[f"{t}norm1.{part}"]
            out[f"{h}layernorm_after.{part}"] = sd[f"{t}norm2.{part}"]
            out[f"{h}intermediate.dense.{part}"] = sd[f"{t}mlp.fc1.{part}"]
            out[f"{h}output.dense.{part}"] = sd[f"{t}mlp.fc2.{part}"]
    if pooler is not None:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = pooler
    out = {prefix + k: v for k, v in out.items()}
    if classifier is not None:
        out["classifier.weight"], out["classifier.bias"] = classifier
    return out


def to_mmcls(sd: dict, depth: int) -> dict:
    """timm state_dict -> mmcls / mmpretrain VisionTransformer + VisionTransformerClsHead."""
    out = {
        "backbone.cls_token": sd["cls_token"],
        "backbone.pos_embed": sd["pos_embed"],
        "backbone.patch_embed.projection.weight": sd["patch_embed.proj.weight"],
        "backbone.patch_embed.projection.bias": sd["patch_embed.proj.bias"],
        "backbone.ln1.weight": sd["norm.weight"],  # final norm
        "backbone.ln1.bias": sd["norm.bias"],
        "head.layers.head.weight": sd["head.weight"],
        "head.layers.head.bias": sd["head.bias"],
    }
    for i in range(depth):
        t, m = f"blocks.{i}.", f"backbone.layers.{i}."
        for part in ("weight", "bias"):
            out[f"{m}ln1.{part}"] = sd[f"{t}norm1.{part}"]
            out[f"{m}attn.qkv.{part}"] = sd[f"{t}attn.qkv.{part}"]
            out[f"{m}attn.proj.{part}"] = sd[f"{t}attn.proj.{part}"]
            out[f"{m}ln2.{part}"] = sd[f"{t}norm2.{part}"]
            out[f"{m}ffn.layers.0.0.{part}"] = sd[f"{t}mlp.fc1.{part}"]
            out[f"{m}ffn.layers.1.{part}"] = sd[f"{t}mlp.fc2.{part}"]
    return out


def hf_pooler(dim: int):
    gen = torch.Generator().manual_seed(SEED_POOLER)
    w = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
    b = 0.1 * torch.randn(dim, generator=gen)
    return w, b


# ---------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------


def save(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    print(f"  {path.name}: {shapes}" if len(shapes) < 110 else f"  {path.name}: {len(tensors)} tensors")


def save_model(path: Path, tensors: dict) -> None:
    save(path, tensors, metadata={"format": "pt"})


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------
# Optional proof of the Hugging Face layout
# ---------------------------------------------------------------------------------------


def check_hf(hf_sd: dict, hfcls_sd: dict, cfg: dict, pixels: torch.Tensor,
             ref_feats: torch.Tensor, ref_logits: torch.Tensor) -> str:
    """Load the HF-layout tensors with transformers' own from_pretrained and compare.

    ref_* are the timm model's outputs at LayerNorm eps 1e-12. Returns a status line.
    """
    try:
        import transformers
        from transformers import ViTConfig, ViTForImageClassification, ViTModel
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        return "transformers not installed: Hugging Face layout check SKIPPED"

    config = ViTConfig(
        hidden_size=cfg["embed_dim"],
        num_hidden_layers=cfg["depth"],
        num_attention_heads=cfg["num_heads"],
        intermediate_size=cfg["embed_dim"] * cfg["mlp_ratio"],
        image_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        num_channels=3,
        qkv_bias=True,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        num_labels=cfg["num_classes"],
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for cls, sd in ((ViTModel, hf_sd), (ViTForImageClassification, hfcls_sd)):
            d = Path(tmp) / cls.__name__
            d.mkdir()
            config.save_pretrained(d)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"),
                      metadata={"format": "pt"})
            # from_pretrained applies transformers' own checkpoint key conversion, so this
            # tests the layout real Hub checkpoints use, whatever the in-memory names are.
            model, info = cls.from_pretrained(d, output_loading_info=True,
                                              attn_implementation="eager")
            bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
            assert not bad, f"{cls.__name__}: key mismatch {bad}"
            model = model.double().eval()
            with torch.no_grad():
                out = model(pixel_values=pixels.double(), output_hidden_states=False)
            if cls is ViTModel:
                feats = out.last_hidden_state[:, 0]
                diff = float((feats.float() - ref_feats).abs().max())
                results.append(f"ViTModel features max|diff| {diff:.2e}")
            else:
                diff = float((out.logits.float() - ref_logits).abs().max())
                results.append(f"ViTForImageClassification logits max|diff| {diff:.2e}")
            assert diff < 1e-5, results[-1]
    return f"transformers {transformers.__version__}: PASSED ({'; '.join(results)})"


# ---------------------------------------------------------------------------------------
# Gradients (`eptc grad`): loss and gradients of the trainable tensors on one batch
# ---------------------------------------------------------------------------------------

TASKS = ("multilabel", "multiclass")
# Fixed labels for the 3 images of input_b3: multi-hot rows with several 1s, one row all
# zeros; class ids for the multi-class case. The prompt is shared by the batch, so the
# samples' prompt gradients can cancel: with ids [2, 0, 4] layer 1 of cat/deep kept only
# 1.2e-3 (layer 0: 1.8e-2); [2, 1, 4] keeps every prompted layer above 1e-2.
MULTILABEL_TARGETS = [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]]
MULTICLASS_TARGETS = [2, 1, 4]
TRAINABLE = ("ept.prompts", "head.weight", "head.bias")


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """The loss the official EPT code trains with, as mmcls 0.25 computes it.

    Both heads call their loss with `avg_factor = num_samples` (B) and the default
    reduction 'mean', and `weight_reduce_loss` then returns `loss.sum() / avg_factor`:
      multilabel (MultiLabelLinearClsHead, CrossEntropyLoss(use_sigmoid=True)):
          sum over all B x C elements of BCE-with-logits, divided by B (not B*C);
      multiclass (LinearClsHead, CrossEntropyLoss()): sum of per-sample CE / B, i.e.
          F.cross_entropy's mean.
    """
    B = logits.shape[0]
    if task == "multilabel":
        # mmcls maps "difficult" labels (-1) to positives with abs(); ours are 0/1.
        target = labels.abs().to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / B
    assert task == "multiclass", task
    return F.cross_entropy(logits, labels.long(), reduction="sum") / B


def ept_loss(model: VisionTransformer, dtype, eps: float, trainable: dict, layers, mode: str,
             pixels: torch.Tensor, labels: torch.Tensor, task: str):
    """(loss, logits) with the frozen model in `dtype` at LayerNorm `eps`; autograd-ready.

    `trainable` holds `ept.prompts`, `head.weight`, `head.bias` already in `dtype` (leaves
    that require grad, or plain tensors for finite differences).
    """
    m = set_ln_eps_(copy.deepcopy(model).to(dtype), eps).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    m = with_ept(m, trainable["ept.prompts"], layers, mode)
    feats = m.forward_head(m.forward_features(pixels.to(dtype)), pre_logits=True)
    logits = F.linear(feats, trainable["head.weight"], trainable["head.bias"])
    loss = task_loss(logits, labels, task)
    assert torch.isfinite(loss) and torch.isfinite(logits).all(), "NaN/Inf in loss"
    return loss, logits


def ept_grads(model, dtype, eps, adapter, layers, mode, pixels, labels, task):
    """(loss, logits, {name: grad}) for the adapter's trainable tensors in `dtype`."""
    params = {k: adapter[k].detach().to(dtype).clone().requires_grad_(True) for k in TRAINABLE}
    loss, logits = ept_loss(model, dtype, eps, params, layers, mode, pixels, labels, task)
    grads = torch.autograd.grad(loss, [params[k] for k in TRAINABLE])
    return loss.detach(), logits.detach(), dict(zip(TRAINABLE, grads))


def make_grads(out: Path, model: VisionTransformer, x: torch.Tensor, tokens: int, D: int) -> None:
    """Batch files and `grad_{mode}_{depth}_{task}` (see tests/fixtures/README.md)."""
    print("gradients (eptc grad):")
    batches = {
        "multilabel": torch.tensor(MULTILABEL_TARGETS, dtype=torch.float32),
        "multiclass": torch.tensor(MULTICLASS_TARGETS, dtype=torch.float32),
    }
    for task, labels in batches.items():
        save(out / f"batch_{task}.safetensors", {"pixel_values": x, "labels": labels})

    eps = EPS["ln6"]
    report = []
    for mode in MODES:
        for depth_name, layers in DEPTHS.items():
            name = f"adapter_{mode}_{depth_name}"
            # The committed adapter, regenerated from its own seed (same bytes).
            adapter, _ = make_adapter(name, mode, layers, tokens, PROMPT_LEN, NUM_CLASSES, D, 1.0)
            for task in TASKS:
                labels = batches[task]
                loss, logits, grads = ept_grads(model, torch.float64, eps, adapter, layers, mode,
                                                x, labels, task)
                tag = f"{mode}_{depth_name}_{task}"
                tensors = {"loss": loss, "logits": logits}
                tensors.update({f"grad.{k}": g for k, g in grads.items()})
                # One metadata key: safetensors writes metadata from a hash map, so several
                # keys would come out in a random order and the file would not be stable.
                meta = {"grad": json.dumps({"adapter": name, "input": f"batch_{task}",
                                            "task": task, "ln_eps": 1e-6, "computed": "float64"},
                                           sort_keys=True)}
                save(out / f"grad_{tag}.safetensors", tensors, meta)

                # Same logits as the forward fixture (same adapter, input and eps).
                if task == TASKS[0]:
                    ref = load_file(str(out / f"expected_{mode}_{depth_name}_ln6.safetensors"))
                    d = rel_diff(logits.float(), ref["logits"])
                    assert d < 1e-6, f"{tag}: logits differ from expected_*_ln6 ({d:.1e})"
                if task == "multiclass":
                    ref_loss = F.cross_entropy(logits, labels.long())  # mean over the batch
                    assert abs(float(loss - ref_loss)) < 1e-12, (float(loss), float(ref_loss))

                # float32 run of the same thing.
                loss32, _, grads32 = ept_grads(model, torch.float32, eps, adapter, layers, mode,
                                               x, labels, task)
                f32 = {k: rel_diff(grads32[k].double(), grads[k]) for k in TRAINABLE}
                f32["loss"] = abs(float(loss32) - float(loss)) / abs(float(loss))

                # Central finite differences in float64 on a few prompt entries: per
                # prompted layer its largest-|grad| entry, a median-|grad| one and a fixed
                # one. Some entries have gradients near 1e-7, so the error is measured
                # against the largest |grad| of the prompts.
                gp = grads["ept.prompts"]
                entries = []
                for j in range(len(layers)):
                    order = gp[j].abs().flatten().argsort()
                    for flat in (int(order[-1]), int(order[len(order) // 2])):
                        entries.append((j, flat // PROMPT_LEN, flat % PROMPT_LEN))
                    entries.append((j, 5, 2))
                h = 1e-4
                fd_err = 0.0
                for idx in entries:
                    vals = []
                    for sign in (1.0, -1.0):
                        pert = {k: adapter[k].double().clone() for k in TRAINABLE}
                        pert["ept.prompts"][idx] += sign * h
                        with torch.no_grad():
                            vals.append(ept_loss(model, torch.float64, eps, pert, layers, mode,
                                                 x, labels, task)[0])
                    fd = float(vals[0] - vals[1]) / (2 * h)
                    fd_err = max(fd_err, abs(fd - float(gp[idx])) / float(gp.abs().max()))
                norms = [float(gp[j].norm()) for j in range(len(layers))]
                # In the last block only the CLS query row reaches the head: the prompt rows
                # of the patch tokens there get exactly zero gradient.
                last = TINY["depth"] - 1
                if last in layers:
                    assert torch.equal(gp[layers.index(last), 1:], torch.zeros_like(gp[0, 1:]))
                    assert float(gp[layers.index(last), 0].norm()) > 0
                report.append((tag, float(loss), norms, float(grads["head.weight"].norm()),
                               float(grads["head.bias"].norm()), f32, fd_err, entries))

    print("sanity: loss, gradient L2 norms (prompt per layer), f32 vs f64 rel L2 diff, "
          "central FD (h=1e-4) vs autograd on prompt entries (max |fd-ag| / max|g.prompts|)")
    print("  (deep: the last block's prompt gradient is exactly zero outside the CLS row)")
    for tag, loss, norms, nw, nb, f32, fd_err, entries in report:
        pn = " ".join(f"{n:.3e}" for n in norms)
        print(f"  {tag:28s} loss {loss:.6f}  |g.prompts| [{pn}]  |g.head.w| {nw:.3e}  "
              f"|g.head.b| {nb:.3e}")
        print(f"  {'':28s} f32 vs f64: loss {f32['loss']:.1e}  prompts {f32['ept.prompts']:.1e}  "
              f"head.w {f32['head.weight']:.1e}  head.b {f32['head.bias']:.1e}  "
              f"FD {fd_err:.1e} on {entries}")
        # Every prompted layer must get a gradient a test can see (loss is of order 1).
        assert min(norms) > 5e-3 and min(norms) > 0.1 * max(norms), f"{tag}: tiny prompt grad"
        assert max(f32.values()) < 1e-5, f"{tag}: f32 and f64 disagree"
        assert fd_err < 1e-6, f"{tag}: finite differences disagree with autograd"


# ---------------------------------------------------------------------------------------
# The PEFT zoo: methods that train existing weights (full, partial-k, bias)
# ---------------------------------------------------------------------------------------

# method -> (tasks, whether the adapter is perturbed away from the checkpoint values).
# A perturbed adapter makes `eptc` prove it reads the trained values (a fold into frozen
# weights would ignore them); `full` stays at the checkpoint so its file stays small.
ZOO = {
    "bias": (TASKS, True),
    "partial-1": (("multiclass",), True),
    "full": (("multiclass",), False),
}
ZOO_PERTURB = 0.3


def zoo_trainable(method: str, names, depth: int) -> list:
    """The timm keys `eptc compile --peft METHOD` trains (the head always trains)."""
    if method == "full":
        keep = lambda k: True
    elif method == "bias":
        # BitFit as the paper's code: every bias term (LayerNorm, qkv, patch embedding).
        keep = lambda k: k.endswith(".bias")
    elif method.startswith("partial-"):
        k = int(method.split("-")[1])
        last = tuple(f"blocks.{i}." for i in range(depth - k, depth))
        keep = lambda n: n.startswith(last) or n.startswith("norm.")
    else:
        raise ValueError(method)
    return [n for n in names if keep(n) or n.startswith("head.")]


def zoo_loss(model64: nn.Module, values: dict, pixels: torch.Tensor, labels: torch.Tensor,
             task: str):
    """(loss, logits) of the float64 model with `values` replacing its parameters."""
    logits = torch.func.functional_call(model64, values, (pixels.double(),))
    loss = task_loss(logits, labels, task)
    assert torch.isfinite(loss) and torch.isfinite(logits).all(), "NaN/Inf in loss"
    return loss, logits



def make_half_grad_errors(out: Path) -> None:
    """`grad_half_errors.json`: PyTorch's own error in 16-bit storage on the gradient cases.

    For every `grad_{mode}_{depth}_{task}` case, the frozen model, adapter and input cast
    to bfloat16 (and to float16), forward and backward in that type, as eptc's
    `--dtype bf16|f16` stores every value; the relative L2 error of the loss and of each
    gradient against the float64 fixture. The workspace gradient suite's 16-bit bar is
    set from these (tests/common/suites.rs): no implementation that rounds the
    activations to bf16 gets closer to float64 than PyTorch's own rounding allows, and
    multi-cat's `alpha = max - min` amplifies it (DESIGN.md's 1e-2 is out of reach there).
    Reads `tiny_timm`, the adapters and the batch files from `out`; writes only the JSON.
    """
    print("16-bit gradient errors of PyTorch itself:")
    sd = load_file(str(out / "tiny_timm.safetensors"))
    model = tiny_model()
    model.load_state_dict(sd, strict=True)
    eps = EPS["ln6"]
    result: dict = {"computed": f"torch {torch.__version__}, CPU", "bf16": {}, "f16": {}}
    for mode in MODES:
        for depth_name, layers in DEPTHS.items():
            adapter = load_file(str(out / f"adapter_{mode}_{depth_name}.safetensors"))
            for task in TASKS:
                batch = load_file(str(out / f"batch_{task}.safetensors"))
                x, labels = batch["pixel_values"], batch["labels"]
                tag = f"{mode}_{depth_name}_{task}"
                want = load_file(str(out / f"grad_{tag}.safetensors"))
                for key, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
                    loss, _, grads = ept_grads(model, dtype, eps, adapter, layers, mode, x,
                                               labels, task)
                    errs = {f"grad.{k}": float(f"{rel_diff(g.double(), want[f'grad.{k}'].double()):.3e}")
                            for k, g in grads.items()}
                    errs["loss"] = float(f"{rel_diff(loss.double(), want['loss'].double()):.3e}")
                    result[key][tag] = errs
                print(f"  {tag}: prompts bf16 {result['bf16'][tag]['grad.ept.prompts']:.1e}, "
                      f"f16 {result['f16'][tag]['grad.ept.prompts']:.1e}")
    (out / "grad_half_errors.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


def make_peft_zoo(out: Path) -> None:
    """`adapter_{method}` and `grad_{method}_{task}` (see tests/fixtures/README.md).

    Reads `tiny_timm` and `batch_{task}` from `out` (written by `--out` first), so it can
    run alone (`--peft-zoo DIR`) and never changes the other fixtures.
    """
    print("PEFT zoo (eptc grad --peft full|partial-k|bias):")
    sd = load_file(str(out / "tiny_timm.safetensors"))
    model = tiny_model()
    model.load_state_dict(sd, strict=True)
    model64 = f64_copy(model, EPS["ln6"])
    for p in model64.parameters():
        p.requires_grad_(False)
    names = list(sd)
    report = []
    for method, (tasks, perturb) in ZOO.items():
        keys = zoo_trainable(method, names, TINY["depth"])
        adapter = {k: sd[k].clone() for k in keys}
        name = f"adapter_{method}"
        if perturb:
            gen = seeded(name)
            for k in keys:
                v = adapter[k]
                noise = torch.randn(v.shape, generator=gen, dtype=torch.float32)
                adapter[k] = v + ZOO_PERTURB * float(v.abs().mean()) * noise
            cfg = {"method": method, "layers": [], "prompt_len": 0, "num_classes": NUM_CLASSES,
                   "task": "multiclass"}
            save(out / f"{name}.safetensors", adapter,
                 {"peft": json.dumps(cfg, separators=(",", ":"))})
        for task in tasks:
            batch = load_file(str(out / f"batch_{task}.safetensors"))
            x, labels = batch["pixel_values"], batch["labels"]
            params = {k: adapter[k].double().clone().requires_grad_(True) for k in keys}
            loss, logits = zoo_loss(model64, params, x, labels, task)
            grads = torch.autograd.grad(loss, [params[k] for k in keys])
            tensors = {"loss": loss.detach(), "logits": logits.detach()}
            tensors.update({f"grad.{k}": g for k, g in zip(keys, grads)})
            meta = {"grad": json.dumps({"adapter": name if perturb else "checkpoint",
                                        "input": f"batch_{task}", "task": task, "ln_eps": 1e-6,
                                        "computed": "float64"}, sort_keys=True)}
            save(out / f"grad_{method}_{task}.safetensors", tensors, meta)
            with torch.no_grad():
                _, base = zoo_loss(model64, {}, x, labels, task)
            moved = rel_diff(logits.detach(), base) if perturb else 0.0
            small = min(float(g.norm()) for g in grads)
            report.append((f"{method}_{task}", float(loss.detach()), len(keys),
                           sum(g.numel() for g in grads), moved, small))
    print("sanity: loss, trainable tensors / scalars, logits moved by the perturbed adapter "
          "(rel L2), smallest gradient L2 norm")
    for tag, loss, n, numel, moved, small in report:
        print(f"  {tag:22s} loss {loss:.6f}  {n} tensors / {numel} scalars  moved {moved:.3f}  "
              f"min |g| {small:.2e}")
        assert small > 0, f"{tag}: a trainable tensor gets no gradient"
    make_peft_lora(out)


# LoRA as `eptc compile --peft lora --rank 4 --lora-alpha 8` (scale alpha/r = 2, so the
# scale is exercised): on W_q and W_v of every block, inside timm's fused qkv.
LORA_RANK = 4
LORA_ALPHA = 8.0


class LoRAQKV(nn.Module):
    """timm's fused qkv plus `s · (x Aᵀ) Bᵀ` on the q and v thirds (k untouched), as
    Hugging Face peft's LoRA on separate q/v projections."""

    def __init__(self, base: nn.Linear, scale: float):
        super().__init__()
        self.base, self.scale, self.factors = base, scale, None

    def forward(self, x):
        aq, bq, av, bv = self.factors
        dq = self.scale * (x @ aq.T) @ bq.T
        dv = self.scale * (x @ av.T) @ bv.T
        return self.base(x) + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


def lora_keys(i: int) -> list:
    return [f"lora.{i}.{w}.{f}" for w in ("q", "v") for f in ("A", "B")]


def make_peft_lora(out: Path) -> None:
    """`adapter_lora` and `grad_lora_multiclass` (see tests/fixtures/README.md)."""
    print(f"PEFT zoo (eptc grad --peft lora --rank {LORA_RANK} --lora-alpha {LORA_ALPHA:g}):")
    sd = load_file(str(out / "tiny_timm.safetensors"))
    model = tiny_model()
    model.load_state_dict(sd, strict=True)
    model64 = f64_copy(model, EPS["ln6"])
    for p in model64.parameters():
        p.requires_grad_(False)
    depth, dim = TINY["depth"], sd["cls_token"].shape[-1]
    for blk in model64.blocks:
        blk.attn.qkv = LoRAQKV(blk.attn.qkv, LORA_ALPHA / LORA_RANK)
    name = "adapter_lora"
    gen = seeded(name)
    adapter = {}
    for i in range(depth):
        for w in ("q", "v"):
            # A as initialised (Kaiming-uniform, a = sqrt(5): +-1/sqrt(D)); B non-zero, so
            # A gets gradients and the update moves the logits.
            bound = 1.0 / dim ** 0.5
            adapter[f"lora.{i}.{w}.A"] = (torch.rand(LORA_RANK, dim, generator=gen) * 2 - 1) * bound
            adapter[f"lora.{i}.{w}.B"] = 0.2 * torch.randn(dim, LORA_RANK, generator=gen)
    for k in ("head.weight", "head.bias"):
        v = sd[k]
        noise = torch.randn(v.shape, generator=gen, dtype=torch.float32)
        adapter[k] = v + ZOO_PERTURB * float(v.abs().mean()) * noise
    method = f"lora-{LORA_RANK}-alpha-{LORA_ALPHA:g}"
    cfg = {"method": method, "layers": [], "prompt_len": 0, "num_classes": NUM_CLASSES,
           "task": "multiclass"}
    save(out / f"{name}.safetensors", adapter, {"peft": json.dumps(cfg, separators=(",", ":"))})
    keys = list(adapter)
    task = "multiclass"
    batch = load_file(str(out / f"batch_{task}.safetensors"))
    x, labels = batch["pixel_values"], batch["labels"]
    params = {k: adapter[k].double().clone().requires_grad_(True) for k in keys}

    def forward(params):
        for i, blk in enumerate(model64.blocks):
            blk.attn.qkv.factors = [params[k] for k in lora_keys(i)]
        head = {k: params[k] for k in ("head.weight", "head.bias")}
        return zoo_loss(model64, head, x, labels, task)

    loss, logits = forward(params)
    grads = torch.autograd.grad(loss, [params[k] for k in keys])
    tensors = {"loss": loss.detach(), "logits": logits.detach()}
    tensors.update({f"grad.{k}": g for k, g in zip(keys, grads)})
    meta = {"grad": json.dumps({"adapter": name, "input": f"batch_{task}", "task": task,
                                "ln_eps": 1e-6, "computed": "float64"}, sort_keys=True)}
    save(out / f"grad_lora_{task}.safetensors", tensors, meta)
    # The same model with B = 0 is the checkpoint's (LoRA starts as the identity).
    with torch.no_grad():
        zero = {k: (torch.zeros_like(v) if k.endswith(".B") else v) for k, v in params.items()}
        _, at_zero = forward(zero)
        head = {k: params[k] for k in ("head.weight", "head.bias")}
        _, base = zoo_loss(_plain64(sd), head, x, labels, task)
    assert rel_diff(at_zero, base) < 1e-12, "LoRA with B = 0 is not the checkpoint"
    moved = rel_diff(logits.detach(), at_zero)
    small = min(float(g.norm()) for g in grads)
    print(f"  lora_{task}: loss {float(loss.detach()):.6f}  {len(keys)} tensors / "
          f"{sum(g.numel() for g in grads)} scalars  moved {moved:.3f}  min |g| {small:.2e}")
    assert small > 0 and moved > 0.05, "lora: the perturbed adapter must matter"
    make_peft_vpt(out)


# VPT as `eptc compile --peft vpt --depth deep --prompt-len 4`: prompts [CLS, P_i, patches]
# at every block's input, the previous block's prompt outputs dropped.
VPT_LEN = 4


def vpt_forward(model64: nn.Module, prompts: torch.Tensor, pixels: torch.Tensor,
                head: dict) -> torch.Tensor:
    """VPT (Jia et al. 2022) on timm's blocks, by hand: position embeddings first, then
    the prompts of block i replace those of block i - 1 (deep: prompts [layers, L, D];
    shallow: [1, L, D]); the head reads the class token after the final norm."""
    x = model64.patch_embed(pixels.double())
    x = model64._pos_embed(x)
    x = model64.norm_pre(model64.patch_drop(x))
    b, length = x.shape[0], prompts.shape[1]
    for i, blk in enumerate(model64.blocks):
        if i < prompts.shape[0]:
            skip = 1 if i == 0 else 1 + length
            p = prompts[i].unsqueeze(0).expand(b, -1, -1)
            x = torch.cat([x[:, :1], p, x[:, skip:]], dim=1)
        x = blk(x)
    x = model64.norm(x)
    return F.linear(x[:, 0], head["head.weight"], head["head.bias"])


def make_peft_vpt(out: Path) -> None:
    """`adapter_vpt` and `grad_vpt_multiclass` (see tests/fixtures/README.md)."""
    print(f"PEFT zoo (eptc grad --peft vpt --depth deep --prompt-len {VPT_LEN}):")
    sd = load_file(str(out / "tiny_timm.safetensors"))
    model64 = _plain64(sd)
    for p in model64.parameters():
        p.requires_grad_(False)
    depth, dim, patch = TINY["depth"], sd["cls_token"].shape[-1], TINY["patch_size"]
    name = "adapter_vpt"
    gen = seeded(name)
    # VPT's Xavier-uniform bound, as initialised: sqrt(6 / (3 * patch^2 + D)).
    bound = (6.0 / (3 * patch * patch + dim)) ** 0.5
    adapter = {"vpt.prompts": (torch.rand(depth, VPT_LEN, dim, generator=gen) * 2 - 1) * bound}
    for k in ("head.weight", "head.bias"):
        v = sd[k]
        noise = torch.randn(v.shape, generator=gen, dtype=torch.float32)
        adapter[k] = v + ZOO_PERTURB * float(v.abs().mean()) * noise
    cfg = {"method": "vpt-deep", "layers": [], "prompt_len": VPT_LEN,
           "num_classes": NUM_CLASSES, "task": "multiclass"}
    save(out / f"{name}.safetensors", adapter, {"peft": json.dumps(cfg, separators=(",", ":"))})
    keys = list(adapter)
    task = "multiclass"
    batch = load_file(str(out / f"batch_{task}.safetensors"))
    x, labels = batch["pixel_values"], batch["labels"]
    params = {k: adapter[k].double().clone().requires_grad_(True) for k in keys}
    logits = vpt_forward(model64, params["vpt.prompts"], x, params)
    loss = task_loss(logits, labels, task)
    grads = torch.autograd.grad(loss, [params[k] for k in keys])
    tensors = {"loss": loss.detach(), "logits": logits.detach()}
    tensors.update({f"grad.{k}": g for k, g in zip(keys, grads)})
    meta = {"grad": json.dumps({"adapter": name, "input": f"batch_{task}", "task": task,
                                "ln_eps": 1e-6, "computed": "float64"}, sort_keys=True)}
    save(out / f"grad_vpt_{task}.safetensors", tensors, meta)
    with torch.no_grad():
        head = {k: params[k] for k in ("head.weight", "head.bias")}
        _, base = zoo_loss(_plain64(sd), head, x, labels, task)
        # No prompts (L = 0) is the checkpoint's model: the hand-written forward is timm's.
        none = vpt_forward(model64, params["vpt.prompts"][:, :0], x, head)
    assert rel_diff(none, base) < 1e-12, "VPT forward without prompts is not timm's"
    moved = rel_diff(logits.detach(), base)
    small = min(float(g.norm()) for g in grads)
    print(f"  vpt_{task}: loss {float(loss.detach()):.6f}  {len(keys)} tensors / "
          f"{sum(g.numel() for g in grads)} scalars  moved {moved:.3f}  min |g| {small:.2e}")
    assert small > 0 and moved > 0.02, "vpt: the prompts must matter"
    make_peft_adapter(out)


# AdaptFormer as `eptc compile --peft adapter --reduction 4`: a 48/4 = 12 wide bottleneck
# beside every block's MLP, reading LN2's output, scaled by 0.1.
ADAPTER_REDUCTION = 4
ADAPTER_SCALE = 0.1


def adaptformer_forward(model64: nn.Module, params: dict, pixels: torch.Tensor) -> torch.Tensor:
    """AdaptFormer (Chen et al. 2022, the paper's equation) on timm's blocks, by hand:
    x = x + attn(LN1(x)); y = LN2(x); x = x + mlp(y) + s * up(relu(down(y)))."""
    x = model64.patch_embed(pixels.double())
    x = model64._pos_embed(x)
    x = model64.norm_pre(model64.patch_drop(x))
    for i, blk in enumerate(model64.blocks):
        x = x + blk.attn(blk.norm1(x))
        y = blk.norm2(x)
        a = F.relu(F.linear(y, params[f"adapter.{i}.down.weight"], params[f"adapter.{i}.down.bias"]))
        a = F.linear(a, params[f"adapter.{i}.up.weight"], params[f"adapter.{i}.up.bias"])
        x = x + blk.mlp(y) + ADAPTER_SCALE * a
    x = model64.norm(x)
    return F.linear(x[:, 0], params["head.weight"], params["head.bias"])


def make_peft_adapter(out: Path) -> None:
    """`adapter_adapter` and `grad_adapter_multiclass` (see tests/fixtures/README.md)."""
    print(f"PEFT zoo (eptc grad --peft adapter --reduction {ADAPTER_REDUCTION}):")
    sd = load_file(str(out / "tiny_timm.safetensors"))
    model64 = _plain64(sd)
    for p in model64.parameters():
        p.requires_grad_(False)
    depth, dim = TINY["depth"], sd["cls_token"].shape[-1]
    h = dim // ADAPTER_REDUCTION
    name = "adapter_adapter"
    gen = seeded(name)
    adapter = {}
    for i in range(depth):
        # down as initialised (Kaiming-uniform, a = sqrt(5): +-1/sqrt(D)); up and the
        # biases non-zero, so down gets gradients and the adapter moves the logits.
        bound = 1.0 / dim ** 0.5
        adapter[f"adapter.{i}.down.weight"] = (torch.rand(h, dim, generator=gen) * 2 - 1) * bound
        adapter[f"adapter.{i}.down.bias"] = 0.1 * torch.randn(h, generator=gen)
        adapter[f"adapter.{i}.up.weight"] = 2.0 * torch.randn(dim, h, generator=gen)
        adapter[f"adapter.{i}.up.bias"] = 0.5 * torch.randn(dim, generator=gen)
    for k in ("head.weight", "head.bias"):
        v = sd[k]
        noise = torch.randn(v.shape, generator=gen, dtype=torch.float32)
        adapter[k] = v + ZOO_PERTURB * float(v.abs().mean()) * noise
    cfg = {"method": f"adapter-{ADAPTER_REDUCTION}", "layers": [], "prompt_len": 0,
           "num_classes": NUM_CLASSES, "task": "multiclass"}
    save(out / f"{name}.safetensors", adapter, {"peft": json.dumps(cfg, separators=(",", ":"))})
    keys = list(adapter)
    task = "multiclass"
    batch = load_file(str(out / f"batch_{task}.safetensors"))
    x, labels = batch["pixel_values"], batch["labels"]
    params = {k: adapter[k].double().clone().requires_grad_(True) for k in keys}
    logits = adaptformer_forward(model64, params, x)
    loss = task_loss(logits, labels, task)
    grads = torch.autograd.grad(loss, [params[k] for k in keys])
    tensors = {"loss": loss.detach(), "logits": logits.detach()}
    tensors.update({f"grad.{k}": g for k, g in zip(keys, grads)})
    meta = {"grad": json.dumps({"adapter": name, "input": f"batch_{task}", "task": task,
                                "ln_eps": 1e-6, "computed": "float64"}, sort_keys=True)}
    save(out / f"grad_adapter_{task}.safetensors", tensors, meta)
    with torch.no_grad():
        head = {k: params[k] for k in ("head.weight", "head.bias")}
        _, base = zoo_loss(_plain64(sd), head, x, labels, task)
        # up = 0 and its bias 0 (as initialised): the checkpoint's model.
        zero = {k: (torch.zeros_like(v) if ".up." in k else v) for k, v in params.items()}
        at_zero = adaptformer_forward(model64, zero, x)
    assert rel_diff(at_zero, base) < 1e-12, "AdaptFormer with up = 0 is not the checkpoint"
    moved = rel_diff(logits.detach(), base)
    small = min(float(g.norm()) for g in grads)
    print(f"  adapter_{task}: loss {float(loss.detach()):.6f}  {len(keys)} tensors / "
          f"{sum(g.numel() for g in grads)} scalars  moved {moved:.3f}  min |g| {small:.2e}")
    assert small > 0 and moved > 0.05, "adapter: the perturbed adapter must matter"
    make_peft_mlp(out)


# MLP-3 as `eptc compile --peft mlp-3 --hidden 16 --num-classes 5`: Linear(48, 16) ->
# ReLU -> Linear(16, 16) -> ReLU -> Linear(16, 5) on the class token after the final norm.
MLP_HIDDEN = 16


def mlp_forward(model64: nn.Module, params: dict, pixels: torch.Tensor) -> torch.Tensor:
    """MLP-3 on timm's float64 features (the final norm's class token)."""
    feats = model64.forward_head(model64.forward_features(pixels.double()), pre_logits=True)
    x = F.relu(F.linear(feats, params["mlp.0.weight"], params["mlp.0.bias"]))
    x = F.relu(F.linear(x, params["mlp.1.weight"], params["mlp.1.bias"]))
    return F.linear(x, params["head.weight"], params["head.bias"])


def make_peft_mlp(out: Path) -> None:
    """`adapter_mlp` and `grad_mlp_multiclass` (see tests/fixtures/README.md)."""
    print(f"PEFT zoo (eptc grad --peft mlp-3 --hidden {MLP_HIDDEN}):")
    sd = load_file(str(out / "tiny_timm.safetensors"))
    model64 = _plain64(sd)
    for p in model64.parameters():
        p.requires_grad_(False)
    dim, h = sd["cls_token"].shape[-1], MLP_HIDDEN
    name = "adapter_mlp"
    gen = seeded(name)
    adapter = {}
    # As nn.Linear initialises (weights and biases uniform on +-1/sqrt(fan_in)), then
    # scaled by 3 so the ReLUs' inputs and the logits are far from zero.
    for key, (o, i) in (("mlp.0", (h, dim)), ("mlp.1", (h, h)), ("head", (NUM_CLASSES, h))):
        bound = 3.0 / i ** 0.5
        adapter[f"{key}.weight"] = (torch.rand(o, i, generator=gen) * 2 - 1) * bound
        adapter[f"{key}.bias"] = (torch.rand(o, generator=gen) * 2 - 1) * bound
    cfg = {"method": f"mlp-3-{h}", "layers": [], "prompt_len": 0,
           "num_classes": NUM_CLASSES, "task": "multiclass"}
    save(out / f"{name}.safetensors", adapter, {"peft": json.dumps(cfg, separators=(",", ":"))})
    keys = list(adapter)
    task = "multiclass"
    batch = load_file(str(out / f"batch_{task}.safetensors"))
    x, labels = batch["pixel_values"], batch["labels"]
    params = {k: adapter[k].double().clone().requires_grad_(True) for k in keys}
    logits = mlp_forward(model64, params, x)
    loss = task_loss(logits, labels, task)
    grads = torch.autograd.grad(loss, [params[k] for k in keys])
    tensors = {"loss": loss.detach(), "logits": logits.detach()}
    tensors.update({f"grad.{k}": g for k, g in zip(keys, grads)})
    meta = {"grad": json.dumps({"adapter": name, "input": f"batch_{task}", "task": task,
                                "ln_eps": 1e-6, "computed": "float64"}, sort_keys=True)}
    save(out / f"grad_mlp_{task}.safetensors", tensors, meta)
    with torch.no_grad():
        feats = model64.forward_head(model64.forward_features(x.double()), pre_logits=True)
        h0 = F.linear(feats, params["mlp.0.weight"], params["mlp.0.bias"])
        h1 = F.linear(F.relu(h0), params["mlp.1.weight"], params["mlp.1.bias"])
    # Every hidden unit active on some sample, so no gradient row is zero by construction.
    alive = min(float((h0 > 0).any(0).float().mean()), float((h1 > 0).any(0).float().mean()))
    small = min(float(g.norm()) for g in grads)
    print(f"  mlp_{task}: loss {float(loss.detach()):.6f}  {len(keys)} tensors / "
          f"{sum(g.numel() for g in grads)} scalars  alive {alive:.2f}  min |g| {small:.2e}")
    assert small > 0, "mlp: every layer gets a gradient"
    make_peft_vp(out)


# VP (Bahng et al. 2022, the padding prompter) as `eptc compile --peft vp --pad-size 4`
# on 32 px images: a 4 px frame added to the image, zero in the 24 x 24 centre.
VP_PAD = 4


def vp_prompt(params: dict, size: int, pad: int) -> torch.Tensor:
    """The VP code's PadPrompter.forward without the input: the [1, 3, H, W] prompt."""
    base = torch.zeros(1, 3, size - 2 * pad, size - 2 * pad, dtype=params["vp.pad_up"].dtype)
    prompt = torch.cat([params["vp.pad_left"], base, params["vp.pad_right"]], dim=3)
    return torch.cat([params["vp.pad_up"], prompt, params["vp.pad_down"]], dim=2)


def vp_forward(model64: nn.Module, params: dict, pixels: torch.Tensor) -> torch.Tensor:
    x = pixels.double()
    x = x + vp_prompt(params, x.shape[-1], VP_PAD)
    feats = model64.forward_head(model64.forward_features(x), pre_logits=True)
    return F.linear(feats, params["head.weight"], params["head.bias"])


def make_peft_vp(out: Path) -> None:
    """`adapter_vp` and `grad_vp_multiclass` (see tests/fixtures/README.md)."""
    print(f"PEFT zoo (eptc grad --peft vp --pad-size {VP_PAD}):")
    sd = load_file(str(out / "tiny_timm.safetensors"))
    model64 = _plain64(sd)
    for p in model64.parameters():
        p.requires_grad_(False)
    size, pad = TINY["img_size"], VP_PAD
    name = "adapter_vp"
    gen = seeded(name)
    # N(0, 1) as the VP code initialises them (torch.randn).
    adapter = {
        "vp.pad_up": torch.randn(1, 3, pad, size, generator=gen),
        "vp.pad_down": torch.randn(1, 3, pad, size, generator=gen),
        "vp.pad_left": torch.randn(1, 3, size - 2 * pad, pad, generator=gen),
        "vp.pad_right": torch.randn(1, 3, size - 2 * pad, pad, generator=gen),
    }
    for k in ("head.weight", "head.bias"):
        v = sd[k]
        noise = torch.randn(v.shape, generator=gen, dtype=torch.float32)
        adapter[k] = v + ZOO_PERTURB * float(v.abs().mean()) * noise
    cfg = {"method": f"vp-{pad}", "layers": [], "prompt_len": 0,
           "num_classes": NUM_CLASSES, "task": "multiclass"}
    save(out / f"{name}.safetensors", adapter, {"peft": json.dumps(cfg, separators=(",", ":"))})
    keys = list(adapter)
    task = "multiclass"
    batch = load_file(str(out / f"batch_{task}.safetensors"))
    x, labels = batch["pixel_values"], batch["labels"]
    assert x.shape[-1] == x.shape[-2] == size
    params = {k: adapter[k].double().clone().requires_grad_(True) for k in keys}
    logits = vp_forward(model64, params, x)
    loss = task_loss(logits, labels, task)
    grads = torch.autograd.grad(loss, [params[k] for k in keys])
    tensors = {"loss": loss.detach(), "logits": logits.detach()}
    tensors.update({f"grad.{k}": g for k, g in zip(keys, grads)})
    meta = {"grad": json.dumps({"adapter": name, "input": f"batch_{task}", "task": task,
                                "ln_eps": 1e-6, "computed": "float64"}, sort_keys=True)}
    save(out / f"grad_vp_{task}.safetensors", tensors, meta)
    with torch.no_grad():
        head = {k: params[k] for k in ("head.weight", "head.bias")}
        _, base = zoo_loss(_plain64(sd), head, x, labels, task)
        zero = {k: (torch.zeros_like(v) if k.startswith("vp.") else v) for k, v in params.items()}
        at_zero = vp_forward(model64, zero, x)
        centre = vp_prompt(params, size, pad)[..., pad:size - pad, pad:size - pad]
    assert rel_diff(at_zero, base) < 1e-12, "VP with a zero frame is not the checkpoint"
    assert float(centre.abs().max()) == 0.0, "VP: the centre is untouched"
    moved = rel_diff(logits.detach(), base)
    small = min(float(g.norm()) for g in grads)
    print(f"  vp_{task}: loss {float(loss.detach()):.6f}  {len(keys)} tensors / "
          f"{sum(g.numel() for g in grads)} scalars  moved {moved:.3f}  min |g| {small:.2e}")
    assert small > 0 and moved > 0.05, "vp: the frame must matter"


def _plain64(sd: dict) -> nn.Module:
    model = tiny_model()
    model.load_state_dict(sd, strict=True)
    return f64_copy(model, EPS["ln6"])


# ---------------------------------------------------------------------------------------
# The tiny fixtures (committed)
# ---------------------------------------------------------------------------------------


def make_tiny(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    D, depth = TINY["embed_dim"], TINY["depth"]
    tokens = (TINY["img_size"] // TINY["patch_size"]) ** 2 + 1  # 17

    # Model, same weights in four key layouts.
    print("models:")
    model = tiny_model()
    randomize_(model, torch.Generator().manual_seed(SEED_MODEL))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    head = (sd["head.weight"], sd["head.bias"])
    hf_sd = to_hf(sd, depth, pooler=hf_pooler(D))
    hfcls_sd = to_hf(sd, depth, prefix="vit.", classifier=head)
    save_model(out / "tiny_timm.safetensors", sd)
    save_model(out / "tiny_hf.safetensors", hf_sd)
    save_model(out / "tiny_hfcls.safetensors", hfcls_sd)
    save_model(out / "tiny_mmcls.safetensors", to_mmcls(sd, depth))

    # Inputs.
    print("inputs:")
    gen = torch.Generator().manual_seed(SEED_INPUT)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    x48 = torch.randn(3, 3, 48, 48, generator=gen)
    save(out / "input_b3.safetensors", {"pixel_values": x})
    save(out / "input_b1.safetensors", {"pixel_values": x[:1]})
    save(out / "input48_b3.safetensors", {"pixel_values": x48})

    # Plain model.
    print("expected (no PEFT):")
    plain = {}
    for tag, eps in EPS.items():
        logits, feats = run(f64_copy(model, eps), x)
        plain[tag] = (logits, feats)
        save(out / f"expected_none_{tag}.safetensors", {"logits": logits, "features": feats})

    # Adapters and EPT outputs.
    print("adapters and expected (EPT):")
    sanity = []
    for mode in MODES:
        for depth_name, layers in DEPTHS.items():
            name = f"adapter_{mode}_{depth_name}"
            tensors, meta = make_adapter(name, mode, layers, tokens, PROMPT_LEN, NUM_CLASSES, D, 1.0)
            save(out / f"{name}.safetensors", tensors, meta)
            ahead = (tensors["head.weight"], tensors["head.bias"])
            for tag, eps in EPS.items():
                m = with_ept(f64_copy(model, eps), tensors["ept.prompts"], layers, mode)
                logits, feats = run(m, x, ahead)
                save(out / f"expected_{mode}_{depth_name}_{tag}.safetensors",
                     {"logits": logits, "features": feats})
                # Same head without the prompts: how much do the prompts change things?
                base = F.linear(plain[tag][1].double(), ahead[0].double(), ahead[1].double()).float()
                sanity.append((f"{mode}_{depth_name}_{tag}", rel_diff(logits, base),
                               rel_diff(feats, plain[tag][1])))

    # Non-default image size: 48 px, pos_embed resized 4x4 -> 6x6 (bicubic, mmcls style).
    print("48 px:")
    model48 = tiny_model(img_size=48)
    sd48 = dict(sd, pos_embed=resize_pos_embed(sd["pos_embed"].double(), 4, 6))
    model48 = model48.double()
    model48.load_state_dict({k: v.double() for k, v in sd48.items()}, strict=True)
    model48 = set_ln_eps_(model48, EPS["ln6"]).eval()
    tensors, meta = make_adapter("adapter48_cat_deep", "cat", DEPTHS["deep"], 37, PROMPT_LEN,
                                 NUM_CLASSES, D, 1.0)
    save(out / "adapter48_cat_deep.safetensors", tensors, meta)
    ahead = (tensors["head.weight"], tensors["head.bias"])
    logits, feats = run(with_ept(model48, tensors["ept.prompts"], DEPTHS["deep"], "cat"), x48, ahead)
    save(out / "expected48_cat_deep_ln6.safetensors", {"logits": logits, "features": feats})
    _, feats_plain48 = run(model48, x48)
    base = F.linear(feats_plain48.double(), ahead[0].double(), ahead[1].double()).float()
    sanity.append(("48_cat_deep_ln6", rel_diff(logits, base), rel_diff(feats, feats_plain48)))

    print("sanity: relative L2 difference EPT vs plain model (same head)")
    for name, dl, df in sanity:
        print(f"  {name:24s} logits {dl:.3f}  features {df:.3f}")
        assert dl > 0.05, f"prompts barely matter for {name}"
    print("sanity: ln6 vs ln12 plain logits rel diff "
          f"{rel_diff(plain['ln12'][0], plain['ln6'][0]):.2e}")

    # Prove the HF layout with transformers itself, when it is installed.
    print(check_hf(hf_sd, hfcls_sd, TINY, x, plain["ln12"][1], plain["ln12"][0]))

    # Loss and gradients for `eptc grad` (after everything above; own fixed labels).
    make_grads(out, model, x, tokens, D)
    make_peft_zoo(out)


# ---------------------------------------------------------------------------------------
# ViT-B/16 (local parity checks and benchmarks; not committed)
# ---------------------------------------------------------------------------------------

B16_PROMPT_LEN = 100
B16_CLASSES = 10


def vit_b16() -> VisionTransformer:
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    randomize_(model, torch.Generator().manual_seed(SEED_MODEL))
    return unfuse_attention_(model).eval()


def make_vit_b16(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = vit_b16()
    D, depth = model.embed_dim, len(model.blocks)
    tokens = model.patch_embed.num_patches + 1  # 197
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = list(range(depth))

    print("ViT-B/16:")
    save_model(out / "vit_b16_timm.safetensors", sd)
    hf_sd = to_hf(sd, depth, pooler=hf_pooler(D))
    save_model(out / "vit_b16_hf.safetensors", hf_sd)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(SEED_INPUT))
    save(out / "input_b2.safetensors", {"pixel_values": x})
    tensors, meta = make_adapter("vit_b16_adapter_cat_deep", "cat", layers, tokens,
                                 B16_PROMPT_LEN, B16_CLASSES, D, 0.5)
    save(out / "adapter_cat_deep.safetensors", tensors, meta)
    ahead = (tensors["head.weight"], tensors["head.bias"])

    plain = {}
    for tag, eps in EPS.items():
        m64 = f64_copy(model, eps)
        plain[tag] = run(m64, x)
        save(out / f"expected_none_{tag}.safetensors",
             {"logits": plain[tag][0], "features": plain[tag][1]})
        logits, feats = run(with_ept(m64, tensors["ept.prompts"], layers, "cat"), x, ahead)
        save(out / f"expected_cat_deep_{tag}.safetensors", {"logits": logits, "features": feats})
        print(f"  sanity {tag}: EPT vs plain features rel diff {rel_diff(feats, plain[tag][1]):.3f}")

    hfcls_sd = to_hf(sd, depth, prefix="vit.", classifier=(sd["head.weight"], sd["head.bias"]))
    cfg = dict(img_size=224, patch_size=16, embed_dim=D, depth=depth,
               num_heads=model.blocks[0].attn.num_heads, mlp_ratio=4, num_classes=1000)
    print(check_hf(hf_sd, hfcls_sd, cfg, x, plain["ln12"][1], plain["ln12"][0]))


@torch.inference_mode()
def bench_torch(batch: int = 8, threads: int = 2, runs: int = 3) -> dict:
    """Mean wall time of a float32 forward of ViT-B/16 + EPT (cat, deep, L=100, 10 classes)."""
    torch.set_num_threads(threads)
    model = vit_b16()
    layers = list(range(len(model.blocks)))
    tensors, _ = make_adapter("bench", "cat", layers, model.patch_embed.num_patches + 1,
                              B16_PROMPT_LEN, B16_CLASSES, model.embed_dim, 0.5)
    model.head = nn.Linear(model.embed_dim, B16_CLASSES)
    model.head.weight.copy_(tensors["head.weight"])
    model.head.bias.copy_(tensors["head.bias"])
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(SEED_INPUT))

    def timed(m):
        m(x)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t0)
        return times

    ept_times = timed(with_ept(model, tensors["ept.prompts"], layers, "cat"))
    plain_times = timed(model)
    return {
        "bench": "torch_vit_b16_ept_forward",
        "model": "vit_base_patch16_224",
        "peft": {"method": "ept", "mode": "cat", "layers": "deep", "prompt_len": B16_PROMPT_LEN,
                 "num_classes": B16_CLASSES},
        "batch": batch,
        "threads": threads,
        "dtype": "f32",
        "warmup": 1,
        "runs": runs,
        "mean_s": sum(ept_times) / runs,
        "times_s": ept_times,
        "plain_mean_s": sum(plain_times) / runs,  # same model without EPT, for reference
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def make_vit_b16_grad(out: Path) -> None:
    """ViT-B/16 gradient parity set (needs --vit-b16 DIR first): a multi-class batch of
    input_b2 and the float64 loss and gradients of the cat/deep adapter."""
    from safetensors.torch import load_file
    model = vit_b16()
    layers = list(range(len(model.blocks)))
    adapter = load_file(str(out / "adapter_cat_deep.safetensors"))
    x = load_file(str(out / "input_b2.safetensors"))["pixel_values"]
    labels = torch.tensor([3.0, 7.0])
    save(out / "batch_b2_multiclass.safetensors", {"pixel_values": x, "labels": labels})
    loss, logits, grads = ept_grads(model, torch.float64, EPS["ln6"], adapter, layers, "cat", x,
                                    labels, "multiclass")
    save(out / "grad_cat_deep_multiclass.safetensors",
         {"loss": loss.float(), "logits": logits.float().contiguous(),
          **{f"grad.{k}": v.float().contiguous() for k, v in grads.items()}})
    norms = " ".join(f"{float(grads['ept.prompts'][j].norm()):.2e}" for j in layers)
    print(f"ViT-B/16 grad: loss {float(loss):.6f}, |g.prompts| per layer {norms}")


def bench_torch_train(batch: int = 4, threads: int = 2, runs: int = 3) -> dict:
    """Mean wall time of a float32 EPT training step (forward, loss, backward of the
    prompts and head; the optimizer update is not included) of ViT-B/16, cat, deep, L=100."""
    torch.set_num_threads(threads)
    model = vit_b16()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = list(range(len(model.blocks)))
    tensors, _ = make_adapter("bench", "cat", layers, model.patch_embed.num_patches + 1,
                              B16_PROMPT_LEN, B16_CLASSES, model.embed_dim, 0.5)
    params = {k: tensors[k].clone().requires_grad_(True) for k in TRAINABLE}
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(SEED_INPUT))
    labels = torch.arange(batch, dtype=torch.float32) % B16_CLASSES
    m = with_ept(model, params["ept.prompts"], layers, "cat")

    def step():
        feats = m.forward_head(m.forward_features(x), pre_logits=True)
        loss = task_loss(F.linear(feats, params["head.weight"], params["head.bias"]), labels,
                         "multiclass")
        torch.autograd.grad(loss, [params[k] for k in TRAINABLE])

    step()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"bench": "torch_vit_b16_ept_train_step", "batch": batch, "threads": threads,
            "dtype": "f32", "runs": runs, "mean_s": sum(times) / runs, "min_s": min(times),
            "times_s": times, "images_per_s": batch / (sum(times) / runs),
            "torch": torch.__version__, "timm": timm.__version__}


# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# `eptc export`: adapters PyTorch loads directly (DESIGN.md section 6)
# ---------------------------------------------------------------------------------------

# A 3-block model so the official layout's contiguous range can span an unprompted layer.
EXPORT_MODEL = dict(TINY, embed_dim=24, depth=3, num_heads=2)
EXPORT_EPT_LAYERS = "2,0"  # eptc order; the official range is [0, 1, 2], layer 1 neutral
EXPORT_EPT_LEN = 5


def _eptc(eptc: Path, *args) -> None:
    import subprocess
    r = subprocess.run([str(eptc), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"eptc {' '.join(map(str, args))}: {r.stderr}"


def _official_ept_logits(sd: dict, exported: dict, cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    """The official EPT forward (zuwenqiang/EPT medfmc/models/ept.py) in float64, fed the
    exported tensors by their official keys: prompt[i - prompt_layers[0]] for every i in
    prompt_layers, the others plain blocks; head.fc on the final-norm CLS token."""
    model = VisionTransformer(**dict(EXPORT_MODEL, num_classes=0))
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")}, strict=True)
    model = f64_copy(unfuse_attention_(model), 1e-6)
    layers = cfg["backbone"]["prompt_layers"]
    prompt = exported["backbone.prompt"].double()
    assert prompt.shape[0] == len(layers), "backbone.prompt does not match prompt_layers"
    first = layers[0]
    m = with_ept(model, torch.stack([prompt[i - first] for i in layers]), layers, "cat")
    head = (exported["head.fc.weight"].double(), exported["head.fc.bias"].double())
    with torch.no_grad():
        feats = m.forward_head(m.forward_features(pixels.double()), pre_logits=True)
        return F.linear(feats, *head)


def _peft_logits(model: nn.Module, adapter_dir: Path, pixels: torch.Tensor, hf: bool):
    """Load the exported folder with peft's own PeftModel.from_pretrained, float64."""
    from peft import PeftModel
    pm = PeftModel.from_pretrained(model, str(adapter_dir)).double().eval()
    with torch.no_grad():
        out = pm(pixel_values=pixels.double()) if hf else pm(pixels.double())
    return out.logits if hf else out


def make_export(out: Path, eptc: Path) -> None:
    """tests/fixtures/export: PyTorch loads what `eptc export` writes and reproduces the
    logits eptc computes with the same adapter (tests/export.rs)."""
    import peft
    tiny = out.parent
    out.mkdir(parents=True, exist_ok=True)
    print(f"eptc export (peft {peft.__version__}):")
    pixels = load_file(str(tiny / "input_b3.safetensors"))["pixel_values"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # --- EPT, official layout ---
        model = VisionTransformer(**EXPORT_MODEL)
        randomize_(model, seeded("export_model"))
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_model(out / "model3.safetensors", sd)
        art = tmp / "ept"
        _eptc(eptc, "compile", out / "model3.safetensors", "--heads", 2, "--peft", "ept", "--layers",
              EXPORT_EPT_LAYERS, "--prompt-len", EXPORT_EPT_LEN, "--num-classes", 4,
              "--task", "multilabel", "-o", art)
        init = load_file(str(art / "adapter-init.safetensors"))
        from safetensors import safe_open
        with safe_open(str(art / "adapter-init.safetensors"), "pt") as f:
            meta = f.metadata()
        gen = seeded("export_ept_adapter")
        adapter = {k: torch.randn(v.shape, generator=gen) * (1.0 if k == "ept.prompts" else 0.3)
                   for k, v in init.items()}
        save(out / "ept_adapter.safetensors", adapter, meta)
        exp = tmp / "ept-export"
        _eptc(eptc, "export", art, "--adapter", out / "ept_adapter.safetensors",
              "--format", "ept-official", "-o", exp)
        exported = load_file(str(exp / "adapter.safetensors"))
        with safe_open(str(exp / "adapter.safetensors"), "pt") as f:
            cfg = json.loads(f.metadata()["ept_config"])
        assert sorted(exported) == ["backbone.prompt", "head.fc.bias", "head.fc.weight"], list(exported)
        logits = _official_ept_logits(sd, exported, cfg, pixels)
        # Without the neutral layer's prompt the official model must give the same logits.
        base = VisionTransformer(**dict(EXPORT_MODEL, num_classes=0))
        base.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")})
        base = f64_copy(unfuse_attention_(base), 1e-6)
        eptc_layers = [int(x) for x in EXPORT_EPT_LAYERS.split(",")]
        direct = with_ept(base, adapter["ept.prompts"].double(), eptc_layers, "cat")
        with torch.no_grad():
            f = direct.forward_head(direct.forward_features(pixels.double()), pre_logits=True)
            ref = F.linear(f, adapter["head.weight"].double(), adapter["head.bias"].double())
        print(f"  ept-official: official forward vs eptc's semantics rel {rel_diff(logits, ref):.1e}"
              f"  (prompt_layers {cfg['backbone']['prompt_layers']}, neutral {cfg['neutral_layers']})")
        assert rel_diff(logits, ref) < 1e-12
        tensors = {"logits": logits}
        tensors.update({f"export.{k}": v for k, v in exported.items()})
        save(out / "ept_expected.safetensors", tensors,
             {"ept_config": json.dumps(cfg["backbone"], sort_keys=True)})

        # --- LoRA, Hugging Face peft layout: timm (fused qkv) and HF (query/value) ---
        from transformers import ViTConfig, ViTForImageClassification
        lora = tiny / "adapter_lora.safetensors"
        lora_sd = load_file(str(lora))
        for layout, ckpt in (("timm", "tiny_timm"), ("hf", "tiny_hfcls")):
            art = tmp / f"lora-{layout}"
            _eptc(eptc, "compile", tiny / f"{ckpt}.safetensors", "--heads", 3, "--peft", "lora", "--rank",
                  LORA_RANK, "--lora-alpha", LORA_ALPHA, "--num-classes", NUM_CLASSES,
                  "--task", "multiclass", "-o", art)
            exp = tmp / f"lora-{layout}-export"
            _eptc(eptc, "export", art, "--adapter", lora, "--format", "hf-peft", "-o", exp)
            cfg = json.loads((exp / "adapter_config.json").read_text())
            exported = load_file(str(exp / "adapter_model.safetensors"))
            if layout == "timm":
                model = tiny_model()
                model.load_state_dict(load_file(str(tiny / "tiny_timm.safetensors")))
                set_ln_eps_(model, 1e-6)
            else:
                c = TINY
                config = ViTConfig(hidden_size=c["embed_dim"], num_hidden_layers=c["depth"],
                                   num_attention_heads=c["num_heads"],
                                   intermediate_size=c["embed_dim"] * c["mlp_ratio"],
                                   image_size=c["img_size"], patch_size=c["patch_size"],
                                   num_channels=3, qkv_bias=True, layer_norm_eps=1e-12,
                                   hidden_act="gelu", num_labels=NUM_CLASSES)
                d = tmp / "hfcls"
                d.mkdir(exist_ok=True)
                config.save_pretrained(d)
                save_file(load_file(str(tiny / "tiny_hfcls.safetensors")),
                          str(d / "model.safetensors"), metadata={"format": "pt"})
                model = ViTForImageClassification.from_pretrained(d, attn_implementation="eager")
            model = model.double().eval()
            with torch.no_grad():
                plain = model(pixel_values=pixels.double()).logits if layout == "hf" else model(pixels.double())
            logits = _peft_logits(model, exp, pixels, layout == "hf")
            assert rel_diff(logits, plain) > 0.05, "the loaded adapter did not change the logits"
            # The reference: the same adapter applied by hand, q += s (x A_q^T) B_q^T, v alike.
            ref = lora_reference(ckpt, tiny, lora_sd, pixels)
            print(f"  hf-peft {layout}: target_modules {cfg['target_modules']} r {cfg['r']} "
                  f"alpha {cfg['lora_alpha']}; PeftModel vs eptc's semantics rel {rel_diff(logits, ref):.1e}")
            # transformers' eager attention takes its softmax in float32: 1e-6, not 1e-10.
            assert rel_diff(logits, ref) < (1e-6 if layout == "hf" else 1e-10)
            tensors = {"logits": logits}
            tensors.update({f"export.{k}": v for k, v in exported.items()})
            cfg.pop("base_model_name_or_path", None)
            save(out / f"lora_{layout}_expected.safetensors", tensors,
                 {"adapter_config": json.dumps(cfg, sort_keys=True)})


def lora_reference(ckpt: str, tiny: Path, lora_sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """eptc's LoRA (q += (alpha/r)(x A_q^T) B_q^T, v alike) on the timm model, float64; the
    HF checkpoint holds the same weights (tests/fixtures/README.md)."""
    sd = load_file(str(tiny / "tiny_timm.safetensors"))
    model = tiny_model()
    model.load_state_dict(sd, strict=True)
    model64 = f64_copy(model, EPS["ln12"] if ckpt == "tiny_hfcls" else EPS["ln6"])
    for i, blk in enumerate(model64.blocks):
        blk.attn.qkv = LoRAQKV(blk.attn.qkv, LORA_ALPHA / LORA_RANK)
        blk.attn.qkv.factors = [lora_sd[k].double() for k in lora_keys(i)]
    head = {k: lora_sd[k].double() for k in ("head.weight", "head.bias")}
    with torch.no_grad():
        feats = model64.forward_head(model64.forward_features(pixels.double()), pre_logits=True)
        return F.linear(feats, head["head.weight"], head["head.bias"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the tiny fixtures here (tests/fixtures)")
    ap.add_argument("--vit-b16", type=Path, metavar="DIR",
                    help="write the ViT-B/16 parity set (about 700 MB) here; not committed")
    ap.add_argument("--bench-torch", action="store_true",
                    help="time PyTorch ViT-B/16 + EPT forward (batch 8, 2 threads), JSON on stdout")
    ap.add_argument("--vit-b16-grad", type=Path, metavar="DIR",
                    help="add the ViT-B/16 gradient parity set to DIR (after --vit-b16 DIR)")
    ap.add_argument("--peft-zoo", type=Path, metavar="DIR",
                    help="write only the PEFT-zoo fixtures (adapter_/grad_{full,partial-1,bias,lora,vpt,adapter,mlp,vp}) "
                         "to DIR, reading DIR's tiny_timm and batch files")
    ap.add_argument("--half-grad-errors", type=Path, metavar="DIR",
                    help="write only grad_half_errors.json (PyTorch's own bf16/f16 gradient errors) "
                         "to DIR, reading DIR's tiny fixtures")
    ap.add_argument("--bench-torch-train", action="store_true",
                    help="time a PyTorch ViT-B/16 + EPT training step (batch 4, 2 threads), JSON")
    ap.add_argument("--export", type=Path, metavar="DIR",
                    help="write the `eptc export` fixtures to DIR (tests/fixtures/export), "
                         "reading DIR/..'s tiny files; needs peft, transformers and --eptc")
    ap.add_argument("--eptc", type=Path, default=Path("target/debug/eptc"),
                    help="the eptc binary --export runs (default: target/debug/eptc)")
    args = ap.parse_args()
    if not (args.export or args.out or args.vit_b16 or args.bench_torch or args.vit_b16_grad
            or args.bench_torch_train or args.peft_zoo or args.half_grad_errors):
        ap.error("nothing to do: give --out, --peft-zoo, --half-grad-errors, --vit-b16, --vit-b16-grad, "
                 "--bench-torch and/or --bench-torch-train")

    torch.manual_seed(0)  # nothing should depend on the global RNG; belt and braces
    if args.bench_torch:
        # Keep stdout a single JSON object; progress goes to stderr.
        result = bench_torch()
        print(json.dumps(result))
    if args.bench_torch_train:
        print(json.dumps(bench_torch_train()))
    log = sys.stderr if (args.bench_torch or args.bench_torch_train) else sys.stdout
    _stdout, sys.stdout = sys.stdout, log
    try:
        if args.out:
            make_tiny(args.out)
        if args.peft_zoo:
            make_peft_zoo(args.peft_zoo)
        if args.half_grad_errors:
            make_half_grad_errors(args.half_grad_errors)
        if args.export:
            make_export(args.export, args.eptc)
        if args.vit_b16:
            make_vit_b16(args.vit_b16)
        if args.vit_b16_grad:
            make_vit_b16_grad(args.vit_b16_grad)
    finally:
        sys.stdout = _stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())
