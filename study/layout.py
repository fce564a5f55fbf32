"""The run directory: which file each stage writes where. The one place that spells it out.

``RunLayout(output_dir)`` knows every output path of a study run; the stages write through it,
``orchestrate`` checks and removes through it, and the report reads through it. The table in
``ARCHITECTURE.md`` says which stage owns which output.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from study.files import DigestMismatchError, check_digests

#: The QAT model exported as a QDQ graph (QuantizeLinear/DequantizeLinear around float Conv/Gemm,
#: ``convert_qat=False``): the form OpenVINO and onnxruntime run in INT8; ``pruned_quantized`` is the
#: same model as ConvInteger/MatMulInteger (``convert_qat=True``), the form DeepSparse runs.
QDQ_MODEL = "pruned_quantized_qdq"
#: The models each sparsity target exports (their file names carry the target's tag), in report order.
SPARSE_MODELS: tuple[str, ...] = ("pruned", "pruned_quantized", QDQ_MODEL)
#: The exported models of one sparsity target, in the order the study reports them.
ONNX_MODELS: tuple[str, ...] = ("dense", *SPARSE_MODELS)
#: The dense model, INT8 by static post-training quantization (``trainables.compress.ptq``): the
#: peer a user would try first, made by the sparsify stage next to ``dense``.
PTQ_MODEL = "dense_int8"
#: The models each structured target exports (``--channel-ratios``; file names ``structured<tag>``,
#: ``structured<tag>_int8``): the thinned FP32 model and it INT8 by NNCF PTQ (QDQ).
STRUCTURED_KINDS: tuple[str, ...] = ("structured", "structured_int8")
#: The models made once per run (not per target), in report order.
DENSE_MODELS: tuple[str, ...] = ("dense", PTQ_MODEL)
_MODEL_NAME = re.compile(r"^(dense|dense_int8|(pruned|pruned_quantized|pruned_quantized_qdq)(_s\d+(p\d+)?)?"
                         r"|structured_c\d+(p\d+)?(_int8)?)$")


class Target(NamedTuple):
    """One target of the sparsify stage, its own Ray task. Unstructured (``ratio`` None):
    ``sparsity`` is the recipe's ``final_sparsity`` for its task (None: the recipe's own, not
    overridden). Structured: ``ratio`` is the fraction of channels removed (``--channel-ratios``).
    ``tag`` is the suffix of its outputs (``""``: the names a default run always had; ``_s50``;
    ``_c50``)."""

    sparsity: Optional[float]
    tag: str
    ratio: Optional[float] = None

    @property
    def structured(self) -> bool:
        """Whether this is a structured-pruning target (``--channel-ratios``)."""
        return self.ratio is not None

    @property
    def models(self) -> tuple[str, ...]:
        """The models this target exports: ``(pruned<tag>, pruned_quantized<tag>,
        pruned_quantized_qdq<tag>)`` (``SPARSE_MODELS``), or ``(structured<tag>,
        structured<tag>_int8)`` for a structured target."""
        if self.structured:
            return tuple(kind.replace("structured", f"structured{self.tag}") for kind in STRUCTURED_KINDS)
        return tuple(f"{kind}{self.tag}" for kind in SPARSE_MODELS)


def recipe_sparsity(recipe: str | os.PathLike) -> Optional[float]:
    """The recipe file's top-level ``final_sparsity`` when it is a plain number, else None (also
    for a file that cannot be read: the recipe loader reports that, in one line)."""
    import yaml

    class _Loader(yaml.SafeLoader):  # the modifiers' ``!Tag`` nodes are read as plain values
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        value = (yaml.load(Path(recipe).read_text(), Loader=_Loader) or {}).get("final_sparsity")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def target_tag(sparsity: float, own: Optional[float]) -> str:
    """The suffix of a target's outputs: ``""`` when it is the recipe's own ``final_sparsity``
    ``own`` (0.8 in ``recipes/prune_quantize.yaml``: a default run's names), else
    ``_s<percent>`` (``0.5`` -> ``_s50``, ``0.875`` -> ``_s87p5``)."""
    if own is not None and float(sparsity) == float(own):
        return ""
    return percent_tag("_s", sparsity)


def percent_tag(prefix: str, fraction: float) -> str:
    """``prefix`` and ``fraction`` in percent, ``.`` as ``p``: ``("_c", 0.5)`` -> ``_c50``,
    ``("_s", 0.875)`` -> ``_s87p5``."""
    return prefix + f"{round(float(fraction) * 100, 4):g}".replace(".", "p")


def sparsity_targets(sparsities, recipe: str | os.PathLike, channel_ratios=()) -> list[Target]:
    """The run's targets: one per ``--sparsities`` value (in the order given), or, with none given,
    the recipe's own ``final_sparsity`` alone (untagged, not overridden); then one structured
    target per ``--channel-ratios`` value (``channel_ratios``, tag ``_c<percent>``)."""
    structured = [Target(None, percent_tag("_c", r), float(r)) for r in channel_ratios or ()]
    if not sparsities:
        return [Target(None, ""), *structured]
    own = recipe_sparsity(recipe)
    return [*(Target(float(s), target_tag(s, own)) for s in sparsities), *structured]


def model_names(targets) -> list[str]:
    """Every model of a run with these ``Target``s, in report order: ``dense``, ``dense_int8``,
    then each target's ``models`` (pruned, pruned_quantized, pruned_quantized_qdq; or structured,
    structured_int8)."""
    return [*DENSE_MODELS, *(name for t in targets for name in t.models)]


def dense_owner(targets) -> Target:
    """The target whose task exports ``dense`` and ``dense_int8``: the untagged one when there is
    one, else the first (the other tasks leave those files alone: no two tasks write one file).
    ``sparsity_targets`` always puts an unstructured target first."""
    return next((t for t in targets if t.tag == ""), targets[0])


@dataclass(frozen=True)
class RunLayout:
    """Every output path of one run under ``root`` (the ``--output-dir``).

    Attributes are ``Path`` objects; ``onnx(name)`` is the path of one exported model (a name of
    ``model_names``). The ``sparsify_*`` records (summary, history, layer sparsity, recipe
    checkpoint) carry ``tag`` (a ``Target.tag``; default ``""``: a default run's names). Nothing is
    created or read here.
    """

    root: Path
    tag: str

    def __init__(self, root: str | os.PathLike, tag: str = ""):
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "tag", str(tag))

    def target(self, target: Target) -> "RunLayout":
        """The same run directory, its ``sparsify_*`` paths those of ``target``."""
        return RunLayout(self.root, target.tag)

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
        """Path of exported model ``name`` (``dense``, ``dense_int8``, ``pruned[_s<pct>]``,
        ``pruned_quantized[_s<pct>]``, ``pruned_quantized_qdq[_s<pct>]``); ValueError otherwise."""
        if not _MODEL_NAME.match(str(name)):
            raise ValueError(f"unknown model {name!r}; allowed: dense, dense_int8, pruned[_s<percent>], "
                             "pruned_quantized[_s<percent>], pruned_quantized_qdq[_s<percent>], "
                             "structured_c<percent>[_int8]")
        return self.onnx_dir / f"{name}.onnx"

    def check_onnx(self, summary: dict, models=None) -> None:
        """Check that every exported model is still the file the sparsify stage recorded in
        ``summary`` (the content of ``sparsify/summary.json``, or the stage's merged summary; key
        ``sha256``: name -> hex digest). ``models``: the names it must record (default: dense,
        dense_int8 and the pruned models of this layout's tag).

        Raises ``study.files.DigestMismatchError`` (a ValueError, one line naming the file) when a
        file differs or is missing, or when the summary lacks a digest (an older version's)."""
        digests = summary.get("sha256")
        wanted = list(models) if models is not None else model_names([Target(None, self.tag)])
        if not isinstance(digests, dict) or not set(wanted) <= set(digests):
            raise DigestMismatchError(f"{self.sparsify_summary} records no sha256 of {', '.join(wanted)} "
                                      "(an older version wrote it); delete it to export the models again")
        check_digests({name: digests[name] for name in wanted}, {name: self.onnx(name) for name in wanted},
                      remedy=f"delete {self.sparsify_summary} to export the models again")

    def read_sparsify(self, targets) -> dict:
        """The sparsify stage's summary over ``targets`` (``Target``s): the summary of
        ``dense_owner(targets)`` (``sparsify/summary<tag>.json``; all of it for a default run),
        with ``targets`` (each target's own summary, in order) and ``sha256`` / ``onnx`` of every
        model of every target. Raises OSError / ValueError when a summary is missing or not JSON."""
        import json

        own = {t: json.loads(self.target(t).sparsify_summary.read_text()) for t in targets}
        merged = dict(own[dense_owner(targets)])
        merged["targets"] = [own[t] for t in targets]
        merged["sha256"] = {k: v for one in own.values() for k, v in one.get("sha256", {}).items()}
        merged["onnx"] = {k: v for one in own.values() for k, v in one.get("onnx", {}).items()}
        return merged

    @property
    def sparsify_dir(self) -> Path:
        """Folder of the sparsify stage's records."""
        return self.root / "sparsify"

    @property
    def sparsify_summary(self) -> Path:
        """``sparsify/summary.json``, written last: its presence marks the stage done."""
        return self.sparsify_dir / f"summary{self.tag}.json"

    @property
    def sparsify_history(self) -> Path:
        """``sparsify/history.csv``: one row per recipe epoch."""
        return self.sparsify_dir / f"history{self.tag}.csv"

    @property
    def sparsify_checkpoint(self) -> Path:
        """``sparsify/recipe_checkpoint.pt``: the recipe's state after its latest finished epoch
        (model with masks and fake-quant state, optimizer, manager masks, epoch, history), what a
        rerun resumes from; removed once ``summary.json`` is written."""
        return self.sparsify_dir / f"recipe_checkpoint{self.tag}.pt"

    @property
    def layer_sparsity(self) -> Path:
        """``sparsify/layer_sparsity.csv``: one row per prunable layer of the pruned model."""
        return self.sparsify_dir / f"layer_sparsity{self.tag}.csv"

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
