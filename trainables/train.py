"""The teacher's Ray Tune trainable (``train_teacher``) and the epoch loop it shares with the
students' (``_fit``; ``trainables.student``): device, threads, compile, autocast, evaluation,
per-epoch checkpoints.

Both trainables follow Ray Tune's function-trainable convention: a function of ``config`` that
calls ``tune.report(metrics, checkpoint=tune.Checkpoint)`` once per epoch and resumes from
``tune.get_checkpoint()`` when Tune restarts it. Large inputs (the CIFAR-10 tensors, the frozen
teacher's weights) arrive through ``tune.with_parameters`` and so sit once in Ray's object store,
not pickled into every trial's config.

``config`` keys read here (all set by ``driver.tuning.trial_config``):
``arch``, ``stem``, ``num_classes``, ``batch_size`` (128..512), ``lr`` (Adam), ``seed``,
``threads`` (torch intra-op threads = the trial's CPU share), ``compile`` (``torch.compile``:
True/False, None = on a GPU only), optionally ``compile_backend`` (default ``"inductor"``).

The hot loop never waits for the device: batches are made on it from device-resident uint8
tensors, the loss terms are summed on it and read back once per epoch. With ``compile`` the
models run through ``torch.compile``, while checkpoints hold the plain model's state dict (no
``_orig_mod.`` prefixes). This module imports no loss of the students (``trainables.losses``), so
an edit there does not rerun the teacher stage (its ``code``: ``stages.teacher``).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F
from ray import tune

from models import build_teacher, load_checkpoint, save_checkpoint
from trainables.batches import eval_batches, train_batches
from trainables.data import CIFAR10Tensors

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


def pick_device() -> torch.device:
    """The device this trial trains on: ``cuda`` when a GPU is visible (inside a Ray worker:
    when Ray gave the trial a GPU share), else ``cpu``.

    Asks Ray only when a GPU is visible and this process is a Ray worker: ``ray.get_gpu_ids()``
    in a process without Ray would start a whole local Ray instance just to answer.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            return torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    except Exception:  # Ray missing or no worker context: go by what torch sees
        pass
    return torch.device("cuda")


def setup_torch(config: dict, device: torch.device) -> None:
    """Seed torch and match its thread count to the trial's CPU share.

    ``config["threads"]`` (int >= 1) bounds the intra-op thread pool so that concurrent trials
    do not oversubscribe the cores. On a GPU, also turns on cuDNN autotuning (fixed input
    shapes: 32x32, one batch size) and TF32 for the float32 matmuls/convolutions left outside
    bf16 autocast.
    """
    torch.manual_seed(int(config["seed"]))
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def use_compile(config: dict, device: torch.device) -> bool:
    """Whether this trial runs its models through ``torch.compile``: ``config["compile"]`` when
    it is True or False; when it is None or absent, on a GPU only (on a CPU, torch 2.1's
    inductor needs a C++ compiler and its first step takes minutes for a ResNet)."""
    value = config.get("compile")
    return device.type == "cuda" if value is None else bool(value)


def compile_backend(config: dict, device: torch.device) -> str | None:
    """The ``torch.compile`` backend of this trial (``config["compile_backend"]``, default
    ``"inductor"``), or None when it does not compile (``use_compile``)."""
    return (config.get("compile_backend") or "inductor") if use_compile(config, device) else None


