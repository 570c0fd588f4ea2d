"""GPU timing with device events, inputs rotated past the L2, and the two machine floors.

``time_cuda(fn, rotate=...)`` times ``fn(*args)`` with a pair of ``torch.cuda.Event`` around every
call and returns the median and the 10th / 90th percentiles in microseconds. Three things keep the
number honest:

* **Rotation.** Consecutive calls take their arguments from different input sets (``rotate``), and
  :func:`rotation_sets` says how many sets are needed so that together they exceed twice the L2
  (50 MB on H100): a set is evicted before it comes round again, so the kernel reads HBM, as it
  does in a model where the weights of a layer were last touched a whole forward pass ago.
* **Warm-up.** The first call (which may compile and load the kernel) and ``warmup_ms`` of calls
  run before any sample is kept.
* **Run-ahead.** Before each batch of timed calls the GPU is kept busy with a spin kernel
  (``torch.cuda._sleep``) long enough for Python to enqueue the whole batch, so the events bracket
  GPU work only, not the host's launch overhead (which would otherwise dominate a 20 µs kernel).
  A ``fn`` that synchronizes with the host (the portable path reads ``offsets`` on the host) still
  works: the sync's cost is then part of its time, which is what a caller pays.

The floors: :func:`measure_hbm_read_bandwidth` (bytes *read* per second by ``torch.sum`` over a
tensor far larger than the L2) and :func:`measure_bf16_peak` (``torch.matmul`` of 8192^3 bf16
matrices), and the arithmetic of a grouped GEMM's minimum bytes, FLOPs and floor time.

Nothing here imports CUDA state at import time; everything GPU-side is behind calls.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from mxfp4.format.tensor import BLOCK_SIZE

H100_L2_BYTES = 50 * 1024 * 1024
DEFAULT_MEMORY_BUDGET = 8 * 1024**3  # bytes the rotation sets may take at most (before free-memory checks)
MAX_ROTATION_SETS = 64

# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingResult:
    """Per-call device times in microseconds (``samples`` in call order)."""

    median_us: float
    p10_us: float
    p90_us: float
    samples: tuple[float, ...] = field(repr=False, default=())

    @property
    def min_us(self) -> float:
        return min(self.samples) if self.samples else self.median_us

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy the samples were."""
        return (self.p90_us - self.p10_us) / self.median_us if self.median_us > 0 else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"median_us": self.median_us, "p10_us": self.p10_us, "p90_us": self.p90_us, "reps": len(self.samples)}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return float(sorted_values[low] * (1 - weight) + sorted_values[high] * weight)


def summarize(samples_us: Sequence[float]) -> TimingResult:
    ordered = sorted(samples_us)
    return TimingResult(
        median_us=percentile(ordered, 50),
        p10_us=percentile(ordered, 10),
        p90_us=percentile(ordered, 90),
        samples=tuple(float(s) for s in samples_us),
    )


# ---------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------


def l2_cache_bytes(device: torch.device | int | None = None) -> int:
    """The L2 size torch reports for ``device`` (H100's 50 MB when it cannot be asked)."""
    try:
        if torch.cuda.is_available():
            size = int(getattr(torch.cuda.get_device_properties(device or torch.cuda.current_device()), "L2_cache_size", 0))
            if size > 0:
                return size
    except Exception:
        pass
    return H100_L2_BYTES


def rotation_sets(
    bytes_per_set: int,
    *,
    l2_bytes: int = H100_L2_BYTES,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_sets: int = MAX_ROTATION_SETS,
) -> int:
    """How many input sets to rotate among: enough that together they exceed 2x the L2.

    At least 1; at most what ``memory_budget`` holds and ``max_sets``. A set that alone exceeds
    2x the L2 needs no company (1). When the budget caps the count below what is needed, the
    caller gets the cap (a warm-ish L2 then flatters small problems; the count tells the story).
    """
    if bytes_per_set <= 0:
        return 1
    needed = max(1, math.ceil(2 * l2_bytes / bytes_per_set))
    affordable = max(1, memory_budget // bytes_per_set)
    # One more than the strict minimum: the set just used is never the next one's neighbour in L2.
    if needed > 1:
        needed += 1
    return int(max(1, min(needed, affordable, max_sets)))


def _args_getter(rotate: Any) -> Callable[[int], tuple]:
    def as_tuple(value: Any) -> tuple:
        return value if isinstance(value, tuple) else (value,)

    if rotate is None:
        return lambda i: ()
    if callable(rotate):
        return lambda i: as_tuple(rotate(i))
    sets = list(rotate)
    if not sets:
        raise ValueError("time_cuda: rotate is an empty list of argument sets")
    count = len(sets)
    return lambda i: as_tuple(sets[i % count])


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

_sleep_cycles_per_ms: dict[int, float] = {}
_MAX_RUN_AHEAD_MS = 200.0


def _cycles_per_ms(device_index: int) -> float:
    """Clock cycles ``torch.cuda._sleep`` spins per millisecond on this device (measured once)."""
    rate = _sleep_cycles_per_ms.get(device_index)
    if rate is None:
        cycles = 20_000_000
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)  # load the spin kernel
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        elapsed = max(start.elapsed_time(end), 1e-3)
        rate = cycles / elapsed
        _sleep_cycles_per_ms[device_index] = rate
    return rate


