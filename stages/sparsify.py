"""Stage 3, sparsify: the winning student through each target's Ray task (the SparseML recipe
per ``--sparsities`` value, structured thinning per ``--channel-ratios`` value), exported to ONNX;
finished targets made with the same inputs are kept."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from study import RunLayout, StudyConfig, StudyError, selection_metric
from stages.base import Context, Stage

# Ray, torch and the training code are imported inside the functions: orchestrate.py imports this
# module before it has checked the Python version and the installed packages.


class Sparsify(Stage):
    """Stage 3: the trial ``ctx.best`` (``driver.results.sparsify_trial``: the winning setup's best
    seed), from its best checkpoint, through each target (``study.layout.sparsity_targets``: the
    recipe per ``--sparsities`` value, thinning per ``--channel-ratios`` value), each its own Ray
    task, all submitted at once, trained with that setup's loss and the frozen teacher
    (``--sparsify-loss setup``) or cross-entropy (``ce``). One task (``dense_owner``) also exports
    ``dense`` and ``dense_int8``. A target made with these inputs is kept (``_targets_to_run``).
    ``load``: ``RunLayout.read_sparsify``'s summary."""

    name = "sparsify"
    fields = ("recipe", "recipe_epochs", "sparsify_loss", "sparsities", "channel_ratios", "ptq_calibration_images")
    data = ("train", "test")
    code = ("stages.sparsify", "trainables.compress.sparsify", "trainables.compress.structured", "driver.results")
    outputs = ("onnx", "sparsify")
    late_files = ("checkpoint",)

    def files(self, config) -> dict[str, str]:
        return {"teacher.pt": "teacher.pt"}

    def extra_files(self, ctx: Context) -> dict[str, str]:
        """``checkpoint``: the ``model.pt`` of ``ctx.best``'s best checkpoint."""
        from driver.results import best_checkpoint

        checkpoint, _ = best_checkpoint(ctx.best, selection_metric(ctx.config))
        return {"checkpoint": str(Path(checkpoint.path) / "model.pt")}

    def complete(self, layout: RunLayout, config: StudyConfig) -> bool:
        """Every target's summary and every model of ``config``'s targets are there."""
        from study.layout import model_names

        targets = _targets(config)
        return all(layout.target(t).sparsify_summary.exists() for t in targets) and \
            all(layout.onnx(n).exists() for n in model_names(targets))

    def keep(self, ctx: Context) -> str:
        """StudyError when a summary is unreadable or an ONNX file is not the one it recorded."""
        from study.layout import model_names

        targets = _targets(ctx.config)
        try:
            summary = ctx.layout.read_sparsify(targets)
            ctx.layout.check_onnx(summary, model_names(targets))  # the exported models are the files it recorded
        except (OSError, ValueError) as err:
            raise StudyError(str(err)) from None
        return f"[sparsify] {ctx.layout.sparsify_summary.parent} is complete: skipping the sparsify stage"

    def run(self, ctx: Context, out: RunLayout, action: str, changed: frozenset[str]) -> None:
        """Run every target not kept (``_targets_to_run``: finished targets are kept when only the
        target lists, ``sparsities`` and ``channel_ratios``, are in ``changed``, or on a resume)
        into ``out``. StudyError (one line) for a task's ValueError."""
        from driver.results import best_checkpoint, trial_variant
        from study.config import variant_label

        config, best = ctx.config, ctx.best
        metric = selection_metric(config)
        checkpoint, metrics = best_checkpoint(best, metric)
        loss = best.config["setup"] if config.sparsify_loss == "setup" else "ce"
        print(f"[sparsify] best trial: {best.path.rsplit('/', 1)[-1]} (variant "
              f"{variant_label(*trial_variant(config, best.config))}, seed "
              f"{best.config['seed']}, {metric} {metrics[metric]:.4f} at epoch {metrics['training_iteration']}); "
              f"recipe {config.recipe}, loss {loss}", flush=True)
        targets = _targets(config)
        only_targets = changed <= {"sparsities", "channel_ratios"}
        todo = _targets_to_run(config, targets, ctx.layout.root, out.root, action, only_targets)
        _run_targets(ctx, checkpoint, targets, todo, out.root)

    def load(self, ctx: Context) -> dict:
        return ctx.layout.read_sparsify(_targets(ctx.config))

    def promoted(self, layout: RunLayout) -> None:
        """Each summary names its models by path: now the ones in the run directory."""
        from study.files import atomic_write_text

        for path in layout.sparsify_dir.glob("summary*.json"):
            summary = json.loads(path.read_text())
            summary["onnx"] = {name: str(layout.onnx(name)) for name in summary.get("onnx", {})}
            atomic_write_text(path, json.dumps(summary, indent=2))


