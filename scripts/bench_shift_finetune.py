"""Why does an exact dils-analytic insertion with shifted principal rows fine-tune worse than its parent?

The digits MLP ``64 -> [32, 16] -> 10`` (15 epochs, Adam 3e-3), a 64-unit layer inserted at
position 0 from 512 calibration rows, then 3 epochs of Adam at 0.3 x the parent's lr with a
1-epoch re-warmup. Compares the exact shifted basis with SGD, with a shift-free (not exact) signed
basis, and with 128 units (plus-minus pairs: shift-free and exact), and reports the common mode of
the new layer's output (its mean against its spread over the calibration data).

    python scripts/bench_shift_finetune.py

Prints one JSON object.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import torch

from dils_search import GrowOptions, GrowthStep, MLPSpec, build, grow, output_gap
from dils_search.core.data import load_dataset
from dils_search.core.train import Recipe, evaluate, train


def main() -> int:
    torch.set_num_threads(1)
    data = load_dataset("digits", seed=0)
    parent = build(MLPSpec(64, [32, 16], data.out_features), seed=0)
    train(parent, data, Recipe(epochs=15, lr=3e-3, batch_size=64, seed=0))
    parent.eval()
    calib = data.x_train[:512]

    def acc(m: torch.nn.Module) -> float:
        return evaluate(m, data.x_test, data.y_test, "classification")["accuracy"]

    def tuned(m: torch.nn.Module, **kw: Any) -> float:
        m = copy.deepcopy(m)
        recipe = {"epochs": 3, "lr": 0.3 * 3e-3, "batch_size": 64, "seed": 0, "rewarmup_epochs": 1.0, **kw}
        train(m, data, Recipe(**recipe))
        return acc(m)

    out: dict[str, Any] = {"parent": acc(parent), "parent_tuned": tuned(parent)}
    child = grow(parent, GrowthStep(0, 64, "dils-analytic"), calib, GrowOptions(seed=0))
    with torch.no_grad():
        g = child.blocks[0](calib)
    out["shifted"] = {"basis": child.growth_info.basis, "after_insert": acc(child), "tuned": tuned(child),
                      "sgd_tuned": tuned(child, optimizer="sgd", lr=0.01),
                      "parent_sgd_tuned": tuned(parent, optimizer="sgd", lr=0.01),
                      "g_mean": float(g.mean()), "g_spread": float(g.std(0).mean())}
    grow_module = sys.modules["dils_search.core.grow"]  # the package exports grow() under the module's name
    from dils_search import _bases

    original = grow_module.candidate_rows
    grow_module.candidate_rows = lambda spec, u, m, lr: [_bases._signed_rows(spec, _bases.channels_last(u).double(), m)]
    try:
        signed = grow(parent, GrowthStep(0, 64, "dils-analytic"), calib, GrowOptions(seed=0))
    finally:
        grow_module.candidate_rows = original
    out["signed_not_exact"] = {"gap": output_gap(parent, signed, data.x_test), "after_insert": acc(signed),
                               "tuned": tuned(signed)}
    wide = grow(parent, GrowthStep(0, 128, "dils-analytic"), calib, GrowOptions(seed=0))
    out["plus_minus_128"] = {"basis": wide.growth_info.basis, "after_insert": acc(wide), "tuned": tuned(wide)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
