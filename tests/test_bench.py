"""The benchmark's arithmetic, routing and table, the timing helpers, and a CPU dry run of its GPU loop."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from codegen import timing
from codegen.tuning import Shape

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_grouped_mm", ROOT / "benchmarks" / "bench_grouped_mm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

H100_READ = 3.09e12  # B/s, measured
H100_BF16 = 720e12  # FLOP/s, measured


# ---------------------------------------------------------------------------------------------
# bytes, FLOPs, floors


def test_bytes_and_flops_on_known_numbers():
    # gpt-oss-20b gate_up, 1 token per expert.
    weights = 32 * 5760 * 2880 // 2 + 32 * 5760 * 2880 // 32
    assert weights == 265_420_800 + 16_588_800
    assert timing.grouped_mm_bytes(32, 5760, 2880, 32) == weights + 32 * 2880 * 2 + 32 * 5760 * 2 == 282_562_560
    assert timing.grouped_mm_flops(32, 5760, 2880) == 1_061_683_200
    # Experts without rows are not read.
    assert timing.grouped_mm_bytes(0, 5760, 2880, 0) == 0


def test_floor_is_the_larger_of_memory_and_compute():
    decode = timing.floor_us(282_562_560, 1_061_683_200, H100_READ, H100_BF16)
    assert decode == pytest.approx(282_562_560 / H100_READ * 1e6)  # memory-bound: ~91.4 us
    assert decode == pytest.approx(91.44, abs=0.01)
    tokens = 32 * 4096  # prefill, 4096 tokens per expert
    nbytes = timing.grouped_mm_bytes(32, 5760, 2880, tokens)
    flops = timing.grouped_mm_flops(tokens, 5760, 2880)
    assert flops == 2 * tokens * 5760 * 2880
    prefill = timing.floor_us(nbytes, flops, H100_READ, H100_BF16)
    assert prefill == pytest.approx(flops / H100_BF16 * 1e6)  # compute-bound: ~6040 us
    assert prefill == pytest.approx(6039.8, abs=0.1)


def test_row_arithmetic_counts_only_active_experts():
    shape = Shape(4, 64, 64)
    nbytes, flops = bench.row_arithmetic(shape, [3, 0, 5, 0])
    assert nbytes == timing.grouped_mm_bytes(2, 64, 64, 8)
    assert flops == 2 * 8 * 64 * 64


def test_derived_columns():
    shape = Shape(32, 5760, 2880)
    nbytes, flops = bench.row_arithmetic(shape, [1] * 32)
    floor = timing.floor_us(nbytes, flops, H100_READ, H100_BF16)
    row = bench.Row("gpt-oss-20b", "gate_up", shape, "uniform", 1, [1] * 32, nbytes, flops, floor, {})
    d = bench.derived({"median_us": 2 * floor}, row, bf16_us=8 * floor)
    assert d["x_floor"] == pytest.approx(2.0)
    assert d["speedup_vs_bf16"] == pytest.approx(4.0)
    assert d["gbps"] == pytest.approx(H100_READ / 2 / 1e9)
    assert d["tflops"] == pytest.approx(flops / (2 * floor * 1e-6) / 1e12)
    assert bench.derived({"error": "x"}, row, None) == {}


# ---------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize(("experts", "m"), [(32, 1), (32, 16), (128, 4), (128, 4096), (8, 3)])
def test_zipf_loads(experts, m):
    loads = bench.zipf_loads(experts, m, seed=1)
    assert len(loads) == experts and sum(loads) == experts * m  # same total as the uniform row
    cap = math.ceil(experts * m / bench.TOP_K)
    assert max(loads) <= cap  # an expert sees each token at most once
    assert min(loads) >= 0
    assert max(loads) > m or m * experts < experts  # skewed
    assert loads == bench.zipf_loads(experts, m, seed=1)  # reproducible
    ordered = sorted(loads, reverse=True)
    weights = [1 / (r + 1) ** bench.ZIPF_EXPONENT for r in range(experts)]
    # Uncapped loads follow 1/rank^1.1 to within rounding.
    uncapped = [load for load in ordered if load < cap]
    if len(uncapped) > 2 and uncapped[0] > 20:
        first = ordered.index(uncapped[0])
        ratio = uncapped[1] / uncapped[0]
        assert ratio == pytest.approx(weights[first + 1] / weights[first], rel=0.1)


def test_zipf_caps_the_hottest_expert():
    loads = bench.zipf_loads(32, 1)  # 32 assignments of 8 tokens: the top expert would get ~9
    assert max(loads) == 8 and sum(loads) == 32
    assert bench.zipf_loads(4, 0) == [0, 0, 0, 0]


def test_memory_estimate_allows_20b_prefill():
    gate_up = Shape(32, 5760, 2880)
    assert bench.memory_needed(gate_up, 32 * 4096) < 40 * 2**30
    assert bench.memory_needed(Shape(128, 5760, 2880), 128 * 4096) > bench.memory_needed(gate_up, 32 * 4096)


# ---------------------------------------------------------------------------------------------
# timing helpers


def test_percentile_and_summary():
    assert timing.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert timing.percentile([1.0, 2.0], 50) == 1.5
    assert timing.percentile([7.0], 10) == 7.0
    result = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert result.median_us == 3.0 and result.p10_us == pytest.approx(1.4) and result.p90_us == pytest.approx(4.6)
    assert result.samples == (5.0, 1.0, 3.0, 2.0, 4.0) and result.min_us == 1.0
    with pytest.raises(ValueError):
        timing.percentile([], 50)


def test_rotation_sets():
    l2 = 50 * 2**20
    assert timing.rotation_sets(300 * 2**20, l2_bytes=l2) == 1  # one set already flushes the L2
    small = timing.rotation_sets(2 * 2**20, l2_bytes=l2)
    assert small * 2 * 2**20 > 2 * l2 and small <= timing.MAX_ROTATION_SETS
    assert timing.rotation_sets(10 * 2**20, l2_bytes=l2) * 10 * 2**20 > 2 * l2
    assert timing.rotation_sets(10 * 2**20, l2_bytes=l2, memory_budget=30 * 2**20) == 3  # the budget caps it
    assert timing.rotation_sets(1, l2_bytes=l2) == timing.MAX_ROTATION_SETS
    assert timing.rotation_sets(0) == 1


def test_time_cuda_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        timing.time_cuda(lambda: None)


def test_args_getter():
    assert timing._args_getter(None)(3) == ()
    assert timing._args_getter([(1, 2), (3, 4)])(3) == (3, 4)
    assert timing._args_getter(["a", "b"])(2) == ("a",)
    assert timing._args_getter(lambda i: (i, i))(5) == (5, 5)
    with pytest.raises(ValueError):
        timing._args_getter([])


# ---------------------------------------------------------------------------------------------
# the command line and a CPU dry run of the GPU loop


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--out" in out and "examples:" in out


def test_bench_without_gpu_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_candidate_configs_are_few_and_near_m():
    for m in (1, 16, 256, 4096):
        candidates = bench.candidate_configs(Shape(32, 5760, 2880), m, None)
        assert 1 <= len(candidates) <= 5
        names = [c.name for c, _ in candidates]
        assert len(names) == len(set(names))
        assert candidates[0][1].startswith("selected")


@pytest.fixture
def dry_run(monkeypatch):
    """Run the benchmark's GPU loop on the CPU: a fake timer and machine rates, tiny shapes."""
    from codegen.timing import MachineRate
    from mxfp4 import dispatch

    calls = []

    def fake_time_cuda(fn, *, rotate=None, **kwargs):
        args = timing._args_getter(rotate)
        for i in range(2):
            fn(*args(i))
        calls.append(kwargs)
        return timing.summarize([100.0, 110.0, 120.0])

    rate = lambda value, unit: MachineRate(value, unit, "fake", timing.summarize([1.0]))  # noqa: E731
    monkeypatch.setattr(timing, "time_cuda", fake_time_cuda)
    monkeypatch.setattr(timing, "measure_hbm_read_bandwidth", lambda: rate(H100_READ, "B/s"))
    monkeypatch.setattr(timing, "measure_bf16_peak", lambda: rate(H100_BF16, "FLOP/s"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Dry Run GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(dispatch, "select_path", lambda device: dispatch.PathChoice(dispatch.SM90, "dry run", "cpu"))
    monkeypatch.setattr("codegen.compiler.compile_many", lambda configs, **kw: [object() for _ in configs])
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "_healthy", lambda: True)
    monkeypatch.setattr(bench, "MODEL_SHAPES", {"tiny": {"gate_up": Shape(8, 128, 64), "down": Shape(8, 64, 64)}})
    return calls


def test_bench_dry_run_on_cpu(dry_run, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path), "--m", "1,8", "--model", "tiny", "--rep", "3"]) == 0
    out = capsys.readouterr().out
    table = out.strip().splitlines()
    assert table[-1].startswith("tiny down") and "portable" in table[-1]  # the table comes last
    result = json.loads((tmp_path / "bench_grouped_mm.json").read_text())
    assert result["device"] == "Dry Run GPU" and not result["partial"]
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2  # shapes x M x routings
    for row in rows:
        assert set(row["results"]) == {"torch bf16", "mxfp4 sm90", "portable"}
        assert row["results"]["torch bf16"]["median_us"] == pytest.approx(110.0)
        ours = row["results"]["mxfp4 sm90"]
        assert ours["median_us"] == pytest.approx(110.0) and ours["config"] in ours["candidates"]
        assert row["check_rel"] <= 1e-2  # our output (here: the portable path) against torch's bf16 GEMM
        assert row["results"]["portable"]["median_us"] == pytest.approx(110.0)
        assert row["tokens"] == 8 * row["m"]
        assert row["floor_us"] == pytest.approx(timing.floor_us(row["bytes"], row["flops"], H100_READ, H100_BF16))
    zipf = [row for row in rows if row["routing"] == "zipf"]
    assert all(row["max_load"] >= row["m"] for row in zipf) and any(row["max_load"] > row["m"] for row in zipf)
    assert "vs bf16" in out and "1.00x" in out


