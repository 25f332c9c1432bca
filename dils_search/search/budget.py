"""The compute budget of a study: ``search.budget_flops`` is the training compute up to the delivered
model, the search and the finalize stage together.

- The search may spend ``search_cap``: ``(1 - final.share)`` of the budget (all of it when the finalize
  stage is off). A node trains only when its cost (``node_cost``: epochs x one epoch's FLOPs, known in
  advance) still fits; a node already stored costs nothing and is always taken. A path whose next
  node does not fit is pruned there and the search goes on with cheaper paths, until not even the
  cheapest node fits (``budget_guard``); what is left goes to the finalize stage.
  Other workers' running trials are counted once they finish, so W workers may overshoot the cap by
  up to W - 1 nodes; an insertion's fitting (dils-approx's few epochs) is counted but not foreseen.
- The finalize stage spends what the search left: ``final_epochs`` splits it evenly over the top_k
  candidates, each trained as many whole epochs as its share pays for (fewer candidates when the share
  of each would not pay for one epoch; none, and the best node delivered as it is, when not even one
  fits). Each keeps its best epoch's weights by validation (``budget_patience``); ``final.patience``
  also stops it once validation has not improved for that many epochs.
- ``plain_epochs``: the epochs of one architecture trained from scratch that fit in a budget (the
  ``plain`` policy's).

``search.max_flops`` is the older cap on the search alone (no finalize share); the config refuses the
two together. Spent compute is the sum of the trials' ``flops_spent`` (nodes they trained, reuse free).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..config import MAX_EPOCHS, StudyConfig
from ..core.spec import Spec, forward_flops
from .attrs import BUDGET_SKIP, BUDGET_SPENT, FLOPS_SPENT

if TYPE_CHECKING:
    from .follow import PathOutcome
    from .paths import GrowthPath
    from .tree import GrowthTree

__all__ = ["search_cap", "spent", "epoch_flops", "node_cost", "cheapest_node", "budget_guard", "final_epochs", "budget_patience", "plain_epochs", "set_budget", "BUDGET_HELP"]

BUDGET_HELP = ("training FLOPs up to the delivered model, search plus finalize (search.budget_flops); the search "
               "stops at (1 - final.share) of it")


def search_cap(cfg: StudyConfig) -> float:
    """The training FLOPs the search of ``cfg`` may spend; 0 when nothing caps it."""
    b = cfg.search.budget_flops
    if b:  # the plain policy trains its one network for the whole budget and delivers it as trained
        return b * (1.0 - cfg.final.share) if cfg.final.epochs and cfg.search.policy != "plain" else b
    return cfg.search.max_flops


def spent(trials: Iterable[Any]) -> float:
    """The training FLOPs the ``trials`` (Optuna trials, or their user attrs) spent on nodes they trained."""
    return float(sum((t if isinstance(t, dict) else t.user_attrs).get(FLOPS_SPENT, 0) for t in trials))


def epoch_flops(spec: Spec, n_train: int) -> int:
    """Training FLOPs of one epoch of ``spec`` over ``n_train`` samples (``core.train``'s count)."""
    return 3 * forward_flops(spec) * n_train


def node_cost(tree: GrowthTree, path: GrowthPath) -> int:
    """The training FLOPs of ``path``'s own node on ``tree``, known before it trains (its epochs x one
    epoch's FLOPs; early stopping may spend less, an insertion's fitting a little more)."""
    root, step, _ = tree.plan.recipes(path, 0)
    epochs = root.epochs if path.mode == "scratch" or not path.steps else step.epochs
    return epochs * epoch_flops(path.spec, tree.data.size("train"))


#: a search stops once this many trials in a row found their next node over budget (the sampler keeps
#: proposing paths that no longer fit, though a cheaper one would)
SKIPS_IN_A_ROW = 10


def cheapest_node(tree: GrowthTree, mode: str, width: int) -> int:
    """The cost of the cheapest node a search could still train: ``width`` units appended to the base
    (trained as a growth step, or from scratch in scratch mode)."""
    from ..core.spec import GrowthStep
    from .paths import GrowthPath

    own = tree.path((), mode=mode)
    return node_cost(tree, GrowthPath(tree.base, own.recipe, (GrowthStep(len(tree.base.hidden), width, "random"),)))


def budget_guard(cap: float, tree: GrowthTree, trial: Any, mode: str, width: int
                 ) -> Callable[[PathOutcome, GrowthPath], bool] | None:
    """The ``affordable`` check of one trial of a study whose search may spend ``cap`` (None when 0).

    A node that does not fit prunes its trial (``BUDGET_SKIP``), and the next trial may propose a
    cheaper path; once not even the cheapest node (``cheapest_node``, ``width`` the smallest width)
    fits, or ``SKIPS_IN_A_ROW`` trials in a row were skipped, the search is over: the trial is marked
    ``BUDGET_SPENT`` and the study stopped (raising ``optuna.TrialPruned`` at the trial's start). A
    study's very first node always fits."""
    if not cap:
        return None
    import optuna

    trials = trial.study.get_trials(deepcopy=False)
    before = spent(trials)
    cheapest = cheapest_node(tree, mode, width)
    recent = [t for t in trials if t.state.is_finished()][-SKIPS_IN_A_ROW:]

    def stop() -> bool:
        trial.set_user_attr(BUDGET_SPENT, True)
        trial.study.stop()
        return False

    def affordable(out: PathOutcome, path: GrowthPath) -> bool:
        used = before + out.flops_spent
        if used == 0 or used + node_cost(tree, path) <= cap:
            return True
        if used + cheapest > cap:
            return stop()
        trial.set_user_attr(BUDGET_SKIP, True)
        return False

    if before and (before + cheapest > cap or (
            len(recent) == SKIPS_IN_A_ROW and all(t.user_attrs.get(BUDGET_SKIP) for t in recent))):
        stop()
        raise optuna.TrialPruned("search budget spent")
    return affordable


def final_epochs(remaining: float, specs: Sequence[Spec], n_train: int) -> list[int]:
    """Epochs for the best candidates (``specs``, best first) that ``remaining`` FLOPs pay for, split
    evenly: the longest prefix of candidates that all get at least one epoch (empty when none does)."""
    for k in range(len(specs), 0, -1):
        epochs = [min(MAX_EPOCHS, int(remaining / k // epoch_flops(s, n_train))) for s in specs[:k]]
        if min(epochs) >= 1:
            return epochs
    return []


def budget_patience(epochs: int) -> int:
    """The finalize stage's patience under a budget when ``final.patience`` is 0: the whole stage, so
    it never stops early but keeps the best epoch's weights by validation. Without that, a long,
    budget-paid finalize overfits small data (synthetic: 188 epochs took validation R^2 from 0.775 to
    0.730); stopping early instead (a tenth of the epochs) cut the CNN's cosine decay short and cost
    it 1.4 pp (docs/benchmarks.md, "A compute budget")."""
    return max(1, epochs)


def plain_epochs(budget: float, spec: Spec, n_train: int) -> int:
    """Whole epochs of ``spec`` from scratch that fit in ``budget`` (at least one)."""
    return max(1, min(MAX_EPOCHS, int(budget // epoch_flops(spec, n_train))))


def set_budget(url: str, name: str, budget_flops: float) -> None:
    """Store ``search.budget_flops`` in study ``name``'s config (``resume --budget-flops``); the new
    config is checked first, so a refused one writes nothing."""
    from ..store import LineageStore
    from .storage import study_config

    cfg, _ = study_config(url, name)
    if cfg.search.budget_flops == budget_flops:
        return
    new = cfg.replace(search={"budget_flops": budget_flops})
    store = LineageStore(url, create=False)
    try:
        store.put_study(name, config_json=new.to_json())
    finally:
        store.close()
