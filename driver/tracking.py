"""MLflow tracking of a study, on request (``--mlflow``); off by default, and then MLflow is never imported.

Everything is logged from the driver, after each stage, from the files the stage wrote
(``study.RunLayout``), never from inside a Ray task or a Tune trial:

- one MLflow experiment per output directory (named by its resolved path);
- a parent run for the study (``stage=study``): the config as params (the fields outside
  ``RUNTIME_FIELDS``; those, which may change on a resume, as ``runtime.<field>`` tags), the
  decision rule as a tag, and at the end ``config.json``, ``results.csv``, ``setups.csv`` and
  ``report.pdf`` (when built) as artefacts;
- under it (tag ``mlflow.parentRunId``), one run per Tune trial that finished (``stage=teacher``/
  ``students``, tags ``trial_id``, ``trial_dir``, ``setup``, ``seed``): the trial's ``params.json`` as
  params and every epoch of its ``result.json`` (``TRIAL_METRICS`` and each ``loss_<term>``) at step =
  epoch. A trial that errored and that Tune restarted (``Tuner.restore(restart_errored=True)`` gives
  it a new trial id and folder; the errored one's folder stays in the experiment) has no run: only
  the trials in Tune's experiment state are logged (``final_trials``);
- one run per sparsity target's recipe (``stage=sparsify``, run name ``recipe<tag>``): every row
  of ``sparsify/history<tag>.csv`` at step = its epoch (accuracy, sparsity, loss terms, learning
  rate, ``quantized`` 0/1, ``precision_bits``), the numbers of ``summary<tag>.json``, tags
  ``sha256_<model>`` / ``onnx_<model>`` per exported model, its ONNX files and ``sparsify/*<tag>.*``
  as artefacts;
- one run for the benchmark (``stage=bench``): every row of ``benchmark.csv`` as metrics
  ``<model>/<engine>/batch_<n>/<column>``, ``onnx_test_acc/<model>``, and both files as artefacts.

Why not Tune callbacks (Ray's ``MLflowLoggerCallback`` or one of ours): Tune pickles them into
``tuner.pkl``, so a restored experiment runs its first start's callbacks, and a resume would start
new MLflow runs (docs/tracking.md). Reading the stage's files after it is the same code for a
fresh, a resumed and a skipped stage.

Resume and reruns: the parent is found again by ``study_dir`` + ``config_digest``. Each child run
mirrors one version of one thing: tag ``slot`` says what (``teacher``, ``students/<variant> seed
<n>``, ``sparsify/recipe<tag>``, ``bench``), tag ``key`` which version: the trial id for a trial
(a stage that reruns makes new trials, with new ids), the sha256 of the files it mirrors for a
recipe or the benchmark (the summary, whose ``sha256`` names the ONNX files, and the history and
layer table; ``benchmark.csv`` and ``onnx_accuracy.json``). The same files find the same run, and
only (metric, step) pairs not yet in it are logged: running the same command again adds no run
and no metric step, and a resumed trial adds its new epochs. Files that changed (a rerun: an
edited recipe, DeepSparse found, ``--overwrite``) get a new child run, and every other run of that
slot is tagged ``superseded_by`` = the new run's id (status left as it was): the runs without
``superseded_by`` are the current ones; no value of a run is ever replaced. The parent's artefacts
(the tables, ``report.pdf``) are the run directory's current ones: replaced when their sha256
differs. Each artefact's sha256 is a tag of its run, ``artifact_sha256/<path>``; an artefact is
uploaded when it differs from that (a same-sized file is not taken for the same).

The ONNX files are not touched (their sha256, recorded in ``sparsify/summary.json``, is checked by
later stages): the recipe run carries each file's digest (tag ``sha256_<model>``) and path, and each
file's ``metadata_props`` name its ``source_trial``, the ``trial_dir`` tag of the student's run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from driver.tracking_files import (TRIAL_METRICS, as_number, csv_rows, final_trials, history_metrics,  # noqa: F401
                                   json_digest, read_trial, trial_metrics)
from study import RunLayout, StudyConfig, StudyError, decision_rule
from study.config import RUNTIME_FIELDS, variant_label
from study.files import sha256_file

#: ``--mlflow local``: a file store in ``<output-dir>/mlruns``.
LOCAL = "local"
#: Columns of ``benchmark.csv`` logged as metrics (the other columns are tags of the run).
BENCH_METRICS = ("items_per_sec", "latency_mean_ms", "latency_p50_ms", "latency_p99_ms")
#: Experiment subfolders of the Tune stages (``RunLayout``).
TUNE_STAGES = ("teacher", "students")
#: Seconds the start-up probe waits for a tracking server.
PROBE_TIMEOUT_S = 10


def tracking_uri(config: StudyConfig) -> str | None:
    """The tracking URI of ``--mlflow``: None (off), ``file://<output-dir>/mlruns`` for ``local``,
    else the URI as given."""
    if config.mlflow is None:
        return None
    if config.mlflow == LOCAL:
        return (Path(config.output_dir).resolve() / "mlruns").as_uri()
    return config.mlflow


def config_digest(config: StudyConfig) -> str:
    """sha256 (16 hex digits) of the fields that define what the study computes (all but
    ``RUNTIME_FIELDS``): the same study resumed has the same digest, one made with ``--overwrite``
    and another config a new one (and so a new parent run)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:16]


