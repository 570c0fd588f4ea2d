"""The torch ops ``mxfp4::grouped_mm`` and ``mxfp4::grouped_mm_masked`` and their Python wrappers.

The wrappers take a :class:`PackedMXFP4` and unwrap it; the custom ops take plain tensors and ints
(what ``torch.library`` can schema), have fake kernels for ``torch.compile(fullgraph=True)``, and pick
the SM90 kernel or the portable path per device (``mxfp4.ops.dispatch``).

Validation happens before any launch and never synchronizes with a CUDA device: shapes, dtypes and
devices are always checked; the *values* of ``offsets`` / ``masked_m`` only when they live on the CPU,
or on any device after ``set_debug_checks(True)`` (which costs a device sync per call).
Non-contiguous ``x`` is rejected rather than silently copied: the hot path allocates nothing but
the output, so a copy is left to the caller to see and pay for.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch

from codegen.build.config import MAX_EXPERTS, TileConfig
from mxfp4.format.layout import ATOM_BYTES, ATOM_K, ATOM_N, PackedMXFP4
from mxfp4.format.layout_fp8 import PackedMXFP4FP8
from mxfp4.format.tensor import BLOCK_SIZE, MXFP4Tensor
from mxfp4.portable.fallback import portable_grouped_mm, portable_grouped_mm_masked
from mxfp4.portable.fallback_fp8 import (
    portable_grouped_mm_fp8,
    portable_grouped_mm_masked_fp8,
)

from .dispatch import SM90, choose_config, describe_call, select_path

_INDEX_DTYPES = (torch.int32, torch.int64)
_X_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
_debug_checks = False


def set_debug_checks(enabled: bool) -> None:
    """Also check the values of device-resident ``offsets`` / ``masked_m`` (syncs every call)."""
    global _debug_checks
    if not isinstance(enabled, bool):  # bool("false") is True: a string must not switch the checks on
        raise TypeError(f"set_debug_checks: enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    _debug_checks = enabled


def debug_checks_enabled() -> bool:
    return _debug_checks


# ---------------------------------------------------------------------------------------------
# Validation. Messages name the user-facing argument (x, w, offsets, masked_m, config).


def _check_weight(op: str, w: object) -> PackedMXFP4 | PackedMXFP4FP8:
    if isinstance(w, MXFP4Tensor):
        raise TypeError(
            f"{op}: w is an unpacked MXFP4Tensor; call w = mxfp4.pack(w) once (at load time) "
            "and pass the PackedMXFP4"
        )
    if not isinstance(w, (PackedMXFP4, PackedMXFP4FP8)):
        raise TypeError(f"{op}: w must be a PackedMXFP4 (from mxfp4.pack), got {type(w).__name__}")
    return w


def _check_tensor(op: str, name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _config_name(op: str, config: TileConfig | str | None) -> str:
    if config is None or config == "":
        return ""
    if isinstance(config, TileConfig):
        config.validate()
        return config.name
    if isinstance(config, str):
        try:
            return TileConfig.from_name(config).name
        except ValueError as error:
            raise ValueError(f"{op}: config: {error}") from None
    raise TypeError(f"{op}: config must be a TileConfig, a config name or None, got {type(config).__name__}")


def _check_x_and_w(op: str, x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, x_dims: int) -> None:
    layout = "[T, K]" if x_dims == 2 else "[E, max_m, K]"
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"{op}: x must be bfloat16 (or float8_e4m3fn with x_scale), got {x.dtype}")
    if x.dim() != x_dims:
        raise ValueError(f"{op}: x must be {layout}, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous; pass x.contiguous()")
    if w_data.dtype != torch.uint8 or w_data.dim() != 4:
        raise ValueError(f"{op}: w.data must be uint8 [E, N/64, K/64, {ATOM_BYTES}], got {w_data.dtype} {tuple(w_data.shape)}")
    if k <= 0 or k % BLOCK_SIZE:
        raise ValueError(f"{op}: w.k = {k}: K must be a positive multiple of {BLOCK_SIZE}")
    expected = (-(-n // ATOM_N), -(-k // ATOM_K), ATOM_BYTES)
    if n < 0 or tuple(w_data.shape[1:]) != expected:
        raise ValueError(f"{op}: w.data has shape {tuple(w_data.shape)}, expected [E, {expected[0]}, {expected[1]}, {expected[2]}] for N={n}, K={k}")
    if not w_data.is_contiguous():
        raise ValueError(f"{op}: w.data must be contiguous")
    num_experts = w_data.shape[0]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"{op}: w has {num_experts} experts; 1 to {MAX_EXPERTS} are supported")
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x.shape[-1] = {x.shape[-1]} but w.k = {k}; x must be {layout} with K = w.k")
    if w_data.device != x.device:
        raise ValueError(f"{op}: w is on {w_data.device} but x is on {x.device}; move w with w.to(x.device)")


def _check_index(op: str, name: str, value: torch.Tensor, length: int, what: str, x: torch.Tensor) -> None:
    if value.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{op}: {name} must have shape [{what}] = [{length}], got {tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{op}: {name} is on {value.device} but x is on {x.device}; they must share a device")
    if not value.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _check_row_scales(op: str, name: str, value: torch.Tensor, shape: tuple[int, ...], what: str, x: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be float32, got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {what} = {list(shape)}, got {tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{op}: {name} is on {value.device} but x is on {x.device}; they must share a device")
    if not value.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _check_scales(op: str, x: torch.Tensor, x_scale: torch.Tensor | None, w_data: torch.Tensor,
                  w_scale: torch.Tensor | None) -> None:
    """x_scale goes with float8 x (one scale per row); w_scale with FP8-ready weights (their row scales)."""
    fp8 = x.dtype == torch.float8_e4m3fn
    if fp8 and x_scale is None:
        raise ValueError(f"{op}: x is float8_e4m3fn but x_scale is missing; pass x_scale= (float32, one per row of x), "
                         "as x_fp8, x_scale = mxfp4.quantize_activations(x) gives it")
    if not fp8 and x_scale is not None:
        raise ValueError(f"{op}: x_scale is given but x is {x.dtype}; x_scale goes with float8_e4m3fn x "
                         "(x_fp8, x_scale = mxfp4.quantize_activations(x))")
    if not fp8 and w_scale is not None:
        raise TypeError(f"{op}: w was packed for FP8 activations (mxfp4.pack(w, activations='fp8')) but x is {x.dtype}; "
                        "pass x_fp8, x_scale = mxfp4.quantize_activations(x), or pack w with mxfp4.pack(w)")
    if x_scale is not None:
        _check_row_scales(op, "x_scale", x_scale, tuple(x.shape[:-1]), "x.shape[:-1]", x)
    if w_scale is not None:
        rows = (w_data.shape[0], w_data.shape[1] * ATOM_N)
        _check_row_scales(op, "w.row_scale", w_scale, rows, "[E, N padded to 64]", x)


def _check_config_family(op: str, config: str, w_scale: torch.Tensor | None) -> None:
    """A forced config must be of the weights' kernel family (W4A8 for FP8-ready weights, W4A16 otherwise)."""
    if not config:
        return
    wanted = "fp8" if w_scale is not None else "bf16"
    family = _config_from_name(config).activations
    if family != wanted:
        weights = "FP8-ready (mxfp4.pack(w, activations='fp8'))" if wanted == "fp8" else "packed by mxfp4.pack(w)"
        raise ValueError(f"{op}: config {config} is a {family}-activation kernel but w is {weights}; "
                         f"force a config of activations={wanted!r} or pass config=None")


