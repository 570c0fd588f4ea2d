"""Autotuning on the CPU: search space, M buckets, tables + lookup, the sweep with injected steps, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types

import pytest
import torch

import mxfp4
from codegen.build.config import DEFAULT_CONFIGS, TileConfig
from codegen.cli import tune as tune_cli
from codegen.tune import space, sweep, timing
from codegen.tune import tables as tuning
from codegen.tune.selection import configs_in_use, heuristic_config, select_config
from codegen.tune.measure import Runner
from codegen.tune.sweep import Measurement
from codegen.tune.space import SearchSpace
from codegen.tune.tables import Shape

H100 = "NVIDIA H100 80GB HBM3"


def _run_op(config, x, packed, offsets, x_scale=None):
    """The kernel step of a dry run: ``mxfp4.grouped_mm`` on the CPU (the portable path) with the config named."""
    if x_scale is None:
        return mxfp4.grouped_mm(x, packed, offsets, config=config)
    return mxfp4.grouped_mm(x, packed, offsets, config=config, x_scale=x_scale)


CPU_RUNNER = Runner(run=_run_op, quantize=lambda x: mxfp4.quantize_activations(x))


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """Separate user and shipped tuning dirs under tmp_path; the lookup cache cleared around the test."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    monkeypatch.setenv(tuning.TUNING_DIR_ENV, str(user))
    monkeypatch.setattr(tuning, "shipped_tuning_dir", lambda: shipped)
    tuning.clear_cache()
    yield user, shipped
    tuning.clear_cache()


# ---------------------------------------------------------------------------------------------
# search space


def test_default_space_is_valid_unique_and_sized():
    configs = space.enumerate_configs()
    names = [c.name for c in configs]
    assert len(names) == len(set(names))
    for config in configs:
        config.validate()
        assert TileConfig.from_name(config.name) == config
    assert 50 <= len(configs) <= 350, len(configs)
    bf16_defaults = {c for c in DEFAULT_CONFIGS if c.activations == "bf16"}
    assert bf16_defaults <= set(configs) and all(c.activations == "bf16" for c in configs)  # include_defaults


def test_fp8_space_is_the_w4a8_family():
    configs = space.enumerate_configs(SearchSpace(activations="fp8"))
    assert 20 <= len(configs) <= 400, len(configs)
    assert all(c.activations == "fp8" and c.tile_k % 128 == 0 and c.name.endswith("_fp8") for c in configs)
    assert {c for c in DEFAULT_CONFIGS if c.activations == "fp8"} <= set(configs)
    quick = space.enumerate_configs(dataclasses.replace(SearchSpace.quick(), activations="fp8"))
    assert quick and all(c.activations == "fp8" for c in quick)


def test_space_pruning_keeps_the_deepest_stages():
    configs = space.enumerate_configs(SearchSpace(include_defaults=False))
    by_tile: dict[tuple, list[int]] = {}
    for c in configs:  # the stages in flight on an SM (all its CTAs) move at least min_stage_bytes
        assert (c.x_stage_bytes + c.w_stage_bytes) * c.ctas_per_sm >= SearchSpace().min_stage_bytes
        family = (c.tile_n, c.tile_m, c.tile_k, c.warpgroups, c.ctas_per_sm, c.producer, c.stream_k, c.fragment_buffers,
                  c.pingpong)
        by_tile.setdefault(family, []).append(c.stages)
    for (n, m, k, wg, ctas, producer, stream_k, buffers, pingpong), stages in by_tile.items():
        assert len(stages) <= 2
        deepest = max(stages)
        if deepest < 10:  # the next deeper one does not fit
            with pytest.raises(ValueError):
                TileConfig(n, m, k, deepest + 1, wg, ctas, producer=producer, stream_k=stream_k,
                           fragment_buffers=buffers, pingpong=pingpong).validate()


def test_narrow_wgmma_variants_join_the_space_when_asked():
    base = SearchSpace(tile_n=(128,), tile_m=(16, 64), warpgroups=(1,), ctas_per_sm=(2, 3), include_defaults=False)
    plain = space.enumerate_configs(base)
    both = space.enumerate_configs(dataclasses.replace(base, mma_rows_splits=(1, 2, 4)))
    assert all(config.mma_rows == 0 for config in plain)
    narrow = [config for config in both if config.mma_rows]
    assert {dataclasses.replace(config, mma_rows=0) for config in narrow} <= set(plain)
    assert {(config.tile_m, config.mma_rows) for config in narrow} == {(16, 8), (64, 32), (64, 16)}
    assert [config for config in both if not config.mma_rows] == plain
    assert all(not config.stream_k for config in narrow)  # validate() refuses narrow WGMMAs with stream-K


def test_space_can_be_narrowed_and_widened():
    narrow = space.enumerate_configs(SearchSpace(tile_n=(128,), tile_m=(16, 32), warpgroups=(2,), include_defaults=False))
    assert narrow and all(c.tile_n == 128 and c.tile_m in (16, 32) and c.warpgroups == 2 for c in narrow)
    full = space.enumerate_configs(SearchSpace.full())
    assert len(full) > len(space.enumerate_configs())
    quick = space.enumerate_configs(SearchSpace.quick())
    # tile_n 64/128/256 x wg 1/2/4 x 1, 3, 4 or 5 CTAs, the decode families on light CTAs, ping-pong at tile_m >= 64
    bf16_defaults = {c for c in DEFAULT_CONFIGS if c.activations == "bf16"}
    assert 6 <= len(quick) <= 150 and bf16_defaults <= set(quick)
    assert len(quick) < len(space.enumerate_configs())


def test_space_prunes_the_families_to_light_decode_ctas():
    configs = space.enumerate_configs(SearchSpace(include_defaults=False))
    assert any(c.producer == "warp" for c in configs) and any(c.stream_k for c in configs)
    for c in configs:
        if c.producer == "warp" or c.stream_k:
            assert c.ctas_per_sm > 1 and c.warpgroups == 1, c.name
        if c.stream_k:
            assert c.tile_m <= 16, c.name
        if c.pingpong:  # prefill tiles on one CTA per SM
            assert c.tile_m >= 64 and c.ctas_per_sm == 1 and c.warpgroups == 2 and c.producer == "warpgroup", c.name
    assert any(c.pingpong for c in configs)
    full = space.enumerate_configs(SearchSpace.full())
    assert any(c.stream_k and c.ctas_per_sm == 1 for c in full)


def test_space_tries_three_fragment_buffers_on_fat_ctas_from_m64():
    """A third register buffer of decoded weights where the WGMMAs are long (tile_m >= 64, one CTA per SM, 2+
    consumer warpgroups), for both families; each is the twin of a two-buffer config the space holds too."""
    for activations in ("bf16", "fp8"):
        configs = space.enumerate_configs(SearchSpace(activations=activations))
        deep = [c for c in configs if c.fragment_buffers == 3]
        assert deep and {64, 128, 256} <= {c.tile_m for c in deep}, activations
        names = {c.name for c in configs}
        for c in deep:
            assert c.tile_m >= 64 and c.ctas_per_sm == 1 and c.warpgroups >= 2 and not c.stream_k, c.name
            assert c.tile_k >= 128 and c.name.replace("_f3", "") in names, c.name
    assert not [c for c in space.enumerate_configs(SearchSpace(fragment_buffers=(2,))) if c.fragment_buffers == 3]
    full = space.enumerate_configs(SearchSpace.full())
    assert any(c.fragment_buffers == 3 and c.tile_m < 64 for c in full)  # no pruning there


