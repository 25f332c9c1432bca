"""Does a study's delivered model beat a plain, hand-written network of its family trained for the
same total compute?

For each study: its delivered compute (search FLOPs, counted as `compare` counts them, plus the
finalize stage) becomes the budget of a hand-written PyTorch model of a usual size (an MLP with two
256-wide hidden layers, or a three-layer 32-channel CNN with BatchNorm) trained with Adam at the
study's lr, its batch size and a per-step cosine schedule (`torch.optim.lr_scheduler`), on the same
splits. The number of epochs is the budget divided by 3 x forward FLOPs x training samples, the
same FLOP convention as the study's (multiply-adds of the weights, 2 per MAC). Both test metrics
are measured with `dils_search.core.train.evaluate`.

    python scripts/bench_baseline.py --storage sqlite:////tmp/bench/digits-mlp/study.db \\
        --study digits-mlp--optuna_dils-analytic--s0 --study digits-mlp--optuna_dils-analytic--s1

Prints one JSON object per study and a Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch
from torch import nn


def plain_model(spec: Any) -> tuple[nn.Module, int]:
    """A hand-written network of ``spec``'s family and its forward FLOPs per sample (weights only)."""
    from dils_search.core.spec import ConvSpec

    if isinstance(spec, ConvSpec):
        c, dims, size = 32, spec.dims, list(spec.input_size)
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        layers: list[nn.Module] = []
        cin = spec.in_channels
        for _ in range(3):
            layers += [conv(cin, c, 5, padding=2), bn(c), nn.ReLU()]
            cin = c
        locations = math.prod(size)
        layers += [nn.Flatten(), nn.Linear(c * locations, spec.out_features)]
        flops = 2 * (spec.in_channels * c + 2 * c * c) * 5**dims * locations + 2 * c * locations * spec.out_features
        return nn.Sequential(*layers), flops
    widths = [spec.in_features, 256, 256]
    layers = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], spec.out_features))
    return nn.Sequential(*layers), 2 * sum(a * b for a, b in zip(widths, [*widths[1:], spec.out_features], strict=True))


def train_plain(model: nn.Module, data: Any, lr: float, batch_size: int, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = data.x_train.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    loss_fn = nn.CrossEntropyLoss() if data.task == "classification" else nn.MSELoss()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


def measure(url: str, name: str) -> dict[str, Any]:
    from dils_search.core.train import evaluate
    from dils_search.report import best_so_far, load_study_data
    from dils_search.search.trainers import make_task

    study = load_study_data(url, name)
    final = study.final
    if final is None:
        raise SystemExit(f"study {name!r} has no delivered model yet: run `dils-search finalize` first")
    curve = best_so_far(study)
    budget = curve.flops[-1] + float(final["flops"])
    cfg = study.config
    task = make_task(cfg, "cpu")
    torch.manual_seed(cfg.seed)  # the plain model's initialisation too
    model, fwd = plain_model(task.base)
    n = task.data.x_train.shape[0]
    epochs = max(1, int(budget // (3 * fwd * n)))
    start = time.perf_counter()
    train_plain(model, task.data, cfg.train.lr, cfg.train.batch_size, epochs, cfg.seed)
    seconds = time.perf_counter() - start
    test = evaluate(model, task.data.x_test, task.data.y_test, task.data.task)["metric"]
    return {
        "study": name, "task": cfg.data.dataset, "delivered_test": float(final["test_metric"]),
        "delivered_hidden": final["hidden"], "delivered_flops": budget, "baseline_test": test,
        "baseline": str(model).replace("\n", " "), "baseline_epochs": epochs, "baseline_flops": 3 * fwd * n * epochs,
        "baseline_seconds": seconds, "delivered_minus_baseline_pp": 100 * (float(final["test_metric"]) - test),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", required=True)
    p.add_argument("--study", action="append", required=True, help="a finished, finalized study (repeatable)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.study:
        row = measure(a.storage, name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| study | delivered test | plain baseline test (epochs) | delivered − baseline |", file=sys.stderr)
    print("|---|---:|---:|---:|", file=sys.stderr)
    for r in rows:
        print(f"| {r['study']} | {r['delivered_test']:.4f} | {r['baseline_test']:.4f} ({r['baseline_epochs']}) | "
              f"{r['delivered_minus_baseline_pp']:+.2f} pp |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
