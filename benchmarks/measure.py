"""How the benchmark measures: CUDA-graph replay, eager back-to-back, host time per call, and the
float64 check on sampled rows.

* **graph**: ``calls`` calls (rotating over the argument sets) captured into one CUDA graph; the
  graph is replayed between two events and the time divided by ``calls``. Host hidden, as serving runs.
* **eager**: the same calls issued back to back from Python between two events, divided by the
  calls: what an eager caller waits for, ``max(host, device)`` per call.
* **device**: ``codegen.tune.timing.time_cuda`` (one event pair per call, the GPU kept busy while Python
  enqueues): the kernel's own time.
* **host**: ``calls`` calls enqueued while ``torch.cuda._sleep`` keeps the GPU busy; wall time / calls.
* **graph, cold L2**: as graph, with an L2 flush (``L2Flush``) before each call, less the flushes' own time: the
  same calls back to back may find their weights still in L2 (a decode step's layer at T = 1 reads ~53 MB, about
  the L2), a model's layers do not.

Everything that touches the GPU is a function here, called only on a CUDA machine; the helpers at
the top (``rel_error``, ``error_text``, ``Watchdog``) also run on the CPU.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from codegen.tune import timing as _timing

Args = Sequence[tuple]


def error_text(error: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64 (inf on a non-finite difference)."""
    diff = (got.double() - want.double()).square().sum().item()
    ref = want.double().square().sum().item()
    if not math.isfinite(diff):
        return float("inf")
    return math.sqrt(diff / ref) if ref > 0 else (0.0 if diff == 0 else float("inf"))


def reference_rows(x: torch.Tensor, weights: torch.Tensor, samples: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, float64 ``x[row] @ weights[expert]^T``) for sampled (row, expert) pairs.

    ``weights`` is the exact bf16 dequantization ``[E, N, K]``, so the float64 product is the
    reference of the MXFP4 GEMM itself (not of the bf16 path).
    """
    by_expert: dict[int, list[int]] = defaultdict(list)
    for row, expert in samples:
        by_expert[expert].append(row)
    rows: list[int] = []
    parts = []
    for expert, expert_rows in by_expert.items():
        index = torch.tensor(expert_rows, device=x.device)
        parts.append(x[index].double() @ weights[expert].double().t())
        rows.extend(expert_rows)
    index = torch.tensor(rows, dtype=torch.long, device=x.device)
    if not parts:
        return index, torch.zeros((0, weights.shape[1]), dtype=torch.float64, device=x.device)
    return index, torch.cat(parts)


def healthy() -> bool:
    """Whether the CUDA context still runs work (a failed kernel can poison it)."""
    try:
        torch.cuda.synchronize()
        return float(torch.ones(2, device="cuda").sum().item()) == 2.0
    except Exception:
        return False


class Watchdog:
    """If one measurement hangs (a kernel that never finishes), call ``save`` and exit the process."""

    def __init__(self, seconds: float, save: Callable[..., Any]):
        self.seconds, self.save, self.timer = seconds, save, None

    def __enter__(self) -> "Watchdog":
        if self.seconds > 0:
            self.timer = threading.Timer(self.seconds, self._fire)
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.timer:
            self.timer.cancel()

    def _fire(self) -> None:
        print(f"\nbench: a measurement took over {self.seconds:.0f} s (kernel hang?); saving partial results "
              "and exiting", file=sys.stderr, flush=True)
        try:
            self.save(partial=True)
        finally:
            os._exit(3)  # the hung kernel holds the GIL-free CUDA stream: a normal exit would wait on it


# ---------------------------------------------------------------------------------------------
# GPU timing


def _call(fn: Callable[..., Any], arg_sets: Args, i: int) -> Any:
    return fn(*arg_sets[i % len(arg_sets)])


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _warm(fn: Callable[..., Any], arg_sets: Args, calls: int = 3) -> None:
    # Off the default stream, as torch's graph docs ask before a capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            _call(fn, arg_sets, i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def _replay_us(graph: torch.cuda.CUDAGraph, events: tuple[torch.cuda.Event, torch.cuda.Event]) -> float:
    """µs of one replay of ``graph``, between the two events."""
    start, end = events
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def captured_graph(fn: Callable[..., Any], arg_sets: Args, calls: int) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn`` (warmed first) captured in one CUDA graph, replayed once (which uploads it)."""
    _warm(fn, arg_sets)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            _call(fn, arg_sets, i)
    graph.replay()
    torch.cuda.synchronize()
    return graph


