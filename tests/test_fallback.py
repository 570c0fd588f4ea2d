"""The portable fallback and its decoded-weight cache: results, staleness, lifetime, bound, threads, explain."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch
from accuracy import relative_error

import mxfp4
from mxfp4.format.layout import PackedMXFP4
from mxfp4.format.reference import (
    reference_grouped_mm_float64,
    reference_grouped_mm_masked_float64,
)
from mxfp4.ops import dispatch
from mxfp4.portable import fallback, weight_cache

TOLERANCE = 1e-2  # ||out - ref|| / ||ref|| against float64 on the dequantized weights


def make_packed(e: int, n: int, k: int, device: str = "cpu") -> PackedMXFP4:
    return mxfp4.pack(mxfp4.quantize(torch.randn(e, n, k, device=device) * 0.05))


def offsets_of(counts: list[int], dtype: torch.dtype = torch.int32, device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(dtype).to(device)


def check_contiguous(packed: PackedMXFP4, counts: list[int], dtype: torch.dtype = torch.int32) -> None:
    device = str(packed.device)
    offsets = offsets_of(counts, dtype, device)
    x = torch.randn(sum(counts), packed.k, device=device).bfloat16()
    out = mxfp4.grouped_mm(x, packed, offsets)
    assert out.shape == (sum(counts), packed.n) and out.is_contiguous()
    assert relative_error(out, reference_grouped_mm_float64(x, packed, offsets)) <= TOLERANCE


def check_masked(packed: PackedMXFP4, masked: list[int], max_m: int) -> None:
    device = str(packed.device)
    x = torch.randn(packed.num_experts, max_m, packed.k, device=device).bfloat16()
    out = mxfp4.grouped_mm_masked(x, packed, torch.tensor(masked, dtype=torch.int32, device=device))
    ref = reference_grouped_mm_masked_float64(x, packed)
    for e, rows in enumerate(masked):
        if rows:
            assert relative_error(out[e, :rows], ref[e, :rows]) <= TOLERANCE, f"expert {e}"


CASES = [
    (200, 96, [3, 0, 7, 1]),  # tails in N and K (N not a multiple of 8), an empty expert
    (64, 64, [0, 0, 5, 0]),  # one expert has rows
    (1, 32, [2, 3]),  # N = 1
    (96, 128, [17, 0, 0, 9, 30, 2]),
]


@pytest.mark.parametrize(("n", "k", "counts"), CASES)
@pytest.mark.parametrize("budget", [None, 0], ids=["cached", "per-call"])
def test_both_variants_match_float64(n: int, k: int, counts: list[int], budget: int | None, seed: int) -> None:
    mxfp4.set_fallback_memory_budget(budget)
    packed = make_packed(len(counts), n, k)
    for _ in range(2):  # first call decodes (cached mode), second reuses
        check_contiguous(packed, counts)
        check_contiguous(packed, counts, torch.int64)
        check_masked(packed, [min(c, 4) for c in counts], 4)
    stats = weight_cache.stats("cpu")
    if budget == 0:
        assert stats.entries == 0 and stats.misses == 0
    else:
        assert stats.entries == 1 and stats.misses == 1 and stats.hits == 5, stats


def test_second_call_hits_the_cache_through_the_op(seed: int) -> None:
    packed = make_packed(3, 64, 64)
    check_contiguous(packed, [1, 2, 3])
    assert weight_cache.is_cached(packed.data, 64, 64)
    check_contiguous(packed, [1, 2, 3])
    assert (weight_cache.stats("cpu").hits, weight_cache.stats("cpu").misses) == (1, 1)


def test_in_place_change_is_never_served_stale(seed: int) -> None:
    packed = make_packed(2, 64, 96)
    check_contiguous(packed, [3, 4])
    packed.data.copy_(make_packed(2, 64, 96).data)  # same object, same pointer: only the version changes
    check_contiguous(packed, [3, 4])
    check_masked(packed, [2, 1], 2)
    packed.data[0].zero_()  # through a view: views share the version counter
    x = torch.randn(1, 96).bfloat16()
    assert bool((mxfp4.grouped_mm(x, packed, offsets_of([1, 0])) == 0).all())
    assert weight_cache.stats("cpu").entries == 1  # each stale entry was replaced, not kept beside


def test_freed_weight_drops_its_entry(seed: int) -> None:
    packed = make_packed(2, 64, 64)
    check_contiguous(packed, [1, 1])
    assert weight_cache.stats("cpu").entries == 1
    del packed
    gc.collect()
    assert weight_cache.stats("cpu").entries == 0 and weight_cache.stats("cpu").nbytes == 0


def test_cache_respects_its_bound_and_evicts_lru(seed: int) -> None:
    weights = [make_packed(2, 64, 64) for _ in range(3)]
    size = weight_cache.decoded_nbytes(64, 64, 2)
    mxfp4.set_fallback_memory_budget(2 * size)
    for packed in weights[:2]:
        check_contiguous(packed, [1, 2])
    check_contiguous(weights[0], [1, 2])  # weights[0] is now the most recently used
    check_contiguous(weights[2], [1, 2])  # evicts weights[1]
    stats = weight_cache.stats("cpu")
    assert stats.entries == 2 and stats.nbytes == 2 * size and stats.evictions == 1
    assert [weight_cache.is_cached(w.data, 64, 64) for w in weights] == [True, False, True]
    mxfp4.set_fallback_memory_budget(size)  # shrinking evicts at once
    assert weight_cache.stats("cpu").entries == 1 and weight_cache.is_cached(weights[2].data, 64, 64)


def test_over_budget_decodes_per_call_and_says_so(seed: int) -> None:
    packed = make_packed(2, 64, 64)
    mxfp4.set_fallback_memory_budget(weight_cache.decoded_nbytes(64, 64, 2) - 1)
    fallback._warned.clear()
    with pytest.warns(RuntimeWarning, match="larger than the fallback memory budget"):
        check_contiguous(packed, [2, 1])
    assert weight_cache.stats("cpu").entries == 0
    text = mxfp4.explain(torch.zeros(3, 64, dtype=torch.bfloat16), packed, offsets_of([2, 1]))
    assert "fallback:  per-call decode (slow): the decoded copy (16.00 KiB) is larger" in text


def test_budget_zero_disables_the_cache_quietly(seed: int) -> None:
    mxfp4.set_fallback_memory_budget(0)
    packed = make_packed(3, 72, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit 0 is the user's choice: no warning
        check_contiguous(packed, [0, 4, 1])
        check_masked(packed, [1, 0, 3], 3)
    assert weight_cache.stats("cpu").entries == 0
    text = mxfp4.explain(torch.zeros(5, 64, dtype=torch.bfloat16), packed, offsets_of([0, 4, 1]))
    assert "budget is 0" in text and "reads offsets on the host" in text


def test_inference_tensors_are_decoded_per_call(seed: int) -> None:
    with torch.inference_mode():
        packed = make_packed(2, 64, 64)
        fallback._warned.clear()
        with pytest.warns(RuntimeWarning, match="inference_mode"):
            check_contiguous(packed, [2, 2])
    assert weight_cache.stats("cpu").entries == 0


def test_concurrent_threads_see_correct_results(seed: int) -> None:
    shared = make_packed(3, 64, 96)
    own = [make_packed(3, 64 + 8 * i, 96) for i in range(4)]
    mxfp4.set_fallback_memory_budget(3 * weight_cache.decoded_nbytes(96, 96, 3))  # forces evictions too
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for step in range(6):
                check_contiguous(own[i] if step % 2 else shared, [1 + i, 0, 2])
                check_masked(own[i], [1, 2, 0], 2)
        except BaseException as error:  # noqa: BLE001 - reported to the main thread below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    stats = weight_cache.stats("cpu")
    assert stats.nbytes <= stats.budget and stats.hits > 0


def test_budget_setting_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert weight_cache.parse_budget("8G") == 8 << 30 and weight_cache.parse_budget("512MiB") == 512 << 20
    assert weight_cache.parse_budget(" 1024 ") == 1024 and weight_cache.parse_budget("0") == 0
    monkeypatch.setenv(weight_cache.ENV_BUDGET, "3M")
    assert weight_cache.fallback_memory_budget("cpu") == (3 << 20, f"{weight_cache.ENV_BUDGET}=3M")
    mxfp4.set_fallback_memory_budget(5)
    assert weight_cache.fallback_memory_budget("cpu")[0] == 5  # the API wins over the variable
    monkeypatch.setenv(weight_cache.ENV_BUDGET, "lots")
    mxfp4.set_fallback_memory_budget(None)
    with pytest.raises(ValueError, match=weight_cache.ENV_BUDGET):
        weight_cache.fallback_memory_budget("cpu")
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        mxfp4.set_fallback_memory_budget(-1)
    with pytest.raises(TypeError, match="nbytes must be an int"):
        mxfp4.set_fallback_memory_budget(1.5)  # type: ignore[arg-type]


def test_explain_reports_cached_mode_and_memory(seed: int) -> None:
    packed = make_packed(2, 64, 64)
    x, offsets = torch.zeros(3, 64, dtype=torch.bfloat16), offsets_of([2, 1])
    before = mxfp4.explain(x, packed, offsets)
    assert "fallback:  cached decoded weights" in before and "16.00 KiB (decoded on the next call)" in before
    mxfp4.grouped_mm(x, packed, offsets)
    after = mxfp4.explain(x, packed, offsets)
    assert "16.00 KiB (cached now)" in after and "holds 1 weight(s), 16.00 KiB" in after
    assert "compute:   torch._grouped_mm" in after
    masked = mxfp4.explain(x.view(1, 3, 64).expand(2, 3, 64).contiguous(), packed, masked_m=torch.ones(2, dtype=torch.int32))
    assert "compute:   torch.bmm" in masked


# ------------------------------------------------------------------------------------------------
# Forcing the portable path and the one SM90 check.


def fake_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "check_toolchain", lambda: (True, "NVRTC 13.0"))


def test_force_portable_api_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hopper(monkeypatch)
    assert dispatch.select_path("cuda:0").path == dispatch.SM90
    dispatch.force_portable(True)  # resets the cached decision
    choice = dispatch.select_path("cuda:0")
    assert choice.path == dispatch.PORTABLE and "force_portable(True)" in choice.reason
    dispatch.force_portable(False)
    assert dispatch.select_path("cuda:0").path == dispatch.SM90
    monkeypatch.setenv(dispatch.ENV_FORCE_PORTABLE, "1")
    dispatch.force_portable(False)  # the API overrides the variable
    assert dispatch.select_path("cuda:0").path == dispatch.SM90
    dispatch._forced = None
    dispatch.reset_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no degradation warning
        choice = dispatch.select_path("cuda:0")
    assert choice.path == dispatch.PORTABLE and "HOPPER_MXFP4_FORCE_PORTABLE=1" in choice.reason
    with pytest.raises(TypeError, match="enabled must be a bool"):
        dispatch.force_portable("yes")  # type: ignore[arg-type]


def test_is_sm90_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert not dispatch.is_sm90() and not dispatch.is_sm90("cpu") and not dispatch.is_sm90(0)


# ------------------------------------------------------------------------------------------------
# On a GPU: the forced fallback (run on the H100).


@pytest.fixture
def cache_for_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the in-register kernel is the default; a budget and no size rule send every call to the cache."""
    mxfp4.set_fallback_memory_budget(1 << 30)
    monkeypatch.setattr(fallback, "CACHE_MIN_ROWS", 0)


