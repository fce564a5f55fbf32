"""What a run prints while Tune trains: one line per finished epoch of every trial.

Tune's own reporter (a status table every 30 s, a config table and a result table per trial, the
TensorBoard hint) is switched off unless ``--verbose`` (``RunConfig(verbose=0)``, see
``driver.tuning.run_tuner``); this callback prints instead, from the driver, e.g.::

    [students kd_feat] epoch 2: test_acc 0.1050  train_loss 8.3491  (38.9 s, 8.4 images/s)
"""

from __future__ import annotations

from ray import tune


def epoch_line(stage: str, setup: str | None, result: dict, seed: int | None = None) -> str:
    """The progress line of one reported epoch. ``result`` holds the trainable's metrics: the
    epoch (``training_iteration``), ``test_acc`` 0..1 and, where reported, ``val_acc`` 0..1,
    ``train_loss``, ``epoch_seconds`` (s) and ``train_images_per_sec`` (images/s). ``seed`` names
    the trial's seed when a setup runs with several (``--seeds``)."""
    name = " ".join(str(part) for part in (stage, setup, None if seed is None else f"seed {seed}") if part)
    parts = [f"{key} {result[key]:.4f}" for key in ("val_acc", "test_acc", "train_loss") if key in result]
    if "epoch_seconds" in result and "train_images_per_sec" in result:
        parts.append(f"({result['epoch_seconds']:.1f} s, {result['train_images_per_sec']:.1f} images/s)")
    return f"[{name}] epoch {result['training_iteration']}: " + "  ".join(parts)


class EpochLines(tune.Callback):
    """Tune callback: ``epoch_line`` for every result, one line when a trial is retried after a
    failure, one when it has failed for good.

    Args:
        stage: the experiment's name as the run calls it (``teacher``, ``students``).
        several_seeds: name each trial's seed too (``--seeds`` > 1).
        swept: the swept fields (``--sweep``): each trial is named by its variant
            (``kd temperature=2``, ``study.config.variant_label``), not its setup alone.
    """

    def __init__(self, stage: str, several_seeds: bool = False, swept: tuple = ()):
        self.stage = stage
        self.several_seeds = several_seeds
        self.swept = tuple(swept)

    def _setup(self, trial) -> str | None:
        from study.config import variant_label

        setup = trial.config.get("setup")
        return variant_label(setup, {n: trial.config.get(n) for n in self.swept}) if setup else setup

    def _name(self, trial) -> str:
        setup = self._setup(trial)
        return f"{self.stage} {setup}" if setup else self.stage

    def _seed(self, trial) -> int | None:
        """The trial's seed when its setup runs with several seeds (a grid over ``seed``)."""
        return trial.config.get("seed") if self.several_seeds else None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(epoch_line(self.stage, self._setup(trial), result, self._seed(trial)), flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"[{self._name(trial)}] trial {trial.trial_id} failed; retrying from its last checkpoint",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{self._name(trial)}] trial {trial.trial_id} failed for good (see {trial.error_file})",
              flush=True)
