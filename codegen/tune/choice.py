"""Which measured config a tuning-table entry takes: the selection rule, over one routing or several.

The host picks a config from (shape, M bucket) alone: it cannot see how the rows of a call are spread over
the experts (that would be a sync). So a sweep may measure every candidate under several routings
(:mod:`codegen.tune.loads`: "uniform", M rows per expert; "zipf", the same total rows split 1/rank^1.1),
and the entry must serve them all. The rule (:func:`choose`):

1. A config is **eligible** when it has a correct time under every routing measured (a config that is
   wrong, or failed, under one routing is never picked).
2. Its **ratio** under a routing is its time over the best eligible time under that routing; its **worst
   ratio** is the largest of those. The chosen config has the smallest worst ratio (ties: the smaller
   geometric mean of its ratios, then the first measured). A sum of times would weigh each routing by how
   slow it is (Zipf rows run 1.3-1.8x longer than uniform ones); the worst ratio bounds the regret under
   whichever routing comes, which is what a choice blind to the routing must do.
3. The heuristic default stays unless the chosen config beats it by more than ``DEFAULT_MARGIN`` (timing
   noise): the default is kept when its worst ratio is within ``DEFAULT_MARGIN`` of the chosen one's.

With one routing the ratio is time / best time, so the rule is the fastest config, the default kept within
the margin: exactly the rule of the uniform-only tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .loads import ROUTINGS

# Timings of one config repeated on one GPU spread by about 1% (benchmarks/NOTES.md), so a config
# displaces the heuristic default only when it is more than 2% faster: a table entry is then a
# measured gain, not noise, and a re-tune does not churn configs that tie.
DEFAULT_MARGIN = 1.02


def record_routing(record: dict) -> str:
    """The routing a progress-log record was measured under (records from before routings: uniform)."""
    return str(record.get("routing", "uniform"))


@dataclass(frozen=True)
class Choice:
    """The outcome of :func:`choose` for one (shape, M, kernel family).

    ``records[config][routing]``: the fastest ``ok`` record of each config under each routing (eligible or
    not); ``routings``: those measured, in ``ROUTINGS`` order (the first is the primary: "uniform" when
    measured); ``best_us[routing]``: the best eligible time.
    """

    config: str
    default_config: str
    routings: tuple[str, ...]
    records: dict[str, dict[str, dict]]
    best_us: dict[str, float]

    def eligible(self, config: str) -> bool:
        return all(routing in self.records.get(config, {}) for routing in self.routings)

    def ratios(self, config: str) -> dict[str, float]:
        """time / best time per routing (only for an eligible config)."""
        return {r: self.records[config][r]["median_us"] / self.best_us[r] for r in self.routings}

    def worst_ratio(self, config: str) -> float | None:
        return max(self.ratios(config).values()) if self.eligible(config) else None

    def record(self, config: str, routing: str | None = None) -> dict | None:
        """``config``'s record under ``routing`` (default: the primary routing), or None."""
        return self.records.get(config, {}).get(routing or self.routings[0])

    def best_config(self, routing: str) -> str:
        """The fastest eligible config under ``routing``."""
        eligible = [c for c in self.records if self.eligible(c)]
        return min(eligible, key=lambda c: self.records[c][routing]["median_us"])


def _fastest_per_config(ok: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """config -> routing -> its fastest ``ok`` record, configs in the order first measured."""
    found: dict[str, dict[str, dict]] = {}
    for record in ok:
        mine = found.setdefault(record["config"], {})
        routing = record_routing(record)
        if routing not in mine or record["median_us"] < mine[routing]["median_us"]:
            mine[routing] = record
    return found


def choose(ok: Sequence[dict], default_config: str) -> Choice | None:
    """The config the rule above picks among the ``ok`` records of one (shape, M, family) (None: no config is
    eligible); ``default_config`` is the heuristic default at that M."""
    records = _fastest_per_config(ok)
    routings = tuple(r for r in ROUTINGS if any(r in by_routing for by_routing in records.values()))
    eligible = [c for c, by_routing in records.items() if all(r in by_routing for r in routings)]
    if not eligible:
        return None
    best_us = {r: min(records[c][r]["median_us"] for c in eligible) for r in routings}
    probe = Choice("", default_config, routings, records, best_us)

    def key(config: str) -> tuple[float, float]:
        ratios = probe.ratios(config).values()
        return max(ratios), math.fsum(math.log(v) for v in ratios)

    pick = min(eligible, key=key)  # min keeps the first measured of equal keys
    if default_config in eligible and key(default_config)[0] <= key(pick)[0] * DEFAULT_MARGIN:
        pick = default_config
    return Choice(pick, default_config, routings, records, best_us)
