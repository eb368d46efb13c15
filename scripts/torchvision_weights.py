#!/usr/bin/env python3
"""torchvision backbones in and out of edge-trainer.

On a machine with internet (edge-trainer's device needs none): download
torchvision's ImageNet weights and save them as a safetensors `model.init`:

    pip install torch torchvision safetensors
    python scripts/torchvision_weights.py get resnet18 resnet18-imagenet.safetensors
    python scripts/torchvision_weights.py get mobilenet_v2 mbv2-imagenet.safetensors --half

That is `safetensors.torch.save_file(model.state_dict(), path)` for
`torchvision.models.<arch>(weights="DEFAULT")` (`--weights` picks another
torchvision weights name; `--half` stores f16, half the size, loaded as f32).
Copy the file to the device and start a run from it (1000 ImageNet classes
there, yours here: the head is re-initialised):

    [data]
    format = "image-folder"
    channels = 3                 # the weights' stem takes RGB
    image_size = [224, 224]      # any size >= 32x32 works; 112 or 160 train much faster
    [model]
    arch = "resnet18"            # or "resnet34", "mobilenet_v2", "mobilenet_v3_small"
    init = "resnet18-imagenet.safetensors"
    reinit = ["fc.*"]            # mobilenet_v2: ["classifier.1.*"], v3: ["classifier.3.*"]
    finetune = "last:1"          # or "full", "head", "bias"

Back the other way: a checkpoint edge-trainer wrote (`best.safetensors`)
loads into the torchvision model with `load_state_dict(strict=True)`:

    python scripts/torchvision_weights.py check runs/<run>/best.safetensors

builds `torchvision.models.<arch>(num_classes=...)` from the checkpoint's
`model` metadata, loads the weights strictly and prints the input
normalisation to use (edge-trainer normalises 0..255 pixels with the training
split's per-channel mean and std, stored in the checkpoint). Checkpoints of
the reduced widths (`model.base_width` other than 64, grayscale input) have no
torchvision model; they load into the twins of scripts/pytorch_twins.py.
"""

import argparse
import json
import sys

ARCHS = ("resnet18", "resnet34", "mobilenet_v2", "mobilenet_v3_small")


def get(args):
    import torch
    import torchvision
    from safetensors.torch import save_file

    model = getattr(torchvision.models, args.arch)(weights=args.weights)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if args.half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    save_file(sd, args.out)
    n = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    head = {"mobilenet_v2": "classifier.1.*", "mobilenet_v3_small": "classifier.3.*"}.get(args.arch, "fc.*")
    print(f"{args.out}: {len(sd)} tensors, {n:,} values ({args.arch}, weights {args.weights}, "
          f"{'f16' if args.half else 'f32'}); set model.arch = {args.arch!r}, model.reinit = [{head!r}]")


def check(args):
    import torch
    import torchvision
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(args.checkpoint, "pt") as f:
        meta = f.metadata() or {}
    if "model" not in meta:
        sys.exit(f"{args.checkpoint}: no edge-trainer `model` metadata")
    spec = json.loads(meta["model"])
    arch = spec.get("arch")
    if arch not in ARCHS:
        sys.exit(f"{args.checkpoint}: arch {arch!r} is not a torchvision backbone (use scripts/pytorch_twins.py)")
    if spec["in_channels"] != 3 or spec.get("base_width", 64) != 64:
        sys.exit(f"{args.checkpoint}: {spec['in_channels']} input channels, base_width "
                 f"{spec.get('base_width', 64)}: no torchvision model has this shape; load it into "
                 "scripts/pytorch_twins.py's from_spec(spec) instead")
    kwargs = dict(num_classes=spec["num_classes"])
    if arch.startswith("mobilenet"):
        kwargs.update(width_mult=spec["width_mult"], dropout=spec.get("dropout", 0.2))
    model = getattr(torchvision.models, arch)(**kwargs)
    model.load_state_dict(load_file(args.checkpoint), strict=True)
    model.eval()
    with torch.no_grad():
        h, w = spec["input_size"]
        logits = model(torch.zeros(1, 3, h, w))
    print(f"{args.checkpoint}: loads into torchvision.models.{arch}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
          f"with strict=True; logits {tuple(logits.shape)}")
    if "input" in meta:
        inp = json.loads(meta["input"])
        print(f"input: {inp.get('sample_shape')} pixels 0..255, normalisation {json.dumps(inp.get('normalization'))}")
    if "classes" in meta:
        print(f"classes: {meta['classes']}")
    if args.predictions:
        compare_predictions(args, model, spec, meta)


