"""A model of the ping-pong kernel's ring protocol (templates/mxfp4_grouped_mm_sm90.cuh: produce, consume with
Cfg::PingPong, RingPosition::advance_by, wait_for_turn / pass_turn), run on the CPU under random interleavings.

One producer fills a ring of `stages` slots in the order of the CTA's work units; consumer warpgroup 0 takes units
0, 2, 4, ... and warpgroup 1 units 1, 3, 5, ..., each skipping the other's stages. Every wait is an mbarrier parity
wait, which cannot tell phase p from p + 2: the model restates the device's parities line for line and checks that
no wait ever passes on a phase other than the one it means, that the hardware barriers of the turns never hold two
arrivals of one warpgroup (bar.arrive counts threads, so a second arrival would complete the barrier alone), and
that every run ends. Without the turns the same model passes a full barrier early, so the check can fail.
The GPU tests run the kernels themselves (the ping-pong family samples of codegen/tune/selection.py).
"""

from __future__ import annotations

import random

import pytest


class Barrier:
    """An mbarrier by its completed phases; ``passes(parity)`` is try_wait.parity: the phase of that parity is done
    exactly when the current phase's parity differs."""

    def __init__(self) -> None:
        self.completed = 0

    def passes(self, parity: int) -> bool:
        return (self.completed & 1) != parity


class Ring:
    """RingPosition: slot and phase parity."""

    def __init__(self, stages: int) -> None:
        self.stages, self.slot, self.phase = stages, 0, 0

    def advance(self) -> None:
        self.slot += 1
        if self.slot == self.stages:
            self.slot, self.phase = 0, self.phase ^ 1

    def advance_by(self, steps: int) -> None:
        position = self.slot + steps
        self.slot, self.phase = position % self.stages, self.phase ^ ((position // self.stages) & 1)


def producer(stages: int, units: list[int], full: list[Barrier], empty: list[Barrier], landed: list[int]):
    ring, position = Ring(stages), 0
    for steps in units:
        for _ in range(steps):
            while not empty[ring.slot].passes(ring.phase ^ 1):
                yield
            assert empty[ring.slot].completed == position // stages, "the producer refilled a slot still in use"
            landed.append(ring.slot)  # the TMA bytes land later (the scheduler completes the full phase)
            ring.advance()
            position += 1
            yield


def consumer(me: int, stages: int, units: list[int], full: list[Barrier], empty: list[Barrier],
             turns: list[int] | None, log: list[str]):
    ring, position = Ring(stages), 0
    for index, steps in enumerate(units):
        if index % 2 != me:
            ring.advance_by(steps)
            position += steps
            continue
        if turns is not None and index > 0:
            while turns[me] == 0:  # bar.sync on this warpgroup's barrier
                yield
            turns[me] -= 1
        previous = None
        for _ in range(steps):
            while not full[ring.slot].passes(ring.phase):
                yield
            if full[ring.slot].completed != position // stages + 1:
                log.append(f"warpgroup {me} passed slot {ring.slot} for use {position // stages} early "
                           f"({full[ring.slot].completed} phases done)")
                return
            if previous is not None:
                empty[previous].completed += 1  # release_slot: the previous stage's WGMMAs are done
            previous = ring.slot
            ring.advance()
            position += 1
            yield
        if turns is not None and index + 1 < len(units):
            other = 1 - me
            assert turns[other] == 0, "a second arrival on a turn barrier before the other warpgroup synced"
            turns[other] += 1  # bar.arrive on the other warpgroup's barrier
        yield  # warpgroup_wait<0>, then the last slot back and the epilogue
        empty[previous].completed += 1


def run(stages: int, units: list[int], seed: int, with_turns: bool = True) -> list[str]:
    """Interleave the producer, the landing of its loads and both consumers at random; the consumers' complaints."""
    full = [Barrier() for _ in range(stages)]
    empty = [Barrier() for _ in range(stages)]
    landed: list[int] = []
    turns = [0, 0] if with_turns else None
    log: list[str] = []
    actors = [producer(stages, units, full, empty, landed),
              consumer(0, stages, units, full, empty, turns, log),
              consumer(1, stages, units, full, empty, turns, log)]
    rng = random.Random(seed)
    for _ in range(200_000):
        if landed and rng.random() < 0.3:
            full[landed.pop(0)].completed += 1
            continue
        if not actors:
            break
        actor = rng.choice(actors)
        try:
            next(actor)
        except StopIteration:
            actors.remove(actor)
        if log:
            return log
    assert not actors and not landed, "the protocol did not end (a deadlock)"
    return log


@pytest.mark.parametrize("stages", [2, 3, 5, 8])
@pytest.mark.parametrize("units", [[1], [3, 3], [12, 12, 12, 12, 12], [1, 1, 1, 1, 1, 1, 1], [7, 2, 9, 1, 4, 4]],
                         ids=["one", "two", "long", "one-step", "ragged"])
def test_turns_keep_every_wait_on_its_phase(stages: int, units: list[int]) -> None:
    for seed in range(40):
        assert run(stages, units, seed) == []


def test_without_the_turns_a_warpgroup_passes_a_full_barrier_early() -> None:
    """The check can fail: a consumer that skips the other's unit without waiting for its turn may see the slot's
    phase two back as its own."""
    failures = [run(3, [12, 12, 12], seed, with_turns=False) for seed in range(40)]
    assert any("early" in line for lines in failures for line in lines)


def test_advance_by_is_advance_repeated() -> None:
    for stages in (2, 3, 5, 8):
        for start in range(2 * stages):
            for steps in range(3 * stages):
                a, b = Ring(stages), Ring(stages)
                for _ in range(start):
                    a.advance()
                    b.advance()
                for _ in range(steps):
                    a.advance()
                b.advance_by(steps)
                assert (a.slot, a.phase) == (b.slot, b.phase)
