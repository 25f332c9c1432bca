"""The guarantees suite: every init method x layer kind x position x width x activation x seed.

Each case grows a small seeded model (trained a few steps, then cast to float64) and checks the
guarantee its method states in docs/inheritance.md. Gaps are ``output_gap``: the largest absolute
output difference on the data, relative to the largest output; signed differences are never summed.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dils_search import ConvSpec, GrowOptions, GrowthStep, MLPSpec, build, grow, output_gap
from dils_search.core import _bases
from dils_search.core._bases import calib_ball
from dils_search.core.data import load_dataset
from dils_search.core.grow import allowed_inits, check_step
from dils_search.core.model import Head, stream_widths
from dils_search.core.train import Recipe, evaluate, train
from dils_search.registry import INITS

EXACT = 1e-4  # relative output gap the exact methods promise (float32 round-off)
APPROX_EPOCHS = 3  # epoch cap of dils-approx in the grid; a dedicated test lets it run to its tolerance
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
SEEDS = (0, 1)

# Each layer kind, with 2 hidden layers so that positions 0, 1 and 2 (= before the head) all exist.
KINDS = {
    "mlp": lambda act: MLPSpec(6, [8, 5], 3, activation=act),
    "mlp-residual": lambda act: MLPSpec(6, [8, 6], 3, activation=act, residual=True),
    "conv1d-avg": lambda act: ConvSpec(1, 2, [10], [4, 6], 3, activation=act, pooling="avg"),
    "conv1d-bn-max": lambda act: ConvSpec(1, 2, [10], [4, 6], 3, activation=act, batchnorm=True, pooling="max"),
    "conv2d-flatten": lambda act: ConvSpec(2, 1, [5, 5], [3, 5], 3, activation=act, pooling="flatten"),
    "conv2d-bn-avg": lambda act: ConvSpec(2, 1, [5, 5], [3, 5], 3, activation=act, batchnorm=True, pooling="avg"),
    "conv1d-residual-bn": lambda act: ConvSpec(1, 2, [10], [4, 3], 3, activation=act, batchnorm=True, residual=True),
}
WIDTHS = ("narrower", "equal", "wider")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """These models are tiny: one intra-op thread is many times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _width(rel: str, d: int) -> int:
    return {"narrower": d - 1, "equal": d, "wider": d + 3}[rel]


def _inputs(spec: MLPSpec | ConvSpec, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *spec.input_shape, generator=gen)
    flat = x.flatten(1)
    y = (flat[:, :3].sum(1) > 0).long() + (flat[:, 3:5].sum(1) > 0).long()
    return x, y


