#!/usr/bin/env python3
"""Generate the PyTorch reference fixtures for edge-trainer's optimiser and
learning-rate-schedule parity tests (tests/engine/optim_parity.rs, tests/engine/plateau_parity.rs).

What it makes (all small, meant to be committed):

  tests/fixtures/optim/problem.safetensors
      The shared toy problem: an input batch `x` (8x5, f32), class `targets`
      (8, i64) and the initial parameters `init.weight` (3x5), `init.bias` (3),
      `init.scale` (3) and `init.frozen` (4).
  tests/fixtures/optim/cases.json
      The problem description (how the loss is built) and, per case, the
      optimiser config in edge-trainer's `OptimizerConfig` serde format, the lr
      used at each step and torch's loss at each step.
  tests/fixtures/optim/<case>.safetensors
      Every parameter after step 1 (`step1.<param>`) and after the last step
      (`step20.<param>`).
  tests/fixtures/plateau/cases.json
      ReduceLROnPlateau configs, metric sequences (null stands for NaN) and
      torch's lr, best, num_bad_epochs and cooldown_counter after each step.

The toy problem: logits = x @ weight.T + bias, multiplied element-wise by
`scale` from step `scale_from_step` on (so `scale` gets no gradient, and in
torch no optimiser step, before that); loss = mean cross-entropy(logits,
targets). `frozen` is handed to the optimiser but never used, so it never has
a gradient and must stay untouched. Optimisers run torch's single-tensor path
(foreach=False, fused=False).

How to run (from the crate root; needs torch, numpy and safetensors):

    /path/to/venv/bin/python scripts/make_torch_fixtures.py

The output is deterministic: fixed seeds, torch.set_default_dtype(float32),
one thread. Rerunning with the same torch version rewrites identical files.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OPTIM_DIR = ROOT / "tests" / "fixtures" / "optim"
PLATEAU_DIR = ROOT / "tests" / "fixtures" / "plateau"

STEPS = 20
SCALE_FROM_STEP = 6
PARAM_NAMES = ["weight", "bias", "scale", "frozen"]


def setup():
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


def make_problem():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(8, 5, generator=g)
    targets = torch.randint(0, 3, (8,), generator=g, dtype=torch.int64)
    init = {
        "weight": torch.randn(3, 5, generator=g) * 0.5,
        "bias": torch.randn(3, generator=g) * 0.1,
        "scale": 1.0 + 0.1 * torch.randn(3, generator=g),
        "frozen": torch.randn(4, generator=g),
    }
    return x, targets, init


def loss_fn(params, x, targets, step):
    logits = x @ params["weight"].T + params["bias"]
    if step >= SCALE_FROM_STEP:
        logits = logits * params["scale"]
    return F.cross_entropy(logits, targets)


# name, torch class, kwargs, lr schedule (None: constant lr)
OPTIM_CASES = [
    ("adam_default", torch.optim.Adam, {}, None),
    ("adam_wd_amsgrad", torch.optim.Adam, {"weight_decay": 0.01, "amsgrad": True}, None),
    ("adam_betas_eps", torch.optim.Adam, {"betas": (0.8, 0.99), "eps": 1e-6}, None),
    ("adamw_wd", torch.optim.AdamW, {"weight_decay": 0.05}, None),
    ("adamw_amsgrad", torch.optim.AdamW, {"amsgrad": True}, None),
    ("sgd_plain", torch.optim.SGD, {"lr": 0.1}, None),
    (
        "sgd_momentum_dampening_wd",
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        None,
    ),
    ("sgd_nesterov", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, None),
    # Extra cases that make individual terms matter more.
    # eps large against sqrt(v): where eps enters the denominator shows.
    ("adam_big_eps", torch.optim.Adam, {"lr": 0.01, "eps": 0.1}, None),
    # 1 - beta1 >= 0.5 takes torch's other lerp branch; small beta2 and a
    # large lr let exp_avg_sq fall, so amsgrad's running max matters.
    (
        "adam_low_betas_amsgrad",
        torch.optim.Adam,
        {"lr": 0.05, "betas": (0.3, 0.5), "amsgrad": True},
        None,
    ),
    # The lr changes mid-run (as a scheduler would): decoupled decay uses it.
    ("adamw_lr_drop", torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, (11, 0.003)),
    ("sgd_momentum_lr_drop", torch.optim.SGD, {"lr": 0.1, "momentum": 0.5}, (11, 0.02)),
]


def config_json(kind, defaults):
    """The optimiser's effective settings in OptimizerConfig's serde format."""
    betas = defaults.get("betas", (0.9, 0.999))
    return {
        "kind": kind,
        "lr": float(defaults["lr"]),
        "betas": [float(betas[0]), float(betas[1])],
        "eps": float(defaults.get("eps", 1e-8)),
        "weight_decay": float(defaults.get("weight_decay", 0.0)),
        "amsgrad": bool(defaults.get("amsgrad", False)),
        "momentum": float(defaults.get("momentum", 0.0)),
        "dampening": float(defaults.get("dampening", 0.0)),
        "nesterov": bool(defaults.get("nesterov", False)),
    }


def run_optim_case(name, cls, kwargs, lr_change, x, targets, init):
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = cls([params[k] for k in PARAM_NAMES], foreach=False, **kwargs)
    if cls is torch.optim.SGD:
        kind = "sgd"
    elif cls is torch.optim.AdamW:
        kind = "adamw"
    else:
        kind = "adam"
    cfg = config_json(kind, opt.defaults)
    base_lr = cfg["lr"]
    lrs, losses, snapshots = [], [], {}
    for step in range(1, STEPS + 1):
        lr = base_lr
        if lr_change is not None and step >= lr_change[0]:
            lr = lr_change[1]
        for group in opt.param_groups:
            group["lr"] = lr
        lrs.append(lr)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(params, x, targets, step)
        loss.backward()
        if params["frozen"].grad is not None:
            raise AssertionError("frozen must not get a gradient")
        if step < SCALE_FROM_STEP and params["scale"].grad is not None:
            raise AssertionError("scale must not get a gradient yet")
        opt.step()
        losses.append(float(loss.item()))
        if step in (1, STEPS):
            for k in PARAM_NAMES:
                snapshots[f"step{step}.{k}"] = params[k].detach().clone().contiguous()
    if not torch.equal(params["frozen"].detach(), init["frozen"]):
        raise AssertionError("frozen changed")
    save_file(snapshots, str(OPTIM_DIR / f"{name}.safetensors"))
    return {"name": name, "config": cfg, "lrs": lrs, "losses": losses}


def make_optim_fixtures():
    OPTIM_DIR.mkdir(parents=True, exist_ok=True)
    x, targets, init = make_problem()
    tensors = {"x": x, "targets": targets}
    tensors.update({f"init.{k}": v for k, v in init.items()})
    save_file(tensors, str(OPTIM_DIR / "problem.safetensors"))
    cases = [run_optim_case(n, c, kw, ch, x, targets, init) for n, c, kw, ch in OPTIM_CASES]
    doc = {
        "generator": f"scripts/make_torch_fixtures.py, torch {torch.__version__}",
        "problem": {
            "steps": STEPS,
            "scale_from_step": SCALE_FROM_STEP,
            "params": PARAM_NAMES,
            "loss": "mean cross_entropy(x @ weight.T + bias [* scale from scale_from_step on], targets)",
        },
        "cases": cases,
    }
    write_json(OPTIM_DIR / "cases.json", doc)


# --------------------------------------------------------------------------
# ReduceLROnPlateau


def metric_sequence(seed, n, start, trend, noise, plateau_at, plateau_level=None):
    """A noisy decaying curve that flattens out after `plateau_at`; rounded to
    6 decimals so the JSON numbers parse to the very same f64 everywhere."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = min(i, plateau_at)
        v = start * math.exp(-trend * t) + noise * rng.standard_normal()
        if plateau_level is not None and i >= plateau_at:
            v = plateau_level + noise * rng.standard_normal()
        out.append(round(float(v), 6))
    return out


