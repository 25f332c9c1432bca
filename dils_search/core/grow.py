"""Insert a hidden layer so that the deeper network inherits what the shallower one knew.

``grow(model, step, calib)`` never touches the parent. The new model's ``growth_info`` says
what was done and how well the function was preserved on the calibration data.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from . import defaults
from ._bases import (
    Rows,
    adjusted,
    candidate_rows,
    channels_last,
    closed_form_applies,
    closed_form_next,
    fit,
    target_rows,
)
from .inits import allowed_inits, init_method
from .model import Dense, GrowableNet, Head, Residual, make_block
from .spec import GrowthStep, Spec, check_step, forward_flops, stream_widths

__all__ = ["GrowthStep", "GrowOptions", "GrowthInfo", "grow", "check_step", "allowed_inits", "output_gap"]

_APPROX_INITS = ("dils-analytic", "random")


@dataclass(frozen=True)
class GrowOptions:
    """Knobs of the init methods. Defaults suit calibration sets of 512-4096 samples.

    ``linear_range``: dils-analytic scales tanh/sigmoid pre-activations into ``[-linear_range,
    linear_range]``, where they are linear to about ``linear_range**2 / 3`` (relative). The defaults
    shared with ``GrowConfig`` live in ``core/defaults.py``.
    """

    ridge: float = defaults.RIDGE
    approx_tol: float = defaults.APPROX_TOL
    approx_epochs: int = defaults.APPROX_EPOCHS  # 200 before it was shared with GrowConfig (core/defaults.py)
    approx_lr: float = 3e-3
    approx_init: str = "dils-analytic"
    linear_range: float = 0.01
    recentre: bool = True
    target_basis: bool = True
    fresh_scale: bool = True
    gain: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.approx_init not in _APPROX_INITS:
            raise InputError(f"approx_init={self.approx_init!r} is unknown; allowed: {', '.join(_APPROX_INITS)}")
        if not self.ridge >= 0:
            raise InputError(f"ridge={self.ridge!r} must be >= 0")
        if not self.approx_tol > 0:
            raise InputError(f"approx_tol={self.approx_tol!r} must be > 0")
        if self.approx_epochs < 0:
            raise InputError(f"approx_epochs={self.approx_epochs!r} must be >= 0")
        if not 0 < self.linear_range <= 1:
            raise InputError(f"linear_range={self.linear_range!r} must be in (0, 1]")
        if not self.approx_lr > 0:
            raise InputError(f"approx_lr={self.approx_lr!r} must be > 0")


@dataclass
class GrowthInfo:
    """What an insertion did: ``calib_gap`` is RMS(new - old) / RMS(old) of the next layer's pre-activation."""

    step: GrowthStep
    calib_gap: float
    flops: int
    seconds: float
    basis: str = ""
    approx_epochs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["step"] = self.step.to_dict()
        return out


def _incoming(spec: Spec, position: int) -> int:
    return stream_widths(spec)[position]


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's CPU generator for the block, leaving the global RNG state as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _set_affine(affine: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        affine.weight.copy_(weight.to(affine.weight.dtype))
        if bias is not None and affine.bias is not None:
            affine.bias.copy_(bias.to(affine.bias.dtype))


