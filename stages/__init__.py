"""The study's stages, one module each (teacher, students, sparsify, bench, report), and the
runner that plans and runs them in order (``stages.runner.run_study``); ``orchestrate.py`` holds the
command line and calls the runner."""
