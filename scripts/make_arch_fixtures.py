#!/usr/bin/env python3
"""PyTorch reference fixtures for edge-trainer's architecture parity test
(tests/engine/arch_parity.rs), and the check of the reverse direction.

Make the fixtures (from the crate root; needs torch, numpy and safetensors):

    /path/to/venv/bin/python scripts/make_arch_fixtures.py

writes, all small and meant to be committed:

  tests/fixtures/arch/cases.json
      Per case: the edge-trainer `ModelSpec` (the JSON a checkpoint stores as
      its `model` metadata), the parameters whose gradients are checked, and the
      buffers checked after a training-mode forward pass.
  tests/fixtures/arch/<case>.safetensors
      `state.<name>`: the twin's full `state_dict` as PyTorch saves it (batch-norm
      `num_batches_tracked` stays int64, running statistics are made non-trivial);
      `x` (a fixed input batch) and `y` (labels);
      `logits_eval`: logits in eval mode;
      `logits_train`, `loss_train`, `grad.<name>`: logits, mean cross-entropy and
      its gradients in training mode with dropout switched off (batch-norm uses
      batch statistics);
      `after.<buffer>`: batch-norm buffers after that training-mode pass.

The twins are the classes in scripts/pytorch_twins.py.

Check the reverse direction (a checkpoint written by edge-trainer loads into the
twin with `load_state_dict(strict=True)` and gives the same logits):

    cargo test --test engine arch_parity           # writes target/tmp/arch-export/*
    /path/to/venv/bin/python scripts/make_arch_fixtures.py --verify target/tmp/arch-export

The Rust test trains each model one SGD step, saves it as an edge-trainer
checkpoint (`<case>.safetensors`, with metadata) plus its own eval logits on the
fixture batch (`<case>.logits.safetensors`); `--verify` rebuilds every twin from
the checkpoint's `model` metadata, loads the weights strictly and compares the
logits (max abs diff must be below 1e-4). The Rust test checks the same
contract without torch (names and shapes equal to PyTorch's `state_dict`).

The output is deterministic (fixed seeds, float32, one thread).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pytorch_twins  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "arch"


def block(out_channels, kernel_size, stride, padding, batch_norm, pool):
    return dict(out_channels=out_channels, kernel_size=kernel_size, stride=stride, padding=padding,
                batch_norm=batch_norm, pool=pool)


CASES = {
    # Images [3, 9, 11]: odd, non-square sizes; batch-norm; a stride-2 block whose two
    # spatial sizes leave different remainders.
    "cnn": dict(
        spec=dict(arch="cnn", in_channels=3, input_size=[9, 11],
                  blocks=[block(4, 3, 1, 1, True, 2), block(5, 3, 2, 1, False, 1), block(6, 2, 1, 0, True, 1)],
                  num_classes=3, activation="relu", dropout=0.3),
        batch=4, sample_shape=[3, 9, 11]),
    # Grayscale [8, 8] without a channel dimension, 5x5 kernel.
    "cnn_hw": dict(
        spec=dict(arch="cnn", in_channels=1, input_size=[8, 8],
                  blocks=[block(3, 5, 1, 2, True, 2)], num_classes=2, activation="leaky_relu", dropout=0.0),
        batch=3, sample_shape=[8, 8]),
    # LeNet-like: the flattened last feature map through a hidden layer.
    "cnn_fc": dict(
        spec=dict(arch="cnn", in_channels=1, input_size=[10, 10],
                  blocks=[block(3, 3, 1, 0, False, 2), block(4, 3, 1, 1, True, 2)],
                  num_classes=3, activation="relu", dropout=0.1, flatten=True, hidden=[6]),
        batch=4, sample_shape=[1, 10, 10]),
    # Signals [2, 17]: pooled batch-norm block, then a stride-2 block.
    "cnn1d": dict(
        spec=dict(arch="cnn1d", in_channels=2, input_size=[17],
                  blocks=[block(4, 5, 1, 2, True, 2), block(6, 3, 2, 0, True, 1)],
                  num_classes=4, activation="gelu", dropout=0.2),
        batch=5, sample_shape=[2, 17]),
    # The seed's TextCNN, small: vocabulary of 23 with <UNK> = 21, <PAD> = 22.
    "textcnn": dict(
        spec=dict(arch="textcnn", vocab_size=23, pad_index=22, embed_dim=8, filter_sizes=[2, 3, 4],
                  num_filters=5, seq_len=7, num_classes=3, dropout=0.5),
        batch=4, sample_shape=[7]),
    "mlp": dict(
        spec=dict(arch="mlp", input_dim=12, hidden=[7, 5], num_classes=3, activation="tanh", dropout=0.2),
        batch=4, sample_shape=[12]),
    # torchvision's resnet18 at an eighth of its width (same names), non-square RGB images.
    "resnet18": dict(
        spec=dict(arch="resnet18", in_channels=3, input_size=[48, 40], base_width=8, num_classes=5, dropout=0.0),
        batch=3, sample_shape=[3, 48, 40]),
    # resnet34 at a sixteenth of its width on grayscale [H, W] samples of odd size, with dropout.
    "resnet34": dict(
        spec=dict(arch="resnet34", in_channels=1, input_size=[37, 45], base_width=4, num_classes=3, dropout=0.3),
        batch=4, sample_shape=[37, 45]),
    # torchvision's mobilenet_v2 with width_mult 0.25 (its _make_divisible rounding).
    "mobilenet_v2": dict(
        spec=dict(arch="mobilenet_v2", in_channels=3, input_size=[64, 64], width_mult=0.25, num_classes=4,
                  dropout=0.2),
        batch=8, sample_shape=[3, 64, 64]),
    # torchvision's mobilenet_v3_small at a quarter width: squeeze-excitation, hard swish,
    # 5x5 depthwise convolutions, batch-norm with eps 1e-3 and momentum 0.01.
    "mobilenet_v3_small": dict(
        spec=dict(arch="mobilenet_v3_small", in_channels=3, input_size=[64, 64], width_mult=0.25,
                  num_classes=4, dropout=0.2),
        batch=8, sample_shape=[3, 64, 64],
        # torchvision's N(0, 0.01) in both classifier layers makes logits and gradients ~1e-3:
        # too small for the test's tolerances to mean anything. N(0, 1/fan_in) instead.
        linear_std="fan_in"),
}


def setup():
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def make_input(name, case, g):
    spec = case["spec"]
    if spec["arch"] == "textcnn":
        n, L = case["batch"], spec["seq_len"]
        x = torch.randint(0, spec["vocab_size"] - 2, (n, L), generator=g)
        lengths = [7, 5, 3, 6][:n]
        for i, l in enumerate(lengths):
            x[i, l:] = spec["pad_index"]
        x[1, 0] = spec["vocab_size"] - 2  # an unknown token
        return x.to(torch.float32)
    return torch.randn([case["batch"]] + case["sample_shape"], generator=g)


def randomise_buffers(model, g):
    """Non-trivial batch-norm affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(7)