def _values_checkable(value: torch.Tensor) -> bool:
    return value.device.type == "cpu" or _debug_checks


def _check_offsets_values(op: str, offsets: torch.Tensor, total: int) -> None:
    if not _values_checkable(offsets):
        return
    bounds = offsets.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{op}: offsets must start at 0, got offsets[0] = {bounds[0]}")
    for e in range(len(bounds) - 1):
        if bounds[e + 1] < bounds[e]:
            raise ValueError(f"{op}: offsets must not decrease, got offsets[{e}] = {bounds[e]} > offsets[{e + 1}] = {bounds[e + 1]}")
    if bounds[-1] != total:
        raise ValueError(f"{op}: offsets must end at T = x.shape[0] = {total}, got offsets[-1] = {bounds[-1]}")


def _check_masked_values(op: str, masked_m: torch.Tensor, max_m: int) -> None:
    if not _values_checkable(masked_m):
        return
    for e, m in enumerate(masked_m.tolist()):
        if not 0 <= m <= max_m:
            raise ValueError(f"{op}: masked_m[{e}] = {m} is outside [0, max_m = x.shape[1] = {max_m}]")


# ---------------------------------------------------------------------------------------------
# The implementations. The custom ops run them; so does an eager call that needs no tracing or
# autograd (see runs_directly), which skips the torch.library dispatch (tens of microseconds).


