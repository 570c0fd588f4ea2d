"""Autotuning data: the problem shapes, the M buckets, the tuning tables and ``lookup``.

Tuning tables
-------------
One JSON file per GPU model, ``<gpu-slug>.json`` (``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``)::

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "sm": "9.0",
     "entries": {"32,5760,2880": {"16": {"config": "n128_m16_k256_s7_wg2", "median_us": 97.1,
                                         "tflops": .., "gbps": .., "m": 16,
                                         "default_config": "...", "default_us": ..}}}}

Entries are keyed by ``"E,N,K"`` (``"E,N,K:fp8"`` for the W4A8 family, :func:`table_key`) and then by the
M bucket (:func:`m_bucket` of the tokens per expert). An entry tuned under several routings (``tune --routing
both``, :mod:`codegen.tune.choice`) adds what it was chosen on; ``median_us``, ``tflops``, ``gbps`` and
``default_us`` stay the first routing's (uniform's, when measured)::

    "256": {"config": .., "median_us": 401.2, .., "worst_ratio": 1.041,
            "routings": {"uniform": {"us": 401.2, "best_us": 385.4, "best_config": "..", "default_us": 379.0},
                         "zipf": {"us": 512.9, "best_us": 512.9, "best_config": "..", "default_us": 698.7}}}

Only ``config`` is needed to look an entry up, so entries with or without ``routings`` load alike. Tables are searched in two places, the user's first:

1. ``$HOPPER_MXFP4_TUNING_DIR``, else ``$XDG_CACHE_HOME/hopper-mxfp4/tuning``, else
   ``~/.cache/hopper-mxfp4/tuning`` (where ``python -m codegen tune`` writes by default);
2. ``generated/tuning/`` (``codegen.build.paths.GENERATED_DIR``), shipped with the package.

In each place the file of the exact GPU slug is tried, then the family's (``h100.json``).
:func:`lookup` takes an exact M bucket from any table (user first) before a nearest bucket from any
(user first), so a user who tuned only decode sizes still gets the shipped prefill entries.
Lookups are cached in memory (:func:`clear_cache` forgets them); no file is touched per call.

The sweep that writes the tables is :mod:`codegen.tune.sweep`; the configs it tries, :mod:`codegen.tune.space`.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from codegen.build.config import TileConfig

TABLE_FORMAT = 1
SM = "9.0"
TUNING_DIR_ENV = "HOPPER_MXFP4_TUNING_DIR"
MAX_BUCKET = 4096
M_BUCKETS: tuple[int, ...] = tuple(2**i for i in range(13))  # 1 .. 4096

# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Shape:
    """One grouped GEMM problem: E experts of ``[N, K]`` weights."""

    num_experts: int
    n: int
    k: int

    @property
    def key(self) -> str:
        return f"{self.num_experts},{self.n},{self.k}"

    @property
    def label(self) -> str:
        return f"E={self.num_experts} N={self.n} K={self.k}"

    @classmethod
    def parse(cls, text: str) -> "Shape":
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 3 or not all(re.fullmatch(r"\d+", p) for p in parts):
            raise ValueError(f"shape {text!r} is not of the form E,N,K (three positive integers)")
        shape = cls(*(int(p) for p in parts))
        if min(shape.num_experts, shape.n, shape.k) <= 0:
            raise ValueError(f"shape {text!r}: E, N and K must be positive")
        if shape.k % 32:
            raise ValueError(f"shape {text!r}: K must be a multiple of 32 (the MXFP4 block)")
        return shape


def table_key(shape: Shape, activations: str = "bf16") -> str:
    """The tuning table's key of a shape for a kernel family: ``"E,N,K"`` (bf16) or ``"E,N,K:fp8"``."""
    return shape.key if activations == "bf16" else f"{shape.key}:{activations}"


def _table_key_order(key: str) -> tuple:
    """Sort order of table keys: by E, N, K, then the family (bf16 first)."""
    numbers, _, family = key.partition(":")
    return (*(int(v) for v in numbers.split(",")), family)


# gpt-oss MoE layers: gate_up projects K = hidden 2880 to N = 2 x 2880 (SwiGLU), down back to 2880.
MODEL_SHAPES: dict[str, dict[str, Shape]] = {
    "gpt-oss-20b": {"gate_up": Shape(32, 5760, 2880), "down": Shape(32, 2880, 2880)},
    "gpt-oss-120b": {"gate_up": Shape(128, 5760, 2880), "down": Shape(128, 2880, 2880)},
}
DEFAULT_M_VALUES: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 4096)


# ---------------------------------------------------------------------------------------------
# M buckets
# ---------------------------------------------------------------------------------------------