def test_default_space_reads_the_config_limits():
    """The sweep's defaults are a subset of what validate() allows, computed from codegen.build.config."""
    from codegen.build.config import (
        MAX_ATOMS_PER_WARPGROUP,
        MAX_TILE_K,
        MIN_STAGES,
        TILE_M_RANGE,
        WARPGROUP_CHOICES,
    )

    default = SearchSpace()
    assert set(default.warpgroups) <= set(WARPGROUP_CHOICES) and default.warpgroups == (1, 2, 4)
    assert all(TILE_M_RANGE[0] <= m <= TILE_M_RANGE[1] for m in default.tile_m)
    assert default.tile_m == (8, 16, 32, 64, 128, 192, 256)
    assert max(default.tile_k) <= MAX_TILE_K and default.tile_k == (64, 128, 256)
    assert default.tile_n == tuple(64 * a for a in range(1, MAX_ATOMS_PER_WARPGROUP + 1))
    assert min(default.stages) == MIN_STAGES and default.stages == tuple(range(2, 11))


def test_configs_for_m_window():
    configs = space.enumerate_configs()
    for m in (1, 4, 16, 64, 256, 1024, 4096):
        low, high = space.tile_m_window(m)
        chosen = space.configs_for_m(configs, m)
        assert chosen and all(low <= c.tile_m <= high for c in chosen)
    assert {c.tile_m for c in space.configs_for_m(configs, 1)} <= {8, 16}
    assert min(c.tile_m for c in space.configs_for_m(configs, 4096)) >= 64
    # Nothing in the window: the nearest tile_m instead of nothing.
    only_big = [c for c in configs if c.tile_m == 256]
    assert space.configs_for_m(only_big, 1) == only_big


# ---------------------------------------------------------------------------------------------
# buckets


@pytest.mark.parametrize(
    ("tokens", "bucket"),
    [(0, 1), (1, 1), (2, 2), (3, 4), (5, 8), (16, 16), (17, 32), (1.5, 2), (4095, 4096), (4096, 4096), (10**6, 4096)],
)
def test_m_bucket(tokens, bucket):
    assert tuning.m_bucket(tokens) == bucket


def test_m_buckets_are_powers_of_two():
    assert tuning.M_BUCKETS[0] == 1 and tuning.M_BUCKETS[-1] == 4096
    assert all(tuning.m_bucket(b) == b for b in tuning.M_BUCKETS)


def test_nearest_bucket():
    assert tuning.nearest_bucket(16, [1, 64]) == 64  # log2 distance 4 vs 2
    assert tuning.nearest_bucket(16, [8, 32]) == 32  # a tie goes to the larger
    assert tuning.nearest_bucket(16, []) is None


def test_gpu_slug_and_family():
    assert tuning.gpu_slug(H100) == "h100-80gb-hbm3"
    assert tuning.gpu_family(H100) == "h100"
    assert tuning.gpu_slug("NVIDIA H100 PCIe") == "h100-pcie"


# ---------------------------------------------------------------------------------------------
# tables and lookup


def _table(gpu: str, entries: dict) -> dict:
    table = tuning.new_table(gpu)
    table["entries"] = entries
    return table


def _entry(config: str, us: float) -> dict:
    return {"config": config, "median_us": us, "tflops": 1.0, "gbps": 1.0, "default_config": config, "default_us": us}


def test_write_read_roundtrip(tables, tmp_path):
    path = tmp_path / "t.json"
    table = _table(H100, {"32,5760,2880": {"16": _entry("n128_m16_k256_s7_wg2", 97.1), "1": _entry("n128_m8_k256_s8_wg1", 50.0)}})
    tuning.write_table(path, table)
    back = tuning.read_table(path)
    assert back["format"] == 1 and back["gpu"] == H100 and back["sm"] == "9.0"
    assert list(back["entries"]["32,5760,2880"]) == ["1", "16"]  # sorted by bucket
    assert back["entries"]["32,5760,2880"]["16"]["config"] == "n128_m16_k256_s7_wg2"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tuning.read_table(path)
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format-1"):
        tuning.read_table(path)


def test_lookup_exact_and_nearest(tables):
    user, shipped = tables
    tuning.write_table(shipped / "h100.json", _table(H100, {"32,5760,2880": {"16": _entry("n128_m16_k256_s7_wg2", 97.1)}}))
    config, reason = tuning.lookup(H100, 32, 5760, 2880, 13)
    assert config == TileConfig.from_name("n128_m16_k256_s7_wg2")
    assert reason == f"tuning table {shipped / 'h100.json'}: E=32 N=5760 K=2880 M-bucket 16 (measured 97.1 us)"
    config, reason = tuning.lookup(H100, 32, 5760, 2880, 100)  # bucket 128: only 16 is tuned
    assert config.name == "n128_m16_k256_s7_wg2"
    assert "M-bucket 128 not tuned, nearest tuned bucket 16" in reason
    assert tuning.lookup(H100, 32, 2880, 2880, 16) is None  # another shape
    assert tuning.lookup("NVIDIA A100-SXM4-80GB", 32, 5760, 2880, 16) is None  # another GPU


def test_a_hopper_part_without_a_table_uses_the_nearest_parts(tables):
    user, shipped = tables
    tuning.write_table(shipped / "h100.json", _table(H100, {"32,5760,2880": {"16": _entry("n128_m16_k256_s7_wg2", 97.1)}}))
    config, reason = tuning.lookup("NVIDIA H800", 32, 5760, 2880, 16)
    assert config.name == "n128_m16_k256_s7_wg2"
    assert "h100.json (nearest part: no table for NVIDIA H800)" in reason
    tuning.write_table(user / "h800.json", _table("NVIDIA H800", {"32,5760,2880": {"16": _entry("n128_m32_k256_s5_wg2", 90.0)}}))
    config, reason = tuning.lookup("NVIDIA H800", 32, 5760, 2880, 16)  # a table of its own: no fallback
    assert config.name == "n128_m32_k256_s5_wg2" and "nearest part" not in reason
    assert tuning.lookup("NVIDIA H800", 32, 2880, 2880, 16) is None  # its own table lacks the shape
    assert tuning.nearest_part_table("NVIDIA A100-SXM4-80GB") is None


def test_shipped_tables_are_named_relative_to_the_repository():
    from codegen.build.paths import GENERATED_DIR

    assert tuning.shipped_tuning_dir() == GENERATED_DIR / "tuning"
    assert tuning._display_path(GENERATED_DIR / "tuning" / "h100.json") == "generated/tuning/h100.json"


def test_user_table_overrides_shipped(tables):
    user, shipped = tables
    tuning.write_table(shipped / "h100-80gb-hbm3.json", _table(H100, {
        "32,5760,2880": {"16": _entry("n128_m16_k256_s7_wg2", 97.1), "4096": _entry("n128_m256_k64_s5_wg2", 7000.0)}}))
    tuning.write_table(user / "h100-80gb-hbm3.json", _table(H100, {
        "32,5760,2880": {"16": _entry("n128_m32_k256_s5_wg2", 90.0)}}))
    config, reason = tuning.lookup(H100, 32, 5760, 2880, 16)
    assert config.name == "n128_m32_k256_s5_wg2" and str(user) in reason
    # An exact bucket of the shipped table beats a nearest bucket of the user's.
    config, reason = tuning.lookup(H100, 32, 5760, 2880, 4096)
    assert config.name == "n128_m256_k64_s5_wg2" and str(shipped) in reason and "not tuned" not in reason
    # And the selection layer uses it.
    selection = select_config(32, 5760, 2880, 16, device_name=H100)
    assert selection.config.name == "n128_m32_k256_s5_wg2" and "tuning table" in selection.reason


