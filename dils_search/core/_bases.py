"""dils-analytic's closed forms: the new layer's rows, and the next layer from them.

Private to ``grow``. A basis is a set of rows ``A`` and a shift ``c`` such that the activation acts
linearly on ``A u + c`` for the calibration data (or for every input). When the rows span the
whole input, ``u = decoder (g - offset)`` and the next layer has an exact closed form; otherwise it
is re-solved by ridge least squares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .model import Head
from .spec import Spec, family_of

__all__ = ["REACH", "Rows", "adjusted", "calib_ball", "candidate_rows", "channels_last", "closed_form_applies", "closed_form_next",
           "conv_rows", "dense_rows", "fit"]

_SHIFTABLE = ("relu", "leaky_relu", "gelu")  # act(z) ~= z once z is shifted far enough right


def channels_last(u: torch.Tensor) -> torch.Tensor:
    """(N, C, *L) -> (N*L, C); (N, C) unchanged: every spatial location is a sample."""
    if u.dim() == 2:
        return u
    return u.movedim(1, -1).reshape(-1, u.shape[1])


def _ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``y ~ x w^T + b`` with a relative ridge on ``w`` (float64)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = ridge * max(float(torch.diagonal(gram).mean()), 1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram + lam * eye, xc.T @ yc).T
    return w, my - w @ mx


_RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def fit(x: torch.Tensor, y: torch.Tensor, ridge: float, samples: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge fit of the next layer plus a score that ranks candidate bases: the residual on the last
    20% of the calibration samples when fitted on the first 80%.

    When the design has more than a tenth as many features as there are calibration samples (a
    flattened head, say) least squares interpolates the calibration data, so the ridge is then
    chosen on that split as well. Rows are grouped by sample, ``x.shape[0] // samples`` each.
    """
    x, y = x.double(), y.double()
    if samples < 10:
        w, b = _ridge(x, y, ridge)
        return w, b, float(torch.linalg.vector_norm(x @ w.T + b - y))
    cut = (samples * 4 // 5) * (x.shape[0] // samples)
    wide = 10 * x.shape[1] > samples
    best: tuple[float, float] | None = None
    for lam in (ridge, *(_RIDGE_GRID if wide else ())):
        w, b = _ridge(x[:cut], y[:cut], lam)
        score = float(torch.linalg.vector_norm(x[cut:] @ w.T + b - y[cut:]))
        if best is None or score < best[0]:
            best = (score, lam)
    assert best is not None
    w, b = _ridge(x, y, best[1])
    return w, b, best[0]


@dataclass
class Rows:
    """The new layer's first ``r`` units are ``act(gain * (rows @ u + shift))``; ``basis`` names the
    construction.

    ``decoder``/``offset`` are set when the rows span the whole input and the activation acts
    linearly on them: then ``u = decoder @ (h - offset)``, ``h`` the block's output, and the next
    layer has a closed form that holds off the calibration data too. ``centre`` and ``gain`` become
    the block's ``offset`` and ``scale`` buffers (``core/model.Dense``; None: 0 and 1).
    """

    rows: torch.Tensor  # (r, d) float64
    shift: torch.Tensor  # (r,)
    basis: str
    decoder: torch.Tensor | None = None  # (d, r)
    offset: torch.Tensor | None = None  # (r,)
    centre: torch.Tensor | None = None  # (r,): what the new block subtracts after its activation (Dense.offset)
    gain: torch.Tensor | None = None  # (r,): the block's fixed factor before the activation (Dense.scale)

    def with_gain(self) -> Rows:
        """These rows with each row's norm moved into ``gain``: unit rows and a tiny fixed gain instead
        of rows scaled into tanh's or sigmoid's linear range. The block divides its output by the gain
        again, so the function is the same, and neither the new layer's weights (tiny) nor the next
        layer's (huge, to undo them) are out of scale for the optimizer's steps."""
        gain = self.rows.norm(dim=1).clamp_min(1e-30)
        decoder = None if self.decoder is None else self.decoder * gain
        offset = None if self.offset is None else self.offset / gain
        return replace(self, rows=self.rows / gain.unsqueeze(1), shift=self.shift / gain, decoder=decoder,
                       offset=offset, gain=gain)

    def recentred(self, spec: Spec) -> Rows:
        """These rows with the constant their units output on the activation's linear range,
        ``act(gain * shift) ~= beta + alpha * gain * shift``, moved into ``centre``: the block subtracts
        it, so the next layer sees ``alpha * rows @ u`` (no common mode) and the decoder needs no offset."""
        alpha, beta = _LINEARISED[spec.activation]
        gain = self.gain if self.gain is not None else torch.ones_like(self.shift)
        centre = beta + alpha * gain * self.shift
        return replace(self, centre=centre, offset=None if self.offset is None else torch.zeros_like(self.offset))


# act(z) ~= alpha * z + beta where dils-analytic puts z (shifted right, or scaled near 0)
_LINEARISED = {"relu": (1.0, 0.0), "leaky_relu": (1.0, 0.0), "gelu": (1.0, 0.0), "tanh": (1.0, 0.0), "sigmoid": (0.25, 0.5)}
_PAIR_GAIN = {"relu": 1.0, "gelu": 1.0, "leaky_relu": 1.01}  # act(z) - act(-z) == gain * z
_SPAN_FLOOR = 0.05  # a direction nearly constant on the calibration data is scaled like 5% of the widest one
REACH = 2.0  # principal bases are linear within REACH x the calibration radius of the calibration mean


def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64)


