#!/usr/bin/env python3
"""Writes a folder of camera-like JPEGs for the image pipeline measurements
(issue 14): CLASS/NNNNN.jpg, smooth gradients plus noise and a few shapes so
that the JPEG sizes resemble real frames. Not committed: generate them.

    /work/venv/bin/python scripts/make_camera_jpegs.py OUT --count 10000 \
        --size 640x480 [--classes 4] [--quality 85]
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--quality", type=int, default=85)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    rng = np.random.default_rng(a.seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for c in range(a.classes):
        os.makedirs(os.path.join(a.out, f"class{c}"), exist_ok=True)
    for i in range(a.count):
        c = i % a.classes
        base = np.stack(
            [
                (xx / w) * 255 * ((c + 1) % 2),
                (yy / h) * 255,
                ((xx + yy) / (w + h)) * 255 * (c / max(1, a.classes - 1)),
            ],
            axis=-1,
        )
        noise = rng.normal(0, 12, size=(h // 4, w // 4, 3)).repeat(4, 0).repeat(4, 1)
        img = np.clip(base + noise[:h, :w], 0, 255).astype(np.uint8)
        pil = Image.fromarray(img)
        d = ImageDraw.Draw(pil)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            s = int(rng.integers(20, min(w, h) // 3))
            col = tuple(int(v) for v in rng.integers(0, 255, 3))
            (d.ellipse if c % 2 else d.rectangle)([x0, y0, x0 + s, y0 + s], fill=col)
        pil.save(os.path.join(a.out, f"class{c}", f"{i:05d}.jpg"), quality=a.quality)


if __name__ == "__main__":
    main()
