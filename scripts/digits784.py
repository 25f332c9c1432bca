"""Write scikit-learn's digits upscaled to 28 x 28 (784 inputs) as an ``.npz`` a study can read.

A wide-input image task that needs no download: every layer a search inserts at position 0 is
narrower than its input, which is where inheritance used to break down (docs/inheritance.md).
The pixels are written raw (0..16, bilinearly interpolated), as a user's own file would be.

    python scripts/digits784.py digits784.npz

docs/benchmarks.md runs ``studies/digits-mlp.toml`` on it with ``[data] dataset = "file"`` and
``path = "digits784.npz"``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def digits784() -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: 1797 images of 784 float32 pixels and their labels 0..9."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.nn.functional.interpolate(torch.tensor(d.images, dtype=torch.float32).unsqueeze(1), size=(28, 28),
                                        mode="bilinear", align_corners=False)
    return x.reshape(len(x), -1).numpy(), d.target.astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python scripts/digits784.py OUT.npz", file=sys.stderr)
        return 2
    x, y = digits784()
    np.savez(Path(args[0]), x=x, y=y)
    print(f"wrote {args[0]}: x {list(x.shape)}, y {list(y.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
