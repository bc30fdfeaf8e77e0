"""Build and load the CPU bitmask kernel (``bitmask_cpu.cpp``) on first use.

The C++ file is compiled once per (source, torch version, Python) with torch's own extension
builder (``torch.utils.cpp_extension.load``, ninja + the system C++ compiler) into
``$CAPLLM_KERNEL_CACHE`` (default ``$CAPLLM_CACHE/kernels``) ``/<key>/`` and registered as the torch operators
``torch.ops.capllm_bitmask.{spmv, unpack, best_isa}``. It needs no special ``-march``: every
vector path carries its own ``target`` attribute and the ISA is chosen at run time from
``cpuid``, so one build serves any x86-64 CPU (AVX-512, AVX2 or scalar).

Nothing here may break an install or an import: without a compiler, ninja or headers — or on a
non-x86 CPU — :func:`load` returns ``None`` and :func:`unavailable_reason` says why, and every
caller falls back to torch's own dense path (:mod:`capllm.kernels.reference`).
``CAPLLM_NO_KERNELS=1`` disables the build (for measurements and to test the fallback).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("bitmask_cpu.cpp")
ISA_NAMES = {1: "scalar", 2: "avx2", 3: "avx512"}
CFLAGS = ["-O3", "-fno-math-errno"]
# at::parallel_for is a header template: with torch's OpenMP backend it is an `omp parallel` region
# compiled into the extension, and without -fopenmp it silently runs on one thread. Linking with
# -fopenmp resolves to the libgomp.so.1 torch has already loaded (same soname), so one thread pool.
OPENMP_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {"tried": False, "ops": None, "reason": None, "serial": None}


def _build_dir() -> Path:
    """``$CAPLLM_KERNEL_CACHE`` (default ``$CAPLLM_CACHE/kernels``) / one folder per source and toolchain."""
    from capllm.utils import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + sys.version.encode() + " ".join(CFLAGS + OPENMP_FLAGS).encode()).hexdigest()[:16]
    root = Path(os.environ["CAPLLM_KERNEL_CACHE"]) if os.environ.get("CAPLLM_KERNEL_CACHE") else cache_dir() / "kernels"
    return root / f"bitmask_cpu-{key}"


def build_library(name: str, source: Path, build: Path, openmp: bool = True) -> str | None:
    """Compile ``source`` into ``build`` and load it (its operators register on load). Multi-threaded
    with OpenMP where torch uses OpenMP (``openmp=False``: one thread, for A/B measurements); if a
    toolchain cannot build with ``-fopenmp``, one thread, and the return value says why (else ``None``)."""
    from torch.utils import cpp_extension

    omp = OPENMP_FLAGS if openmp and torch.backends.openmp.is_available() else []
    try:
        cpp_extension.load(name=name, sources=[str(source)], build_directory=str(build), extra_cflags=CFLAGS + omp, extra_ldflags=omp,
                           is_python_module=False, verbose=False)
        return None
    except Exception as exc:
        if not omp:
            raise
        cpp_extension.load(name=name, sources=[str(source)], build_directory=str(build), extra_cflags=CFLAGS, is_python_module=False, verbose=False)
        return f"built without OpenMP, so on one thread ({_first_line(exc)})"


def _first_line(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first[:160]}"


def _try_build():
    if os.environ.get("CAPLLM_NO_KERNELS"):
        return None, "disabled by CAPLLM_NO_KERNELS"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the CPU kernel is written for x86-64, this machine is {platform.machine()}"
    try:
        build = _build_dir()
        build.mkdir(parents=True, exist_ok=True)
        name = "capllm_bitmask_cpu"
        lib = build / f"{name}.so"
        serial = build / "serial.txt"  # why a fallback build of this folder runs on one thread
        if lib.is_file() and not (build / "lock").exists():  # built before (and no build under way): load without the compiler
            torch.ops.load_library(str(lib))
        else:
            serial.unlink(missing_ok=True)
            if (why := build_library(name, SOURCE, build)) is not None:
                serial.write_text(why)
        _state["serial"] = serial.read_text() if serial.is_file() else None
        return torch.ops.capllm_bitmask, None
    except Exception as exc:  # compiler, ninja or headers missing, or the build failed
        return None, f"could not build the CPU kernel ({_first_line(exc)})"


def load():
    """``torch.ops.capllm_bitmask`` (built and loaded once per process), or ``None``."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["ops"], _state["reason"] = _try_build()
                _state["tried"] = True
    return _state["ops"]


def serial_reason() -> str | None:
    """Why the loaded kernel build runs on one thread (``None``: it uses torch's threads); kept beside the build, so a cached build says it too."""
    load()
    return _state["serial"]


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when the kernel is there)."""
    load()
    return _state["reason"]


def best_isa() -> str | None:
    """``avx512``, ``avx2`` or ``scalar``: the path the kernel takes on this CPU (``None``: no kernel)."""
    ops = load()
    return None if ops is None else ISA_NAMES[int(ops.best_isa())]
