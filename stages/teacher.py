"""Stage 1, teacher: fine-tune the teacher under Tune; its best checkpoint becomes ``teacher.pt``."""

from __future__ import annotations

from pathlib import Path

from study import RunLayout, StudyConfig, StudyError, selection_metric

# Heavy packages are imported inside the functions: orchestrate.py imports this module before it
# has checked the Python version and the installed packages.


def stage_teacher(config: StudyConfig, data, reruns) -> Path:
    """Stage 1: fine-tune the teacher; its best checkpoint (by ``study.selection_metric``) becomes
    ``teacher.pt``. ``reruns``: ``driver.reruns.Reruns``, what the run does with each stage."""
    from ray import tune

    from models import load_checkpoint
    from study.files import atomic_copy
    from driver.results import best_checkpoint
    from trainables.train import MODEL_FILE, train_teacher
    from driver.tuning import run_tuner, trial_config, trial_resources

    target = RunLayout(config.output_dir).teacher
    if reruns.action("teacher") == "skip":
        try:
            load_checkpoint(target)
        except ValueError as err:
            raise StudyError(f"{err}; delete it to train the teacher again") from None
        reruns.begin("teacher")
        reruns.done("teacher")
        print(f"[teacher] {target} exists: skipping the teacher stage", flush=True)
        return target
    out = reruns.begin("teacher")
    resources = trial_resources(config, "teacher")
    grid = run_tuner(config, "teacher", tune.with_parameters(train_teacher, data=data),
                     trial_config(config, "teacher", resources), resources,
                     config.teacher_max_epochs, storage=str(out.root))
    best, _ = best_checkpoint(grid[0], selection_metric(config))
    with best.as_directory() as directory:
        atomic_copy(Path(directory) / MODEL_FILE, out.teacher)
    reruns.done("teacher")
    return target