@functools.cache
def _case(kind: str, act: str, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model trained 30 Adam steps on tiny seeded data, in float64, with calibration and held-out inputs."""
    spec = KINDS[kind](act)
    model = build(spec, seed=seed)
    x, y = _inputs(spec, seed, 256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(30):
        idx = torch.randint(0, 256, (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib, _ = _inputs(spec, 1000 + seed, 192)
    held, _ = _inputs(spec, 2000 + seed, 192)
    return model.double(), calib.double(), held.double()


@dataclass(frozen=True)
class Expect:
    """What a case must do: refuse with a message, preserve the output exactly, or stay within a bound."""

    kind: str  # "refuse" | "exact" | "bound" | "none"
    detail: str | float = ""


# Where dils-analytic is not exact by construction (narrower than the input; some conv cases), the
# largest held-out gap measured on this suite's fixtures was 0.174 (MLP) and 1.175 (conv): see
# docs/inheritance.md. The assertions allow about 1.3x that.
ANALYTIC_BOUNDS = {"mlp": 0.25, "conv": 1.5}


def expect(method: str, kind: str, act: str, position: int, width: int) -> Expect:
    """The stated guarantee of ``method`` for one case (docs/inheritance.md, 'Guarantees')."""
    spec = KINDS[kind](act)
    if spec.residual and position == 0:
        return Expect("refuse", "position=0 is out of range")
    if width <= 0:
        return Expect("refuse", f"width={width} must be an integer > 0")
    d = stream_widths(spec)[position]
    if method == "zero":
        return Expect("exact") if spec.residual else Expect("refuse", "init='zero' needs a residual spec")
    if method == "identity":
        if spec.residual:
            return Expect("refuse", "init='identity' needs a plain spec; use zero")
        if act != "relu":
            return Expect("refuse", f"init='identity' is not exact with activation={act!r}")
        if position == 0:
            return Expect("refuse", "init='identity' is not exact at position 0")
        if width != d:
            return Expect("refuse", f"identity needs width == {d} after a ReLU layer, got width={width}")
        return Expect("exact")
    if method == "random":
        return Expect("none")
    # dils-analytic (and dils-approx, which starts from it and is never worse on calibration data)
    if spec.residual:
        return Expect("exact")  # the block's output layer is zero
    if width < d:
        return Expect("bound", ANALYTIC_BOUNDS["mlp" if isinstance(spec, MLPSpec) else "conv"])
    if isinstance(spec, MLPSpec) or _conv_exact(spec, act, position, width, d):
        return Expect("exact")
    return Expect("bound", ANALYTIC_BOUNDS["conv"])


def _conv_exact(spec: ConvSpec, act: str, position: int, width: int, d: int) -> bool:
    """Plain conv, width >= incoming channels: exact unless the head max-pools. A conv next layer pads
    with zeros, which the new block's ``offset`` keeps consistent (its output is linear in its input and
    zero at zero); max pooling commutes only with a monotone map of single channels."""
    if position == len(spec.hidden) and spec.pooling == "max":
        return act in ("tanh", "sigmoid") or (act == "relu" and position > 0)
    return True


def _grid() -> list[tuple[str, str, str, int, str, int]]:
    """Every case; the methods of one case are adjacent so that the cached parent and child are reused."""
    cases = []
    for kind, act, seed in itertools.product(KINDS, ACTIVATIONS, SEEDS):
        for position in range(len(KINDS[kind](act).hidden) + 1):
            for rel, method in itertools.product(WIDTHS, INITS.names()):
                cases.append((method, kind, act, position, rel, seed))
    return cases


def _next_affine_name(spec: MLPSpec | ConvSpec, position: int) -> str:
    """state_dict prefix of the affine map right after a new plain layer at ``position`` (in the child)."""
    return "head.affine." if position == len(spec.hidden) else f"blocks.{position + 1}.affine."


def _assert_old_parameters_kept(parent: nn.Module, child: nn.Module, position: int, method: str) -> None:
    """Every parent tensor is in the child unchanged, except the re-solved (or re-drawn) next affine map."""
    spec = parent.spec
    skip = "" if spec.residual or method in ("identity",) else _next_affine_name(spec, position)
    child_sd = child.state_dict()
    for key, value in parent.state_dict().items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            new_key = f"blocks.{int(i) + (int(i) >= position)}.{rest}"
        else:
            new_key = key
        if skip and new_key.startswith(skip):
            continue
        assert torch.equal(child_sd[new_key], value), f"{key} changed (child {new_key})"


@pytest.mark.parametrize(("method", "kind", "act", "position", "rel", "seed"), _grid())
def test_guarantee(method: str, kind: str, act: str, position: int, rel: str, seed: int) -> None:
    parent, calib, held = _case(kind, act, seed)
    spec = parent.spec
    d = stream_widths(spec)[min(position, len(spec.hidden))]
    width = _width(rel, d)
    want = expect(method, kind, act, position, width)
    step = GrowthStep(position, width, method)
    opts = GrowOptions(seed=seed, approx_epochs=APPROX_EPOCHS)
    if want.kind == "refuse":
        with pytest.raises(ValueError, match=_escape(str(want.detail))):
            grow(parent, step, calib, opts)
        return
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    child = _grown(kind, act, seed, step)

    # the parent is untouched; the child is the parent with one more hidden layer at `position`
    after = parent.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert child.spec.hidden == [*spec.hidden[:position], width, *spec.hidden[position:]]
    assert len(child.blocks) == len(parent.blocks) + 1
    _assert_old_parameters_kept(parent, child, position, method)
    assert child.growth_info.step == step

    gap_calib, gap_held = output_gap(parent, child, calib), output_gap(parent, child, held)
    if want.kind == "exact":
        assert gap_calib <= EXACT and gap_held <= EXACT, (gap_calib, gap_held, child.growth_info.basis)
    elif want.kind == "bound":
        assert gap_held <= float(want.detail), (gap_held, child.growth_info.basis)
    if method in ("dils-analytic", "dils-approx") and not spec.residual:
        # least squares with an intercept never does worse than the mean of the old pre-activation
        assert child.growth_info.calib_gap <= 1.0 + 1e-9
    if method == "dils-approx":
        info = child.growth_info
        assert info.calib_gap <= opts.approx_tol or info.approx_epochs == APPROX_EPOCHS or spec.residual
        start = _grown(kind, act, seed, GrowthStep(position, width, "dils-analytic"))
        assert info.calib_gap <= start.growth_info.calib_gap * (1 + 1e-6) + 1e-12
    if method == "random" and not spec.residual:
        # no inheritance for the new layer and the next one: the next affine map is freshly drawn
        fresh = child.state_dict()[_next_affine_name(spec, position) + "weight"]
        old = parent.state_dict()[_parent_next(spec, position)]
        assert fresh.shape != old.shape or not torch.equal(fresh, old)


@functools.lru_cache(maxsize=8)
def _grown(kind: str, act: str, seed: int, step: GrowthStep) -> nn.Module:
    """The grid's child for one case (dils-approx compares itself with the dils-analytic child)."""
    parent, calib, _ = _case(kind, act, seed)
    return grow(parent, step, calib, GrowOptions(seed=seed, approx_epochs=APPROX_EPOCHS))