class L2Flush:
    """Reads a buffer of twice the L2 (a read, so that no dirty line is left to be written back during the call
    after it): what the call finds in L2 afterwards is nobody's weights, as in a model whose layers each read their
    own."""

    def __init__(self) -> None:
        l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
        self.buffer = torch.ones(2 * l2 // 4, dtype=torch.float32, device="cuda")
        self.total = torch.empty((), dtype=torch.float32, device="cuda")

    def __call__(self) -> None:
        torch.sum(self.buffer, dim=0, out=self.total)


def cold_graph_time(fn: Callable[..., Any], arg_sets: Args, flush: L2Flush, *, calls: int | None = None,
                    replays: int = 20) -> float:
    """Per-call µs of ``fn`` with the L2 flushed before each call: one CUDA graph of ``calls`` (flush, call) pairs and
    one of the flushes alone, replayed in turn; the difference of their medians, per call (so the gap between a
    flush and the call stays in, as a kernel before the layer leaves one)."""
    calls = calls or min(32, max(4, len(arg_sets)))

    def flushed(*args: Any) -> Any:
        flush()
        return fn(*args)

    graphs = [captured_graph(flushed, arg_sets, calls), captured_graph(lambda *args: flush(), arg_sets, calls)]
    events = _events()
    samples: list[list[float]] = [[], []]
    for _ in range(replays):
        for graph, times in zip(graphs, samples):
            times.append(_replay_us(graph, events) / calls)
    del graphs
    return _timing.summarize(samples[0]).median_us - _timing.summarize(samples[1]).median_us


def graph_time(fn: Callable[..., Any], arg_sets: Args, *, calls: int | None = None, budget_ms: float = 200.0,
               max_replays: int = 50) -> _timing.TimingResult:
    """Per-call µs of ``calls`` calls captured in one CUDA graph and replayed (median over replays)."""
    calls = calls or min(32, max(4, len(arg_sets)))
    graph = captured_graph(fn, arg_sets, calls)
    events = _events()
    replays = int(min(max_replays, max(3, budget_ms / max(_replay_us(graph, events) / 1e3, 1e-3))))
    samples = [_replay_us(graph, events) / calls for _ in range(replays)]
    del graph
    return _timing.summarize(samples)


def eager_time(fn: Callable[..., Any], arg_sets: Args, *, budget_ms: float = 100.0, trials: int = 5) -> _timing.TimingResult:
    """Per-call µs of calls issued back to back from Python (host and device both count)."""
    _warm(fn, arg_sets)
    start, end = _events()
    start.record()
    for i in range(3):
        _call(fn, arg_sets, i)
    end.record()
    end.synchronize()
    per_call_ms = max(start.elapsed_time(end) / 3, 1e-3)
    calls = int(min(200, max(5, budget_ms / trials / per_call_ms)))
    samples = []
    for _ in range(trials):
        torch.cuda.synchronize()
        start.record()
        for i in range(calls):
            _call(fn, arg_sets, i)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return _timing.summarize(samples)


def device_time(fn: Callable[..., Any], arg_sets: Args, **kwargs: Any) -> _timing.TimingResult:
    """The kernel's own time: ``codegen.tune.timing.time_cuda`` over the rotating argument sets."""
    return _timing.time_cuda(fn, rotate=list(arg_sets), **kwargs)


def host_time(fn: Callable[..., Any], arg_sets: Args, *, calls: int = 300) -> dict[str, Any]:
    """Host µs per call: ``calls`` calls enqueued while the GPU spins; wall time / calls.

    ``gpu_idle`` is True when the spin ended before the last call was enqueued (the number then
    includes waits it should not; rerun with fewer calls).
    """
    _warm(fn, arg_sets)
    _timing._gpu_sleep(50.0)
    begin = time.perf_counter()
    for i in range(5):
        _call(fn, arg_sets, i)
    estimate_ms = (time.perf_counter() - begin) * 1e3 / 5
    torch.cuda.synchronize()
    _timing._gpu_sleep(min(10_000.0, 1.5 * calls * estimate_ms + 20.0))
    spun = torch.cuda.Event()
    spun.record()
    begin = time.perf_counter()
    for i in range(calls):
        _call(fn, arg_sets, i)
    wall = time.perf_counter() - begin
    gpu_idle = spun.query()  # the spin had already ended: some calls were enqueued on an idle GPU
    torch.cuda.synchronize()
    return {"host_us": wall * 1e6 / calls, "calls": calls, "gpu_idle": bool(gpu_idle)}


def time_all(fn: Callable[..., Any], arg_sets: Args, *, graph: bool = True, device: bool = True,
             quick: bool = False) -> dict[str, Any]:
    """graph / eager / device µs of one path (a failed capture is recorded, the rest still runs)."""
    result: dict[str, Any] = {}
    budget = 60.0 if quick else 200.0
    if graph:
        try:
            result["graph_us"] = graph_time(fn, arg_sets, budget_ms=budget).median_us
        except Exception as error:  # a path that cannot be captured still has eager numbers
            result["graph_error"] = error_text(error)
            torch.cuda.synchronize()
    result["eager_us"] = eager_time(fn, arg_sets, budget_ms=budget / 2).median_us
    if device:
        rep = 20 if quick else 50
        result["device_us"] = device_time(fn, arg_sets, warmup_ms=10.0, rep=rep, max_ms=budget).median_us
    return result
