"""Synthetic expert loads (rows per expert) of a grouped GEMM: uniform, or Zipf with the same total rows.

One home for the routings the tuner measures (:mod:`codegen.tune.measure`) and the benchmarks time
(``benchmarks/problems.py`` imports them from here): the same seed gives the same loads in both, so a
tuning-table time and a benchmark row of the same (shape, M, routing) measure the same problem.
CPU only, no torch.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

TOP_K = 4
ZIPF_EXPONENT = 1.1
ROUTINGS = ("uniform", "zipf")

__all__ = [
    "ROUTINGS", "TOP_K", "ZIPF_EXPONENT", "check_routings", "loads_for", "offsets_from_loads", "row_loads",
    "uniform_loads", "zipf_loads", "zipf_loads_total",
]


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
    experts by a seeded shuffle (so the seed moves the loads between experts, never changes them).
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


def check_routings(routings: Sequence[str], *, name: str = "routings") -> tuple[str, ...]:
    """``routings`` as a tuple of known, distinct routings (in ROUTINGS order); ValueError naming ``name``."""
    unknown = [r for r in routings if r not in ROUTINGS]
    if unknown or not routings:
        raise ValueError(f"{name} must be one or more of {ROUTINGS}, got {list(routings)!r}")
    return tuple(r for r in ROUTINGS if r in routings)


def loads_for(routing: str, num_experts: int, tokens_per_expert: int, *, seed: int = 0) -> list[int]:
    """Rows per expert: ``M`` each (uniform) or the Zipf split of ``E * M`` (seeded with ``seed``)."""
    if routing == "uniform":
        return [tokens_per_expert] * num_experts
    if routing == "zipf":
        return zipf_loads(num_experts, tokens_per_expert, seed=seed)
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")


def row_loads(routing: str, num_experts: int, tokens_per_expert: int, *, seed: int = 0) -> list[int]:
    """The loads a benchmark row and a tuning measurement of (E, M, routing) use: :func:`loads_for` seeded with
    ``seed + M``, so each M shuffles its Zipf ranks differently and both tools see the same experts hot."""
    return loads_for(routing, num_experts, tokens_per_expert, seed=seed + tokens_per_expert)


def offsets_from_loads(loads: Sequence[int]) -> list[int]:
    """``[0, l0, l0 + l1, ...]``: the E + 1 offsets of rows grouped by expert."""
    bounds = [0]
    for load in loads:
        bounds.append(bounds[-1] + load)
    return bounds
