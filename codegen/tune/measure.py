"""The sweep's GPU measure step: check one (shape, M, config) against a reference, then time it.

:class:`GpuMeasurer` is the ``measure`` callable of :func:`codegen.tune.sweep.run_sweep`. Its pieces,
one job each: :func:`measure_device` (which device, and its name), :class:`RotatingInputs` (the
random weights per shape and the input sets per M, rotated past the L2), :func:`relative_error`
(the check against an fp32 reference) and :func:`context_healthy` (whether a faulting kernel left
the CUDA context usable).
"""

from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from codegen.build.config import TileConfig

from .tables import Shape

DEFAULT_TOLERANCE = 1e-2


@dataclass
class Measurement:
    """What a measure step returns for one (shape, M, config).

    ``rel_error``: ``||out - ref|| / ||ref||`` (None: not checked, which the sweep counts as wrong).
    ``median_us`` may be None when the measure step skipped timing a wrong result.
    """

    median_us: float | None = None
    p10_us: float | None = None
    p90_us: float | None = None
    rel_error: float | None = None
    reps: int = 0
    note: str = ""


def random_weights(shape: Shape, device: Any, *, seed: int = 0, activations: str = "bf16"):
    """(packed, dequantized): random ``N(0, 1)`` weights ``[E, N, K]`` quantized to MXFP4 and packed (``activations``
    "fp8": in the FP8-ready layout), and the exact bf16 values they hold, built on ``device`` a few experts at a
    time. The same seed gives the same MXFP4 weight in both layouts."""
    import torch

    import mxfp4

    e, n, k = shape.num_experts, shape.n, shape.k
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + (zlib.crc32(shape.key.encode()) & 0xFFFF))
    step = max(1, (1 << 27) // (n * k))  # experts per chunk: bounded fp32 temporaries
    parts = []
    for e0 in range(0, e, step):
        w = torch.randn((min(e, e0 + step) - e0, n, k), generator=generator, dtype=torch.float32, device=device)
        parts.append(mxfp4.pack(mxfp4.quantize(w), activations=activations))
        del w
    packed = _joined(parts, n, k)
    del parts
    dequantized = torch.empty((e, n, k), dtype=torch.bfloat16, device=device)
    for e0 in range(0, e, step):
        e1 = min(e, e0 + step)
        dequantized[e0:e1] = _held_values(packed, e0, e1)
    return packed, dequantized


def _joined(parts: list, n: int, k: int):
    """One packed weight from packed chunks of experts (either layout)."""
    import torch

    import mxfp4

    join = lambda tensors: torch.cat(tensors) if len(tensors) > 1 else tensors[0]  # noqa: E731
    data = join([p.data for p in parts])
    if isinstance(parts[0], mxfp4.PackedMXFP4FP8):
        return mxfp4.PackedMXFP4FP8(data, join([p.row_scale for p in parts]), n, k,
                                    sum(p.rerounded_blocks for p in parts), sum(p.total_blocks for p in parts))
    return mxfp4.PackedMXFP4(data, n, k)


def _held_values(packed: Any, start: int, stop: int):
    """bf16 ``[stop - start, N, K]``: the weight values experts start:stop of a packed weight hold (exact)."""
    import torch

    import mxfp4
    from mxfp4.format.layout import unpack_experts
    from mxfp4.format.layout_fp8 import decode_fp8_values

    if isinstance(packed, mxfp4.PackedMXFP4FP8):
        values = decode_fp8_values(packed, start, stop, torch.float32)
        return (values * packed.row_scale[start:stop, : packed.n, None]).to(torch.bfloat16)
    return mxfp4.dequantize(unpack_experts(packed, start, stop), torch.bfloat16)


def measure_device(device: Any = None) -> tuple[Any, str]:
    """(device, its name). None: the current CUDA device, which must be SM90 with a usable toolchain (the
    kernels run there); an explicit device is taken as it is (a CPU dry run in tests, where ``time_cuda`` must
    then be replaced)."""
    import torch

    from codegen.build.toolchain import check_toolchain

    if device is not None:
        device = torch.device(device)
        return device, torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    if not torch.cuda.is_available():
        raise RuntimeError("GpuMeasurer needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    if tuple(torch.cuda.get_device_capability(device)) != (9, 0):
        raise RuntimeError(f"the sweep runs the SM90 kernels, and {name} is not SM90 (Hopper)")
    status = check_toolchain()
    if not status.ok:
        raise RuntimeError(f"the sweep cannot compile the SM90 kernels here: {status.reason}")
    return device, name


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context_healthy(device: Any) -> bool:
    """Whether the CUDA context still works (a faulting kernel makes every later call fail)."""
    import torch

    try:
        synchronize(device)
        return float(torch.ones(4, device=device).sum().item()) == 4.0
    except Exception:
        return False


@dataclass(frozen=True)
class Runner:
    """What the measure step runs: ``run(config, x, packed, offsets, x_scale)`` -> bf16 out (the config's kernel on
    one input set; x_scale: the W4A8 family's) and ``quantize(x)`` -> (e4m3 x, float32 row scales)."""

    run: Callable[..., Any]
    quantize: Callable[[Any], tuple[Any, Any]]


def _run_sm90(config: TileConfig, x: Any, packed: Any, offsets: Any, x_scale: Any = None) -> Any:
    """The config's SM90 kernel, launched as the op launches it once it has checked the call: into a fresh output
    on the current stream."""
    import torch

    from codegen.runtime.launch import EpilogueArgs, grouped_mm_sm90

    out = torch.empty((x.shape[0], packed.n), dtype=torch.bfloat16, device=x.device)
    if x_scale is None:
        grouped_mm_sm90(x, packed.data, packed.n, packed.k, offsets, False, config, out)
    else:
        epilogue = EpilogueArgs(x_scale=x_scale, w_scale=packed.row_scale)
        grouped_mm_sm90(x, packed.data, packed.n, packed.k, offsets, False, config, out, epilogue)
    return out


def _quantize_sm90(x: Any) -> tuple[Any, Any]:
    """x bf16 -> (e4m3, per-row float32 scale) by the SM90 quantizer kernel (``mxfp4.quantize_activations``'s)."""
    import torch

    from codegen.runtime.quantize import quantize_fp8_sm90

    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    quantize_fp8_sm90(x, out, scale)
    return out, scale


SM90_RUNNER = Runner(run=_run_sm90, quantize=_quantize_sm90)


class RotatingInputs:
    """The inputs of one (shape, M), rebuilt only when either changes.

    Per shape (and kernel family): random bf16 weights ``N(0, 1)``, quantized and packed once (the W4A8
    family: in the FP8-ready layout), plus their bf16 dequantization (exact) for the reference. Per M: x of
    ``E * M`` rows and enough copies of (x, weights, offsets) to rotate past the L2
    (``codegen.tune.timing.rotation_sets``), within ``memory_budget`` bytes (None: a quarter of the free
    GPU memory, at most 4 GiB). Per routing (``codegen.tune.loads``: "uniform", M rows per expert, or "zipf", the
    same total rows split 1/rank^1.1 as the benchmarks split them, ``row_loads`` with this seed): the int32
    offsets of its loads. Every routing has the same total rows, so the routings share x and the weights and
    differ only in the offsets. ``sets`` holds the current routing's (x, weights, offsets) per copy (the W4A8
    family: (x_fp8, weights, offsets, x_scale)), ``offsets_host`` its offsets as a list.
    """

    def __init__(self, device: Any, *, seed: int = 0, memory_budget: int | None = None, runner: Runner | None = None):
        self.device, self.seed, self.memory_budget = device, seed, memory_budget
        self.runner = runner or SM90_RUNNER
        self.shape: Shape | None = None
        self.activations = "bf16"
        self.m: int | None = None
        self.weights: Any = None  # (packed, dequantized bf16)
        self.routing = "uniform"
        self.sets: list[tuple] = []
        self.offsets_host: list[int] = []
        self._by_routing: dict[str, tuple[list[tuple], list[int]]] = {}

    @property
    def dequantized(self) -> Any:
        return self.weights[1]

    def release(self) -> None:
        import torch

        self.shape = self.weights = self.m = None
        self.sets, self.offsets_host, self._by_routing = [], [], {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def prepare(self, shape: Shape, m: int, activations: str = "bf16", routing: str = "uniform") -> None:
        if self.shape != shape or self.activations != activations:
            self.release()
            self.weights = random_weights(shape, self.device, seed=self.seed, activations=activations)
            self.shape, self.activations = shape, activations
        if self.m != m:
            self._build_sets(shape, m)
        self._select(routing)

    def _select(self, routing: str) -> None:
        """Make ``routing``'s offsets current: the uniform sets with the offsets of its loads swapped in (the
        offsets are per copy, like the rest of a set; x, the weights and the scales are shared)."""
        from .loads import offsets_from_loads, row_loads

        if routing not in self._by_routing:
            bounds = offsets_from_loads(row_loads(routing, self.shape.num_experts, self.m, seed=self.seed))
            uniform = self._by_routing["uniform"][0]
            offsets = _int32_tensor(bounds, self.device)
            sets = [(*s[:2], offsets if i == 0 else offsets.clone(), *s[3:]) for i, s in enumerate(uniform)]
            self._by_routing[routing] = (sets, bounds)
        self.sets, self.offsets_host = self._by_routing[routing]
        self.routing = routing

    def _budget(self) -> int:
        import torch

        if self.memory_budget is not None:
            return self.memory_budget
        if self.device.type == "cuda":
            return min(4 << 30, int(torch.cuda.mem_get_info(self.device)[0] * 0.25))
        return 8 << 20

    def _build_sets(self, shape: Shape, m: int) -> None:
        import torch

        from .timing import l2_cache_bytes, rotation_sets

        packed, _ = self.weights
        self.sets, self.offsets_host, self._by_routing = [], [], {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        e, n, k = shape.num_experts, shape.n, shape.k
        tokens = e * m
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 1_000_003 + 7919 * m + 1)
        x = torch.randn((tokens, k), generator=generator, dtype=torch.bfloat16, device=self.device)
        bounds = [i * m for i in range(e + 1)]  # uniform: M rows per expert
        offsets = _int32_tensor(bounds, self.device)
        if self.activations == "bf16":
            first: tuple = (x, packed, offsets)
        else:  # the W4A8 family: (x_fp8, weights, offsets, x_scale)
            x_fp8, x_scale = self.runner.quantize(x)
            first = (x_fp8, packed, offsets, x_scale)
        per_set = packed.data.numel() + first[0].numel() * first[0].element_size() + tokens * n * 2
        l2 = l2_cache_bytes(self.device if self.device.type == "cuda" else None)
        count = rotation_sets(per_set, l2_bytes=l2, memory_budget=max(self._budget(), per_set))
        sets = [first] + [tuple(_copy(item) for item in first) for _ in range(count - 1)]
        self._by_routing = {"uniform": (sets, bounds)}
        self.m = m


def _int32_tensor(values: list[int], device: Any):
    """An int32 tensor of ``values`` on ``device`` (the kernels' offsets)."""
    import torch

    return torch.tensor(values, dtype=torch.int32, device=device)


def _copy(item: Any) -> Any:
    """A copy of one rotating input (a tensor or a packed weight of either layout) in fresh memory."""
    import mxfp4

    if isinstance(item, mxfp4.PackedMXFP4FP8):
        return mxfp4.PackedMXFP4FP8(item.data.clone(), item.row_scale.clone(), item.n, item.k, item.rerounded_blocks,
                                    item.total_blocks)
    if isinstance(item, mxfp4.PackedMXFP4):
        return mxfp4.PackedMXFP4(item.data.clone(), item.n, item.k)
    return item.clone()


@contextmanager
def _exact_fp32() -> Iterator[None]:
    """fp32 matmuls without TF32 inside the block (the reference must not round to 10 mantissa bits)."""
    import torch

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def relative_error(out: Any, x: Any, dequantized: Any, offsets_host: Sequence[int]) -> float:
    """``||out - ref|| / ||ref||`` with ref in fp32 from the bf16 ``dequantized`` weights ``[E, N, K]``
    (TF32 off): expert e's rows are ``offsets_host[e]:offsets_host[e + 1]`` (any loads, empty experts too),
    computed a few thousand rows at a time; inf for a non-finite result."""
    import torch

    e, n, k = dequantized.shape
    rows_per_chunk = max(1, (1 << 28) // ((k + 2 * n) * 4))  # ~256 MB of fp32 per chunk
    diff2 = torch.zeros((), dtype=torch.float64, device=out.device)
    ref2 = torch.zeros((), dtype=torch.float64, device=out.device)
    with _exact_fp32():
        for expert in range(e):
            start, stop = offsets_host[expert], offsets_host[expert + 1]
            weight = dequantized[expert].float().T if stop > start else None
            for first in range(start, stop, rows_per_chunk):
                rows = slice(first, min(stop, first + rows_per_chunk))
                ref = x[rows].float() @ weight
                diff2 += (out[rows].float() - ref).double().square().sum()
                ref2 += ref.double().square().sum()
    value = float((diff2.sqrt() / ref2.sqrt().clamp_min(1e-30)).item())
    return value if math.isfinite(value) else float("inf")


class GpuMeasurer:
    """``measure(shape, m, config, routing)`` on the current CUDA device: check, then time the config's kernel.

    The inputs are :class:`RotatingInputs` (built once per shape, freed by :meth:`release`). The
    check is :func:`relative_error`; a result over ``tolerance`` is returned untimed. A correct one
    is timed (``codegen.tune.timing.time_cuda`` over the rotating sets) and checked once more after.
    ``runner`` says what runs (default: the SM90 kernels; a dry run on the CPU passes one of its own).
    """

    def __init__(
        self,
        *,
        rep: int = 50,
        warmup_ms: float = 20.0,
        max_ms: float = 1500.0,
        tolerance: float = DEFAULT_TOLERANCE,
        seed: int = 0,
        memory_budget: int | None = None,
        device: Any = None,
        runner: Runner | None = None,
    ):
        self.device, self.device_name = measure_device(device)
        self.rep, self.warmup_ms, self.max_ms = rep, warmup_ms, max_ms
        self.tolerance = tolerance
        self.inputs = RotatingInputs(self.device, seed=seed, memory_budget=memory_budget, runner=runner)
        self.runner = self.inputs.runner

    def release(self) -> None:
        self.inputs.release()

    def healthy(self) -> bool:
        return context_healthy(self.device)

    def _check(self, config: TileConfig) -> float:
        x, packed, offsets, *x_scale = self.inputs.sets[0]
        out = self.runner.run(config, x, packed, offsets, *x_scale)
        synchronize(self.device)
        x_reference = x if not x_scale else x.float() * x_scale[0].unsqueeze(1)  # the fp8-rounded x
        return relative_error(out, x_reference, self.inputs.dequantized, self.inputs.offsets_host)

    def __call__(self, shape: Shape, m: int, config: TileConfig, routing: str = "uniform") -> Measurement:
        """Check and time ``config`` at ``m`` tokens per expert on average, with ``routing``'s loads."""
        from .timing import time_cuda

        self.inputs.prepare(shape, m, config.activations, routing)
        rel = self._check(config)
        if not rel <= self.tolerance:
            return Measurement(rel_error=rel, note="untimed: wrong result")
        timing = time_cuda(
            lambda *inputs: self.runner.run(config, *inputs),
            rotate=self.inputs.sets,
            warmup_ms=self.warmup_ms,
            rep=self.rep,
            max_ms=self.max_ms,
        )
        rel = max(rel, self._check(config))  # timing must not have changed the answer
        return Measurement(
            median_us=timing.median_us,
            p10_us=timing.p10_us,
            p90_us=timing.p90_us,
            rel_error=rel,
            reps=len(timing.samples),
            note=f"{len(self.inputs.sets)} rotating input set(s)",
        )
