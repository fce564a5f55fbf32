"""What a run prints while Tune trains: one line per finished epoch of every trial.

Tune's own reporter (a status table every 30 s, a config table and a result table per trial, the
TensorBoard hint) is switched off unless ``--verbose`` (``RunConfig(verbose=0)``, see
``trainables.tuning.run_tuner``); this callback prints instead, from the driver, e.g.::

    [students kd_feat] epoch 2: test_acc 0.1050  train_loss 8.3491  (38.9 s, 8.4 images/s)
"""

from __future__ import annotations

from ray import tune


def epoch_line(stage: str, setup: str | None, result: dict) -> str:
    """The progress line of one reported epoch: ``result`` holds the trainable's metrics
    (``epoch``, ``test_acc`` 0..1, ``train_loss``, ``epoch_seconds``, ``train_images_per_sec``)."""
    name = f"{stage} {setup}" if setup else stage
    return (f"[{name}] epoch {result['epoch']}: test_acc {result['test_acc']:.4f}  "
            f"train_loss {result['train_loss']:.4f}  ({result['epoch_seconds']:.1f} s, "
            f"{result['train_images_per_sec']:.1f} images/s)")


class EpochLines(tune.Callback):
    """Tune callback: ``epoch_line`` for every result, one line when a trial is retried after a
    failure, one when it has failed for good.

    Args:
        stage: the experiment's name as the run calls it (``teacher``, ``students``).
    """

    def __init__(self, stage: str):
        self.stage = stage

    def _name(self, trial) -> str:
        setup = trial.config.get("setup")
        return f"{self.stage} {setup}" if setup else self.stage

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(epoch_line(self.stage, trial.config.get("setup"), result), flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"[{self._name(trial)}] trial {trial.trial_id} failed; retrying from its last checkpoint",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{self._name(trial)}] trial {trial.trial_id} failed for good (see {trial.error_file})",
              flush=True)