STAGE = Sparsify()


def _targets(config: StudyConfig) -> list:
    from study.layout import sparsity_targets

    return sparsity_targets(config.sparsities, config.recipe, config.channel_ratios)


def _targets_to_run(config: StudyConfig, targets: list, root: Path, out: Path, action: str,
                    only_targets: bool) -> list:
    """The ``targets`` whose task must run. A target whose outputs are complete is not run again
    when it was made with these inputs (a resumed stage, or one whose recorded inputs differ from
    today's in the target lists alone): kept in place (``out``), or, by a rerun, copied from the run
    directory ``root`` into ``out`` (``rerun/``) beside the new targets; each kept one is printed."""
    from study.layout import dense_owner

    owner, todo = dense_owner(targets), []
    for target in targets:
        wanted = [*target.models, *(("dense", "dense_int8") if target == owner else ())]
        if (action == "resume" or only_targets) and target_complete(out, target, wanted, config.recipe):
            print(f"[sparsify] target {_target_text(target)}: made with these inputs, kept", flush=True)
        elif action == "rerun" and only_targets and target_complete(root, target, wanted, config.recipe):
            keep_target(root, out, target, wanted)  # into rerun/, moved back with the new ones
            print(f"[sparsify] target {_target_text(target)}: made with these inputs, kept", flush=True)
        else:
            todo.append(target)
    return todo


def _run_targets(ctx: Context, checkpoint, targets: list, todo: list, out: Path) -> None:
    """Submit one Ray task per target in ``todo`` (``sparsify_student``, or ``thin_student`` for a
    structured target) of the run ``ctx.config`` on ``ctx.data`` from the trial ``ctx.best``'s
    ``checkpoint`` (with the teacher ``ctx.teacher``) writing into ``out``, each asking for the
    teacher's request (on a GPU with several tasks: a fraction of it each), and wait for all; a
    task's ValueError (bad recipe and the like) becomes a StudyError with its one line."""
    import ray

    from driver.tuning import trial_resources
    from study.layout import dense_owner
    from trainables.compress.sparsify import sparsify_student
    from trainables.compress.structured import thin_student

    config = ctx.config
    resources = trial_resources(config, "teacher")  # this cluster's, also on a resumed run
    cpu, gpu = resources["cpu"], resources["gpu"]
    if gpu and len(todo) > 1:  # on a GPU: a fraction of it (and of its node's CPUs) each, all at once
        cpu, gpu = (math.floor(value / len(todo) * 1e4) / 1e4 for value in (cpu, gpu))
    tasks = {False: ray.remote(num_cpus=cpu, num_gpus=gpu)(sparsify_student),
             True: ray.remote(num_cpus=cpu, num_gpus=gpu)(thin_student)}
    refs = []
    for target in todo:
        settings, teacher = sparsify_settings(dataclasses.replace(config, output_dir=str(out)), ctx.best,
                                              ctx.teacher, threads=max(1, math.floor(cpu)), target=target,
                                              export_dense=target == dense_owner(targets))
        print(f"[sparsify] target {_target_text(target)}: {'thinning' if target.structured else 'recipe'} task "
              "submitted", flush=True)
        # each task writes its target's summary last
        refs.append(tasks[target.structured].remote(checkpoint, ctx.data, settings, teacher=teacher))
    try:
        ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ValueError):  # bad recipe and the like: the one line it carries
            raise StudyError(str(err.cause)) from None
        raise