class NullTracker:
    """What ``open_tracker`` returns without ``--mlflow``: every hook does nothing."""

    def sync(self, stage: str) -> None:
        pass

    def finish(self, code: int = 0) -> int:
        return code


def open_tracker(config: StudyConfig) -> "Tracker | NullTracker":
    """The study's tracker: a ``NullTracker`` without ``--mlflow`` (MLflow not imported), else a
    ``Tracker`` on the parent run of this study (found again on a resume, else created).
    StudyError (one line) before anything has been trained, as ``check_tracking``."""
    if config.mlflow is None:
        return NullTracker()
    client = check_tracking(config)
    tracker = Tracker(client, config)
    shown = f"mlflow ui --backend-store-uri {Path(config.output_dir).resolve() / 'mlruns'}" \
        if config.mlflow == LOCAL else tracking_uri(config)
    print(f"[mlflow] experiment {tracker.study_dir}, study run {tracker.parent_id}: {shown}", flush=True)
    return tracker


def check_tracking(config: StudyConfig, probe: bool = True):
    """The ``MlflowClient`` of ``--mlflow``. StudyError (one line) when MLflow is not installed, the
    URI is not one MLflow accepts, or the server does not answer. ``probe=False`` (``--dry-run``):
    only the first check, no store opened, None returned."""
    try:
        from mlflow.tracking import MlflowClient  # optional package (the tracking extra): only with --mlflow
    except ModuleNotFoundError as err:
        raise StudyError(f"--mlflow needs MLflow ({err}): pip install -e '.[tracking]'") from None
    if not probe:
        return None
    uri = tracking_uri(config)
    try:
        client = MlflowClient(tracking_uri=uri)
    except Exception as err:  # e.g. UnsupportedModelRegistryStoreURIException for an unknown scheme
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise StudyError(f"--mlflow {config.mlflow}: not a tracking URI MLflow accepts ({detail}); use local, "
                         "http(s)://HOST:PORT, file:///PATH, sqlite:///PATH or databricks") from None
    _probe(client, uri)
    return client


def _probe(client, uri: str) -> None:
    """StudyError unless the tracking store at ``uri`` answers, within ``PROBE_TIMEOUT_S`` and
    without MLflow's retries (which back off for minutes)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_TIMEOUT_S))
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # requests' ConnectionError, MlflowException, ...: the cause's first line
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise StudyError(f"--mlflow {uri}: the tracking server does not answer ({detail})") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _value(value) -> str:
    """A param value as MLflow stores it: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


