"""Small shared helpers: timing, peak memory, atomic directory writes, device choice."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from capllm.errors import CapllmError


def tune_malloc(mmap_threshold: int = 128 * 1024, trim_threshold: int = 1 << 20) -> bool:
    """Have glibc give large freed buffers back to the OS at once (the CLI calls this).

    glibc raises its mmap threshold as large blocks are freed, after which big tensors come from
    the heap and their memory stays mapped after ``free``: peak RSS then counts garbage. A fixed
    threshold (``mallopt(M_MMAP_THRESHOLD)``, which disables the dynamic one) keeps RSS close to
    what is alive — measured 8 % lower on a SmolLM2 evaluation. No-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def trim_heap() -> None:
    """``malloc_trim(0)``: return the heap's free memory to the OS (no-op off glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_host_pages(tensors, clean_only: bool = False) -> int:
    """Give the memory of CPU tensors over a mapped checkpoint back to the OS; returns bytes.

    A checkpoint loaded from safetensors is a private memory map of the file: pages that were
    read stay resident (and count in RSS) as long as the mapping lives, even when no tensor
    needs them any more. ``madvise(MADV_DONTNEED)`` drops the whole pages inside each tensor's
    bytes; a later read of a dropped page faults it in from the file again.

    * ``clean_only=False``: the tensors are no longer used (replaced by a compressed module, or
      copied to the device) — every page goes.
    * ``clean_only=True``: the tensors are still in use; a tensor's pages are dropped only if
      none of them was ever written (all resident pages are still the file's, by
      ``/proc/self/pagemap``), so reading it again gives the same bytes. This is what keeps a
      pass over the *dense* model at one block in memory.

    Only file-backed ``.safetensors`` mappings are touched; no-op off Linux.
    """
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        MADV_DONTNEED = 4
        page = mmap.PAGESIZE
    except (OSError, AttributeError):
        return 0
    maps = _checkpoint_maps()
    freed = 0
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.layout != torch.strided or t.numel() == 0:
            continue
        start = t.data_ptr()
        if not any(lo <= start < hi for lo, hi in maps):  # only pages of a mapped checkpoint file
            continue
        end = start + t.numel() * t.element_size()
        a, b = -(-start // page) * page, (end // page) * page
        if b <= a or (clean_only and not _unwritten(a, b, page)):
            continue
        if libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), MADV_DONTNEED) == 0:
            freed += b - a
    return freed


def _unwritten(a: int, b: int, page: int) -> bool:
    """Whether every resident page in ``[a, b)`` is still a page of the mapped file (none was
    copied on write). ``/proc/self/pagemap``: bit 63 present, bit 61 file page."""
    import numpy as np

    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((a // page) * 8)
            entries = np.frombuffer(f.read(((b - a) // page) * 8), dtype=np.uint64)
    except OSError:
        return False
    present = (entries >> np.uint64(63)) & np.uint64(1)
    file_page = (entries >> np.uint64(61)) & np.uint64(1)
    return not bool(np.any((present == 1) & (file_page == 0)))


def _checkpoint_maps() -> list[tuple[int, int]]:
    """Address ranges of this process's private mappings of ``.safetensors`` files."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith(".safetensors") and parts[1].startswith("r") and parts[1].endswith("p"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi))
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: ``VmHWM`` of ``/proc/self/status``.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that high-water mark over ``execve`` from
    the forked copy of the parent, so a run started by a large process (a test session) would
    report the parent's size. ``ru_maxrss`` (KiB) is the fallback off Linux.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_cuda_mb(device: torch.device | str | None) -> float | None:
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(dev) / 2**20


