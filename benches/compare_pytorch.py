#!/usr/bin/env python3
"""Side by side: eptc's CPU backend against PyTorch on the same model, adapter, batch and
thread count, in one run. Prints a Markdown table (and JSON with --json).

    python scripts/make_fixtures.py --vit-b16 /tmp/vitb16        # model + adapter, once
    cargo build --release
    python benches/compare_pytorch.py --data /tmp/vitb16 --batch 8 --threads 2

PyTorch runs timm's VisionTransformer with EPT applied as the official code does (the
fixture script's EPTAttention), under torch.inference_mode(), float32. eptc runs
`eptc run --repeat` (the forward pass only; model loading excluded on both sides). Both
take the mean over `--runs` runs after one warm-up. The logits of the two are compared.

With --train both sides time one EPT training step instead: forward, the multi-class
cross-entropy and the gradients of the prompts and the head (no optimizer update, which
is negligible for 244k parameters). PyTorch: autograd with the prompts and head as the
only tensors requiring grad; eptc: `eptc bench --train` (the artifact's train stage). The
loss and gradients of the two are compared on the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_fixtures as fx  # noqa: E402


def torch_model(data: Path, threads: int):
    torch.set_num_threads(threads)
    model = fx.vit_b16()
    model.load_state_dict(load_file(str(data / "vit_b16_timm.safetensors")), strict=True)
    adapter = load_file(str(data / "adapter_cat_deep.safetensors"))
    classes = adapter["head.weight"].shape[0]
    model.head = torch.nn.Linear(model.embed_dim, classes)
    with torch.no_grad():
        model.head.weight.copy_(adapter["head.weight"])
        model.head.bias.copy_(adapter["head.bias"])
    layers = list(range(len(model.blocks)))
    return fx.with_ept(model, adapter["ept.prompts"], layers, "cat").eval(), classes


@torch.inference_mode()
def time_torch(model, x, runs: int):
    out = model(x)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = model(x)
        times.append(time.perf_counter() - t0)
    return out, times


def torch_train(data: Path, threads: int):
    """(step, params): one EPT training step of the timm model, prompts + head trainable."""
    torch.set_num_threads(threads)
    model = fx.vit_b16()
    model.load_state_dict(load_file(str(data / "vit_b16_timm.safetensors")), strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = load_file(str(data / "adapter_cat_deep.safetensors"))
    params = {k: adapter[k].clone().requires_grad_(True) for k in fx.TRAINABLE}
    layers = list(range(len(model.blocks)))
    m = fx.with_ept(model, params["ept.prompts"], layers, "cat").eval()

    def step(x, labels):
        feats = m.forward_head(m.forward_features(x), pre_logits=True)
        logits = torch.nn.functional.linear(feats, params["head.weight"], params["head.bias"])
        loss = fx.task_loss(logits, labels, "multiclass")
        grads = torch.autograd.grad(loss, [params[k] for k in fx.TRAINABLE])
        return loss.detach(), dict(zip(fx.TRAINABLE, grads))

    return step, adapter["head.weight"].shape[0]


def main_train(args) -> int:
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    step, classes = torch_train(args.data, args.threads)
    labels = (torch.arange(args.batch) % classes).float()
    t_loss, t_grads = step(x, labels)  # warm-up
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        step(x, labels)
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({"pixel_values": x.contiguous(), "labels": labels}, str(tmp / "batch.safetensors"))
        art = tmp / "art"
        subprocess.run([str(args.eptc), "compile", str(args.data / "vit_b16_timm.safetensors"),
                        "--peft", "ept", "--prompt-len", "100", "--num-classes", str(classes),
                        "-o", str(art)], check=True, stdout=subprocess.DEVNULL)
        res = subprocess.run([str(args.eptc), "bench", str(art), "--train", "--batch", str(args.batch),
                              "--iters", str(args.runs), "--warmup", "1", "--threads", str(args.threads),
                              "--json"], check=True, capture_output=True, text=True)
        e = json.loads(res.stdout)
        subprocess.run([str(args.eptc), "grad", str(art), "--input", str(tmp / "batch.safetensors"),
                        "--adapter", str(args.data / "adapter_cat_deep.safetensors"),
                        "--output", str(tmp / "grad.safetensors"), "--threads", str(args.threads)],
                       check=True, stdout=subprocess.DEVNULL)
        g = load_file(str(tmp / "grad.safetensors"))

    def rel(a, b):
        return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()

    errs = {"loss": rel(g["loss"], t_loss), **{k: rel(g[f"grad.{k}"], t_grads[k]) for k in fx.TRAINABLE}}
    t_mean = sum(times) / len(times)
    e_mean = sum(e["times_s"]) / len(e["times_s"])
    result = {"what": "training step", "batch": args.batch, "threads": args.threads, "runs": args.runs,
              "torch_s": times, "eptc_s": e["times_s"], "speedup": t_mean / e_mean, "rel_err": errs}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"ViT-B/16 + EPT (cat, deep, L=100) training step (forward, CE loss, gradients of "
              f"prompts + head), batch {args.batch}, {args.threads} threads, mean of {args.runs} "
              f"runs after a warm-up")
        print()
        print("| runtime | mean s | min s | img/s |")
        print("|---|---|---|---|")
        print(f"| PyTorch {torch.__version__} (timm + EPT, eager autograd) | {t_mean:.3f} | "
              f"{min(times):.3f} | {args.batch / t_mean:.2f} |")
        print(f"| eptc cpu (train stage) | {e_mean:.3f} | {min(e['times_s']):.3f} | "
              f"{args.batch / e_mean:.2f} |")
        print()
        print(f"eptc / PyTorch speed-up: {t_mean / e_mean:.2f}x; relative errors (eptc vs PyTorch "
              "f32): " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder from make_fixtures.py --vit-b16")
    ap.add_argument("--eptc", type=Path, default=ROOT / "target/release/eptc")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--train", action="store_true", help="time a training step instead of the forward")
    args = ap.parse_args()
    if args.train:
        return main_train(args)

    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({"pixel_values": x.contiguous()}, str(tmp / "input.safetensors"))
        model, classes = torch_model(args.data, args.threads)
        t_out, t_times = time_torch(model, x, args.runs)
        del model

        art = tmp / "art"
        subprocess.run([str(args.eptc), "compile", str(args.data / "vit_b16_timm.safetensors"),
                        "--peft", "ept", "--prompt-len", "100", "--num-classes", str(classes),
                        "-o", str(art)], check=True, stdout=subprocess.DEVNULL)
        res = subprocess.run([str(args.eptc), "run", str(art), "--input", str(tmp / "input.safetensors"),
                              "--output", str(tmp / "out.safetensors"),
                              "--adapter", str(args.data / "adapter_cat_deep.safetensors"),
                              "--threads", str(args.threads), "--repeat", str(args.runs + 1), "--json"],
                             check=True, capture_output=True, text=True)
        e = json.loads(res.stdout)
        e_out = load_file(str(tmp / "out.safetensors"))["logits"]

    err = (torch.linalg.norm(e_out.double() - t_out.double()) / torch.linalg.norm(t_out.double())).item()
    t_mean = sum(t_times) / len(t_times)
    e_times = e["runs"][1:]
    rows = [
        ("PyTorch " + torch.__version__ + " (timm + EPT, eager)", t_mean, min(t_times)),
        ("eptc cpu", e["seconds"], e["min_seconds"]),
    ]
    result = {
        "model": "ViT-B/16 224px, EPT cat deep L=100, %d classes, f32" % classes,
        "batch": args.batch, "threads": args.threads, "runs": args.runs,
        "cpu": platform.processor() or platform.machine(),
        "torch_s": t_times, "eptc_s": e_times, "logits_rel_err": err,
        "speedup": t_mean / e["seconds"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"ViT-B/16 + EPT (cat, deep, L=100), batch {args.batch}, {args.threads} threads, "
              f"mean of {args.runs} runs after a warm-up")
        print()
        print("| runtime | mean s | min s | img/s |")
        print("|---|---|---|---|")
        for name, mean, mn in rows:
            print(f"| {name} | {mean:.3f} | {mn:.3f} | {args.batch / mean:.2f} |")
        print()
        print(f"eptc / PyTorch speed-up: {t_mean / e['seconds']:.2f}x; logits rel. error {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
