"""What a run prints: known-harmless library output is held back unless --verbose."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

from study.noise import QUIET_LOGGERS, VERBOSE_ENV, set_verbose, verbose
from trainables.compress.export import quiet_export
from driver.progress import epoch_line


@pytest.fixture(autouse=True)
def _restore_environment():
    saved = {k: os.environ.get(k) for k in (VERBOSE_ENV, "RAY_AIR_NEW_OUTPUT",
                                             "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    set_verbose(verbose())


def test_quiet_by_default_and_verbose_brings_it_back():
    set_verbose(False)
    assert not verbose() and os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert {name: logging.getLogger(name).level for name in QUIET_LOGGERS} == \
        {name: level for name, (level, _) in QUIET_LOGGERS.items()}
    set_verbose(True)
    assert verbose() and os.environ[VERBOSE_ENV] == "1"
    assert all(logging.getLogger(name).level == logging.NOTSET for name in QUIET_LOGGERS)


def _export_noise():
    warnings.warn("Converting a tensor to a Python boolean might cause the trace to be incorrect",
                  torch.jit.TracerWarning)
    warnings.warn("It is recommended that constant folding be turned off", UserWarning)
    warnings.warn("something else", UserWarning)
    logging.getLogger("sparseml.exporters.transforms.onnx_transform").info("[X] Transformed 4 matches")


def test_quiet_export_drops_only_the_known_warnings(caplog):
    set_verbose(False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        with quiet_export():
            _export_noise()
    assert [str(w.message) for w in caught] == ["something else"]
    assert "Transformed" not in caplog.text
    set_verbose(True)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        with quiet_export():
            _export_noise()
    assert len(caught) == 3 and "Transformed 4 matches" in caplog.text


def test_one_progress_line_per_epoch():
    result = {"training_iteration": 2, "test_acc": 0.105, "train_loss": 8.34906, "epoch_seconds": 38.86,
              "train_images_per_sec": 8.4395}
    assert epoch_line("students", "kd_feat", result) == \
        "[students kd_feat] epoch 2: test_acc 0.1050  train_loss 8.3491  (38.9 s, 8.4 images/s)"
    assert epoch_line("teacher", None, result).startswith("[teacher] epoch 2: ")
    # --seeds and --val-size: the seed is named, val_acc (what decides) comes first
    assert epoch_line("students", "kd", {**result, "val_acc": 0.25}, seed=1) == \
        "[students kd seed 1] epoch 2: val_acc 0.2500  test_acc 0.1050  train_loss 8.3491  (38.9 s, 8.4 images/s)"
    # a result without the loop's timings (e.g. a bare trainable in a test) still gets its line
    assert epoch_line("students", "ce", {"training_iteration": 1, "test_acc": 0.5}) == \
        "[students ce] epoch 1: test_acc 0.5000"
