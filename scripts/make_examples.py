#!/usr/bin/env python3
"""Makes the bundled example data for images, signals and text, and the
PyTorch-made model the fine-tuning example starts from.

    /path/to/venv/bin/python scripts/make_examples.py

Needs numpy, scikit-learn, safetensors and torch. Deterministic: rerunning
rewrites identical files (the PyTorch model up to the torch version).

examples/digits-png/<digit>/<index>.png  (image-folder)
    The first 1,200 images of scikit-learn's `digits` (8x8, 16 grey levels,
    scaled to 0..255) as 8-bit grayscale PNGs, one folder per class.
    Data: scikit-learn (BSD-3-Clause), a copy of the test set of the UCI ML
    "Optical Recognition of Handwritten Digits" data set (Alpaydin & Kaynak,
    1998; CC BY 4.0).

examples/pretrained/digits0-4-cnn.safetensors  (model.init for fine-tuning)
    A `cnn` (scripts/pytorch_twins.py, 2 conv blocks of 16 and 32 channels with
    batch-norm) trained in PyTorch on the *other* 597 digits images, classes 0-4
    only, upscaled to 16x16. Saved as a PyTorch Lightning-style state dict:
    every name under `model.`, the head called `classifier` (so the fine-tuning
    config shows `init_prefix` and `rename`). 5 classes: fine-tuning it on the
    10 classes of digits-png needs `reinit = ["head.*"]`.

examples/pretrained/digits0-4-mobilenet_v2.safetensors  (model.init for fine-tuning)
    A torchvision-layout `mobilenet_v2` (width_mult 0.25, a 1-channel stem) trained in
    PyTorch on the same 303 images of digits 0-4 (images 1200.. of scikit-learn's), upscaled to 32x32; a plain
    `state_dict` as torchvision saves it, in f16 (half the size). Fine-tuning it on
    the 10 classes needs `reinit = ["classifier.1.*"]` (configs/finetune-digits-mobilenet.toml).

examples/signals/imu-{0,1,2}.safetensors  (safetensors, x [N, 3, 64] f16, y [N])
    Synthetic 3-axis accelerometer windows (2 s at 32 Hz) of four activities:
    idle, walk, run, shake (class.txt). Made up here: sinusoids with random
    frequency, amplitude and phase per class, gravity on z, noise.

examples/news-zh/{train,dev,test,class}.txt  (text-tsv, THUCNews layout)
    Short Chinese news headlines in four classes (sports, finance, technology,
    entertainment), `text<TAB>label index`. Composed here from word lists
    written for this project (no external corpus); released with the project.
"""

import random
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_torch
try:
    from sklearn.datasets import load_digits
except ImportError:  # the same 1,797 images, in order, from the bundled examples/digits
    def load_digits():
        from types import SimpleNamespace
        from safetensors.numpy import load_file
        parts = [load_file(str(Path(__file__).resolve().parent.parent / "examples" / "digits" / f"digits-{i}.safetensors"))
                 for i in range(4)]
        return SimpleNamespace(images=np.concatenate([p["x"] for p in parts]).astype(np.float64),
                               target=np.concatenate([p["y"] for p in parts]))

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pytorch_twins  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"


def png_gray(path, img):
    """Writes an 8-bit grayscale PNG (no dependency beyond zlib)."""
    h, w = img.shape
    raw = b"".join(b"\x00" + bytes(img[r].astype(np.uint8)) for r in range(h))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(data)


def digits_png():
    d = load_digits()
    out = EX / "digits-png"
    for i in range(1200):
        folder = out / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        img = np.round(d.images[i] * (255.0 / 16.0))
        png_gray(folder / f"{i:04d}.png", img)
    (out / "LICENSE-DATA.txt").write_text(
        "Images 0..1199 of scikit-learn's `digits` data set (BSD-3-Clause), a copy of the test set of the\n"
        "UCI ML \"Optical Recognition of Handwritten Digits\" data set (E. Alpaydin, C. Kaynak, 1998),\n"
        "licensed CC BY 4.0. Converted to PNG by scripts/make_examples.py.\n")
    print("digits-png: 1200 images")


def digits_0_4(size):
    """Images 1200.. of scikit-learn's digits of classes 0-4 (not among the PNG
    examples), as 0..255 pixels resized bilinearly to `size` and standardised."""
    d = load_digits()
    idx = [i for i in range(1200, len(d.target)) if d.target[i] < 5]
    x = torch.tensor(np.round(d.images[idx] * (255.0 / 16.0)), dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target[idx], dtype=torch.int64)
    mean, std = x.mean(), x.std(unbiased=False)
    return (x - mean) / std, y


