"""Which stages a run skips, runs or reruns: its fingerprints compared, stage by stage, in pipeline
order; and whether the run directory can be planned at all (``check_output_dir``).

``plan`` is pure: it gets, per stage, whether the stage's outputs are there, the fingerprint it
recorded (``study.fingerprint``) and the fingerprint of what it would read now, and returns one
``Decision`` per stage. The rule:

* outputs complete and the same inputs: ``skip``; other inputs: ``rerun`` (the new outputs replace
  the old ones once complete), and every later stage reruns too (it reads what this one makes);
* an attempt interrupted in place (fingerprint with ``complete: false``): ``resume`` with the same
  inputs, else ``restart`` (its unfinished outputs are discarded);
* no outputs: ``run``.

A stage's outputs without its fingerprint (a run made before fingerprints existed) are refused
before any plan, by ``check_output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

from study.config import STAGES, StudyConfig, StudyError
from study.fingerprint import differences
from study.layout import RunLayout

#: Actions that make new outputs (what makes every later stage with outputs rerun).
MAKES_OUTPUTS = ("run", "resume", "restart", "rerun")


@dataclass(frozen=True)
class Decision:
    """What the run does with one stage: ``action`` (skip, run, resume, restart, rerun) and
    ``reason`` (why, one phrase)."""

    stage: str
    action: str
    reason: str

    def line(self, dry_run: bool = False) -> str:
        """``[sparsify] rerun: recipe r.yaml changed (sha256 3f2a… -> 9b1c…)``; with ``dry_run``
        ``[sparsify] would rerun: ...``."""
        return f"[{self.stage}] {'would ' if dry_run else ''}{self.action}: {self.reason}"


@dataclass(frozen=True)
class StageState:
    """What ``plan`` knows of one stage: ``outputs`` (its complete outputs are there), ``recorded``
    (its fingerprint file, or None) and ``current`` (the fingerprint of what it would read now)."""

    outputs: bool
    recorded: dict | None
    current: dict | None


def _decide(stage: str, state: StageState, upstream: Decision | None) -> Decision:
    """The decision for one stage; ``upstream``: the first earlier stage that makes new outputs."""
    recorded = state.recorded
    unfinished = recorded is not None and not recorded.get("complete")
    if upstream is not None:
        reason = f"{upstream.stage} {'reruns' if upstream.action == 'rerun' else 'runs'} first"
        if unfinished:
            return Decision(stage, "restart", reason + "; its unfinished outputs are discarded")
        return Decision(stage, "rerun", reason) if state.outputs else Decision(stage, "run", "no outputs yet")
    if unfinished:
        changed = differences(recorded, state.current)
        return (Decision(stage, "restart", "interrupted, and since then " + "; ".join(changed)
                         + ": its unfinished outputs are discarded") if changed else
                Decision(stage, "resume", "interrupted earlier with the same inputs: resuming"))
    if not state.outputs:
        return Decision(stage, "run", "no outputs yet")
    if recorded is None:  # check_output_dir refuses such a run directory first
        return Decision(stage, "rerun", "its outputs have no fingerprint")
    changed = differences(recorded, state.current)
    return Decision(stage, "rerun", "; ".join(changed)) if changed else Decision(stage, "skip", "inputs unchanged")


def plan(states: dict[str, StageState]) -> list[Decision]:
    """One Decision per stage of ``states`` (pipeline order, ``STAGES``); rule: module docstring."""
    decisions: list[Decision] = []
    upstream = None
    for stage in (s for s in STAGES if s in states):
        decision = _decide(stage, states[stage], upstream)
        if decision.action in MAKES_OUTPUTS and upstream is None:
            upstream = decision
        decisions.append(decision)
    return decisions


class Owns(Protocol):
    """What a stage declares it writes (``stages.base.Stage``): its ``name`` and ``outputs``, the
    names under the run directory it owns."""

    name: str
    outputs: tuple[str, ...]


def unfingerprinted_stages(layout: RunLayout, stages: Iterable[Owns]) -> list[str]:
    """The names of ``stages`` whose outputs (any of them) are in ``layout`` without their
    fingerprint file: a run made before fingerprints existed."""
    return [stage.name for stage in stages if any((layout.root / name).exists() for name in stage.outputs)
            and not layout.fingerprint(stage.name).exists()]


def check_output_dir(config: StudyConfig, overwrite: bool, stages: Iterable[Owns]) -> bool:
    """Whether ``--output-dir`` holds an earlier run that ``overwrite`` (``--overwrite``) is to
    replace (``RunLayout.remove_outputs``, once every other check has passed). Without ``overwrite``
    a changed config is no reason to refuse: the stages that read the changed field rerun
    (``plan``). ``stages``: every stage's declared outputs (``Owns``). StudyError (one line;
    nothing is touched) when a stage's outputs are there without its fingerprint
    (``unfingerprinted_stages``): nothing can tell what they were made with."""
    layout = RunLayout(config.output_dir)
    old = unfingerprinted_stages(layout, stages)
    if overwrite:
        return layout.config.exists() or bool(old)
    if old:
        raise StudyError(f"--output-dir {config.output_dir} holds {', '.join(old)} outputs without their "
                         "fingerprints (a run made before fingerprints existed), so no stage can tell what they "
                         "were made with; pass --overwrite to replace that run, or choose a new --output-dir")
    return False