def test_lookup_is_cached_and_tolerates_bad_files(tables):
    user, shipped = tables
    path = tuning.write_table(user / "h100.json", _table(H100, {"8,256,256": {"4": _entry("n128_m8_k256_s8_wg1", 5.0)}}))
    assert tuning.lookup(H100, 8, 256, 256, 4)[0].name == "n128_m8_k256_s8_wg1"
    path.unlink()
    assert tuning.lookup(H100, 8, 256, 256, 4) is not None  # cached: no file access per call
    tuning.clear_cache()
    assert tuning.lookup(H100, 8, 256, 256, 4) is None
    (user / "h100.json").write_text("{broken")
    tuning.clear_cache()
    with pytest.warns(RuntimeWarning, match="ignoring tuning table"):
        assert tuning.lookup(H100, 8, 256, 256, 4) is None
    # An entry naming an invalid config is skipped, not raised.
    tuning.write_table(user / "h100.json", _table(H100, {"8,256,256": {"4": _entry("n64_m8_k64_s99_wg2", 5.0)}}))
    assert tuning.lookup(H100, 8, 256, 256, 4) is None


# ---------------------------------------------------------------------------------------------
# the sweep, with injected compile and measure steps

SHAPE = Shape(2, 128, 128)
A = heuristic_config(8)  # the heuristic default at M <= 8
B = heuristic_config(16)
C = heuristic_config(32)


def fake_compile(bad: tuple[str, ...] = (), serialized: tuple[str, ...] = ()):
    def compiled(config):
        if config.name in bad:
            return RuntimeError(f"NVRTC could not compile {config.name}")
        note = ("ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized "
                "due to insufficient register resources")
        notes = (note,) if config.name in serialized else ()
        return types.SimpleNamespace(ptxas_notes=notes)

    return lambda configs, jobs=None, progress=True: [compiled(c) for c in configs]


class FakeMeasure:
    """Times (per M) from a dict by config name, ``zipf``: another dict for the Zipf routing; optional wrong
    results (by name, or (name, routing)), launch errors and an interruption. ``calls``: (shape, M, name, routing)."""

    def __init__(self, times, *, zipf=None, wrong=(), raises=(), interrupt_after=None, healthy=True):
        self.times = {"uniform": times, "zipf": zipf or {}}
        self.wrong, self.raises = set(wrong), set(raises)
        self.interrupt_after, self._healthy = interrupt_after, healthy
        self.calls: list[tuple] = []

    def __call__(self, shape, m, config, routing="uniform"):
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((shape, m, config.name, routing))
        if config.name in self.raises:
            raise RuntimeError(f"cuLaunchKernel({config.name}) failed: CUDA_ERROR_INVALID_VALUE")
        rel = 0.5 if {config.name, (config.name, routing)} & self.wrong else 3e-3
        return Measurement(median_us=self.times[routing][config.name] * m, p10_us=1.0, p90_us=2.0, rel_error=rel, reps=10)

    def healthy(self):
        return self._healthy


def run_fake_sweep(tmp_path, measure, **kwargs):
    kwargs.setdefault("compile_fn", fake_compile())
    return sweep.run_sweep(
        [SHAPE], kwargs.pop("m_values", [1, 8]), kwargs.pop("configs", [A, B, C]), out_path=tmp_path / "gpu.json",
        measure=measure, device_name=H100, progress=False, plot=False, **kwargs,
    )


def read_log(tmp_path):
    return [json.loads(line) for line in sweep.progress_log_path(tmp_path / "gpu.json").read_text().splitlines()]


def test_sweep_writes_the_best_valid_config_with_the_default(tmp_path, capsys):
    measure = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0})
    table = run_fake_sweep(tmp_path, measure)
    assert len(measure.calls) == 6  # 2 M values x 3 configs
    assert measure.calls[0][2] == heuristic_config(1).name  # the default is measured first
    entry = table["entries"]["2,128,128"]["8"]
    assert entry["config"] == B.name and entry["median_us"] == pytest.approx(160.0) and entry["m"] == 8
    assert entry["default_config"] == A.name and entry["default_us"] == pytest.approx(240.0)
    assert entry["tflops"] > 0 and entry["gbps"] > 0
    assert tuning.read_table(tmp_path / "gpu.json") == table
    out = capsys.readouterr().out
    assert "best config" in out and B.name in out and "1.50x" in out  # the summary table


def test_sweep_keeps_the_default_unless_the_winner_beats_it_by_the_margin(tmp_path):
    from codegen.tune.report import DEFAULT_MARGIN

    measure = FakeMeasure({A.name: 30.0, B.name: 30.0 / (DEFAULT_MARGIN - 0.005), C.name: 31.0})
    table = run_fake_sweep(tmp_path, measure)
    entry = table["entries"]["2,128,128"]["8"]  # B is faster, but by less than the margin: noise
    assert entry["config"] == A.name == entry["default_config"] and entry["median_us"] == entry["default_us"]
    measure = FakeMeasure({A.name: 30.0, B.name: 30.0 / (DEFAULT_MARGIN + 0.005), C.name: 31.0})
    table = run_fake_sweep(tmp_path / "again", measure)
    assert table["entries"]["2,128,128"]["8"]["config"] == B.name


def test_sweep_resumes_after_an_interruption(tmp_path):
    first = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0}, interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_fake_sweep(tmp_path, first)
    assert len(first.calls) == 2 and len(read_log(tmp_path)) == 2
    second = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0})
    table = run_fake_sweep(tmp_path, second)
    assert len(second.calls) == 4
    assert not set(first.calls) & set(second.calls)  # the two measured ones are not measured again
    assert table["entries"]["2,128,128"]["1"]["config"] == B.name
    # --no-resume measures everything again (the old log is kept aside).
    third = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0})
    run_fake_sweep(tmp_path, third, resume=False)
    assert len(third.calls) == 6
    assert sweep.progress_log_path(tmp_path / "gpu.json").with_suffix(".jsonl.old").exists()


def test_sweep_records_and_skips_failing_configs(tmp_path):
    measure = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0}, raises=(C.name,))
    table = run_fake_sweep(tmp_path, measure, compile_fn=fake_compile(bad=(B.name,)))
    assert not any(call[2] == B.name for call in measure.calls)  # never measured: it did not compile
    log = read_log(tmp_path)
    compile_errors = [r for r in log if r["status"] == "compile_error"]
    assert [r["config"] for r in compile_errors] == [B.name] and "NVRTC" in compile_errors[0]["error"]
    launch_errors = [r for r in log if r["status"] == "error"]
    assert {r["m"] for r in launch_errors} == {1, 8} and all("cuLaunchKernel" in r["error"] for r in launch_errors)
    assert table["entries"]["2,128,128"]["1"]["config"] == A.name  # the only one left
    # A resumed sweep does not measure the failed launches again, but retries the compile.
    again = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0})
    run_fake_sweep(tmp_path, again)
    assert sorted(call[2] for call in again.calls) == [B.name, B.name]


def test_sweep_skips_a_config_whose_wgmmas_ptxas_serialized(tmp_path, capsys):
    measure = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0})
    table = run_fake_sweep(tmp_path, measure, compile_fn=fake_compile(serialized=(B.name,)))
    assert not any(call[2] == B.name for call in measure.calls)  # the fastest, but never measured
    skipped = [r for r in read_log(tmp_path) if r["status"] == "compile_error"]
    assert [r["config"] for r in skipped] == [B.name] and "serialized the WGMMAs" in skipped[0]["error"]
    assert table["entries"]["2,128,128"]["1"]["config"] == C.name  # the fastest of the others
    assert "had their WGMMAs serialized" in capsys.readouterr().err


def test_sweep_progress_calls_a_serialized_config_skipped_and_a_broken_one_failed(tmp_path, capsys):
    # A WGMMA-serialized kernel compiled fine: its progress lines must not read like a compile failure.
    measure = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0})
    sweep.run_sweep(
        [SHAPE], [8], [A, B, C], out_path=tmp_path / "gpu.json", measure=measure, device_name=H100, progress=True,
        plot=False, compile_fn=fake_compile(bad=(C.name,), serialized=(B.name,)),
    )
    lines = capsys.readouterr().err.splitlines()
    (b_line,) = [line for line in lines if f"M=8 {B.name} " in line]
    (c_line,) = [line for line in lines if f"M=8 {C.name} " in line]
    assert "skipped (ptxas serialized its WGMMAs)" in b_line and "FAILED" not in b_line
    assert "FAILED compile error" in c_line


