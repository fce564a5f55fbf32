"""The run directory: which file each stage writes where. The one place that spells it out.

``RunLayout(output_dir)`` knows every output path of a study run; the stages write through it,
``orchestrate`` checks and removes through it, and the report reads through it. The table in
``ARCHITECTURE.md`` says which stage owns which output.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from study.files import DigestMismatchError, check_digests

#: The exported models, in the order the study reports them.
ONNX_MODELS: tuple[str, ...] = ("dense", "pruned", "pruned_quantized")


@dataclass(frozen=True)
class RunLayout:
    """Every output path of one run under ``root`` (the ``--output-dir``).

    Attributes are ``Path`` objects; ``onnx(name)`` is the path of one exported model
    (``name`` in ``ONNX_MODELS``). Nothing is created or read here.
    """

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    # stage 0: orchestrate
    @property
    def config(self) -> Path:
        """``config.json``: the StudyConfig the run was made with."""
        return self.root / "config.json"

    # stage 1: teacher
    @property
    def teacher_dir(self) -> Path:
        """The teacher's Ray Tune experiment (one trial)."""
        return self.root / "teacher"

    @property
    def teacher(self) -> Path:
        """``teacher.pt``: the frozen teacher (its best checkpoint)."""
        return self.root / "teacher.pt"

    # stage 2: students
    @property
    def students_dir(self) -> Path:
        """The students' Ray Tune experiment (one trial per setup)."""
        return self.root / "students"

    # stage 3: sparsify
    @property
    def onnx_dir(self) -> Path:
        """Folder of the exported ONNX models."""
        return self.root / "onnx"

    def onnx(self, name: str) -> Path:
        """Path of exported model ``name`` (one of ``ONNX_MODELS``); ValueError otherwise."""
        if name not in ONNX_MODELS:
            raise ValueError(f"unknown model {name!r}; allowed: {', '.join(ONNX_MODELS)}")
        return self.onnx_dir / f"{name}.onnx"

    def check_onnx(self, summary: dict) -> None:
        """Check that every exported model is still the file the sparsify stage recorded in
        ``summary`` (the content of ``sparsify/summary.json``; key ``sha256``: name -> hex digest).

        Raises ``study.files.DigestMismatchError`` (a ValueError, one line naming the file) when a
        file differs or is missing, or when the summary records no digests (an older version's)."""
        digests = summary.get("sha256")
        if not isinstance(digests, dict) or set(digests) != set(ONNX_MODELS):
            raise DigestMismatchError(f"{self.sparsify_summary} records no sha256 of {', '.join(ONNX_MODELS)} "
                                      "(an older version wrote it); delete it to export the models again")
        check_digests(digests, {name: self.onnx(name) for name in ONNX_MODELS},
                      remedy=f"delete {self.sparsify_summary} to export the models again")

    @property
    def sparsify_dir(self) -> Path:
        """Folder of the sparsify stage's records."""
        return self.root / "sparsify"

    @property
    def sparsify_summary(self) -> Path:
        """``sparsify/summary.json``, written last: its presence marks the stage done."""
        return self.sparsify_dir / "summary.json"

    @property
    def sparsify_history(self) -> Path:
        """``sparsify/history.csv``: one row per recipe epoch."""
        return self.sparsify_dir / "history.csv"

    @property
    def sparsify_checkpoint(self) -> Path:
        """``sparsify/recipe_checkpoint.pt``: the recipe's state after its latest finished epoch
        (model with masks and fake-quant state, optimizer, manager masks, epoch, history), what a
        rerun resumes from; removed once ``summary.json`` is written."""
        return self.sparsify_dir / "recipe_checkpoint.pt"

    @property
    def layer_sparsity(self) -> Path:
        """``sparsify/layer_sparsity.csv``: one row per prunable layer of the pruned model."""
        return self.sparsify_dir / "layer_sparsity.csv"

    # stage 4: bench
    @property
    def benchmark(self) -> Path:
        """``benchmark.csv``: throughput and latency per model, engine and batch size."""
        return self.root / "benchmark.csv"

    @property
    def onnx_accuracy(self) -> Path:
        """``onnx_accuracy.json``: each exported model's test accuracy in DeepSparse."""
        return self.root / "onnx_accuracy.json"

    # summary and report
    @property
    def results(self) -> Path:
        """``results.csv``: one row per model (written by orchestrate at the end)."""
        return self.root / "results.csv"

    @property
    def setups(self) -> Path:
        """``setups.csv``: one row per student setup, mean and 95 % interval over its seeds
        (written by orchestrate after the students stage; columns ``driver.stats.SETUP_COLUMNS``)."""
        return self.root / "setups.csv"

    @property
    def variants(self) -> Path:
        """``variants.csv``: one row per variant (setup and swept values, ``--sweep``), mean and 95 %
        interval over its seeds, the winner first (``driver.results.variants_table``); runs made
        before ``--sweep`` have only ``setups.csv``."""
        return self.root / "variants.csv"

    def report(self, suffix: str) -> Path:
        """``report.<suffix>`` (ipynb, html or pdf), written by the report stage."""
        return self.root / f"report.{suffix}"

    # fingerprints and reruns (``study.fingerprint``, ``study.reruns``)
    @property
    def fingerprints_dir(self) -> Path:
        """``fingerprints/``: one ``<stage>.json`` per stage, what it read (``study.fingerprint``)."""
        return self.root / "fingerprints"

    def fingerprint(self, stage: str) -> Path:
        """``fingerprints/<stage>.json``: the fingerprint of the inputs of ``stage``'s outputs."""
        return self.fingerprints_dir / f"{stage}.json"

    @property
    def staging(self) -> Path:
        """``rerun/``: where a stage that reruns makes its new outputs (an output dir of the same
        layout), moved over the old ones once complete."""
        return self.root / "rerun"

    @property
    def previous_dir(self) -> Path:
        """``previous/``: one ``<timestamp>/`` per run that reran a stage, holding the result tables
        and ``config.json`` from before it (kept by ``--overwrite`` too)."""
        return self.root / "previous"

    def previous_tables(self) -> list[Path]:
        """The result tables a rerun first copies into ``previous/<timestamp>/`` (with
        ``config.json`` and the fingerprints)."""
        return [self.config, self.results, self.setups, self.variants, self.sparsify_summary, self.benchmark,
                self.onnx_accuracy]

    def outputs(self) -> list[Path]:
        """Everything a run writes (what ``--overwrite`` removes); other files are kept."""
        return [self.config, self.teacher_dir, self.teacher, self.students_dir, self.onnx_dir,
                self.sparsify_dir, self.results, self.setups, self.variants, self.benchmark, self.onnx_accuracy,
                *(self.report(s) for s in ("ipynb", "html", "pdf")), self.fingerprints_dir, self.staging]

    def remove_outputs(self) -> None:
        """Delete everything ``outputs()`` names that exists (what ``--overwrite`` removes);
        other files in ``root`` are kept."""
        for target in self.outputs():
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
