"""Which stages a run skips, runs or reruns: its fingerprints compared, stage by stage, in pipeline order.

``plan`` is pure: it gets, per stage, whether the stage's outputs are there, the fingerprint it
recorded (``study.fingerprint``) and the fingerprint of what it would read now, and returns one
``Decision`` per stage. The rule:

* outputs complete and the same inputs: ``skip``; other inputs: ``rerun`` (the new outputs replace
  the old ones once complete), and every later stage reruns too (it reads what this one makes);
* outputs but no fingerprint (a run made before fingerprints): ``record`` - inputs unknown, the
  current ones are recorded, nothing reruns - unless a field the stage reads differs from the run's
  ``config.json``, which reruns it;
* an attempt interrupted in place (fingerprint with ``complete: false``): ``resume`` with the same
  inputs, else ``restart`` (its unfinished outputs are discarded);
* no outputs: ``run``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from study.config import LEGACY_VALUES, STAGES, StudyConfig, StudyError, config_json
from study.fingerprint import STAGE_FIELDS, differences, stage_fields, undeclared_fields

#: Actions that make new outputs (what makes every later stage with outputs rerun).
MAKES_OUTPUTS = ("run", "resume", "restart", "rerun")


@dataclass(frozen=True)
class Decision:
    """What the run does with one stage: ``action`` (skip, record, run, resume, restart, rerun) and
    ``reason`` (why, one phrase)."""

    stage: str
    action: str
    reason: str

    def line(self, dry_run: bool = False) -> str:
        """``[sparsify] rerun: recipe r.yaml changed (sha256 3f2a… -> 9b1c…)``; with ``dry_run``
        ``[sparsify] would rerun: ...``."""
        verb = {"record": "record its inputs"}.get(self.action, self.action)
        return f"[{self.stage}] {'would ' if dry_run else ''}{verb}: {self.reason}"


@dataclass(frozen=True)
class StageState:
    """What ``plan`` knows of one stage: ``outputs`` (its complete outputs are there), ``recorded``
    (its fingerprint file, or None), ``current`` (the fingerprint of what it would read now; None
    when an earlier stage makes new outputs first) and ``legacy_fields`` (the fields of the run's
    ``config.json``, for a stage without a fingerprint)."""

    outputs: bool
    recorded: dict | None
    current: dict | None
    legacy_fields: dict | None = None


def plan(states: dict[str, StageState]) -> list[Decision]:
    """One Decision per stage of ``states`` (pipeline order, ``STAGES``); rule: module docstring."""
    decisions: list[Decision] = []
    upstream = None  # the first earlier stage that makes new outputs
    for stage in (s for s in STAGES if s in states):
        state = states[stage]
        recorded = state.recorded
        if upstream is not None:
            reason = f"{upstream} {'reruns' if upstream_action == 'rerun' else 'runs'} first"
            if state.outputs and (recorded is None or recorded.get("complete")):
                decision = Decision(stage, "rerun", reason)
            elif recorded is not None and not recorded.get("complete"):
                decision = Decision(stage, "restart", reason + "; its unfinished outputs are discarded")
            else:
                decision = Decision(stage, "run", "no outputs yet")
        elif recorded is not None and not recorded.get("complete"):
            changed = differences(recorded, state.current)
            decision = (Decision(stage, "restart", "interrupted, and since then " + "; ".join(changed)
                                 + ": its unfinished outputs are discarded") if changed else
                        Decision(stage, "resume", "interrupted earlier with the same inputs: resuming"))
        elif not state.outputs:
            decision = Decision(stage, "run", "no outputs yet")
        elif recorded is None:
            old = state.legacy_fields
            # config.json holds config fields only (not, e.g., the bench's ``deepsparse``): compare those
            now = {name: value for name, value in state.current["fields"].items() if name in STAGE_FIELDS[stage]}
            changed = [] if old is None else differences({"fields": old}, {"fields": now})
            decision = (Decision(stage, "rerun", "; ".join(changed) + " (from config.json; no fingerprint)")
                        if changed else
                        Decision(stage, "record", "no fingerprint (made before fingerprints existed): inputs "
                                                  "unknown, recording the current ones, not rerunning"))
        else:
            changed = differences(recorded, state.current)
            decision = Decision(stage, "rerun", "; ".join(changed)) if changed else \
                Decision(stage, "skip", "inputs unchanged")
        if decision.action in MAKES_OUTPUTS and upstream is None:
            upstream, upstream_action = stage, decision.action
        decisions.append(decision)
    return decisions


def saved_config(path: str | Path) -> dict | None:
    """The ``config.json`` at ``path`` as a dict with every current field (a field newer than the
    saved run: what that run did without it, ``LEGACY_VALUES``, else the default); None when there
    is no file. StudyError (one line) when it is unreadable: no stage can tell what it made."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise StudyError(f"{path} is unreadable ({err}), so no stage can tell what it was made with; "
                         "pass --overwrite to start a new run there") from None
    before = {**json.loads(config_json(StudyConfig())), **LEGACY_VALUES}
    return {k: previous.get(k, before.get(k)) for k in before}


def check_absorbable(previous: dict | None, current: dict) -> None:
    """StudyError (one line) when ``current`` (``config.json``'s dict of this run) differs from the
    saved run's ``previous`` in a field that no stage reads (``undeclared_fields``): no stage can
    rerun for it, so only ``--overwrite`` can. Fields of a stage are absorbed by ``plan``."""
    if previous is None:
        return
    changed = [k for k in undeclared_fields(current) if previous.get(k) != current.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {previous.get(k)!r} -> {current[k]!r}" for k in changed[:3])
        raise StudyError(f"the run in --output-dir was made with a different config ({diff}), and no stage "
                         "declares that field in study.fingerprint.STAGE_FIELDS, so no stage can rerun for "
                         "it; pass --overwrite to replace the run, or choose another --output-dir")


def legacy_fields(stage: str, previous: dict | None) -> dict | None:
    """The fields ``stage`` read in the saved run (``saved_config``'s dict), for a stage made
    before fingerprints."""
    return None if previous is None else stage_fields(stage, previous)
