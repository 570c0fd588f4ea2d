"""A byte-bounded, thread-safe LRU cache of decoded (bf16) weights for the portable fallback.

Why: off Hopper the fallback multiplies by bf16 weights; decoding the MXFP4 bytes on every call
costs far more than the GEMM. Keeping the decoded copy makes later calls as fast as bf16 torch, at
the price of its memory (2 bytes per weight value), bounded by a budget the user sets.

Correctness rules (no stale entry is ever served):

* An entry belongs to one weight *object* (``PackedMXFP4.data``), held by a weak reference: when
  the weight is freed, a ``weakref.finalize`` drops the entry and its memory.
* It is valid only while the weight's version counter (bumped by every in-place write through
  torch, including ``copy_`` from ``load_state_dict``), data pointer, shape and device are those
  it was decoded from; a mismatch drops it and the caller decodes again. Writes that bypass the
  version counter (through ``tensor.data`` or raw storage) are not seen: call :func:`clear`.
* Inference tensors (created under ``torch.inference_mode()``) have no version counter, so they
  are never cached (decoded per call instead; :func:`uncacheable_reason` says so).

The budget applies per device: ``set_fallback_memory_budget(nbytes)`` or the environment variable
``HOPPER_MXFP4_FALLBACK_BUDGET`` (bytes, or with a K/M/G/T suffix, binary). 0 disables the cache. By default
it is 0 on a CUDA GPU where the in-register portable kernel runs (:mod:`mxfp4.portable.kernel`: no decoded
copy at all; a budget above 0 opts prefill-sized calls into the cached copy), half the GPU's memory on a
CUDA GPU where it cannot, and a quarter of host RAM on the CPU.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

ENV_BUDGET = "HOPPER_MXFP4_FALLBACK_BUDGET"
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_lock = threading.RLock()  # re-entrant: a weakref finalizer may run while this thread holds it
_budget_override: int | None = None


def parse_budget(text: str, source: str = ENV_BUDGET) -> int:
    """``"0"``, ``"1073741824"``, ``"8G"``, ``"512MiB"``... as bytes; ValueError naming ``source``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"{source} = {text!r}: expected bytes, optionally with a K/M/G/T suffix (e.g. 8G, 0)")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2).upper()])


def _kernel_runs(device: torch.device) -> bool:
    from .kernel import (
        unavailable_reason,  # lazy: imports Triton, which only a GPU needs
    )

    return device.type == "cuda" and unavailable_reason(device.type, device.index) is None


def default_budget(device: torch.device) -> int:
    """0 on a GPU that runs the in-register kernel, else half its memory; a quarter of host RAM on the CPU
    (4 GiB if RAM is unknown)."""
    if device.type == "cuda":
        return 0 if _kernel_runs(device) else torch.cuda.get_device_properties(device).total_memory // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def fallback_memory_budget(device: torch.device | str) -> tuple[int, str]:
    """(bytes, where that number comes from) for the decoded-weight cache on ``device``."""
    device = _normalize(device)
    if _budget_override is not None:
        return _budget_override, "set by mxfp4.set_fallback_memory_budget"
    text = os.environ.get(ENV_BUDGET)
    if text is not None and text.strip():
        return parse_budget(text), f"{ENV_BUDGET}={text.strip()}"
    if device.type != "cuda":
        share = "a quarter of host RAM"
    elif _kernel_runs(device):
        share = "0 where the in-register kernel runs, so no decoded copy is kept"
    else:
        share = "half the GPU's memory (the in-register kernel cannot run here)"
    return default_budget(device), f"default: {share}"


def set_fallback_memory_budget(nbytes: int | None) -> None:
    """Bound the fallback's decoded-weight cache to ``nbytes`` per device (0: no cache; None: default).

    Entries over the new bound are evicted at once (least recently used first).
    """
    global _budget_override
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int)):
        raise TypeError(f"set_fallback_memory_budget: nbytes must be an int or None, got {type(nbytes).__name__}")
    if nbytes is not None and nbytes < 0:
        raise ValueError(f"set_fallback_memory_budget: nbytes must be >= 0, got {nbytes}")
    with _lock:
        _budget_override = nbytes
        for device in {entry.device for entry in _entries.values()}:
            _evict_to(device, fallback_memory_budget(device)[0])


@dataclass
class _Entry:
    ref: weakref.ref
    version: int
    data_ptr: int
    shape: tuple[int, ...]
    device: torch.device
    n: int
    k: int
    decoded: torch.Tensor
    nbytes: int
    ready: object = None  # a torch.cuda.Event recorded after the decode, on ``stream``
    stream: object = None
    finalizer: weakref.finalize | None = field(default=None, repr=False)


_entries: OrderedDict[int, _Entry] = OrderedDict()  # id(weight) -> entry, least recently used first
_stats = {"hits": 0, "misses": 0, "evictions": 0}


def decoded_nbytes(n: int, k: int, num_experts: int) -> int:
    return num_experts * n * k * 2  # bf16