def test_sweep_discards_a_fast_wrong_config(tmp_path, capsys):
    measure = FakeMeasure({A.name: 30.0, B.name: 1.0, C.name: 25.0}, wrong=(B.name,))
    table = run_fake_sweep(tmp_path, measure)
    assert table["entries"]["2,128,128"]["8"]["config"] == C.name
    wrong = [r for r in read_log(tmp_path) if r["status"] == "wrong"]
    assert {r["config"] for r in wrong} == {B.name} and all(r["rel_error"] == 0.5 for r in wrong)
    assert "wrong result" in capsys.readouterr().err


def test_sweep_stops_when_the_gpu_context_is_lost(tmp_path):
    measure = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0}, raises=(B.name,), healthy=False)
    with pytest.raises(sweep.GpuContextLost):
        run_fake_sweep(tmp_path, measure)
    log = read_log(tmp_path)
    assert log[-1]["config"] == B.name and log[-1]["status"] == "error"  # recorded before stopping
    again = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0})
    run_fake_sweep(tmp_path, again)
    assert (SHAPE, 1, B.name, "uniform") not in again.calls


def test_sweep_adds_the_default_and_merges_into_an_existing_table(tmp_path):
    path = tmp_path / "gpu.json"
    tuning.write_table(path, _table(H100, {"4,64,64": {"2": _entry(A.name, 1.0)}}))
    measure = FakeMeasure({A.name: 30.0, C.name: 25.0})
    table = run_fake_sweep(tmp_path, measure, configs=[C], m_values=[4])
    assert {call[2] for call in measure.calls} == {A.name, C.name}  # the heuristic default was added
    assert table["entries"]["4,64,64"]["2"]["config"] == A.name  # the earlier shape is kept
    assert table["entries"]["2,128,128"]["4"]["default_config"] == A.name


def test_sweep_m_filter(tmp_path):
    measure = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0})
    run_fake_sweep(tmp_path, measure, m_values=[1], m_filter=lambda configs, m: [c for c in configs if c.tile_m <= 16])
    assert {call[2] for call in measure.calls} == {A.name, B.name}


def test_plan_puts_the_default_first_and_skips_what_the_log_holds(tmp_path):
    plan = sweep.plan_sweep([SHAPE, SHAPE], [8, 1, 8], [C, B], m_filter=None)
    assert plan.shapes == [SHAPE] and plan.m_values == [1, 8]
    # Per M the heuristic default (A at M <= 8) comes first, then the candidates in order.
    assert plan.items == [sweep.Item(SHAPE, m, c) for m in (1, 8) for c in (A, C, B)]
    assert all(item.routing == "uniform" for item in plan.items) and plan.routings == ("uniform",)
    assert plan.configs == [A, C, B]
    log = sweep._Log(tmp_path / "log.jsonl", resume=True)
    log.append({**sweep._base_record(H100, plan.items[0]), "status": "ok", "median_us": 3.0})
    log.append({**sweep._base_record("other GPU", plan.items[1]), "status": "ok", "median_us": 3.0})
    assert plan.remaining(log, H100) == plan.items[1:]
    with pytest.raises(ValueError, match="at least one shape"):
        sweep.plan_sweep([], [1], [A])
    with pytest.raises(ValueError, match=">= 1"):
        sweep.plan_sweep([SHAPE], [0], [A])


def test_best_so_far_starts_from_the_log(tmp_path):
    log = sweep._Log(tmp_path / "log.jsonl", resume=True)
    log.append({**sweep._base_record(H100, sweep.Item(SHAPE, 8, A)), "status": "ok", "median_us": 5.0})
    log.append({**sweep._base_record(H100, sweep.Item(SHAPE, 8, B)), "status": "wrong", "median_us": 1.0})
    best = sweep._BestSoFar.from_log(log, H100)
    assert best.offer(SHAPE, 8, 7.0, C.name) == (5.0, A.name)
    assert best.offer(SHAPE, 8, 4.0, C.name) == (4.0, C.name)
    assert best.offer(SHAPE, 1, 9.0, B.name) == (9.0, B.name)


def test_watchdog_records_a_hang_and_exits_for_a_restart(tmp_path, monkeypatch):
    import time as time_module

    exits = []
    monkeypatch.setattr(sweep.os, "_exit", lambda code: exits.append(code))

    class Slow(FakeMeasure):
        def __call__(self, shape, m, config, routing="uniform"):
            if config.name == B.name:
                time_module.sleep(0.6)
            return super().__call__(shape, m, config, routing)

    run_fake_sweep(tmp_path, Slow({A.name: 30.0, B.name: 20.0, C.name: 25.0}), m_values=[8], watchdog_s=0.2)
    hung = [r for r in read_log(tmp_path) if "no result after" in r.get("error", "")]
    assert [r["config"] for r in hung] == [B.name] and exits == [sweep.EXIT_RESTART]
    # A quick or failing measurement cancels its watchdog.
    exits.clear()
    run_fake_sweep(tmp_path, FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 25.0}, raises=(C.name,)),
                   m_values=[4], watchdog_s=0.3)
    time_module.sleep(0.5)
    assert exits == []


def test_classify_marks_nan_and_missing_checks_wrong():
    assert sweep._classify(Measurement(median_us=5.0, rel_error=float("nan")), SHAPE, 1, 1e-2)["status"] == "wrong"
    assert sweep._classify(Measurement(median_us=5.0, rel_error=None), SHAPE, 1, 1e-2)["status"] == "wrong"
    assert sweep._classify(Measurement(median_us=None, rel_error=1e-3), SHAPE, 1, 1e-2)["status"] == "error"
    ok = sweep._classify(Measurement(median_us=10.0, rel_error=1e-3), SHAPE, 2, 1e-2)
    assert ok["status"] == "ok"
    assert ok["tflops"] == pytest.approx(2 * 4 * 128 * 128 / 10e-6 / 1e12)
    assert ok["gbps"] == pytest.approx(timing.grouped_mm_bytes(2, 128, 128, 4) / 10e-6 / 1e9)


# ---------------------------------------------------------------------------------------------
# the GPU measure step, dry-run on the CPU with a fake timer


def test_gpu_measurer_dry_run_on_cpu(monkeypatch):
    def fake_time_cuda(fn, *, rotate=None, **kwargs):
        for args in rotate[:2]:
            fn(*args)
        return timing.summarize([10.0, 11.0, 12.0])

    monkeypatch.setattr(timing, "time_cuda", fake_time_cuda)
    measurer = sweep.GpuMeasurer(device="cpu", memory_budget=1 << 22, runner=CPU_RUNNER)
    result = measurer(Shape(2, 128, 128), 8, A)
    assert result.median_us == pytest.approx(11.0)
    assert result.rel_error is not None and result.rel_error <= 1e-2
    assert len(measurer.inputs.sets) > 1  # small sets rotate
    x, packed, offsets = measurer.inputs.sets[0]
    assert x.shape == (16, 128) and offsets.tolist() == [0, 8, 16]
    # A wrong output is caught by the check and left untimed.
    zeros = Runner(run=lambda config, x, w, o: torch.zeros(x.shape[0], w.n, dtype=torch.bfloat16), quantize=None)
    measurer.runner = zeros
    wrong = measurer(Shape(2, 128, 128), 8, A)
    assert wrong.median_us is None and wrong.rel_error == pytest.approx(1.0)
    measurer.release()


