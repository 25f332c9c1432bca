"""Train and evaluate a model on in-memory tensors or streamed batches, accounting for compute."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, TrainingDiverged
from . import defaults
from .data import Dataset
from .model import forward_flops
from .spec import OPTIMIZERS, SCHEDULES
from .stream import StreamedDataset
from .threads import set_threads

__all__ = ["Recipe", "TrainResult", "train", "evaluate", "score", "evaluate_split", "TrainingDiverged", "OPTIMIZERS", "LossFn", "MetricFn"]

#: ``loss(output, target) -> scalar tensor``, differentiable; the mean over the batch
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``metric(output, target) -> float`` on a whole split (higher is better unless told otherwise)
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class Recipe:
    """How to train. ``rewarmup_epochs`` ramps the lr up linearly again after a growth step.

    The defaults shared with ``TrainConfig`` live in ``core/defaults.py``.
    """

    optimizer: str = defaults.OPTIMIZER
    lr: float = defaults.LR
    epochs: int = 10
    batch_size: int = defaults.BATCH_SIZE
    weight_decay: float = defaults.WEIGHT_DECAY
    momentum: float = 0.9
    patience: int | None = None
    rewarmup_epochs: float = 0.0
    schedule: str = defaults.SCHEDULE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer={self.optimizer!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
        for name in ("lr", "batch_size"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.epochs < 0:
            raise InputError(f"epochs={self.epochs!r} must be >= 0")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not 0 <= self.momentum < 1:
            raise InputError(f"momentum={self.momentum!r} must be in [0, 1)")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1):
            raise InputError(f"patience={self.patience!r} must be None or an integer >= 1")
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule={self.schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        if not self.rewarmup_epochs >= 0:
            raise InputError(f"rewarmup_epochs={self.rewarmup_epochs!r} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What one call to ``train`` did; ``flops`` is 3 x forward FLOPs x samples seen."""

    epochs_run: int
    samples_seen: int
    flops: int
    seconds: float
    val_metric: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def _metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "r2"


def _loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def score(out: torch.Tensor, y: torch.Tensor, task: str) -> float:
    """The task's metric of outputs ``out`` against targets ``y``: accuracy, or R^2 for regression."""
    if task == "classification":
        return float((out.argmax(1) == y.reshape(-1)).float().mean())
    y = y.reshape(out.shape).to(out.dtype)
    ss_res = float((out - y).pow(2).sum())
    ss_tot = float((y - y.mean(0)).pow(2).sum()) or 1.0
    return 1.0 - ss_res / ss_tot


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, batch_size: int = 4096, *,
             loss: LossFn | None = None, metric: MetricFn | None = None) -> dict[str, float]:
    """Loss and metric (accuracy, or R^2 for regression; higher is better) in eval mode.

    ``loss``/``metric``, when given, replace the task's own on the whole split's outputs."""
    set_threads()  # the one thread setting (core/threads.py)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            outs.append(model(x[i : i + batch_size].to(device)))
        out = torch.cat(outs)
        y = y.to(device)
        if loss is None and metric is None:  # targets as a user holds them: labels of any int dtype, a flat column
            y = y.reshape(-1).long() if task == "classification" else y.reshape(out.shape[0], -1).to(out.dtype)
        value = float(loss(out, y) if loss is not None else _loss(task, out, y))
        m = float(metric(out, y)) if metric is not None else score(out, y, task)
    model.train(was)
    if not math.isfinite(value):
        m = float("nan")
    return {"loss": value, ("metric" if metric is not None else _metric_name(task)): m, "metric": m}


def evaluate_split(model: nn.Module, data: Dataset | StreamedDataset, split: str, batch_size: int = 4096, *,
                   loss: LossFn | None = None, metric: MetricFn | None = None) -> dict[str, float]:
    """``evaluate`` on one split (train, val or test) of in-memory or streamed data. Streamed data is
    read batch by batch, the sums accumulated in float64, so it never needs the whole split in memory."""
    if isinstance(data, Dataset):
        return evaluate(model, getattr(data, f"x_{split}"), getattr(data, f"y_{split}"), data.task, batch_size,
                        loss=loss, metric=metric)
    if loss is not None or metric is not None:
        raise InputError("a custom loss or metric needs in-memory data (Dataset.from_arrays); streamed data "
                         "uses the task's own")
    set_threads()
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    n, loss_sum, correct = 0, 0.0, 0.0
    sums: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for x, y in data.batches(split, batch_size, device=device):
            out = model(x)
            n += x.shape[0]
            if data.task == "classification":
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                correct += float((out.argmax(1) == y).sum())
                continue
            loss_sum += float(F.mse_loss(out, y, reduction="sum")) / out[0].numel()
            for k, v in (("res", (out - y).pow(2).sum(0)), ("y", y.sum(0)), ("yy", y.pow(2).sum(0))):
                sums[k] = sums.get(k, 0) + v.double()
    model.train(was)
    value = loss_sum / max(n, 1)
    if data.task == "classification":
        m = correct / max(n, 1)
    else:
        ss_tot = float((sums["yy"] - sums["y"].pow(2) / n).sum()) or 1.0
        m = 1.0 - float(sums["res"].sum()) / ss_tot
    if not math.isfinite(value):
        m = float("nan")
    return {"loss": value, _metric_name(data.task): m, "metric": m}


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    # the fused kernels update every tensor in one call; on CPU the default per-tensor loop was the
    # largest single cost of a small net's training step (scripts/bench_train_loop.py)
    params = list(model.parameters())
    for fused in (True, False):
        kw: dict[str, Any] = {"fused": True} if fused else {}
        try:
            if recipe.optimizer == "adam":
                return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **kw)
            return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, **kw)
        except (RuntimeError, ValueError, TypeError):  # a device or dtype without a fused kernel
            continue
    raise AssertionError("unreachable")


