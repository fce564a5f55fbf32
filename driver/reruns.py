"""The run directory's side of reruns: each stage's current fingerprint, the plan of a run, the
``previous/`` archive of the result tables, and moving a rerun's new outputs over the old ones.

The rule itself (what is skipped, run or rerun) is ``study.reruns.plan``; what each stage reads is
``study.fingerprint``. A stage that reruns makes its new outputs in ``RunLayout.staging``
(``rerun/``, an output dir of the same layout) and ``promote`` moves them over the old ones only
once they are complete, so a failed or interrupted rerun leaves the previous results in place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from study import STAGES, RunLayout, StudyConfig
from study.config import config_json
from study.files import atomic_write_text
from study.fingerprint import (changed_inputs, differences, file_inputs, make_fingerprint, read_fingerprint,
                               stage_code, write_fingerprint)
from study.layout import STAGE_OUTPUTS, model_names, sparsity_targets
from study.requirements import runs_deepsparse
from study.reruns import Decision, StageState, plan


def stages_of(config: StudyConfig) -> tuple[str, ...]:
    """The stages this run goes through (``--stop-after``)."""
    return STAGES[:STAGES.index(config.stop_after) + 1]


def outputs_complete(layout: RunLayout, stage: str, config: StudyConfig | None = None) -> bool:
    """Whether ``stage``'s outputs are there (what the stages' own skip checks look at); for
    sparsify: every target's summary and every model of ``config``'s targets (default: one target,
    the recipe's own)."""
    if stage == "teacher":
        return layout.teacher.exists()
    if stage == "students":
        return layout.students_dir.is_dir()
    if stage == "sparsify":
        targets = sparsity_targets(config.sparsities if config else (), config.recipe if config else "",
                                   config.channel_ratios if config else ())
        return all(layout.target(t).sparsify_summary.exists() for t in targets) and \
            all(layout.onnx(n).exists() for n in model_names(targets))
    return layout.benchmark.exists() and layout.onnx_accuracy.exists()


def relative(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to the run directory ``root`` when it lies inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


def current_fingerprint(stage: str, config: StudyConfig, digests: dict, checkpoint: str | None = None,
                        complete: bool = True) -> dict:
    """The fingerprint of what ``stage`` reads now in ``config.output_dir``: its config fields and
    files (``study.fingerprint.file_inputs``), ``teacher.pt`` (students, sparsify), the winning
    checkpoint's ``model.pt`` (sparsify; ``checkpoint``, relative to the run directory or
    absolute), the ONNX models and ``deepsparse: True`` where DeepSparse runs (bench:
    ``study.requirements.runs_deepsparse``), the data ``digests`` (``trainables.digests``) and the
    source files the stage runs (``study.fingerprint.stage_code``)."""
    values = json.loads(config_json(config))
    files = file_inputs(stage, values)
    if stage in ("students", "sparsify"):
        files["teacher.pt"] = "teacher.pt"
    if stage == "sparsify" and checkpoint is not None:
        files["checkpoint"] = checkpoint
    if stage == "bench":
        files.update({f"{name}.onnx": f"onnx/{name}.onnx"
                      for name in model_names(sparsity_targets(config.sparsities, config.recipe, config.channel_ratios))})
    fingerprint = make_fingerprint(stage, values, digests, files, complete=complete, root=config.output_dir,
                                   code=stage_code(stage))
    if stage == "bench" and runs_deepsparse(config.deepsparse_python):
        # recorded only when DeepSparse runs: a bench made without it reruns once DeepSparse is
        # there (--deepsparse-python); one made with it is kept when a later run has none
        fingerprint["fields"]["deepsparse"] = True
    return fingerprint


def plan_run(config: StudyConfig, digests: dict) -> list[Decision]:
    """One ``Decision`` per stage of this run (``stages_of``), from the fingerprints recorded in
    ``config.output_dir`` and what each stage reads now. The sparsify stage's winning checkpoint is
    the one it recorded (the run itself checks the winner again once the students are known)."""
    layout = RunLayout(config.output_dir)
    states = {}
    for stage in stages_of(config):
        recorded = read_fingerprint(layout.fingerprint(stage))
        checkpoint = ((recorded or {}).get("files", {}).get("checkpoint") or {}).get("path")
        states[stage] = StageState(outputs_complete(layout, stage, config), recorded,
                                   current_fingerprint(stage, config, digests, checkpoint))
    return plan(states)


def archive_previous(layout: RunLayout) -> Path | None:
    """Copy the result tables and ``config.json`` of the run in ``layout`` (those that exist), with
    its fingerprints, into ``previous/<timestamp>/``; returns that folder (None: nothing to keep).
    Checkpoints and ONNX files are not kept."""
    tables = [p for p in layout.previous_tables() if p.exists()]
    if not tables:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = layout.previous_dir / stamp, 1
    while target.exists():
        n += 1
        target = layout.previous_dir / f"{stamp}-{n}"
    for path in tables:
        dest = target / path.relative_to(layout.root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    if layout.fingerprints_dir.is_dir():
        shutil.copytree(layout.fingerprints_dir, target / "fingerprints")
    return target


def clear_staging(layout: RunLayout) -> RunLayout:
    """An empty ``rerun/`` (what an earlier, unfinished rerun left there is removed); its layout."""
    if layout.staging.exists():
        shutil.rmtree(layout.staging)
    layout.staging.mkdir(parents=True)
    return RunLayout(layout.staging)


def discard(layout: RunLayout, stage: str) -> None:
    """Remove ``stage``'s outputs (an unfinished attempt whose inputs have changed since)."""
    for path in layout.stage_outputs(stage):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def promote(layout: RunLayout, stage: str) -> None:
    """Move ``stage``'s complete new outputs from ``rerun/`` over the old ones (each a rename), then
    empty ``rerun/``. The old checkpoints and ONNX files are deleted (the tables are in
    ``previous/``)."""
    staged, trash = layout.staging, layout.staging / ".old"
    trash.mkdir(exist_ok=True)
    for name in STAGE_OUTPUTS[stage]:
        new, old = staged / name, layout.root / name
        if not new.exists():
            continue
        if new.is_dir() and old.exists():
            os.replace(old, trash / name)
        os.replace(new, old)  # a file: atomic over the old one
    if stage == "sparsify":  # each summary names its models by path: now the ones in the run directory
        for path in layout.sparsify_dir.glob("summary*.json"):
            summary = json.loads(path.read_text())
            summary["onnx"] = {name: str(layout.onnx(name)) for name in summary.get("onnx", {})}
            atomic_write_text(path, json.dumps(summary, indent=2))
    shutil.rmtree(staged)


class Reruns:
    """What this run does with each stage (``plan_run``'s decisions), and the bookkeeping around a
    stage: ``begin`` says where it writes (the run directory, or ``rerun/`` for a rerun) and records
    an unfinished attempt; ``done`` moves a rerun's outputs in place and records the fingerprint."""

    def __init__(self, config: StudyConfig, decisions: list[Decision], digests: dict) -> None:
        self.config, self.digests = config, digests
        self.layout = RunLayout(config.output_dir)
        self.decisions = {d.stage: d for d in decisions}
        self.pending: dict[str, dict] = {}

    def action(self, stage: str) -> str:
        return self.decisions[stage].action

    def staged(self, stage: str) -> bool:
        """Whether ``stage`` makes its new outputs in ``rerun/`` (a rerun; bench writes its two
        files atomically at its end, so it reruns in place)."""
        return self.action(stage) == "rerun" and stage != "bench"

    def begin(self, stage: str, checkpoint: str | None = None) -> RunLayout:
        """Start ``stage`` (``checkpoint``: the sparsify stage's winning ``model.pt``); returns the
        layout it writes to. A stage to be skipped is checked once more with what it reads now (the
        winning checkpoint is known only here): a difference turns it, and every later stage, into a
        rerun, with one line saying why."""
        layout = self.layout
        current = current_fingerprint(stage, self.config, self.digests,
                                      None if checkpoint is None else relative(checkpoint, layout.root))
        self.pending[stage] = current
        if self.action(stage) == "skip":
            changed = differences(read_fingerprint(layout.fingerprint(stage)) or {}, current)
            if not changed:
                return layout
            self._rerun_from(stage, "; ".join(changed))
        action = self.action(stage)
        if action == "restart":
            discard(layout, stage)
        if action in ("run", "resume", "restart"):
            write_fingerprint(layout.fingerprint(stage), {**current, "complete": False})
        return clear_staging(layout) if self.staged(stage) else layout

    def _rerun_from(self, stage: str, reason: str) -> None:
        stages = list(self.decisions)
        for later in stages[stages.index(stage):]:
            old = self.decisions[later]
            if later == stage:
                new = Decision(stage, "rerun", reason)
            elif old.action == "skip":
                new = Decision(later, "rerun", f"{stage} reruns first")
            else:
                continue
            self.decisions[later] = new
            print(new.line(), flush=True)

    def done(self, stage: str) -> None:
        """``stage`` finished (or was kept): a rerun's outputs replace the old ones, then its
        fingerprint (``complete``) is recorded."""
        if self.staged(stage):
            promote(self.layout, stage)
        if self.action(stage) != "skip":
            write_fingerprint(self.layout.fingerprint(stage), {**self.pending[stage], "complete": True})

    def changed(self, stage: str, checkpoint: str | None = None) -> set[str] | None:
        """What ``stage`` reads now (``checkpoint``: as for ``begin``) differently from what its
        recorded fingerprint says (``study.fingerprint.changed_inputs``); None when none is recorded.
        Call it before ``begin``, which records the current inputs of a stage that runs in place."""
        recorded = read_fingerprint(self.layout.fingerprint(stage))
        current = current_fingerprint(stage, self.config, self.digests,
                                      None if checkpoint is None else relative(checkpoint, self.layout.root))
        return None if recorded is None else changed_inputs(recorded, current)

    def reruns_any(self) -> bool:
        return any(d.action in ("rerun", "restart") for d in self.decisions.values())
