"""bench timeline's reading of a CUDA-profiler trace (the GPU part runs through scripts/device_check.sh timeline)."""

from __future__ import annotations

import pytest

from benchmarks.timeline import (
    Floors,
    Kernel,
    floor_lines,
    format_timeline,
    kernels_from_trace,
    split_calls,
    summarize,
)


def _trace(kernels: list[tuple[str, float, float]]) -> dict:
    """A Chrome trace as torch.profiler writes it: the kernels, and other events that are not kernels."""
    events = [{"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": duration}
              for name, start, duration in kernels]
    events += [{"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0.0, "dur": 5.0},
               {"ph": "i", "cat": "kernel", "name": "an instant, not a kernel's span", "ts": 1.0},
               {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 2.0, "dur": 1.0}]
    return {"traceEvents": events[::-1]}  # out of order on purpose


# Two calls of three launches: routing (2 us), gate_up (20 us), down (15 us), with gaps of 1, 3, 4 us before each.
TWO_CALLS = [("route", 1.0, 2.0), ("gate_up", 6.0, 20.0), ("down", 30.0, 15.0),
             ("route", 46.0, 2.0), ("gate_up", 51.0, 20.0), ("down", 75.0, 17.0)]


def test_the_kernels_of_a_trace_in_start_order():
    kernels = kernels_from_trace(_trace(TWO_CALLS))
    assert [k.name for k in kernels] == ["route", "gate_up", "down"] * 2
    assert [k.start_us for k in kernels] == [1.0, 6.0, 30.0, 46.0, 51.0, 75.0]
    assert kernels[2].end_us == 45.0


def test_calls_split_by_count_and_must_launch_the_same_kernels():
    kernels = kernels_from_trace(_trace(TWO_CALLS))
    calls = split_calls(kernels, 2)
    assert [[k.name for k in call] for call in calls] == [["route", "gate_up", "down"]] * 2
    with pytest.raises(ValueError, match="6 kernels in the trace do not split into 4 calls"):
        split_calls(kernels, 4)
    with pytest.raises(ValueError, match="do not split into 1 calls"):
        split_calls([], 1)
    odd = kernels[:5] + [Kernel("other", 75.0, 17.0)]
    with pytest.raises(ValueError, match="call 1 launched other kernels than call 0"):
        split_calls(odd, 2)


def test_the_summary_splits_a_call_into_kernel_time_and_gaps():
    timeline = summarize(split_calls(kernels_from_trace(_trace(TWO_CALLS)), 2))
    assert [s.name for s in timeline.steps] == ["route", "gate_up", "down"]
    assert [s.kernel_us for s in timeline.steps] == [2.0, 20.0, 16.0]  # medians of (15, 17) for down
    # route: only the second call's first kernel has a kernel before it (45 -> 46); gate_up: 3 us both times;
    # down: 4 us both times.
    assert [s.gap_before_us for s in timeline.steps] == [1.0, 3.0, 4.0]
    assert timeline.call_us == 45.0  # first start to the next call's first start
    assert timeline.kernels_us == 38.0  # median of 37 and 39
    assert timeline.gaps_us == 7.0
    text = format_timeline("uniform T=1: ours", timeline)
    assert text.splitlines()[0] == "== uniform T=1: ours"
    assert "call (first start to the next call's)" in text and "7.0 in gaps" in text


def test_one_call_spans_its_own_kernels():
    timeline = summarize(split_calls(kernels_from_trace(_trace(TWO_CALLS[:3])), 1))
    assert timeline.call_us == 44.0 and timeline.kernels_us == 37.0
    assert [s.gap_before_us for s in timeline.steps] == [0.0, 3.0, 4.0]


def test_a_flush_before_each_call_is_left_out():
    """With the route kernel standing for an L2 flush: the steps start after it, and a call spans from its end."""
    timeline = summarize(split_calls(kernels_from_trace(_trace(TWO_CALLS)), 2), flush_kernels=1)
    assert [s.name for s in timeline.steps] == ["gate_up", "down"]
    assert [s.gap_before_us for s in timeline.steps] == [3.0, 4.0]
    assert timeline.call_us == 43.0  # median of 45 - 3 and 92 - 48
    assert timeline.kernels_us == 36.0  # median of 35 and 37
    assert "call (the flush's end to its last kernel's end)" in format_timeline("cold", timeline)


def test_floor_lines_set_the_call_and_its_two_gemms_against_their_bytes():
    kernels = [("moe_routing", 0.0, 2.0), ("moe_gather", 3.0, 1.0), ("mxfp4_grouped_mm", 5.0, 20.0),
               ("mxfp4_grouped_mm", 26.0, 16.0), ("moe_topk_sum", 43.0, 2.0)]
    timeline = summarize(split_calls(kernels_from_trace(_trace(kernels)), 1))  # one call: 45 us
    floors = Floors(experts=4, gate_up_bytes=35_000_000, down_bytes=17_500_000, rate=3.5e12, gate_up_sum_us=14.0,
                    down_sum_us=8.0, call_sum_us=20.0)
    lines = floor_lines(timeline, floors)
    assert "4 experts, gate_up 35.0 MB + down 17.5 MB" in lines[0] and "3.50 TB/s 15.0 us" in lines[0]
    assert lines[1] == "  call: 3.00x the floor, 2.25x torch.sum over its bytes"
    assert lines[2] == "  gate_up: 20.0 us = 2.00x its floor (10.0 us), 1.43x torch.sum over its bytes (14.0 us)"
    assert lines[3] == "  down: 16.0 us = 3.20x its floor (5.0 us), 2.00x torch.sum over its bytes (8.0 us)"
    no_gemms = summarize(split_calls(kernels_from_trace(_trace(kernels[:2])), 1))
    assert len(floor_lines(no_gemms, floors)) == 2  # the per-GEMM lines only where the two GEMMs are found
