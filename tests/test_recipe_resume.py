"""The recipe loop checkpoints every epoch and resumes exactly; its epochs are timed; reduced
precision is used only before QAT.

The real recipe (``recipes/prune_quantize.yaml``) with ``num_epochs=11`` on a tiny ResNet and
random data, 3 steps per epoch: prune [0, 6), fine-tune [6, 9), QAT [9, 11) with BatchNorm
statistics frozen from epoch 10 and observers from epoch 10.4. An uninterrupted run is compared
with runs killed after epoch 4 (mid-pruning: masks still growing) and after epoch 10 (mid-QAT:
the checkpoint holds the fused, fake-quant model) and then rerun from their checkpoints.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import TinyResNet
from trainables.compress.checkpoint import CHECKPOINT_FORMAT, load_recipe_checkpoint
from trainables.compress.core import RecipeRun, global_sparsity, is_quantized, load_recipe, recipe_phases

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes",
                      "prune_quantize.yaml")
EPOCHS = 11
IMAGES = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(1))


class Killed(Exception):
    """Stands in for the process being killed at the start of an epoch."""


def batches(epoch):
    gen = torch.Generator().manual_seed(100 + epoch)
    for _ in range(3):
        idx = torch.randint(0, len(IMAGES), (16,), generator=gen)
        yield IMAGES[idx], LABELS[idx]


def accuracy(model):
    model.eval()
    with torch.no_grad():
        return float((model(IMAGES).argmax(1) == LABELS).float().mean())


def run(checkpoint, kill_before=None, **kwargs):
    """One attempt, built the same way every time (seed 0); resumes from ``checkpoint`` when it
    exists. ``kill_before``: raise Killed when that epoch's batches are asked for."""
    torch.manual_seed(0)
    model = TinyResNet()
    manager = load_recipe(RECIPE, num_epochs=EPOCHS)

    def train_batches(epoch):
        if epoch == kill_before:
            raise Killed(epoch)
        return batches(epoch)

    recipe = RecipeRun(model, manager, torch.optim.Adam(model.parameters()), train_batches, accuracy,
                       log=None, **kwargs)
    history = recipe.run(checkpoint_path=checkpoint, resume=load_recipe_checkpoint(checkpoint))
    return model, history


COMPARED = ("epoch", "train_loss", "test_acc", "sparsity", "lr", "quantized", "steps", "precision")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return run(tmp_path_factory.mktemp("straight") / "recipe.pt")


def test_recipe_phases_of_this_test():
    phases = recipe_phases(load_recipe(RECIPE, num_epochs=EPOCHS))
    assert (phases["pruning_end_epoch"], phases["qat_start_epoch"], phases["max_epochs"]) == (6, 9, 11)
    assert phases["freeze_bn_stats_epoch"] == 10 and phases["disable_observer_epoch"] == pytest.approx(10.4)


@pytest.mark.parametrize("kill_before", [4, 10])
def test_an_interrupted_recipe_resumes_to_the_same_model(straight, tmp_path, kill_before):
    checkpoint = tmp_path / "recipe.pt"
    with pytest.raises(Killed):
        run(checkpoint, kill_before=kill_before)
    saved = load_recipe_checkpoint(checkpoint)
    assert saved["format"] == CHECKPOINT_FORMAT and saved["epoch"] == kill_before
    assert len(saved["history"]) == kill_before and saved["steps_per_epoch"] == 3

    resumed_model, resumed = run(checkpoint)
    model, history = straight
    assert [{k: row[k] for k in COMPARED} for row in resumed] == \
        [{k: row[k] for k in COMPARED} for row in history]
    assert resumed[kill_before - 1]["epoch_seconds"] == saved["history"][-1]["epoch_seconds"]  # kept
    assert resumed_model.state_dict().keys() == model.state_dict().keys()  # QAT-wrapped the same way
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name
    assert is_quantized(resumed_model) and global_sparsity(resumed_model) == global_sparsity(model)
    assert history[-1]["sparsity"] == pytest.approx(0.80, abs=0.005)


