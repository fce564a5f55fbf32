"""The stages in pipeline order (``PIPELINE``) and the one place that applies the rerun rule to a
stage (``run_stage``): skip, run, resume, restart or rerun, from what the stage declares
(``stages.base.Stage``) and the plan of the run (``driver.reruns.Reruns``)."""

from __future__ import annotations

from typing import Any

from stages import bench, sparsify, students, teacher
from stages.base import Context, Stage

#: The four stages of a run, in order (``study.STAGES``); the report is rendered from their files.
PIPELINE: tuple[Stage, ...] = (teacher.STAGE, students.STAGE, sparsify.STAGE, bench.STAGE)
#: Each stage by name.
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in PIPELINE}


def run_stage(stage: Stage, ctx: Context, reruns) -> Any:
    """Apply the plan to ``stage`` (``reruns``: ``driver.reruns.Reruns``) and return its outputs
    (``stage.load``). A skip is confirmed with what the stage reads now (``stage.extra_files``:
    a difference reruns it), its outputs checked (``stage.keep``) and its line printed. Otherwise
    the stage runs into the run directory or, for a rerun, ``rerun/``; its outputs are promoted
    and its fingerprint written once it has finished. StudyError from the stage passes through,
    leaving the previous outputs (or the unfinished attempt's fingerprint) in place."""
    current = reruns.current(stage, stage.extra_files(ctx))
    action = reruns.confirm(stage, current)
    if action == "skip":
        print(stage.keep(ctx), flush=True)
        return stage.load(ctx)
    changed = reruns.changed(stage, current)
    out = reruns.begin(stage, current)
    stage.run(ctx, out, action, changed)
    reruns.done(stage, current)
    return stage.load(ctx)
