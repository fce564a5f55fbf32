"""Batches of CIFAR-10 tensors for training and evaluation, airbench style: stratified subsets,
normalization, and augmentation of whole batches with tensor ops on the training device. No
per-sample Python work happens in the training loop (see ``trainables.data`` for loading)."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from study import StudyConfig
from trainables.data import CIFAR10_MEAN, CIFAR10_STD, CIFAR10Tensors, load_cifar10

__all__ = ["study_data", "stratified_subset", "stratified_split", "stratified_indices", "normalize", "augment",
           "train_batches", "eval_batches", "num_batches"]

_PAD = 4  # pixels of zero padding before the random crop


# --------------------------------------------------------------------------- subsets


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices (int64 (n,), on ``labels``' device, shuffled) of a seeded class-balanced sample of
    ``n`` of ``labels``: each of the K classes present gets ``n // K``, the remainder ``n % K``
    goes one each to the lowest class ids; drawn from ``torch.Generator().manual_seed(seed)``.
    What ``stratified_subset`` and ``stratified_split`` take. Raises ValueError as they do."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n={n!r} must be a positive int (callers handle None/0 = all)")
    classes = torch.unique(labels.cpu(), sorted=True)
    k, total = int(classes.numel()), int(labels.shape[0])
    if n < k or n > total:
        raise ValueError(f"n={n} is out of range; expected {k} (one per class) <= n <= {total} "
                         f"(samples available)")
    g = torch.Generator().manual_seed(int(seed))
    labels_cpu = labels.cpu()
    picks = []
    for rank, c in enumerate(classes.tolist()):
        want = n // k + (1 if rank < n % k else 0)
        idx = torch.nonzero(labels_cpu == c).flatten()
        if idx.numel() < want:
            raise ValueError(f"n={n} needs {want} samples of class {c} but only {idx.numel()} "
                             f"are available")
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[:want]])
    chosen = torch.cat(picks)
    return chosen[torch.randperm(chosen.numel(), generator=g)].to(labels.device)


def _check_pair_shapes(images: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} must "
                         f"have the same first dimension (labels 1-D)")


def stratified_subset(images: torch.Tensor, labels: torch.Tensor, n: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded class-balanced subset of ``n`` samples, in shuffled order.

    Each of the K classes present in ``labels`` (K = 10 for CIFAR-10) gets ``n // K`` samples;
    the remainder ``n % K`` goes one each to the lowest class ids. Samples within a class and
    the final order are drawn from ``torch.Generator().manual_seed(seed)``, so the same inputs
    and seed always give the same subset. "Use everything" (``n`` None or 0 on the command
    line) is the caller's business: do not call this function then.

    Args:
        images: (N, ...) any dtype; indexed along dim 0.
        labels: int64 (N,) class ids.
        n: positive number of samples wanted, K <= n <= N.
        seed: integer seed.

    Returns:
        (images[idx], labels[idx]) with idx int64 (n,) on the inputs' device.

    Raises:
        ValueError: ``n`` not an int, ``n`` < K, ``n`` > N, a class with fewer samples than
            its share, or images/labels of different lengths.
    """
    _check_pair_shapes(images, labels)
    chosen = stratified_indices(labels, n, seed)
    return images[chosen.to(images.device)], labels[chosen]


