"""The study's stages, one module each (teacher, students, sparsify, bench: a ``stages.base.Stage``
that declares what it reads and writes; report), the rerun rule applied to a stage
(``stages.pipeline.run_stage``) and the runner that plans and runs them in order
(``stages.runner.run_study``); ``orchestrate.py`` holds the command line and calls the runner."""