def fit(model, x, y, lr, epochs):
    """Adam, batches of 32 in a seeded order; the train accuracy at the end."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 32):
            b = perm[s:s + 32]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def pretrained_cnn():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = digits_0_4(16)
    blocks = [dict(out_channels=16, kernel_size=3, stride=1, padding=1, batch_norm=True, pool=2),
              dict(out_channels=32, kernel_size=3, stride=1, padding=1, batch_norm=True, pool=2)]
    model = pytorch_twins.CNN(2, 1, blocks, 5)
    acc = fit(model, x, y, lr=1e-2, epochs=30)
    state = {}
    for k, v in model.state_dict().items():
        k = k.replace("head.", "classifier.", 1) if k.startswith("head.") else k
        state[f"model.{k}"] = v.contiguous()
    out = EX / "pretrained"
    out.mkdir(parents=True, exist_ok=True)
    save_torch(state, str(out / "digits0-4-cnn.safetensors"), metadata={
        "note": "cnn trained in PyTorch on scikit-learn digits 1200.. of classes 0-4 (scripts/make_examples.py)"})
    print(f"pretrained cnn on {len(y)} images of digits 0-4, train accuracy {acc:.3f}")


def pretrained_mobilenet():
    """A torchvision-layout mobilenet_v2 (width_mult 0.25, grayscale stem) trained on the
    other digits images of classes 0-4 at 32x32, saved as a plain state_dict in f16."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x, y = digits_0_4(32)
    model = pytorch_twins.MobileNetV2(in_channels=1, width_mult=0.25, num_classes=5)
    acc = fit(model, x, y, lr=3e-3, epochs=40)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    out = EX / "pretrained"
    out.mkdir(parents=True, exist_ok=True)
    save_torch(state, str(out / "digits0-4-mobilenet_v2.safetensors"), metadata={
        "note": "torchvision-layout mobilenet_v2 (width_mult 0.25, 1 input channel) trained in PyTorch on "
                "scikit-learn digits 1200.. of classes 0-4 at 32x32, f16 (scripts/make_examples.py)"})
    print(f"pretrained mobilenet_v2 on {len(y)} images of digits 0-4, train accuracy {acc:.3f}")


def signals():
    rng = np.random.default_rng(7)
    n_per, L, hz = 150, 64, 32.0
    t = np.arange(L) / hz
    classes = ["idle", "walk", "run", "shake"]
    xs, ys = [], []
    for c, name in enumerate(classes):
        for _ in range(n_per):
            x = np.zeros((3, L))
            x[2] += 1.0  # gravity
            if name == "idle":
                x += 0.05 * rng.standard_normal((3, 1))  # a slight tilt
            else:
                f = {"walk": rng.uniform(1.4, 2.4), "run": rng.uniform(2.2, 3.4),
                     "shake": rng.uniform(4.5, 8.0)}[name]
                a = {"walk": rng.uniform(0.2, 0.5), "run": rng.uniform(0.5, 1.1),
                     "shake": rng.uniform(0.4, 1.2)}[name]
                for ch, gain in enumerate(rng.uniform(0.3, 1.0, 3)):
                    phase = rng.uniform(0, 2 * np.pi)
                    x[ch] += a * gain * np.sin(2 * np.pi * f * t + phase)
                    x[ch] += 0.3 * a * gain * np.sin(4 * np.pi * f * t + 2 * phase)  # a harmonic
            x += 0.12 * rng.standard_normal((3, L))
            xs.append(x)
            ys.append(c)
    xs, ys = np.array(xs, dtype=np.float16), np.array(ys, dtype=np.int64)
    perm = rng.permutation(len(ys))
    xs, ys = xs[perm], ys[perm]
    out = EX / "signals"
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(ys)), 3)):
        save_np({"x": np.ascontiguousarray(xs[part]), "y": np.ascontiguousarray(ys[part])},
                str(out / f"imu-{i}.safetensors"))
    (out / "class.txt").write_text("\n".join(classes) + "\n")
    print(f"signals: {len(ys)} windows of [3, {L}]")


