#!/usr/bin/env python3
"""Converts scikit-learn's `digits` data set into the bundled example.

Writes examples/digits/digits-{0..3}.safetensors, each with
  x: uint8 [N, 8, 8]  (pixel intensities 0..16, as scikit-learn ships them)
  y: int64 [N]        (the digit, 0..9)
and examples/digits/class.txt (one class name per line).

Needs numpy, scikit-learn and safetensors (all from PyPI):
    python3 -m venv .venv && .venv/bin/pip install numpy scikit-learn safetensors
    .venv/bin/python scripts/make_digits.py

The data: 1,797 8x8 images of hand-written digits, from scikit-learn
(BSD-3-Clause), a copy of the test set of the UCI ML "Optical Recognition of
Handwritten Digits" data set (Alpaydin & Kaynak, 1998; CC BY 4.0).
"""
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits

out = Path(__file__).resolve().parent.parent / "examples" / "digits"
out.mkdir(parents=True, exist_ok=True)
digits = load_digits()
x = digits.images.astype(np.uint8)  # values 0..16
y = digits.target.astype(np.int64)
for i, (xs, ys) in enumerate(zip(np.array_split(x, 4), np.array_split(y, 4))):
    save_file({"x": np.ascontiguousarray(xs), "y": np.ascontiguousarray(ys)},
              str(out / f"digits-{i}.safetensors"))
(out / "class.txt").write_text("".join(f"{d}\n" for d in range(10)))
print(f"wrote {len(y)} samples to {out}")
