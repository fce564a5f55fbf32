"""Foundation check of the installed stack (torch + SparseML).

It uses the libraries directly (not the project's wrappers), so a failure here
points at the environment, not at project code:

* a SparseML recipe applied with ``ScheduledModifierManager`` to a tiny conv model
  on random data prunes every conv/linear weight to the recipe's sparsity, read back
  from the weights themselves (zeros / size, within +-1 %).

The ONNX export through SparseML's exporter and its agreement with torch in ONNX Runtime and
DeepSparse are checked once, on the exported files, in ``test_sparsify.py``.
"""

import pytest
import torch
from torch import nn

TARGET_SPARSITY = 0.7

RECIPE = f"""
version: 1.1.0
num_epochs: 3
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !SetLearningRateModifier
    start_epoch: 0.0
    learning_rate: 0.001
pruning_modifiers:
  - !MagnitudePruningModifier
    params: __ALL_PRUNABLE__
    init_sparsity: 0.05
    final_sparsity: {TARGET_SPARSITY}
    start_epoch: 0.0
    end_epoch: 2.0
    update_frequency: 0.5
    leave_enabled: True
"""


def tiny_convnet() -> nn.Module:
    """A few convs + linear: (B, 3, 16, 16) float32 -> (B, 10) logits."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _prunable(model):
    return {
        name: m.weight
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def test_sparseml_recipe_prunes_tiny_model_to_recipe_sparsity(tmp_path):
    from sparseml.pytorch.optim import ScheduledModifierManager
    from sparseml.pytorch.utils import LoggerManager, PythonLogger
    import logging

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    model = tiny_convnet()
    manager = ScheduledModifierManager.from_yaml(str(recipe))
    assert manager.max_epochs == 3

    steps_per_epoch = 4
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loggers = LoggerManager([PythonLogger(logging.getLogger("test_stack"), enabled=False)])
    optimizer = manager.modify(model, optimizer, steps_per_epoch=steps_per_epoch, loggers=loggers)
    gen = torch.Generator().manual_seed(0)
    for _epoch in range(manager.max_epochs):
        for _ in range(steps_per_epoch):
            x = torch.randn(8, 3, 16, 16, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    manager.finalize(model)

    weights = _prunable(model)
    assert len(weights) == 4  # 3 convs + fc, all matched by __ALL_PRUNABLE__
    for name, w in weights.items():
        frac = float((w == 0).sum()) / w.numel()
        assert abs(frac - TARGET_SPARSITY) <= 0.01, (name, frac)
    # biases are not pruned
    assert all(float((m.bias == 0).float().mean()) < 0.5 for m in model.modules() if isinstance(m, nn.Conv2d))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
