"""The numeric path and thread count for this machine: one place decides them for every model.

bfloat16 can cut the cost of the convolutions only where the hardware computes it natively: CUDA GPUs
with bf16 (Ampere and later) and CPUs with AVX512-BF16 or AMX (Intel Cooper Lake / Sapphire Rapids
and later, AMD Zen 4 and later). Elsewhere PyTorch *emulates* bf16 and a brain takes a hundred times
longer (measured on an AVX2 AMD EPYC: 441 s for two sampling steps and the decoding, against 3.4 s in
float32). Native is not enough either: on an Intel Xeon with AVX512-BF16 but no AMX, bf16 autocast was
*slower* than float32 (one brain, DDIM 20: 4.54 s against 2.96 s; a UNet training step 2.52 s against
2.07 s; ``benchmarks/bench_generate.py``, ``benchmarks/bench_training_precision.py``, 2026-11-30): the casts cost more
than the bf16 dot products save on these small 3D convolutions. So ``auto`` picks bf16 only where it is
expected to be faster (:func:`bf16_faster`: CUDA GPUs with bf16, CPUs with AMX tiles), and float32
otherwise.

The choice can be forced: the ``precision`` argument of the API, ``--precision`` in the command line,
or the ``SYNTHBRAIN_PRECISION`` environment variable (``auto``, ``fp32`` or ``bf16``). The same goes
for threads (``SYNTHBRAIN_THREADS``).

Memory: :func:`keep_freed_memory` keeps the memory of freed activations in the process for the next one
(glibc's default hands every block over 32 MB back to the system, and refaulting it costs more than
the arithmetic of many layers); ``SYNTHBRAIN_KEEP_MEMORY=0`` leaves the C library's default.

Example:
    >>> import torch
    >>> resolve_precision("fp32", torch.device("cpu"))
    'fp32'
"""

from __future__ import annotations

import os
import statistics
import time

import torch

__all__ = [
    "PRECISIONS",
    "AdaptiveThreads",
    "cpu_description",
    "idle_cpus",
    "bf16_faster",
    "keep_freed_memory",
    "native_bf16",
    "pick_threads",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 in hardware (not emulated).

    On CPU this needs AVX512-BF16 (or AMX) *and* PyTorch dispatching to its AVX-512 kernels: with
    ``ATEN_CPU_CAPABILITY=avx2`` in the environment the kernels are AVX2 and bf16 is emulated, so
    this returns ``False`` (which is how an AVX2-only CPU is reproduced on a newer one).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False  # MPS and others: float32
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or _amx())


