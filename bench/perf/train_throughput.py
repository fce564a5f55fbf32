#!/usr/bin/env python
"""Training throughput on one device, in images per second, with the ratios that matter.

Measures, at one batch size, on ``--device`` (cpu or cuda), in one run:

* ``data pipeline``: ``trainables.batches.train_batches`` over uint8 tensors already on the device
  (batched crop + flip + normalize), as ``trainables.train._fit`` consumes it;
* ``DataLoader baseline``: the naive alternative, a ``torch.utils.data.DataLoader`` over a
  PIL-backed Dataset of the same images (``Image.fromarray`` per sample, as
  ``torchvision.datasets.CIFAR10`` does) with ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(CIFAR10_MEAN, CIFAR10_STD)``, batches
  moved to the device;
* ``teacher forward``: ``build_teacher(arch)`` in eval mode under ``torch.no_grad()``;
* ``student step <setup>`` for ce, kd, kd_feat: one optimisation step as in
  ``trainables.student.train_student`` (teacher forward for kd/kd_feat, the setup's loss, backward,
  Adam step, the loss terms summed on the device as ``_fit`` does: no read-back per step) on a
  fixed, already-made batch.

The GPU path is the trainables' own: bf16 autocast (``trainables.train.autocast``), channels_last
(``--memory-format auto``: on cuda only), cuDNN autotuning and TF32 (``setup_torch``), and
``torch.compile`` (``--compile``; default: on cuda only, as ``trainables.train.use_compile``; the
compile time falls in the ``--warmup`` steps). Timings
exclude ``--warmup`` steps and are bracketed by ``torch.cuda.synchronize()`` on a GPU. Models are
randomly initialised (speed does not depend on the weights). Without ``--data-root`` the images
are random uint8 tensors (the pipeline's cost does not depend on pixel values).

Example: ``python bench/perf/train_throughput.py --arch resnet18 --batch-size 128 --device cpu
--steps 10 --threads 2``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's packages

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from models import ARCHS, STEMS, build_student, build_teacher  # noqa: E402
from study import SETUPS, needs_teacher  # noqa: E402
from trainables.batches import stratified_subset, train_batches  # noqa: E402
from trainables.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10  # noqa: E402
from trainables.student import student_loss  # noqa: E402
from trainables.train import autocast, compile_backend, maybe_compile, setup_torch  # noqa: E402

PIPELINE = "data pipeline"
BASELINE = "DataLoader baseline"
TEACHER = "teacher forward"
STEP = "student step"


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=ARCHS,
                        help="teacher and student arch, as the study uses them (default: resnet18)")
    parser.add_argument("--stem", default="cifar", choices=STEMS, help="(default: cifar)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default: cpu)")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps of the teacher forward and of each student step (default: 10)")
    parser.add_argument("--data-steps", type=int, default=50,
                        help="timed batches of the data pipeline and of the DataLoader baseline (default: 50)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement (default: 2)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: the cores this process may use)")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated student setups (default: {','.join(SETUPS)})")
    parser.add_argument("--data-root", default=None,
                        help="CIFAR-10 root (trainables.data.load_cifar10); default: random uint8 images")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="num_workers of the DataLoader baseline (default: 0, the main process)")
    parser.add_argument("--memory-format", default="auto", choices=("auto", "channels_last", "contiguous"),
                        help="models and batches; auto = channels_last on cuda only, as training does")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the models (default: on cuda, off on cpu)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default: inductor)")
    parser.add_argument("--temperature", type=float, default=4.0, help="(default: 4.0)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step size (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked options; argparse exits with code 2 on bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.setups = tuple(s for s in args.setups.split(",") if s)
    bad = [s for s in args.setups if s not in SETUPS]
    if bad:
        parser.error(f"--setups {','.join(bad)} unknown; allowed: {','.join(SETUPS)}")
    for name in ("batch_size", "steps", "data_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.loader_workers < 0:
        parser.error("--warmup and --loader-workers must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch here")
    return args


# ------------------------------------------------------------------------------------ helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones (device-synced)."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t0


def _forever(make_epoch: Callable[[int], Iterator]) -> Iterator:
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def load_images(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """uint8 (N, 3, 32, 32) images and int64 labels, N = batch * (warmup + data_steps) or fewer
    real images (the pipelines then run several epochs); and a description of the source."""
    n = args.batch_size * (args.warmup + args.data_steps)
    if args.data_root:
        data = load_cifar10(args.data_root)
        images, labels = data.train_images, data.train_labels
        if n < len(labels):
            images, labels = stratified_subset(images, labels, max(n, 10), seed=args.seed)
        if len(labels) < args.batch_size:
            raise SystemExit(f"error: --data-root has {len(labels)} training images, fewer than "
                             f"--batch-size {args.batch_size}")
        return images.contiguous(), labels, f"CIFAR-10 from {args.data_root} ({len(labels)} images)"
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels, f"random uint8 ({n} images)"


class PILCifar(torch.utils.data.Dataset):
    """The same uint8 images as a torchvision-style dataset: HWC numpy array, one
    ``PIL.Image.fromarray`` per sample, then the transform (``torchvision.datasets.CIFAR10``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3) uint8
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def baseline_loader(images: torch.Tensor, labels: torch.Tensor, args, device: torch.device):
    """The naive baseline: a torchvision ``DataLoader`` over PIL images (uint8 (N,3,32,32) turned
    into PIL per sample) with RandomCrop(32, 4) + flip + ToTensor + Normalize, batch ``args.batch_size``."""
    from torchvision import transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    return torch.utils.data.DataLoader(
        PILCifar(images, labels, transform), batch_size=args.batch_size, shuffle=True,
        num_workers=args.loader_workers, drop_last=True, pin_memory=device.type == "cuda",
        persistent_workers=args.loader_workers > 0,
        generator=torch.Generator().manual_seed(args.seed))


