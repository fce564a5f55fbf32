"""Tests for trainables/data.py: loading (real small tree, fake pickles, bad roots, cache),
subsets, normalization, batched augmentation and the batch iterators."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image, read_file, write_png

from trainables import data
from trainables.batches import (augment, eval_batches, normalize, num_batches, stratified_subset,
                                train_batches)
from trainables.data import CACHE_NAME, CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, DataRootError, load_cifar10

# -------------------------------------------------------------------------- helpers


def _make_tree(root: Path, per_class: int = 1, *, splits=("train", "test"),
               classes=CIFAR10_CLASSES) -> Path:
    """Image-folder tree of tiny 32x32 RGB PNGs whose pixels all equal the class id."""
    for split in splits:
        for label, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = torch.full((3, 32, 32), label, dtype=torch.uint8)
                write_png(img, str(d / f"{i:04d}.png"))
    return root


def _one_line_error(fn, *match):
    with pytest.raises(DataRootError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


# -------------------------------------------------------------------------- constants


def test_constants():
    assert CIFAR10_CLASSES == tuple(sorted(CIFAR10_CLASSES))
    assert CIFAR10_CLASSES[0] == "airplane" and CIFAR10_CLASSES[9] == "truck"
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert issubclass(DataRootError, ValueError)


# -------------------------------------------------------------------------- real small tree


def test_load_small_real_tree(cifar_root):
    (cifar_root / CACHE_NAME).unlink(missing_ok=True)  # other tests may have cached this tree
    d = load_cifar10(cifar_root, cache=False)
    assert d.train_images.shape == (150, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (100, 3, 32, 32) and d.test_images.dtype == torch.uint8
    assert d.train_labels.dtype == torch.int64 and d.test_labels.dtype == torch.int64
    assert torch.equal(d.train_labels, torch.arange(10).repeat_interleave(15))
    assert torch.equal(d.test_labels, torch.arange(10).repeat_interleave(10))
    assert not (cifar_root / CACHE_NAME).exists()
    # class folder -> label id, files in sorted order: spot-check pixels against the files
    for split, images, per in (("train", d.train_images, 15), ("test", d.test_images, 10)):
        for label in (0, 3, 9):
            files = sorted((cifar_root / split / CIFAR10_CLASSES[label]).glob("*.jpg"))
            assert len(files) == per
            for j in (0, per - 1):
                want = decode_image(read_file(str(files[j])))
                assert torch.equal(images[label * per + j], want)


def test_cache_written_then_used_without_decoding(cifar_root, tmp_path, monkeypatch):
    root = tmp_path / "cifar"
    shutil.copytree(cifar_root, root)
    first = load_cifar10(root)
    cache = root / CACHE_NAME
    assert cache.is_file()
    assert not list(root.glob("*.tmp"))  # atomic write left no temp file

    def boom(*a, **k):
        raise AssertionError("decoded although a valid cache exists")

    monkeypatch.setattr(data, "decode_image", boom)
    second = load_cifar10(root)
    assert all(torch.equal(a, b) for a, b in zip(first[:4], second[:4]))  # the cache holds the four split tensors
    with pytest.raises(AssertionError):  # the patch is effective when the cache is skipped
        load_cifar10(root, cache=False)


@pytest.mark.parametrize("bad", ["garbage", "wrong_dtype", "wrong_shape"])
def test_bad_cache_is_ignored_and_rebuilt(tmp_path, bad):
    root = _make_tree(tmp_path / "root")
    good = load_cifar10(root, cache=False)
    cache = root / CACHE_NAME
    if bad == "garbage":
        cache.write_bytes(b"not a torch file")
    else:
        obj = {"format": data._CACHE_FORMAT, "source": "folder",
               "fingerprint": data._fingerprint(root, "folder"), **good._asdict()}
        if bad == "wrong_dtype":
            obj["train_images"] = good.train_images.float()
        else:
            obj["test_images"] = torch.zeros(10, 3, 16, 16, dtype=torch.uint8)
        torch.save(obj, cache)
    got = load_cifar10(root)
    assert all(torch.equal(a, b) for a, b in zip(good[:4], got[:4]))
    rebuilt = torch.load(cache, weights_only=True)
    assert torch.equal(rebuilt["train_images"], good.train_images)
    assert torch.equal(rebuilt["test_images"], good.test_images)


def test_stale_cache_is_rebuilt(tmp_path):
    root = _make_tree(tmp_path / "root", per_class=1)
    assert load_cifar10(root).train_images.shape[0] == 10
    extra = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    write_png(extra, str(root / "train" / "horse" / "0001.png"))
    os.utime(root / "train" / "horse", ns=(1, 1))  # make sure the folder mtime differs
    d = load_cifar10(root)
    assert d.train_images.shape[0] == 11
    assert torch.equal(torch.bincount(d.train_labels), torch.tensor([1] * 7 + [2] + [1] * 2))


def test_cache_goes_to_user_cache_when_root_not_writable(tmp_path, monkeypatch):
    root = _make_tree(tmp_path / "root")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "_root_writable", lambda root: False)
    first = load_cifar10(root)
    digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()
    cache = tmp_path / "xdg" / "distill-sparsify" / f"{digest}.pt"
    assert cache.is_file() and not (root / CACHE_NAME).exists()
    monkeypatch.setattr(data, "decode_image", lambda *a, **k: 1 / 0)
    assert all(torch.equal(a, b) for a, b in zip(first[:4], load_cifar10(root)[:4]))


# -------------------------------------------------------------------------- pickled batches


def _write_batches(root: Path, per_batch: int = 3, skip=()) -> Path:
    bdir = root / "cifar-10-batches-py"
    bdir.mkdir(parents=True)
    for b, name in enumerate(data._BATCH_FILES):
        if name in skip:
            continue
        # sample k of batch b: value 10*b + k everywhere, red plane +1 at pixel 0
        rows = np.stack([np.full(3072, 10 * b + k, dtype=np.uint8) for k in range(per_batch)])
        rows[:, 0] += 1
        labels = [(b + k) % 10 for k in range(per_batch)]
        with open(bdir / name, "wb") as fh:  # bytes keys, as in the original release
            pickle.dump({b"data": rows, b"labels": labels, b"batch_label": name.encode()}, fh)
    return root


def test_load_batches_py(tmp_path):
    root = _write_batches(tmp_path / "root")
    d = load_cifar10(root, cache=False)
    assert d.train_images.shape == (15, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (3, 3, 32, 32)
    assert d.train_labels.tolist() == [(b + k) % 10 for b in range(5) for k in range(3)]
    assert d.test_labels.tolist() == [5, 6, 7]
    assert d.train_labels.dtype == torch.int64
    assert d.train_images[4, 0, 0, 0] == 12 and d.train_images[4, 1, 0, 0] == 11  # CHW layout
    assert torch.all(d.test_images[2, :, 1:, :] == 52)


def test_image_folder_wins_over_batches(tmp_path):
    root = _write_batches(_make_tree(tmp_path / "root"))
    assert load_cifar10(root, cache=False).train_images.shape[0] == 10


# -------------------------------------------------------------------------- bad roots


def test_missing_root(tmp_path):
    _one_line_error(lambda: load_cifar10(tmp_path / "nope"), str(tmp_path / "nope"),
                    "does not exist", "--download")


def test_root_without_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    _one_line_error(lambda: load_cifar10(tmp_path), str(tmp_path), "none of the accepted layouts",
                    "cifar-10-batches-py", "train/<class>", "--download")


def test_root_is_a_file(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    _one_line_error(lambda: load_cifar10(f), str(f), "not a directory")


def test_wrong_class_folders(tmp_path):
    classes = CIFAR10_CLASSES[:-1] + ("lorry",)
    root = _make_tree(tmp_path / "root", classes=classes)
    _one_line_error(lambda: load_cifar10(root), str(root / "train"), "missing: truck",
                    "unexpected: lorry")


def test_missing_test_split(tmp_path):
    root = _make_tree(tmp_path / "root", splits=("train",))
    _one_line_error(lambda: load_cifar10(root), str(root / "test"), "missing")


def test_image_not_32x32(tmp_path):
    root = _make_tree(tmp_path / "root")
    bad = root / "test" / "dog" / "0000.png"
    write_png(torch.zeros(3, 16, 24, dtype=torch.uint8), str(bad))
    _one_line_error(lambda: load_cifar10(root), str(bad), "24x16", "expected 32x32 RGB")


def test_image_not_rgb(tmp_path):
    root = _make_tree(tmp_path / "root")
    bad = root / "train" / "cat" / "0000.png"
    write_png(torch.zeros(1, 32, 32, dtype=torch.uint8), str(bad))
    _one_line_error(lambda: load_cifar10(root), str(bad), "1 channel", "expected 32x32 RGB")


def test_undecodable_image(tmp_path):
    root = _make_tree(tmp_path / "root")
    bad = root / "train" / "cat" / "0000.png"
    bad.write_bytes(b"\x89PNG broken")
    _one_line_error(lambda: load_cifar10(root), str(bad), "cannot decode")


def test_empty_class_folder(tmp_path):
    root = _make_tree(tmp_path / "root")
    empty = root / "train" / "frog"
    for f in empty.iterdir():
        f.unlink()
    (empty / "notes.txt").write_text("not an image")
    _one_line_error(lambda: load_cifar10(root), str(empty), "holds no images")


def test_batches_missing_files(tmp_path):
    root = _write_batches(tmp_path / "root", skip=("data_batch_3", "test_batch"))
    _one_line_error(lambda: load_cifar10(root), "cifar-10-batches-py",
                    "lacks data_batch_3, test_batch")


def test_download_failure_offline(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    root = tmp_path / "dl"
    _one_line_error(lambda: load_cifar10(root, download=True), str(root), "no network",
                    "point --data-root at a local copy")


# -------------------------------------------------------------------------- stratified_subset


def _pool(per_class=20):
    labels = torch.arange(10).repeat_interleave(per_class)
    return torch.arange(labels.numel()), labels  # "images" = their own index


def test_stratified_subset_counts_and_pairing():
    images, labels = _pool()
    x, y = stratified_subset(images, labels, 25, seed=0)
    assert torch.bincount(y, minlength=10).tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    assert torch.equal(y, x // 20)  # images stay paired with their labels
    assert x.unique().numel() == 25
    assert not torch.equal(y, y.sort().values)  # shuffled, not grouped by class
    x, y = stratified_subset(images, labels, 200, seed=0)
    assert torch.equal(x.sort().values, images)


def test_stratified_subset_deterministic():
    images, labels = _pool()
    a = stratified_subset(images, labels, 50, seed=1)
    b = stratified_subset(images, labels, 50, seed=1)
    c = stratified_subset(images, labels, 50, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("n", [9, 201, 0, None, 2.5])
def test_stratified_subset_bad_n(n):
    images, labels = _pool()
    with pytest.raises(ValueError, match="n="):
        stratified_subset(images, labels, n, seed=0)


def test_stratified_subset_class_shortfall():
    labels = torch.cat([torch.tensor([0]), torch.arange(1, 10).repeat_interleave(5)])
    with pytest.raises(ValueError, match="class 0"):
        stratified_subset(torch.arange(labels.numel()), labels, 20, seed=0)


# -------------------------------------------------------------------------- normalize


def test_normalize_exact_values():
    x = torch.stack([torch.zeros(3, 2, 2, dtype=torch.uint8),
                     torch.full((3, 2, 2), 255, dtype=torch.uint8)])
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for c in range(3):
        assert torch.allclose(out[0, c], torch.tensor(-CIFAR10_MEAN[c] / CIFAR10_STD[c]),
                              atol=1e-6)
        assert torch.allclose(out[1, c], torch.tensor((1 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]),
                              atol=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(-1.989473684, abs=1e-6)
    assert out[1, 2, 0, 0].item() == pytest.approx(2.115825688, abs=1e-6)
    assert normalize(x[0]).shape == (3, 2, 2)  # single image works too
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.float())


# -------------------------------------------------------------------------- augment


def _positional_image() -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = col + 1, channel 2 = 200: every window is distinct."""
    ar = torch.arange(1, 33, dtype=torch.uint8)
    return torch.stack([ar[:, None].expand(32, 32), ar[None, :].expand(32, 32),
                        torch.full((32, 32), 200, dtype=torch.uint8)])