def plateau_cases():
    down = metric_sequence(1, 40, 1.0, 0.12, 0.01, 18)
    up = [round(1.0 - v, 6) for v in metric_sequence(2, 40, 0.9, 0.15, 0.01, 15)]
    noisy = metric_sequence(3, 40, 2.0, 0.05, 0.05, 25)
    flat = metric_sequence(4, 40, 0.5, 0.2, 0.002, 8, plateau_level=0.3)
    negative = [round(-v, 6) for v in metric_sequence(5, 40, 3.0, 0.1, 0.03, 20)]
    with_nan = list(metric_sequence(6, 40, 1.0, 0.1, 0.01, 20))
    for i in (0, 1, 9, 10, 11, 12, 25, 39):
        with_nan[i] = float("nan")
    # Exactly representable values whose improvements often equal the
    # threshold exactly, so `<` versus `<=` shows.
    rng = np.random.default_rng(7)
    quarters, level = [], 1.0
    for _ in range(40):
        level += 0.25 * int(rng.choice([-1, 0, 1, 1, 2]))
        quarters.append(level)
    halvings, exponent = [], 0
    for _ in range(40):
        exponent += int(rng.choice([-1, 0, 1, 1]))
        halvings.append(8.0 * 2.0 ** (-exponent))
    return [
        ("torch_defaults", {}, 0.1, down),
        ("min_rel", {"mode": "min", "factor": 0.5, "patience": 3}, 0.1, down),
        ("min_abs", {"mode": "min", "threshold_mode": "abs", "threshold": 0.05, "patience": 2, "factor": 0.3}, 0.05, noisy),
        ("max_abs", {"mode": "max", "threshold_mode": "abs", "threshold": 0.01, "patience": 2, "factor": 0.5}, 0.01, up),
        ("max_rel", {"mode": "max", "threshold_mode": "rel", "threshold": 0.001, "patience": 1, "factor": 0.7}, 0.02, up),
        ("max_rel_negative_metric", {"mode": "max", "threshold": 0.01, "patience": 2, "factor": 0.5}, 0.1, negative),
        ("cooldown_2", {"factor": 0.5, "patience": 1, "cooldown": 2}, 0.1, flat),
        ("min_lr_clamp", {"factor": 0.1, "patience": 1, "min_lr": 3e-4}, 0.1, flat),
        ("patience_0", {"factor": 0.8, "patience": 0}, 0.1, noisy),
        ("threshold_large", {"factor": 0.5, "patience": 2, "threshold": 0.3}, 0.1, down),
        ("eps_stops_reduction", {"factor": 0.5, "patience": 0, "eps": 1e-8}, 1e-7, flat),
        ("nan_metrics", {"factor": 0.5, "patience": 2, "cooldown": 1}, 0.1, with_nan),
        ("ties_max_abs", {"mode": "max", "threshold_mode": "abs", "threshold": 0.25, "patience": 1, "factor": 0.5}, 0.1, quarters),
        ("ties_min_rel", {"threshold": 0.5, "patience": 1, "factor": 0.5}, 0.1, halvings),
    ]