# --- text: headlines composed from word lists written for this project ---------
PREFIX = ["", "", "", "今日", "最新消息：", "据悉，", "快讯：", "记者获悉，", "昨晚", "本周"]
PLACES = ["北京", "上海", "深圳", "广州", "杭州", "成都", "武汉", "南京"]
SHARED_TAILS = ["引发关注", "记者现场报道", "各方反应不一", "详情见下文", "网友纷纷点赞"]
SHARED_OBJ = ["合作协议", "年度计划", "新消息", "发布会", "最新进展", "重要决定"]
WORDS = {
    "sports": dict(
        subj=["中国女排", "国足", "湖人队", "皇马", "北京国安", "上海申花", "中国乒乓球队", "男篮",
              "跳水队", "短跑名将", "网球选手", "曼联"],
        verb=["击败", "战胜", "逆转", "战平", "负于", "力克", "淘汰", "险胜"],
        obj=["对手", "卫冕冠军", "东道主", "老对手", "日本队", "韩国队", "巴西队", "德国队"],
        tail=["晋级决赛", "夺得冠军", "球迷欢呼", "创造历史", "主教练赛后点评", "赛季首胜", "收获金牌"]),
    "finance": dict(
        subj=["央行", "沪指", "人民币汇率", "多家银行", "保险公司", "基金经理", "上市公司", "证监会",
              "房企", "外资机构", "创业板", "债市"],
        verb=["上调", "下调", "公布", "收涨", "回落", "增持", "减持", "发布"],
        obj=["存款利率", "季度财报", "贷款利率", "蓝筹股", "债券收益率", "营收数据", "净利润", "分红方案"],
        tail=["市场反应平稳", "投资者关注", "专家称影响有限", "成交量放大", "股价应声上涨", "资金持续流入"]),
    "technology": dict(
        subj=["华为", "小米", "苹果公司", "研究团队", "科学家", "人工智能企业", "芯片厂商", "航天局",
              "工程师", "互联网公司", "实验室", "初创公司"],
        verb=["发布", "推出", "研发", "突破", "测试", "升级", "开源", "展示"],
        obj=["新款手机", "芯片", "操作系统", "大模型", "量子计算机", "卫星", "机器人", "自动驾驶系统",
             "电池技术", "云服务"],
        tail=["性能大幅提升", "引发行业关注", "明年量产", "算力翻倍", "功耗降低一半", "申请多项专利"]),
    "entertainment": dict(
        subj=["知名歌手", "导演", "青年演员", "电影节", "综艺节目", "偶像团体", "新剧", "影后", "新片",
              "乐队", "主持人", "剧组"],
        verb=["宣布", "举办", "主演", "发行", "亮相", "获得", "出演", "官宣"],
        obj=["演唱会", "新专辑", "票房冠军", "最佳男主角", "红毯", "首映礼", "粉丝见面会", "新电影"],
        tail=["粉丝热议", "口碑爆棚", "票房破亿", "引发网友热议", "登上热搜", "好评如潮"]),
}


def headline(rng, w):
    """One headline of the class with word lists `w`. A third of them borrow the
    subject of another class (a company in sports news, a singer in finance
    news), a third end with a tail every class uses, a fifth have an object any
    class could have: the class shows in the verb and the object, sometimes
    only in the verb (which classes share in part), so not every headline can
    be told."""
    form = rng.randrange(4)
    pre = rng.choice(PREFIX)
    tail = rng.choice(w["tail"]) if rng.random() < 0.65 else rng.choice(SHARED_TAILS)
    subj = w["subj"] if rng.random() < 0.65 else rng.choice(list(WORDS.values()))["subj"]
    obj = w["obj"] if rng.random() < 0.8 else SHARED_OBJ
    s, v, o = rng.choice(subj), rng.choice(w["verb"]), rng.choice(obj)
    if form == 0:
        return f"{pre}{s}{v}{o}"
    if form == 1:
        return f"{pre}{s}{v}{o}，{tail}"
    if form == 2:
        return f"{s}在{rng.choice(PLACES)}{v}{o}"
    return f"{pre}{rng.choice(PLACES)}：{s}{v}{o}，{tail}"


def news_zh():
    rng = random.Random(3)
    classes = list(WORDS)
    out = EX / "news-zh"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in [("train", 200), ("dev", 40), ("test", 40)]:
        lines = [(headline(rng, WORDS[c]), i) for i, c in enumerate(classes) for _ in range(n)]
        rng.shuffle(lines)
        (out / f"{split}.txt").write_text("".join(f"{t}\t{i}\n" for t, i in lines), encoding="utf-8")
    (out / "class.txt").write_text("\n".join(classes) + "\n")
    print(f"news-zh: {len(classes)} classes, 200/40/40 lines each")


PARTS = {"digits_png": digits_png, "pretrained_cnn": pretrained_cnn,
         "pretrained_mobilenet": pretrained_mobilenet, "signals": signals, "news_zh": news_zh}

if __name__ == "__main__":
    # Every part, or only those named: make_examples.py pretrained_mobilenet
    for name in sys.argv[1:] or list(PARTS):
        PARTS[name]()