def test_augment_outputs_are_padded_crops_with_optional_flip():
    base = _positional_image()
    n = 2000
    out = augment(base.expand(n, 3, 32, 32).contiguous(), torch.Generator().manual_seed(0))
    assert out.shape == (n, 3, 32, 32) and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(base, (4, 4, 4, 4))
    # read each sample's offsets/flip off its (always inside) center pixels, then demand an
    # exact match with that padded window
    dy = out[:, 0, 16, 16].long() - 13  # row value = (dy - 4 + 16) + 1
    flip = out[:, 1, 16, 17] < out[:, 1, 16, 16]
    dx = torch.where(flip, out[:, 1, 16, 15].long(), out[:, 1, 16, 16].long()) - 13
    seen = set()
    for key in torch.stack([dy, dx, flip.long()], 1).unique(dim=0).tolist():
        y0, x0, f = key
        assert 0 <= y0 <= 8 and 0 <= x0 <= 8
        win = padded[:, y0:y0 + 32, x0:x0 + 32]
        want = win.flip(-1) if f else win
        mask = (dy == y0) & (dx == x0) & (flip == bool(f))
        assert torch.all(out[mask] == want), key
        seen.add(tuple(key))
    assert len(seen) == 81 * 2  # every offset and both flip states occur


def test_augment_zero_padding_and_determinism():
    x = torch.full((500, 3, 32, 32), 255, dtype=torch.uint8)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0, 255}
    # zeros come only from the 4-pixel border: each sample keeps at least a 28x28 block
    assert torch.all((a == 255).reshape(500, -1).sum(1) >= 3 * 28 * 28)
    assert torch.all(a[:, :, 4:28, 4:28] == 255)  # the center is never padding
    with pytest.raises(ValueError, match="uint8"):
        augment(x.float(), torch.Generator())


