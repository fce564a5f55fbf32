"""What a stage is to the runner: what it reads and writes (declared), its work (``run``) and how
its finished outputs are read back (``load``). The runner (``stages.pipeline.run_stage``) decides
skip, run, resume or rerun from the declarations; a stage's methods do no rerun bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study import RunLayout, StudyConfig


@dataclass
class Context:
    """What the stages of one run share: ``config``, ``data`` (``trainables.data.CIFAR10Tensors``),
    ``layout`` (the run directory) and, filled in by the runner as the stages finish, ``teacher``
    (``teacher.pt``), ``best`` (the trial the sparsify stage starts from,
    ``driver.results.sparsify_trial``) and ``summary`` (the sparsify stage's,
    ``RunLayout.read_sparsify``)."""

    config: StudyConfig
    data: Any
    layout: RunLayout
    teacher: Path | None = None
    best: Any = None
    summary: dict | None = None


class Stage:
    """One stage, declared: ``name`` (``study.STAGES``), ``fields`` (the StudyConfig fields it reads,
    each declared by the first stage that reads it), ``data`` (the splits it trains or tests on),
    ``code`` (its entry modules: with what they import from this project, the code in its
    fingerprint), ``outputs`` (the names it owns under the run directory), ``late_files`` (labels of
    input files known only once the earlier stages ran: ``extra_files``) and ``staged`` (whether a
    rerun makes its outputs in ``rerun/``; False: it rewrites its files atomically in place)."""

    name: str = ""
    fields: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    late_files: tuple[str, ...] = ()
    staged: bool = True

    def files(self, config: StudyConfig) -> dict[str, str]:
        """label -> path (relative to the run directory) of the files made by earlier stages that it
        reads (the files its own config fields name are added from ``fields``)."""
        return {}

    def extra_files(self, ctx: Context) -> dict[str, str]:
        """label -> path of the ``late_files``, now that the earlier stages ran."""
        return {}

    def extra_fields(self, config: StudyConfig) -> dict:
        """Inputs that are no config field, recorded among the fingerprint's ``fields``."""
        return {}

    def complete(self, layout: RunLayout, config: StudyConfig) -> bool:
        """Whether its outputs are complete in ``layout`` (default: every name of ``outputs`` exists)."""
        return all((layout.root / name).exists() for name in self.outputs)

    def keep(self, ctx: Context) -> str:
        """Check its finished outputs before they are kept (a skip): StudyError (one line) when they
        cannot be used. Returns the line the skip prints."""
        raise NotImplementedError

    def run(self, ctx: Context, out: RunLayout, action: str, changed: frozenset[str]) -> None:
        """Do the work, writing into ``out`` (the run directory, or ``rerun/`` for a staged rerun).
        ``action``: run, resume, restart or rerun; ``changed``: what differs from the recorded
        fingerprint (``study.fingerprint.changed_inputs``; empty when none is recorded)."""
        raise NotImplementedError

    def load(self, ctx: Context) -> Any:
        """Its finished outputs, read back from the run directory (after a skip or a run)."""
        raise NotImplementedError

    def promoted(self, layout: RunLayout) -> None:
        """Called once a rerun's outputs have moved from ``rerun/`` into the run directory ``layout``."""