def test_bench_dry_run_records_a_wrong_config(dry_run, tmp_path, monkeypatch):
    import mxfp4

    real = mxfp4.grouped_mm

    def wrong_for_some(x, w, offsets, *, config=None):
        out = real(x, w, offsets, config=config)
        return out * 2 if config is not None and config.tile_m == 8 else out

    monkeypatch.setattr(mxfp4, "grouped_mm", wrong_for_some)
    assert bench.main(["--out", str(tmp_path), "--m", "1", "--model", "tiny", "--routing", "uniform", "--no-portable"]) == 0
    result = json.loads((tmp_path / "bench_grouped_mm.json").read_text())
    for row in result["rows"]:
        ours = row["results"]["mxfp4 sm90"]
        wrong = [name for name, r in ours["candidates"].items() if "wrong result" in r.get("error", "")]
        assert wrong and ours["config"] not in wrong
        assert row["results"]["portable"]["error"].startswith("skipped")


def test_time_cuda_control_flow_with_fake_events(monkeypatch):
    """time_cuda's warm-up, rotation, batching and run-ahead, with host-clock stand-ins for CUDA events."""
    import time as time_module

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time_module.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    sleeps = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: sleeps.append(cycles))
    monkeypatch.setattr(timing, "_sleep_cycles_per_ms", {})

    used = []

    def fn(tag):
        used.append(tag)
        time_module.sleep(0.0002)

    result = timing.time_cuda(fn, rotate=[("a",), ("b",), ("c",)], warmup_ms=1.0, rep=12)
    assert len(result.samples) == 12
    assert all(s >= 150 for s in result.samples)  # microseconds; each call sleeps 200 us
    assert used[:4] == ["a", "b", "c", "a"]  # consecutive calls rotate
    assert len(used) >= 1 + 3 + 1 + 12  # first call, estimate, warm-up, timed
    assert sleeps  # the GPU was kept busy before the timed batch
    sleeps.clear()
    timing.time_cuda(fn, rotate=lambda i: (i,), warmup_ms=0, rep=5, run_ahead=False)
    assert len(sleeps) == 0
    capped = timing.time_cuda(fn, rotate=[("a",)], warmup_ms=0, rep=1000, max_ms=2.0, min_rep=4)
    assert 4 <= len(capped.samples) <= 20  # max_ms bounds the timed calls


def test_bench_register_and_bad_m(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m codegen")
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--out", "/tmp/x"])
    assert args.handler is bench.run and args.quick and args.out == "/tmp/x"
    assert bench.main(["--m", "1,x"]) == 2
    assert "--m" in capsys.readouterr().err
