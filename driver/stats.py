"""Statistics over seeds: ``setups.csv`` (one row per student setup), the winning setup, and
whether its lead is significant. Pure numbers (pandas, SciPy); no Ray, no torch.

Sources:
* Student-t confidence interval of a mean over n seeds: ``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)``
  with ``s`` the sample standard deviation (ddof 1) and the quantile from ``scipy.stats.t.ppf``
  (Student 1908).
* Welch's unequal-variances t-test, two-sided (Welch 1947, "The generalization of 'Student's'
  problem when several different population variances are involved", Biometrika 34):
  ``scipy.stats.ttest_ind(a, b, equal_var=False)``.

Per seed, a setup's accuracy is that of the checkpoint the study keeps (the trial's best epoch by
the selection metric, ``study.selection_metric``): ``best_test_acc`` and, with ``--val-size``,
``best_val_acc`` of ``results.csv``. The winner is the setup with the best mean of the selection
metric; its lead over the runner-up is tested on test accuracy.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

#: Columns of ``setups.csv``, in order: accuracies are fractions 0..1 over the seeds of one setup;
#: ``test_acc_std`` is the sample standard deviation (ddof 1); ``ci95_low``/``ci95_high`` the 95 %
#: Student-t interval of the mean; ``val_acc_mean`` the mean best-epoch validation accuracy (empty
#: without ``--val-size``); ``welch_p_vs_winner`` the two-sided p-value of Welch's t-test of this
#: setup's test accuracies against the winner's (empty for the winner and with fewer than 2 seeds).
SETUP_COLUMNS = ("setup", "seeds", "test_acc_mean", "test_acc_std", "ci95_low", "ci95_high", "val_acc_mean",
                 "welch_p_vs_winner")
#: Significance level of the lead test.
ALPHA = 0.05


def _floats(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof 1) of ``values``; std is NaN for one value,
    both NaN for none. NaN entries are ignored."""
    xs = _floats(values)
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval ``(low, high)`` of the mean of ``values`` (same units):
    ``mean +- scipy.stats.t.ppf((1 + confidence) / 2, n - 1) * std / sqrt(n)``, std with ddof 1.
    ``(nan, nan)`` with fewer than two values (no spread to estimate). ValueError unless
    0 < confidence < 1. Example: [0.45, 0.47, 0.46] -> 0.46 +- 4.3027 * 0.01 / sqrt(3)
    = (0.43516, 0.48484)."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
    xs = _floats(values)
    if len(xs) < 2:
        return math.nan, math.nan
    mean, std = mean_std(xs)
    half = float(stats.t.ppf((1 + confidence) / 2, len(xs) - 1)) * std / math.sqrt(len(xs))
    return mean - half, mean + half


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test that ``a`` and ``b`` have the same mean
    (``scipy.stats.ttest_ind(a, b, equal_var=False)``, Welch 1947). NaN when either sample has
    fewer than two values, or both have no spread and equal means (nothing to test); 0.0 when
    both have no spread and the means differ. Example: [0.45, 0.47, 0.46] vs [0.40, 0.44, 0.41]:
    t = 3.25, df = 2.876, p = 0.0504."""
    from scipy import stats

    xs, ys = _floats(a), _floats(b)
    if len(xs) < 2 or len(ys) < 2:
        return math.nan
    with warnings.catch_warnings():  # near-identical samples: SciPy warns about precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(xs, ys, equal_var=False).pvalue)
    return p


def setup_table(per_seed, setups: Sequence[str], metric: str = "test_acc", key: str = "setup"):
    """``setups.csv`` as a DataFrame (``SETUP_COLUMNS``), one row per setup in ``setups`` order.

    ``per_seed``: a DataFrame with one row per (setup, seed) trial and the columns ``setup``,
    ``test_acc`` (the kept checkpoint's test accuracy, 0..1) and, for ``metric="val_acc"``,
    ``val_acc``. ``metric`` (``study.selection_metric``) picks the winner, against which
    ``welch_p_vs_winner`` is computed (see ``winner``). Setups without rows are left out.
    ``key``: the column of ``per_seed`` that names the groups (``"variant"``: one row per variant
    of a sweep, ``variants.csv``); the table's first column has that name."""
    import pandas as pd

    present = [s for s in setups if (per_seed[key] == s).any()]
    best = winner(per_seed, present, metric, key=key) if present else None
    won = list(per_seed.loc[per_seed[key] == best, "test_acc"]) if best else []
    rows = []
    for setup in present:
        accs = list(per_seed.loc[per_seed[key] == setup, "test_acc"])
        mean, std = mean_std(accs)
        low, high = t_interval(accs)
        val = mean_std(per_seed.loc[per_seed[key] == setup, "val_acc"])[0] \
            if "val_acc" in per_seed else math.nan
        rows.append({key: setup, "seeds": len(accs), "test_acc_mean": mean, "test_acc_std": std,
                     "ci95_low": low, "ci95_high": high, "val_acc_mean": val,
                     "welch_p_vs_winner": math.nan if setup == best else welch_p(accs, won)})
    return pd.DataFrame(rows, columns=[key, *SETUP_COLUMNS[1:]])


def winner(per_seed, setups: Sequence[str], metric: str = "test_acc", key: str = "setup") -> str:
    """The setup (or variant, ``key="variant"``) with the highest mean of ``metric`` over its seeds
    (``per_seed`` as in ``setup_table``); ties go to the first in ``setups`` order (the grid order:
    setups order, then the swept values in the order given). ValueError without rows."""
    means = {s: mean_std(per_seed.loc[per_seed[key] == s, metric])[0] for s in setups}
    means = {s: m for s, m in means.items() if not math.isnan(m)}
    if not means:
        raise ValueError(f"no {metric} values for any of the setups {list(setups)}")
    top = max(means.values())
    return next(s for s in setups if means.get(s) == top)


def table_key(table) -> str:
    """The column naming a row of a ``setup_table`` frame: ``variant`` (``variants.csv``) or
    ``setup`` (``setups.csv``)."""
    return "variant" if "variant" in table.columns else "setup"


def lead(table, metric: str = "test_acc") -> dict | None:
    """The winner's lead over the runner-up, from a ``setup_table`` frame: ``{"winner",
    "runner_up", "metric", "lead"}`` (difference of the test accuracy means, winner minus
    runner-up, 0..1 units), ``"p"`` (Welch, two-sided; NaN when untestable) and
    ``"significant"`` (p < ``ALPHA``; None when untestable). None with fewer than two setups.
    The ranking uses ``val_acc_mean`` for ``metric="val_acc"``, else ``test_acc_mean``."""
    if len(table) < 2:
        return None
    key = table_key(table)
    column = "val_acc_mean" if metric == "val_acc" else "test_acc_mean"
    ranked = table.assign(_i=range(len(table))).sort_values([column, "_i"], ascending=[False, True])
    first, second = ranked.iloc[0], ranked.iloc[1]
    p = float(second["welch_p_vs_winner"])
    return {"winner": first[key], "runner_up": second[key], "metric": metric,
            "lead": float(first["test_acc_mean"] - second["test_acc_mean"]), "p": p,
            "significant": None if math.isnan(p) else p < ALPHA}


def lead_sentence(table, metric: str = "test_acc") -> str:
    """One plain-text sentence: the winning setup (best mean of ``metric``), its test accuracy
    mean and 95 % interval over n seeds, its lead over the runner-up and whether Welch's t-test
    finds it significant at ``ALPHA``."""
    if not len(table):
        return "No student setup finished."
    word = "variant" if table_key(table) == "variant" and len(set(table["variant"]) - set(table.get(
        "setup", table["variant"]))) else "setup"
    info = lead(table, metric)
    key = table_key(table)
    row = table.set_index(key).loc[info["winner"] if info else table[key].iloc[0]]
    n = int(row["seeds"])
    ci = "" if math.isnan(row["ci95_low"]) else \
        f", 95 % CI {100 * row['ci95_low']:.1f}-{100 * row['ci95_high']:.1f} %"
    by = "validation accuracy" if metric == "val_acc" else "test accuracy"
    text = (f"Winner by mean {by} over {n} seed{'s' * (n != 1)}: {row.name} "
            f"(test accuracy {100 * row['test_acc_mean']:.1f} %{ci})")
    if info is None:
        return text + f"; the only {word}."
    gap = 100 * info["lead"]
    text += (f"; {'ahead of' if gap >= 0 else 'behind'} {info['runner_up']} by {abs(gap):.1f} percentage "
             f"points of test accuracy")
    if info["significant"] is None:
        why = f"one seed per {word}" if n < 2 else "no spread between seeds"
        return text + f"; not testable for significance ({why}; run with --seeds 2 or more)."
    verdict = "significant" if info["significant"] else "not significant"
    return text + f"; Welch's t-test p = {info['p']:.3g}: {verdict} at the {ALPHA:g} level."