def maybe_compile(module: torch.nn.Module, backend: str | None) -> torch.nn.Module:
    """``torch.compile(module, backend=backend)``, or ``module`` itself for ``backend=None``.

    The compiled wrapper shares ``module``'s parameters and buffers (an optimizer over
    ``module.parameters()`` trains it); its own ``state_dict`` keys carry an ``_orig_mod.``
    prefix, so checkpoints are written from ``module``. Compilation happens at the first call
    (once per process and input shape)."""
    return module if backend is None else torch.compile(module, backend=backend)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    """bf16 autocast on a GPU that supports bf16 (compute capability >= 8.0: A100, H100, ...);
    a no-op context on the CPU and on older GPUs (fp32 + TF32 there: fp16 would need a
    GradScaler)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int, device: torch.device, amp: bool = True) -> float:
    """Top-1 accuracy (fraction 0..1) of ``model`` on uint8 images (N,3,32,32) and labels (N,).

    The uint8 test set is moved to ``device`` once; the count of correct predictions stays on
    the device until the end (one sync per call, not one per batch). ``amp``: run under
    ``autocast(device)``; pass False for a model with fake-quant (QAT) modules, which need
    float32 inputs.
    """
    model.eval()
    images, labels = images.to(device), labels.to(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in eval_batches(images, labels, batch_size, device=device):
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device) if amp else contextlib.nullcontext():
            correct += (model(x).argmax(dim=1) == y).sum()
    return correct.item() / len(labels)


CHECKPOINT_SCRATCH = "distill-sparsify-checkpoints"  # under tempfile.gettempdir()


def _scratch_dir() -> str:
    """A new folder ``<tmp>/distill-sparsify-checkpoints/<pid>-<random>`` for one epoch checkpoint.

    First removes the folders there whose process is gone: Ray ends a trial's process without
    waiting for its training thread (``FunctionTrainable.cleanup``), and a SIGKILL leaves the
    folder too, 115 MB or more for a ResNet-101 student each time. A live process's folders stay.
    """
    parent = os.path.join(tempfile.gettempdir(), CHECKPOINT_SCRATCH)
    os.makedirs(parent, exist_ok=True)
    for entry in os.scandir(parent):
        pid = entry.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _epoch_checkpoint(model, optimizer, config: dict, role: str, epoch: int,
                      history: list[float]):
    """A ``tune.Checkpoint`` of this epoch in a scratch folder (``_scratch_dir``), removed on exit.

    ``tune.report`` copies the checkpoint into the run's storage before it blocks (Ray's
    documented pattern: report from a temporary directory). The folder also goes when the report
    ends the trial (Ray raises ``SystemExit`` there). When Ray ends the process first, the next
    epoch checkpoint made on that machine removes it.
    """
    directory = _scratch_dir()
    try:
        save_checkpoint(model, os.path.join(directory, MODEL_FILE), arch=config["arch"],
                        stem=config["stem"], num_classes=config["num_classes"], role=role,
                        extra={"epoch": epoch, "setup": config.get("setup")})
        torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "history": history},
                   os.path.join(directory, STATE_FILE))
        yield tune.Checkpoint.from_directory(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _EpochClock:
    """The wall-clock times ``_fit`` reports for each epoch (``time.perf_counter``).

    Per epoch: ``start()`` before the first batch is made; ``first_step_done()`` after the first
    optimizer step; ``steps_done(steps)`` after the last one (syncs the device) returns the
    training seconds; ``elapsed()`` is the seconds since ``start()``. ``warmup_seconds``: in the
    first epoch this clock times, how much longer the first step took than the mean of the
    epoch's other steps (``first_step_done`` syncs the device once there to time that step
    alone; never below 0.0; 0.0 for a one-step epoch), 0.0 on every later epoch. ``now``: the
    clock (default ``time.perf_counter``).
    """

    def __init__(self, device: torch.device, now: Callable[[], float] | None = None):
        self._device, self._now = device, now or time.perf_counter
        self._first_step: float | None = None  # seconds of the first step this process runs
        self._warm, self._t0, self.warmup_seconds = False, 0.0, 0.0

    def start(self) -> None:
        self._t0 = self._now()
        self._warm, self.warmup_seconds = self._first_step is None, 0.0

    def first_step_done(self) -> None:
        if self._warm:
            _sync(self._device)  # once per process: the first step's own time
            self._first_step = self._now() - self._t0

    def steps_done(self, steps: int) -> float:
        _sync(self._device)
        seconds = self._now() - self._t0
        if self._warm and steps > 1:
            others = (seconds - self._first_step) / (steps - 1)
            self.warmup_seconds = max(0.0, self._first_step - others)
        return seconds

    def elapsed(self) -> float:
        return self._now() - self._t0


def _train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]],
                 batches, device: torch.device,
                 first_step_done: Callable[[], None]) -> tuple[list[str], torch.Tensor | None, int, int]:
    """One optimizer step per batch of ``batches``; calls ``first_step_done()`` after the first.

    Returns (names, totals, images, steps): the metric names (``train_loss``, then
    ``loss_<term>`` per loss term), the float64 sums of loss * batch size per name on
    ``device`` (one tensor, None without a batch), the images seen, the steps taken. Nothing is
    read back from the device.
    """
    names, totals, seen, steps = [], None, 0, 0
    for x, y in batches:
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            loss, terms = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(y)
        seen, steps = seen + n, steps + 1
        # Sum loss * n per term on the device (float64, as the python floats were summed).
        values = torch.stack([loss.detach().double()] + [v.double() for v in terms.values()]) * n
        totals = values if totals is None else totals + values
        if steps == 1:
            names = ["train_loss"] + [f"loss_{name}" for name in terms]
            first_step_done()
    return names, totals, seen, steps


def _fit(config: dict, data: CIFAR10Tensors, model: torch.nn.Module, role: str,
         loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]],
         device: torch.device) -> None:
    """The shared epoch loop: Adam, no scheduler; report + checkpoint after every epoch.

    Runs until Tune's stopper ends the trial (``max_epochs`` in config is a safety bound).
    ``loss_fn(x, y) -> (loss, terms)`` as ``distillation_loss`` returns them (terms: 0-d
    tensors). Train and test tensors go to ``device`` once; the loss terms are summed there in
    float64 and read once per epoch. With ``compile`` on, the last short batch of an epoch is
    dropped (one input shape, one compiled graph). Besides the losses, ``test_acc`` (0..1),
    ``epoch_seconds`` and ``train_images_per_sec``, each epoch reports ``warmup_seconds``: in
    the first epoch this process runs, the time the first step took beyond the mean of the
    epoch's other steps (compilation, cuDNN autotuning, allocator growth; measured with one
    device sync after that step), 0.0 on later epochs; and ``val_acc`` (0..1) too when
    ``data`` holds a validation split (``--val-size``).
    """
    batch_size = int(config["batch_size"])
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    start_epoch, history = 0, []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # resume: Tune restarted this trial
        with checkpoint.as_directory() as directory:
            restored, _ = load_checkpoint(os.path.join(directory, MODEL_FILE))
            model.load_state_dict(restored.state_dict())
            state = torch.load(os.path.join(directory, STATE_FILE), map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]

    train_images = data.train_images.to(device)
    train_labels = data.train_labels.to(device)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)
    drop_last = use_compile(config, device) and len(train_labels) > batch_size
    started, clock = time.time(), _EpochClock(device)
    for epoch in range(start_epoch, int(config["max_epochs"])):
        model.train()
        clock.start()
        batches = train_batches(train_images, train_labels, batch_size, seed=int(config["seed"]),
                                epoch=epoch, device=device, drop_last=drop_last)
        names, totals, seen, steps = _train_epoch(model, optimizer, loss_fn, batches, device,
                                                  clock.first_step_done)
        train_seconds = clock.steps_done(steps)
        test_acc = evaluate(model, test_images, test_labels, batch_size, device)
        history.append(test_acc)
        metrics = {name: total / seen for name, total in zip(names, totals.tolist())}
        if data.val_images is not None:  # --val-size: what the stopper and "best" choices read
            metrics["val_acc"] = evaluate(model, data.val_images, data.val_labels, batch_size, device)
        metrics.update(
            epoch=epoch + 1,
            test_acc=test_acc,
            epoch_seconds=clock.elapsed(),
            train_images_per_sec=seen / train_seconds,
            warmup_seconds=clock.warmup_seconds,
            trial_started_at=started,
        )
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite metrics at epoch {epoch + 1}: {metrics}")
        with _epoch_checkpoint(model, optimizer, config, role, epoch + 1, history) as checkpoint:
            tune.report(metrics, checkpoint=checkpoint)


def _on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``, channels_last on a GPU (before anything is compiled)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def train_teacher(config: dict, data: CIFAR10Tensors) -> None:
    """Tune trainable: fine-tune ``build_teacher(arch, stem=..., weights=teacher_weights)``.

    All weights are trained with cross-entropy, through ``torch.compile`` when ``use_compile``.
    Reports per epoch: ``test_acc`` (0..1), ``val_acc`` (0..1, with ``--val-size``),
    ``train_loss``, ``loss_ce``, ``epoch_seconds`` (s), ``train_images_per_sec`` (images/s),
    ``warmup_seconds`` (s; see ``_fit``).
    """
    device = pick_device()
    setup_torch(config, device)
    model = _on_device(build_teacher(config["arch"], num_classes=config["num_classes"],
                                     stem=config["stem"], weights=config.get("teacher_weights")),
                       device)
    forward = maybe_compile(model, compile_backend(config, device))

    def loss_fn(x, y):
        loss = F.cross_entropy(forward(x), y)
        return loss, {"ce": loss.detach()}

    _fit(config, data, model, "teacher", loss_fn, device)
