"""The run directory's side of reruns: each stage's current fingerprint, the plan of a run, the
``previous/`` archive of the result tables, moving a rerun's new outputs over the old ones, and
``Reruns``, the bookkeeping the runner (``stages.pipeline.run_stage``) does around each stage.

Every function takes the stage's declaration (``stages.base.Stage``: ``name``, ``fields``,
``data``, ``code``, ``outputs``, its files and extra fields) as an argument. The rule itself (what
is skipped, run or rerun) is ``study.reruns.plan``. A stage that reruns makes its new outputs in
``RunLayout.staging`` (``rerun/``, an output dir of the same layout) and ``promote`` moves them over
the old ones only once they are complete, so a failed or interrupted rerun leaves the previous
results in place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from study import STAGES, RunLayout, StudyConfig
from study.config import config_json
from study.fingerprint import (changed_inputs, differences, file_inputs, make_fingerprint, read_fingerprint,
                               write_fingerprint)
from study.reruns import Decision, StageState, plan
from study.sources import code_digests


def stages_of(config: StudyConfig, stages) -> list:
    """The ones of ``stages`` (declarations, pipeline order) this run goes through (``--stop-after``)."""
    last = STAGES.index(config.stop_after)
    return [stage for stage in stages if STAGES.index(stage.name) <= last]


def relative(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to the run directory ``root`` when it lies inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


def current_fingerprint(stage, config: StudyConfig, digests: dict, late: dict[str, str] | None = None,
                        complete: bool = True) -> dict:
    """The fingerprint of what ``stage`` (a declaration) reads now in ``config.output_dir``: its
    config fields and the files they name (``study.fingerprint.file_inputs``), the files it
    declares (``stage.files``: made by earlier stages), ``late`` (label -> path, relative to the
    run directory or absolute: files known only once the earlier stages ran, ``stage.late_files``),
    its extra fields (``stage.extra_fields``), the data ``digests`` (``trainables.digests``) and
    the source files it runs (``stage.code`` and what it imports, ``study.sources``)."""
    values = json.loads(config_json(config))
    files = {**file_inputs(stage.fields, values), **stage.files(config), **(late or {})}
    fingerprint = make_fingerprint(stage, values, digests, files, complete=complete, root=config.output_dir,
                                   code=code_digests(stage.code))
    fingerprint["fields"].update(stage.extra_fields(config))
    return fingerprint


def plan_run(stages, config: StudyConfig, digests: dict) -> list[Decision]:
    """One ``Decision`` per stage of this run (``stages_of`` of the declarations ``stages``), from
    the fingerprints recorded in ``config.output_dir`` and what each stage reads now. A file known
    only once the earlier stages ran (``stage.late_files``: the sparsify stage's winning
    checkpoint) is the one the stage recorded; the runner checks it again when it gets there."""
    layout = RunLayout(config.output_dir)
    states = {}
    for stage in stages_of(config, stages):
        recorded = read_fingerprint(layout.fingerprint(stage.name))
        files = (recorded or {}).get("files", {})
        late = {label: files[label]["path"] for label in stage.late_files if (files.get(label) or {}).get("path")}
        states[stage.name] = StageState(stage.complete(layout, config), recorded,
                                        current_fingerprint(stage, config, digests, late))
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


def discard(layout: RunLayout, stage) -> None:
    """Remove ``stage``'s outputs (``stage.outputs``; an unfinished attempt whose inputs have
    changed since)."""
    for path in (layout.root / name for name in stage.outputs):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def promote(layout: RunLayout, stage) -> None:
    """Move ``stage``'s complete new outputs (``stage.outputs``) from ``rerun/`` over the old ones
    (each a rename), let the stage fix what names their place (``stage.promoted``), then empty
    ``rerun/``. The old checkpoints and ONNX files are deleted (the tables are in ``previous/``)."""
    staged, trash = layout.staging, layout.staging / ".old"
    trash.mkdir(exist_ok=True)
    for name in stage.outputs:
        new, old = staged / name, layout.root / name
        if not new.exists():
            continue
        if new.is_dir() and old.exists():
            os.replace(old, trash / name)
        os.replace(new, old)  # a file: atomic over the old one
    stage.promoted(layout)
    shutil.rmtree(staged)


class Reruns:
    """What this run does with each stage (``plan_run``'s decisions) and the bookkeeping around a
    stage: ``confirm`` checks a skip once more with what the stage reads now, ``begin`` says where
    it writes (the run directory, or ``rerun/`` for a rerun) and records an unfinished attempt,
    ``done`` moves a rerun's outputs in place and records the fingerprint."""

    def __init__(self, config: StudyConfig, decisions: list[Decision], digests: dict) -> None:
        self.config, self.digests = config, digests
        self.layout = RunLayout(config.output_dir)
        self.decisions = {d.stage: d for d in decisions}

    def action(self, name: str) -> str:
        return self.decisions[name].action

    def current(self, stage, late: dict[str, str]) -> dict:
        """``current_fingerprint`` of ``stage`` with its late files ``late`` (label -> path)."""
        late = {label: relative(path, self.layout.root) for label, path in late.items()}
        return current_fingerprint(stage, self.config, self.digests, late)

    def confirm(self, stage, current: dict) -> str:
        """The action for ``stage``. A stage to be skipped is checked once more with ``current``
        (the winning checkpoint is known only now): a difference turns it, and every later stage,
        into a rerun, with one line saying why."""
        if self.action(stage.name) == "skip":
            changed = differences(read_fingerprint(self.layout.fingerprint(stage.name)) or {}, current)
            if changed:
                self._rerun_from(stage.name, "; ".join(changed))
        return self.action(stage.name)

    def changed(self, stage, current: dict) -> frozenset[str]:
        """What ``stage`` reads now (``current``) differently from what its recorded fingerprint
        says (``study.fingerprint.changed_inputs``); empty when none is recorded. Ask before
        ``begin``, which records the current inputs of a stage that runs in place."""
        recorded = read_fingerprint(self.layout.fingerprint(stage.name))
        return frozenset() if recorded is None else frozenset(changed_inputs(recorded, current))

    def staged(self, stage) -> bool:
        """Whether ``stage`` makes its new outputs in ``rerun/`` (a rerun of a stage whose
        ``staged`` is set; bench writes its two files atomically at its end, so it reruns in place)."""
        return self.action(stage.name) == "rerun" and stage.staged

    def begin(self, stage, current: dict) -> RunLayout:
        """Start ``stage`` (not a skip) with inputs ``current``; returns the layout it writes to.
        A restart first discards the unfinished outputs; a run, resume or restart records
        ``current`` as unfinished; a rerun gets an empty ``rerun/``."""
        action = self.action(stage.name)
        if action == "restart":
            discard(self.layout, stage)
        if action in ("run", "resume", "restart"):
            write_fingerprint(self.layout.fingerprint(stage.name), {**current, "complete": False})
        return clear_staging(self.layout) if self.staged(stage) else self.layout

    def done(self, stage, current: dict) -> None:
        """``stage`` finished: a rerun's outputs replace the old ones, then its fingerprint
        (``current``, ``complete``) is recorded."""
        if self.staged(stage):
            promote(self.layout, stage)
        write_fingerprint(self.layout.fingerprint(stage.name), {**current, "complete": True})

    def _rerun_from(self, name: str, reason: str) -> None:
        names = list(self.decisions)
        for later in names[names.index(name):]:
            old = self.decisions[later]
            if later == name:
                new = Decision(name, "rerun", reason)
            elif old.action == "skip":
                new = Decision(later, "rerun", f"{name} reruns first")
            else:
                continue
            self.decisions[later] = new
            print(new.line(), flush=True)

    def reruns_any(self) -> bool:
        return any(d.action in ("rerun", "restart") for d in self.decisions.values())