def check_conditioning(name, spec, out, x, y, grads):
    """The float32 gradients must be within 1e-4 of float64 ones: a batch whose
    batch-norm statistics are degenerate (a channel almost constant over too few
    values) amplifies rounding beyond the parity test's 1e-3, whoever computes it."""
    model = pytorch_twins.from_spec(spec).double()
    model.load_state_dict({k[len("state."):]: v for k, v in out.items() if k.startswith("state.")})
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    F.cross_entropy(model(x.double()), y).backward()
    params = dict(model.named_parameters())
    worst = max((out[f"grad.{k}"].double() - params[k].grad).abs().max().item() for k in grads)
    if not worst < 1e-4:
        sys.exit(f"{name}: float32 gradients are {worst:.1e} from float64 ones: an ill-conditioned batch "
                 "(use more samples or larger inputs)")


def make_case(name, case, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = pytorch_twins.from_spec(case["spec"])
    randomise_buffers(model, g)
    if case.get("linear_std") == "fan_in":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
    x = make_input(name, case, g)
    y = torch.randint(0, case["spec"]["num_classes"], (case["batch"],), generator=g)
    out = {f"state.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out["x"], out["y"] = x.contiguous(), y.to(torch.int64)

    model.eval()
    with torch.no_grad():
        out["logits_eval"] = model(x).contiguous()

    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    out["logits_train"] = logits.detach().contiguous()
    out["loss_train"] = loss.detach().reshape(1)
    grads = []
    for k, p in model.named_parameters():
        if p.grad is not None:
            out[f"grad.{k}"] = p.grad.detach().clone().contiguous()
            grads.append(k)
    check_conditioning(name, case["spec"], out, x, y, grads)
    buffers = []
    for k, b in model.named_buffers():
        if k.endswith("running_mean") or k.endswith("running_var") or k.endswith("num_batches_tracked"):
            out[f"after.{k}"] = b.detach().clone().contiguous()
            buffers.append(k)
    save_file(out, str(OUT / f"{name}.safetensors"))
    return dict(spec=case["spec"], grads=grads, buffers=buffers)


def check_twins_against_torchvision():
    """The backbone twins at torchvision's widths have torchvision's state_dict and
    forward (skipped where torchvision is not installed)."""
    try:
        import torchvision
    except ImportError:
        print("torchvision not installed: twins not cross-checked")
        return
    for name, tv, twin in [
        ("resnet18", torchvision.models.resnet18(), pytorch_twins.ResNet([2, 2, 2, 2])),
        ("resnet34", torchvision.models.resnet34(), pytorch_twins.ResNet([3, 4, 6, 3])),
        ("mobilenet_v2", torchvision.models.mobilenet_v2(), pytorch_twins.MobileNetV2()),
        ("mobilenet_v2 x0.35", torchvision.models.mobilenet_v2(width_mult=0.35),
         pytorch_twins.MobileNetV2(width_mult=0.35)),
        ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small(), pytorch_twins.MobileNetV3Small()),
        ("mobilenet_v3_small x0.5", torchvision.models.mobilenet_v3_small(width_mult=0.5),
         pytorch_twins.MobileNetV3Small(width_mult=0.5)),
    ]:
        want = {k: tuple(v.shape) for k, v in tv.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
        assert want == got, f"{name}: the twin's state_dict differs from torchvision's"
        twin.load_state_dict(tv.state_dict(), strict=True)
        tv.eval(), twin.eval()
        x = torch.randn(2, 3, 40, 48)
        with torch.no_grad():
            diff = (tv(x) - twin(x)).abs().max().item()
        assert diff == 0.0, f"{name}: the twin's logits differ from torchvision's by {diff}"
    print(f"twins match torchvision {torchvision.__version__} (state_dict and logits)")


def make(only=None):
    setup()
    check_twins_against_torchvision()
    OUT.mkdir(parents=True, exist_ok=True)
    cases = {}
    if only:  # the other cases stay as they are
        cases = json.loads((OUT / "cases.json").read_text())["cases"]
    for i, (name, case) in enumerate(CASES.items()):
        if not only or name in only:
            cases[name] = make_case(name, case, 1000 + i)
    (OUT / "cases.json").write_text(json.dumps(
        {"torch": torch.__version__, "cases": cases}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(cases)} cases to {OUT.relative_to(ROOT)}")


def verify(export_dir):
    setup()
    export_dir = Path(export_dir)
    worst = 0.0
    names = sorted(p.name[: -len(".safetensors")] for p in export_dir.glob("*.safetensors")
                   if not p.name.endswith(".logits.safetensors"))
    if not names:
        sys.exit(f"no exported checkpoints in {export_dir}; run `cargo test --test engine arch_parity` first")
    for name in names:
        ck = export_dir / f"{name}.safetensors"
        with safe_open(str(ck), "pt") as f:
            meta = f.metadata()
        model = pytorch_twins.from_spec(json.loads(meta["model"]))
        model.load_state_dict(load_file(str(ck)), strict=True)
        model.eval()
        sidecar = load_file(str(export_dir / f"{name}.logits.safetensors"))
        with torch.no_grad():
            logits = model(sidecar["x"])
        diff = (logits - sidecar["logits"]).abs().max().item()
        worst = max(worst, diff)
        print(f"{name}: strict load ok, max |torch - edge-trainer| logits = {diff:.2e}")
        if not diff < 1e-4:
            sys.exit(f"{name}: logits differ by {diff}")
    print(f"all {len(names)} checkpoints load into their PyTorch twins; worst logit diff {worst:.2e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", metavar="DIR", help="check checkpoints exported by tests/engine/arch_parity.rs")
    ap.add_argument("--only", metavar="CASE", nargs="+", choices=list(CASES),
                    help="make only these cases (the others in cases.json are kept)")
    args = ap.parse_args()
    if args.verify:
        verify(args.verify)
    else:
        make(args.only)
