"""CIFAR-10 as in-memory uint8 tensors, with batched augmentation (airbench style).

The data set is decoded once into four tensors and cached on disk; every epoch then only
indexes those tensors, augments whole batches with tensor ops and normalizes them, on the
device the caller chooses. No per-sample Python work happens in the training loop.

Sources (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009): 10 classes,
32x32 RGB, 50,000 train + 10,000 test images. Accepted on disk as

(a) an image-folder tree ``root/train/<class>/*.{jpg,jpeg,png}`` and ``root/test/<class>/*``
    (the layout of ``shared/data/cifar10-jpg.tar.gz``),
(b) the original python release ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``,
(c) ``download=True``: torchvision fetches (b) into ``root``.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from trainables.utils import atomic_output

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CACHE_NAME",
    "CIFAR10Tensors",
    "DataRootError",
    "load_cifar10",
    "stratified_subset",
    "normalize",
    "augment",
    "train_batches",
    "eval_batches",
    "num_batches",
]

#: Class names; sorted alphabetically they are exactly the CIFAR-10 label ids 0..9
#: (``batches.meta`` of the original release lists them in this order).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
#: Per-channel (R, G, B) mean of the 50,000 training images, pixel values scaled to [0, 1].
#: Source: the values used by airbench (Keller Jordan, ``CIFAR_MEAN``) and the corrected
#: kuangliu/pytorch-cifar statistics (issue #19), computed over all training pixels.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
#: Per-channel (R, G, B) standard deviation over all training pixels, same scale and source
#: as ``CIFAR10_MEAN`` (not the often-copied 0.2023/0.1994/0.2010, which are per-image stds).
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

#: File name of the decoded-tensor cache inside a writable root.
CACHE_NAME = "cifar10-uint8.pt"
_CACHE_FORMAT = 1
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_BATCHES_DIR = "cifar-10-batches-py"
_BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                "data_batch_5", "test_batch")
_LAYOUTS = (f"image folders train/<class>/*.jpg|png + test/<class>/* "
            f"(classes {', '.join(CIFAR10_CLASSES)}) or {_BATCHES_DIR}/")
_PAD = 4  # pixels of zero padding before the random crop


class CIFAR10Tensors(NamedTuple):
    """The whole data set as CPU tensors.

    Fields: ``train_images`` uint8 (N_train, 3, 32, 32), RGB, values 0..255;
    ``train_labels`` int64 (N_train,), ids 0..9 (index into ``CIFAR10_CLASSES``);
    ``test_images`` uint8 (N_test, 3, 32, 32); ``test_labels`` int64 (N_test,).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


class DataRootError(ValueError):
    """A data root that is missing, malformed or cannot be fetched; the message is one line
    naming the path and what was expected."""


# --------------------------------------------------------------------------- loading


