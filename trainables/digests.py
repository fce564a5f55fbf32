"""The fingerprint of the data a stage trains and tests on: sha256 of the selected uint8 tensors.

Why the tensors and not the data root or its cache file: the root may move (its path is a runtime
field), the decoded cache (``trainables.data``) is keyed by file mtimes and lives in the root or in
the user's cache folder, holds the whole data set before subsetting, and ``torch.save`` is not a
byte-stable format. The tensors after subsetting are exactly what the stages read."""

from __future__ import annotations

import hashlib

import torch

from trainables.data import CIFAR10Tensors

__all__ = ["data_digests", "tensor_digest"]


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Hex sha256 over each tensor's dtype, shape and bytes (C order, on the CPU)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def data_digests(data: CIFAR10Tensors) -> dict:
    """``{"train", "test", "val"}`` -> sha256 of that split's images and labels (``tensor_digest``);
    ``val`` is None without a validation split."""
    return {"train": tensor_digest(data.train_images, data.train_labels),
            "test": tensor_digest(data.test_images, data.test_labels),
            "val": None if data.val_images is None else tensor_digest(data.val_images, data.val_labels)}