@pytest.mark.gpu
def test_forced_fallback_on_cuda(seed: int, cache_for_every_call: None) -> None:
    dispatch.force_portable(True)
    packed = make_packed(4, 200, 96, "cuda")
    text = mxfp4.explain(torch.zeros(1, 96, device="cuda", dtype=torch.bfloat16), packed, offsets_of([1, 0, 0, 0], device="cuda"))
    assert "path:      portable" in text and "force_portable" in text and "cached decoded weights" in text
    for _ in range(2):
        for counts in ([3, 0, 7, 1], [0, 0, 0, 1], [40, 1, 0, 300]):
            check_contiguous(packed, counts)
            check_contiguous(packed, counts, torch.int64)
        check_masked(packed, [3, 0, 5, 1], 5)
    assert weight_cache.stats("cuda").entries == 1 and weight_cache.stats("cuda").hits > 0
    packed.data.copy_(make_packed(4, 200, 96, "cuda").data)  # in place on the device: re-decoded
    check_contiguous(packed, [5, 0, 2, 9])


@pytest.mark.gpu
def test_forced_fallback_writes_every_row_of_a_poisoned_out(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    packed = make_packed(3, 128, 256, "cuda")
    counts = [5, 0, 11]
    offsets = offsets_of(counts, device="cuda")
    x = torch.randn(16, 256, device="cuda").bfloat16()
    ref = reference_grouped_mm_float64(x, packed, offsets)
    for budget, min_rows in ((None, 128), (0, 128), (1 << 30, 0)):  # kernel (default), kernel, cached copy
        mxfp4.set_fallback_memory_budget(budget)
        monkeypatch.setattr(fallback, "CACHE_MIN_ROWS", min_rows)
        out = torch.full((16, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
        fallback.portable_grouped_mm(x, packed.data, 128, 256, offsets, out)
        assert relative_error(out, ref) <= TOLERANCE
        masked = torch.full((3, 4, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
        xm = torch.randn(3, 4, 256, device="cuda").bfloat16()
        fallback.portable_grouped_mm_masked(xm, packed.data, 128, 256, torch.full((3,), 4, device="cuda"), masked)
        assert relative_error(masked, reference_grouped_mm_masked_float64(xm, packed)) <= TOLERANCE


@pytest.mark.gpu
def test_forced_fallback_on_a_second_stream(seed: int, cache_for_every_call: None) -> None:
    dispatch.force_portable(True)
    packed = make_packed(2, 256, 512, "cuda")
    check_contiguous(packed, [64, 64])  # decoded on the default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        check_contiguous(packed, [3, 90])
    torch.cuda.synchronize()
