"""Where the MoE layer's time goes at small T (issue 21): the kernels of ``mxfp4.moe`` calls replayed as one CUDA
graph, as `bench moe` times them, read from the CUDA profiler's trace (CUPTI, through torch.profiler): each kernel's
time on the GPU and the idle gap before it, against the call's span.

    python -m codegen bench timeline [--model gpt-oss-120b] [--tokens 1,2,8] [--routing uniform]

The layer at T = 1 took 2.5-3x the time of its experts' bytes (benchmarks/NOTES.md); this splits that time into the
kernels' own time and the gaps between them (launch latency inside the graph, the ramp of the next kernel), for the
bf16 and the FP8 layer, twice: with the calls back to back as `bench moe` times them ("warm L2": at T = 1 the same
few experts' weights may still be in L2 from the call before) and with an L2 flush before each call ("cold L2", as
in a model whose layers each read their own weights; the flush is left out of the timeline). Same weights, routing
and seeds as `bench moe`; each call's output is the op's, unchecked here (`bench moe` checks it against float64).
Under each timeline: the bytes of the experts the call reads against two floors measured in the run (those bytes
at `torch.sum`'s 2 GiB rate, and `torch.sum` over the same bytes, which pays a launch, ramp and drain of its own),
for the call (issue 21's "within 2x the bytes floor") and for each of its two GEMMs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codegen.build.render import ENTRY_POINT
from codegen.tune.timing import measure_hbm_read_bandwidth, measure_read_time

from .measure import L2Flush, captured_graph
from .problems import MODEL_SHAPES, routings
from .report import align, write_json

CALLS = 16  # layer calls captured in the graph (as many as bench moe's graph time replays back to back)
NAME_WIDTH = 48


@dataclass(frozen=True)
class Kernel:
    name: str
    start_us: float
    duration_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.duration_us


def kernels_from_trace(trace: dict[str, Any]) -> list[Kernel]:
    """The GPU kernels of a Chrome trace (``torch.profiler``'s export), in start order."""
    events = trace.get("traceEvents", [])
    kernels = [Kernel(str(e["name"]), float(e["ts"]), float(e["dur"]))
               for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    return sorted(kernels, key=lambda kernel: kernel.start_us)


def split_calls(kernels: Sequence[Kernel], calls: int) -> list[list[Kernel]]:
    """The kernels of each of ``calls`` identical calls; ValueError if they do not split so."""
    if calls < 1 or not kernels or len(kernels) % calls:
        raise ValueError(f"{len(kernels)} kernels in the trace do not split into {calls} calls of the same launches")
    size = len(kernels) // calls
    chunks = [list(kernels[i * size:(i + 1) * size]) for i in range(calls)]
    names = [kernel.name for kernel in chunks[0]]
    for i, chunk in enumerate(chunks[1:], start=1):
        if [kernel.name for kernel in chunk] != names:
            raise ValueError(f"call {i} launched other kernels than call 0: the trace holds something else too")
    return chunks


@dataclass(frozen=True)
class Step:
    """One launch position of the call, medians over the calls: its kernel's GPU time, and the idle GPU time
    between the previous kernel's end and its start (for the first launch: the previous call's last kernel)."""

    name: str
    kernel_us: float
    gap_before_us: float


@dataclass(frozen=True)
class CallTimeline:
    steps: list[Step]
    call_us: float  # median of first start to the next call's first start (the last call: to its own end)
    kernels_us: float  # median sum of the call's kernel times
    span: str = "first start to the next call's"  # what call_us spans

    @property
    def gaps_us(self) -> float:
        return self.call_us - self.kernels_us


def summarize(chunks: Sequence[Sequence[Kernel]], flush_kernels: int = 0) -> CallTimeline:
    """Per launch position, the median kernel time and gap before it; per call, its span and its kernels' sum.

    ``flush_kernels``: each chunk starts with that many kernels of an L2 flush, which are not the call's: the steps
    leave them out, and a call spans from the flush's end to its own last kernel's end."""
    flat = [kernel for chunk in chunks for kernel in chunk]
    size = len(chunks[0])
    gaps = [max(0.0, flat[i].start_us - flat[i - 1].end_us) for i in range(1, len(flat))]
    steps = []
    for position in range(flush_kernels, size):
        times = [chunk[position].duration_us for chunk in chunks]
        # The first call's first kernel has nothing before it in the graph: its gap is not counted.
        before = [gaps[c * size + position - 1] for c in range(len(chunks)) if c * size + position > 0]
        steps.append(Step(chunks[0][position].name, statistics.median(times),
                          statistics.median(before) if before else 0.0))
    own = statistics.median(sum(kernel.duration_us for kernel in chunk[flush_kernels:]) for chunk in chunks)
    if flush_kernels:
        spans = [chunk[-1].end_us - chunk[flush_kernels - 1].end_us for chunk in chunks]
        return CallTimeline(steps, statistics.median(spans), own, "the flush's end to its last kernel's end")
    spans = [chunks[c + 1][0].start_us - chunks[c][0].start_us for c in range(len(chunks) - 1)]
    spans = spans or [chunks[0][-1].end_us - chunks[0][0].start_us]
    return CallTimeline(steps, statistics.median(spans), own)


def format_timeline(title: str, timeline: CallTimeline) -> str:
    lines = [(step.name[:NAME_WIDTH], f"{step.kernel_us:.1f}", f"{step.gap_before_us:.1f}") for step in timeline.steps]
    lines.append((f"call ({timeline.span})", f"{timeline.call_us:.1f}",
                  f"{timeline.gaps_us:.1f} in gaps"))
    lines.append(("kernels' own time", f"{timeline.kernels_us:.1f}", ""))
    return f"== {title}\n" + align(("kernel", "us on the GPU", "gap before us"), lines, {0})


@dataclass(frozen=True)
class Floors:
    """What a call's weights cost at the least, measured in the same run: the bytes of the experts it reads, their
    time at ``torch.sum``'s rate over 2 GiB (the bandwidth floor) and ``torch.sum`` over the same bytes (a reader of
    that size, its own launch, ramp and drain included)."""

    experts: int
    gate_up_bytes: int
    down_bytes: int
    rate: float  # bytes/s
    gate_up_sum_us: float
    down_sum_us: float
    call_sum_us: float

    def floor_us(self, nbytes: int) -> float:
        return nbytes / self.rate * 1e6


def floor_lines(timeline: CallTimeline, floors: Floors) -> list[str]:
    """The call and its two GEMMs (the launches named ENTRY_POINT, gate_up first) against their bytes' floors."""
    total = floors.gate_up_bytes + floors.down_bytes
    lines = [(f"  bytes: {floors.experts} experts, gate_up {floors.gate_up_bytes / 1e6:.1f} MB + down "
              f"{floors.down_bytes / 1e6:.1f} MB; floor at torch.sum's {floors.rate / 1e12:.2f} TB/s "
              f"{floors.floor_us(total):.1f} us, torch.sum over the same bytes {floors.call_sum_us:.1f} us"),
             (f"  call: {timeline.call_us / floors.floor_us(total):.2f}x the floor, "
              f"{timeline.call_us / floors.call_sum_us:.2f}x torch.sum over its bytes")]
    gemms = [step for step in timeline.steps if step.name == ENTRY_POINT]
    if len(gemms) == 2:
        for label, step, nbytes, summed in (("gate_up", gemms[0], floors.gate_up_bytes, floors.gate_up_sum_us),
                                            ("down", gemms[1], floors.down_bytes, floors.down_sum_us)):
            lines.append(f"  {label}: {step.kernel_us:.1f} us = {step.kernel_us / floors.floor_us(nbytes):.2f}x its "
                         f"floor ({floors.floor_us(nbytes):.1f} us), {step.kernel_us / summed:.2f}x torch.sum over "
                         f"its bytes ({summed:.1f} us)")
    return lines


def measure_floors(w: Any, ids: torch.Tensor, rate: float) -> Floors:
    """The experts ``ids`` reach and their weights' floors (the FP8-ready layout has the same bytes, plus row scales
    under 1 %)."""
    experts = int(torch.unique(ids).numel())
    gate_up, down = experts * w.gate_up_paired.data[0].numel(), experts * w.down.data[0].numel()
    return Floors(experts, gate_up, down, rate, measure_read_time(gate_up).median_us,
                  measure_read_time(down).median_us, measure_read_time(gate_up + down).median_us)


def traced_kernels(run: Callable[[], Any]) -> list[Kernel]:
    """The GPU kernels that ``run()`` launches, from the CUDA profiler's trace."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        return kernels_from_trace(json.loads(path.read_text()))


def profile_calls(fn: Callable[..., Any], args: tuple, calls: int = CALLS, flush: L2Flush | None = None) -> CallTimeline:
    """``calls`` calls of ``fn(*args)`` captured in one CUDA graph (as `bench moe`'s graph time captures them),
    replayed under the profiler; their timeline. With ``flush``, each call comes after an L2 flush (cold weights,
    as in a model whose layers each read their own), which the timeline leaves out."""
    flush_kernels = 0
    if flush is not None:
        flush_kernels = len(traced_kernels(flush))
        call = fn

        def fn(*call_args: Any) -> Any:
            flush()
            return call(*call_args)

    graph = captured_graph(fn, [args], calls)
    kernels = traced_kernels(graph.replay)
    del graph
    return summarize(split_calls(kernels, calls), flush_kernels)


def run(args: argparse.Namespace, token_values: list[int]) -> int:
    from .bench_moe import HIDDEN, build_weights, layer_model, routing
    from .moe_layers import FP8_LAYER, ours_fused, ours_fused_fp8

    try:
        model = layer_model(args.model)
    except ValueError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    w = build_weights(args.seed, MODEL_SHAPES[model]["gate_up"].num_experts)
    layers = {"ours fused (mxfp4.moe)": ours_fused(w), FP8_LAYER: ours_fused_fp8(w)}
    # "warm": calls back to back, as bench moe times them (the same experts' weights may still be in L2);
    # "cold": an L2 flush before each call, as in a model.
    l2_states = {"warm L2": None, "cold L2": L2Flush()}
    rate = measure_hbm_read_bandwidth().value
    print(f"device: {torch.cuda.get_device_name()}; layer: {model} (E = {w.num_experts}, top-4); {CALLS} calls "
          "replayed as one CUDA graph, kernels from the CUDA profiler's trace (medians over the calls); torch.sum "
          f"reads {rate / 1e12:.2f} TB/s (2 GiB, this run)")
    results = []
    for kind in routings(args.routing, default="uniform"):
        for tokens in token_values:
            ids, weights = routing(kind, tokens, w.num_experts, args.seed + tokens)
            x = torch.randn((tokens, HIDDEN), device="cuda", dtype=torch.bfloat16) * HIDDEN**-0.5
            floors = measure_floors(w, ids, rate)
            for (name, layer), (l2, flush) in itertools.product(layers.items(), l2_states.items()):
                title = f"{kind} T={tokens}, {l2}: {name}"
                try:
                    timeline = profile_calls(layer, (x, ids, weights), flush=flush)
                except (RuntimeError, ValueError) as error:
                    print(f"== {title}: {error}")
                    continue
                print(format_timeline(title, timeline))
                print("\n".join(floor_lines(timeline, floors)))
                results.append({"routing": kind, "tokens": tokens, "layer": name, "l2": l2,
                                "call_us": timeline.call_us, "kernels_us": timeline.kernels_us,
                                "steps": [vars(step) for step in timeline.steps], "floors": vars(floors)})
    write_json(out_dir / "bench_timeline.json", {"model": model, "calls": CALLS, "results": results})
    return 0
