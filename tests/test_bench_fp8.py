"""The FP8 suite on the CPU: torch's FP8 weights hold the MXFP4 values, the derived columns and tables, the
command line. (The GPU parts run on the device: ``scripts/device_check.sh fp8``.)"""

from __future__ import annotations

import argparse

import torch

import mxfp4
from benchmarks import bench_fp8, cli, fp8_paths, problems
from benchmarks.problems import make_row
from codegen.tune.tables import Shape


def test_torch_fp8_weights_hold_the_mxfp4_values_exactly(seed: int) -> None:
    w = mxfp4.quantize(torch.randn(3, 70, 96) * torch.logspace(-3, 2, 70).view(1, 70, 1))
    dequantized = mxfp4.dequantize(w, torch.bfloat16)
    dequantized[1, 5] = 0  # an all-zero row keeps scale 1
    fp8, scale = fp8_paths.torch_fp8_weights(dequantized)
    assert fp8.dtype == torch.float8_e4m3fn and scale.shape == (3, 70)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round()), "powers of two"
    assert torch.equal(fp8.float() * scale.unsqueeze(-1), dequantized.float()), f"seed {seed}"
    assert float(scale[1, 5]) == 1.0


def test_paths_have_references_and_preparers() -> None:
    assert set(fp8_paths.PATHS) == set(fp8_paths.REFERENCE) == set(fp8_paths.PREPARE)
    assert set(fp8_paths.REFERENCE.values()) <= {"bf16", "fp8"}
    assert fp8_paths.TOLERANCE["fp8"] == 1e-2 and fp8_paths.TOLERANCE["humming fp8"] == 5e-2


def test_annotate_and_tables() -> None:
    row = make_row("gpt-oss-20b", "gate_up", Shape(32, 5760, 2880), "uniform", 1024)
    row.results = {"W4A16": {"graph_us": 300.0, "rel_error": 3e-3}, "W4A8": {"graph_us": 200.0, "rel_error": 2e-3},
                   "torch fp8": {"graph_us": 220.0, "rel_error": 2e-3}, "humming fp8": {"error": "humming unavailable: x"}}
    bench_fp8.annotate([row], read_bw=4.4e12, fp8_peak=1278e12)
    ours = row.results["W4A8"]
    assert ours["vs_w4a16"] == 1.5 and abs(ours["vs_torch_fp8"] - 1.1) < 1e-12
    assert abs(ours["tflops"] - row.flops / 200e-6 / 1e12) < 1e-9
    assert abs(ours["peak_fraction"] - row.flops / 200e-6 / 1278e12) < 1e-12
    table = bench_fp8.format_rows([row])
    assert "x W4A16" in table and "1.50" in table and "1.10" in table and "humming unavailable" in table
    accuracy = [{"model": "gpt-oss-20b", "projection": "down", "E": 32, "N": 2880, "K": 2880, "x": "gaussian", "m": 64,
                 "fp8_vs_bf16": 0.025, "fp8_vs_float64": 0.026, "bf16_vs_float64": 0.003, "rerounded_blocks": 2,
                 "total_blocks": 8000}]
    text = bench_fp8.format_accuracy(accuracy)
    assert "2.50e-02" in text and "2 / 8000 (0.0250%)" in text


def test_cli_knows_the_fp8_suite() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["fp8"])
    assert args.suite == "fp8" and cli.m_values_for(args) == list(problems.FP8_M_VALUES) == [1, 16, 256, 1024, 4096]
    assert cli.m_values_for(parser.parse_args(["fp8", "--quick"])) == list(problems.FP8_QUICK_M_VALUES)
    assert cli.m_values_for(parser.parse_args(["fp8", "--m", "64"])) == [64]
    assert isinstance(args, argparse.Namespace) and "fp8" in cli.EPILOG


def cpu_operands(row: problems.Row, weights: fp8_paths.Weights) -> fp8_paths.Operands:
    """``bench_fp8.operands`` on the CPU: x and its e4m3 form with row scales made once; one weight copy."""
    x = torch.randn(row.tokens, row.shape.k).bfloat16()
    x_fp8, x_scale = mxfp4.quantize_activations(x)
    offsets = torch.tensor(problems.offsets_from_loads(row.loads), dtype=torch.int32)
    return fp8_paths.Operands(weights, x, x_fp8, x_scale, offsets, row.nbytes, l2_bytes=0, budget=0)


def test_every_path_of_ours_gives_a_checked_timed_row_on_the_cpu(monkeypatch, seed: int) -> None:
    """A row of ``bench fp8`` on the portable path (timing stubbed): W4A16, pre-quantized W4A8, W4A8 with its
    quantizer and torch bf16 each pass the float64 check and are timed; W4A8 times only the GEMM on the x_fp8 and
    x_scale made outside the timed call, W4A8+quantize the quantizer too."""
    from benchmarks import bench_grouped_mm, measure

    paths, timed = {}, {}  # a prepared call -> its path; a path -> the argument sets it was timed on

    def tagged(path: str):
        def prepare(o: fp8_paths.Operands):
            prepared = real[path](o)
            paths[prepared.fn] = path
            return prepared
        return prepare

    def time_all(fn, arg_sets, **options):
        timed[paths[fn]] = arg_sets
        return {"graph_us": 1.0}

    monkeypatch.setattr(measure, "time_all", time_all)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # torch bf16's layout probe syncs
    monkeypatch.setattr(measure, "healthy", lambda: True)  # no CUDA context to lose: a failed path is its row's error
    settings = bench_grouped_mm.Settings(seed=seed % 1000)
    settings.skip.update({"torch fp8": "skipped: CUDA only", "humming fp8": "skipped: CUDA only"})
    row = make_row("test", "gate_up", Shape(4, 200, 160), "uniform", 5)
    weights = bench_fp8.build_weights(row.shape, settings, device="cpu")
    ops = cpu_operands(row, weights)
    real = fp8_paths.PREPARE.copy()
    for path in fp8_paths.PATHS:
        monkeypatch.setitem(fp8_paths.PREPARE, path, tagged(path))
    bench_fp8.run_paths(row, ops, settings, save=lambda partial=False: None)
    for path in ("W4A16", "W4A8", "W4A8+quantize", "torch bf16"):
        result = row.results[path]
        assert "error" not in result and result["graph_us"] == 1.0, (path, result)
        assert result["rel_error"] <= fp8_paths.TOLERANCE[fp8_paths.REFERENCE[path]], (path, result, seed)
    assert row.results["torch fp8"] == {"error": "skipped: CUDA only"}
    (x, _, x_scale), = timed["W4A8"]
    assert x is ops.x_fp8 and x_scale is ops.x_scale, "W4A8 is timed on x quantized once, outside the call"
    (x, _), = timed["W4A8+quantize"]
    assert x is ops.x, "W4A8+quantize is timed from bf16 x"
    assert row.results["W4A8"]["note"].startswith("path:      portable: device is cpu; config:")
    assert row.results["W4A8+quantize"]["note"].startswith("quantize_activations + W4A8; path:      portable")
    bench_fp8.annotate([row], read_bw=1e12, fp8_peak=1e15)
    table = bench_fp8.format_rows([row])
    (w4a8,) = [line.split() for line in table.splitlines() if line.split()[4:5] == ["W4A8"]]  # "test gate_up" is 2 words
    assert w4a8[6] == "1.0", table  # its graph time: a measured row, not an error