def load_cifar10(root: str | os.PathLike, download: bool = False,
                 cache: bool = True) -> CIFAR10Tensors:
    """Load CIFAR-10 from ``root`` as uint8 tensors, decoding at most once.

    Args:
        root: directory holding one of the layouts (a) image folders ``train/<class>/`` and
            ``test/<class>/`` with .jpg/.jpeg/.png files, (b) ``cifar-10-batches-py/``;
            detected in that order. Files inside a class folder are read in sorted name order,
            classes in ``CIFAR10_CLASSES`` order (so labels come out grouped, 0 first).
        download: if neither layout is present, fetch (b) with
            ``torchvision.datasets.CIFAR10(root, download=True)`` (creates ``root``).
        cache: read/write the decoded tensors from/to ``root/cifar10-uint8.pt`` (if ``root``
            is writable, else ``${XDG_CACHE_HOME:-~/.cache}/distill-sparsify/<sha1>.pt``,
            sha1 of the absolute root path). The cache is written atomically (temp file +
            ``os.replace``), is keyed on the source layout and the modification times of its
            folders/files, and is ignored and rebuilt if stale, unreadable or of the wrong
            shape/dtype. ``cache=False`` neither reads nor writes it.

    Returns:
        ``CIFAR10Tensors`` (see there for shapes/dtypes), on CPU.

    Raises:
        DataRootError: root missing; no accepted layout; wrong class folders; an empty class
            folder; an image that is not 32x32 RGB or cannot be decoded; a malformed batch
            file; download failure (no network).
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        if not download:
            raise DataRootError(
                f"CIFAR-10 root {str(root_path)!r} does not exist; expected a directory with "
                f"{_LAYOUTS} (or pass --download to fetch it)")
    elif not root_path.is_dir():
        raise DataRootError(f"CIFAR-10 root {str(root_path)!r} is not a directory; expected a "
                            f"directory with {_LAYOUTS}")

    kind = _detect_layout(root_path) if root_path.is_dir() else None
    if kind is None:
        if not download:
            raise DataRootError(
                f"CIFAR-10 root {str(root_path)!r} holds none of the accepted layouts: "
                f"{_LAYOUTS}; pass --download to fetch it")
        _download(root_path)
        kind = "batches"
        if _detect_layout(root_path) != "batches":
            raise DataRootError(f"download into {str(root_path)!r} finished but "
                                f"{_BATCHES_DIR}/ is missing there")

    if kind == "folder":  # cheap structural checks before trusting any cache
        _class_dirs(root_path / "train")
        _class_dirs(root_path / "test")
    fingerprint = _fingerprint(root_path, kind)
    if cache:
        hit = _read_cache(root_path, kind, fingerprint)
        if hit is not None:
            return hit

    data = _load_image_folder(root_path) if kind == "folder" else _load_batches(root_path)
    if cache:
        _write_cache(root_path, kind, fingerprint, data)
    return data


def _detect_layout(root: Path) -> str | None:
    """'folder' for layout (a) (either split folder present), 'batches' for (b), else None."""
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "folder"
    if (root / _BATCHES_DIR).is_dir():
        return "batches"
    return None


def _class_dirs(split_dir: Path) -> list[Path]:
    """Validated class folders of one split, in label order."""
    if not split_dir.is_dir():
        raise DataRootError(
            f"{str(split_dir)!r} is missing; the image-folder layout needs both train/ and test/ "
            f"with one folder per class ({', '.join(CIFAR10_CLASSES)})")
    found = {e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")}
    missing = [c for c in CIFAR10_CLASSES if c not in found]
    unexpected = sorted(found - set(CIFAR10_CLASSES))
    if missing or unexpected:
        raise DataRootError(
            f"{str(split_dir)!r} has wrong class folders (missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(unexpected) or 'none'}); expected exactly "
            f"{', '.join(CIFAR10_CLASSES)}")
    return [split_dir / c for c in CIFAR10_CLASSES]


def _image_files(class_dir: Path) -> list[str]:
    files = sorted(e.path for e in os.scandir(class_dir)
                   if e.is_file() and e.name.lower().endswith(_IMAGE_EXTS))
    if not files:
        raise DataRootError(f"class folder {str(class_dir)!r} holds no images; expected "
                            f"*.jpg, *.jpeg or *.png files")
    return files


def _load_split_folder(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    per_class = [_image_files(d) for d in _class_dirs(split_dir)]
    n = sum(len(f) for f in per_class)
    images = torch.empty((n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.empty((n,), dtype=torch.int64)
    i = 0
    for label, files in enumerate(per_class):
        labels[i:i + len(files)] = label
        for path in files:
            try:
                img = decode_image(read_file(path), mode=ImageReadMode.UNCHANGED)
            except RuntimeError as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise DataRootError(f"cannot decode image {path!r}: {msg}") from None
            if img.shape != (3, 32, 32):
                c, h, w = img.shape
                raise DataRootError(
                    f"image {path!r} is {w}x{h} with {c} channel(s); expected 32x32 RGB "
                    f"(3 channels) like every CIFAR-10 image")
            images[i] = img
            i += 1
    return images, labels


def _load_image_folder(root: Path) -> CIFAR10Tensors:
    """Decode layout (a); raises DataRootError (see ``load_cifar10``)."""
    # Validate both splits' class folders before decoding anything.
    _class_dirs(root / "train")
    _class_dirs(root / "test")
    train = _load_split_folder(root / "train")
    test = _load_split_folder(root / "test")
    return CIFAR10Tensors(*train, *test)


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["labels"], dtype=np.int64)
    except Exception as exc:  # any unpickling / key / conversion problem
        raise DataRootError(f"cannot read CIFAR-10 batch {str(path)!r}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}; expected a pickled "
                            f"dict with 'data' (N, 3072) uint8 and 'labels'") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DataRootError(f"CIFAR-10 batch {str(path)!r} has data {tuple(data.shape)} and "
                            f"labels {tuple(labels.shape)}; expected (N, 3072) and (N,)")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DataRootError(f"CIFAR-10 batch {str(path)!r} has labels outside 0..9")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.copy())


def _load_batches(root: Path) -> CIFAR10Tensors:
    """Parse layout (b) directly (no md5 check, unlike torchvision); raises DataRootError."""
    bdir = root / _BATCHES_DIR
    missing = [f for f in _BATCH_FILES if not (bdir / f).is_file()]
    if missing:
        raise DataRootError(f"{str(bdir)!r} lacks {', '.join(missing)}; expected "
                            f"{', '.join(_BATCH_FILES)} (the cifar-10-python release)")
    train = [_read_batch(bdir / f) for f in _BATCH_FILES[:5]]
    test_images, test_labels = _read_batch(bdir / _BATCH_FILES[5])
    return CIFAR10Tensors(torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train]),
                          test_images, test_labels)


def _download(root: Path) -> None:
    """Fetch layout (b) with torchvision; any failure becomes a one-line DataRootError."""
    import torchvision

    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            torchvision.datasets.CIFAR10(str(root), train=train, download=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataRootError(
            f"could not download CIFAR-10 into {str(root)!r} (no network? "
            f"{type(exc).__name__}: {first}); pass a local root holding {_LAYOUTS}") from None


# --------------------------------------------------------------------------- cache


def _fingerprint(root: Path, kind: str) -> list[list]:
    """Cheap staleness key: (relative path, mtime_ns[, size]) of the source folders/files."""
    if kind == "folder":
        paths = [root / s for s in ("train", "test")]
        paths += [root / s / c for s in ("train", "test") for c in CIFAR10_CLASSES]
    else:
        paths = [root / _BATCHES_DIR / f for f in _BATCH_FILES]
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append([str(p.relative_to(root)), int(st.st_mtime_ns), int(st.st_size)])
        except OSError:
            out.append([str(p.relative_to(root)), -1, -1])
    return out


def _user_cache_path(root: Path) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()
    return Path(base) / "distill-sparsify" / f"{digest}.pt"


def _root_writable(root: Path) -> bool:
    return os.access(root, os.W_OK)


def _cache_paths(root: Path) -> list[Path]:
    """Where to look for / write the cache, preferred first."""
    paths = [root / CACHE_NAME] if _root_writable(root) else []
    return paths + [_user_cache_path(root)]


def _valid(data: CIFAR10Tensors) -> bool:
    for images, labels in ((data.train_images, data.train_labels),
                           (data.test_images, data.test_labels)):
        if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
            return False
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1:] != (3, 32, 32):
            return False
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            return False
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
            return False
    return True


def _read_cache(root: Path, kind: str, fingerprint: list) -> CIFAR10Tensors | None:
    for path in _cache_paths(root):
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():  # torch 2.1 warns about TypedStorage here
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if (obj.get("format") != _CACHE_FORMAT or obj.get("source") != kind
                    or obj.get("fingerprint") != fingerprint):
                continue
            data = CIFAR10Tensors(*(obj[k] for k in CIFAR10Tensors._fields))
        except Exception:  # unreadable / truncated / foreign file: rebuild
            continue
        if _valid(data):
            return data
    return None


def _write_cache(root: Path, kind: str, fingerprint: list, data: CIFAR10Tensors) -> None:
    obj = {"format": _CACHE_FORMAT, "source": kind, "fingerprint": fingerprint,
           **{k: v.contiguous() for k, v in data._asdict().items()}}
    errors = []
    for path in _cache_paths(root):
        try:
            with atomic_output(path) as tmp:
                torch.save(obj, tmp)
            return
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    warnings.warn(f"could not write CIFAR-10 cache ({'; '.join(errors)}); "
                  f"the data will be decoded again next time", stacklevel=3)


# --------------------------------------------------------------------------- subsets


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
    if labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} must "
                         f"have the same first dimension (labels 1-D)")
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
    chosen = chosen[torch.randperm(chosen.numel(), generator=g)].to(labels.device)
    return images[chosen.to(images.device)], labels[chosen]


# --------------------------------------------------------------------------- batch transforms


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in 0..255 -> float32 ``(x / 255 - CIFAR10_MEAN) / CIFAR10_STD``
    per channel, same shape and device. Raises ValueError if not uint8 with 3 channels at
    dim -3."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() < 3 or images_uint8.shape[-3] != 3:
        raise ValueError(f"normalize expects uint8 (..., 3, H, W), got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    dev = images_uint8.device
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32, device=dev).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32, device=dev).view(3, 1, 1)
    return (images_uint8.to(torch.float32) / 255.0 - mean) / std


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
    n, c, h, w = images_uint8.shape
    dev = images_uint8.device
    gdev = generator.device
    offsets = torch.randint(0, 2 * _PAD + 1, (n, 2), generator=generator, device=gdev).to(dev)
    flips = torch.randint(0, 2, (n,), generator=generator, device=gdev).to(dev).bool()
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
        order = torch.randperm(n, generator=g).to(device)
        for b in range(count):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield normalize(augment(x[idx], g)), y[idx]

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


def extract_image_subset(tarball: str | os.PathLike, dest: str | os.PathLike,
                         per_class: dict[str, int]) -> Path:
    """Extract the first ``per_class[split]`` images of every class of each split (in archive
    order) from an image-folder tarball such as ``cifar10-jpg.tar.gz`` into
    ``dest/<split>/<class>/<name>``; streams the archive once and stops when all are written.

    ``per_class`` maps split names ("train", "test") to images per class. Returns ``dest``.
    Raises OSError/tarfile.TarError for an unreadable archive.
    """
    import tarfile

    dest = Path(dest)
    counts: dict[tuple[str, str], int] = {}
    need = sum(per_class.values()) * len(CIFAR10_CLASSES)
    with tarfile.open(tarball, "r|gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_class:
                continue
            split, cls, name = parts
            if counts.get((split, cls), 0) >= per_class[split] or name.startswith("."):
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            (dest / split / cls / name).write_bytes(archive.extractfile(member).read())
            need -= 1
            if need == 0:
                break
    return dest
