"""Accuracy-plateau stopping rule and the Ray Tune stopper built on it.

The rule (the task's): a student trial ends once its test accuracy changes by less than
``tolerance`` between consecutive epochs, ``patience`` epochs in a row — in the task's words,
``torch.abs(acc - acc_prev) < 0.01`` for at least two epochs in a row, accuracy in 0..1. The
earliest epoch at which it can fire is therefore ``patience + 1`` (each "stable" epoch needs a
previous epoch to compare with).

Float robustness: a change of *exactly* ``tolerance`` is not stable. Accuracies are ratios
``correct / N``; in binary floating point their difference is not exact (``0.58 - 0.57`` is
``0.00999999999999989`` in float64, and accuracies computed in float32, e.g.
``(pred == y).float().mean().item()``, are off by up to ~6e-8). A naive ``< 0.01`` would call
such a change stable. So a change counts as stable iff ``|d| < tolerance - ABS_EPS`` with
``ABS_EPS = 1e-6``: larger than any float32/float64 rounding of values in [0, 1] (<= ~1.2e-7),
and smaller than the accuracy granularity ``1/N`` of any evaluation set up to 10^5 images, so
no genuine difference below ``tolerance`` is misclassified.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ray.tune import Stopper

__all__ = ["ABS_EPS", "MissingMetricError", "plateau_epoch", "AccuracyPlateauStopper"]

#: Absolute margin absorbing float rounding in ``|acc_e - acc_(e-1)| < tolerance`` (see module doc).
ABS_EPS: float = 1e-6


class MissingMetricError(KeyError, ValueError):
    """A Tune result lacks the metric (or ``training_iteration``) the stopper needs.

    Subclasses both ``KeyError`` (it is a missing key) and ``ValueError`` (the project's
    convention for bad input), so either ``except`` catches it.
    """

    def __str__(self) -> str:  # KeyError would repr() the message; keep it a plain line.
        return str(self.args[0]) if self.args else ""


def _check_rule_args(tolerance: float, patience: int) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance <= ABS_EPS:
        raise ValueError(f"tolerance={tolerance!r} is invalid; allowed: a finite float > {ABS_EPS:g} (accuracy units, 0..1)")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience={patience!r} is invalid; allowed: an int >= 1 (epochs)")


def _is_stable(prev: float, cur: float, tolerance: float) -> bool:
    # NaN compares False, so a NaN accuracy is never "stable" (and resets the run).
    return abs(cur - prev) < tolerance - ABS_EPS


def plateau_epoch(accuracies: Sequence[float], tolerance: float = 0.01, patience: int = 2) -> Optional[int]:
    """First epoch at which the accuracy-plateau rule fires.

    Epoch ``e`` (1-based, ``e >= 2``) is *stable* iff ``|acc_e - acc_(e-1)| < tolerance`` (with the
    ``ABS_EPS`` float margin of the module docstring, so a change of exactly ``tolerance`` is not
    stable). The rule fires at the first epoch that ends a run of ``patience`` consecutive
    stable epochs.

    Args:
        accuracies: per-epoch accuracies in order, epoch 1 first (python floats or 0-d tensors;
            fraction correct, 0..1).
        tolerance: largest change (exclusive) that counts as stable, accuracy units; > ``ABS_EPS``.
        patience: number of consecutive stable epochs needed, int >= 1.

    Returns:
        The 1-based epoch at which the rule fires (>= ``patience + 1``), or ``None`` if it never
        does. Examples (tolerance 0.01, patience 2): ``[0.50, 0.60, 0.605, 0.61]`` -> 4;
        ``[0.50, 0.505, 0.60, 0.605, 0.70]`` -> None; ``[0.57, 0.58, 0.59]`` -> None.

    Raises:
        ValueError: tolerance or patience out of range.
    """
    _check_rule_args(tolerance, patience)
    accs = [float(a) for a in accuracies]
    run = 0
    for i in range(1, len(accs)):
        run = run + 1 if _is_stable(accs[i - 1], accs[i], tolerance) else 0
        if run >= patience:
            return i + 1
    return None


class AccuracyPlateauStopper(Stopper):
    """Ray Tune stopper: end a trial when its accuracy plateaus (or at ``max_epochs``).

    A trial is stopped after the epoch at which :func:`plateau_epoch` fires on that trial's
    accuracy history, or as soon as ``result["training_iteration"] >= max_epochs``. The whole
    experiment is never stopped (:meth:`stop_all` is always False): each trial decides alone.

    Use: ``tune.RunConfig(stop=AccuracyPlateauStopper(metric="test_acc"))``, with the trainable
    calling ``tune.report({"test_acc": acc, ...})`` once per epoch (one report = one
    ``training_iteration`` = one epoch).

    State: one history per trial (keyed by ``trial_id``), a dict ``training_iteration -> accuracy``.
    Only ``training_iteration`` and the metric are read from a result. If an iteration is
    reported again (a trial restored from its last checkpoint after a failure re-runs the epochs
    after that checkpoint), the new value overwrites the old one and any stored later epochs are
    dropped, so replayed epochs are never counted twice. Tune keeps the stopper in its experiment
    state (``TuneController`` pickles ``_stopper`` with the runner state) and restores it with
    ``Tuner.restore``, so histories survive an experiment resume; the state is plain dicts and
    floats, hence picklable.

    Args:
        metric: result key holding the accuracy (fraction correct, 0..1). Default ``"test_acc"``.
        tolerance: see :func:`plateau_epoch`; default 0.01 (one percentage point).
        patience: consecutive stable epochs needed; default 2.
        max_epochs: optional hard cap on ``training_iteration`` (epochs), int >= 1, or None.

    Raises:
        ValueError: on construction, bad ``metric``/``tolerance``/``patience``/``max_epochs``.
        MissingMetricError (KeyError and ValueError): on a result without the metric or without
            ``training_iteration``; ValueError on a metric value that is not a number.
    """

    def __init__(
        self,
        metric: str = "test_acc",
        tolerance: float = 0.01,
        patience: int = 2,
        max_epochs: Optional[int] = None,
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric={metric!r} is invalid; allowed: a non-empty result key (str)")
        _check_rule_args(tolerance, patience)
        if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1):
            raise ValueError(f"max_epochs={max_epochs!r} is invalid; allowed: None or an int >= 1 (epochs)")
        self.metric = metric
        self.tolerance = float(tolerance)
        self.patience = patience
        self.max_epochs = max_epochs
        self._histories: Dict[str, Dict[int, float]] = {}

    def _read(self, result: Mapping[str, Any], key: str) -> Any:
        if key not in result:
            raise MissingMetricError(
                f"result has no {key!r} (stopper metric={self.metric!r}); keys present: {sorted(map(str, result))}"
            )
        return result[key]

    def __call__(self, trial_id: str, result: Dict[str, Any]) -> bool:
        """Record this epoch's accuracy for ``trial_id``; True iff the trial should stop now."""
        iteration = int(self._read(result, "training_iteration"))
        value = self._read(result, self.metric)
        try:
            acc = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"result[{self.metric!r}]={value!r} is not a number; allowed: accuracy in 0..1") from None

        history = self._histories.setdefault(trial_id, {})
        for stale in [it for it in history if it > iteration]:
            del history[stale]
        history[iteration] = acc

        if self.max_epochs is not None and iteration >= self.max_epochs:
            return True
        return plateau_epoch(self.history(trial_id), self.tolerance, self.patience) is not None

    def stop_all(self) -> bool:
        """Never stops the whole experiment: returns False."""
        return False

    def history(self, trial_id: str) -> List[float]:
        """Accuracies recorded for ``trial_id``, ordered by ``training_iteration`` (empty if unknown)."""
        history = self._histories.get(trial_id, {})
        return [history[it] for it in sorted(history)]