def test_rotating_inputs_rebuild_only_what_changed():
    from codegen.tune.measure import RotatingInputs, relative_error

    inputs = RotatingInputs(torch.device("cpu"), memory_budget=1 << 22)
    inputs.prepare(Shape(2, 128, 128), 8)
    weights, sets = inputs.weights, inputs.sets
    inputs.prepare(Shape(2, 128, 128), 8)
    assert inputs.weights is weights and inputs.sets is sets  # nothing changed: nothing rebuilt
    inputs.prepare(Shape(2, 128, 128), 4)
    assert inputs.weights is weights and inputs.sets is not sets and inputs.sets[0][0].shape == (8, 128)
    inputs.prepare(Shape(2, 64, 128), 4)
    assert inputs.weights is not weights and inputs.dequantized.shape == (2, 64, 128)
    # The check: an exact output has no error, a zero output all of it.
    x, _, _ = inputs.sets[0]
    ref = torch.cat([x[4 * e:4 * e + 4].float() @ inputs.dequantized[e].float().T for e in range(2)])
    assert relative_error(ref, x, inputs.dequantized, [0, 4, 8]) == pytest.approx(0.0, abs=1e-6)
    assert relative_error(torch.zeros_like(ref), x, inputs.dequantized, [0, 4, 8]) == pytest.approx(1.0)
    inputs.release()
    assert inputs.shape is None and inputs.sets == [] and inputs.offsets_host == []