def stratified_split(images: torch.Tensor, labels: torch.Tensor, n: int,
                     seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Hold out a seeded class-balanced sample of ``n`` samples: ``((rest_images, rest_labels),
    (held_images, held_labels))``. The held-out part is exactly ``stratified_subset(images,
    labels, n, seed)``; the rest keeps the input order. Same inputs and seed, same split.
    Raises ValueError as ``stratified_subset``, and when nothing would be left (``n`` = N)."""
    _check_pair_shapes(images, labels)
    if not isinstance(n, bool) and isinstance(n, (int, np.integer)) and n >= labels.shape[0]:
        raise ValueError(f"holding out n={n} of {labels.shape[0]} samples leaves none to train on")
    held = stratified_indices(labels, n, seed)
    keep = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    keep[held] = False
    return ((images[keep.to(images.device)], labels[keep]),
            (images[held.to(images.device)], labels[held]))


# --------------------------------------------------------------------------- batch transforms


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in 0..255 -> float32 ``(x / 255 - CIFAR10_MEAN) / CIFAR10_STD``
    per channel, same shape and device. Raises ValueError if not uint8 with 3 channels at
    dim -3."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() < 3 or images_uint8.shape[-3] != 3:
        raise ValueError(f"normalize expects uint8 (..., 3, H, W), got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    mean, std = _mean_std(images_uint8.device)
    return (images_uint8.to(torch.float32) / 255.0 - mean) / std


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR10_MEAN and CIFAR10_STD as float32 (3, 1, 1) tensors on ``device``, made once per
    device and process: building them per batch meant two host-to-device copies per batch on a
    GPU, each one waiting for the GPU."""
    if device not in _MEAN_STD:
        _MEAN_STD[device] = tuple(torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(device)
                                  for v in (CIFAR10_MEAN, CIFAR10_STD))
    return _MEAN_STD[device]


def augment(images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard CIFAR augmentation, batched: zero-pad 4 pixels on each side, take a random
    HxW crop (offsets uniform in 0..8 per axis, per sample), flip horizontally with p = 0.5.

    Source: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2.

    The padded batch is built once and every sample's window (flipped or not) is gathered
    with one advanced-indexing op on the input's device; no per-sample Python loop. Random
    numbers are drawn from ``generator`` (on its own device, usually CPU) in a fixed order
    (offsets (N, 2), then flips (N,)) and moved to the input's device, so results do not
    depend on the device of ``images_uint8``.

    Args:
        images_uint8: uint8 (N, C, H, W).
        generator: torch.Generator; advanced by the draws.

    Returns:
        uint8 (N, C, H, W) on the input's device.

    Raises:
        ValueError: input not a 4-D uint8 tensor.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"augment expects uint8 (N, C, H, W), got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    offsets, flips = _draw_augmentation(len(images_uint8), generator)
    dev = images_uint8.device
    return _crop_flip(images_uint8, offsets.to(dev), flips.to(dev))


def _draw_augmentation(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers ``augment`` draws for ``n`` images, in its order: crop offsets int64
    (n, 2) in 0..2*pad, then flips int64 (n,) in 0..1; on the generator's device."""
    gdev = generator.device
    offsets = torch.randint(0, 2 * _PAD + 1, (n, 2), generator=generator, device=gdev)
    flips = torch.randint(0, 2, (n,), generator=generator, device=gdev)
    return offsets, flips


def _crop_flip(images_uint8: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Pad, crop at ``offsets`` (int64 (N, 2), on the images' device) and flip where ``flips``
    (N,) is nonzero: one gather, no host synchronisation."""
    n, c, h, w = images_uint8.shape
    dev = images_uint8.device
    flips = flips.bool()
    padded = torch.nn.functional.pad(images_uint8, (_PAD, _PAD, _PAD, _PAD))
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = offsets[:, :1] + ar_h                                         # (N, H)
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - ar_w, ar_w)  # (N, W)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches ``train_batches``/``eval_batches`` yield for ``n`` samples:
    ``n // batch_size`` if ``drop_last`` else ``ceil(n / batch_size)``. Raises ValueError for
    ``batch_size`` < 1 or ``n`` < 0."""
    _check_batch_size(batch_size)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")


def _check_pair(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (N,) with N = "
                         f"{images.shape[0]} like images")


def _epoch_seed(seed: int, epoch: int) -> int:
    """Well-mixed 63-bit seed from (seed, epoch) via numpy's SeedSequence."""
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), int(epoch) & (2**64 - 1)])
    return int(state.generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


def train_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, seed: int,
                  epoch: int, device: str | torch.device = "cpu",
                  drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented, normalized training batches.

    The uint8 data are moved to ``device`` once per call (a no-op if the caller already keeps
    them there, which is the cheap way). The permutation and every batch's augmentation
    (``augment``) come from one CPU ``torch.Generator`` seeded from (seed, epoch), so the same
    seed and epoch give identical batches on any device; another epoch gives another order.
    All of the epoch's random numbers are drawn up front (in the order a batch-by-batch draw
    would use, so the batches are the same) and reach the device in one copy (pinned,
    non-blocking on a GPU): producing a batch never waits for the GPU.

    Args:
        images: uint8 (N, 3, H, W). labels: int (N,).
        batch_size: positive int. seed, epoch: ints.
        device: where batches are produced. drop_last: skip the final short batch.

    Yields:
        (float32 (B, 3, H, W) normalized + augmented, int64 (B,)) on ``device``; B =
        batch_size except possibly the last; ``num_batches(N, batch_size, drop_last)`` batches;
        each sample appears exactly once per epoch (unless dropped with ``drop_last``).

    Raises:
        ValueError (at call time): bad shapes/dtypes or batch_size.
    """
    _check_pair(images, labels)
    _check_batch_size(batch_size)
    device = torch.device(device)
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    n = images.shape[0]
    count = num_batches(n, batch_size, drop_last)

    def _iter() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = images.to(device)
        y = labels.to(device=device, dtype=torch.int64)
        order = torch.randperm(n, generator=g)
        draws = [_draw_augmentation(min(batch_size, n - b * batch_size), g) for b in range(count)]
        used = sum(len(f) for _, f in draws)
        packed = torch.cat([order[:used]] + [o.flatten() for o, _ in draws] + [f for _, f in draws])
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            packed = packed.to(device)
        order, offsets, flips = packed[:used], packed[used:3 * used].view(used, 2), packed[3 * used:]
        for b in range(count):
            part = slice(b * batch_size, min((b + 1) * batch_size, n))
            idx = order[part]
            yield normalize(_crop_flip(x[idx], offsets[part], flips[part])), y[idx]

    return _iter()


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 device: str | torch.device = "cpu"
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches in data order, no augmentation: (float32 (B, 3, H, W) normalized, int64 (B,))
    on ``device``; the last batch may be short. Raises ValueError (at call time) for bad
    shapes/dtypes or batch_size."""
    _check_pair(images, labels)
    _check_batch_size(batch_size)
    device = torch.device(device)

    def _iter() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device=device, dtype=torch.int64)
            yield normalize(x), y

    return _iter()


def study_data(config: StudyConfig) -> CIFAR10Tensors:
    """CIFAR-10 as uint8 tensors (``load_cifar10`` of ``config.data_root``), cut to the config's
    stratified subsets (``train_subset``/``test_subset``; 0 = the whole split), seeded by
    ``config.seed``; with ``val_size`` > 0, that many training images (stratified, seeded by
    ``config.seed``) are moved out of the training set into ``val_images``/``val_labels``, the
    same split for every trial. ``val_size`` 0 leaves the training set exactly as it was.

    Raises ValueError (``DataRootError`` for the data root) with a one-line message: no
    ``--data-root``, a root that is missing or malformed, or a subset or validation size out of
    range."""
    if config.data_root is None:
        raise ValueError("--data-root is required: a CIFAR-10 folder (image folders or "
                         "cifar-10-batches-py), or an empty folder with --download")
    data = load_cifar10(config.data_root, download=config.download)
    train = (data.train_images, data.train_labels)
    test = (data.test_images, data.test_labels)
    if config.train_subset:
        train = stratified_subset(*train, config.train_subset, seed=config.seed)
    if config.test_subset:
        test = stratified_subset(*test, config.test_subset, seed=config.seed)
    if not config.val_size:
        return CIFAR10Tensors(*train, *test)
    try:
        train, val = stratified_split(*train, config.val_size, seed=config.seed)
    except ValueError as err:
        raise ValueError(f"--val-size {config.val_size}: {err}") from None
    return CIFAR10Tensors(*train, *test, *val)