def _parent_next(spec: MLPSpec | ConvSpec, position: int) -> str:
    return "head.affine.weight" if position == len(spec.hidden) else f"blocks.{position}.affine.weight"


def _escape(text: str) -> str:
    import re

    return re.escape(text)


# --------------------------------------------------------------------------- narrower than the rank


def _representation(parent: nn.Module, x: torch.Tensor, position: int) -> torch.Tensor:
    with torch.no_grad():
        return parent.features(x, position)


def _next_layer(model: nn.Module, position: int) -> nn.Module:
    return model.blocks[position] if position < len(model.blocks) else model.head


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("target_basis", [False, True])
def test_narrow_loses_only_the_discarded_energy(act: str, position: int, seed: int, target_basis: bool) -> None:
    """MLP, width r < rank. With the input's principal rows only (``target_basis=False``) the next
    pre-activation's calibration residual equals the Eckart-Young prediction ||W (I - V_r V_r^T) U_c^T||_F
    (ReLU family; tanh/sigmoid within 1%) and shrinks monotonically as r grows. With the target's
    rows too (the default) it is never above that, never below the reduced-rank optimum
    ||(I - Q_r Q_r^T) W U_c^T||_F, and zero once r reaches the next layer's rank."""
    parent, calib, _ = _case("mlp", act, seed)
    u = _representation(parent, calib, position)
    nxt = _next_layer(parent, position)
    w = nxt.affine.weight.detach()
    with torch.no_grad():
        t = nxt.pre(u)
    uc = u - u.mean(0)
    _, s, vh = torch.linalg.svd(uc, full_matrices=False)
    rank = int((s > s[0] * 1e-6).sum())
    _, st, _ = torch.linalg.svd(uc @ w.T, full_matrices=False)
    residuals, predicted, optimum = [], [], []
    for r in range(1, rank + 1):
        child = grow(parent, GrowthStep(position, r, "dils-analytic"), calib, GrowOptions(seed=seed, target_basis=target_basis))
        with torch.no_grad():
            t_new = _next_layer(child, position + 1).pre(child.blocks[position](u))
        residuals.append(float(torch.linalg.norm(t_new - t)))
        v = vh[:r]
        predicted.append(float(torch.linalg.norm(w @ (torch.eye(u.shape[1], dtype=u.dtype) - v.T @ v) @ uc.T)))
        optimum.append(float(st[r:].pow(2).sum().sqrt()))
    scale = float(torch.linalg.norm(t - t.mean(0)))
    exact_family = act in ("relu", "leaky_relu", "gelu")
    # tanh/sigmoid are linear to ~linear_range**2 = 1e-4 (relative) over the scaled range
    slack = 1e-6 if exact_family else 1e-4
    for r, (got, bound, best) in enumerate(zip(residuals, predicted, optimum, strict=True), start=1):
        assert got <= bound * (1 + 100 * slack) + slack * scale, (r, got, bound)
        if exact_family:  # the least-squares fit on a linear bottleneck cannot beat the best one
            floor = best if target_basis else bound
            assert got >= floor * (1 - 1e-6) - 1e-6 * scale, (r, got, floor)
        if target_basis and r >= len(st) and exact_family:
            assert got <= 1e-5 * scale, (r, got)
    assert residuals[-1] <= 1e-4 * scale
    if not target_basis:
        tol = 1e-6 * scale if exact_family else 1e-3 * scale
        assert all(b <= a + tol for a, b in itertools.pairwise(residuals)), residuals


