"""Which path a call takes (the SM90 kernel or the portable torch path) and why.

Checked once per device and cached: the answer cannot change within a process, and the hot path
must not query the driver or the toolchain on every call. Off-Hopper, or on Hopper without a working
toolchain, the portable path runs and ONE warning per process says why; nothing crashes.

The portable path can be forced on any device (to test or benchmark the fallback on an H100) with
the environment variable ``HOPPER_MXFP4_FORCE_PORTABLE=1`` or ``force_portable(True)``.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

SM90 = "sm90"
PORTABLE = "portable"
_SM90_CAPABILITY = (9, 0)
ENV_FORCE_PORTABLE = "HOPPER_MXFP4_FORCE_PORTABLE"


def is_sm90(device: torch.device | str | int | None = None) -> bool:
    """Whether ``device`` (default: the current CUDA device) is a CUDA GPU of compute capability 9.0."""
    if not torch.cuda.is_available():
        return False
    if device is not None and not isinstance(device, int):
        device = torch.device(device)
        if device.type != "cuda":
            return False
    return tuple(torch.cuda.get_device_capability(device)) == _SM90_CAPABILITY


@dataclass(frozen=True)
class PathChoice:
    """The path for one device: ``path`` is "sm90" or "portable"; ``reason`` says why."""

    path: str
    reason: str
    device: str
    capability: tuple[int, int] | None = None
    device_name: str | None = None
    toolchain: str | None = None  # the toolchain check's verdict, when it was made


_lock = threading.Lock()
_cache: dict[tuple[str, int | None], PathChoice] = {}
_warned = False
_forced: bool | None = None  # force_portable(); None: follow the environment variable


def force_portable(enabled: bool) -> None:
    """Take the portable path on every device (True), or decide per device again (False).

    Overrides ``HOPPER_MXFP4_FORCE_PORTABLE`` and forgets the cached decisions.
    """
    global _forced
    if not isinstance(enabled, bool):
        raise TypeError(f"force_portable: enabled must be a bool, got {type(enabled).__name__}")
    _forced = enabled
    reset_cache()


def _forced_reason() -> str | None:
    """Why the portable path is forced, or None when it is not."""
    if _forced is not None:
        return "forced by mxfp4.force_portable(True)" if _forced else None
    value = os.environ.get(ENV_FORCE_PORTABLE, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return None
    return f"forced by {ENV_FORCE_PORTABLE}={os.environ[ENV_FORCE_PORTABLE]}"


def _device_key(device: torch.device) -> tuple[str, int | None]:
    if device.type == "cuda":
        return ("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return (device.type, None)


def check_toolchain() -> tuple[bool, str]:
    """``codegen.build.toolchain.check_toolchain()`` as (ok, reason)."""
    from codegen.build.toolchain import (
        check_toolchain as _check,  # lazy: only a CUDA device asks
    )

    try:
        result = _check()
    except Exception as error:  # a broken toolchain must never take the op down
        return False, f"toolchain check failed: {type(error).__name__}: {error}"
    return bool(result.ok), str(result.reason)


def _decide(key: tuple[str, int | None]) -> PathChoice:
    kind, index = key
    if kind != "cuda":
        return PathChoice(PORTABLE, f"device is {kind}", kind)
    name = f"cuda:{index}"
    capability = tuple(torch.cuda.get_device_capability(index))
    device_name = torch.cuda.get_device_name(index)
    sm = f"sm_{capability[0]}{capability[1]}"
    forced = _forced_reason()
    if forced is not None:
        return PathChoice(PORTABLE, f"portable path {forced} (GPU {sm}, {device_name})", name, capability, device_name)
    if capability != _SM90_CAPABILITY:
        reason = f"GPU {sm} ({device_name}) is not SM90 (Hopper); using the portable path"
        return PathChoice(PORTABLE, reason, name, capability, device_name)
    ok, toolchain = check_toolchain()
    if not ok:
        reason = f"GPU {device_name} is SM90 but the kernel toolchain is not usable: {toolchain}; using the portable path"
        return PathChoice(PORTABLE, reason, name, capability, device_name, toolchain)
    return PathChoice(SM90, f"GPU {device_name} is SM90 (Hopper) and the toolchain is usable", name, capability, device_name, toolchain)


def select_path(device: torch.device | str) -> PathChoice:
    """The path calls on ``device`` take, decided on first use and cached; warns once if degraded."""
    global _warned
    if type(device) is torch.device and (device.index is not None or device.type != "cuda"):
        choice = _cache.get((device.type, device.index))  # a tensor's device: its key without a conversion
        if choice is not None:
            return choice
    key = _device_key(torch.device(device))
    choice = _cache.get(key)
    if choice is not None:
        return choice
    with _lock:
        choice = _cache.get(key)
        if choice is None:
            choice = _decide(key)
            _cache[key] = choice
            if key[0] == "cuda" and choice.path == PORTABLE and not _warned and _forced_reason() is None:
                _warned = True
                warnings.warn(f"mxfp4: {choice.reason}", RuntimeWarning, stacklevel=3)
    return choice


def reset_cache() -> None:
    """Forget the decisions (for tests, or after installing the toolchain in a live process)."""
    global _warned
    with _lock:
        _cache.clear()
        _warned = False


@dataclass(frozen=True)
class ConfigChoice:
    config: object  # a codegen TileConfig
    reason: str

    @property
    def name(self) -> str:
        return self.config.name


@lru_cache(maxsize=4096)  # called per launch when no config is forced: keep it a dict lookup
def choose_config(
    num_experts: int, n: int, k: int, tokens_per_expert_hint: int, device_name: str | None = None,
    activations: str = "bf16", rows: int | None = None,
) -> ConfigChoice:
    """The tile config ``codegen.select_config`` picks for a problem (of the ``activations`` kernel family:
    "bf16" W4A16, "fp8" W4A8; ``rows``: the call's rows where the host knows them), or why there is none."""
    from codegen.tune.selection import (
        select_config,  # lazy: mxfp4 imports no codegen module at import time
    )

    selection = select_config(num_experts, n, k, tokens_per_expert_hint, device_name=device_name,
                              activations=activations, rows=rows)
    return ConfigChoice(selection.config, str(selection.reason))


def _family_line(x: torch.Tensor, fp8_weights: bool) -> str | None:
    """How the activations meet the weights, when that is not the plain W4A16 kernel."""
    if x.dtype == torch.float8_e4m3fn and fp8_weights:
        return "  kernel:    W4A8: e4m3 x (x_scale per row) and the FP8-ready weights, FP8 WGMMA"
    if x.dtype == torch.float8_e4m3fn:
        return ("  kernel:    W4A16 on x widened to bf16 (exact), x_scale in the epilogue: w is packed for bf16 "
                "activations; mxfp4.pack(w, activations='fp8') runs the W4A8 kernel")
    return None  # (FP8-ready weights with bf16 x never get here: the op's checks raise first)


def describe_call(x: torch.Tensor, w: object, masked: bool, config: str = "") -> str:
    """The report of ``mxfp4.explain`` (which runs the op's checks first): problem shape, device and
    capability, toolchain, path, the kernel family (W4A16 or W4A8), and on the SM90 path the tile config
    and why. Reads no tensor values."""
    from mxfp4.format.layout_fp8 import PackedMXFP4FP8

    num_experts = w.num_experts
    fp8_weights = isinstance(w, PackedMXFP4FP8)
    if masked:
        variant = "grouped_mm_masked"
        max_m = x.shape[1]
        rows = f"x {tuple(x.shape)}: up to max_m = {max_m} rows per expert"
        hint, known_rows = max_m, None
    else:
        variant = "grouped_mm"
        tokens = x.shape[0]
        hint, known_rows = -(-tokens // max(1, num_experts)), tokens
        rows = f"x {tuple(x.shape)}: T = {tokens} rows, about {hint} per expert"
    choice = select_path(x.device)
    lines = [
        f"mxfp4.{variant}: E = {num_experts} experts, N = {w.n}, K = {w.k}"
        + (" (FP8-ready layout)" if fp8_weights else ""),
        f"  input:     {rows} ({x.dtype})",
        f"  device:    {choice.device}"
        + (f" ({choice.device_name}, compute capability {choice.capability[0]}.{choice.capability[1]})" if choice.capability else ""),
        f"  toolchain: {choice.toolchain if choice.toolchain is not None else 'not checked (not needed for this device)'}",
        f"  path:      {choice.path}: {choice.reason}",
    ]
    family = _family_line(x, fp8_weights)
    if family is not None:
        lines.append(family)
    if choice.path == SM90 and config:
        lines.append(f"  config:    {config}: forced by the caller (config=...)")
    elif choice.path == SM90:
        chosen = choose_config(num_experts, w.n, w.k, hint, choice.device_name, "fp8" if fp8_weights else "bf16",
                               known_rows)
        lines.append(f"  config:    {chosen.name}: {chosen.reason}")
        lines.append(f"  family:    {chosen.config.family}")
    else:
        lines.append("  config:    none (tile configs apply to the SM90 kernel only)")
        lines += _fallback_lines(w, variant == "grouped_mm_masked", hint, x.dtype == torch.float8_e4m3fn)
    return "\n".join(lines)


def _fallback_lines(w: object, masked: bool, rows_per_expert: int, fp8_x: bool = False) -> list[str]:
    """The portable path's mode for this call (in-register kernel, cached decoded weights or per-call decode),
    why, and what it holds in memory."""
    from mxfp4.portable.fallback import CACHED, KERNEL, fallback_mode
    from mxfp4.portable.weight_cache import format_bytes

    mode = fallback_mode(w.data, w.n, w.k, masked, rows_per_expert)
    stats = mode.stats
    name = {KERNEL: "in-register kernel (no decoded copy)", CACHED: "cached decoded weights"}.get(
        mode.mode, "per-call decode (slow)")
    compute = mode.compute
    if fp8_x:  # FP8 activations take the torch composition of the W4A8 math, not the bf16 kernel
        name = "FP8 activations: decoded weights (cached within the budget, else per call)"
        compute = ("float32 products of e4m3 x and the decoded weights per expert, row scales applied and rounded "
                   "once (the W4A8 kernel's math)" + ("" if masked else "; reads offsets on the host"))
    copy = format_bytes(mode.decoded_nbytes)
    if mode.mode == KERNEL and not fp8_x:
        held = "0 B" if not mode.cached_now else f"0 B for this call (a copy of {copy} from an earlier call is cached)"
        memory = f"decoded copy held: {held}; reads the packed weight ({format_bytes(w.data.numel())}) in place"
    else:
        state = "cached now" if mode.cached_now else ("decoded on the next call" if mode.mode == CACHED else "not cached")
        memory = f"decoded copy bf16 [E, N, K] = {copy} ({state})"
    return [
        f"  fallback:  {name}: {mode.reason}",
        f"  compute:   {compute}",
        f"  memory:    {memory}; budget {format_bytes(stats.budget)} ({stats.budget_source}); "
        f"cache on {w.data.device} holds {stats.entries} weight(s), {format_bytes(stats.nbytes)} "
        f"({stats.hits} hits, {stats.misses} misses, {stats.evictions} evictions)",
    ]