def plateau_config_json(kw):
    cfg = {
        "mode": "min",
        "factor": 0.1,
        "patience": 10,
        "threshold": 1e-4,
        "threshold_mode": "rel",
        "cooldown": 0,
        "min_lr": 0.0,
        "eps": 1e-8,
    }
    cfg.update(kw)
    for k in ("factor", "threshold", "min_lr", "eps"):
        cfg[k] = float(cfg[k])
    return cfg


def float_json(v):
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def run_plateau_case(name, kw, initial_lr, metrics):
    cfg = plateau_config_json(kw)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=initial_lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **cfg)
    lrs, best, bad, cool = [], [], [], []
    for m in metrics:
        sched.step(m)
        lrs.append(float(opt.param_groups[0]["lr"]))
        best.append(float_json(float(sched.best)))
        bad.append(int(sched.num_bad_epochs))
        cool.append(int(sched.cooldown_counter))
    return {
        "name": name,
        "config": cfg,
        "initial_lr": initial_lr,
        "metrics": [None if math.isnan(m) else m for m in metrics],
        "lrs": lrs,
        "best": best,
        "num_bad_epochs": bad,
        "cooldown_counter": cool,
    }


def make_plateau_fixtures():
    PLATEAU_DIR.mkdir(parents=True, exist_ok=True)
    cases = [run_plateau_case(*c) for c in plateau_cases()]
    doc = {
        "generator": f"scripts/make_torch_fixtures.py, torch {torch.__version__}",
        "note": "metrics: null stands for NaN; best: a number or \"inf\" / \"-inf\" / \"nan\"",
        "cases": cases,
    }
    write_json(PLATEAU_DIR / "cases.json", doc)


def write_json(path, doc):
    text = json.dumps(doc, indent=1, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def main():
    setup()
    make_optim_fixtures()
    make_plateau_fixtures()
    for d in (OPTIM_DIR, PLATEAU_DIR):
        for f in sorted(d.iterdir()):
            print(f"{f.relative_to(ROOT)}  {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
