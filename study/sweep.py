"""The sweep (``--sweep FIELD=V1,V2,...``): which fields can be swept, the CLI parser of one
``--sweep``, the variants of the students' grid in grid order (the winner's tie rule) and their
labels.

Pure functions of a StudyConfig or its ``config.json`` dict; the sweep is parsed and checked
against the fields' own parsers and ``validate`` by ``study.config.normalize_sweep``.
``study.config`` re-exports every name.
"""

from __future__ import annotations

import itertools

#: Fields ``--sweep`` can take several values of: each is a key of the students' trial config
#: (``driver.tuning.trial_config``; ``setups`` is the grid's setup axis, as ``--setups``).
SWEEPABLE: tuple[str, ...] = ("setups", "temperature", "lr", "batch_size")


def sweep_item(text: str) -> tuple[str, tuple[str, ...]]:
    """CLI parser of one ``--sweep FIELD=V1,V2,...``: ``("temperature", ("2", "8"))``, values as
    typed (``make_config`` parses them with the field's own parser and checks each like the
    scalar flag). Text without ``=``: a field with no values, which ``make_config`` refuses."""
    name, _, values = text.partition("=")
    return name.strip().replace("-", "_"), tuple(v.strip() for v in values.split(",") if v.strip())


def swept_fields(config) -> tuple[str, ...]:
    """The fields a run sweeps besides the setups, in the order given (``config``: a StudyConfig
    or its ``config.json`` dict, where the sweep is a list of ``[field, values]``)."""
    sweep = config.get("sweep") if isinstance(config, dict) else config.sweep
    return tuple(name for name, _ in sweep or ())


def variants(config) -> list[tuple[str, dict]]:
    """Every variant of the students' grid, in grid order (the winner's tie rule): ``(setup,
    {field: value})`` for each setup in ``setups`` order, then the swept values in the order given
    (the first swept field varying slowest)."""
    sweep = [(name, tuple(values)) for name, values in
             ((config.get("sweep") if isinstance(config, dict) else config.sweep) or ())]
    setups = config["setups"] if isinstance(config, dict) else config.setups
    combos = list(itertools.product(*(values for _, values in sweep)))
    return [(setup, dict(zip((name for name, _ in sweep), combo))) for setup in setups for combo in combos]


def _value_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def variant_label(setup: str, values: dict) -> str:
    """A variant's name: its setup, then each swept value: ``"kd temperature=2"``; with no sweep
    the setup alone (``"kd"``)."""
    return " ".join([setup, *(f"{name}={_value_text(value)}" for name, value in values.items())])