class Tracker:
    """The MLflow runs of one study (module docstring); ``sync(stage)`` after each stage,
    ``finish(code)`` at the end. Safe to run again on the same files: it adds only what is missing;
    on changed files, new runs that supersede the old ones."""

    def __init__(self, client, config: StudyConfig):
        from mlflow.entities import RunStatus

        self.client, self.config = client, config
        self.layout = RunLayout(config.output_dir)
        self.study_dir = str(Path(config.output_dir).resolve())
        self._running, self._finished = RunStatus.to_string(RunStatus.RUNNING), RunStatus.to_string(RunStatus.FINISHED)
        experiment = client.get_experiment_by_name(self.study_dir)
        self.experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.study_dir)
        self.parent_id = self._parent()

    # -- runs -----------------------------------------------------------------------------------

    def _search(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                       order_by=["attributes.start_time ASC"])

    def _parent(self) -> str:
        digest = config_digest(self.config)
        runtime = {f"runtime.{k}": _value(getattr(self.config, k)) for k in RUNTIME_FIELDS}
        found = self._search(f"tags.stage = 'study' and tags.config_digest = '{digest}'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status=self._running)
            for key, value in runtime.items():
                self.client.set_tag(run_id, key, value)
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=f"study {Path(self.study_dir).name}", tags={
            "stage": "study", "study_dir": self.study_dir, "config_digest": digest,
            "decision_rule": decision_rule(self.config), **runtime})
        self._params(run.info.run_id, {k: v for k, v in dataclasses.asdict(self.config).items()
                                       if k not in RUNTIME_FIELDS})
        return run.info.run_id

    def _child(self, stage: str, slot: str, key: str, name: str, tags: dict, params: dict,
               start_time: int | None = None) -> str:
        """The run of ``slot`` at version ``key`` under the parent (module docstring): found, or
        created with ``tags`` and ``params``. A trial's run made before runs had slots (tag
        ``trial_id`` = ``key``, no ``key`` tag) is taken over."""
        base = f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.stage = '{stage}'"
        found = self._search(f"{base} and tags.slot = '{slot}' and tags.key = '{key}'")
        if not found and stage in TUNE_STAGES:
            found = [r for r in self._search(f"{base} and tags.trial_id = '{key}'") if "key" not in r.data.tags]
            for run in found[:1]:
                self.client.set_tag(run.info.run_id, "slot", slot)
                self.client.set_tag(run.info.run_id, "key", key)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, start_time=start_time, tags={
            "mlflow.parentRunId": self.parent_id, "stage": stage, "slot": slot, "key": key,
            "study_dir": self.study_dir, **{k: _value(v) for k, v in tags.items()}})
        self._params(run.info.run_id, params)
        return run.info.run_id

    def _supersede(self, stage: str, slot: str, current: str) -> None:
        """``current`` is the run of ``slot`` now: every other run of the slot not yet tagged gets
        ``superseded_by`` = ``current`` (its status stays), and ``current`` loses that tag (the files
        went back to its version)."""
        for run in self._search(f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.stage = '{stage}'"):
            tags = run.data.tags
            if run.info.run_id == current and "superseded_by" in tags:
                self.client.delete_tag(current, "superseded_by")
            elif run.info.run_id != current and "superseded_by" not in tags and self._slot_of(stage, tags) == slot:
                self.client.set_tag(run.info.run_id, "superseded_by", current)

    def _slot_of(self, stage: str, tags: dict) -> str | None:
        """A run's ``slot`` tag; for a run made before runs had slots, what it mirrored."""
        if "slot" in tags:
            return tags["slot"]
        if stage in TUNE_STAGES and not self.config.sweep and "seed" in tags:
            return self._trial_slot(stage, {"setup": tags.get("setup"), "seed": tags["seed"]})
        return {("sparsify", "recipe"): "sparsify/recipe", ("bench", "benchmark"): "bench"}.get(
            (stage, tags.get("trial_id")))

    def _trial_slot(self, stage: str, params: dict) -> str:
        """``teacher``, or ``students/<variant label> seed <seed>`` of a student trial's config."""
        if stage == "teacher":
            return "teacher"
        values = {name: params.get(name) for name, _ in self.config.sweep}
        return f"students/{variant_label(params.get('setup'), values)} seed {params.get('seed')}"

    def _params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, _value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's limit per log_batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _metrics(self, run_id: str, steps: list[tuple[int, int, dict[str, float]]]) -> int:
        """Log ``(step, timestamp_ms, {key: value})`` entries, skipping every (key, step) the run
        already holds; returns how many metric values were logged."""
        from mlflow.entities import Metric

        logged: dict[str, set[int]] = {}
        new = []
        for step, timestamp, metrics in steps:
            for key, value in metrics.items():
                if key not in logged:
                    logged[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
                if step not in logged[key]:
                    new.append(Metric(key, value, timestamp, step))
                    logged[key].add(step)
        for i in range(0, len(new), 1000):  # MLflow's limit per log_batch
            self.client.log_batch(run_id, metrics=new[i:i + 1000])
        return len(new)

    def _artifact(self, run_id: str, path: Path, folder: str | None = None, digest: str | None = None) -> None:
        """Upload ``path`` into the run's ``folder`` unless the run's tag ``artifact_sha256/<folder>/<name>``
        says it holds a file of this sha256 (``digest``: the file's, when known), then set that tag."""
        if not path.is_file():
            return
        digest = digest or sha256_file(path)
        tag = "artifact_sha256/" + (f"{folder}/" if folder else "") + path.name
        if self.client.get_run(run_id).data.tags.get(tag) != digest:
            self.client.log_artifact(run_id, str(path), folder)
            self.client.set_tag(run_id, tag, digest)

    def _end(self, run_id: str) -> None:
        self.client.set_terminated(run_id, status=self._finished)

    # -- stages ---------------------------------------------------------------------------------

    def sync(self, stage: str) -> None:
        """Log what ``stage`` (teacher, students, sparsify, bench) wrote, as far as it is missing.
        A tracking store that fails now (the stage's outputs are safe on disk) is one warning line,
        not the end of the study: the same command run again fills MLflow in."""
        if stage not in (*TUNE_STAGES, "sparsify", "bench"):
            raise ValueError(f"unknown stage {stage!r}")
        try:
            if stage in TUNE_STAGES:
                self._trials(stage)
            elif stage == "sparsify":
                self._recipe()
            else:
                self._bench()
        except Exception as err:  # MlflowException, requests' errors, a full disk, ...
            _warn(stage, err)

    def _trials(self, stage: str) -> None:
        experiment = self.layout.teacher_dir if stage == "teacher" else self.layout.students_dir
        final = final_trials(experiment)
        for trial_dir in sorted(p.parent for p in experiment.glob("*/result.json")):
            params, results = read_trial(trial_dir)
            if not results:  # failed before its first epoch: nothing to show
                continue
            if final is not None and results[0]["trial_id"] not in final:  # errored; Tune restarted it, new id
                continue
            setup = params.get("setup")
            seed = params.get("seed")
            name = "teacher" if stage == "teacher" else f"{setup} seed {seed}"
            tags = {"trial_dir": trial_dir.name, "role": "teacher" if stage == "teacher" else "student",
                    **({"setup": setup} if setup else {}), **({"seed": seed} if seed is not None else {})}
            started, slot = results[0].get("trial_started_at"), self._trial_slot(stage, params)
            trial_id = results[0]["trial_id"]
            run_id = self._child(stage, slot, trial_id, name, {**tags, "trial_id": trial_id}, params,
                                 start_time=int(started * 1000) if started else None)
            self._metrics(run_id, [(int(r["training_iteration"]), int(r.get("timestamp", time.time()) * 1000),
                                    trial_metrics(r)) for r in results])
            if results[-1].get("done"):
                self._end(run_id)
            self._supersede(stage, slot, run_id)

    def _recipe(self) -> None:
        for summary in sorted(self.layout.sparsify_dir.glob("summary*.json")):  # one per sparsity target
            self._target(RunLayout(self.layout.root, summary.stem[len("summary"):]))

    def _target(self, layout: RunLayout) -> None:
        """The recipe run of one sparsity target (``layout.tag``), keyed by what it mirrors."""
        summary = json.loads(layout.sparsify_summary.read_text())
        tags = {"source_trial": summary.get("trial_id", ""), "setup": summary.get("setup", ""),
                "loss": summary.get("loss", "ce")}
        for model, digest in summary.get("sha256", {}).items():
            tags[f"sha256_{model}"] = digest
            tags[f"onnx_{model}"] = str(layout.onnx(model).resolve())
        params = {k: summary[k] for k in ("recipe", "recipe_epochs", "loss", "temperature", "arch", "setup")
                  if k in summary}
        files = (layout.sparsify_summary, layout.sparsify_history, layout.layer_sparsity)
        key = json_digest({"summary": {k: v for k, v in summary.items() if k != "onnx"},  # paths move, content not
                           **{p.name: sha256_file(p) for p in files[1:] if p.is_file()}})
        slot = f"sparsify/recipe{layout.tag}"
        run_id = self._child("sparsify", slot, key, f"recipe{layout.tag}", tags, params)
        now = int(time.time() * 1000)
        steps = []
        if layout.sparsify_history.exists():
            steps = [(int(float(row["epoch"])), now, history_metrics(row)) for row in csv_rows(layout.sparsify_history)]
        scalars = {k: v for k, value in summary.items() if (v := as_number(value)) is not None
                   and k not in ("recipe_epochs", "temperature")}
        self._metrics(run_id, steps + [(0, now, scalars)])
        for model, digest in summary.get("sha256", {}).items():
            self._artifact(run_id, layout.onnx(model), "onnx", digest)
        for path in files:
            self._artifact(run_id, path, "sparsify")
        self._end(run_id)
        self._supersede("sparsify", slot, run_id)

    def _bench(self) -> None:
        layout = self.layout
        if not layout.benchmark.exists():
            return
        rows = csv_rows(layout.benchmark)
        first = rows[0] if rows else {}
        tags = {k: first[k] for k in ("isa", "vnni", "num_cores") if first.get(k)}
        key = json_digest({p.name: sha256_file(p) for p in (layout.benchmark, layout.onnx_accuracy) if p.is_file()})
        run_id = self._child("bench", "bench", key, "benchmark", tags, {})
        metrics = {}
        for row in rows:
            prefix = f"{row['model']}/{row['engine']}/batch_{row['batch_size']}"
            metrics.update({f"{prefix}/{k}": v for k in BENCH_METRICS if (v := as_number(row.get(k))) is not None})
        if layout.onnx_accuracy.exists():
            accuracies = json.loads(layout.onnx_accuracy.read_text())
            metrics.update({f"onnx_test_acc/{m}": v for m, a in accuracies.items() if (v := as_number(a)) is not None})
        self._metrics(run_id, [(0, int(time.time() * 1000), metrics)])
        self._artifact(run_id, layout.benchmark)
        self._artifact(run_id, layout.onnx_accuracy)
        self._end(run_id)
        self._supersede("bench", "bench", run_id)

    def finish(self, code: int = 0) -> int:
        """The run's tables (and ``report.pdf`` when built) as artefacts of the parent, which ends
        FINISHED; returns ``code`` (the study's exit code)."""
        try:
            for path in (self.layout.config, self.layout.results, self.layout.setups, self.layout.variants,
                         self.layout.report("pdf")):
                self._artifact(self.parent_id, path)
            self._end(self.parent_id)
        except Exception as err:  # as in sync: one line, the study's exit code stands
            _warn("study", err)
        return code


def _warn(what: str, err: Exception) -> None:
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    print(f"[mlflow] warning: could not log the {what} run(s) ({detail}); run the same command again "
          "to fill them in", flush=True)
