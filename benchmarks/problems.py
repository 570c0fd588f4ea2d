"""The benchmark's problems: models, M values, routings, rows per expert, bytes and FLOPs (CPU only).

Nothing here touches a GPU: the routing, the arithmetic and the row sampling are unit-tested on the CPU.
The rows-per-expert generators (uniform, Zipf) live in :mod:`codegen.tune.loads`, which the tuner shares; they
are re-exported here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from codegen.tune.loads import (
    ROUTINGS,
    TOP_K,
    ZIPF_EXPONENT,
    loads_for,
    offsets_from_loads,
    row_loads,
    uniform_loads,
    zipf_loads,
    zipf_loads_total,
)
from codegen.tune.tables import DEFAULT_M_VALUES, MODEL_SHAPES, Shape
from codegen.tune.timing import grouped_mm_bytes, grouped_mm_flops

M_VALUES: tuple[int, ...] = DEFAULT_M_VALUES
QUICK_M_VALUES = (1, 16, 256, 4096)
FALLBACK_M_VALUES = (1, 4, 16, 256, 1024, 4096)
FP8_M_VALUES = (1, 16, 256, 1024, 4096)  # the fp8 suite (issue 17's table)
FP8_QUICK_M_VALUES = (1, 256, 4096)
MOE_TOKENS = (1, 8, 32, 128, 512, 4096)
QUICK_MOE_TOKENS = (1, 32, 512)
HOST_MOE_TOKENS = (1, 8, 64)  # the decode batches issue 15's host target is measured at
TOLERANCE = 1e-2  # relative error vs the float64 reference above which a path is "wrong" (not timed)

__all__ = [
    "FALLBACK_M_VALUES", "FP8_M_VALUES", "FP8_QUICK_M_VALUES", "HOST_MOE_TOKENS", "MODEL_SHAPES", "MOE_TOKENS",
    "M_VALUES", "QUICK_MOE_TOKENS", "QUICK_M_VALUES",
    "ROUTINGS", "Row", "Shape", "TOLERANCE", "TOP_K", "ZIPF_EXPONENT", "loads_for", "memory_needed",
    "offsets_from_loads", "parse_int_list", "row_arithmetic", "row_loads", "sample_rows", "topk_from_loads",
    "uniform_loads", "zipf_loads", "zipf_loads_total",
]


def parse_int_list(text: str | None, default: Sequence[int], *, name: str = "--m") -> list[int]:
    """``"1,16,256"`` -> [1, 16, 256]; None -> ``default``. ValueError naming ``name`` otherwise."""
    if text is None:
        return list(default)
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{name} {text!r}: give comma-separated positive integers")
    return values


def routings(choice: str | None, default: str = "both") -> list[str]:
    """The routings of ``--routing`` (uniform, zipf or both; ``default`` when it was not given)."""
    choice = choice or default
    return list(ROUTINGS) if choice == "both" else [choice]


def topk_from_loads(loads: Sequence[int], tokens: int, top_k: int, *, seed: int = 0) -> list[list[int]]:
    """``tokens`` rows of ``top_k`` distinct experts whose counts are ``loads`` (each load <= tokens).

    The experts, repeated by load (heaviest first), fill the slots column by column: token t gets
    entries t, t + T, t + 2T, ... An expert's run is at most T long, so no token sees it twice.
    The token order is then shuffled (seeded) so rows are not sorted by expert.
    """
    if sum(loads) != tokens * top_k:
        raise ValueError(f"loads sum to {sum(loads)}, not tokens * top_k = {tokens * top_k}")
    if loads and max(loads) > tokens:
        raise ValueError(f"a load of {max(loads)} exceeds the {tokens} tokens (an expert sees a token once)")
    order = sorted(range(len(loads)), key=lambda e: -loads[e])
    slots = [e for e in order for _ in range(loads[e])]
    rows = [[slots[t + j * tokens] for j in range(top_k)] for t in range(tokens)]
    random.Random(seed).shuffle(rows)
    return rows


def sample_rows(loads: Sequence[int], *, per_expert: int = 4, seed: int = 0) -> list[tuple[int, int]]:
    """(row, expert) pairs to check against the float64 reference: each active expert's first and
    last row and up to ``per_expert - 2`` seeded-random rows between (all rows of small experts)."""
    rng = random.Random(seed)
    picked: list[tuple[int, int]] = []
    start = 0
    for expert, load in enumerate(loads):
        if load <= per_expert:
            rows = list(range(start, start + load))
        else:
            middle = rng.sample(range(start + 1, start + load - 1), min(per_expert - 2, load - 2))
            rows = sorted({start, start + load - 1, *middle})
        picked.extend((row, expert) for row in rows)
        start += load
    return picked


def row_arithmetic(shape: Shape, loads: Sequence[int]) -> tuple[int, int]:
    """(bytes that must move, FLOPs) of one grouped GEMM with these rows per expert."""
    tokens = sum(loads)
    active = sum(1 for load in loads if load > 0)
    return grouped_mm_bytes(active, shape.n, shape.k, tokens), grouped_mm_flops(tokens, shape.n, shape.k)


def memory_needed(shape: Shape, tokens: int) -> int:
    """Bytes a row holds at once on the GPU: packed + bf16 weights, humming's copy, x, outputs, slack."""
    e, n, k = shape.num_experts, shape.n, shape.k
    packed = e * -(-n // 64) * -(-k // 64) * 2176
    humming = e * (n + 256) * (k + 128) * 17 // 32
    return packed + humming + e * n * k * 2 + tokens * k * 2 + 4 * tokens * n * 2 + (2 << 30)


@dataclass
class Row:
    """One benchmark row: a shape, a routing and M; ``results`` maps a path to its measurement."""

    model: str
    projection: str
    shape: Shape
    routing: str
    m: int
    loads: list[int]
    nbytes: int
    flops: int
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(self.loads)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "projection": self.projection, "E": self.shape.num_experts, "N": self.shape.n,
            "K": self.shape.k, "routing": self.routing, "m": self.m, "tokens": self.tokens,
            "max_load": max(self.loads) if self.loads else 0,
            "active_experts": sum(1 for v in self.loads if v), "bytes": self.nbytes, "flops": self.flops,
            "results": self.results,
        }


def make_row(model: str, projection: str, shape: Shape, routing: str, m: int, *, seed: int = 0) -> Row:
    loads = row_loads(routing, shape.num_experts, m, seed=seed)
    nbytes, flops = row_arithmetic(shape, loads)
    return Row(model, projection, shape, routing, m, loads, nbytes, flops)
