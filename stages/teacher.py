"""Stage 1, teacher: fine-tune the teacher under Tune; its best checkpoint becomes ``teacher.pt``."""

from __future__ import annotations

from pathlib import Path

from study import RunLayout, StudyConfig, StudyError, selection_metric
from stages.base import Context, Stage

# Heavy packages are imported inside the methods: orchestrate.py imports this module before it
# has checked the Python version and the installed packages.


class Teacher(Stage):
    """Stage 1: the teacher's Tune experiment (``teacher/``, one trial) and its best checkpoint
    (by ``study.selection_metric``), ``teacher.pt``. ``load``: the path of ``teacher.pt``."""

    name = "teacher"
    fields = ("arch", "stem", "teacher_weights", "train_subset", "test_subset", "val_size", "seed",
              "batch_size", "teacher_lr", "teacher_max_epochs", "tolerance", "patience", "compile")
    data = ("train", "val", "test")
    code = ("stages.teacher", "trainables.train", "driver.tuning", "driver.results")
    outputs = ("teacher", "teacher.pt")

    def complete(self, layout: RunLayout, config: StudyConfig) -> bool:
        return layout.teacher.exists()

    def keep(self, ctx: Context) -> str:
        """StudyError when ``teacher.pt`` does not load as a teacher checkpoint."""
        from models import load_checkpoint

        try:
            load_checkpoint(ctx.layout.teacher)
        except ValueError as err:
            raise StudyError(f"{err}; delete it to train the teacher again") from None
        return f"[teacher] {ctx.layout.teacher} exists: skipping the teacher stage"

    def run(self, ctx: Context, out: RunLayout, action: str, changed: frozenset[str]) -> None:
        """Fine-tune the teacher (``trainables.train.train_teacher`` under ``driver.tuning.run_tuner``,
        continued when ``out`` holds an unfinished experiment); copy its best epoch's weights to
        ``out.teacher``."""
        from ray import tune

        from driver.results import best_checkpoint
        from driver.tuning import run_tuner, trial_config, trial_resources
        from study.files import atomic_copy
        from trainables.train import MODEL_FILE, train_teacher

        config = ctx.config
        resources = trial_resources(config, "teacher")
        grid = run_tuner(config, "teacher", tune.with_parameters(train_teacher, data=ctx.data),
                         trial_config(config, "teacher", resources), resources,
                         config.teacher_max_epochs, storage=str(out.root))
        best, _ = best_checkpoint(grid[0], selection_metric(config))
        with best.as_directory() as directory:
            atomic_copy(Path(directory) / MODEL_FILE, out.teacher)

    def load(self, ctx: Context) -> Path:
        return ctx.layout.teacher


STAGE = Teacher()
