"""scripts/sanitize_case.py (the device script's smoke and compute-sanitizer runs) without a GPU: that its cases
cover every config the op can pick in both variants and both families, every config's fused-layer epilogues and
every portable tile config; and that a fused case really forces its config on both GEMMs of the layer (run on
benchmarks.fake_sm90's stand-in, the kernels emulated by tests/moe_emulator.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from moe_emulator import Emulator

from benchmarks.fake_sm90 import Recorder, fake_sm90
from codegen.tune.selection import configs_in_use, configs_under_test
from codegen.tune.tables import shipped_configs
from mxfp4.portable import kernel as portable_kernel

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sanitize_case.py"


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch):
    """The script as a fresh module (its cached problems built anew)."""
    spec = importlib.util.spec_from_file_location("sanitize_case", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sanitize_case", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def names(script, family: str | None = None, kinds: tuple[str, ...] | None = None) -> list[str]:
    return [case.name for case in script.plan(family, set(kinds or script.KINDS), configs_under_test())]


def test_cases_cover_every_config_kernel_and_the_layer(script) -> None:
    cases = names(script)
    assert len(cases) == len(set(cases))
    assert set(shipped_configs()) <= set(configs_in_use()) <= set(configs_under_test())
    assert {c.activations for c in configs_in_use()} == {"bf16", "fp8"}
    for config in configs_under_test():
        for case in (f"{config.name} (offsets)", f"{config.name} (masked)", f"moe fused {config.name} (_swiglu + _scatter)"):
            assert case in cases
    for table in (portable_kernel.HOPPER_CONFIGS, portable_kernel.OTHER_CONFIGS):
        assert all(f"portable {config.name} (offsets + masked)" in cases for _, config in table)
    assert sum(case.startswith("quantize_activations") for case in cases) == 4  # held, two-pass, scalar, [E, max_m, K]
    assert sum(case.startswith("moe (fused epilogues") for case in cases) == 5
    bf16, fp8 = names(script, "bf16"), names(script, "fp8")  # a long run splits by family with nothing lost
    assert not set(bf16) & set(fp8) and set(bf16) | set(fp8) == set(cases)
    assert names(script, kinds=("fused",)) == [case for case in cases if case.startswith("moe fused")]


def test_list_runs_nothing_and_a_bad_kind_is_refused(script, capsys) -> None:
    assert script.main(["--list", "--family", "fp8"]) == 0
    assert capsys.readouterr().out.split("\n")[:-1] == names(script, "fp8")
    with pytest.raises(SystemExit):
        script.main(["--cases", "gemm,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["n128_m8_k128_s6_wg1_c3", "n256_m64_k128_s6_wg4", "n128_m64_k128_s7_wg2_pw_sk"])
def test_a_fused_case_forces_its_config_on_both_gemms(script, monkeypatch: pytest.MonkeyPatch, config: str) -> None:
    """The bf16 layer (five launches) with the config's SwiGLU and scatter kernels, checked against float64."""
    from codegen import TileConfig

    monkeypatch.setattr(script, "DEVICE", "cpu")
    gate_up, down = script.packed_layer("bf16")
    with fake_sm90(Recorder(on_launch=Emulator(gate_up, down))) as recorder:
        error = script.fused_error(TileConfig.from_name(config))
    launched = [launch.name for launch in recorder.launches]
    assert launched == ["moe_routing", "moe_gather", f"{config}_swiglu", f"{config}_scatter", "moe_topk_sum"]
    assert error <= script.TOLERANCE
    assert script.run_case(script.Case("forced", lambda: error))  # and the case's line says ok


def test_relative_error_never_divides_zero_by_zero(script) -> None:
    zero = torch.zeros(3)
    assert script.relative_error(zero, zero) == 0.0
    assert script.relative_error(torch.tensor([0.0, 1e-30, 0.0]), zero) == float("inf")
    assert script.relative_error(torch.tensor([float("nan"), 1.0, 1.0]), torch.ones(3)) == float("inf")