def m_bucket(tokens_per_expert: int | float) -> int:
    """The M bucket of a token count: the power of two at or above it, in 1..4096 (capped)."""
    t = max(1, math.ceil(tokens_per_expert))
    if t >= MAX_BUCKET:
        return MAX_BUCKET
    return 1 << (t - 1).bit_length()


def nearest_bucket(bucket: int, available: Iterable[int]) -> int | None:
    """The available bucket nearest to ``bucket`` in log2 distance; ties go to the larger one."""
    best = None
    for candidate in available:
        distance = abs(math.log2(candidate) - math.log2(bucket))
        if best is None or distance < best[0] or (distance == best[0] and candidate > best[1]):
            best = (distance, candidate)
    return None if best is None else best[1]


# ---------------------------------------------------------------------------------------------
# Tuning tables: where they are, reading, writing
# ---------------------------------------------------------------------------------------------


def gpu_slug(device_name: str) -> str:
    """File-name form of a GPU name: ``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``."""
    words = re.sub(r"[^a-z0-9]+", " ", device_name.lower()).split()
    words = [w for w in words if w not in ("nvidia", "geforce")]
    return "-".join(words) or "unknown-gpu"


def gpu_family(device_name: str) -> str:
    """The model without its variant: ``NVIDIA H100 80GB HBM3`` -> ``h100``."""
    slug = gpu_slug(device_name)
    return slug.split("-")[0]


def user_tuning_dir() -> Path:
    """``$HOPPER_MXFP4_TUNING_DIR``, else ``$XDG_CACHE_HOME/hopper-mxfp4/tuning``, else ``~/.cache/...``."""
    explicit = os.environ.get(TUNING_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hopper-mxfp4" / "tuning"


def shipped_tuning_dir() -> Path:
    from codegen.build.paths import GENERATED_DIR

    return Path(GENERATED_DIR) / "tuning"


def table_candidates(device_name: str) -> list[Path]:
    """The table files consulted for ``device_name``, in order (they need not exist)."""
    names = [f"{gpu_slug(device_name)}.json", f"{gpu_family(device_name)}.json"]
    names = list(dict.fromkeys(names))
    paths = [directory / name for directory in (user_tuning_dir(), shipped_tuning_dir()) for name in names]
    return list(dict.fromkeys(paths))


# A Hopper part with no table of its own uses the nearest part's shipped table. Measured on the H200
# before it had one: the H100 table's choices were 1.1% faster than the heuristic by geometric mean
# over the 28 gpt-oss entries (1.05-1.19x at M = 64, 0.97x at worst, 120b M = 256;
# benchmarks/NOTES.md). Other GPUs (not Hopper) have none.
NEAREST_PART = {"h100": "h200", "h200": "h100", "h800": "h100", "h20": "h100", "gh200": "h200"}


def nearest_part_table(device_name: str) -> Path | None:
    """The shipped table a Hopper GPU with no table of its own falls back to (None: not a Hopper part)."""
    part = NEAREST_PART.get(gpu_family(device_name))
    return None if part is None else shipped_tuning_dir() / f"{part}.json"


def default_table_path(device_name: str) -> Path:
    """Where ``tune`` writes by default: the user dir, the exact GPU slug."""
    return user_tuning_dir() / f"{gpu_slug(device_name)}.json"


def _display_path(path: Path) -> str:
    """``generated/tuning/h100.json`` for a shipped table, the full path for anything else."""
    try:
        from codegen.build.paths import GENERATED_DIR

        return str(Path("generated") / path.resolve().relative_to(Path(GENERATED_DIR).resolve()))
    except (ValueError, OSError):
        return str(path)


def new_table(device_name: str) -> dict[str, Any]:
    return {"format": TABLE_FORMAT, "gpu": device_name, "sm": SM, "entries": {}}


def read_table(path: Path | str) -> dict[str, Any]:
    """Parse and check a tuning table; raises ValueError saying what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: not a format-{TABLE_FORMAT} tuning table")
    if not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path}: 'entries' must be an object")
    return data


def write_table(path: Path | str, table: dict[str, Any]) -> Path:
    """Write ``table`` atomically (temp file + rename), entries sorted by shape and bucket."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {
        shape: {str(b): table["entries"][shape][b] for b in sorted(table["entries"][shape], key=int)}
        for shape in sorted(table["entries"], key=_table_key_order)
    }
    ordered = {**{k: v for k, v in table.items() if k != "entries"}, "entries": entries}
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(ordered, indent=1) + "\n")
    os.replace(temporary, path)
    clear_cache()
    return path


# ---------------------------------------------------------------------------------------------
# lookup
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoadedTable:
    path: Path
    label: str
    entries: dict[str, dict[str, dict[str, Any]]]


_lock = threading.Lock()
_tables: dict[str, list[_LoadedTable]] = {}
_results: dict[tuple, tuple[TileConfig, str] | None] = {}
_warned: set[str] = set()


