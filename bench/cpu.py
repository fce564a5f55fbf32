"""What the CPU offers a benchmark: its instruction set, INT8 dot-product (VNNI) and AMX flags and
physical cores (``cpu_isa``), from DeepSparse where this Python has it, else from ``/proc/cpuinfo``.
``bench.benchmark`` re-exports these names and records them in every row of ``benchmark.csv``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS before DeepSparse is imported)
from study import requirements

__all__ = ["cpu_isa", "amx_flags"]


def _cpu_isa_from_proc(cpuinfo: Optional[str] = None) -> Dict[str, Any]:
    """:func:`cpu_isa` without DeepSparse, from ``/proc/cpuinfo`` (or the text ``cpuinfo``): isa
    "avx512" (avx512f), "avx2" or "unknown"; vnni: avx512_vnni or avx_vnni; amx: the AMX flags
    (:func:`amx_flags`); physical cores: distinct (physical id, core id) pairs among the CPUs this
    process may run on."""
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    allowed = os.sched_getaffinity(0) if cpuinfo is None and hasattr(os, "sched_getaffinity") else None
    flags, cores, model, cpu = set(), set(), "", {}
    for block in text.strip().split("\n\n"):
        cpu = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        cpu = {k.strip(): v.strip() for k, v in cpu.items()}
        if allowed is not None and int(cpu.get("processor", -1)) not in allowed:
            continue
        flags = set(cpu.get("flags", "").split())
        model = cpu.get("model name", model)
        cores.add((cpu.get("physical id", "0"), cpu.get("core id", cpu.get("processor", "0"))))
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "unknown"
    return {"isa": isa, "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "amx": amx_flags(flags),
            "num_cores": max(1, len(cores)), "vendor_model": model}


def amx_flags(flags: Optional[set] = None) -> str:
    """The Intel AMX tile flags of this CPU (``amx_int8``, ``amx_bf16``, ``amx_fp16``, ...), sorted
    and space-separated, from ``flags`` or the first CPU of ``/proc/cpuinfo``; "" when none (AMD, or
    Intel before Sapphire Rapids). OpenVINO's INT8 and bf16 kernels use them where present."""
    if flags is None:
        text = Path("/proc/cpuinfo").read_text()
        line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "flags :")
        flags = set(line.split(":", 1)[1].split())
    return " ".join(sorted(f for f in flags if f.startswith("amx")))


def cpu_isa() -> Dict[str, Any]:
    """What DeepSparse detects about this CPU (``deepsparse.cpu.cpu_architecture()``); without
    DeepSparse in this Python, the same keys read from ``/proc/cpuinfo``.

    Returns:
        ``{"isa": "avx2" | "avx512" | ..., "vnni": bool (int8 dot-product
        instructions; without them DeepSparse emulates INT8), "amx": :func:`amx_flags`,
        "num_cores": physical cores available to this process, "vendor_model": str}``.
    """
    if not requirements.has_deepsparse():
        return _cpu_isa_from_proc()
    from deepsparse.cpu import cpu_architecture

    arch = cpu_architecture()
    return {
        "isa": str(arch.isa),
        "vnni": bool(arch.vnni),
        "amx": amx_flags(),
        "num_cores": int(arch.num_available_physical_cores),
        "vendor_model": str(getattr(arch, "vendor_model", "")),
    }
