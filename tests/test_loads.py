"""The synthetic expert loads (codegen.tune.loads) the tuner and the benchmarks share."""

from __future__ import annotations

import hashlib
import json

import pytest

from benchmarks import problems
from codegen.tune import loads


def _benchmark_grid() -> list[list[int]]:
    """The loads of every benchmark row (both models, both projections, both routings, every M, three seeds)."""
    grid = []
    for model, shapes in sorted(problems.MODEL_SHAPES.items()):
        for projection, shape in sorted(shapes.items()):
            for routing in problems.ROUTINGS:
                for m in problems.M_VALUES:
                    for seed in (0, 1, 7):
                        grid.append(problems.make_row(model, projection, shape, routing, m, seed=seed).loads)
    return grid


def _generator_grid() -> list[list[int]]:
    zipf = [loads.zipf_loads_total(e, t, top_k=k, seed=s)
            for e in (4, 32, 128) for t in (0, 1, 4, 37, 512, 8192) for k in (1, 2, 4) for s in (0, 3)]
    uniform = [loads.uniform_loads(e, t, seed=s) for e in (4, 32, 128) for t in (0, 1, 37, 512) for s in (0, 3)]
    return zipf + uniform


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def test_the_move_kept_every_benchmark_load():
    """Snapshots taken from benchmarks/problems.py before the generators moved to codegen.tune.loads (commit
    5f07a0f): the same seeds must give the same loads, so benchmark results stay comparable across the move."""
    grid = _benchmark_grid()
    assert len(grid) == 168 and _digest(grid) == "0789338fe9097ea469cefb049ae9f2bcd5fea8184bc1a3548acc3f6b58ef6dfa"
    generators = _generator_grid()
    assert len(generators) == 132
    assert _digest(generators) == "9635d46a2d8c9dcce06386b9fee976f24977938e92e34ab2dfe979ac4c40211a"
    shape = problems.MODEL_SHAPES["gpt-oss-20b"]["gate_up"]
    assert problems.make_row("gpt-oss-20b", "gate_up", shape, "zipf", 16).loads == [
        4, 21, 8, 14, 11, 45, 33, 4, 5, 4, 7, 9, 18, 4, 4, 4, 10, 7, 12, 26, 6, 5, 128, 3, 6, 15, 5, 5, 6, 8, 4, 71]


def test_benchmarks_reexport_the_one_implementation():
    for name in ("ROUTINGS", "TOP_K", "ZIPF_EXPONENT", "loads_for", "offsets_from_loads", "row_loads",
                 "uniform_loads", "zipf_loads", "zipf_loads_total"):
        assert getattr(problems, name) is getattr(loads, name), name


@pytest.mark.parametrize("routing", loads.ROUTINGS)
@pytest.mark.parametrize(("experts", "m"), [(32, 1), (32, 256), (128, 16)])
def test_row_loads_keep_the_total_and_seed_with_m(routing, experts, m):
    got = loads.row_loads(routing, experts, m, seed=3)
    assert len(got) == experts and sum(got) == experts * m and min(got) >= 0
    assert got == loads.loads_for(routing, experts, m, seed=3 + m)
    if routing == "zipf":
        assert max(got) > m and got != loads.row_loads(routing, experts, m, seed=4)  # skewed; the seed moves it
        assert sorted(got) == sorted(loads.row_loads(routing, experts, m, seed=4))  # ... but never changes it
    offsets = loads.offsets_from_loads(got)
    assert offsets[0] == 0 and offsets[-1] == experts * m and all(b - a == n for a, b, n in zip(offsets, offsets[1:], got))


def test_check_routings():
    assert loads.check_routings(["zipf", "uniform", "zipf"]) == ("uniform", "zipf")
    assert loads.check_routings(["zipf"]) == ("zipf",)
    with pytest.raises(ValueError, match="--routing"):
        loads.check_routings(["skewed"], name="--routing")
    with pytest.raises(ValueError, match="one or more"):
        loads.check_routings([])