def train(model: nn.Module, data: Dataset | StreamedDataset, recipe: Recipe, *, loss: LossFn | None = None,
          metric: MetricFn | None = None, maximize: bool = True) -> TrainResult:
    """Train ``model`` in place on the training split; keeps the weights of the best validation epoch
    when ``patience`` is set. Seeded and deterministic on CPU; runs on the model's device (put it on
    CUDA to train there; batches of streamed data follow it). In-memory and streamed data see the
    same seeded permutation per epoch, so the same batches and the same FLOPs.
    Raises ``TrainingDiverged`` on a NaN/inf loss. Trains on the one thread count of ``core/threads.py``
    (``GrowthTree(threads=)``, the CLI's ``--threads``, ``$DILS_NUM_THREADS``, else 1).

    ``loss`` and ``metric`` (see ``LossFn``/``MetricFn``) replace the task's own; ``maximize=False``
    makes a lower validation metric the better one. The FLOPs count does not depend on them."""
    start = time.perf_counter()
    set_threads()  # the one thread setting (core/threads.py): --threads, GrowthTree(threads=), DILS_NUM_THREADS or 1
    device = next(model.parameters()).device
    if isinstance(data, Dataset):
        data = data.to(device)  # once, not per epoch (a no-op when it is there already)
    n = data.size("train")
    bs = min(recipe.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    warmup_steps = int(recipe.rewarmup_epochs * steps_per_epoch)
    cosine = recipe.schedule == "cosine"
    decay_steps = max(1, recipe.epochs * steps_per_epoch - warmup_steps)
    opt = _optimizer(model, recipe)
    params = [p for group in opt.param_groups for p in group["params"]]
    gen = torch.Generator().manual_seed(recipe.seed)
    fwd = forward_flops(model.spec)  # type: ignore[attr-defined, arg-type]
    history: list[dict[str, float]] = []
    sign = 1.0 if maximize else -1.0  # best-epoch selection compares sign * metric
    best_metric, best_epoch, best_state = -math.inf * sign, 0, None
    seen = 0
    step = 0
    epochs_run = 0
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = torch.zeros((), device=device)
        for xb, yb in data.batches("train", bs, order=perm, device=device):
            if warmup_steps and step < warmup_steps:
                for group in opt.param_groups:
                    group["lr"] = recipe.lr * (step + 1) / warmup_steps
            elif cosine:
                for group in opt.param_groups:
                    group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / decay_steps))
            out = model(xb)
            batch_loss = loss(out, yb) if loss is not None else _loss(data.task, out, yb)
            for p in params:  # Optimizer.zero_grad goes through a torch.compile guard on every call
                p.grad = None
            batch_loss.backward()
            opt.step()
            total.add_(batch_loss.detach(), alpha=xb.shape[0])
            step += 1
        seen += n
        epochs_run = epoch
        train_loss = float(total) / n
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} at epoch {epoch} (lr={recipe.lr})")
        val = evaluate_split(model, data, "val", loss=loss, metric=metric)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_metric": val["metric"]})
        if sign * val["metric"] > sign * best_metric:
            best_metric, best_epoch = val["metric"], epoch
            if recipe.patience is not None:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif recipe.patience is not None and epoch - best_epoch >= recipe.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if not history:
        best_metric = evaluate_split(model, data, "val", loss=loss, metric=metric)["metric"]
    elif recipe.patience is None:
        best_metric = history[-1]["val_metric"]
    return TrainResult(
        epochs_run=epochs_run,
        samples_seen=seen,
        flops=3 * fwd * seen,
        seconds=time.perf_counter() - start,
        val_metric=float(best_metric),
        best_epoch=best_epoch,
        history=history,
    )