# -------------------------------------------------------------------------- batch iterators


def _indexed(n):
    """Images whose every pixel equals the sample index (n <= 256), labels = index."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 32, 32)
    return images.contiguous(), torch.arange(n)


def _center_value(x):
    """Undo normalize at the always-inside center pixel: back to the uint8 value."""
    mean = torch.tensor(CIFAR10_MEAN)[:, None]
    std = torch.tensor(CIFAR10_STD)[:, None]
    v = (x[:, :, 16, 16].T * std + mean) * 255
    return v.round().long()


def test_train_batches_cover_each_sample_once():
    images, labels = _indexed(103)
    batches = list(train_batches(images, labels, 16, seed=0, epoch=0))
    assert len(batches) == num_batches(103, 16) == 7
    assert [b[0].shape[0] for b in batches] == [16] * 6 + [7]
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    assert xs.dtype == torch.float32 and xs.shape == (103, 3, 32, 32)
    assert ys.dtype == torch.int64
    assert torch.equal(ys.sort().values, labels)
    assert not torch.equal(ys, labels)  # shuffled
    vals = _center_value(xs)
    assert torch.equal(vals, ys.expand(3, -1))  # images stay paired with labels
    dropped = list(train_batches(images, labels, 16, seed=0, epoch=0, drop_last=True))
    assert len(dropped) == num_batches(103, 16, drop_last=True) == 6
    assert torch.cat([b[1] for b in dropped]).unique().numel() == 96


def test_train_batches_deterministic_per_seed_and_epoch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)

    def run(seed, epoch):
        return list(train_batches(images, labels, 20, seed=seed, epoch=epoch))

    a, b, c, d = run(0, 0), run(0, 0), run(0, 1), run(1, 0)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], d[0][0])


def test_eval_batches_in_order_without_augmentation():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (45, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(45) % 10
    batches = list(eval_batches(images, labels, 20))
    assert [b[0].shape[0] for b in batches] == [20, 20, 5]
    assert torch.equal(torch.cat([b[0] for b in batches]), normalize(images))
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


def test_batch_argument_errors():
    images, labels = _indexed(10)
    with pytest.raises(ValueError, match="batch_size"):
        train_batches(images, labels, 0, seed=0, epoch=0)  # raised at call time
    with pytest.raises(ValueError, match="labels"):
        eval_batches(images, labels[:5], 4)
    with pytest.raises(ValueError, match="uint8"):
        train_batches(images.float(), labels, 4, seed=0, epoch=0)
    assert num_batches(0, 4) == 0 and num_batches(8, 4) == 2 and num_batches(9, 4) == 3
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(9, 0)


def test_pipeline_on_small_real_tree(cifar_root):
    d = load_cifar10(cifar_root, cache=False)
    x, y = stratified_subset(d.train_images, d.train_labels, 100, seed=0)
    assert torch.bincount(y).tolist() == [10] * 10
    xb, yb = next(train_batches(x, y, 32, seed=0, epoch=0))
    assert xb.shape == (32, 3, 32, 32) and xb.dtype == torch.float32 and yb.shape == (32,)
    assert -2.5 < xb.min() and xb.max() < 2.8