def clear_cache() -> None:
    """Forget the parsed tables and the lookups (after writing a table, or in tests)."""
    with _lock:
        _tables.clear()
        _results.clear()


def _tables_for(device_name: str) -> list[_LoadedTable]:
    tables = _tables.get(device_name)
    if tables is not None:
        return tables
    tables = [table for path in table_candidates(device_name) if (table := _load(path)) is not None]
    nearest = nearest_part_table(device_name)
    if not tables and nearest is not None:
        fallback = _load(nearest, f" (nearest part: no table for {device_name})")
        tables = [fallback] if fallback is not None else []
    _tables[device_name] = tables
    return tables


def _load(path: Path, note: str = "") -> _LoadedTable | None:
    """The table at ``path``, or None if there is none; a broken one is skipped with one warning."""
    if not path.is_file():
        return None
    try:
        data = read_table(path)
    except (ValueError, OSError) as error:
        if str(path) not in _warned:  # a broken table must never break an op: warn once, skip it
            _warned.add(str(path))
            warnings.warn(f"hopper-mxfp4: ignoring tuning table {error}", RuntimeWarning, stacklevel=5)
        return None
    return _LoadedTable(path, _display_path(path) + note, data["entries"])


def _entry_config(entry: Any) -> TileConfig | None:
    try:
        return TileConfig.from_name(entry["config"])
    except (KeyError, TypeError, ValueError):
        return None


def _routing_note(entry: dict) -> str:
    """``; routing-robust: uniform 379.0 us (1.00x its best), zipf 520.0 us (1.04x its best)`` for an entry tuned
    under several routings (``routings``, codegen.tune.report.table_entry), else ""."""
    routings = entry.get("routings")
    if not isinstance(routings, dict):
        return ""
    parts = []
    for routing, times in routings.items():
        try:
            parts.append(f"{routing} {times['us']:.1f} us ({times['us'] / times['best_us']:.2f}x its best)")
        except (KeyError, TypeError, ZeroDivisionError):
            return ""
    return "; routing-robust: " + ", ".join(parts)


def _describe(table: _LoadedTable, shape: Shape, bucket: int, found: int, entry: dict) -> str:
    where = f"tuning table {table.label}: {shape.label}"
    measured = entry.get("median_us")
    timing = f" (measured {measured:.1f} us{_routing_note(entry)})" if isinstance(measured, (int, float)) else ""
    if found == bucket:
        return f"{where} M-bucket {bucket}{timing}"
    return f"{where} M-bucket {bucket} not tuned, nearest tuned bucket {found}{timing}"


def _lookup(device_name: str, shape: Shape, bucket: int, activations: str = "bf16") -> tuple[TileConfig, str] | None:
    tables = _tables_for(device_name)
    usable: list[tuple[_LoadedTable, dict[int, tuple[TileConfig, dict]]]] = []
    for table in tables:
        buckets = table.entries.get(table_key(shape, activations))
        if not isinstance(buckets, dict):
            continue
        valid = {}
        for key, entry in buckets.items():
            config = _entry_config(entry)
            if config is not None and config.activations == activations and str(key).isdigit() and int(key) > 0:
                valid[int(key)] = (config, entry)
        if valid:
            usable.append((table, valid))
    for table, valid in usable:  # an exact bucket anywhere (user tables first)
        if bucket in valid:
            config, entry = valid[bucket]
            return config, _describe(table, shape, bucket, bucket, entry)
    for table, valid in usable:  # else the nearest bucket of the first table that has the shape
        found = nearest_bucket(bucket, valid)
        config, entry = valid[found]
        return config, _describe(table, shape, bucket, found, entry)
    return None


def shipped_configs() -> list[TileConfig]:
    """Every config that a shipped tuning table (generated/tuning/*.json) can select, sorted."""
    names: set[str] = set()
    for path in sorted(shipped_tuning_dir().glob("*.json")):
        for buckets in read_table(path)["entries"].values():
            names.update(entry["config"] for entry in buckets.values())
    return sorted(TileConfig.from_name(name) for name in names)


def lookup(
    device_name: str, num_experts: int, n: int, k: int, tokens_per_expert: int, activations: str = "bf16"
) -> tuple[TileConfig, str] | None:
    """The tuned config of the ``activations`` family for this GPU and problem, with the reason, or None when
    no table has the shape (for that family).

    Cached: after the first call for a (GPU, shape, bucket, family) this is a dict lookup.
    """
    bucket = m_bucket(tokens_per_expert)
    key = (device_name, num_experts, n, k, bucket, activations)
    try:
        return _results[key]
    except KeyError:
        pass
    with _lock:
        if key not in _results:
            _results[key] = _lookup(device_name, Shape(num_experts, n, k), bucket, activations)
        return _results[key]
