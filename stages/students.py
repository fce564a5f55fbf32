"""Stage 2, students: one Tune experiment over setup x seed (and swept values), all trials at once."""

from __future__ import annotations

from pathlib import Path

from study import RunLayout, StudyConfig

# Heavy packages are imported inside the functions: orchestrate.py imports this module before it
# has checked the Python version and the installed packages.


def stage_students(config: StudyConfig, data, teacher_path: Path, reruns):
    """Stage 2: one Tune experiment, a grid over setup x seed, all trials running at once (a
    rerun: a fresh one in ``rerun/students``, moved over the old one once finished)."""
    import torch
    from ray import tune

    from trainables.student import train_student
    from driver.tuning import run_tuner, student_space, trial_resources

    from ray.tune.result_grid import ResultGrid

    out = reruns.begin("students")  # may turn a skip into a rerun (what it reads now differs)
    if reruns.action("students") == "skip":  # finished with these inputs: read, not restored
        print(f"[students] {RunLayout(config.output_dir).students_dir} is finished with these inputs: "
              "skipping the students stage", flush=True)
        return ResultGrid(tune.ExperimentAnalysis(str(RunLayout(config.output_dir).students_dir.resolve())))
    teacher = torch.load(teacher_path, map_location="cpu")
    resources = trial_resources(config, "student")
    space = student_space(config, resources)
    trainable = tune.with_parameters(train_student, data=data, teacher=teacher)
    grid = run_tuner(config, "students", trainable, space, resources, config.max_epochs, storage=str(out.root))
    staged = reruns.staged("students")
    reruns.done("students")
    if staged:  # the experiment has moved: read it back from its place in the run directory
        grid = ResultGrid(tune.ExperimentAnalysis(str(RunLayout(config.output_dir).students_dir.resolve())))
    return grid
