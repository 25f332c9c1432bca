"""The trial record: every user attribute a study writes, named here once.

The keys a trial carries, in the order optuna-dashboard shows them: readable ones first (``path``,
``hidden``, ``depth``, ``params``, ``val_metric``, ``test_metric``, ``flops_spent``), the structured
growth steps next, node-key hashes last. :class:`TrialRecord` is that record as one typed object;
every other module reads and writes the keys through the constants below. Studies written before
``steps`` existed kept the steps as a list under ``path``: ``steps_of`` reads both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = [
    "TrialRecord", "steps_of", "path_text", "PATH", "HIDDEN", "DEPTH", "PARAMS", "VAL_METRIC", "TEST_METRIC",
    "FLOPS_SPENT", "STEPS", "BEST_DEPTH", "VALS", "MODE", "SECONDS_SPENT", "FLOPS_REUSED", "NODE_KEYS",
    "TRAINED_KEYS", "FAIL_REASON", "POLICY_DONE", "BUDGET_SPENT", "BUDGET_SKIP", "GREEDY_PATH", "BASE_SPEC", "N_TRAIN", "evaluated",
]

# a finished trial's record (TrialRecord's fields, in this order)
PATH = "path"
HIDDEN = "hidden"
DEPTH = "depth"
PARAMS = "params"
VAL_METRIC = "val_metric"
TEST_METRIC = "test_metric"
FLOPS_SPENT = "flops_spent"
STEPS = "steps"
BEST_DEPTH = "best_depth"
VALS = "vals"
MODE = "mode"
SECONDS_SPENT = "seconds_spent"
FLOPS_REUSED = "flops_reused"
NODE_KEYS = "node_keys"
TRAINED_KEYS = "trained_keys"
# written on their own
FAIL_REASON = "fail_reason"  # a trial whose training diverged, with why
POLICY_DONE = "policy_done"  # the greedy policy has nothing left to propose
BUDGET_SPENT = "budget_spent"  # the search's compute cap stopped this trial, and the search (search/budget.py)
BUDGET_SKIP = "budget_skip"  # this trial's next node did not fit the search's cap; cheaper paths may
GREEDY_PATH = "greedy_path"  # the path the greedy policy proposed (before the trial ran)
# a GrowthTree trial written before GrowthTree wrote the trial record above: every node on its path and
# their validation metrics (read by ``evaluated``, never written)
TREE_NODE_KEYS = "dils_node_keys"
TREE_VALS = "dils_vals"
# study attributes
BASE_SPEC = "dils_base_spec"
N_TRAIN = "dils_n_train"


@dataclass(frozen=True)
class TrialRecord:
    """What following one growth path left: the trial's user attributes (field name = key)."""

    path: str  # +WIDTH@POSITION:INIT arrows up to the best node
    hidden: list[int]  # the best node's hidden widths
    depth: int
    params: int
    val_metric: float
    test_metric: float
    flops_spent: int
    steps: list[dict[str, Any]]
    best_depth: int
    vals: list[float]
    mode: str
    seconds_spent: float
    flops_reused: int
    node_keys: list[str]
    trained_keys: list[str]

    @classmethod
    def of(cls, out: Any) -> TrialRecord:
        """The record of a ``follow.PathOutcome`` (its best node is the best along the path)."""
        b = out.best_index
        steps = [s.to_dict() for s in out.path.steps]
        scratch = out.path.recipe["mode"] == "scratch"
        best_spec = out.path.spec if scratch else out.path.prefixes()[b].spec
        return cls(
            path=path_text(steps if scratch else steps[:b]), hidden=list(best_spec.hidden), depth=len(best_spec.hidden),
            params=out.params[b], val_metric=out.vals[b], test_metric=out.tests[b], flops_spent=out.flops_spent,
            steps=steps, best_depth=b, vals=out.vals, mode=out.path.recipe["mode"], seconds_spent=out.seconds_spent,
            flops_reused=out.flops_reused, node_keys=out.node_keys, trained_keys=out.trained_keys,
        )

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, trial: optuna.Trial) -> None:
        """Set every attribute on ``trial``, in one transaction where the storage allows."""
        from ._optuna_compat import write_trial_user_attrs

        write_trial_user_attrs(trial, self.to_attrs())


def evaluated(user_attrs: dict[str, Any]) -> tuple[list[str], list[float]]:
    """The node keys a trial evaluated and their validation metrics (of a GrowthTree trial written before
    the trial record too)."""
    if NODE_KEYS in user_attrs:
        return list(user_attrs[NODE_KEYS]), [float(v) for v in user_attrs.get(VALS, [])]
    return list(user_attrs.get(TREE_NODE_KEYS, [])), [float(v) for v in user_attrs.get(TREE_VALS, [])]


def steps_of(user_attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The trial's growth steps as dicts (``position``, ``width``, ``init``)."""
    steps = user_attrs.get(STEPS)
    if steps is None and isinstance(user_attrs.get(PATH), list):  # written before 'steps' existed
        steps = user_attrs[PATH]
    return list(steps or [])


def path_text(steps: list[dict[str, Any]]) -> str:
    """``+WIDTH@POSITION:INIT`` per step, joined by arrows; ``(base only)`` for none."""
    if not steps:
        return "(base only)"
    return " -> ".join(f"+{s['width']}@{s['position']}:{s['init']}" for s in steps)
