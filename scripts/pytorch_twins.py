"""PyTorch twins of edge-trainer's architectures.

Each class has the parameter names, tensor layouts and arithmetic of the model
edge-trainer builds for the same `[model]` settings, so that

  * a `state_dict` of one of these, saved with `safetensors.torch.save_file`,
    is a valid `model.init` for edge-trainer (strict: every tensor must fit), and
  * a checkpoint written by edge-trainer (`best.safetensors`,
    `current.safetensors`) loads into the twin with `load_state_dict(strict=True)`
    and gives the same logits, given the same (normalised) input.

`from_spec(spec)` builds the twin from the `model` JSON that edge-trainer stores
in every checkpoint's metadata:

    from safetensors import safe_open
    from safetensors.torch import load_file
    import json, pytorch_twins
    with safe_open("best.safetensors", "pt") as f:
        meta = f.metadata()
    model = pytorch_twins.from_spec(json.loads(meta["model"]))
    model.load_state_dict(load_file("best.safetensors"), strict=True)
    model.eval()

Inputs are what edge-trainer feeds the model: samples normalised with the
checkpoint's `input.normalization` (per feature, or per channel for images:
`(x - mean[c]) / std[c]` on 0..255 pixel values); token ids for text
(`input.text.vocab`, padded/cut to `input.text.max_len`).

Needs torch only. These classes are also what `scripts/make_arch_fixtures.py`
uses to make the parity fixtures in tests/fixtures/arch.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


class MLP(nn.Module):
    """`arch = "mlp"`: `layers.{i}.weight|bias`, `head.weight|bias`."""

    def __init__(self, input_dim, hidden, num_classes, activation="relu", dropout=0.0):
        super().__init__()
        dims = [input_dim] + list(hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers:
            x = self.drop(self.act(layer(x)))
        return self.head(x)


class ConvBlock(nn.Module):
    """One conv block: `conv` (no bias when batch-norm follows), `bn`, activation, max-pool."""

    def __init__(self, dim, cin, cout, kernel_size, stride, padding, batch_norm, pool, activation):
        super().__init__()
        conv, bn, mp = (
            (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if dim == 2 else (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
        )
        self.conv = conv(cin, cout, kernel_size, stride=stride, padding=padding, bias=not batch_norm)
        self.bn = bn(cout) if batch_norm else None
        self.act = ACTIVATIONS[activation]()
        self.pool = mp(pool) if pool > 1 else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        x = self.act(x)
        if self.pool is not None:
            x = self.pool(x)
        return x


class CNN(nn.Module):
    """`arch = "cnn"` (dim 2, input [B, C, H, W]) and `"cnn1d"` (dim 1, input [B, C, L]):
    `features.{i}.conv.*`, `features.{i}.bn.*`, `fc.{i}.*` (hidden layers, if any), `head.*`.

    `blocks`: dicts with out_channels, kernel_size, stride, padding, batch_norm, pool
    (edge-trainer's resolved `blocks`). `flatten`: the whole last feature map goes
    to the fully-connected part (its size is then `input_size` after the blocks)
    instead of its global average; `hidden`: widths of hidden linear layers.
    """

    def __init__(self, dim, in_channels, blocks, num_classes, activation="relu", dropout=0.0,
                 flatten=False, hidden=(), feature_size=None):
        super().__init__()
        mods, cin = [], in_channels
        for b in blocks:
            mods.append(
                ConvBlock(dim, cin, b["out_channels"], b["kernel_size"], b["stride"], b["padding"],
                          b["batch_norm"], b["pool"], activation)
            )
            cin = b["out_channels"]
        self.dim = dim
        self.in_channels = in_channels
        self.flatten = flatten
        self.features = nn.Sequential(*mods)
        width = cin * (int(torch.tensor(feature_size).prod()) if flatten else 1)
        dims = [width] + list(hidden)
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        if x.dim() == self.dim + 1:  # [B, H, W] or [B, L]: one channel
            x = x.unsqueeze(1)
        x = self.features(x)
        if self.flatten:
            x = x.flatten(1)
        else:
            x = x.mean(dim=tuple(range(2, x.dim())))  # global average pooling
        for fc in self.fc:
            x = self.act(fc(self.drop(x)))
        return self.head(self.drop(x))


def feature_size(input_size, blocks):
    """Spatial size after the conv blocks (floor mode, as the layers compute it)."""
    size = list(input_size)
    for b in blocks:
        size = [((n + 2 * b["padding"] - b["kernel_size"]) // b["stride"] + 1) // b["pool"] for n in size]
    return size


class TextCNN(nn.Module):
    """`arch = "textcnn"`: the seed's model. `embedding.weight`, `convs.{i}.*`, `fc.*`."""

    def __init__(self, vocab_size, pad_index, embed_dim=300, filter_sizes=(2, 3, 4), num_filters=256,
                 num_classes=10, dropout=0.5):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_index)
        self.convs = nn.ModuleList(nn.Conv2d(1, num_filters, (k, embed_dim)) for k in filter_sizes)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_filters * len(filter_sizes), num_classes)

    def forward(self, x):  # x: [B, L] token ids
        out = self.embedding(x.long()).unsqueeze(1)
        out = torch.cat([F.relu(conv(out)).squeeze(3).max(dim=2).values for conv in self.convs], 1)
        return self.fc(self.dropout(out))


def from_spec(spec):
    """The twin of an edge-trainer `ModelSpec` (the `model` metadata JSON of a checkpoint)."""
    arch = spec["arch"]
    if arch == "mlp":
        return MLP(spec["input_dim"], spec["hidden"], spec["num_classes"], spec.get("activation", "relu"),
                   spec.get("dropout", 0.0))
    if arch in ("cnn", "cnn1d"):
        return CNN(2 if arch == "cnn" else 1, spec["in_channels"], spec["blocks"], spec["num_classes"],
                   spec.get("activation", "relu"), spec.get("dropout", 0.0), spec.get("flatten", False),
                   spec.get("hidden", []), feature_size(spec["input_size"], spec["blocks"]))
    if arch == "textcnn":
        return TextCNN(spec["vocab_size"], spec["pad_index"], spec["embed_dim"], spec["filter_sizes"],
                       spec["num_filters"], spec["num_classes"], spec["dropout"])
    raise ValueError(f"unknown arch {arch!r}")