def _target_text(target) -> str:
    if target.structured:
        return f"channel ratio {target.ratio:g}"
    return "(the recipe's own)" if target.sparsity is None else f"{target.sparsity:g}"


def target_complete(root: Path, target, models, recipe: str) -> bool:
    """Whether the run directory ``root`` holds ``target``'s finished outputs: its summary, made
    for this sparsity (the recipe's own when ``target.sparsity`` is None), recording ``models``
    whose files still have the recorded sha256."""
    from study.layout import recipe_sparsity

    path = RunLayout(root).target(target).sparsify_summary
    try:
        summary = json.loads(path.read_text())
        RunLayout(root).check_onnx(summary, models)
    except (OSError, ValueError):
        return False
    if target.structured:
        return summary.get("channel_ratio") == target.ratio
    want = target.sparsity if target.sparsity is not None else recipe_sparsity(recipe)
    return summary.get("sparsity") == want


def keep_target(source: Path, dest: Path, target, models) -> None:
    """Copy ``target``'s finished outputs (its ONNX ``models`` and sparsify records) from the run
    directory ``source`` into ``dest`` (the rerun's staging folder)."""
    import shutil

    old, new = RunLayout(source).target(target), RunLayout(dest).target(target)
    for name in models:
        new.onnx(name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(old.onnx(name), new.onnx(name))
    new.sparsify_dir.mkdir(parents=True, exist_ok=True)
    for a, b in ((old.sparsify_history, new.sparsify_history), (old.layer_sparsity, new.layer_sparsity),
                 (old.sparsify_summary, new.sparsify_summary)):  # the summary last: it marks the target done
        shutil.copy2(a, b)


def sparsify_settings(config: StudyConfig, best, teacher_path: Path, threads: int, target=None,
                      export_dense: bool = True) -> tuple:
    """``(SparsifySettings, teacher payload or None)`` with which the sparsify stage runs the
    recipe on the trial ``best`` (a ``ray.tune.Result``) with ``threads`` torch threads: the
    trial's seed, setup, temperature and batch size (its own config: a ``--sweep`` varies them,
    so the scalar flags are not read), its swept values (``variant``, recorded in the summary and
    the ONNX metadata), the loss ``--sparsify-loss`` names (the setup's own, or ``ce``, which
    needs no teacher) and this run's recipe settings; ``target``: the sparsity target
    (``study.layout.Target``; default the recipe's own) and whether this task exports ``dense`` and
    ``dense_int8`` (``export_dense``)."""
    import torch

    from study import needs_teacher
    from study.layout import Target
    from trainables.compress.sparsify import SparsifySettings

    from driver.results import trial_variant

    setup = best.config["setup"]
    loss = setup if config.sparsify_loss == "setup" else "ce"
    # the trial as it was trained: its own temperature and batch size (a --sweep varies them), not the scalars
    settings = SparsifySettings(
        recipe=config.recipe, recipe_epochs=config.recipe_epochs,
        batch_size=int(best.config.get("batch_size", config.batch_size)),
        seed=int(best.config["seed"]), threads=threads, output_dir=str(Path(config.output_dir).resolve()),
        trial_id=best.path.rsplit("/", 1)[-1], setup=setup, loss=loss,
        temperature=float(best.config.get("temperature", config.temperature)),
        variant=trial_variant(config, best.config)[1], target=target or Target(None, ""),
        export_dense=export_dense, ptq_images=config.ptq_calibration_images)
    return settings, torch.load(teacher_path, map_location="cpu") if needs_teacher(loss) else None
