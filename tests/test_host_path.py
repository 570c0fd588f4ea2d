"""The eager hot path: a plain eager call skips the torch.library dispatch; anything that must see
the op (autograd, compile, modes) goes through it, and backward says the ops are inference-only."""

from __future__ import annotations

import pytest
import torch

import mxfp4
from mxfp4.ops import grouped_gemm as ops


@pytest.fixture()
def problem():
    generator = torch.Generator().manual_seed(7)
    weight = mxfp4.quantize(torch.randn(3, 64, 96, generator=generator))
    x = torch.randn(6, 96, generator=generator).to(torch.bfloat16)
    return x, mxfp4.pack(weight), torch.tensor([0, 2, 2, 6], dtype=torch.int32)


def counting_impl(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = ops._grouped_mm_impl

    def impl(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops, "_grouped_mm_impl", impl)
    return calls


def test_plain_eager_call_runs_the_implementation_directly(monkeypatch: pytest.MonkeyPatch, problem) -> None:
    x, packed, offsets = problem
    calls = counting_impl(monkeypatch)
    direct = mxfp4.grouped_mm(x, packed, offsets)
    assert calls == [1]
    through_op = torch.ops.mxfp4.grouped_mm(x, packed.data, offsets, packed.n, packed.k, "")
    assert torch.equal(direct, through_op)


def test_autograd_goes_through_the_op_and_backward_says_inference_only(monkeypatch: pytest.MonkeyPatch, problem) -> None:
    x, packed, offsets = problem
    calls = counting_impl(monkeypatch)
    x = x.clone().requires_grad_()
    out = mxfp4.grouped_mm(x, packed, offsets)
    assert calls == [] and out.requires_grad  # recorded by autograd, not run around it
    with pytest.raises(RuntimeError, match=r"mxfp4\.grouped_mm is inference-only.*torch\.no_grad"):
        out.sum().backward()
    with torch.no_grad():
        mxfp4.grouped_mm(x, packed, offsets)
    assert calls == [1]


def test_masked_backward_says_inference_only(problem) -> None:
    x, packed, _ = problem
    x3 = x.view(3, 2, 96).clone().requires_grad_()
    out = mxfp4.grouped_mm_masked(x3, packed, torch.full((3,), 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"mxfp4\.grouped_mm_masked is inference-only"):
        out.sum().backward()


def test_a_torch_function_mode_sees_the_op(monkeypatch: pytest.MonkeyPatch, problem) -> None:
    x, packed, offsets = problem
    calls = counting_impl(monkeypatch)
    seen: list[str] = []

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder():
        mxfp4.grouped_mm(x, packed, offsets)
    assert calls == [] and any("mxfp4.grouped_mm" in name for name in seen)