def student_step_fn(setup: str, args, device: torch.device, teacher: torch.nn.Module | None,
                    fmt: torch.memory_format) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimisation step of a fresh student, as ``trainables.train._fit`` runs it with
    ``train_student``'s loss (``trainables.student.student_loss``, compiled per ``--compile``);
    returns the running float64 sums of loss * batch per term, on the device (never read)."""
    student = build_student(args.arch, num_classes=10, stem=args.stem).to(device)
    student = student.to(memory_format=fmt).train()
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    loss_fn = student_loss(setup, student, teacher, args.temperature, args.backend)
    totals = None

    def step(x, y):
        nonlocal totals
        with autocast(device):
            loss, terms = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values = torch.stack([loss.detach().double()] + [v.double() for v in terms.values()]) * len(y)
        totals = values if totals is None else totals + values  # as _fit: summed on the device
        return totals

    return step


# ------------------------------------------------------------------------------------ main


def measure(args) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Run every measurement; returns (table, ratios, one-line description of the run)."""
    device = torch.device(args.device)
    setup_torch({"seed": args.seed, "threads": args.threads}, device)
    args.backend = compile_backend({"compile": args.compile, "compile_backend": args.compile_backend},
                                   device)
    use_cl = args.memory_format == "channels_last" or (args.memory_format == "auto"
                                                       and device.type == "cuda")
    fmt = torch.channels_last if use_cl else torch.contiguous_format
    images, labels, source = load_images(args)
    bs = args.batch_size
    rows = []

    def add(stage, setup, batches, seconds):
        rows.append({"stage": stage, "setup": setup, "images_per_s": batches * bs / seconds,
                     "ms_per_batch": 1000 * seconds / batches, "batches": batches,
                     "seconds": seconds})

    # Data pipeline: the uint8 tensors live on the device, as in _fit.
    dev_images, dev_labels = images.to(device), labels.to(device)
    batches = _forever(lambda e: train_batches(dev_images, dev_labels, bs, seed=args.seed,
                                               epoch=e, device=device, drop_last=True))
    add(PIPELINE, "", args.data_steps, _timed(lambda: next(batches), args.warmup,
                                                  args.data_steps, device))

    # The naive baseline over the same images.
    loader = baseline_loader(images, labels, args, device)
    loader_batches = _forever(lambda e: iter(loader))

    def loader_step():
        x, y = next(loader_batches)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    add(BASELINE, f"workers={args.loader_workers}", args.data_steps,
        _timed(loader_step, args.warmup, args.data_steps, device))
    del loader_batches, loader

    # A fixed, already-made batch for the models (the pipeline is measured above).
    x, y = next(batches)
    x = x.contiguous(memory_format=fmt)
    teacher = build_teacher(args.arch, num_classes=10, stem=args.stem, weights=None)
    teacher = teacher.to(device).to(memory_format=fmt).eval().requires_grad_(False)
    teacher_forward = maybe_compile(teacher, args.backend)

    def teacher_step():
        with torch.no_grad(), autocast(device):
            return teacher_forward(x)

    add(TEACHER, "", args.steps, _timed(teacher_step, args.warmup, args.steps, device))
    for setup in args.setups:
        step = student_step_fn(setup, args, device, teacher if needs_teacher(setup) else None, fmt)
        add(STEP, setup, args.steps, _timed(lambda: step(x, y), args.warmup, args.steps, device))
        del step

    table = pd.DataFrame(rows)
    return table, pd.DataFrame(_ratios(table, args.setups)), _run_info(args, device, use_cl, source)


def _ratios(table: pd.DataFrame, setups: list[str]) -> list[dict]:
    """Rows ``ratio``/``value`` of the images/s in ``table``: the data pipeline over each student
    step and over the DataLoader baseline, and the baseline over the fastest student step."""
    rate = dict(zip(table["stage"] + " " + table["setup"], table["images_per_s"]))
    pipeline = table.loc[table["stage"] == PIPELINE, "images_per_s"].iloc[0]
    baseline = table.loc[table["stage"] == BASELINE, "images_per_s"].iloc[0]
    ratios = [{"ratio": f"data pipeline / student step {s}", "value": pipeline / rate[f"{STEP} {s}"]}
              for s in setups]
    ratios.append({"ratio": "data pipeline / DataLoader baseline", "value": pipeline / baseline})
    ratios.append({"ratio": "DataLoader baseline / fastest student step",
                   "value": baseline / max(rate[f"{STEP} {s}"] for s in setups)})
    return ratios


def _run_info(args, device: torch.device, use_cl: bool, source: str) -> str:
    """One line describing the run: arch, batch, device, threads, memory format, autocast,
    compile backend, where the images came from, torch version."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{len(os.sched_getaffinity(0))} cores"
    return (f"arch {args.arch} (stem {args.stem}), batch {args.batch_size}, device {args.device} ({name}), "
            f"threads {torch.get_num_threads()}, memory format "
            f"{'channels_last' if use_cl else 'contiguous'}, autocast "
            f"{'bf16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'off (fp32)'}, "
            f"compile {args.backend or 'off'}, "
            f"images: {source}, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    """Measure every stage, print the images/s table and the ratios; returns the exit code."""
    args = parse_args(argv)
    table, ratios, info = measure(args)
    print(info)
    print(table.to_markdown(index=False, floatfmt=".2f"))
    print()
    print(ratios.to_markdown(index=False, floatfmt=".1f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
