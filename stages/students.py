"""Stage 2, students: one Tune experiment over setup x seed (and swept values), all trials at once."""

from __future__ import annotations

from study import RunLayout
from stages.base import Context, Stage

# Heavy packages are imported inside the methods: orchestrate.py imports this module before it
# has checked the Python version and the installed packages.


class Students(Stage):
    """Stage 2: the students' Tune experiment (``students/``), a grid over setup x seed (and swept
    values), every trial distilled from ``teacher.pt``. ``load``: its ``ResultGrid``."""

    name = "students"
    fields = ("seeds", "setups", "lr", "temperature", "max_epochs", "sweep")
    data = ("train", "val", "test")
    code = ("stages.students", "trainables.student", "driver.tuning")
    outputs = ("students",)

    def files(self, config) -> dict[str, str]:
        return {"teacher.pt": "teacher.pt"}

    def keep(self, ctx: Context) -> str:
        return (f"[students] {ctx.layout.students_dir} is finished with these inputs: "
                "skipping the students stage")

    def run(self, ctx: Context, out: RunLayout, action: str, changed: frozenset[str]) -> None:
        """Run the experiment (``trainables.student.train_student`` under ``driver.tuning.run_tuner``)
        in ``out``, all trials at once; an unfinished one there is continued."""
        import torch
        from ray import tune

        from driver.tuning import run_tuner, student_space, trial_resources
        from trainables.student import train_student

        teacher = torch.load(ctx.teacher, map_location="cpu")
        resources = trial_resources(ctx.config, "student")
        space = student_space(ctx.config, resources)
        trainable = tune.with_parameters(train_student, data=ctx.data, teacher=teacher)
        run_tuner(ctx.config, "students", trainable, space, resources, ctx.config.max_epochs, storage=str(out.root))

    def load(self, ctx: Context):
        """The finished experiment in the run directory, read (not restored): a ``ResultGrid``."""
        from ray import tune
        from ray.tune.result_grid import ResultGrid

        return ResultGrid(tune.ExperimentAnalysis(str(ctx.layout.students_dir.resolve())))


STAGE = Students()
