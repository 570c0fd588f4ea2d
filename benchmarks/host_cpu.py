"""``hopper-mxfp4 bench host-cpu``: the host work of one ``mxfp4.moe`` call on the CPU, on the SM90 path and on the
portable path.

The layer runs at the gpt-oss-20b shapes (E = 32, H = I = 2880, top-4) on CPU tensors with the device
stubbed (benchmarks.fake_sm90: every kernel launch, graph launch and node update recorded, not made;
benchmarks.fake_portable: every Triton launch, graph capture and replay recorded, not made), so what is
timed is the Python and torch work of a call. Per path, T and mode (graph replay on / off): µs per call
(best of five runs), and per call the torch ops (top level), the allocations among them, the kernel
launches, graph launches and graph node updates. No GPU needed; the numbers are this CPU's; on the
device host each kernel launch adds the driver's cost (~12 µs on the H200 host) and each allocation the
caching allocator's. The portable path's torch ops compute on this CPU (on a GPU they only enqueue), so its
eager µs at larger T include that arithmetic.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any, Callable

import torch

from .fake_sm90 import Recorder, fake_sm90
from .report import align

HIDDEN = INTERMEDIATE = 2880
EXPERTS = 32
TOP_K = 4
ALLOCATING_OPS = ("aten::empty", "aten::new_empty", "aten::empty_like", "aten::empty_strided", "aten::zeros")


def layer(tokens: int, seed: int = 0, paired: bool = True) -> Callable[[], torch.Tensor]:
    """One gpt-oss-20b layer call at ``tokens``, ready to repeat (weights never read: uninitialized);
    ``paired``: gate_up from mxfp4.pack_gate_up (else mxfp4.pack, checkpoint row order)."""
    import mxfp4

    kind = mxfp4.PackedGateUp if paired else mxfp4.PackedMXFP4
    gate_up = kind(torch.empty(EXPERTS, 2 * INTERMEDIATE // 64, HIDDEN // 64, 2176, dtype=torch.uint8),
                   2 * INTERMEDIATE, HIDDEN)
    down = mxfp4.PackedMXFP4(torch.empty(EXPERTS, HIDDEN // 64, INTERMEDIATE // 64, 2176, dtype=torch.uint8),
                             HIDDEN, INTERMEDIATE)
    generator = torch.Generator().manual_seed(seed)
    biases = (torch.randn(EXPERTS, 2 * INTERMEDIATE, generator=generator).bfloat16(),
              torch.randn(EXPERTS, HIDDEN, generator=generator).bfloat16())
    x = torch.randn(tokens, HIDDEN, generator=generator).bfloat16()
    ids = torch.rand(tokens, EXPERTS, generator=generator).argsort(dim=1)[:, :TOP_K].contiguous()  # as topk gives
    weights = torch.rand(tokens, TOP_K, generator=generator).softmax(dim=1)
    return lambda: mxfp4.moe(x, ids, weights, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1])


def torch_ops_per_call(call: Callable[[], Any]) -> Counter:
    """The top-level aten ops one ``call()`` makes (torch's profiler, CPU events only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return Counter(e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def _time_and_count(call: Callable[[], Any], recorder: Any, replay: bool, calls: int) -> tuple[float, Counter, Counter]:
    """Five warm-up calls (a graph is built on the second), the best of five timings of ``calls`` calls (µs per call),
    and what one more call does: its torch ops and the recorder's counts (launches, graph launches, node updates)."""
    from mxfp4.experts import graphs as moe_graphs

    moe_graphs.set_moe_graphs(replay)
    try:
        for _ in range(5):
            call()
        best = min(_timed(call, calls) for _ in range(5))
        before = Counter(recorder.counts)
        ops = torch_ops_per_call(call)
        return best, ops, recorder.counts - before
    finally:
        moe_graphs.set_moe_graphs(None)


def measure(tokens: int, replay: bool, calls: int) -> dict[str, Any]:
    """µs per call and what one call does, after warm-up calls (a graph is built on the second)."""
    call = layer(tokens)
    recorder = Recorder(count_only=True)
    with fake_sm90(recorder):
        best, ops, done = _time_and_count(call, recorder, replay, calls)
    return {"tokens": tokens, "replay": replay, "host_us": best, "torch_ops": sum(ops.values()),
            "allocations": sum(ops[name] for name in ALLOCATING_OPS), "ops": dict(ops),
            "kernel_launches": done["kernel launches"], "graph_launches": done["graph launches"],
            "node_updates": done["node updates"]}


def measure_portable(tokens: int, replay: bool, calls: int, paired: bool = True) -> dict[str, Any]:
    """The same on the portable path (benchmarks.fake_portable): µs per call and what one call does."""
    from .fake_portable import PortableRecorder, fake_portable

    call = layer(tokens, paired=paired)
    recorder = PortableRecorder(count_only=True)
    flush = torch.set_flush_denormal(True)  # the stand-in kernels leave their outputs uninitialized
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the torch ops compute on the CPU here: one thread, no pool wake-ups in the timing
    try:
        with fake_portable(recorder):
            best, ops, done = _time_and_count(call, recorder, replay, calls)
    finally:
        torch.set_flush_denormal(False) if flush else None
        torch.set_num_threads(threads)
    return {"tokens": tokens, "replay": replay, "paired": paired, "host_us": best, "torch_ops": sum(ops.values()),
            "allocations": sum(ops[name] for name in ALLOCATING_OPS), "ops": dict(ops),
            "kernel_launches": done["kernel launches"], "graph_launches": done["graph launches"],
            "node_updates": done["node updates"]}


def _timed(call: Callable[[], Any], calls: int) -> float:
    begin = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - begin) * 1e6 / calls


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ("T", "mode", "host us (CPU)", "torch ops", "allocations", "kernel launches", "graph launches", "node updates")
    lines = [(str(r["tokens"]), "graph replay" if r["replay"] else "launches", f"{r['host_us']:.1f}", str(r["torch_ops"]),
              str(r["allocations"]), str(r["kernel_launches"]), str(r["graph_launches"]), str(r["node_updates"]))
             for r in rows]
    return align(header, lines, {1})


def run(args: argparse.Namespace, token_values: list[int]) -> int:
    calls = min(args.calls, 2000)
    rows = [measure(tokens, replay, calls) for tokens in token_values for replay in (True, False)]
    print("host-cpu: mxfp4.moe's SM90 host path on this CPU, device stubbed (gpt-oss-20b, top-4, best of 5 runs)")
    print(format_rows(rows))
    portable = [measure_portable(tokens, replay, calls) for tokens in token_values for replay in (True, False)]
    print("\nhost-cpu: mxfp4.moe's portable host path (Triton kernel, paired gate_up) on this CPU, device stubbed "
          "(torch ops computing on the CPU)")
    print(format_rows(portable))
    return 0