def test_every_epoch_is_timed(straight):
    _, history = straight
    assert all(row["epoch_seconds"] > 0 for row in history)
    assert [row["quantized"] for row in history] == [False] * 9 + [True] * 2


def test_reduced_precision_only_before_qat(tmp_path):
    """The switch, on a CPU: a bf16 CPU autocast stands in for ``trainables.train.autocast`` on a
    GPU. Every forward pass of epochs 0..8 runs under it, none of the QAT epochs 9, 10."""
    seen = []

    def bf16(device):
        seen.append(device.type)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    torch.manual_seed(0)
    model = TinyResNet()
    dtypes = []
    model.conv2.register_forward_hook(lambda m, inp, out: dtypes.append((model.training, out.dtype)))
    history = RecipeRun(model, load_recipe(RECIPE, num_epochs=EPOCHS), torch.optim.Adam(model.parameters()),
                        batches, accuracy, log=None, autocast=bf16).run()
    assert [row["precision"] for row in history] == ["bfloat16"] * 9 + ["float32"] * 2
    training = [dtype for is_training, dtype in dtypes if is_training]
    assert training == [torch.bfloat16] * 27 + [torch.float32] * 6  # 3 steps per epoch
    assert set(seen) == {"cpu"} and len(seen) == 9 + 27  # one probe per epoch, one per step


def test_a_checkpoint_of_another_length_is_refused(tmp_path):
    checkpoint = tmp_path / "recipe.pt"
    with pytest.raises(Killed):
        run(checkpoint, kill_before=2)
    torch.manual_seed(0)
    model = TinyResNet()
    with pytest.raises(ValueError, match=r"max_epochs=11, this run has 12; delete it"):
        RecipeRun(model, load_recipe(RECIPE, num_epochs=12), torch.optim.Adam(model.parameters()),
                  batches, accuracy, log=None).resume(load_recipe_checkpoint(checkpoint))
    checkpoint.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"recipe checkpoint .* is unreadable"):
        load_recipe_checkpoint(checkpoint)


def test_a_checkpoint_saved_under_an_edited_recipe_restarts_the_recipe(tmp_path):
    """The recipe checkpoint carries the recipe's sha256 (``extra``, as the sparsify stage saves it):
    a resume under the same recipe continues, one under the recipe edited in place (final_sparsity
    0.80 -> 0.50) or from a checkpoint that records no digest starts from epoch 0, in one line.
    Catches a resume that only checks the steps per epoch and epoch count."""
    from study.files import sha256_file
    from trainables.compress.checkpoint import same_recipe

    recipe, checkpoint = tmp_path / "my-recipe.yaml", tmp_path / "recipe.pt"
    recipe.write_text(open(RECIPE).read())
    torch.manual_seed(0)
    model = TinyResNet()
    run_ = RecipeRun(model, load_recipe(str(recipe), num_epochs=EPOCHS), torch.optim.Adam(model.parameters()),
                     batches, accuracy, log=None)
    run_.start()
    run_.train_epoch()
    run_.save(checkpoint, extra={"recipe_sha256": sha256_file(recipe)})
    state, lines = load_recipe_checkpoint(checkpoint), []
    assert same_recipe(state, sha256_file(recipe), checkpoint, log=lines.append) is state and lines == []
    recipe.write_text(recipe.read_text().replace("final_sparsity: 0.80", "final_sparsity: 0.50"))
    assert same_recipe(state, sha256_file(recipe), checkpoint, log=lines.append) is None
    assert len(lines) == 1 and "saved under another recipe" in lines[0] and "starting the recipe from epoch 0" in lines[0]
    state["extra"] = {}
    assert same_recipe(state, sha256_file(recipe), checkpoint, log=lines.append) is None
    assert "unrecorded" in lines[1]