def compare_predictions(args, model, spec, meta):
    """Runs torchvision on the files edge-trainer predicted and compares.

    `args.predictions` is the output of `edge-trainer predict --json
    --split test ...` with this checkpoint: one JSON line per image (its
    path relative to `args.data`, the true class, edge-trainer's classes and
    probabilities). The same pixels go through torchvision here: decoded by
    Pillow, resized bilinearly (the stretch resize edge-trainer uses), scaled
    with the checkpoint's normalisation, and the accuracy of both is printed.
    """
    import numpy as np
    import torch
    from PIL import Image

    inp = json.loads(meta.get("input", "{}"))
    norm = inp.get("normalization") or {}
    mean = torch.tensor(norm.get("mean", [0.0] * spec["in_channels"]), dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(norm.get("std", [1.0] * spec["in_channels"]), dtype=torch.float32).view(-1, 1, 1)
    classes = json.loads(meta.get("classes", "[]"))
    h, w = spec["input_size"]
    n = agree = right_tv = right_et = 0
    worst = 0.0
    with open(args.predictions) as f:
        rows = [json.loads(line) for line in f if line.startswith("{")]
    rows = [r for r in rows if "input" in r and r.get("truth") is not None]
    if not rows:
        sys.exit(f"{args.predictions}: no labelled predictions (run `edge-trainer predict --json --split test`)")
    for start in range(0, len(rows), 64):
        batch = rows[start:start + 64]
        xs = []
        for r in batch:
            path = r["input"]
            name, _, tail = path.rpartition(":")
            if name and tail.isdigit():
                path = name
            img = Image.open(f"{args.data}/{path}").convert("RGB" if spec["in_channels"] == 3 else "L")
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
            a = a.permute(2, 0, 1) if a.dim() == 3 else a.unsqueeze(0)
            xs.append((a - mean) / std)
        with torch.no_grad():
            probs = torch.softmax(model(torch.stack(xs)), dim=1)
        for r, p in zip(batch, probs):
            tv = classes[int(p.argmax())] if classes else str(int(p.argmax()))
            n += 1
            agree += tv == r["class"]
            right_tv += tv == r["truth"]
            right_et += r["class"] == r["truth"]
            for t in r["top"]:
                worst = max(worst, abs(float(p[t["index"]]) - t["probability"]))
    print(f"{n} labelled images: accuracy in torchvision {right_tv / n:.4f} ({right_tv}), "
          f"in edge-trainer {right_et / n:.4f} ({right_et}); same class on {agree} of {n}; "
          f"max |probability difference| {worst:.2e}")
    if right_tv != right_et:
        sys.exit("the accuracies differ (images that need resizing can: Pillow's bilinear resize and "
                 "edge-trainer's may differ by one level on some pixels; compare on images already at "
                 "the model's input size)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("get", help="download torchvision weights and save them as safetensors")
    g.add_argument("arch", choices=ARCHS)
    g.add_argument("out")
    g.add_argument("--weights", default="DEFAULT", help="torchvision weights name (default: DEFAULT)")
    g.add_argument("--half", action="store_true", help="store f16 (edge-trainer loads it as f32)")
    c = sub.add_parser("check", help="load an edge-trainer checkpoint into torchvision (strict)")
    c.add_argument("checkpoint")
    c.add_argument("--predictions", help="`edge-trainer predict --json --split test` output of this "
                   "checkpoint: torchvision predicts the same images and both accuracies are printed")
    c.add_argument("--data", default=".", help="the folder the predictions' paths are relative to (data.dir)")
    args = ap.parse_args()
    get(args) if args.cmd == "get" else check(args)


if __name__ == "__main__":
    main()