@lru_cache(maxsize=256)
def _config_from_name(name: str) -> TileConfig:
    return TileConfig.from_name(name)


def _launch_sm90(
    x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, rows: torch.Tensor, masked: bool,
    config: str, out: torch.Tensor, tokens_hint: int, device_name: str | None,
    x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
) -> None:
    from codegen.runtime.launch import (
        grouped_mm_sm90,  # lazy: CPU machines never import cuda-python
    )

    activations = "fp8" if w_scale is not None else "bf16"
    if config:
        tile = _config_from_name(config)
    else:
        # Offsets mode: x's rows are all the rows, so at most that many experts have work (masked: any expert may).
        rows_known = None if masked else x.shape[0]
        tile = choose_config(w_data.shape[0], n, k, tokens_hint, device_name, activations, rows_known).config
    # The kernel reads int32 and int64 routing alike: no cast, no allocation in the hot path.
    if x_scale is None:
        grouped_mm_sm90(x, w_data, n, k, rows, masked, tile, out)
        return
    from codegen.runtime.launch import EpilogueArgs

    if w_scale is None:  # plain weights: the W4A16 kernel on x widened to bf16 (exact), x_scale in its epilogue
        x = x.to(torch.bfloat16)
    grouped_mm_sm90(x, w_data, n, k, rows, masked, tile, out, EpilogueArgs(x_scale=x_scale, w_scale=w_scale))


