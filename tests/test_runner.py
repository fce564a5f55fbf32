"""The runner (``stages.pipeline.run_stage``) on a stage that declares what it reads and writes:
skip, run and a staged rerun, with no rerun bookkeeping in the stage."""

from __future__ import annotations

import dataclasses
import json

import pytest

from stages.base import Stage
from study import RunLayout, StudyConfig, StudyError, make_config


class _Counter(Stage):
    """A stage for the runner alone: it reads ``lr`` and writes ``students/lr.txt``."""

    name, fields, outputs = "students", ("lr",), ("students",)

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls = fail, []

    def keep(self, ctx):
        return "[students] kept"

    def run(self, ctx, out, action, changed):
        old = ctx.layout.root / "students" / "lr.txt"
        self.calls.append((action, changed, out.root, old.read_text() if old.exists() else None))
        if self.fail:
            raise StudyError("boom")
        (out.root / "students").mkdir(parents=True, exist_ok=True)
        (out.root / "students" / "lr.txt").write_text(str(ctx.config.lr))

    def load(self, ctx):
        return (ctx.layout.root / "students" / "lr.txt").read_text()


def _apply(stage: Stage, config: StudyConfig, capsys) -> tuple:
    """``run_stage`` on ``stage`` as a run of ``config`` plans it: (what it returned, printed lines)."""
    from driver.reruns import Reruns, plan_run
    from stages.base import Context
    from stages.pipeline import run_stage

    capsys.readouterr()
    reruns = Reruns(config, plan_run([stage], config, {}), {})
    got = run_stage(stage, Context(config, None, RunLayout(config.output_dir)), reruns)
    return got, capsys.readouterr().out.splitlines()


def test_the_runner_skips_runs_and_stages_a_rerun_from_the_declaration(tmp_path, capsys):
    """run_stage on a stage that declares what it reads: a first run writes in place, the same
    inputs skip (its ``keep`` line, ``run`` not called), a changed field reruns into ``rerun/``
    (the old output untouched meanwhile) and is promoted with its fingerprint written after; a
    failed rerun leaves the old output and fingerprint. Catches rerun bookkeeping that a stage
    must do itself, a fingerprint written before the work is done, or a rerun over the old output."""
    config = make_config("smoke", output_dir=str(tmp_path / "run"))
    stage = _Counter()
    assert _apply(stage, config, capsys)[0] == "0.001" and stage.calls[-1][:2] == ("run", frozenset())
    recorded = json.loads((tmp_path / "run" / "fingerprints" / "students.json").read_text())
    assert recorded["complete"] is True and recorded["fields"] == {"lr": 0.001}
    assert _apply(stage, config, capsys) == ("0.001", ["[students] kept"]) and len(stage.calls) == 1
    changed = dataclasses.replace(config, lr=0.01)
    assert _apply(stage, changed, capsys)[0] == "0.01"
    assert stage.calls[-1] == ("rerun", frozenset({"lr"}), tmp_path / "run" / "rerun", "0.001")
    assert not (tmp_path / "run" / "rerun").exists()
    assert json.loads((tmp_path / "run" / "fingerprints" / "students.json").read_text())["fields"] == {"lr": 0.01}
    with pytest.raises(StudyError, match="boom"):
        _apply(_Counter(fail=True), config, capsys)
    assert (tmp_path / "run" / "students" / "lr.txt").read_text() == "0.01"
    assert json.loads((tmp_path / "run" / "fingerprints" / "students.json").read_text())["fields"] == {"lr": 0.01}