def test_rotating_inputs_switch_routing_by_offsets_alone():
    """Zipf loads of the same total rows reuse x and the weights of every rotating set; only the offsets change,
    to those of the benchmarks' Zipf row at this M and seed."""
    from codegen.tune.loads import offsets_from_loads, row_loads
    from codegen.tune.measure import RotatingInputs, relative_error

    shape = Shape(8, 64, 128)
    inputs = RotatingInputs(torch.device("cpu"), seed=2, memory_budget=1 << 22)
    inputs.prepare(shape, 8)
    uniform = inputs.sets
    assert inputs.routing == "uniform" and inputs.offsets_host == [8 * e for e in range(9)] and len(uniform) > 1
    inputs.prepare(shape, 8, routing="zipf")
    zipf = inputs.sets
    bounds = offsets_from_loads(row_loads("zipf", 8, 8, seed=2))
    assert inputs.routing == "zipf" and inputs.offsets_host == bounds and bounds != uniform[0][2].tolist()
    assert len(zipf) == len(uniform)
    for mine, theirs in zip(zipf, uniform):
        assert mine[0] is theirs[0] and mine[1] is theirs[1] and mine[2].tolist() == bounds
        assert mine[2].dtype == torch.int32
    inputs.prepare(shape, 8, routing="uniform")
    assert inputs.sets is uniform  # switching back rebuilds nothing
    inputs.prepare(shape, 8, routing="zipf")
    assert inputs.sets is zipf
    # The check follows ragged offsets: exact rows give no error, one wrong expert shows.
    x, _, _ = zipf[0]
    ref = torch.cat([x[a:b].float() @ inputs.dequantized[e].float().T for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    assert relative_error(ref, x, inputs.dequantized, bounds) == pytest.approx(0.0, abs=1e-6)
    hot = max(range(8), key=lambda e: bounds[e + 1] - bounds[e])
    poisoned = ref.clone()
    poisoned[bounds[hot]:bounds[hot + 1]] = 0
    assert relative_error(poisoned, x, inputs.dequantized, bounds) > 0.1
    with pytest.raises(ValueError, match="routing"):
        inputs.prepare(shape, 8, routing="skewed")


# ---------------------------------------------------------------------------------------------
# the CLI


def test_tune_needs_an_sm90_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune_cli.main(["--model", "gpt-oss-20b", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "tune needs an SM90 GPU; found no CUDA device" in err


def test_tune_usage_errors(capsys):
    assert tune_cli.main(["--m", "1,2"]) == 2
    assert "--model" in capsys.readouterr().err
    assert tune_cli.main(["--shape", "2,128,100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert tune_cli.main(["--shape", "2,128,128", "--configs", "n128_m7_k128_s4_wg2"]) == 2
    assert "tile_m=7" in capsys.readouterr().err


def test_tune_help_and_register(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune_cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--quick" in out and "examples:" in out
    parser = argparse.ArgumentParser(prog="python -m codegen")
    tune_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--model", "gpt-oss-120b", "--m", "1,16", "--no-resume"])
    assert args.handler is tune_cli.run and args.no_resume and args.m == [1, 16]


def test_tune_resolves_models_and_worker_argv_roundtrips(tmp_path):
    args = tune_cli.build_parser().parse_args(["--model", "gpt-oss-20b", "--shape", "2,128,128", "--quick", "--m", "16,1"])
    shapes, m_values, configs, m_filter = tune_cli.resolve(args)
    assert shapes == [Shape(32, 5760, 2880), Shape(32, 2880, 2880), Shape(2, 128, 128)]
    assert m_values == [1, 16] and m_filter is space.configs_for_m
    assert configs == space.enumerate_configs(SearchSpace.quick())
    argv = tune_cli._worker_argv(args, shapes, m_values, configs, resume=False, out=tmp_path / "t.json")
    worker = tune_cli.build_parser().parse_args(argv)
    assert worker.worker and worker.no_resume and worker.worker_m_window
    again = tune_cli.resolve(worker)
    assert again[0] == shapes and again[1] == m_values and again[2] == configs
    assert tuning.MODEL_SHAPES["gpt-oss-120b"]["gate_up"] == Shape(128, 5760, 2880)


def test_tune_narrow_wgmmas_adds_the_variants_and_the_worker_gets_them(tmp_path):
    args = tune_cli.build_parser().parse_args(["--model", "gpt-oss-120b", "--quick", "--m", "16", "--narrow-wgmmas",
                                               "--routing", "both"])
    shapes, m_values, configs, _ = tune_cli.resolve(args)
    assert configs == space.enumerate_configs(space.with_narrow_wgmmas(SearchSpace.quick()))
    assert "n128_m64_k128_s4_wg1_c2_pw_r16" in {config.name for config in configs}
    worker = tune_cli.build_parser().parse_args(
        tune_cli._worker_argv(args, shapes, m_values, configs, resume=False, out=tmp_path / "t.json"))
    assert tune_cli.resolve(worker)[2] == configs


def _fake_gpu(monkeypatch):
    monkeypatch.setattr(tune_cli, "_gpu_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: H100)


def test_tune_worker_runs_the_sweep(tmp_path, monkeypatch, capsys):
    _fake_gpu(monkeypatch)

    class Measurer(FakeMeasure):
        device_name = H100

        def __init__(self, rep):
            super().__init__({A.name: 3.0, B.name: 2.0, C.name: 2.5})

    monkeypatch.setattr(sweep, "GpuMeasurer", Measurer)
    monkeypatch.setattr(sweep, "_default_compile", fake_compile())
    out = tmp_path / "t.json"
    argv = ["--worker", "--shape", "2,128,128", "--m", "8", "--configs", f"{B.name},{C.name}", f"--out={out}", "--no-plot", "-q"]
    assert tune_cli.main(argv) == 0
    assert tuning.read_table(out)["entries"]["2,128,128"]["8"]["config"] == B.name
    assert "best config" in capsys.readouterr().out


def test_tune_supervisor_restarts_a_lost_worker(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch)
    calls = []
    codes = iter([sweep.EXIT_RESTART, sweep.EXIT_RESTART, 0])

    def fake_call(command, env=None):
        calls.append(command)
        return next(codes)

    monkeypatch.setattr(tune_cli.subprocess, "call", fake_call)
    assert tune_cli.main(["--shape", "2,128,128", "--m", "8", "--quick", "--no-resume", f"--out={tmp_path / 't.json'}"]) == 0
    assert len(calls) == 3
    assert calls[0][1:3] == ["-m", "codegen.cli.tune"] and "--worker" in calls[0]
    assert "--no-resume" in calls[0] and all("--no-resume" not in c for c in calls[1:])  # restarts resume
    codes = iter([sweep.EXIT_RESTART] * 5)
    calls.clear()
    assert tune_cli.main(["--shape", "2,128,128", "--max-restarts", "2", f"--out={tmp_path / 't.json'}"]) == 1
    assert len(calls) == 3


@pytest.mark.parametrize("family, gpu", [("h100", "NVIDIA H100 80GB HBM3"), ("h200", "NVIDIA H200")])
def test_shipped_tables_cover_both_models_with_valid_configs(family, gpu):
    """generated/tuning/<family>.json comes from `tune` on that GPU: every gpt-oss shape, every M bucket."""
    table = tuning.read_table(tuning.shipped_tuning_dir() / f"{family}.json")
    assert table["gpu"] == gpu and table["sm"] == "9.0"
    for model in ("gpt-oss-20b", "gpt-oss-120b"):
        for shape in tuning.MODEL_SHAPES[model].values():
            buckets = table["entries"][shape.key]
            assert sorted(map(int, buckets)) == [1, 4, 16, 64, 256, 1024, 4096]
            for entry in buckets.values():
                TileConfig.from_name(entry["config"])  # valid, or ValueError
                assert _beats_the_default_or_is_it(entry), entry
    assert set(tuning.shipped_configs()) <= set(configs_in_use())


def _beats_the_default_or_is_it(entry: dict) -> bool:
    """The selection rule as a table records it: a uniform-only entry is the winner or within noise of the
    default; a routing-robust one (``routings``) has a worst ratio within noise of the default's (when the default
    was correct under every routing) and the worst ratio its times say."""
    from codegen.tune.choice import DEFAULT_MARGIN

    if "routings" not in entry:
        return entry["median_us"] <= entry["default_us"] * DEFAULT_MARGIN
    times = entry["routings"].values()
    worst = max(t["us"] / t["best_us"] for t in times)
    if abs(worst - entry["worst_ratio"]) > 1e-3 or min(t["us"] / t["best_us"] for t in times) < 1 - 1e-6:
        return False
    if any(t["default_us"] is None for t in times):
        return True
    return worst <= max(t["default_us"] / t["best_us"] for t in times) * DEFAULT_MARGIN


def test_the_shipped_table_check_reads_routing_robust_entries():
    robust = {"config": "c", "median_us": 120.0, "default_us": 100.0, "worst_ratio": 1.2,
              "routings": {"uniform": {"us": 120.0, "best_us": 100.0, "best_config": "d", "default_us": 100.0},
                           "zipf": {"us": 200.0, "best_us": 200.0, "best_config": "c", "default_us": 300.0}}}
    assert _beats_the_default_or_is_it(robust)  # slower than the default under uniform, but 1.2 < 1.5
    robust["routings"]["zipf"]["default_us"] = 230.0  # the default's worst ratio 1.15 < 1.2: it should have stayed
    assert not _beats_the_default_or_is_it(robust)
    assert not _beats_the_default_or_is_it({**robust, "worst_ratio": 1.1})
    assert _beats_the_default_or_is_it({"median_us": 100.0, "default_us": 101.0})
    assert not _beats_the_default_or_is_it({"median_us": 110.0, "default_us": 100.0})


# ---------------------------------------------------------------------------------------------
# the W4A8 family in selection, tables and sweeps


def test_fp8_family_selection_tables_and_sweep_plan(tmp_path, monkeypatch):
    fp8 = heuristic_config(16, "fp8")
    assert fp8.activations == "fp8" and fp8.tile_m >= 16 and heuristic_config(16).activations == "bf16"
    assert heuristic_config(10_000, "fp8").tile_m == max(c.tile_m for c in DEFAULT_CONFIGS if c.activations == "fp8")
    selection = select_config(32, 5760, 2880, 16, activations="fp8")
    assert selection.config == fp8 and "default fp8 tile_m" in selection.reason
    # A table holds both families apart: E,N,K and E,N,K:fp8.
    monkeypatch.setenv(tuning.TUNING_DIR_ENV, str(tmp_path))
    table = tuning.new_table("NVIDIA H200")
    table["entries"] = {"32,5760,2880": {"16": {"config": "n128_m16_k128_s5_wg1_c3"}},
                        "32,5760,2880:fp8": {"16": {"config": "n128_m16_k128_s6_wg1_c3_fp8"}}}
    tuning.write_table(tmp_path / "h200.json", table)
    assert tuning.lookup("NVIDIA H200", 32, 5760, 2880, 16)[0].name == "n128_m16_k128_s5_wg1_c3"
    assert tuning.lookup("NVIDIA H200", 32, 5760, 2880, 16, "fp8")[0].name == "n128_m16_k128_s6_wg1_c3_fp8"
    assert tuning.lookup("NVIDIA H200", 32, 2880, 2880, 16, "fp8") is None
    tuning.clear_cache()
    with pytest.raises(ValueError, match="one kernel family per sweep"):
        sweep.plan_sweep([Shape(2, 128, 128)], [8], [A, fp8])
    plan = sweep.plan_sweep([Shape(2, 128, 128)], [8], [fp8])
    assert plan.activations == "fp8" and plan.items[0][2] == heuristic_config(8, "fp8")


def test_fp8_records_build_their_own_table_entries():
    from codegen.tune.report import build_table

    base = {"gpu": "G", "E": 2, "N": 128, "K": 128, "m": 8, "status": "ok", "tflops": 1.0, "gbps": 1.0}
    fp8 = heuristic_config(8, "fp8").name
    records = [{**base, "config": A.name, "median_us": 10.0}, {**base, "config": fp8, "median_us": 6.0}]
    entries = build_table(records, "G")["entries"]
    assert entries["2,128,128"]["8"]["config"] == A.name  # the faster fp8 record does not take the bf16 entry
    assert entries["2,128,128:fp8"]["8"]["config"] == fp8 and entries["2,128,128:fp8"]["8"]["default_config"] == fp8


def test_gpu_measurer_dry_run_on_cpu_fp8(monkeypatch):
    """A W4A8 config is measured on FP8-ready weights and e4m3 x, checked against the fp8-rounded x."""

    def fake_time_cuda(fn, *, rotate=None, **kwargs):
        for args in rotate[:2]:
            fn(*args)
        return timing.summarize([5.0, 6.0, 7.0])

    monkeypatch.setattr(timing, "time_cuda", fake_time_cuda)
    measurer = sweep.GpuMeasurer(device="cpu", memory_budget=1 << 22, runner=CPU_RUNNER)
    config = heuristic_config(8, "fp8")
    result = measurer(Shape(2, 128, 128), 8, config)
    assert result.median_us == pytest.approx(6.0) and result.rel_error <= 1e-2, result
    x_fp8, packed, offsets, x_scale = measurer.inputs.sets[0]
    assert x_fp8.dtype == torch.float8_e4m3fn and isinstance(packed, mxfp4.PackedMXFP4FP8) and x_scale.shape == (16,)
    plain = measurer(Shape(2, 128, 128), 8, A)  # switching family rebuilds the inputs
    assert plain.rel_error <= 1e-2 and len(measurer.inputs.sets[0]) == 3
    measurer.release()


# ---------------------------------------------------------------------------------------------
# routings: the selection rule over uniform and Zipf loads, the sweep and the CLI with --routing


def _ok(config: str, us: float, routing: str | None = "uniform", **extra) -> dict:
    record = {"config": config, "median_us": us, "status": "ok", **extra}
    if routing is not None:
        record["routing"] = routing
    return record


def test_choice_prefers_the_balanced_config_to_a_uniform_winner_that_loses_zipf():
    from codegen.tune.choice import choose

    # "fast" wins uniform by 10 %, loses Zipf by 2x; "even" is 10 % off uniform, best under Zipf.
    ok = [_ok("fast", 100.0), _ok("fast", 300.0, "zipf"), _ok("even", 110.0), _ok("even", 150.0, "zipf"),
          _ok("slow", 130.0), _ok("slow", 160.0, "zipf")]
    choice = choose(ok, default_config="fast")
    assert choice.routings == ("uniform", "zipf") and choice.best_us == {"uniform": 100.0, "zipf": 150.0}
    assert choice.config == "even" and choice.worst_ratio("even") == pytest.approx(1.1)
    assert choice.worst_ratio("fast") == pytest.approx(2.0) and choice.ratios("slow")["uniform"] == pytest.approx(1.3)
    assert choice.best_config("uniform") == "fast" and choice.best_config("zipf") == "even"
    # Under uniform alone the uniform winner takes it: the rule is the fastest config.
    uniform_only = choose([r for r in ok if r["routing"] == "uniform"], default_config="slow")
    assert uniform_only.config == "fast" and uniform_only.routings == ("uniform",)


def test_choice_keeps_the_default_within_the_margin_of_the_worst_ratio():
    from codegen.tune.choice import DEFAULT_MARGIN, choose

    # The default's worst ratio (1.1 * just under the margin) ties the balanced config's (1.1): noise, kept.
    near = 1.1 * (DEFAULT_MARGIN - 0.005)
    ok = [_ok("dflt", 100.0 * near), _ok("dflt", 150.0 * near, "zipf"), _ok("even", 110.0), _ok("even", 150.0, "zipf"),
          _ok("fast", 100.0), _ok("fast", 300.0, "zipf")]
    assert choose(ok, default_config="dflt").config == "dflt"
    far = 1.1 * (DEFAULT_MARGIN + 0.005)
    ok = [_ok("dflt", 100.0 * far), _ok("dflt", 150.0 * far, "zipf"), *ok[2:]]
    choice = choose(ok, default_config="dflt")
    assert choice.config == "even" and choice.worst_ratio("dflt") == pytest.approx(far)
    # The default that wins uniform but loses Zipf by more than the margin is displaced.
    assert choose(ok, default_config="fast").config == "even"


def test_choice_needs_every_routing_and_reads_old_records_as_uniform():
    from codegen.tune.choice import choose

    # "fast" has no correct Zipf time (wrong or failed there): never picked, and it sets no best time.
    ok = [_ok("fast", 50.0, routing=None), _ok("even", 110.0, routing=None), _ok("even", 150.0, "zipf"),
          _ok("other", 120.0), _ok("other", 140.0, "zipf"), _ok("other", 100.0)]  # the faster of two repeats counts
    choice = choose(ok, default_config="fast")
    assert not choice.eligible("fast") and choice.worst_ratio("fast") is None
    assert choice.best_us == {"uniform": 100.0, "zipf": 140.0}
    assert choice.config == "other" and choice.record("fast")["median_us"] == 50.0
    assert choose([_ok("fast", 50.0)] + [_ok("even", 150.0, "zipf")], default_config="fast") is None
    assert choose([], default_config="fast") is None
    # Equal worst ratios: the smaller geometric mean of the ratios wins.
    tie = [_ok("a", 120.0), _ok("a", 230.0, "zipf"), _ok("b", 100.0), _ok("b", 240.0, "zipf"),
           _ok("c", 130.0), _ok("c", 200.0, "zipf")]
    assert choose(tie, default_config="x").config == "b"  # a: 1.2 / 1.15, b: 1.0 / 1.2, c: 1.3 / 1.0


def test_sweep_under_both_routings_records_and_picks_the_robust_config(tmp_path, capsys):
    # A (the default at M=8) and B win uniform; C is 10 % slower there but 2x faster under Zipf.
    measure = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 22.0}, zipf={A.name: 90.0, B.name: 60.0, C.name: 30.0})
    table = run_fake_sweep(tmp_path, measure, m_values=[8], routings=("uniform", "zipf"))
    assert [call[2:] for call in measure.calls] == [(c.name, r) for c in (A, B, C) for r in ("uniform", "zipf")]
    entry = table["entries"]["2,128,128"]["8"]
    assert entry["config"] == C.name and entry["median_us"] == pytest.approx(176.0)  # the uniform time
    assert entry["default_config"] == A.name and entry["default_us"] == pytest.approx(240.0)
    assert entry["routings"]["uniform"] == {"us": 176.0, "best_us": 160.0, "best_config": B.name, "default_us": 240.0}
    assert entry["routings"]["zipf"] == {"us": 240.0, "best_us": 240.0, "best_config": C.name, "default_us": 720.0}
    assert entry["worst_ratio"] == pytest.approx(1.1)
    log = read_log(tmp_path)
    assert {(r["config"], r["routing"]) for r in log} == {(c.name, r) for c in (A, B, C) for r in ("uniform", "zipf")}
    out = capsys.readouterr().out
    assert "uniform us" in out and "zipf us" in out and "zipf/uniform" in out and "worst ratio" in out
    assert "1.36x" in out  # gain: the default's worst ratio (3.0 / 2.0 = 1.5) over the chosen one's (1.1)
    # A uniform-only sweep of the same log would choose B; resuming it under both measures only Zipf.
    uniform = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 22.0})
    assert run_fake_sweep(tmp_path / "u", uniform, m_values=[8])["entries"]["2,128,128"]["8"]["config"] == B.name
    again = FakeMeasure({A.name: 30.0, B.name: 20.0, C.name: 22.0}, zipf={A.name: 90.0, B.name: 60.0, C.name: 30.0})
    table = run_fake_sweep(tmp_path / "u", again, m_values=[8], routings=("uniform", "zipf"))
    assert {call[3] for call in again.calls} == {"zipf"} and len(again.calls) == 3
    assert table["entries"]["2,128,128"]["8"]["config"] == C.name


def test_sweep_under_both_routings_drops_a_config_wrong_under_zipf(tmp_path):
    measure = FakeMeasure({A.name: 30.0, B.name: 10.0, C.name: 22.0}, zipf={A.name: 90.0, B.name: 10.0, C.name: 30.0},
                          wrong=((B.name, "zipf"),))
    table = run_fake_sweep(tmp_path, measure, m_values=[8], routings=("uniform", "zipf"))
    entry = table["entries"]["2,128,128"]["8"]
    assert entry["config"] == C.name and entry["routings"]["uniform"]["best_config"] == C.name
    with pytest.raises(ValueError, match="routings"):
        sweep.plan_sweep([SHAPE], [8], [A], routings=("skewed",))


def test_problem_bytes_count_the_active_experts_of_the_routing():
    shape = Shape(32, 256, 256)
    from codegen.tune.loads import row_loads

    active = sum(1 for load in row_loads("zipf", 32, 1) if load)
    assert active < 32  # 32 rows over 8 tokens: some experts get none
    assert sweep.problem_bytes(shape, 1, "zipf") == timing.grouped_mm_bytes(active, 256, 256, 32)
    assert sweep.problem_bytes(shape, 1) == timing.grouped_mm_bytes(32, 256, 256, 32)


def test_zipf_widens_the_tile_m_window_upward():
    assert space.tile_m_window(16) == (8, 32) and space.tile_m_window(16, ("uniform", "zipf")) == (8, 64)
    assert space.tile_m_window(256, ("zipf",)) == (64, 1024)
    configs = [TileConfig.from_name(n) for n in ("n128_m16_k128_s5_wg1_c3", "n128_m64_k128_s7_wg2")]
    assert [c.tile_m for c in space.configs_for_m(configs, 16)] == [16]
    assert [c.tile_m for c in space.m_filter_for(("uniform", "zipf"))(configs, 16)] == [16, 64]
    assert space.m_filter_for(("uniform",)) is space.configs_for_m


def test_lookup_explains_a_routing_robust_entry(tables):
    user, _ = tables
    entry = {**_entry("n128_m64_k128_s7_wg2", 401.2), "worst_ratio": 1.041,
             "routings": {"uniform": {"us": 401.2, "best_us": 385.4, "best_config": "x", "default_us": 379.0},
                          "zipf": {"us": 512.9, "best_us": 512.9, "best_config": "y", "default_us": 698.7}}}
    tuning.write_table(user / "h100.json", _table(H100, {"32,5760,2880": {"256": entry}}))
    config, reason = tuning.lookup(H100, 32, 5760, 2880, 256)
    assert config.name == "n128_m64_k128_s7_wg2"
    assert "M-bucket 256 (measured 401.2 us; routing-robust: uniform 401.2 us (1.04x its best), zipf 512.9 us " \
           "(1.00x its best))" in reason
    # An old entry (no routings) reads as before.
    tuning.write_table(user / "h100.json", _table(H100, {"32,5760,2880": {"256": _entry("n128_m64_k128_s7_wg2", 5.0)}}))
    assert tuning.lookup(H100, 32, 5760, 2880, 256)[1].endswith("M-bucket 256 (measured 5.0 us)")


def test_tune_routing_flag_reaches_the_worker_and_the_sweep(tmp_path, monkeypatch, capsys):
    args = tune_cli.build_parser().parse_args(["--shape", "2,128,128", "--quick", "--m", "16", "--routing", "both"])
    assert tune_cli.routings_of(args) == ("uniform", "zipf")
    _, _, configs, m_filter = tune_cli.resolve(args)
    assert {c.tile_m for c in m_filter(configs, 16)} == {8, 16, 32, 64}
    worker = tune_cli.build_parser().parse_args(tune_cli._worker_argv(args, [SHAPE], [16], configs, True, tmp_path / "t.json"))
    assert worker.routing == "both" and worker.worker_m_window
    assert tune_cli.routings_of(tune_cli.build_parser().parse_args(["--shape", "2,128,128"])) == ("uniform",)
    assert tune_cli.build_parser().parse_args(["--shape", "2,128,128", "--routing", "zipf"]).routing == "zipf"
    with pytest.raises(SystemExit):
        tune_cli.build_parser().parse_args(["--shape", "2,128,128", "--routing", "skewed"])
    assert "invalid choice" in capsys.readouterr().err


def _tile_cost_us(config: TileConfig, offsets: list[int]) -> float:
    """A fake timer's model: each m-tile of an expert reads its weights once and pays for its tile_m rows, so a
    tall tile wins evenly loaded experts and pads the many small ones of a Zipf routing."""
    rows = [b - a for a, b in zip(offsets, offsets[1:])]
    return sum(-(-r // config.tile_m) * (1.0 + config.tile_m / 4) for r in rows)


def test_tune_routing_both_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch, capsys):
    """The worker with --routing both, the real GpuMeasurer on the CPU (the portable op as the kernel, a fake
    timer pricing the m-tiles of the offsets it is given), the real rule and table."""
    _fake_gpu(monkeypatch)
    ran: list = []
    runner = Runner(run=lambda config, *inputs: ran.append((config, inputs[2].tolist())) or _run_op(config, *inputs),
                    quantize=CPU_RUNNER.quantize)

    def fake_time_cuda(fn, *, rotate=None, **kwargs):
        fn(*rotate[0])
        config, offsets = ran[-1]
        return timing.summarize([_tile_cost_us(config, offsets)] * 3)

    monkeypatch.setattr(timing, "time_cuda", fake_time_cuda)
    real = sweep.GpuMeasurer
    monkeypatch.setattr(sweep, "GpuMeasurer", lambda rep: real(rep=rep, device="cpu", memory_budget=1 << 22, runner=runner))
    monkeypatch.setattr(sweep, "_default_compile", fake_compile())
    names = ["n128_m8_k128_s6_wg1_c3", "n128_m16_k128_s5_wg1_c3", "n128_m32_k256_s5_wg2", "n128_m64_k128_s7_wg2"]
    out = tmp_path / "t.json"
    argv = ["--worker", "--shape", "32,128,128", "--m", "32", "--configs", ",".join(names), "--routing", "both",
            f"--out={out}", "--no-plot", "-q"]
    assert tune_cli.main(argv) == 0
    records = [json.loads(line) for line in sweep.progress_log_path(out).read_text().splitlines()]
    assert {(r["config"], r["routing"]) for r in records} == {(n, r) for n in names for r in ("uniform", "zipf")}
    assert all(r["status"] == "ok" and r["rel_error"] <= 1e-2 for r in records), records
    # The rule, recomputed here from the model: the smallest worst ratio over both routings.
    from codegen.tune.loads import offsets_from_loads, row_loads

    bounds = {r: offsets_from_loads(row_loads(r, 32, 32)) for r in ("uniform", "zipf")}
    cost = {(n, r): _tile_cost_us(TileConfig.from_name(n), bounds[r]) for n in names for r in bounds}
    best = {r: min(cost[(n, r)] for n in names) for r in bounds}
    worst = {n: max(cost[(n, r)] / best[r] for r in bounds) for n in names}
    entry = tuning.read_table(out)["entries"]["32,128,128"]["32"]
    assert entry["config"] == min(names, key=worst.get) and entry["worst_ratio"] == pytest.approx(min(worst.values()), abs=1e-4)
    assert entry["routings"]["zipf"]["us"] == pytest.approx(cost[(entry["config"], "zipf")])
    # The model makes the rule matter: the uniform winner (tile_m 32, also the default) pads Zipf's small experts.
    assert min(names, key=lambda n: cost[(n, "uniform")]) == entry["default_config"] != entry["config"]
    assert "zipf/uniform" in capsys.readouterr().out


def test_a_call_with_fewer_rows_than_experts_takes_the_entry_tuned_for_that_many_experts(tables):
    """The MoE layer at T = 1 (top-4: 4 rows) reads at most 4 experts: an entry tuned for E = 4 at M = 1 fits its
    grid; without one, or with as many rows as experts, the full shape's entry stands."""
    from codegen.tune.selection import select_config

    user, shipped = tables
    full, few = "n128_m8_k128_s6_wg1_c3", "n64_m8_k128_s6_wg1_c5_pw_sk"
    tuning.write_table(shipped / "h100.json", _table(H100, {"32,5760,2880": {"1": _entry(full, 69.5)},
                                                            "4,5760,2880": {"1": _entry(few, 20.1)}}))
    chosen = select_config(32, 5760, 2880, 1, device_name=H100, rows=4)
    assert chosen.config.name == few and "4 rows read at most 4 of the 32 experts" in chosen.reason
    assert "E=4 N=5760 K=2880" in chosen.reason
    assert select_config(32, 5760, 2880, 1, device_name=H100).config.name == full  # rows unknown
    assert select_config(32, 5760, 2880, 1, device_name=H100, rows=32).config.name == full  # every expert can be read
    assert select_config(32, 5760, 2880, 1, device_name=H100, rows=8).config.name == full  # no E = 8 entry
    assert select_config(128, 5760, 2880, 1, device_name=H100, rows=4).config.name == few  # 120b at T = 1 too


def test_the_layer_passes_its_routed_rows_to_the_selection(monkeypatch):
    """The fused layer's configs are chosen with T x top_k rows known, so the few-rows entries can apply."""
    from mxfp4.experts import fused
    from mxfp4.ops.dispatch import ConfigChoice

    asked = []

    def choose(num_experts, n, k, hint, device_name=None, activations="bf16", rows=None):
        asked.append((num_experts, hint, rows, activations))
        return ConfigChoice(TileConfig.from_name("n128_m8_k128_s6_wg1_c3"), "test")

    monkeypatch.setattr(fused, "choose_config", choose)
    fused._fused_config.cache_clear()
    try:
        config = fused._config(32, 5760, 2880, 4, "swiglu", H100)
        fused._config(128, 2880, 2880, 640, "scatter", H100, "fp8")
    finally:
        fused._fused_config.cache_clear()
    assert config.epilogue == "swiglu"
    assert asked == [(32, 1, 4, "bf16"), (128, 5, 640, "fp8")]