def _center_tap(affine: Any, rows: torch.Tensor) -> torch.Tensor:
    """Weight rows for ``affine``: a conv kernel whose only non-zero tap is the centre, or ``rows``."""
    if isinstance(affine, nn.Linear):
        return rows
    k = tuple(affine.kernel_size)
    w = torch.zeros(rows.shape[0], rows.shape[1], *k, dtype=rows.dtype)
    w[(slice(None), slice(None), *(s // 2 for s in k))] = rows
    return w


def _identity_bn(norm: Any, pre: torch.Tensor, gain: torch.Tensor | None = None) -> None:
    """Set BatchNorm from calibration statistics so that in eval mode it is the identity, or multiplies
    each channel by ``gain``."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return
    bn: Any = norm  # affine BatchNorm with running statistics, as make_block builds it
    flat = channels_last(pre.double())
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    g = torch.ones_like(mean) if gain is None else gain.double().to(mean.device)
    with torch.no_grad():
        # eval BN is (z - mean) / sqrt(var + eps) * weight + bias: these values make it gain * z exactly
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps) * g)
        bn.bias.copy_(mean * g)


def _settle_norm(block: Any, u: torch.Tensor, r: int, fresh: bool = True) -> None:
    """A new plain block's BatchNorm, set so that the block keeps its function. Its first ``r`` channels
    (the inherited rows) are first scaled to the weight RMS of a freshly initialised layer, which
    BatchNorm makes free: Adam's steps, about ``lr`` per weight whatever its size, then move them at
    the pace of a fresh layer instead of ``1 / (3 fan_in) ** 0.5`` times slower (a Dirac kernel's
    centre is 1). docs/inheritance.md has the measurement."""
    if not isinstance(block.norm, nn.modules.batchnorm._BatchNorm):
        return
    affine = block.affine
    with torch.no_grad():
        w = affine.weight
        target = (3 * w[0].numel()) ** -0.5  # PyTorch's default init: uniform(+-1/sqrt(fan_in))
        rms = w.flatten(1).pow(2).mean(1).sqrt()
        scale = torch.ones_like(rms)
        if fresh:
            scale[:r] = torch.where(rms[:r] > 0, target / rms[:r].clamp_min(1e-30), 1.0)
        w.mul_(scale.view(-1, *(1,) * (w.dim() - 1)))
        affine.bias.mul_(scale)
        _identity_bn(block.norm, affine(u), 1.0 / scale)


def _design(next_mod: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """The inputs the next affine map sees, one row per output location: (rows, features)."""
    if isinstance(next_mod, Head):
        return next_mod.pool(g)
    affine = _affine(next_mod)
    if isinstance(affine, nn.Linear):
        return g
    k = affine.kernel_size
    if g.dim() == 3:  # 1-D conv: unfold as a 1 x L image
        cols = F.unfold(g.unsqueeze(2), (1, k[0]), padding=(0, k[0] // 2))
    else:
        cols = F.unfold(g, k, padding=tuple(s // 2 for s in k))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _affine(mod: nn.Module) -> Any:
    """The affine map (``nn.Linear`` or ``nn.Conv1d``/``nn.Conv2d``) of a hidden block or the head."""
    return mod.affine


def _target_rows(t: torch.Tensor) -> torch.Tensor:
    return channels_last(t)


def _next_pre(next_mod: Any, u: torch.Tensor) -> torch.Tensor:
    return next_mod.pre(u)


def _embed_weight(next_mod: nn.Module, w_r: torch.Tensor, r: int, m: int) -> torch.Tensor:
    """Map a weight solved on the first ``r`` channels to the full next-layer weight (zeros elsewhere)."""
    affine = _affine(next_mod)
    out = w_r.shape[0]
    if isinstance(next_mod, Head) and next_mod.locations > 1:
        per = next_mod.locations
        full = torch.zeros(out, m, per, dtype=w_r.dtype)
        full[:, :r] = w_r.reshape(out, r, per)
        return full.reshape(out, m * per)
    if isinstance(affine, nn.Linear):
        full = torch.zeros(out, m, dtype=w_r.dtype)
        full[:, :r] = w_r
        return full
    k = tuple(affine.kernel_size)
    full = torch.zeros(out, m, *k, dtype=w_r.dtype)
    full[:, :r] = w_r.reshape(out, r, *k)
    return full


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-30))


# --------------------------------------------------------------------------- the built-in init methods (see core/inits.py)


InitFn = Callable[[GrowableNet, nn.Module, int, GrowthStep, torch.Tensor, GrowOptions, dict[str, Any]], None]


def _plain_next(new: GrowableNet, p: int) -> nn.Module:
    return new.blocks[p + 1] if p + 1 < len(new.blocks) else new.head


def _fresh_next(next_mod: nn.Module, m: int) -> None:
    """Replace the next affine map by a freshly initialised one that takes ``m`` channels."""
    next_mod.affine = _resized(next_mod, m)


def _init_identity(new: GrowableNet, block: Any, p: int, step: GrowthStep, u: torch.Tensor, opt: GrowOptions, info: dict[str, Any]) -> None:
    d = u.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    _set_affine(block.affine, _center_tap(block.affine, eye), torch.zeros(d))
    _settle_norm(block, u, d, opt.fresh_scale)
    info["basis"] = "dirac" if u.dim() > 2 else "identity"


def _init_zero(new: GrowableNet, block: Any, p: int, step: GrowthStep, u: torch.Tensor, opt: GrowOptions, info: dict[str, Any]) -> None:
    with torch.no_grad():
        block.out.weight.zero_()
        block.out.bias.zero_()
        _identity_bn(block.norm, block.inner(u))
    info["basis"] = "zero-output"


def _init_random(new: GrowableNet, block: Any, p: int, step: GrowthStep, u: torch.Tensor, opt: GrowOptions, info: dict[str, Any]) -> None:
    if isinstance(block, Dense):
        _fresh_next(_plain_next(new, p), step.width)
    info["basis"] = "kaiming-uniform"


def _set_rows(block: Any, rows: Rows) -> None:
    """The first ``r`` units of ``block`` (its affine map, or a residual block's inner map) from ``rows``,
    and, for a plain block, their ``offset`` and ``scale`` from ``rows.centre`` and ``rows.gain`` (the
    other units' are 0 and 1)."""
    affine: Any = block.affine if isinstance(block, Dense) else block.inner
    r = rows.rows.shape[0]
    w = affine.weight.detach().double().cpu().clone()
    bias = affine.bias.detach().double().cpu().clone()
    w[:r] = _center_tap(affine, rows.rows)
    bias[:r] = rows.shift
    _set_affine(affine, w, bias)
    if isinstance(block, Dense):
        offset = torch.zeros(block.offset.shape[0], dtype=torch.float64)
        scale = torch.ones(block.scale.shape[0], dtype=torch.float64)
        if rows.centre is not None:
            offset[:r] = rows.centre
        if rows.gain is not None:
            scale[:r] = rows.gain
        with torch.no_grad():
            block.offset.copy_(offset.to(block.offset.dtype))
            block.scale.copy_(scale.to(block.scale.dtype))


def _init_analytic(new: GrowableNet, block: Any, p: int, step: GrowthStep, u: torch.Tensor, opt: GrowOptions, info: dict[str, Any]) -> None:
    spec = new.spec
    m = step.width
    candidates = candidate_rows(spec, u, m, opt.linear_range, opt.recentre, opt.gain)
    next_mod = _plain_next(new, p)
    if opt.target_basis and spec.kind == "mlp" and m < u.shape[1] and not isinstance(block, Residual):
        rows_t = target_rows(spec, channels_last(u).double().cpu(), _affine(next_mod).weight.detach().cpu(), m, opt.linear_range)
        if rows_t is not None:
            candidates.append(adjusted(spec, rows_t, opt.recentre, opt.gain))
    if isinstance(block, Residual):
        _set_rows(block, candidates[0])
        _init_zero(new, block, p, step, u, opt, info)
        info["basis"] = candidates[0].basis + "+zero-output"
        return
    affine = _affine(block)
    random_rows = affine.weight.detach().clone(), affine.bias.detach().clone()
    best: tuple[float, Rows, torch.Tensor, torch.Tensor] | None = None
    exact = next((c for c in candidates if closed_form_applies(next_mod, c)), None)
    if exact is not None:
        w_r, b = closed_form_next(next_mod, exact)
        best = (0.0, exact, w_r, b)
    else:
        y = _target_rows(info["target"]).double()
        for rows in candidates:
            with torch.no_grad():
                _set_affine(affine, *random_rows)
                _set_rows(block, rows)
                _settle_norm(block, u, rows.rows.shape[0], opt.fresh_scale)
                g = block(u)
            x = _design(next_mod, g[:, : rows.rows.shape[0]])
            w_r, b, residual = fit(x, y, opt.ridge, u.shape[0])
            w_r, b = w_r.cpu(), b.cpu()
            if best is None or residual < best[0]:
                best = (residual, rows, w_r, b)
    assert best is not None
    _, rows, w_r, b = best
    with torch.no_grad():
        _set_affine(affine, *random_rows)
        _set_rows(block, rows)
    _settle_norm(block, u, rows.rows.shape[0], opt.fresh_scale)
    new_aff = _resized(next_mod, m)
    _set_affine(new_aff, _embed_weight(next_mod, w_r, rows.rows.shape[0], m), b)
    next_mod.affine = new_aff
    info["basis"] = rows.basis


def _resized(next_mod: nn.Module, m: int) -> nn.Module:
    """A freshly initialised copy of the next affine map that takes ``m`` channels."""
    affine = _affine(next_mod)
    like = {"device": affine.weight.device, "dtype": affine.weight.dtype}
    if isinstance(affine, nn.Linear):
        per = next_mod.locations if isinstance(next_mod, Head) else 1
        return nn.Linear(m * per, affine.out_features).to(**like)
    return type(affine)(m, affine.out_channels, affine.kernel_size, padding=affine.padding).to(**like)


def _init_approx(new: GrowableNet, block: Any, p: int, step: GrowthStep, u: torch.Tensor, opt: GrowOptions, info: dict[str, Any]) -> None:
    """dils-approx: start from dils-analytic (or random), then fit the new block and the next
    affine map to the old pre-activation by gradient descent, every old parameter frozen."""
    if opt.approx_init == "dils-analytic":
        _init_analytic(new, block, p, step, u, opt, info)
    else:
        _init_random(new, block, p, step, u, opt, info)
    if isinstance(block, Residual):
        info["approx_epochs"] = 0  # exact already: u + 0
        return
    next_mod: Any = _plain_next(new, p)
    params = list(block.parameters()) + list(next_mod.affine.parameters())
    block.eval()
    x = u
    tt = info["target"]

    def predict(v: torch.Tensor) -> torch.Tensor:
        return next_mod.pre(block(v))

    scale = float(tt.pow(2).mean()) or 1.0
    optim = torch.optim.Adam(params, lr=opt.approx_lr)
    n = x.shape[0]
    bs = min(256, n)
    epochs = 0

    def rel() -> float:
        with torch.no_grad():
            return _rel_rms(predict(x), tt)

    err = rel()
    best = (err, copy.deepcopy(block.state_dict()), copy.deepcopy(next_mod.affine.state_dict()))
    while err > opt.approx_tol and epochs < opt.approx_epochs:
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            loss = F.mse_loss(predict(x[idx]), tt[idx]) / scale
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
        epochs += 1
        err = rel()
        if err < best[0]:
            best = (err, copy.deepcopy(block.state_dict()), copy.deepcopy(next_mod.affine.state_dict()))
    block.load_state_dict(best[1])
    next_mod.affine.load_state_dict(best[2])
    info["approx_epochs"] = epochs
    info["basis"] = f"{info.get('basis', '')}+sgd"


def grow(model: GrowableNet, step: GrowthStep, calib: torch.Tensor, options: GrowOptions | None = None) -> GrowableNet:
    """A deeper copy of ``model`` with a new hidden layer at ``step.position``; ``model`` is untouched.

    ``calib`` is a batch of training inputs (512-4096 samples suit). Raises ``ValueError`` if the
    step is impossible for the model's spec (see ``check_step``).
    """
    opt = options or GrowOptions()
    spec: Spec = model.spec
    check_step(spec, step)
    start = time.perf_counter()
    p = step.position
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    parent_training = model.training
    calib = calib.to(device=device, dtype=dtype) if calib.is_floating_point() else calib.to(device)
    new_spec = step.inserted_into(spec)
    try:
        # eval mode: BatchNorm must neither use batch statistics nor update the parent's running stats
        model.eval()
        new = copy.deepcopy(model)
        with _seeded(opt.seed):
            block = make_block(new_spec, p, _incoming(spec, p)).to(device=device, dtype=dtype)
            new.blocks.insert(p, block)
            new.spec = new_spec
            with torch.no_grad():
                u = new.features(calib, p).detach()
                next_mod = _plain_next(new, p)
                t = _next_pre(next_mod, u).detach() if not spec.residual else None
            info: dict[str, Any] = {"target": t}
            init_method(step.init).function()(new, block, p, step, u, opt, info)
        new.eval()
        with torch.no_grad():
            if spec.residual:
                gap = _rel_rms(new(calib), model(calib))
            else:
                gap = _rel_rms(_next_pre(_plain_next(new, p), new.blocks[p](u)), t)  # type: ignore[arg-type]
    finally:
        model.train(parent_training)
    n = calib.shape[0]
    flops = n * forward_flops(spec) + n * forward_flops(new_spec) * (1 + 3 * int(info.get("approx_epochs", 0)))
    new.train(parent_training)
    new.growth_info = GrowthInfo(  # type: ignore[assignment]
        step=step,
        calib_gap=gap,
        flops=int(flops),
        seconds=time.perf_counter() - start,
        basis=str(info.get("basis", "")),
        approx_epochs=int(info.get("approx_epochs", 0)),
    )
    return new


def output_gap(old: nn.Module, new: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute output difference over ``x``, relative to the largest old output (eval mode)."""
    was_old, was_new = old.training, new.training
    old.eval()
    new.eval()
    with torch.inference_mode():
        a, b = old(x).double(), new(x).double()
    old.train(was_old)
    new.train(was_new)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