def uncacheable_reason(weight: torch.Tensor, n: int, k: int) -> str | None:
    """Why ``weight``'s decoded copy cannot be cached (None: it can)."""
    budget, source = fallback_memory_budget(weight.device)
    if budget == 0:
        return f"the fallback memory budget is 0 ({source}): caching is off"
    if weight.is_inference():
        return ("w.data was created under torch.inference_mode() and has no version counter, so a cached copy "
                "could go stale; pack or clone the weight outside inference_mode to enable the cache")
    size = decoded_nbytes(n, k, weight.shape[0])
    if size > budget:
        return (f"the decoded copy ({format_bytes(size)}) is larger than the fallback memory budget "
                f"({format_bytes(budget)}, {source})")
    return None


def _valid(entry: _Entry, weight: torch.Tensor, n: int, k: int) -> bool:
    return (entry.ref() is weight and entry.version == weight._version and entry.data_ptr == weight.data_ptr()
            and entry.shape == tuple(weight.shape) and entry.device == weight.device and (entry.n, entry.k) == (n, k))


def _drop(key: int, entry: _Entry) -> None:
    """Remove ``entry`` if it is still the one under ``key`` (ids are reused after a free)."""
    with _lock:
        if _entries.get(key) is entry:
            del _entries[key]
            if entry.finalizer is not None:
                entry.finalizer.detach()


def _evict_to(device: torch.device, limit: int) -> None:
    """Evict least-recently-used entries on ``device`` until they total at most ``limit`` bytes."""
    used = sum(e.nbytes for e in _entries.values() if e.device == device)
    for key, entry in list(_entries.items()):
        if used <= limit:
            break
        if entry.device == device:
            _drop(key, entry)
            used -= entry.nbytes
            _stats["evictions"] += 1


def lookup(weight: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The decoded copy of ``weight`` if a valid one is cached (a stale one is dropped), else None."""
    key = id(weight)
    with _lock:
        entry = _entries.get(key)
        if entry is None:
            return None
        if weight.is_inference() or not _valid(entry, weight, n, k):
            _drop(key, entry)
            return None
        _entries.move_to_end(key)
        _stats["hits"] += 1
    _order_after_decode(entry)
    return entry.decoded


def _order_after_decode(entry: _Entry) -> None:
    """On another CUDA stream: wait for the decode (no host sync) and keep the memory until this use ends."""
    if entry.ready is None:
        return
    stream = torch.cuda.current_stream(entry.device)
    if stream != entry.stream:
        stream.wait_event(entry.ready)
        entry.decoded.record_stream(stream)


def get_or_decode(
    weight: torch.Tensor, n: int, k: int, decode: Callable[[], torch.Tensor]
) -> torch.Tensor | None:
    """The cached decoded copy, decoding and inserting it on a miss; None when it cannot be cached."""
    found = lookup(weight, n, k)
    if found is not None:
        return found
    if uncacheable_reason(weight, n, k) is not None:
        return None
    version, data_ptr = weight._version, weight.data_ptr()  # what the decode below reads
    decoded = decode()  # outside the lock: other threads keep running their calls
    entry = _Entry(weakref.ref(weight), version, data_ptr, tuple(weight.shape), weight.device, n, k, decoded,
                   decoded.numel() * decoded.element_size())
    if decoded.is_cuda:
        entry.stream = torch.cuda.current_stream(decoded.device)
        entry.ready = torch.cuda.Event()
        entry.ready.record(entry.stream)
    _insert(id(weight), weight, entry)
    return decoded


def _insert(key: int, weight: torch.Tensor, entry: _Entry) -> None:
    with _lock:
        _stats["misses"] += 1
        old = _entries.get(key)
        if old is not None:
            _drop(key, old)  # stale, or another thread's copy of the same version: keep ours
        _evict_to(entry.device, fallback_memory_budget(entry.device)[0] - entry.nbytes)
        entry.finalizer = weakref.finalize(weight, _drop, key, entry)
        entry.finalizer.atexit = False
        _entries[key] = entry


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds on one device, and its counters since the last :func:`clear`."""

    entries: int
    nbytes: int
    budget: int
    budget_source: str
    hits: int
    misses: int
    evictions: int


def _normalize(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def stats(device: torch.device | str) -> CacheStats:
    device = _normalize(device)
    with _lock:
        mine = [e for e in _entries.values() if e.device == device]
        budget, source = fallback_memory_budget(device)
        return CacheStats(len(mine), sum(e.nbytes for e in mine), budget, source,
                          _stats["hits"], _stats["misses"], _stats["evictions"])


def is_cached(weight: torch.Tensor, n: int, k: int) -> bool:
    """Whether a valid decoded copy of ``weight`` is cached now (does not count as a use)."""
    with _lock:
        entry = _entries.get(id(weight))
        return entry is not None and not weight.is_inference() and _valid(entry, weight, n, k)


def clear() -> None:
    """Drop every entry and reset the counters (after writing a weight behind torch's back)."""
    with _lock:
        for key, entry in list(_entries.items()):
            _drop(key, entry)
        _stats.update(hits=0, misses=0, evictions=0)


def format_bytes(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"
