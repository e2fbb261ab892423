#!/usr/bin/env python3
"""Reference trajectories of PyTorch's optimizers and cosine schedule for eptc's
`eptc-runtime` optimizers (tests/fixtures/optim.json).

    python scripts/make_optim_fixtures.py --out tests/fixtures/optim.json

Requirements: torch. Deterministic (fixed seed); float64 so the Rust side can be held
to 1e-6 relative in f32.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def trajectory(make_opt, steps: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(7, generator=g, dtype=torch.float64)
    grads = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(steps)]
    p = torch.nn.Parameter(p0.clone())
    opt = make_opt([p])
    params = []
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
        params.append(p.detach().clone().tolist())
    return {"p0": p0.tolist(), "grads": [x.tolist() for x in grads], "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cases = []
    sgd = dict(lr=6e-4 * 100, momentum=0.9, weight_decay=1e-4)
    cases.append({"name": "sgd", **sgd,
                  **trajectory(lambda ps: torch.optim.SGD(ps, **sgd), 6)})
    adamw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    cases.append({"name": "adamw", "lr": adamw["lr"], "beta1": 0.9, "beta2": 0.999,
                  "eps": adamw["eps"], "weight_decay": adamw["weight_decay"],
                  **trajectory(lambda ps: torch.optim.AdamW(ps, **adamw), 6, seed=1)})
    # Cosine annealing to 0 over `total` steps (torch's closed form, eta_min = 0).
    total, base = 20, 6e-4
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    closed = [base * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total + 1)]
    assert max(abs(a - b) for a, b in zip(lrs, closed)) < 1e-12
    schedule = {"base": base, "total": total, "lrs": lrs}
    args.out.write_text(json.dumps({"optimizers": cases, "cosine": schedule}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