def _sign_fixed(vh: torch.Tensor) -> torch.Tensor:
    """Each row's largest-magnitude entry made positive (the first such entry on a tie), so the
    basis does not depend on the sign a solver happens to return."""
    lead = vh.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vh.gather(1, lead))
    return vh * torch.where(sign == 0, torch.ones_like(sign), sign)


def _principal(x: torch.Tensor, centred: bool, complete: bool = False) -> tuple[torch.Tensor, int]:
    """Right singular vectors of the calibration rows (as rows, signs fixed; all ``d`` of them if
    ``complete``) and their numerical rank."""
    if centred:
        x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    vh = _sign_fixed(vh)
    top = float(s[0]) if s.numel() else 0.0
    rank = int((s > top * 1e-6).sum()) if top > 0 else 0
    d = x.shape[1]
    if complete and vh.shape[0] < d:  # fewer samples than features: extend to an orthonormal basis
        q, _ = torch.linalg.qr(torch.cat([vh.T, torch.eye(d, dtype=vh.dtype)], dim=1))
        vh = torch.cat([vh, _sign_fixed(q[:, vh.shape[0] :].T)])
    return vh, rank


def calib_ball(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The centre (calibration mean) and radius ``REACH * max ||x_i - mean||`` of the ball on which
    the principal bases are linear."""
    centre = x.mean(0)
    return centre, REACH * float((x - centre).norm(dim=1).max()) + 1e-12


def _linear_decoder(spec: Spec, rows: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For square invertible ``rows``: ``u = decoder @ (act(rows @ u + shift) - offset)`` where act is linear."""
    alpha, beta = _LINEARISED[spec.activation]
    return torch.linalg.inv(rows) / alpha, beta + alpha * shift


def _principal_rows(spec: Spec, x: torch.Tensor, m: int, half_range: float, shift_free: bool) -> Rows:
    """Centred principal directions (all ``d`` when ``m >= d``, else the top ``min(m, rank)``) made to
    act linearly on the ball ``||u - centre|| <= radius`` (``calib_ball``): shifted by the radius
    (ReLU family) or scaled so the ball maps into ``[-half_range, half_range]`` (tanh/sigmoid; tanh
    without a shift when ``shift_free``).

    The rows are orthonormal, so ``|v . (u - centre)| <= ||u - centre||`` for every row ``v``: the
    ball, and so the guarantee, is the same whatever basis the solver returns (order, signs, and
    directions the calibration data barely spans)."""
    d = x.shape[1]
    complete = m >= d
    vh, rank = _principal(x, centred=True, complete=complete)
    rows = vh if complete else vh[: max(1, min(m, rank))]
    centre, radius = calib_ball(x)
    if spec.activation in _SHIFTABLE:
        # GELU(z) ~= z needs z >= ~6 (relative error < 1e-8 there)
        shift = radius + (6.0 if spec.activation == "gelu" else 0.0) - rows @ centre
        basis = "principal+shift"
    elif shift_free and spec.activation == "tanh":  # tanh(0) == 0: zero padding stays consistent
        rows = rows * (half_range / (radius + float(centre.norm())))  # the ball lies in this one around 0
        shift = _zeros(rows.shape[0])
        basis = "principal+scale"
    else:
        rows = rows * (half_range / radius)
        shift = -(rows @ centre)
        basis = "principal+scale"
    if not complete:
        return Rows(rows, shift, basis)
    return Rows(rows, shift, basis, *_linear_decoder(spec, rows, shift))


def target_rows(spec: Spec, x: torch.Tensor, w: torch.Tensor, m: int, half_range: float) -> Rows | None:
    """Reduced-rank regression rows for a narrow layer before a dense map ``W``: the top ``m`` right
    singular directions ``Q_m`` of the next layer's centred calibration pre-activation ``(x - mean) W^T``,
    pulled back to rows ``Q_m^T W``. Among all ``m``-unit linear bottlenecks they lose the least of that
    pre-activation (Eckart-Young on the target, not on the representation), and they lose none when
    ``m`` reaches its rank (at most ``W``'s row count). Made linear on the calibration ball like the
    principal rows, with each row's reach ``|a| * radius``."""
    centre, radius = calib_ball(x)
    w = w.double().reshape(w.shape[0], -1)
    if w.shape[1] != x.shape[1]:
        return None  # not a dense map of this representation (a conv's taps, a flattened head)
    _, s, qh = torch.linalg.svd((x - centre) @ w.T, full_matrices=False)
    top = float(s[0]) if s.numel() else 0.0
    rank = int((s > top * 1e-6).sum()) if top > 0 else 0
    if rank == 0:
        return None
    rows = _sign_fixed(qh[: min(m, rank)]) @ w
    reach = rows.norm(dim=1) * radius
    if spec.activation in _SHIFTABLE:
        shift = reach + (6.0 if spec.activation == "gelu" else 0.0) - rows @ centre
        return Rows(rows, shift, "target+shift")
    rows = rows * (half_range / reach.clamp_min(1e-30)).unsqueeze(1)
    return Rows(rows, -(rows @ centre), "target+scale")


def _scaled_channel_rows(spec: Spec, x: torch.Tensor, half_range: float) -> Rows:
    """Each input channel scaled into tanh's/sigmoid's near-linear region (tanh without a shift)."""
    lo, hi = x.min(0).values, x.max(0).values
    if spec.activation == "tanh":
        reach = torch.maximum(hi.abs(), lo.abs())
        scale = half_range / reach.clamp_min(_SPAN_FLOOR * float(reach.max()) + 1e-12)
        shift = _zeros(x.shape[1])
    else:
        span = hi - lo
        scale = 2 * half_range / span.clamp_min(_SPAN_FLOOR * float(span.max()) + 1e-12)
        shift = -(hi + lo) / 2 * scale
    rows = torch.diag(scale)
    return Rows(rows, shift, "channel+scale", *_linear_decoder(spec, rows, shift))


def _plus_minus_rows(spec: Spec, x: torch.Tensor) -> Rows:
    """``[V; -V]`` for a complete orthonormal ``V``: ``act(Vu) - act(-Vu) = gain * Vu`` for every ``u``."""
    vh, _ = _principal(x, centred=False, complete=True)
    rows = torch.cat([vh, -vh])
    decoder = torch.cat([vh.T, -vh.T], dim=1) / _PAIR_GAIN[spec.activation]
    return Rows(rows, _zeros(rows.shape[0]), "plus-minus", decoder, _zeros(rows.shape[0]))


def _signed_rows(spec: Spec, x: torch.Tensor, m: int) -> Rows | None:
    """Shift-free rows from the uncentred principal directions: one unit for a direction that is
    one-signed on the data (ReLU/leaky ReLU pass it unchanged), a +-pair otherwise."""
    vh, rank = _principal(x, centred=False)
    z = x @ vh[:rank].T
    rows: list[torch.Tensor] = []
    for k in range(rank):
        lo, hi = float(z[:, k].min()), float(z[:, k].max())
        if spec.activation != "gelu" and (lo >= 0 or hi <= 0):
            if len(rows) + 1 > m:
                break
            rows.append(vh[k] if lo >= 0 else -vh[k])
        elif len(rows) + 2 <= m:
            rows.extend([vh[k], -vh[k]])
        else:
            break
    if not rows:
        return None
    return Rows(torch.stack(rows), _zeros(len(rows)), "signed-principal")


def _channel_subset_rows(x: torch.Tensor, m: int) -> Rows:
    """``m`` input channels picked by pivoted QR (the most linearly independent ones): shift-free
    on non-negative inputs."""
    import scipy.linalg

    _, _, piv = scipy.linalg.qr((x - x.mean(0)).numpy(), mode="economic", pivoting=True)
    keep = sorted(int(i) for i in piv[:m])
    return Rows(torch.eye(x.shape[1], dtype=torch.float64)[keep], _zeros(len(keep)), "channel-subset")


def candidate_rows(spec: Spec, u: torch.Tensor, m: int, linear_range: float, recentre: bool = True,
                   gain: bool = True) -> list[Rows]:
    """dils-analytic's choices for the new layer's rows, best first: the spec's family picks them
    (``dense_rows`` for MLPs, ``conv_rows`` for CNNs) from the calibration data entering the new
    layer, one row per sample and location. The caller uses the first one with an exact closed
    form, otherwise the one whose least-squares fit leaves the smallest calibration residual.
    Each candidate is ``adjusted`` (with ``gain`` and ``recentre``).
    """
    rows = family_of(spec).candidate_rows(spec, channels_last(u).double().cpu(), m, linear_range)
    return [adjusted(spec, r, recentre, gain) for r in rows]


def adjusted(spec: Spec, rows: Rows, recentre: bool = True, gain: bool = True) -> Rows:
    """``rows`` as the block holds them: with ``gain``, the linear-range scale of tanh/sigmoid rows
    moved into a gain (``Rows.with_gain``); with ``recentre``, the constant output into the offset."""
    if gain and spec.activation not in _SHIFTABLE:
        rows = rows.with_gain()
    return rows.recentred(spec) if recentre else rows


def dense_rows(spec: Spec, x: torch.Tensor, m: int, linear_range: float) -> list[Rows]:
    """MLPs follow the design text: centred principal directions, shifted to be non-negative (or
    scaled into tanh's/sigmoid's linear range). The shift-free bases come first when they apply:
    they are exact for every input, not only near the calibration data, and carry no large bias
    that makes fine-tuning fragile."""
    return [*_exact_rows(spec, x, m), _principal_rows(spec, x, m, linear_range, shift_free=False)]


def _exact_rows(spec: Spec, x: torch.Tensor, m: int) -> list[Rows]:
    """The shift-free bases exact for every input: +-principal pairs (width >= 2 * channels), then the
    channel basis of non-negative inputs under a ReLU (width >= channels)."""
    d = x.shape[1]
    out: list[Rows] = []
    if spec.activation in _SHIFTABLE and m >= 2 * d:  # first: every unit carries signal (the channel
        out.append(_plus_minus_rows(spec, x))  # basis leaves m - d units with zero outgoing weights)
    if spec.activation in ("relu", "leaky_relu") and float(x.min()) >= 0 and m >= d:
        eye = torch.eye(d, dtype=torch.float64)
        out.append(Rows(eye, _zeros(d), "channel", eye, _zeros(d)))
    return out


def conv_rows(spec: Spec, x: torch.Tensor, m: int, linear_range: float) -> list[Rows]:
    """A convolution must also keep the next layer's zero padding consistent, which a shift breaks,
    so shift-free bases come first: the channel basis on non-negative inputs (width >= channels),
    +-principal pairs (width >= 2 * channels), signed principal directions, a channel subset,
    scaled channels for tanh/sigmoid; shift-free scaled principal directions last."""
    act = spec.activation
    d = x.shape[1]
    out = _exact_rows(spec, x, m)
    nonneg = float(x.min()) >= 0
    if act in _SHIFTABLE:
        signed = _signed_rows(spec, x, m)
        if signed is not None:
            out.append(signed)
        if act in ("relu", "leaky_relu") and nonneg and m < d:
            out.append(_channel_subset_rows(x, m))
    if act in ("tanh", "sigmoid") and m >= d:
        out.append(_scaled_channel_rows(spec, x, linear_range))
    out.append(_principal_rows(spec, x, m, linear_range, shift_free=True))
    return out


def closed_form_applies(next_mod: nn.Module, rows: Rows) -> bool:
    """Whether ``u = decoder @ (g - offset)`` carries through the next layer unchanged: a conv pads
    with zeros, so it needs ``offset == 0``; max pooling commutes only with a positive diagonal map."""
    if rows.decoder is None or rows.offset is None:
        return False
    if isinstance(next_mod, Head):
        if next_mod.pooling != "max":
            return True
        dec = rows.decoder
        return dec.shape[0] == dec.shape[1] and bool((dec - torch.diag(torch.diagonal(dec))).abs().max() == 0) and bool(
            (torch.diagonal(dec) > 0).all()
        )
    if isinstance(next_mod.affine, nn.Linear):
        return True
    return bool(rows.offset.abs().max() == 0)


def closed_form_next(next_mod: nn.Module, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The next layer's weight (on the first ``r`` channels) and bias from ``u = decoder @ (g - offset)``."""
    assert rows.decoder is not None and rows.offset is not None
    affine: Any = next_mod.affine
    w, b = affine.weight.detach().double().cpu(), affine.bias.detach().double().cpu()
    dec, off = rows.decoder, rows.offset
    if isinstance(next_mod, Head) and next_mod.locations > 1:  # flatten: (out, d * L), channel-major
        w = w.reshape(w.shape[0], dec.shape[0], next_mod.locations)
        w_new = torch.einsum("odl,dr->orl", w, dec)
        return w_new.reshape(w.shape[0], -1), b - torch.einsum("orl,r->o", w_new, off)
    w_new = torch.einsum("od...,dr->or...", w, dec)
    taps = w_new.flatten(2).sum(2) if w_new.dim() > 2 else w_new
    return w_new.reshape(w_new.shape[0], -1), b - taps @ off
