"""The benchmark's problems: models, M values, routings, rows per expert, bytes and FLOPs (CPU only).

Nothing here touches a GPU: the routing, the arithmetic and the row sampling are unit-tested on the CPU.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

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
TOP_K = 4
ZIPF_EXPONENT = 1.1
TOLERANCE = 1e-2  # relative error vs the float64 reference above which a path is "wrong" (not timed)
ROUTINGS = ("uniform", "zipf")

__all__ = [
    "FALLBACK_M_VALUES", "FP8_M_VALUES", "FP8_QUICK_M_VALUES", "HOST_MOE_TOKENS", "MODEL_SHAPES", "MOE_TOKENS",
    "M_VALUES", "QUICK_MOE_TOKENS", "QUICK_M_VALUES",
    "ROUTINGS", "Row", "Shape", "TOLERANCE", "TOP_K", "ZIPF_EXPONENT", "loads_for", "memory_needed",
    "offsets_from_loads", "parse_int_list", "row_arithmetic", "sample_rows", "topk_from_loads",
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


def _capped_shares(weights: Sequence[float], total: int, cap: int) -> list[float]:
    """``total`` split in proportion to ``weights``, no share above ``cap``, the excess spread over the rest."""
    shares = [0.0] * len(weights)
    free = set(range(len(weights)))
    left = float(total)
    while free:
        weight_sum = sum(weights[i] for i in free)
        over = [i for i in free if left * weights[i] / weight_sum > cap]
        if not over:
            for i in free:
                shares[i] = left * weights[i] / weight_sum
            return shares
        for i in over:
            shares[i] = float(cap)
            left -= cap
            free.discard(i)
    return shares


def _round_largest_remainder(shares: Sequence[float], total: int, cap: int) -> list[int]:
    loads = [min(cap, math.floor(s)) for s in shares]
    missing = total - sum(loads)
    order = sorted(range(len(shares)), key=lambda i: (shares[i] - math.floor(shares[i]), -i), reverse=True)
    for i in order:
        if missing <= 0:
            break
        if loads[i] < cap:
            loads[i] += 1
            missing -= 1
    return loads


def _shuffled_by_rank(loads_by_rank: Sequence[int], seed: int) -> list[int]:
    permutation = list(range(len(loads_by_rank)))
    random.Random(seed).shuffle(permutation)
    by_expert = [0] * len(loads_by_rank)
    for rank, expert in enumerate(permutation):
        by_expert[expert] = loads_by_rank[rank]
    return by_expert


def zipf_loads_total(num_experts: int, total: int, *, top_k: int = TOP_K, exponent: float = ZIPF_EXPONENT,
                     seed: int = 0) -> list[int]:
    """Rows per expert of a skewed top-k routing of ``total`` token-expert assignments.

    ``ceil(total / top_k)`` tokens; loads proportional to ``1 / rank^exponent``, each at most the
    token count (a token picks an expert once); integer by largest remainder; ranks assigned to
    experts by a seeded shuffle.
    """
    if total <= 0:
        return [0] * num_experts
    top_k = max(1, min(top_k, num_experts))
    cap = math.ceil(total / top_k)
    weights = [1.0 / (rank + 1) ** exponent for rank in range(num_experts)]
    loads = _round_largest_remainder(_capped_shares(weights, total, cap), total, cap)
    return _shuffled_by_rank(loads, seed)


def zipf_loads(num_experts: int, tokens_per_expert: int, *, top_k: int = TOP_K, exponent: float = ZIPF_EXPONENT,
               seed: int = 0) -> list[int]:
    """Zipf rows per expert with the same total as ``tokens_per_expert`` uniform rows (``E * M``)."""
    return zipf_loads_total(num_experts, num_experts * tokens_per_expert, top_k=top_k, exponent=exponent, seed=seed)


def uniform_loads(num_experts: int, total: int, *, seed: int = 0) -> list[int]:
    """``total`` assignments spread as evenly as possible (the remainder on seeded-random experts)."""
    quotient, remainder = divmod(max(0, total), num_experts)
    return _shuffled_by_rank([quotient + (rank < remainder) for rank in range(num_experts)], seed)


def loads_for(routing: str, num_experts: int, tokens_per_expert: int, *, seed: int = 0) -> list[int]:
    """Rows per expert of one benchmark row: ``M`` each (uniform) or the Zipf split of ``E * M``."""
    if routing == "uniform":
        return [tokens_per_expert] * num_experts
    if routing == "zipf":
        return zipf_loads(num_experts, tokens_per_expert, seed=seed)
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")


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


def offsets_from_loads(loads: Sequence[int]) -> list[int]:
    """``[0, l0, l0 + l1, ...]``: the E + 1 offsets of rows grouped by expert."""
    bounds = [0]
    for load in loads:
        bounds.append(bounds[-1] + load)
    return bounds


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
    loads = loads_for(routing, shape.num_experts, m, seed=seed + m)
    nbytes, flops = row_arithmetic(shape, loads)
    return Row(model, projection, shape, routing, m, loads, nbytes, flops)