def _gpu_sleep(ms: float) -> None:
    if ms <= 0:
        return
    rate = _cycles_per_ms(torch.cuda.current_device())
    torch.cuda._sleep(int(rate * ms))


class _Calls:
    """``fn`` called with argument set 0, 1, 2, ... in turn (see ``rotate``)."""

    def __init__(self, fn: Callable[..., Any], rotate: Any):
        self.fn, self.args, self.count = fn, _args_getter(rotate), 0

    def next_args(self) -> tuple:
        args = self.args(self.count)
        self.count += 1
        return args

    def __call__(self) -> None:
        self.fn(*self.next_args())


def _estimate(calls: _Calls, count: int = 3) -> tuple[float, float]:
    """(device ms, host ms) per call, roughly, from ``count`` back-to-back calls."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    host_start = time.perf_counter()
    start.record()
    for _ in range(count):
        calls()
    end.record()
    host_ms = (time.perf_counter() - host_start) * 1e3 / count
    end.synchronize()
    return max(start.elapsed_time(end) / count, 1e-4), host_ms


def _timed(calls: _Calls, rep: int, host_ms: float, run_ahead: bool) -> list[float]:
    """``rep`` calls, each between its own pair of events; their device times in microseconds."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    # Batches whose enqueue takes at most _MAX_RUN_AHEAD_MS of host time.
    batch = max(1, min(rep, int(_MAX_RUN_AHEAD_MS / max(host_ms, 1e-3)))) if run_ahead else rep
    for index in range(0, rep, batch):
        stop = min(rep, index + batch)
        if run_ahead:
            # Host time to enqueue the batch, with margin; the spin covers it so the GPU never idles.
            _gpu_sleep(min(_MAX_RUN_AHEAD_MS * 1.5, (stop - index) * host_ms * 1.5 + 0.5))
        for j in range(index, stop):
            call_args = calls.next_args()
            starts[j].record()
            calls.fn(*call_args)
            ends[j].record()
    ends[-1].synchronize()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def time_cuda(
    fn: Callable[..., Any],
    *,
    rotate: Sequence[Any] | Callable[[int], Any] | None = None,
    warmup_ms: float = 25.0,
    rep: int = 100,
    min_rep: int = 5,
    max_ms: float | None = None,
    run_ahead: bool = True,
) -> TimingResult:
    """Median / p10 / p90 device time of ``fn(*args)`` in microseconds, one event pair per call.

    ``rotate``: the argument sets, a list of tuples (call i uses ``rotate[i % len]``) or a callable
    ``i -> tuple``; None calls ``fn()``. Size the list with :func:`rotation_sets`.
    ``warmup_ms``: calls run (untimed) for about this long after the first call.
    ``rep``: timed calls; ``max_ms`` caps the timed calls' total expected time (at least
    ``min_rep`` calls are made). ``run_ahead``: keep the GPU busy while Python enqueues each batch
    (see the module docstring). Runs on torch's current CUDA device and stream.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda needs a CUDA device")
    if rep < 1:
        raise ValueError(f"time_cuda: rep must be >= 1, got {rep}")
    calls = _Calls(fn, rotate)
    calls()  # the first call compiles / loads / allocates whatever it needs
    torch.cuda.synchronize()
    per_call_ms, host_ms = _estimate(calls)
    warmup_calls = int(min(10_000, max(1, math.ceil(warmup_ms / per_call_ms)))) if warmup_ms > 0 else 0
    for _ in range(warmup_calls):
        calls()
    if max_ms is not None:
        rep = max(min_rep, min(rep, int(max_ms / per_call_ms)))
    return summarize(_timed(calls, rep, host_ms, run_ahead))


# ---------------------------------------------------------------------------------------------
# Machine floors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineRate:
    """A measured rate: ``value`` in ``unit`` (bytes/s or FLOP/s), how it was measured, its timing."""

    value: float
    unit: str
    method: str
    timing: TimingResult

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "method": self.method, **self.timing.as_dict()}


def measure_hbm_read_bandwidth(nbytes: int = 2 * 1024**3, *, rep: int = 30) -> MachineRate:
    """HBM *read* bandwidth: bytes read per second by ``torch.sum`` over an fp32 tensor of ``nbytes``.

    The tensor is 40x the L2, so every call streams it from HBM; the write (one scalar) is nil.
    (A device-to-device copy moves 2x its size: read + write; this measures reads only, which is
    what the grouped GEMM's weight stream is.)
    """
    values = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    timing = time_cuda(lambda: values.sum(), warmup_ms=50.0, rep=rep)
    nbytes = values.numel() * 4
    del values
    torch.cuda.empty_cache()
    return MachineRate(
        nbytes / (timing.median_us * 1e-6),
        "B/s",
        f"torch.sum over {nbytes / 2**30:.1f} GiB fp32 (bytes read / median time)",
        timing,
    )


def measure_read_time(nbytes: int, *, rep: int = 50) -> TimingResult:
    """Device time of one ``torch.sum`` over ``nbytes`` of fp32, rotated past the L2 as a GEMM's inputs are.

    The read floor of a kernel of this size: :func:`measure_hbm_read_bandwidth` streams 2 GiB, so its
    launch, ramp and drain are amortized; a 50-400 MB kernel pays them in full. Timing ``torch.sum``
    over the kernel's own byte count says how much of a kernel's distance to the bandwidth floor any
    streaming kernel of that size pays.
    """
    if nbytes < 4:
        raise ValueError(f"measure_read_time: nbytes must be at least 4, got {nbytes}")
    sets = rotation_sets(nbytes, l2_bytes=l2_cache_bytes())
    tensors = [torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_() for _ in range(sets)]
    try:
        return time_cuda(lambda values: values.sum(), rotate=[(t,) for t in tensors], warmup_ms=25.0, rep=rep)
    finally:
        del tensors
        torch.cuda.empty_cache()


def _square_matmul_rate(size: int, timing: TimingResult, method: str) -> MachineRate:
    """The FLOP rate of one ``size``^3 matmul per call: ``2 size^3`` FLOPs over the median time."""
    return MachineRate(2.0 * size**3 / (timing.median_us * 1e-6), "FLOP/s", f"{method} (2 n^3 / median time)", timing)


def measure_bf16_peak(size: int = 8192, *, rep: int = 30) -> MachineRate:
    """Dense bf16 tensor-core rate: ``2 size^3`` FLOPs per ``torch.matmul`` of random bf16 matrices."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(size, size, dtype=torch.bfloat16, device="cuda")
    timing = time_cuda(lambda: torch.matmul(a, b, out=out), warmup_ms=100.0, rep=rep)
    del a, b, out
    torch.cuda.empty_cache()
    return _square_matmul_rate(size, timing, f"torch.matmul bf16 {size}x{size}x{size}, random data")


def measure_fp8_peak(size: int = 8192, *, rep: int = 30) -> MachineRate:
    """Dense FP8 (e4m3) tensor-core rate: ``2 size^3`` FLOPs per ``torch._scaled_mm`` of random e4m3 matrices
    (unit scales, bf16 out, fast accumulation: the rate the tensor cores reach)."""
    a = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device="cuda")
    timing = time_cuda(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                use_fast_accum=True), warmup_ms=100.0, rep=rep)
    del a, b
    torch.cuda.empty_cache()
    return _square_matmul_rate(size, timing, f"torch._scaled_mm e4m3 {size}x{size}x{size}, random data, fast accumulation")


