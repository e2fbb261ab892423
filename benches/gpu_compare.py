#!/usr/bin/env python3
"""eptc's GPU backends against PyTorch on one NVIDIA GPU, in one run (scripts/gpu-check.sh
calls this; it needs torch + timm + safetensors and a release `eptc`, no Rust toolchain).

1. Makes the ViT-B/16 test model (random, non-trivial weights; scripts/make_fixtures.py's
   `vit_b16()`) and an EPT adapter (cat, deep, L = 100, 10 classes), compiles it with
   `eptc compile --target cuda` (f32 and bf16; `cuda:bf16:all` in --targets: with every
   CUDA switch that is still off by default, at compile and run time) and, if asked,
   `--target wgpu`.
2. Parity on 2 images: logits and features of each eptc artifact against PyTorch in
   float64 on the GPU (timm + EPT exactly as the official code applies it), and the
   gradients of a training step (multi-class CE) against float64 autograd.
3. Timing, side by side on the same weights: inference at batch 1, 64, 256 and a
   training step (forward, loss, gradients of prompts + head) at batch 4 and 64, PyTorch
   eager and torch.compile in bf16 (weights and activations bf16, as `model.bfloat16()`),
   and eptc's bf16 artifact (`eptc bench`: device time by CUDA events around the step,
   and the wall time of `run` including the host<->device copies). PyTorch: median of
   CUDA-event timings after warm-up, peak memory from torch.cuda.max_memory_allocated.

Prints one Markdown table per part and writes them (and JSON) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_fixtures as fx  # noqa: E402

PROMPT_LEN = 100
CLASSES = 10


def log(*a):
    print(*a, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


# The environment of a target's third field (`cuda:bf16:all`): every CUDA switch that is
# still off by default, at compile (the flash-style backward, the recomputed MLP
# pre-activation) and at run time (fused chains, views, cuBLASLt, pinned staging).
VARIANTS = {
    "all": {"EPTC_CUDA_ATTENTION": "fused", "EPTC_CUDA_RECOMPUTE": "1", "EPTC_CUDA_FUSE": "1",
            "EPTC_CUDA_VIEWS": "1", "EPTC_CUDA_LT": "1", "EPTC_CUDA_PINNED": "1"},
}
# An artifact's tag -> the extra environment of every eptc call on it.
ENV_OF: dict = {}


def eptc(args, *cmd, capture=True, timeout=600, env=None):
    t0 = time.time()
    r = subprocess.run([str(args.eptc), *map(str, cmd)], capture_output=capture, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"eptc {' '.join(map(str, cmd))} failed ({r.returncode}):\n"
                           f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    log(f"  eptc {cmd[0]} ... {time.time() - t0:.1f} s")
    return r.stdout


def setup(work: Path):
    model = fx.vit_b16()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(work / "vit_b16_timm.safetensors"))
    layers = list(range(len(model.blocks)))
    tensors, meta = fx.make_adapter("gpu_compare", "cat", layers, 197, PROMPT_LEN, CLASSES,
                                    model.embed_dim, 0.5)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "adapter.safetensors"),
              meta)
    return model, tensors, layers


def ept_model(model, tensors, layers, dtype, device):
    m = fx.with_ept(model, tensors["ept.prompts"], layers, "cat").to(device=device, dtype=dtype)
    return m.eval()


def forward(m, x, head):
    feats = m.forward_head(m.forward_features(x), pre_logits=True)
    return F.linear(feats, head[0], head[1]), feats


def parity(args, work, model, tensors, layers, arts, results):
    dev = args.device
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    labels = torch.tensor([3.0, 7.0])
    save_file({"pixel_values": x, "labels": labels}, str(work / "batch2.safetensors"))
    m64 = fx.set_ln_eps_(ept_model(model, tensors, layers, torch.float64, dev), 1e-6)
    prompts = tensors["ept.prompts"].to(dev, torch.float64).requires_grad_(True)
    hw = tensors["head.weight"].to(dev, torch.float64).requires_grad_(True)
    hb = tensors["head.bias"].to(dev, torch.float64).requires_grad_(True)
    # The trainable prompts replace the buffers, so autograd reaches them.
    for j, layer in enumerate(layers):
        m64.blocks[layer].attn.prompt = prompts[j]
    logits64, feats64 = forward(m64, x.to(dev, torch.float64), (hw, hb))
    loss64 = fx.task_loss(logits64, labels.to(dev), "multiclass")
    g64 = torch.autograd.grad(loss64, [prompts, hw, hb])
    want = {"logits": logits64.detach(), "features": feats64.detach(), "loss": loss64.detach(),
            "grad.ept.prompts": g64[0], "grad.head.weight": g64[1], "grad.head.bias": g64[2]}
    # PyTorch's own f32 and bf16 on the GPU, for scale.
    rows = []
    with torch.no_grad():
        for name, dt in [(f"PyTorch f32 ({dev})", torch.float32), (f"PyTorch bf16 ({dev})", torch.bfloat16),
                         (f"PyTorch f16 ({dev})", torch.float16)]:
            m = ept_model(model, tensors, layers, dt, dev)
            lg, ft = forward(m, x.to(dev, dt), (tensors["head.weight"].to(dev, dt),
                                                tensors["head.bias"].to(dev, dt)))
            rows.append({"what": name, "logits": rel(lg, want["logits"]),
                         "features": rel(ft, want["features"])})
    for tag, art in arts.items():
        row = {"what": f"eptc {tag}"}
        try:
            out = work / f"run_{tag.replace(' ', '_')}.safetensors"
            eptc(args, "run", art, "--input", work / "batch2.safetensors", "--adapter",
                 work / "adapter.safetensors", "--output", out, env=ENV_OF.get(tag))
            o = load_file(str(out))
            row["logits"] = rel(o["logits"], want["logits"])
            row["features"] = rel(o["features"], want["features"])
            gout = work / f"grad_{tag.replace(' ', '_')}.safetensors"
            eptc(args, "grad", art, "--input", work / "batch2.safetensors", "--adapter",
                 work / "adapter.safetensors", "--output", gout, env=ENV_OF.get(tag))
            g = load_file(str(gout))
            for k in ["loss", "grad.ept.prompts", "grad.head.weight", "grad.head.bias"]:
                row[k] = rel(g[k], want[k])
        except Exception as e:  # noqa: BLE001
            row["error"] = str(e)[-2000:]
            log(f"  parity {tag}: {row['error']}")
        rows.append(row)
    results["parity"] = rows
    cols = ["logits", "features", "loss", "grad.ept.prompts", "grad.head.weight", "grad.head.bias"]
    lines = [f"| against PyTorch float64 ({args.device}), 2 images | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.1e}" if c in r else ("error" if "error" in r else "") for c in cols]
        lines.append(f"| {r['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cuda_time(fn, warmup: int, iters: int):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return times[len(times) // 2]


def torch_bench(model, tensors, layers, batch, train, compiled, iters):
    dev, dt = "cuda", torch.bfloat16
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    m = ept_model(model, tensors, layers, dt, dev)
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, 224, 224, device=dev, dtype=dt)
    hw = tensors["head.weight"].to(dev, dt)
    hb = tensors["head.bias"].to(dev, dt)
    if train:
        prompts = tensors["ept.prompts"].to(dev, dt).requires_grad_(True)
        hw.requires_grad_(True)
        hb.requires_grad_(True)
        for j, layer in enumerate(layers):
            m.blocks[layer].attn.prompt = prompts[j]
        labels = (torch.arange(batch, device=dev) % CLASSES).float()

        def step():
            lg, _ = forward(m, x, (hw, hb))
            loss = fx.task_loss(lg.float(), labels, "multiclass")
            return torch.autograd.grad(loss, [prompts, hw, hb])
        fn = torch.compile(step) if compiled else step
    else:
        def fwd():
            return forward(m, x, (hw, hb))
        fn = torch.compile(fwd) if compiled else fwd
    t0 = time.time()
    if train:
        med = cuda_time(fn, 3, iters)
    else:
        with torch.inference_mode():
            med = cuda_time(fn, 3, iters)
    peak = torch.cuda.max_memory_allocated()
    log(f"  torch {'compile' if compiled else 'eager'} {'train' if train else 'infer'} "
        f"b{batch}: {med * 1e3:.2f} ms ({time.time() - t0:.0f} s incl. warm-up)")
    return {"median_s": med, "peak_bytes": peak}


def eptc_bench(args, art, batch, train, iters, env=None):
    cmd = ["bench", art, "--batch", batch, "--iters", iters, "--warmup", 3, "--json"]
    if train:
        cmd.append("--train")
    r = json.loads(eptc(args, *cmd, env=env))
    return {"median_s": r.get("device_median_s") or r["median_s"], "wall_s": r["median_s"],
            "device": r.get("device_median_s") is not None,
            "peak_bytes": r.get("device_peak_bytes")}


def render_timing(args, arts, rows):
    keys = ["eager", "compile"] + [t for t in arts if "bf16" in t or args.all_dtypes]
    lines = ["| step | batch | " + " | ".join(
        f"{k} ms (img/s)" for k in keys) + " | eptc / compile | PyTorch eager peak MiB | eptc peak MiB |",
             "|---|---|" + "---|" * (len(keys) + 3)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, {})
            if "median_s" in v:
                cell = f"{v['median_s'] * 1e3:.2f} ({r['batch'] / v['median_s']:.0f})"
                if "wall_s" in v:
                    cell += f"; wall {v['wall_s'] * 1e3:.1f}"
                cells.append(cell)
            else:
                cells.append("error" if "error" in v else "-")
        # One figure per eptc artifact timed (e.g. "cuda bf16 / cuda bf16 all").
        eks = [k for k in keys if k.startswith("cuda") and "median_s" in r.get(k, {})]
        comp = r.get("compile", {}).get("median_s")
        ratio = " / ".join(f"{comp / r[k]['median_s']:.2f}x" for k in eks) if eks and comp else "-"
        peak = r.get("eager", {}).get("peak_bytes")
        mib = lambda b: f"{b / 2**20:.0f}" if b else "-"  # noqa: E731
        epeak = " / ".join(mib(r[k].get("peak_bytes")) for k in eks) if eks else "-"
        lines.append(f"| {r['what']} | {r['batch']} | " + " | ".join(cells) +
                     f" | {ratio} | {mib(peak)} | {epeak} |")
    return "\n".join(lines)


def timing(args, work, model, tensors, layers, arts, results, partial=None):
    cases = [("inference", 1, False), ("inference", 64, False), ("inference", 256, False),
             ("training step", 4, True), ("training step", 64, True)]
    rows = []
    for what, batch, train in cases:
        row = {"what": what, "batch": batch}
        iters = 20 if batch <= 4 else 10
        for key, compiled in [("eager", False), ("compile", True)]:
            if compiled and (args.no_compile or f"{what}:{batch}" not in args.compile_cases.split(",")):
                continue
            try:
                row[key] = torch_bench(model, tensors, layers, batch, train, compiled, iters)
            except Exception as e:  # noqa: BLE001
                row[key] = {"error": str(e)[-500:]}
                log(f"  torch {key} {what} b{batch}: {e}")
        for tag, art in arts.items():
            if "bf16" not in tag and not args.all_dtypes:
                continue
            try:
                row[tag] = eptc_bench(args, art, batch, train, iters, ENV_OF.get(tag))
            except Exception as e:  # noqa: BLE001
                row[tag] = {"error": str(e)[-1500:]}
                log(f"  {tag} {what} b{batch}: {row[tag]['error']}")
        rows.append(row)
        if partial:
            partial(render_timing(args, arts, rows))
    results["timing"] = rows
    return render_timing(args, arts, rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eptc", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder")
    ap.add_argument("--out", type=Path, required=True, help="results folder")
    ap.add_argument("--targets", default="cuda:f32,cuda:bf16",
                    help="artifacts to build, TARGET:DTYPE[:VARIANT] comma-separated (wgpu:f32 "
                         "too; VARIANT all: every CUDA switch on, at compile and run time)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--compile-cases", default="inference:256,training step:64",
                    help="the cases timed with torch.compile too (each costs a compilation)")
    ap.add_argument("--all-dtypes", action="store_true", help="time f32 artifacts as well")
    ap.add_argument("--device", default="cuda", help="PyTorch's device for the parity part "
                    "(cpu: a dry run of the script with --targets cpu:f32 --no-timing)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
    results = {"device": name, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    log(f"{results['device']}, torch {results['torch']}")
    t0 = time.time()
    model, tensors, layers = setup(args.work)
    log(f"model + adapter written ({time.time() - t0:.0f} s)")
    arts = {}
    for spec in args.targets.split(","):
        target, dtype, *variant = spec.split(":")
        tag = " ".join([target, dtype, *variant])
        art = args.work / "_".join(["art", target, dtype, *variant])
        if variant:
            if variant[0] not in VARIANTS:
                ap.error(f"--targets {spec}: unknown variant {variant[0]!r} (known: {', '.join(VARIANTS)})")
            ENV_OF[tag] = VARIANTS[variant[0]]
        try:
            eptc(args, "compile", args.work / "vit_b16_timm.safetensors", "--peft", "ept",
                 "--prompt-len", PROMPT_LEN, "--num-classes", CLASSES, "--target", target,
                 "--dtype", dtype, "-o", art, env=ENV_OF.get(tag))
            arts[tag] = art
        except Exception as e:  # noqa: BLE001
            log(f"compile {tag}: {e}")
            results.setdefault("compile_errors", {})[tag] = str(e)[-2000:]
    report = [f"## {results['device']}, {results['date']} (PyTorch {results['torch']})", ""]
    try:
        report += [parity(args, args.work, model, tensors, layers, arts, results), ""]
    except Exception:  # noqa: BLE001
        report += ["parity failed:", "```", traceback.format_exc()[-2000:], "```"]
    log("\n".join(report))

    def partial(table):
        # Written after every row: a run cut short still leaves what it measured.
        (args.out / "gpu_compare.md").write_text("\n".join(report + [table, ""]) + "\n")
        (args.out / "gpu_compare.json").write_text(json.dumps(results, indent=1, default=str))
    partial("")
    if not args.no_timing:
        try:
            report += [timing(args, args.work, model, tensors, layers, arts, results, partial), ""]
        except Exception:  # noqa: BLE001
            report += ["timing failed:", "```", traceback.format_exc()[-2000:], "```"]
    text = "\n".join(report)
    (args.out / "gpu_compare.md").write_text(text + "\n")
    (args.out / "gpu_compare.json").write_text(json.dumps(results, indent=1, default=str))
    log(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
