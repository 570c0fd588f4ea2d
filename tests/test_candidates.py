"""HOPPER_MXFP4_CANDIDATES (codegen/runtime/candidates.py): which candidate builds launch.load takes for a config
when a device session asks for them everywhere. The GPU side (the same loaded kernel as the explicit flag) is in
tests/test_store_paths_gpu.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from codegen import TileConfig
from codegen.runtime.candidates import (
    ENV_CANDIDATES,
    candidate_flags,
    environment_candidates,
)

SWIGLU_TALL = TileConfig.from_name("n128_m256_k64_s5_wg2_swiglu")
SWIGLU_DECODE = TileConfig.from_name("n128_m16_k128_s5_wg1_c3_swiglu")
STORE = TileConfig.from_name("n128_m256_k64_s5_wg2")
SCATTER = TileConfig.from_name("n128_m64_k128_s8_wg2_fp8_scatter")


@pytest.fixture
def candidates_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    environment_candidates.cache_clear()  # read once per process: re-read under the patched environment
    yield monkeypatch
    environment_candidates.cache_clear()


def test_no_candidate_unless_asked(candidates_env: pytest.MonkeyPatch) -> None:
    candidates_env.delenv(ENV_CANDIDATES, raising=False)
    assert environment_candidates() == frozenset()
    assert [candidate_flags(config) for config in (SWIGLU_TALL, SWIGLU_DECODE, STORE, SCATTER)] == [{}, {}, {}, {}]


def test_candidates_go_where_they_apply(candidates_env: pytest.MonkeyPatch) -> None:
    candidates_env.setenv(ENV_CANDIDATES, " swiglu_lines ")
    assert candidate_flags(SWIGLU_TALL) == {"swiglu_lines": True}
    assert candidate_flags(SWIGLU_DECODE) == {}  # 16-row tiles keep the paired stores
    assert candidate_flags(STORE) == {} and candidate_flags(SCATTER) == {}  # the candidate is SwiGLU's


def test_an_unknown_candidate_is_refused_by_name(candidates_env: pytest.MonkeyPatch) -> None:
    candidates_env.setenv(ENV_CANDIDATES, "swiglu_lines,swiglu_mufu,m_fastest")  # shipped or lost: no longer ones
    unknown = r"HOPPER_MXFP4_CANDIDATES: unknown candidate\(s\) \['m_fastest', 'swiglu_mufu'\]"
    with pytest.raises(ValueError, match=unknown):
        candidate_flags(SWIGLU_TALL)


def test_the_line_stores_candidate_goes_only_where_its_area_fits(candidates_env: pytest.MonkeyPatch) -> None:
    from codegen.runtime.launch import candidate_stage_bytes

    full = TileConfig.from_name("n128_m64_k128_s9_wg2_swiglu")  # 231,076 of 232,448 bytes before the 9 KB area
    candidates_env.setenv(ENV_CANDIDATES, "swiglu_lines")
    assert candidate_flags(full) == {}
    with pytest.raises(ValueError, match="swiglu_lines: n128_m64_k128_s9_wg2_swiglu would need 240292 bytes"):
        candidate_stage_bytes(full, swiglu_lines=True)  # asked for by name: refused, not dropped
    assert candidate_stage_bytes(SWIGLU_TALL, swiglu_lines=True) == SWIGLU_TALL.line_stage_area == 9216
