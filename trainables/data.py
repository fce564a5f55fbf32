"""CIFAR-10 as in-memory uint8 tensors: loaded from disk once, cached, and validated.

The data set is decoded once into four tensors and cached on disk; ``trainables.batches`` then
cuts subsets, augments and normalizes whole batches of them on the training device.

Sources (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009): 10 classes,
32x32 RGB, 50,000 train + 10,000 test images. Accepted on disk as

(a) an image-folder tree ``root/train/<class>/*.{jpg,jpeg,png}`` and ``root/test/<class>/*``
    (the layout of ``shared/data/cifar10-jpg.tar.gz``; ``extract_image_subset`` writes the first
    images per class of such a tarball into it),
(b) the original python release ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``,
(c) ``download=True``: torchvision fetches (b) into ``root``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from study.errors import error_line
from study.files import atomic_output

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CACHE_NAME",
    "CIFAR10Tensors",
    "DataRootError",
    "load_cifar10",
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


class CIFAR10Tensors(NamedTuple):
    """The whole data set as CPU tensors.

    Fields: ``train_images`` uint8 (N_train, 3, 32, 32), RGB, values 0..255;
    ``train_labels`` int64 (N_train,), ids 0..9 (index into ``CIFAR10_CLASSES``);
    ``test_images`` uint8 (N_test, 3, 32, 32); ``test_labels`` int64 (N_test,);
    ``val_images`` uint8 (N_val, 3, 32, 32) and ``val_labels`` int64 (N_val,): a validation split
    held out of the training images (``trainables.batches.study_data`` with ``--val-size``), or
    None (the default: no validation split; the decoded data set and its cache never have one).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None


#: The fields of the decoded data set (and of its cache); the validation split is cut later.
_SPLIT_FIELDS = CIFAR10Tensors._fields[:4]


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
    kind = _root_layout(root_path, download)
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


def _root_layout(root_path: Path, download: bool) -> str:
    """The layout of ``root_path``, 'folder' or 'batches'; with ``download``, fetches (b) into it
    first if neither is there. Raises DataRootError (root missing or not a directory, no layout,
    download incomplete)."""
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
    return kind


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
                msg = error_line(exc) or type(exc).__name__
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
                            f"{error_line(exc)}; expected a pickled "
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
        first = error_line(exc)
        raise DataRootError(
            f"could not download CIFAR-10 into {str(root)!r} (no network? "
            f"{type(exc).__name__}: {first}); point --data-root at a local copy: {_LAYOUTS}") from None


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


# --------------------------------------------------------------------------- cache


def _fingerprint(root: Path, kind: str) -> list[list]:
    """Cheap staleness key: (relative path, mtime_ns, size) of the source folders and of every image
    file (an image rewritten in place leaves its folder's mtime as it was, not its own)."""
    if kind == "folder":
        paths = [root / s for s in ("train", "test")]
        paths += [root / s / c for s in ("train", "test") for c in CIFAR10_CLASSES]
        paths += [Path(f) for s in ("train", "test") for c in CIFAR10_CLASSES
                  if (root / s / c).is_dir() for f in _image_files(root / s / c)]
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
            data = CIFAR10Tensors(*(obj[k] for k in _SPLIT_FIELDS))
        except Exception:  # unreadable / truncated / foreign file: rebuild
            continue
        if _valid(data):
            return data
    return None


def _write_cache(root: Path, kind: str, fingerprint: list, data: CIFAR10Tensors) -> None:
    obj = {"format": _CACHE_FORMAT, "source": kind, "fingerprint": fingerprint,
           **{k: getattr(data, k).contiguous() for k in _SPLIT_FIELDS}}
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
