"""GPU: device-event timing and tiny real sweeps (2 configs, M=8; uniform, and both routings) on an SM90 GPU."""

from __future__ import annotations

import json

import pytest
import torch

from codegen.tune import sweep, timing
from codegen.tune import tables as tuning
from codegen.tune.selection import heuristic_config
from codegen.tune.tables import Shape
from mxfp4.ops.dispatch import is_sm90

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not is_sm90(), reason="needs an SM90 (Hopper) GPU"),
]

# The sweep always measures the heuristic default too, so it is one of the two.
CONFIGS = [heuristic_config(8), heuristic_config(16)]


def test_time_cuda_rotates_and_reports_percentiles():
    sets = [(torch.randn(1 << 20, device="cuda"),) for _ in range(timing.rotation_sets(4 << 20, l2_bytes=timing.l2_cache_bytes()))]
    assert len(sets) * (4 << 20) > 2 * timing.l2_cache_bytes()
    seen = []
    result = timing.time_cuda(lambda a: seen.append(a.data_ptr()) or a.sum(), rotate=sets, warmup_ms=5, rep=40)
    assert len(result.samples) == 40
    assert 0 < result.p10_us <= result.median_us <= result.p90_us < 10_000
    assert len(set(seen)) == len(sets)  # every set was used
    # Back-to-back calls (run-ahead): a ~4 MB sum takes microseconds, not a launch's host overhead.
    assert result.median_us < 200


def test_machine_rates_are_plausible():
    bandwidth = timing.measure_hbm_read_bandwidth(512 << 20, rep=10)
    assert 0.3e12 < bandwidth.value < 6e12, bandwidth
    peak = timing.measure_bf16_peak(4096, rep=10)
    assert 50e12 < peak.value < 2000e12, peak


def test_tiny_sweep_writes_a_table_that_lookup_returns(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.TUNING_DIR_ENV, str(tmp_path))
    tuning.clear_cache()
    measure = sweep.GpuMeasurer(rep=10, warmup_ms=2.0)
    out = tuning.default_table_path(measure.device_name)
    shape = Shape(2, 128, 128)
    table = sweep.run_sweep([shape], [8], CONFIGS, out_path=out, jobs=2, measure=measure,
                             device_name=measure.device_name, plot=False)
    records = [json.loads(line) for line in sweep.progress_log_path(out).read_text().splitlines()]
    assert {r["config"] for r in records} == {c.name for c in CONFIGS}, records
    assert all(r["status"] == "ok" for r in records), records
    assert all(r["rel_error"] <= 1e-2 for r in records)
    entry = table["entries"][shape.key]["8"]
    assert entry["config"] in {c.name for c in CONFIGS} and entry["median_us"] > 0
    assert entry["default_config"] == heuristic_config(8).name and entry["default_us"] > 0
    assert tuning.read_table(out) == table
    found = tuning.lookup(measure.device_name, 2, 128, 128, 8)
    assert found is not None
    config, reason = found
    assert config.name == entry["config"] and "M-bucket 8" in reason and str(out) in reason
    tuning.clear_cache()


def test_tiny_sweep_under_both_routings(tmp_path, monkeypatch):
    """Every config checked and timed under uniform and Zipf loads of the same rows (E=32: the hottest expert
    gets 64 of the 256 rows, the coldest 2), and the entry records both."""
    from codegen.tune.loads import row_loads

    monkeypatch.setenv(tuning.TUNING_DIR_ENV, str(tmp_path))
    tuning.clear_cache()
    measure = sweep.GpuMeasurer(rep=10, warmup_ms=2.0)
    out = tuning.default_table_path(measure.device_name)  # where lookup reads the device's table
    shape = Shape(32, 128, 128)
    table = sweep.run_sweep([shape], [8], CONFIGS, out_path=out, jobs=2, measure=measure, routings=("uniform", "zipf"),
                            device_name=measure.device_name, plot=False)
    records = [json.loads(line) for line in sweep.progress_log_path(out).read_text().splitlines()]
    assert {(r["config"], r["routing"]) for r in records} == {(c.name, r) for c in CONFIGS for r in ("uniform", "zipf")}
    assert all(r["status"] == "ok" and r["rel_error"] <= 1e-2 for r in records), records
    assert max(row_loads("zipf", 32, 8)) == 64 and min(row_loads("zipf", 32, 8)) == 2
    entry = table["entries"][shape.key]["8"]
    assert set(entry["routings"]) == {"uniform", "zipf"} and entry["worst_ratio"] >= 1.0
    assert all(times["us"] > 0 and times["best_us"] <= times["us"] for times in entry["routings"].values())
    assert tuning.lookup(measure.device_name, 32, 128, 128, 8)[1].count("its best") == 2
    tuning.clear_cache()