def _check_grouped_mm(x: torch.Tensor, w_data: torch.Tensor, offsets: torch.Tensor, n: int, k: int, config: str = "",
                      x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> None:
    op = "grouped_mm"
    _check_x_and_w(op, x, w_data, n, k, 2)
    _check_scales(op, x, x_scale, w_data, w_scale)
    _check_config_family(op, config, w_scale)
    _check_index(op, "offsets", offsets, w_data.shape[0] + 1, "E + 1", x)
    _check_offsets_values(op, offsets, x.shape[0])


def _check_grouped_mm_masked(x: torch.Tensor, w_data: torch.Tensor, masked_m: torch.Tensor, n: int, k: int,
                             config: str = "", x_scale: torch.Tensor | None = None,
                             w_scale: torch.Tensor | None = None) -> None:
    op = "grouped_mm_masked"
    _check_x_and_w(op, x, w_data, n, k, 3)
    _check_scales(op, x, x_scale, w_data, w_scale)
    _check_config_family(op, config, w_scale)
    _check_masked_shapes(op, x, w_data, masked_m)
    _check_masked_values(op, masked_m, x.shape[1])


def _grouped_mm_impl(x: torch.Tensor, w_data: torch.Tensor, offsets: torch.Tensor, n: int, k: int, config: str,
                     x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check_grouped_mm(x, w_data, offsets, n, k, config, x_scale, w_scale)
    return _grouped_mm_run(x, w_data, offsets, n, k, config, x_scale, w_scale)


def _grouped_mm_run(x: torch.Tensor, w_data: torch.Tensor, offsets: torch.Tensor, n: int, k: int, config: str,
                    x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The product on the device's path, arguments already checked."""
    if x.shape[0] == 0 or n == 0:
        return torch.empty((x.shape[0], n), dtype=torch.bfloat16, device=x.device)
    choice = select_path(x.device)
    if choice.path != SM90:
        if x_scale is not None:
            return portable_grouped_mm_fp8(x, x_scale, w_data, n, k, offsets, w_scale)
        return portable_grouped_mm(x, w_data, n, k, offsets)  # its own output: no extra copy
    # x is bf16 on the right device: no dtype/device arguments to parse on the usual path.
    out = x.new_empty((x.shape[0], n)) if x_scale is None else x.new_empty((x.shape[0], n), dtype=torch.bfloat16)
    hint = -(-x.shape[0] // w_data.shape[0])
    _launch_sm90(x, w_data, n, k, offsets, False, config, out, hint, choice.device_name, x_scale, w_scale)
    return out


def _grouped_mm_masked_impl(x: torch.Tensor, w_data: torch.Tensor, masked_m: torch.Tensor, n: int, k: int, config: str,
                            x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check_grouped_mm_masked(x, w_data, masked_m, n, k, config, x_scale, w_scale)
    out = x.new_empty((x.shape[0], x.shape[1], n), dtype=torch.bfloat16)
    if x.shape[1] == 0 or n == 0:
        return out
    choice = select_path(x.device)
    if choice.path == SM90:
        _launch_sm90(x, w_data, n, k, masked_m, True, config, out, x.shape[1], choice.device_name, x_scale, w_scale)
    elif x_scale is not None:
        portable_grouped_mm_masked_fp8(x, x_scale, w_data, n, k, w_scale, out)
    else:
        portable_grouped_mm_masked(x, w_data, n, k, masked_m, out)
    return out


def _check_masked_shapes(op: str, x: torch.Tensor, w_data: torch.Tensor, masked_m: torch.Tensor) -> None:
    if x.shape[0] != w_data.shape[0]:
        raise ValueError(f"{op}: x.shape[0] = {x.shape[0]} but w has {w_data.shape[0]} experts; x must be [E, max_m, K]")
    _check_index(op, "masked_m", masked_m, w_data.shape[0], "E", x)


# ---------------------------------------------------------------------------------------------
# The custom ops: what torch.compile, export and autograd see.

_grouped_mm_op = torch.library.custom_op("mxfp4::grouped_mm", mutates_args=())(_grouped_mm_impl)
_grouped_mm_masked_op = torch.library.custom_op("mxfp4::grouped_mm_masked", mutates_args=())(_grouped_mm_masked_impl)


@_grouped_mm_op.register_fake
def _grouped_mm_fake(x: torch.Tensor, w_data: torch.Tensor, offsets: torch.Tensor, n: int, k: int, config: str,
                     x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check_x_and_w("grouped_mm", x, w_data, n, k, 2)
    _check_scales("grouped_mm", x, x_scale, w_data, w_scale)
    _check_index("grouped_mm", "offsets", offsets, w_data.shape[0] + 1, "E + 1", x)
    return x.new_empty((x.shape[0], n), dtype=torch.bfloat16)


@_grouped_mm_masked_op.register_fake
def _grouped_mm_masked_fake(x: torch.Tensor, w_data: torch.Tensor, masked_m: torch.Tensor, n: int, k: int, config: str,
                            x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check_x_and_w("grouped_mm_masked", x, w_data, n, k, 3)
    _check_scales("grouped_mm_masked", x, x_scale, w_data, w_scale)
    _check_masked_shapes("grouped_mm_masked", x, w_data, masked_m)
    return x.new_empty((x.shape[0], x.shape[1], n), dtype=torch.bfloat16)


def inference_only_backward(op: str) -> Callable[..., None]:
    """The autograd formula of an mxfp4 op: an error that says the op is inference-only."""
    def backward(ctx, grad):
        raise RuntimeError(
            f"mxfp4.{op} is inference-only: it has no gradient (the MXFP4 weights are frozen, and a gradient "
            "with respect to x is not implemented). Call it under torch.no_grad() / torch.inference_mode(), "
            "or detach its input."
        )

    return backward


_grouped_mm_op.register_autograd(inference_only_backward("grouped_mm"))
_grouped_mm_masked_op.register_autograd(inference_only_backward("grouped_mm_masked"))


def runs_directly(x: torch.Tensor) -> bool:
    """Whether an eager call may run the implementation without the torch.library dispatch: a plain
    tensor, no autograd to record, and no compiler, tracer or mode that must see the op."""
    return (
        type(x) is torch.Tensor
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._len_torch_dispatch_stack()
    )


# ---------------------------------------------------------------------------------------------
# The user API.


def _call(op: str, impl: Callable[..., torch.Tensor], custom_op: Callable[..., torch.Tensor], x: object, w: object,
          rows_name: str, rows: object, config: object, x_scale: object) -> torch.Tensor:
    """Check the Python-level arguments, then run ``impl`` directly (plain eager) or through the op."""
    w = _check_weight(op, w)
    _check_tensor(op, "x", x)
    _check_tensor(op, rows_name, rows)
    if x_scale is not None:
        _check_tensor(op, "x_scale", x_scale)
    name = _config_name(op, config)
    w_scale = w.row_scale if isinstance(w, PackedMXFP4FP8) else None
    if runs_directly(x):
        return impl(x, w.data, rows, w.n, w.k, name, x_scale, w_scale)
    return custom_op(x, w.data, rows, w.n, w.k, name, x_scale, w_scale)


def grouped_mm(
    x: torch.Tensor, w: PackedMXFP4 | PackedMXFP4FP8, offsets: torch.Tensor, *, config: TileConfig | str | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ W_e^T`` for every expert e.

    x: bf16 ``[T, K]``, rows grouped by expert, or float8_e4m3fn ``[T, K]`` with ``x_scale`` float32 ``[T]``
    (``x_fp8, x_scale = mxfp4.quantize_activations(x)``: the W4A8 kernel with ``mxfp4.pack(weight,
    activations="fp8")`` weights; plain packed weights take it too, on the W4A16 kernel);
    w: ``mxfp4.pack(weight)`` of an ``[E, N, K]`` weight; offsets: int32/int64 ``[E + 1]``, rising from 0 to T,
    on x's device. Returns bf16 ``[T, N]``. ``config`` forces a tile config on the SM90 path (None: chosen
    from the tuning table).
    """
    return _call("grouped_mm", _grouped_mm_impl, torch.ops.mxfp4.grouped_mm, x, w, "offsets", offsets, config, x_scale)


def grouped_mm_trusted(x: torch.Tensor, w: PackedMXFP4 | PackedMXFP4FP8, offsets: torch.Tensor,
                       x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`grouped_mm` for a caller that built ``x``, ``offsets`` and ``x_scale`` itself from checked inputs
    (the MoE layer's composition): the same path and result; a plain eager call skips the argument checks
    (tens of microseconds of Python per call), any other goes through the op, which torch.compile and the
    torch modes see."""
    w_scale = w.row_scale if isinstance(w, PackedMXFP4FP8) else None
    if runs_directly(x):
        return _grouped_mm_run(x, w.data, offsets, w.n, w.k, "", x_scale, w_scale)
    return torch.ops.mxfp4.grouped_mm(x, w.data, offsets, w.n, w.k, "", x_scale, w_scale)


def grouped_mm_masked(
    x: torch.Tensor, w: PackedMXFP4 | PackedMXFP4FP8, masked_m: torch.Tensor, *, config: TileConfig | str | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[e, :masked_m[e]] = x[e, :masked_m[e]] @ W_e^T``; rows at or past masked_m[e] are undefined.

    x: bf16 ``[E, max_m, K]``, or float8_e4m3fn with ``x_scale`` float32 ``[E, max_m]`` (as for
    :func:`grouped_mm`); masked_m: int32/int64 ``[E]`` on x's device. Returns bf16 ``[E, max_m, N]``.
    Shapes do not depend on the routing, so this variant captures into CUDA graphs for decode.
    """
    return _call("grouped_mm_masked", _grouped_mm_masked_impl, torch.ops.mxfp4.grouped_mm_masked, x, w, "masked_m",
                 masked_m, config, x_scale)


def explain(
    x: torch.Tensor, w: PackedMXFP4 | PackedMXFP4FP8, offsets: torch.Tensor | None = None,
    masked_m: torch.Tensor | None = None, *, config: TileConfig | str | None = None, x_scale: torch.Tensor | None = None,
) -> str:
    """What ``grouped_mm(x, w, offsets)`` / ``grouped_mm_masked(x, w, masked_m)`` would do, and why.

    First the op's own checks (the same functions, so explain raises what the call would raise; without
    offsets / masked_m, the checks of x and w), then ``mxfp4.ops.dispatch.describe_call``'s report: problem
    shape, device and capability, toolchain, path, the kernel family (W4A16 or W4A8), and on the SM90 path
    the tile config and why. float8 x needs its ``x_scale``, as the call does.
    """
    if offsets is not None and masked_m is not None:
        raise ValueError("explain: pass offsets (grouped_mm) or masked_m (grouped_mm_masked), not both")
    masked = masked_m is not None or (offsets is None and isinstance(x, torch.Tensor) and x.dim() == 3)
    op, rows_name, rows = ("grouped_mm_masked", "masked_m", masked_m) if masked else ("grouped_mm", "offsets", offsets)
    w = _check_weight(op, w)
    _check_tensor(op, "x", x)
    if x_scale is not None:
        _check_tensor(op, "x_scale", x_scale)
    name = _config_name(op, config)
    w_scale = w.row_scale if isinstance(w, PackedMXFP4FP8) else None
    if rows is None:
        _check_x_and_w(op, x, w.data, w.n, w.k, 3 if masked else 2)
        _check_scales(op, x, x_scale, w.data, w_scale)
        _check_config_family(op, name, w_scale)
    else:
        _check_tensor(op, rows_name, rows)
        (_check_grouped_mm_masked if masked else _check_grouped_mm)(x, w.data, rows, w.n, w.k, name, x_scale, w_scale)
    return describe_call(x, w, masked, name)