# ---------------------------------------------------------------------------------------------
# Grouped GEMM arithmetic
# ---------------------------------------------------------------------------------------------

def grouped_mm_bytes(active_experts: int, n: int, k: int, tokens: int) -> int:
    """Bytes a grouped GEMM must move at least: each used expert's weights once, x once, out once.

    weights: 4-bit codes ``E N K / 2`` + one E8M0 scale byte per 32 values ``E N K / 32``;
    x: ``T K`` bf16; out: ``T N`` bf16 (``T`` = rows of x = token-expert assignments). Experts
    that get no rows need not be read. The offsets (``4 (E + 1)``) are negligible and left out.
    """
    weights = active_experts * n * k // 2 + active_experts * n * k // BLOCK_SIZE
    return weights + tokens * k * 2 + tokens * n * 2


def grouped_mm_flops(tokens: int, n: int, k: int) -> int:
    """Multiply-adds x 2 of ``out[T, N] = x[T, K] @ W^T`` over all experts."""
    return 2 * tokens * n * k


def floor_us(nbytes: float, flops: float, read_bytes_per_s: float, flops_per_s: float) -> float:
    """The roofline floor: ``max(bytes / read bandwidth, FLOPs / bf16 peak)`` in microseconds."""
    return max(nbytes / read_bytes_per_s, flops / flops_per_s) * 1e6