def resolve_device(name: str | None) -> torch.device:
    """``auto`` → cuda when available else cpu; anything else must be usable here."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise CapllmError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CapllmError(f"device {name!r} requested but no CUDA GPU is visible: use --device cpu")
    return dev


class StageTimer:
    """Wall time per named stage (``total`` is added by :meth:`as_dict`) and the process's peak
    RSS (and peak GPU memory) as each stage ended — :meth:`peaks`.

    ``previous`` carries the times of an earlier, interrupted attempt of the same run (resume):
    they are added, so a stage's figure is its whole cost. :meth:`snapshot` includes the stages
    still running, so an attempt killed inside a stage can be recorded up to that moment
    (:class:`TimerHeartbeat`).
    """

    def __init__(self, previous: dict[str, float] | None = None) -> None:
        self.times: dict[str, float] = {k: v for k, v in (previous or {}).items() if k != "total"}
        self._before = float((previous or {}).get("total", 0.0))
        self.peak_rss: dict[str, float] = {}
        self.peak_gpu: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._open: dict[int, tuple[str, float]] = {}  # stages running now: id → (name, start)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        token = object()
        self._open[id(token)] = (name, t)
        try:
            yield
        finally:
            del self._open[id(token)]
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t
            self.peak_rss[name] = round(peak_rss_mb(), 1)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.peak_gpu[name] = round(torch.cuda.max_memory_allocated() / 2**20, 1)

    def peaks(self) -> dict[str, dict[str, float]]:
        """``{"rss_mb": {stage: peak RSS of the process when the stage ended}, "gpu_mb": {...}}``."""
        return {"rss_mb": dict(self.peak_rss), **({"gpu_mb": dict(self.peak_gpu)} if self.peak_gpu else {})}

    def as_dict(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in dict(self.times).items()}
        out["total"] = round(self._before + time.perf_counter() - self._t0, 3)
        return out

    def snapshot(self) -> dict[str, float]:
        """:meth:`as_dict` with the running stages counted up to now."""
        now = time.perf_counter()
        out = dict(self.times)
        for name, t in list(self._open.values()):
            out[name] = out.get(name, 0.0) + now - t
        out = {k: round(v, 3) for k, v in out.items()}
        out["total"] = round(self._before + now - self._t0, 3)
        return out


class TimerHeartbeat:
    """Writes ``timer.snapshot()`` to ``path`` every ``interval`` seconds (atomically, in a daemon
    thread) until stopped: a run killed anywhere — ``kill -9`` included — leaves its time spent so
    far, to at most ``interval`` seconds, for the resumed attempt to add up."""

    def __init__(self, timer: StageTimer, path: str | os.PathLike, interval: float | None = None) -> None:
        import threading

        if interval is None:
            interval = float(os.environ.get("CAPLLM_TIMER_HEARTBEAT_S", "30"))
        self.timer, self.path, self.interval = timer, Path(path), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capllm-timer-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        if not self.path.parent.is_dir():  # the work directory is gone (the run finished): never recreate it
            return
        try:
            write_json_atomic(self.path, self.timer.snapshot())
        except OSError:  # a full disk must not kill the run for a timing record
            pass

    def __enter__(self) -> "TimerHeartbeat":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


def resumed_times(state_times: dict[str, float] | None, heartbeat: str | os.PathLike) -> dict[str, float] | None:
    """The times an interrupted attempt left: its heartbeat, or (a work directory of an earlier
    version, which recorded times in its state) whichever of the two is later."""
    p = Path(heartbeat)
    try:
        beat = json.loads(p.read_text()) if p.exists() else None
    except (OSError, ValueError):
        beat = None
    if beat is None or not isinstance(beat, dict):
        return state_times
    if state_times is None or float(beat.get("total", 0)) > float(state_times.get("total", 0)):
        return beat
    return state_times


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it to ``target`` on success.

    On any error the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise CapllmError(f"output directory {target} already exists: choose another --out or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the result is an ordinary directory
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to ``path`` via a temp file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def cache_dir() -> Path:
    """Root of capllm's caches: ``$CAPLLM_CACHE`` or ``~/.cache/capllm``."""
    root = os.environ.get("CAPLLM_CACHE") or os.path.join(Path.home(), ".cache", "capllm")
    return Path(root)


def json_cache_get(path: Path, key: str | None):
    """The value stored under ``key`` in the JSON dict at ``path``, or ``None`` (no key, no file, unreadable file)."""
    if not key or not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get(key)
    except (json.JSONDecodeError, AttributeError):
        return None


def json_cache_put(path: Path, key: str | None, value) -> None:
    """Store ``value`` under ``key`` in the JSON dict at ``path`` (atomically; an unreadable file is replaced)."""
    if not key:
        return
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        cache = {}
    cache[key] = value
    write_json_atomic(path, cache)
