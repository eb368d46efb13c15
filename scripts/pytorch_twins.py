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


class BasicBlock(nn.Module):
    """torchvision's `BasicBlock` (same names: conv1, bn1, conv2, bn2, downsample.0|1)."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """`arch = "resnet18" | "resnet34"`: torchvision's ResNet with BasicBlocks and its
    state_dict names; `base_width` (64 in torchvision) scales every width, for small
    fixtures. At 64 the state_dict is interchangeable with
    `torchvision.models.resnet18()`'s / `resnet34()`'s."""

    def __init__(self, layers, in_channels=3, base_width=64, num_classes=1000, dropout=0.0):
        super().__init__()
        w = base_width
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = w
        for stage, count in enumerate(layers):
            planes = w * 2**stage
            blocks = []
            for i in range(count):
                blocks.append(BasicBlock(cin, planes, 2 if stage > 0 and i == 0 else 1))
                cin = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.drop = nn.Dropout(dropout)  # not in torchvision; no state (identity at p = 0)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        if x.dim() == 3:  # [B, H, W]: one channel
            x = x.unsqueeze(1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.drop(x))


def make_divisible(v, divisor=8):
    """torchvision's `_make_divisible`."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn_act(cin, cout, kernel_size=3, stride=1, groups=1):
    """torchvision's `Conv2dNormActivation` with ReLU6: `{i}.0` conv, `{i}.1` batch-norm."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """torchvision's `InvertedResidual` (`conv.*`)."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [conv_bn_act(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """`arch = "mobilenet_v2"`: torchvision's MobileNetV2 (`features.*`, `classifier.1`), its
    `width_mult` rounding and init; `in_channels` from the data. With 3 channels the
    state_dict is interchangeable with `torchvision.models.mobilenet_v2(width_mult=...)`'s."""

    SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                [6, 320, 1, 1]]

    def __init__(self, in_channels=3, width_mult=1.0, num_classes=1000, dropout=0.2):
        super().__init__()
        cin = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        features = [conv_bn_act(in_channels, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(conv_bn_act(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if x.dim() == 3:  # [B, H, W]: one channel
            x = x.unsqueeze(1)
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def bn_v3(c):
    """MobileNetV3's batch-norm: eps 1e-3, momentum 0.01."""
    return nn.BatchNorm2d(c, eps=0.001, momentum=0.01)


def conv_bn_v3(cin, cout, kernel_size, stride=1, groups=1, act=None):
    """`Conv2dNormActivation` with MobileNetV3's batch-norm and `act` (a module class or None)."""
    layers = [nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
              bn_v3(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """torchvision.ops' `SqueezeExcitation` as MobileNetV3 uses it: global average,
    `fc1` (1x1 conv, bias), ReLU, `fc2`, hard sigmoid, the input scaled per channel."""

    def __init__(self, channels, squeeze):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidualV3(nn.Module):
    """torchvision's MobileNetV3 `InvertedResidual` (`block.*`)."""

    def __init__(self, cin, kernel, expanded, cout, se, hs, stride):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers = [conv_bn_v3(cin, expanded, 1, act=act)] if expanded != cin else []
        layers.append(conv_bn_v3(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded, make_divisible(expanded // 4)))
        layers.append(conv_bn_v3(expanded, cout, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res_connect else self.block(x)


class MobileNetV3Small(nn.Module):
    """`arch = "mobilenet_v3_small"`: torchvision's MobileNetV3-Small (`features.*`,
    `classifier.0`, `classifier.3`), its `width_mult` rounding and init; `in_channels`
    from the data. With 3 channels the state_dict is interchangeable with
    `torchvision.models.mobilenet_v3_small(width_mult=...)`'s."""

    # input channels, kernel, expanded channels, output channels, squeeze-excite, hard-swish, stride
    SETTINGS = [[16, 3, 16, 16, True, False, 2], [16, 3, 72, 24, False, False, 2],
                [24, 3, 88, 24, False, False, 1], [24, 5, 96, 40, True, True, 2],
                [40, 5, 240, 40, True, True, 1], [40, 5, 240, 40, True, True, 1],
                [40, 5, 120, 48, True, True, 1], [48, 5, 144, 48, True, True, 1],
                [48, 5, 288, 96, True, True, 2], [96, 5, 576, 96, True, True, 1],
                [96, 5, 576, 96, True, True, 1]]

    def __init__(self, in_channels=3, width_mult=1.0, num_classes=1000, dropout=0.2):
        super().__init__()
        w = lambda c: make_divisible(c * width_mult)  # noqa: E731
        features = [conv_bn_v3(in_channels, w(16), 3, 2, act=nn.Hardswish)]
        for cin, k, exp, cout, se, hs, s in self.SETTINGS:
            features.append(InvertedResidualV3(w(cin), k, w(exp), w(cout), se, hs, s))
        last_in = w(self.SETTINGS[-1][3])
        features.append(conv_bn_v3(last_in, 6 * last_in, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*features)
        last = w(1024)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if x.dim() == 3:  # [B, H, W]: one channel
            x = x.unsqueeze(1)
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


RESNET_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


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
    if arch in RESNET_LAYERS:
        return ResNet(RESNET_LAYERS[arch], spec["in_channels"], spec["base_width"], spec["num_classes"],
                      spec.get("dropout", 0.0))
    if arch == "mobilenet_v2":
        return MobileNetV2(spec["in_channels"], spec["width_mult"], spec["num_classes"], spec.get("dropout", 0.2))
    if arch == "mobilenet_v3_small":
        return MobileNetV3Small(spec["in_channels"], spec["width_mult"], spec["num_classes"],
                                spec.get("dropout", 0.2))
    raise ValueError(f"unknown arch {arch!r}")
