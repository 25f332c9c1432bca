"""Parameter importances with Optuna's default evaluator, the ones optuna-dashboard shows.

The finalize stage stores them with the delivered model, so that ``report`` on a finished study
needs neither Optuna's importance module (it imports scikit-learn) nor a pass over every trial.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["param_importances", "default_evaluator"]


def param_importances(study: Any) -> dict[str, float] | None:
    """``optuna.importance.get_param_importances`` with its default evaluator, or None when it has nothing to
    rank (fewer than 2 completed trials, no varying parameter, several objectives)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varying = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1}
    if len(study.directions) > 1 or len(complete) < 2 or not varying:
        return None
    try:
        with warnings.catch_warnings():  # "some regimes have less than 2 trials": the caption says how few
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):
        return None


def default_evaluator() -> str:
    """The class name of ``optuna.importance.get_param_importances``'s default evaluator."""
    import inspect

    import optuna.importance as imp

    source = inspect.getsource(imp.get_param_importances)
    return next((name for name in ("PedAnovaImportanceEvaluator", "FanovaImportanceEvaluator",
                                   "MeanDecreaseImpurityImportanceEvaluator") if f"{name}()" in source), "unknown")