def _amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def bf16_faster(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 autocast is expected to run faster than float32 on ``device``: a CUDA GPU with bf16,
    or a CPU whose kernels use AMX tiles. AVX512-BF16 alone is native but was measured slower than
    float32 on this project's models (see the module docstring); force ``bf16`` to use it anyway."""
    device = torch.device(device)
    if device.type == "cuda":
        return native_bf16(device)
    return device.type == "cpu" and native_bf16(device) and _amx()


def resolve_precision(precision: str | None, device: torch.device | str, *, model_allows: bool = True) -> str:
    """The numeric path to use: ``"fp32"`` or ``"bf16"``.

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``None`` (then ``$SYNTHBRAIN_PRECISION``, else ``auto``).
        device: Where the model runs.
        model_allows: Whether the model was checked to work in bf16 (its config); ``auto`` stays on
            fp32 when it was not. ``auto`` is bf16 only where :func:`bf16_faster`.

    Raises:
        ValueError: ``precision`` (or the environment variable) is not one of ``auto``, ``fp32``, ``bf16``.
    """
    source = "`precision`"
    if precision is None:
        precision, source = os.environ.get("SYNTHBRAIN_PRECISION", "auto"), "SYNTHBRAIN_PRECISION"
    value = str(precision).strip().lower()
    if value not in PRECISIONS:
        raise ValueError(f"{source} must be auto, fp32 or bf16, got {precision!r}")
    if value == "auto":
        return "bf16" if model_allows and bf16_faster(device) else "fp32"
    return value


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_KEPT_TRIM_BYTES = 1 << 30
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Keep freed memory in this process for the next tensor of its size; returns whether it is kept.

    glibc's ``malloc`` serves every block over 32 MB with its own ``mmap`` and unmaps it when freed,
    so the next activation of that size is faulted in page by page and zeroed by the kernel. A 2 mm
    decoder makes a dozen such activations a brain (32 channels at 80 x 96 x 80 is 78 MB), and the faults
    cost more than the arithmetic: on a 2-core AMD EPYC (Zen 3, AVX2) a SiLU over one of them took 51 ms
    against 12 ms in place, and a fast-preset brain 2.65 s against 2.13 s with this setting
    (``benchmarks/bench_generate.py``; training steps: ``benchmarks/bench_training_precision.py``). This
    serves large blocks from the heap (``M_MMAP_MAX`` 0) and keeps up to 1 GiB of freed memory there
    (``M_TRIM_THRESHOLD``), so it is reused without faults. The numbers computed are the same, bit for
    bit; the process holds its peak memory a little longer.

    Process-wide and idempotent; done by the generators, the segmenter and the training entry points.
    Nothing happens outside Linux with glibc, or with ``SYNTHBRAIN_KEEP_MEMORY=0`` in the environment.
    """
    global _kept
    if _kept is not None:
        return _kept
    _kept = False
    if os.environ.get("SYNTHBRAIN_KEEP_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return _kept
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _kept
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return _kept
    _kept = bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_TRIM_BYTES)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
    return _kept


def _cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return idle, sum(fields)


def idle_cpus(window: float = 0.05) -> float | None:
    """How many of this process's CPUs were idle over the last ``window`` seconds (Linux), else ``None``."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(window)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    n_all = os.cpu_count() or 1
    return n_all * (idle1 - idle0) / (total1 - total0)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask on Linux; all of them elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def pick_threads(threads: int | str | None = None) -> int:
    """The number of CPU threads to compute with.

    ``None`` -> ``$SYNTHBRAIN_THREADS`` if set, else the CPUs this process may use that are idle now
    (at least one). Busy cores are left out on purpose: a thread that must share a core with another
    process stalls the others at every synchronisation, and a brain that takes 8 s on two idle cores
    took 27 s on two threads against 13 s on one when another process held a core (measured).

    Raises:
        ValueError: ``threads`` (or ``$SYNTHBRAIN_THREADS``) is not a positive integer.
    """
    source = "`threads`"
    if threads is None and os.environ.get("SYNTHBRAIN_THREADS"):
        threads, source = os.environ["SYNTHBRAIN_THREADS"], "SYNTHBRAIN_THREADS"
    available = usable_cpus()
    if threads is None:
        idle = idle_cpus()
        if idle is None:
            return available
        return max(1, min(available, int(idle + 0.35)))
    try:
        n = int(str(threads).strip()) if not isinstance(threads, bool) else 0
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{source} must be a positive integer, got {threads!r}")
    return n


class AdaptiveThreads:
    """Keeps torch's CPU thread count at the cores other processes leave idle, re-checked as work goes on.

    :func:`pick_threads` looks once, over 50 ms, before the work starts. A short burst from another
    process at that moment (a browser drawing the page that just asked for a brain) then halves the
    threads for the whole brain, and a process that starts later is never seen. Here each
    :meth:`check` (call it between steps; it does nothing until ``interval`` seconds have passed)
    measures what *other* processes used since the last look: all CPU time the kernel counted minus
    this process's own, so this process's threads do not count as load. Threads go up when the others
    leave cores idle and down when they take them.

    Counts the caller fixed (``threads`` or ``$SYNTHBRAIN_THREADS``) are never changed. Linux only;
    elsewhere the first choice stays.

    Example:
        >>> with AdaptiveThreads() as threads:
        ...     for step in range(3):
        ...         threads.check()
    """

    def __init__(self, threads: int | str | None = None, *, interval: float = 0.2):
        self.fixed = threads is not None or bool(os.environ.get("SYNTHBRAIN_THREADS"))
        self.threads = pick_threads(threads)
        self.interval = float(interval)
        self.used = [self.threads]
        self.changes: list[list] = []  # [when, count]: when = what the caller passed to check()
        self.available = usable_cpus()
        self._tick = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._last = None

    def _snapshot(self):
        try:
            idle, total = _cpu_times()
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), total - idle, time.process_time()

    def others_busy(self) -> float | None:
        """CPUs' worth of work other processes did since the last look (``None`` before ``interval`` passed)."""
        now = self._snapshot()
        if now is None or self._last is None:
            self._last = now
            return None
        wall = now[0] - self._last[0]
        if wall < self.interval:
            return None
        busy = (now[1] - self._last[1]) / self._tick  # CPU-seconds every process used, this one included
        own = now[2] - self._last[2]
        self._last = now
        return max(0.0, (busy - own) / wall)

    def check(self, when=None) -> int:
        """Re-pick the thread count from the last interval's load; returns the count in force.

        ``when`` (a step number, say) is recorded with any change in :attr:`changes`."""
        if self.fixed:
            return self.threads
        others = self.others_busy()
        if others is None:
            return self.threads
        n = max(1, min(self.available, int(self.available - others + 0.35)))
        if n != self.threads:
            torch.set_num_threads(n)
            self.threads = n
            self.used.append(n)
            self.changes.append([when, n])
        return n

    def __enter__(self) -> "AdaptiveThreads":
        self._before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self._last = self._snapshot()
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._before)


def cpu_description() -> dict[str, object]:
    """The CPU as benchmarks and provenance name it: model, cores, capability, native bf16, AMX, and the
    numeric path ``auto`` takes on it."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    return {
        "cpu": model,
        "cores": usable_cpus(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16("cpu"),
        "amx": _amx(),
        "auto_precision": resolve_precision("auto", "cpu"),
        "torch": torch.__version__,
    }


def machine_line(threads: int | None = None, **extra: object) -> str:
    """The line every benchmark prints first, so that its figures say where they were measured: the CPU,
    its cores, PyTorch and the kernels it uses, whether bf16 is native, ``extra`` (``name=value``, shown
    as "name value"), the threads, the load average and the date."""
    cpu = cpu_description()
    parts = [f"machine: {cpu['cpu']}, {cpu['cores']} cores", f"PyTorch {cpu['torch']} kernels {cpu['capability']}",
             f"native bf16 {'yes' if cpu['native_bf16'] else 'no'}"]
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in extra.items()]
    parts.append(f"{torch.get_num_threads() if threads is None else threads} threads")
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.2f}")
    parts.append(f"date {time.strftime('%Y-%m-%d')}")
    return "; ".join(parts)


def median_seconds(f, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``f()`` after one warm-up call (benchmarks' timer)."""
    f()
    times = []
    for _ in range(max(1, int(repeats))):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
