"""The benchmarks on the CPU: routing, arithmetic, checks, tables, the command line, the MoE layers,
the shipped package, and the codegen timing helpers they build on. (The GPU parts run on the H100
through scripts/device_check.sh.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import mxfp4
from benchmarks import cli, measure, moe_layers, peers, problems, report
from codegen.tune import timing
from codegen.tune.tables import Shape

ROOT = Path(__file__).resolve().parent.parent
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
    nbytes, flops = problems.row_arithmetic(Shape(4, 64, 64), [3, 0, 5, 0])
    assert nbytes == timing.grouped_mm_bytes(2, 64, 64, 8)
    assert flops == 2 * 8 * 64 * 64


def test_derived_columns_use_graph_time_and_the_measured_rates():
    nbytes, flops = problems.row_arithmetic(Shape(32, 5760, 2880), [1] * 32)
    floor = nbytes / H100_READ * 1e6
    d = report.derived({"graph_us": 2 * floor, "eager_us": 10 * floor}, nbytes, flops, H100_READ, H100_BF16)
    assert d["floor_us"] == pytest.approx(floor) and d["floor_fraction"] == pytest.approx(0.5)
    assert d["tbps"] == pytest.approx(H100_READ / 2 / 1e12)
    assert d["tflops"] == pytest.approx(flops / (2 * floor * 1e-6) / 1e12)
    assert d["peak_fraction"] == pytest.approx(d["tflops"] * 1e12 / H100_BF16)
    assert report.derived({"eager_us": floor}, nbytes, flops, H100_READ, H100_BF16)["floor_fraction"] == pytest.approx(1)
    assert report.derived({"error": "x"}, nbytes, flops, H100_READ, H100_BF16) == {}


def _row(results):
    row = problems.make_row("gpt-oss-20b", "gate_up", Shape(32, 5760, 2880), "uniform", 1)
    row.results.update(results)
    return row


def test_annotate_ratios_and_table():
    row = _row({"ours": {"graph_us": 80.0, "eager_us": 130.0, "device_us": 79.0, "rel_error": 2e-3},
                "humming": {"graph_us": 100.0, "eager_us": 100.0, "rel_error": 2e-3},
                "torch bf16": {"error": "torch bf16 unavailable: no _grouped_mm"}})
    report.annotate([row], H100_READ, H100_BF16)
    ours = row.results["ours"]
    assert ours["ours/humming graph"] == pytest.approx(0.8) and ours["ours/humming eager"] == pytest.approx(1.3)
    assert "ours/bf16 graph" not in ours  # no bf16 time: no ratio
    table = report.format_table([row]).splitlines()
    assert table[0].split()[:4] == ["shape", "routing", "M", "path"]
    (ours_line,) = [line for line in table if " ours " in line]
    assert "80.0" in ours_line and "0.80" in ours_line and "2.0e-03" in ours_line
    assert any("no _grouped_mm" in line for line in table)  # a peer that cannot run says why


def test_wrong_result_is_reported_not_timed(monkeypatch):
    from benchmarks import bench_grouped_mm as bench

    timed = []
    monkeypatch.setattr(measure, "time_all", lambda *a, **k: timed.append(1) or {"graph_us": 1.0})
    ref = torch.ones(2, 3, dtype=torch.float64)
    index = torch.tensor([0, 1])
    good = peers.Prepared(lambda: torch.ones(2, 3), [()], "ok")
    assert bench.check_and_time(good, index, ref, bench.Settings())["graph_us"] == 1.0
    bad = peers.Prepared(lambda: torch.ones(2, 3) * 1.5, [()])
    result = bench.check_and_time(bad, index, ref, bench.Settings())
    assert "wrong result" in result["error"] and result["rel_error"] == pytest.approx(0.5) and len(timed) == 1


def test_run_path_records_unavailable_and_skipped():
    from benchmarks import bench_grouped_mm as bench

    def missing(ops):
        raise peers.Unavailable("No module named 'humming'")

    settings = bench.Settings()
    result = bench.run_path("humming", None, None, None, settings, missing)
    assert result == {"error": "humming unavailable: No module named 'humming'"}
    settings.skip["humming"] = "skipped (--no-humming)"
    assert bench.run_path("humming", None, None, None, settings, missing) == {"error": "skipped (--no-humming)"}


def test_json_round_trip(tmp_path):
    row = _row({"ours": {"graph_us": 80.0}})
    path = report.write_json(tmp_path / "b.json", {"rows": [row.as_dict()]})
    (loaded,) = json.loads(path.read_text())["rows"]
    assert loaded["E"] == 32 and loaded["tokens"] == 32 and loaded["results"]["ours"]["graph_us"] == 80.0


# ---------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize(("experts", "m"), [(32, 1), (32, 16), (128, 4), (128, 4096), (8, 3)])
def test_zipf_loads(experts, m):
    loads = problems.zipf_loads(experts, m, seed=1)
    assert len(loads) == experts and sum(loads) == experts * m  # same total as the uniform row
    cap = math.ceil(experts * m / problems.TOP_K)
    assert 0 <= min(loads) and max(loads) <= cap  # an expert sees each token at most once
    assert max(loads) > m  # skewed
    assert loads == problems.zipf_loads(experts, m, seed=1)  # reproducible
    ordered = sorted(loads, reverse=True)
    uncapped = [load for load in ordered if load < cap]
    if len(uncapped) > 2 and uncapped[0] > 20:  # uncapped loads follow 1/rank^1.1
        first = ordered.index(uncapped[0])
        weights = [1 / (r + 1) ** problems.ZIPF_EXPONENT for r in range(experts)]
        assert uncapped[1] / uncapped[0] == pytest.approx(weights[first + 1] / weights[first], rel=0.1)


def test_zipf_caps_the_hottest_expert_and_handles_zero():
    loads = problems.zipf_loads(32, 1)  # 32 assignments of 8 tokens: the top expert would get ~9
    assert max(loads) == 8 and sum(loads) == 32
    assert problems.zipf_loads(4, 0) == [0, 0, 0, 0]
    assert problems.zipf_loads_total(32, 4) == problems.zipf_loads_total(32, 4)  # T = 1 token, top-4
    assert sorted(problems.zipf_loads_total(32, 4)) == [0] * 28 + [1] * 4


def test_uniform_loads_and_loads_for():
    loads = problems.uniform_loads(32, 36, seed=3)
    assert sum(loads) == 36 and sorted(set(loads)) == [1, 2] and loads.count(2) == 4
    assert problems.loads_for("uniform", 4, 3) == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="routing"):
        problems.loads_for("random", 4, 3)


@pytest.mark.parametrize(("tokens", "kind"), [(1, "zipf"), (8, "zipf"), (32, "uniform"), (129, "zipf"), (512, "zipf")])
def test_topk_from_loads_gives_distinct_experts_with_the_loads(tokens, kind):
    total = tokens * 4
    loads = problems.zipf_loads_total(32, total, seed=2) if kind == "zipf" else problems.uniform_loads(32, total)
    rows = problems.topk_from_loads(loads, tokens, 4, seed=5)
    assert len(rows) == tokens and all(len(set(r)) == 4 for r in rows)
    counts = [0] * 32
    for r in rows:
        for e in r:
            counts[e] += 1
    assert counts == loads
    with pytest.raises(ValueError, match="exceeds"):
        problems.topk_from_loads([2, 0], 1, 2)
    with pytest.raises(ValueError, match="sum"):
        problems.topk_from_loads([1, 1], 3, 1)


def test_offsets_and_sampled_rows():
    loads = [3, 0, 10, 1]
    assert problems.offsets_from_loads(loads) == [0, 3, 3, 13, 14]
    samples = problems.sample_rows(loads, per_expert=4, seed=0)
    by_expert = {}
    for row, expert in samples:
        by_expert.setdefault(expert, []).append(row)
    assert by_expert[0] == [0, 1, 2] and 1 not in by_expert and by_expert[3] == [13]
    assert by_expert[2][0] == 3 and by_expert[2][-1] == 12 and len(by_expert[2]) == 4
    assert all(3 <= r < 13 for r in by_expert[2])


def test_memory_estimate_allows_20b_prefill():
    gate_up = Shape(32, 5760, 2880)
    assert problems.memory_needed(gate_up, 32 * 4096) < 40 * 2**30
    assert problems.memory_needed(Shape(128, 5760, 2880), 128 * 4096) > problems.memory_needed(gate_up, 32 * 4096)


# ---------------------------------------------------------------------------------------------
# checks and peers (CPU parts)


def test_rel_error_and_reference_rows():
    assert measure.rel_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert measure.rel_error(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])) == math.inf
    assert measure.rel_error(torch.tensor([math.nan]), torch.tensor([1.0])) == math.inf
    x = torch.randn(6, 32).bfloat16()
    w = torch.randn(3, 8, 32).bfloat16()
    index, ref = measure.reference_rows(x, w, [(0, 0), (5, 2), (3, 1)])
    assert index.tolist() == [0, 5, 3] and ref.dtype == torch.float64
    assert torch.allclose(ref[1], x[5].double() @ w[2].double().t())


def test_copies_needed_reads_past_l2_within_budget():
    l2 = 50 << 20
    assert peers.copies_needed(300 << 20, 300 << 20, l2, 4 << 30) == 1
    assert peers.copies_needed(40 << 20, 140 << 20, l2, 4 << 30) == 4  # 3 x 40 MB > 2 x L2, one spare
    assert peers.copies_needed(40 << 20, 140 << 20, l2, 0) == 1  # no budget: one copy


def test_gpt_oss_tensors_are_the_checkpoint_bytes():
    import mxfp4

    weight = mxfp4.quantize(torch.randn(2, 70, 96))
    blocks, scales = peers.gpt_oss_tensors(mxfp4.pack(weight))
    assert blocks.shape == (2, 70, 48) and scales.shape == (2, 70, 3)
    assert torch.equal(blocks, weight.blocks.reshape(2, 70, 48)) and torch.equal(scales, weight.scales)


def test_humming_unavailable_says_why(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_humming(name, *args, **kwargs):
        if name.startswith("humming"):
            raise ImportError("No module named 'humming'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_humming)
    reason = peers.humming_unavailable()
    assert "No module named 'humming'" in reason and "humming-kernels==0.1.19" in reason
    with pytest.raises(peers.Unavailable, match="humming"):
        peers.prepare_humming(None)


def test_force_portable_refuses_when_not_honoured(monkeypatch):
    from benchmarks import fallback
    from mxfp4.ops import dispatch

    forced: list[bool] = []
    monkeypatch.setattr(dispatch, "force_portable", forced.append)
    monkeypatch.setattr(dispatch, "select_path", lambda device: dispatch.PathChoice(dispatch.SM90, "Hopper", "cuda:0"))
    with pytest.raises(peers.Unavailable, match="did not take effect"):
        fallback.force_portable()
    assert forced == [True]
    monkeypatch.setattr(dispatch, "select_path", lambda device: dispatch.PathChoice(dispatch.PORTABLE, "forced", "cuda:0"))
    assert fallback.force_portable() == "forced"


# ---------------------------------------------------------------------------------------------
# the MoE layers against their float64 reference, on the CPU


@pytest.fixture(scope="module")
def tiny_layer():
    from codegen.tune.sweep import random_weights

    e, h, i = 4, 64, 64
    gate_up, gate_up_bf16 = random_weights(Shape(e, 2 * i, h), "cpu", seed=1)
    down, down_bf16 = random_weights(Shape(e, h, i), "cpu", seed=2)
    g = torch.Generator().manual_seed(0)
    w = moe_layers.ExpertWeights(gate_up, mxfp4.pack_gate_up(mxfp4.unpack(gate_up)), down, gate_up_bf16, down_bf16,
                                 (0.5 * torch.randn(e, 2 * i, generator=g)).bfloat16(), (0.5 * torch.randn(e, h, generator=g)).bfloat16())
    tokens = 6
    ids = torch.tensor(problems.topk_from_loads(problems.zipf_loads_total(e, tokens * 2, top_k=2), tokens, 2), dtype=torch.int32)
    weights = torch.rand(tokens, 2, generator=g).softmax(1)
    x = (torch.randn(tokens, h, generator=g) * h**-0.5).bfloat16()
    return w, x, ids, weights, moe_layers.reference_tokens(x, ids, weights, w, list(range(tokens)))


def test_activation_is_transformers_gate():
    h = torch.tensor([[10.0, -9.0, 1.0, 0.5]])
    gate, up = torch.tensor([7.0, 1.0]), torch.tensor([-7.0, 0.5])
    want = (up + 1) * gate * torch.sigmoid(1.702 * gate)
    assert torch.allclose(moe_layers.gpt_oss_activation(h)[0], want)


def test_routing_plan():
    order, experts, tokens, offsets = moe_layers.routing_plan(torch.tensor([[2, 0], [2, 1]]), 4)
    assert experts.tolist() == [0, 1, 2, 2] and offsets.tolist() == [0, 1, 2, 4, 4]
    assert tokens.tolist() == [0, 1, 0, 1] and order.tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize("name", ["ours unfused (2x grouped_mm + glue)", "bf16 torch layer (2x _grouped_mm + glue)"])
def test_composed_layers_match_float64(tiny_layer, name):
    w, x, ids, weights, ref = tiny_layer
    out = moe_layers.LAYERS[name](w)(x, ids, weights)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert measure.rel_error(out, ref) < problems.TOLERANCE


def test_transformers_layer_matches_float64(tiny_layer):
    pytest.importorskip("transformers")
    w, x, ids, weights, ref = tiny_layer
    assert measure.rel_error(moe_layers.transformers_grouped_mm(w)(x, ids, weights), ref) < problems.TOLERANCE


def test_fused_layer_matches(tiny_layer):
    w, x, ids, weights, ref = tiny_layer
    assert measure.rel_error(moe_layers.ours_fused(w)(x, ids, weights), ref) < problems.TOLERANCE


def test_fused_fp8_layer_is_within_its_budget(tiny_layer):
    """The FP8 row of `bench moe`: mxfp4.moe(activations="fp8") on FP8-ready copies, checked against the layer's
    stated budget, and really quantized (its error is well above the bf16 layer's)."""
    w, x, ids, weights, ref = tiny_layer
    fp8 = measure.rel_error(moe_layers.ours_fused_fp8(w)(x, ids, weights), ref)
    bf16 = measure.rel_error(moe_layers.ours_fused(w)(x, ids, weights), ref)
    assert 2 * bf16 < fp8 < moe_layers.FP8_LAYER_TOLERANCE, (fp8, bf16)


def test_moe_targets():
    from benchmarks import bench_moe

    fused, gemms = "ours fused (mxfp4.moe)", bench_moe.GEMMS
    results = {fused: {"graph_us": 110.0}, gemms: {"graph_us": 100.0},
               "ours unfused (2x grouped_mm + glue)": {"graph_us": 200.0},
               "transformers grouped_mm (bf16)": {"error": "unavailable"}}
    verdicts = bench_moe.targets(results, 32)
    assert verdicts["fused <= 1.15x our two GEMMs"]["met"] and verdicts["fused >= 1.5x faster than unfused"]["met"]
    assert verdicts["fused <= 1.15x our two GEMMs"]["ratio"] == pytest.approx(1.1)
    assert verdicts["fused >= 3x faster than transformers bf16"] is None
    assert "fused >= 0.95x bf16 torch layer throughput" not in verdicts  # T = 4096 only
    assert not bench_moe.targets({fused: {"eager_us": 130.0}, gemms: {"eager_us": 100.0}}, 1)[
        "fused <= 1.15x our two GEMMs"]["met"]
    fp8 = "FP8 activations no slower than bf16 (issue 24)"
    for tokens in (1, 4096):  # every T
        verdict = bench_moe.targets({bench_moe.FP8_LAYER: {"graph_us": 104.0}, fused: {"graph_us": 100.0}}, tokens)[fp8]
        assert verdict["ratio"] == pytest.approx(1.04) and not verdict["met"]


def test_moe_table_shows_the_cold_l2_time_beside_the_graph_time():
    from benchmarks import bench_moe

    fused = "ours fused (mxfp4.moe)"
    point = {"routing": "uniform", "tokens": 1, "targets": {},
             "results": {fused: {"rel_error": 2.9e-3, "graph_us": 41.5, "graph_cold_us": 44.25, "eager_us": 60.0,
                                 "host_us": 31.0},
                         bench_moe.GEMMS: {"graph_us": 36.0, "eager_us": 50.0}}}
    lines = bench_moe.format_moe([point]).splitlines()
    header = lines[0].split()
    assert header[header.index("graph") + 2: header.index("graph") + 4] == ["cold", "L2"]
    row = next(line for line in lines if fused in line)
    assert row.split()[-4:] == ["41.5", "44.2", "60.0", "31.0"]
    gemms = next(line for line in lines if bench_moe.GEMMS in line)
    assert gemms.split()[-4:] == ["36.0", "-", "50.0", "-"]  # no cold time measured: a dash


# ---------------------------------------------------------------------------------------------
# the command line


def test_every_flag_the_help_shows_parses(capsys):
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = {token.split("=")[0].strip("[],") for token in text.split() if token.startswith("--")}
    assert {"--quick", "--m", "--model", "--tokens", "--routing", "--no-humming", "--no-graph", "--calls"} <= flags
    for suite in cli.SUITES:
        args = parser.parse_args([suite, "--quick", "--out", "/tmp/x", "--model", "gpt-oss-20b", "--m", "1,16",
                                  "--tokens", "1,8", "--routing", "zipf", "--no-humming", "--no-graph", "--no-plot",
                                  "--calls", "50", "--watchdog", "10", "--seed", "3"])
        assert args.suite == suite and args.quick and not args.plot and args.calls == 50


def test_values_per_suite():
    parse = lambda *argv: cli.m_values_for(cli.build_parser().parse_args(list(argv)))  # noqa: E731
    assert parse() == list(problems.M_VALUES)
    assert parse("--quick") == list(problems.QUICK_M_VALUES)
    assert parse("fallback") == list(problems.FALLBACK_M_VALUES)
    assert parse("moe", "--tokens", "4,8") == [4, 8] and parse("moe") == list(problems.MOE_TOKENS)
    assert parse("host", "--m", "2") == [2]
    assert parse("host-cpu") == list(problems.HOST_MOE_TOKENS) == [1, 8, 64] and parse("host-cpu", "--tokens", "2") == [2]
    with pytest.raises(ValueError, match="--tokens"):
        parse("moe", "--tokens", "0")


def _host_cpu_rows(lines: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(replayed, launched) rows of a host-cpu table: T and the counts (torch ops, allocations, kernel launches,
    graph launches); columns: T, mode, host us, torch ops, allocations, kernel launches, graph launches, updates."""
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["64"])]
    replayed = [r[:1] + r[4:8] for r in rows if r[1:3] == ["graph", "replay"]]
    launched = [r[:1] + r[3:7] for r in rows if r[1] == "launches"]
    return replayed, launched


def test_host_cpu_suite_runs_without_a_gpu(capsys, monkeypatch):
    """The host work of one mxfp4.moe call, device stubbed. SM90: a replayed call allocates its output and
    launches one graph; without replay, two allocations and the five kernels. Portable: the same for a replayed
    call (the graph's copy nodes moved to its tensors); without replay, the composition's torch ops and the two
    Triton launches."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["host-cpu", "--tokens", "1,64", "--calls", "5"]) == 0
    out = capsys.readouterr().out
    sm90, portable = out.split("\nhost-cpu: mxfp4.moe's portable host path")
    replayed, launched = _host_cpu_rows(sm90.splitlines())
    assert replayed == [[t, "1", "1", "0", "1"] for t in ("1", "64")]
    assert launched == [[t, "2", "2", "5", "0"] for t in ("1", "64")]
    replayed, launched = _host_cpu_rows(portable.splitlines())
    assert replayed == [[t, "1", "1", "0", "1"] for t in ("1", "64")]  # empty_like: the output
    assert [r[0] for r in launched] == ["1", "64"] and all(int(r[1]) <= 36 and r[3:] == ["2", "0"] for r in launched)


def test_moe_host_verdicts():
    from benchmarks.host import moe_verdicts

    rows = [{"model": "gpt-oss-20b", "projection": "moe layer", "m": m, "results": {"mxfp4.moe": r}}
            for m, r in ((1, {"host_us": 41.5}), (8, {"host_us": 60.5, "gpu_idle": True}), (64, {"error": "boom"}))]
    rows.append({"model": "gpt-oss-20b", "projection": "gate_up", "m": 1, "results": {"ours grouped_mm": {"host_us": 99.0}}})
    assert moe_verdicts(rows) == [
        "mxfp4.moe T=1: eager host 41.5 us per call (target <= 60 us) met",
        "mxfp4.moe T=8: eager host 60.5 us per call (target <= 60 us) MISSED (GPU went idle: rerun with fewer --calls)",
        "mxfp4.moe T=64: not measured (boom)",
    ]


def test_bad_values_and_no_gpu_exit_2(capsys, monkeypatch):
    assert cli.main(["--m", "1,x"]) == 2 and "--m" in capsys.readouterr().err
    assert cli.main(["--calls", "0"]) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--quick"]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_codegen_bench_verb_takes_the_flags():
    from codegen.cli.main import build_parser

    args = build_parser().parse_args(["bench", "moe", "--quick", "--tokens", "1,32"])
    assert args.handler is cli.run and args.suite == "moe" and args.tokens == "1,32"


def _run(argv, cwd, pythonpath):
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_bench_help_from_another_directory(tmp_path):
    for argv in (["-m", "codegen", "bench", "--help"], ["-m", "benchmarks", "--help"]):
        result = _run(argv, tmp_path, ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "--quick" in result.stdout and "ncu-case" in result.stdout


def test_wheel_ships_the_benchmarks_and_bench_runs_outside_a_checkout(tmp_path, built_wheel):
    wheel = built_wheel
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "hopper_mxfp4_bench" / "cli.py").is_file() and not (site / "benchmarks").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _run(["-m", "codegen", "bench", "--quick", "--help"], elsewhere, site)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--quick" in result.stdout and "humming" in result.stdout
    probe = _run(["-c", "import codegen.cli.main as m, sys; p = m.build_parser(); "
                  "a = p.parse_args(['bench', '--quick', '--m', 'x']); sys.exit(a.handler(a))"], elsewhere, site)
    assert probe.returncode == 2 and "--m" in probe.stderr  # the installed verb runs (and checks its flags)


# ---------------------------------------------------------------------------------------------
# codegen timing helpers the benchmark builds on



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




# ---------------------------------------------------------------------------------------------
# the Nsight Compute summary of device_check.sh's ncu step


def test_ncu_summary_parses_a_raw_page():
    sys.path.insert(0, str(ROOT / "scripts"))
    import ncu_summary

    text = "\n".join([
        "==PROF== Connected to process 1",
        '"ID","Kernel Name","launch__grid_size","dram__throughput.avg.pct_of_peak_sustained_elapsed",'
        '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
        '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",'
        '"smsp__average_warps_issue_stalled_not_issued_per_issue_active.ratio"',
        '"","","","%","ratio","ratio","ratio"',
        '"0","mxfp4_grouped_mm_n128","132","65.10","3.50","0.25","9.0"',
    ])
    (row,) = ncu_summary.read_raw(text)
    assert row["launch__grid_size"] == ("132", "")
    assert ncu_summary.top_stalls(row) == [("long_scoreboard", 3.5), ("barrier", 0.25)]
    (summary,) = ncu_summary.summarize("ours 20b", [row])
    assert "DRAM % 65.10" in summary and "grid 132" in summary and "long_scoreboard 3.50" in summary
    assert "no kernels" in ncu_summary.summarize("x", [])[0]
    assert "tensor pipes" not in summary  # a report without ComputeWorkloadAnalysis has none


def test_ncu_summary_gives_the_stores_sectors_per_request():
    sys.path.insert(0, str(ROOT / "scripts"))
    import ncu_summary

    text = "\n".join([
        '"ID","Kernel Name","smsp__inst_executed_op_global_st.sum","l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",'
        '"l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum"',
        '"","","inst","","sector"',
        '"0","mxfp4_grouped_mm","1,024","1,024","8,192"',
    ])
    (row,) = ncu_summary.read_raw(text)
    assert ncu_summary.sectors_per_request(row) == 8.0
    (summary,) = ncu_summary.summarize("w4a8", [row])
    assert "st requests 1,024" in summary and "st sectors 8,192 sector" in summary and "st sectors/request 8.00" in summary
    (no_stores,) = ncu_summary.read_raw(text.replace('"1,024","1,024"', '"0","0"'))
    assert ncu_summary.sectors_per_request(no_stores) is None


def test_ncu_stall_lines_ranks_instructions_and_opcodes(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import ncu_stall_lines

    page = tmp_path / "stalls-sass.csv"
    page.write_text("\n".join([
        '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
        '"stall_long_sb","stall_wait"',
        '"0x100","LDG.E R2, desc[UR4][R6.64]","10","9","8","2"',
        '"0x110","@!P0 SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x8], R3","60","50","0","60"',
        '"0x120","HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], RZ","30","0","0","0"',
        '"0x130","NOP","0","0","0","0"',
    ]) + "\n")
    assert ncu_stall_lines.main([str(page), "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "4 instructions, 100 stall samples; top 2 by samples:"
    assert "SYNCS.PHASECHK" in out[2] and "60.0%" in out[2] and "wait 100%" in out[2]
    assert "HGMMA" in out[3] and len(out) == 5  # the top 2, then the opcodes
    assert out[4].startswith("samples by opcode: SYNCS.PHASECHK.TRANS64.TRYWAIT 60.0%, HGMMA.64x256x16.F32.BF16 30.0%")
    missing = tmp_path / "other.csv"
    missing.write_text('"Address","Source","Instructions Executed"\n"0x0","NOP","1"\n')
    assert ncu_stall_lines.main([str(missing)]) == 0
    assert "no stall-sampling or source column found" in capsys.readouterr().out
    assert ncu_stall_lines.main([str(tmp_path / "absent.csv")]) == 1
    assert "absent.csv" in capsys.readouterr().err


def test_ncu_summary_lists_the_tensor_pipes_it_finds():
    sys.path.insert(0, str(ROOT / "scripts"))
    import ncu_summary

    row = {"Kernel Name": ("mxfp4_grouped_mm", ""),
           "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": ("81.5", "%"),
           "sm__inst_executed_pipe_tensor_op_hmma.avg.pct_of_peak_sustained_active": ("0.0", "%"),
           "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active": ("40.0", "%"),
           "sm__pipe_tensor_op_gmma_cycles_active.avg": ("123", "cycle")}
    assert ncu_summary.tensor_pipes(row) == [
        ("sm__inst_executed_pipe_tensor_op_hmma.avg.pct_of_peak_sustained_active", "0.0"),
        ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active", "81.5")]
    (summary,) = ncu_summary.summarize("w4a16", [row])
    assert "tensor pipes: sm__inst_executed_pipe_tensor_op_hmma" in summary and "gmma_cycles_active" in summary


# ---------------------------------------------------------------------------------------------
# e2e: synthetic gpt-oss checkpoints, the suite end to end (tiny, on the CPU), its tables and targets


def test_synthetic_checkpoint_sizes_at_the_real_dimensions():
    pytest.importorskip("transformers")
    from benchmarks import gpt_oss_checkpoint as ckpt

    sizes = {name: ckpt.checkpoint_bytes(ckpt.model_config(name)) for name in ("gpt-oss-20b", "gpt-oss-120b")}
    experts_20b = 24 * 32 * (5760 + 2880) * 2880 // 32 * 17  # blocks + scales: 17 bytes per 32 values
    assert experts_20b < sizes["gpt-oss-20b"] < experts_20b + 4.5e9  # + attention, router, embeddings, biases
    assert 64e9 < sizes["gpt-oss-120b"] < 66e9
    shards = ckpt.plan_shards(ckpt.tensor_specs(ckpt.model_config("gpt-oss-120b")), ckpt.SHARD_BYTES)
    assert 13 <= len(shards) <= 16 and all(sum(s.nbytes for s in specs) <= ckpt.SHARD_BYTES for specs in shards.values())
    names = [spec.name for specs in shards.values() for spec in specs]
    assert len(names) == len(set(names)) and "model.layers.35.mlp.experts.down_proj_scales" in names


def test_synthetic_checkpoint_is_reused_only_when_it_matches(tmp_path):
    pytest.importorskip("transformers")
    from benchmarks import gpt_oss_checkpoint as ckpt

    config = ckpt.model_config("tiny", num_hidden_layers=1)
    first = ckpt.ensure_checkpoint(tmp_path, config, seed=1, shard_bytes=30_000, progress=False)
    assert not first["reused"] and len(list(tmp_path.glob("model-*.safetensors"))) >= 2
    assert ckpt.ensure_checkpoint(tmp_path, config, seed=1, shard_bytes=30_000, progress=False)["reused"]
    (tmp_path / "unrelated.txt").write_text("kept")
    again = ckpt.ensure_checkpoint(tmp_path, config, seed=2, progress=False)  # another seed, one file
    assert not again["reused"] and [p.name for p in tmp_path.glob("model*.safetensors*")] == ["model.safetensors"]
    assert (tmp_path / "unrelated.txt").read_text() == "kept"
    (tmp_path / "model.safetensors").write_bytes(b"cut")  # a damaged file is not reused
    assert not ckpt.ensure_checkpoint(tmp_path, config, seed=2, progress=False)["reused"]
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["quantization_config"]["quant_method"] == "mxfp4" and config_json["model_type"] == "gpt_oss"


def test_e2e_values_and_flags(capsys):
    parse = lambda *argv: cli.build_parser().parse_args(list(argv))  # noqa: E731
    assert cli.m_values_for(parse("e2e")) == [1, 8, 64] and cli.m_values_for(parse("e2e", "--batch", "2,4")) == [2, 4]
    args = parse("e2e", "--modes", "compiled", "--tiny", "--dir", "/tmp/d", "--new-tokens", "5", "--no-bf16")
    assert args.modes == "compiled" and args.tiny and args.dir == "/tmp/d" and args.new_tokens == 5 and args.no_bf16
    with pytest.raises(SystemExit):
        parse("e2e", "--modes", "eager,fast")
    assert "eager, compiled" in capsys.readouterr().err
    assert cli.main(["e2e", "--tiny", "--new-tokens", "1"]) == 2 and "--new-tokens" in capsys.readouterr().err


def test_e2e_runs_end_to_end_on_the_cpu(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["e2e", "--tiny", "--dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--batch", "1,3",
            "--new-tokens", "3", "--prompt-tokens", "4", "--reps", "1"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    payload = json.loads((tmp_path / "out" / "bench_e2e.json").read_text())
    (model,) = payload["models"]
    assert model["model"] == "tiny" and not model["checkpoint"]["reused"] and model["ours"]["load_s"] > 0
    for side in ("ours", "bf16"):
        for mode in ("eager", "compiled"):
            for batch in ("1", "3"):
                point = model[side]["decode"][mode][batch]
                assert point["ms_per_step"] > 0 and point["tokens_per_s"] == pytest.approx(int(batch) * 1e3 / point["ms_per_step"])
                assert not point["compiled"]  # transformers compiles the decode step on CUDA only
    assert "static, not compiled" in captured.out and "bf16 (transformers grouped_mm)" in captured.out
    assert "tiny eager: ours/bf16 tokens/s B=1" in captured.out and "decode eager B=3 (2 layers):" in captured.err
    assert cli.main(argv) == 0  # the checkpoint is reused
    assert json.loads((tmp_path / "out" / "bench_e2e.json").read_text())["models"][0]["checkpoint"]["reused"]


def test_e2e_targets_and_tables():
    from benchmarks import e2e_report

    point = lambda tps: {"tokens_per_s": tps, "ms_per_step": 1e3 / tps, "compiled": True}  # noqa: E731
    results = [
        {"model": "gpt-oss-20b", "checkpoint": {"bytes": 13.8e9, "reused": False, "seconds": 40.0},
         "ours": {"load_s": 9.0, "peak_gb": 14.1, "after_gb": 13.9,
                  "decode": {"eager": {"1": point(36.0)}, "compiled": {"1": point(300.0), "64": point(9000.0)}}},
         "bf16": {"after_gb": 42.0, "decode": {"eager": {"1": point(30.0)}, "compiled": {"1": point(250.0), "64": point(2000.0)}}}},
        {"model": "gpt-oss-120b", "checkpoint": {"bytes": 65e9, "reused": True, "seconds": 0.1},
         "ours": {"load_s": 40.0, "peak_gb": 71.0, "after_gb": 65.0, "decode": {"eager": {"1": {"error": "boom"}}}},
         "bf16": {"error": "does not fit: the bf16 model is 234 GB, the GPU has 150 GB"}},
    ]
    verdicts = e2e_report.targets(results)
    assert verdicts["gpt-oss-20b load peak <= 15 GB"]["met"] and not verdicts["gpt-oss-120b load peak <= 70 GB"]["met"]
    assert verdicts["compiled decode B=1 >= 1.3x bf16"] == {"value": pytest.approx(1.2), "limit": 1.3, "met": False}
    assert verdicts["compiled decode B=64 >= 3x bf16"]["met"] and verdicts["eager decode B=1 >= 1.2x bf16"]["met"]
    text = e2e_report.format_e2e(results, [1, 64], ["eager", "compiled"])
    assert "does not fit: the bf16 model is 234 GB" in text and "boom" in text and "MISSED" in text
    assert "gpt-oss-20b compiled: ours/bf16 tokens/s B=1 1.20x, B=64 4.50x" in text
    assert "300.0 (3.33 ms)" in text and "1.014" in text  # tokens/s (ms/step); peak/after


def test_fallback_table_ratios_and_targets():
    """The fallback suite's table on made-up times: ratios are bf16 / path, targets by M, held memory."""
    from benchmarks import fallback

    shape = problems.MODEL_SHAPES["gpt-oss-20b"]["down"]
    rows = []
    for m, kernel_us in ((1, 100.0), (1024, 900.0), (256, 50.0)):
        row = problems.make_row("gpt-oss-20b", "down", shape, "uniform", m)
        row.results = {"portable kernel": {"graph_us": kernel_us, "rel_error": 2e-3, "held_bytes": 3 << 29},
                       "portable cached": {"eager_us": 250.0, "held_bytes": 9 << 29},
                       "torch bf16": {"graph_us": 300.0, "held_bytes": 6 << 29},
                       "ours sm90": {"error": "wrong result"}}
        fallback.add_ratios(row)
        rows.append(row)
    assert rows[0].results["portable kernel"]["vs_bf16"] == 3.0 and rows[0].results["portable cached"]["vs_bf16"] == 1.2
    assert rows[0].results["ours sm90"]["vs_bf16"] is None
    assert [fallback.target_note(row) for row in rows] == ["ok (>= 2.0x)", "MISS (>= 0.7x)", ""]
    table = fallback.format_fallback(rows)
    assert "1.50/4.50/3.00" in table and "3.00" in table and "err" in table
    assert "ours sm90: wrong result" in fallback.format_errors(rows)


# ---------------------------------------------------------------------------------------------
# bench waits: the probe's arithmetic (the GPU part runs through scripts/device_check.sh waits)


def test_wait_probe_shares_and_ring_bytes():
    from benchmarks.waits import ring_bytes_per_sm, shares
    from codegen.build.config import TileConfig

    got = shares(_PROBE_SUMS)
    assert got["producer_empty_wait"] == pytest.approx(0.8) and got["consumer_full_wait"] == pytest.approx(0.1)
    assert got["consumer_drain_wait"] == pytest.approx(0.05) and got["consumer_epilogue"] == pytest.approx(0.1)
    assert got["consumer_work"] == pytest.approx(0.6) and got["consumer_cycles_per_stage"] == pytest.approx(100.0)
    assert got["epilogue_cycles_per_unit"] == pytest.approx(100.0)
    config = TileConfig.from_name("n128_m8_k128_s6_wg1_c3")
    # 3 CTAs x 6 stages x (8 x 128 bf16 of x + 2 x 2 atoms of 2176 bytes)
    assert ring_bytes_per_sm(config) == 3 * 6 * (8 * 128 * 2 + 4 * 2176)


_PROBE_SUMS = {"producer_cycles": 1000, "producer_empty_wait": 800, "producer_stages": 10, "consumer_cycles": 4000,
               "consumer_full_wait": 400, "consumer_mma_wait": 600, "consumer_stages": 40, "consumer_drain_wait": 200,
               "consumer_epilogue": 400, "consumer_units": 4}
# The copy roof's probe: the producer rarely waits for a slot, the consumers wait for bytes nearly always.
_ROOF_SUMS = {"producer_cycles": 1000, "producer_empty_wait": 50, "producer_stages": 10, "consumer_cycles": 2000,
              "consumer_full_wait": 1900, "consumer_mma_wait": 0, "consumer_stages": 40, "consumer_drain_wait": 0,
              "consumer_epilogue": 0, "consumer_units": 4}


# One launch's timeline as the probe build's globals hold it: 396 consumers starting over 2 us from t0, ending over
# the last 10 us of a 100 us span, 3500 cycles to their first stage, 170000 cycles (96 us) each at 1.77 GHz.
_T0 = 1_700_000_000_000_000_000
_TIMELINE = {"start_min_not": ~_T0 & (2**64 - 1), "start_max": _T0 + 2000, "end_min_not": ~(_T0 + 90_000) & (2**64 - 1),
             "end_max": _T0 + 100_000, "first_cycles": 396 * 3500, "landed": 396, "busy_cycles": 396 * 170_000,
             "busy_ns": 396 * 96_000, "consumers": 396}


def test_timeline_metrics_undo_the_complemented_minima():
    from benchmarks.waits import timeline_metrics

    t = timeline_metrics(_TIMELINE)
    assert t["span_us"] == pytest.approx(100.0) and t["start_skew_us"] == pytest.approx(2.0)
    assert t["end_skew_us"] == pytest.approx(10.0) and t["busy_us"] == pytest.approx(96.0)
    assert t["clock_ghz"] == pytest.approx(170_000 / 96_000)
    assert t["ramp_us"] == pytest.approx(3500 / (170_000 / 96_000) / 1e3)
    # Consumers without work count in the lifetime but not in the ramp.
    idle = timeline_metrics({**_TIMELINE, "consumers": 792, "busy_ns": 396 * 96_000 * 2, "busy_cycles": 396 * 340_000})
    assert idle["ramp_us"] == pytest.approx(t["ramp_us"]) and idle["busy_us"] == pytest.approx(96.0)


def test_waits_row_sets_the_shipped_build_against_its_copy_roof():
    from benchmarks.waits import LATENCIES_NS, format_row, shares, timeline_metrics

    balance = {"tiles": 1440, "ctas": 396, "max_tiles": 4, "tile_efficiency": 1440 / 1584, "atom_efficiency": 0.9}
    row = {"model": "gpt-oss-20b", "projection": "down", "m": 1, "config": "n128_m8_k128_s6_wg1_c3",
           "shipped_us": 60.0, "probe_us": 62.0, "copy_roof_us": 45.0, "baselines_us": {".baseline/v0": 61.0},
           "bytes_per_s": 2.4e12, "copy_roof_bytes_per_s": 3.2e12, "ring_bytes_per_sm": 1 << 17,
           "little_bytes_per_sm": {ns: 1000.0 * ns for ns in LATENCIES_NS}, "bit_equal": True, "sums": _PROBE_SUMS,
           "copy_roof_sums": _ROOF_SUMS, "copy_roof_waits": shares(_ROOF_SUMS), "balance": balance,
           "timeline": timeline_metrics(_TIMELINE), "same_size_read_us": 48.0, **shares(_PROBE_SUMS)}
    first, probe, roof, spread, line, *sums = format_row(row, 4.0e12).splitlines()
    # The first line is the reading: shipped 60 us = 60 % of the read rate, its roof 45 us = 80 %, 75 % of the roof.
    assert "shipped    60.0 us  2.40 TB/s = 60% of torch.sum's" in first
    assert "copy roof    45.0 us  3.20 TB/s = 80%" in first and "shipped at 75% of its copy roof" in first
    assert "bit-equal True" in first
    assert "probe    62.0 us" in probe and "v0    61.0 us" in probe and "waits on empty  80.0%" in probe
    assert "producer on empty   5.0%" in roof and "consumers on full  95.0%" in roof and "50 cycles/stage" in roof
    assert spread == "  balance: 1440 tiles over 396 CTAs: at most 4 per CTA, avg/max 91% (weight bytes 90%)"
    assert "consumers span 100.0 us, starts spread 2.0 us, first stage lands 2.0 us" in line
    assert "ends spread 10.0 us" in line and "torch.sum over the same bytes 48.0 us: shipped at 80% of it" in line
    assert sums == [f"  sums {_PROBE_SUMS}", f"  copy roof sums {_ROOF_SUMS}"]


def test_ncu_case_prefill_profiles_paths_bench_fp8_has():
    from benchmarks import fp8_paths
    from benchmarks.cli import build_parser
    from benchmarks.ncu_case import PREFILL_PATHS

    assert set(PREFILL_PATHS) <= set(fp8_paths.PREPARE) and "W4A8+quantize" not in PREFILL_PATHS
    args = build_parser().parse_args(["ncu-case", "--prefill", "--m", "1024,4096"])
    assert args.prefill and args.suite == "ncu-case"


def test_ncu_case_prefill_configs_forces_each_config_in_order():
    from benchmarks import fp8_paths
    from benchmarks.ncu_case import PREFILL_PATHS, prefill_paths

    assert list(prefill_paths("")) == list(PREFILL_PATHS)
    forced = prefill_paths("n128_m256_k64_s5_wg2,n128_m256_k128_s5_wg2_fp8")
    assert list(forced) == ["config n128_m256_k64_s5_wg2", "config n128_m256_k128_s5_wg2_fp8"]
    # the family's own path, the config forced: W4A16 for a bf16 name, W4A8 for an _fp8 one
    assert [(prepare.func, prepare.keywords) for prepare in forced.values()] == [
        (fp8_paths.prepare_w4a16, {"config": "n128_m256_k64_s5_wg2"}),
        (fp8_paths.prepare_w4a8, {"config": "n128_m256_k128_s5_wg2_fp8"})]


def test_ncu_case_roofs_follow_each_forced_config():
    from benchmarks import fp8_paths
    from benchmarks.ncu_case import prefill_paths

    paths = prefill_paths("n128_m256_k64_s5_wg2,n128_m256_k128_s5_wg2_fp8", mma_roof=True)
    roofs = ("no decode", "no epilogue", "no decode, no epilogue", "coalesced stores", "paired stores (before)")
    assert list(paths) == [f"config {name}{suffix}" for name in ("n128_m256_k64_s5_wg2", "n128_m256_k128_s5_wg2_fp8")
                           for suffix in ("", *(f" roof ({roof})" for roof in roofs))]
    built = [(prepare.func, prepare.args[0].name, prepare.args[1], prepare.args[2])
             for name, prepare in paths.items() if " roof (" in name]
    assert built == [(fp8_paths._prepare_roof, name, roof, flags) for name in ("n128_m256_k64_s5_wg2",
                                                                               "n128_m256_k128_s5_wg2_fp8")
                     for roof, flags in (("no decode", {"no_decode": True}), ("no epilogue", {"no_epilogue": True}),
                                         ("no decode, no epilogue", {"no_decode": True, "no_epilogue": True}),
                                         ("coalesced stores", {"coalesced_stores": True}),
                                         ("paired stores (before)", {"paired_stores": True}))]


def test_ncu_case_roofs_pick_builds_by_their_flags():
    from benchmarks.ncu_case import prefill_paths

    def roofs(config: str, only: str) -> list[str]:
        return [name.split(" roof (")[1][:-1] for name in prefill_paths(config, mma_roof=True, roofs=only)
                if " roof (" in name]

    assert roofs("n128_m256_k128_s5_wg2_fp8", "no_epilogue,paired_stores") == ["no epilogue", "paired stores (before)"]
    assert roofs("n128_m256_k128_s5_wg2_fp8", "no_decode,no_epilogue") == [
        "no decode", "no epilogue", "no decode, no epilogue"]
    # A swiglu config's candidate: the line stores, only when asked for.
    assert roofs("n128_m256_k64_s5_wg2_swiglu", "swiglu_lines") == ["swiglu line stores (candidate)"]
    assert roofs("n128_m256_k64_s5_wg2_swiglu", "no_epilogue") == []


def test_ncu_case_swiglu_config_is_launched_directly_with_its_candidates():
    from benchmarks import fp8_paths
    from benchmarks.ncu_case import prefill_paths

    name = "n128_m256_k64_s5_wg2_swiglu"
    paths = prefill_paths(name, mma_roof=True)
    candidates = [("swiglu line stores (candidate)", {"swiglu_lines": True})]
    assert list(paths) == [f"config {name}", *(f"config {name} roof ({roof})" for roof, _ in candidates)]
    assert [(p.func, p.args[0].name, p.args[1], p.args[2]) for p in paths.values()] == [
        (fp8_paths._prepare_roof, name, "none (shipped)", {}),
        *((fp8_paths._prepare_roof, name, roof, flags) for roof, flags in candidates)]
    with pytest.raises(KeyError):
        fp8_paths.prepare_roof(name, "no decode")  # a Store roof is not one of a swiglu config's builds


def test_ncu_case_scatter_config_is_launched_directly_with_its_roofs():
    from benchmarks import fp8_paths
    from benchmarks.ncu_case import prefill_paths

    name = "n128_m256_k64_s5_wg2_scatter"  # the layer's down epilogue: rows scattered with routing weights
    paths = prefill_paths(name, mma_roof=True)
    roofs = ["no decode", "no epilogue", "no decode, no epilogue", "paired stores (before)"]  # no coalesced stores
    assert list(paths) == [f"config {name}", *(f"config {name} roof ({roof})" for roof in roofs)]
    assert [(p.func, p.args[0].name, p.args[1]) for p in paths.values()] == [
        (fp8_paths._prepare_roof, name, leaves_out) for leaves_out in ["none (shipped)", *roofs]]


@pytest.mark.parametrize("argv, message", [
    (["--configs", "n128_m256_k64_s5_wg2"], "give it with --prefill"),
    (["--prefill", "--mma-roof"], "give --prefill --configs"),
    (["--prefill", "--configs", "n128_m256_k64_s5_wg2", "--roofs", "no_epilogue"], "give --mma-roof"),
    (["--prefill", "--configs", "n128_m256_k64_s5_wg2,nope"], "config name 'nope' is not of the form"),
    (["--prefill", "--routing", "zipf"], "--prefill profiles uniform routing only"),
])
def test_ncu_case_configs_refused_before_any_weights(argv, message, capsys):
    from benchmarks.cli import build_parser
    from benchmarks.ncu_case import run

    args = build_parser().parse_args(["ncu-case", *argv])
    assert run(args, [1024]) == 2
    assert message in capsys.readouterr().err


def test_routings_follow_the_flag_and_each_suites_default():
    from benchmarks.cli import build_parser
    from benchmarks.problems import routings

    assert build_parser().parse_args(["grouped"]).routing is None  # each suite picks its default
    assert routings(None) == ["uniform", "zipf"]  # grouped, fp8, moe, fallback
    assert routings(None, default="uniform") == ["uniform"]  # ncu-case: one profiled call per case unless asked
    assert routings("zipf", default="uniform") == ["zipf"]
    assert routings("both", default="uniform") == ["uniform", "zipf"]


def test_moe_suite_runs_the_named_models_layer_and_refuses_two():
    from benchmarks import bench_moe

    assert bench_moe.layer_model([]) == "gpt-oss-20b"
    assert bench_moe.layer_model(["gpt-oss-120b"]) == "gpt-oss-120b"
    assert bench_moe.layer_model(["gpt-oss-120b", "gpt-oss-120b"]) == "gpt-oss-120b"
    with pytest.raises(ValueError, match="--model: the moe suite runs one model's layer per call"):
        bench_moe.layer_model(["gpt-oss-20b", "gpt-oss-120b"])