@functools.cache
def _digits_mlp(residual: bool = False) -> tuple[nn.Module, object]:
    data = load_dataset("digits", seed=0)
    hidden = [32, 32, 16] if residual else [32, 16]
    model = build(MLPSpec(64, hidden, data.out_features, residual=residual), seed=0)
    train(model, data, Recipe(epochs=15, lr=3e-3, batch_size=64, seed=0))
    return model.eval(), data


def test_narrow_gap_on_held_out_digits_shrinks_as_width_grows() -> None:
    """On real data the held-out output gap and accuracy loss shrink as the narrow layer widens."""
    model, data = _digits_mlp()
    calib = data.x_train[:512]
    gaps, accs = [], []
    for width in (2, 4, 8, 16, 32):
        child = grow(model, GrowthStep(1, width, "dils-analytic"), calib, GrowOptions(seed=0))
        gaps.append(output_gap(model, child, data.x_test))
        accs.append(evaluate(child, data.x_test, data.y_test, data.task)["accuracy"])
    assert all(b < a for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[-1] <= EXACT
    assert accs[0] < accs[-1]
    assert all(b >= a - 0.01 for a, b in itertools.pairwise(accs)), accs


# --------------------------------------------------------------------------- dils-approx


@pytest.mark.parametrize("seed", SEEDS)
def test_approx_reaches_its_tolerance_from_a_random_start(seed: int) -> None:
    parent, calib, held = _case("mlp", "relu", seed)
    opts = GrowOptions(seed=seed, approx_init="random", approx_tol=1e-2, approx_epochs=600, approx_lr=3e-2)
    child = grow(parent, GrowthStep(1, 16, "dils-approx"), calib, opts)
    info = child.growth_info
    assert info.calib_gap <= opts.approx_tol
    assert 0 < info.approx_epochs < opts.approx_epochs
    random_child = grow(parent, GrowthStep(1, 16, "random"), calib, GrowOptions(seed=seed))
    assert output_gap(parent, child, held) < output_gap(parent, random_child, held)


@pytest.mark.parametrize("seed", SEEDS)
def test_approx_stops_at_its_cap_and_never_loses_to_its_start(seed: int) -> None:
    """Width 2 at the 6-d Gaussian input cannot reach 1e-3: it stops at the cap, no worse than dils-analytic."""
    parent, calib, _ = _case("mlp", "relu", seed)
    opts = GrowOptions(seed=seed, approx_epochs=15)
    child = grow(parent, GrowthStep(0, 2, "dils-approx"), calib, opts)
    start = grow(parent, GrowthStep(0, 2, "dils-analytic"), calib, opts)
    assert child.growth_info.approx_epochs == 15
    assert child.growth_info.calib_gap > opts.approx_tol
    assert child.growth_info.calib_gap <= start.growth_info.calib_gap


# --------------------------------------------------------------------------- BatchNorm, modes, dtypes


@pytest.mark.parametrize(
    ("kind", "step"),
    [
        ("conv2d-bn-avg", GrowthStep(1, 3, "identity")),
        ("conv2d-bn-avg", GrowthStep(2, 8, "dils-analytic")),
        ("conv1d-bn-max", GrowthStep(1, 4, "identity")),
        ("conv1d-bn-max", GrowthStep(0, 4, "dils-analytic")),
        ("conv1d-residual-bn", GrowthStep(1, 5, "zero")),
        ("conv1d-residual-bn", GrowthStep(2, 2, "dils-analytic")),
    ],
)
def test_batchnorm_insertion_from_a_parent_in_train_mode(kind: str, step: GrowthStep) -> None:
    """A parent left in train mode keeps its running statistics; the child preserves eval-mode output
    and comes back in the parent's mode."""
    parent, calib, held = _case(kind, "relu", 0)
    parent = _clone(parent).train()
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    child = grow(parent, step, calib)
    assert parent.training and child.training
    assert all(torch.equal(before[k], v) for k, v in parent.state_dict().items())
    assert output_gap(parent, child, held) <= EXACT
    assert parent.training and child.training  # output_gap restores the modes too


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("method", ["identity", "dils-analytic", "dils-approx"])
def test_float32_model_stays_float32(method: str) -> None:
    parent, calib, held = _case("conv2d-bn-avg", "relu", 0)
    parent32 = _clone(parent).float()
    child = grow(parent32, GrowthStep(1, 3, method), calib.float(), GrowOptions(approx_epochs=2))
    assert {p.dtype for p in child.parameters()} == {torch.float32}
    assert output_gap(parent32, child, held.float()) <= EXACT


def test_same_seed_same_child() -> None:
    parent, calib, _ = _case("mlp", "gelu", 0)
    a = grow(parent, GrowthStep(1, 12, "dils-analytic"), calib, GrowOptions(seed=7))
    b = grow(parent, GrowthStep(1, 12, "dils-analytic"), calib, GrowOptions(seed=7))
    c = grow(parent, GrowthStep(1, 12, "dils-analytic"), calib, GrowOptions(seed=8))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_growth_info_accounts_for_the_insertion() -> None:
    parent, calib, _ = _case("mlp", "relu", 0)
    child = grow(parent, GrowthStep(2, 5, "identity"), calib)
    info = child.growth_info
    assert info.calib_gap <= EXACT and info.basis == "identity" and info.seconds >= 0
    assert info.flops > 0 and info.to_dict()["step"] == {"position": 2, "width": 5, "init": "identity"}


# --------------------------------------------------------------------------- accuracy on held-out digits


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return evaluate(model, x, y, "classification")["accuracy"]


@pytest.mark.parametrize(
    ("residual", "step"),
    [
        (False, GrowthStep(1, 32, "identity")),
        (False, GrowthStep(2, 16, "identity")),
        (False, GrowthStep(0, 64, "dils-analytic")),
        (False, GrowthStep(1, 48, "dils-analytic")),
        (False, GrowthStep(2, 16, "dils-analytic")),
        (True, GrowthStep(1, 16, "zero")),
        (True, GrowthStep(3, 8, "dils-analytic")),
    ],
)
def test_accuracy_on_held_out_digits_moves_at_most_half_a_point(residual: bool, step: GrowthStep) -> None:
    """float32, as users run it: a trained digits MLP, 512 calibration samples, the 270 test digits.

    A principal basis is exact on its calibration ball only (docs/inheritance.md), so the exact gap
    is asserted on the test digits inside that ball; every test digit is inside it on this data."""
    model, data = _digits_mlp(residual)
    calib = data.x_train[:512]
    before = _accuracy(model, data.x_test, data.y_test)
    child = grow(model, step, calib, GrowOptions(seed=0))
    after = _accuracy(child, data.x_test, data.y_test)
    assert before > 0.85
    assert abs(after - before) <= 0.005
    held = data.x_test
    if child.growth_info.basis.startswith("principal"):
        inside = _in_ball(model.features(calib, step.position), model.features(held, step.position))
        assert inside.float().mean() > 0.9
        held = held[inside]
    assert output_gap(model, child, held) <= EXACT


def _in_ball(calib_u: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    centre, radius = calib_ball(calib_u.detach().double())
    return (u.detach().double() - centre).norm(dim=1) <= radius


def _flip_some(seed: int):  # type: ignore[no-untyped-def]
    """A stand-in for ``_sign_fixed`` that flips the sign of about half the rows (seeded)."""

    def flip(vh: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return vh * (torch.randint(0, 2, (vh.shape[0], 1), generator=gen, dtype=vh.dtype) * 2 - 1)

    return flip


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "gelu", "tanh", "sigmoid"])
def test_principal_basis_keeps_its_guarantee_under_any_row_order_and_basis_signs(
    act: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dils-analytic at position 0 of an MLP on signed inputs uses the centred principal basis. Its
    guarantee (exact on the calibration ball; outside it, the next pre-activation moves by at most
    ``||W||_2 * (||u - centre|| - radius)`` for the ReLU family) must not depend on the order of the
    calibration rows, nor on the signs the SVD returns for the basis (LAPACK builds differ)."""
    trained, data = _digits_mlp()
    model = build(MLPSpec(64, [32, 16], data.out_features, activation=act))  # the trained weights, this activation
    model.load_state_dict(trained.state_dict())
    model = model.double().eval()
    calib = data.x_train[:512].double()
    held = data.x_test.double()
    centre, radius = calib_ball(calib)
    far = centre + (held - centre) * 3.0  # most of these lie outside the ball
    outside = (far - centre).norm(dim=1) > radius
    assert outside.any() and _in_ball(calib, held).all()
    w = model.blocks[0].affine.weight.detach().double()
    children = []
    for variant in range(4):
        rows = calib[torch.randperm(512, generator=torch.Generator().manual_seed(variant))] if variant else calib
        with monkeypatch.context() as m:
            if variant:
                m.setattr(_bases, "_sign_fixed", _flip_some(variant))
            child = grow(model, GrowthStep(0, 64, "dils-analytic"), rows, GrowOptions(seed=0))
        assert child.growth_info.basis.startswith("principal")
        gap = output_gap(model, child, held)
        assert gap <= EXACT, (variant, gap)
        children.append(child)
        if act in ("relu", "leaky_relu", "gelu"):
            with torch.no_grad():
                moved = (child.blocks[1].affine(child.blocks[0](far)) - model.blocks[0].affine(far)).norm(dim=1)
            bound = torch.linalg.matrix_norm(w, ord=2) * ((far - centre).norm(dim=1) - radius).clamp_min(0)
            assert (moved <= bound * (1 + 1e-6) + 1e-6).all()
            assert moved[~outside].max() <= 1e-6 * float(model.blocks[0].affine(far).abs().max())
    first = children[0](held)
    for other in children[1:]:  # the same function on the ball, whichever basis was drawn
        assert float((other(held) - first).abs().max() / first.abs().max()) <= EXACT


@functools.cache
def _digits_cnn() -> tuple[nn.Module, object]:
    data = load_dataset("digits", seed=0).reshaped((1, 8, 8))
    model = build(ConvSpec(2, 1, [8, 8], [8, 8], 10, batchnorm=True, pooling="flatten"), seed=0)
    train(model, data, Recipe(epochs=8, lr=1e-2, batch_size=64, seed=0))
    return model.eval(), data


@pytest.mark.parametrize(
    "step",
    [GrowthStep(1, 8, "identity"), GrowthStep(0, 2, "dils-analytic"), GrowthStep(1, 12, "dils-analytic")],
)
def test_accuracy_on_held_out_digits_cnn(step: GrowthStep) -> None:
    model, data = _digits_cnn()
    before = _accuracy(model, data.x_test, data.y_test)
    child = grow(model, step, data.x_train[:256], GrowOptions(seed=0))
    assert before > 0.8
    assert abs(_accuracy(child, data.x_test, data.y_test) - before) <= 0.005
    assert output_gap(model, child, data.x_test) <= EXACT


# --------------------------------------------------------------------------- impossible requests


_MLP = MLPSpec(4, [16, 8], 3)
_RES = MLPSpec(4, [16, 8], 3, residual=True)


@pytest.mark.parametrize(
    ("spec", "step", "message"),
    [
        (_MLP, GrowthStep(1, 8, "identity"), "identity needs width == 16 after a ReLU layer, got width=8; use dils-analytic"),
        (_MLP, GrowthStep(0, 4, "identity"), "init='identity' is not exact at position 0 (inputs are signed); use dils-analytic"),
        (MLPSpec(4, [16], 3, activation="tanh"), GrowthStep(1, 16, "identity"), "activation='tanh' (act(u) != u); use dils-analytic"),
        (_RES, GrowthStep(1, 16, "identity"), "init='identity' needs a plain spec; use zero for residual specs"),
        (_MLP, GrowthStep(1, 8, "zero"), "init='zero' needs a residual spec (residual=true); use dils-analytic or identity"),
        (_MLP, GrowthStep(3, 8, "random"), "position=3 is out of range; allowed: 0..2 for hidden=[16, 8]"),
        (_MLP, GrowthStep(-1, 8, "random"), "position=-1 is out of range; allowed: 0..2"),
        (_RES, GrowthStep(0, 8, "zero"), "position=0 is out of range (hidden layer 0 of a residual spec is its stem); allowed: 1..2"),
        (_MLP, GrowthStep(1, 0, "dils-analytic"), "width=0 must be an integer > 0"),
        (_MLP, GrowthStep(1, -3, "dils-analytic"), "width=-3 must be an integer > 0"),
        (_MLP, GrowthStep(1, 2.5, "dils-analytic"), "width=2.5 must be an integer > 0"),  # type: ignore[arg-type]
        (_MLP, GrowthStep(1, 8, "net2net"), "init='net2net' is unknown; allowed: dils-analytic, dils-approx, identity, zero, random"),
    ],
)
def test_impossible_requests_name_the_value_and_what_is_allowed(spec, step, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as err:
        check_step(spec, step)
    assert message in str(err.value)
    model = build(spec, seed=0)
    with pytest.raises(ValueError, match=_escape(message)):
        grow(model, step, torch.randn(32, 4))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("approx_init", "zero", "approx_init='zero' is unknown; allowed: dils-analytic, random"),
        ("approx_tol", 0.0, "approx_tol=0.0 must be > 0"),
        ("approx_epochs", -1, "approx_epochs=-1 must be >= 0"),
        ("linear_range", 2.0, "linear_range=2.0 must be in (0, 1]"),
        ("ridge", -1.0, "ridge=-1.0 must be >= 0"),
    ],
)
def test_bad_options_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=_escape(message)):
        GrowOptions(**{field: value})  # type: ignore[arg-type]


def test_allowed_inits_matches_check_step() -> None:
    assert allowed_inits(_MLP, 0) == ["dils-analytic", "dils-approx", "random"]
    assert allowed_inits(_MLP, 1) == ["dils-analytic", "dils-approx", "identity", "random"]
    assert allowed_inits(_RES, 2) == ["dils-analytic", "dils-approx", "zero", "random"]
    assert allowed_inits(_RES, 0) == []


def test_head_pooling_of_a_flattened_conv_is_channel_major() -> None:
    """The re-solved head of a flatten-pooled CNN maps (channel, location) the way Head.pool lays it out."""
    spec = ConvSpec(1, 1, [5], [3], 2, pooling="flatten")
    head = build(spec, seed=0).head
    assert isinstance(head, Head) and head.locations == 5
    h = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    assert torch.equal(head.pool(h)[0, :5], h[0, 0])
    assert math.prod(h.shape[1:]) == head.affine.in_features
