"""Which side of the pipeline waits, and what the loads alone cost (issue 21): the diagnostic builds of the config the
op picks, per (projection, M).

The probe build (templates/mxfp4_wait_probe.cuh, ``-DMXFP4_WAIT_PROBE``) times, with clock64, the producer thread's
waits for a free slot and each consumer warpgroup's waits for a stage's bytes and for its previous WGMMA batch. A
consumer-bound kernel shows a producer that mostly waits on the empty barrier and consumers that rarely wait on the
full one; a producer-bound (bytes-bound) kernel the opposite. Beside the shares it prints what Little's law asks:
the bytes one SM must keep in flight at the measured bandwidth for a range of DRAM latencies, against the ring's
capacity (CTAs per SM x stages x stage bytes). The shipped build is timed beside the probe build (the probe's
clock reads cost a few percent), and both are checked against each other bit for bit.

The copy roof (templates/mxfp4_copy_only.cuh, ``-DMXFP4_COPY_ONLY``) is the same config with consumers that neither
decode nor multiply: each waits for a stage, reads one word and frees the slot; producer, barriers, scheduler and
TMA loads are the shipped ones. It is timed in the same ABAB rounds as the shipped build (its output is not
checked), and its probe build (both macros) gives its waits. Reading the first line of a case:

- copy roof near torch.sum's rate (>= ~95 %): the access pattern can stream at the HBM rate; what the shipped build
  loses against its roof is the consumers' (decode, WGMMA, issue).
- copy roof about where the shipped build is (shipped >= ~95 % of its roof): the loads themselves are the ceiling
  (bulk copies of the packed slabs, the tile order, CTAs per SM, the balance below), whatever the consumers do.
- in between: both; the roof is what no consumer-side change can beat.

The copy roof's waits: consumers should wait on the full barrier nearly all the time; a producer that still waits on
the empty barrier most of its cycles has the whole ring in flight, so the bytes land slowly for this pattern. The
balance line mirrors the device scheduler (codegen.runtime.schedule): the tiles over the launched CTAs, the most one
CTA gets, and mean/max per CTA of tiles and of weight bytes (a tail that idles part of the grid for that share).

Where one launch's time goes (the "one launch" line; the probe build's timeline, templates/mxfp4_wait_probe.cuh):
each consumer warpgroup stamps the global timer at its start and end, so a single launch (after a read of twice the
L2) gives the spread of starts (launch ramp), the wait for the first stage (the first bytes' latency), the spread
of ends (the last wave's tail) and the consumers' span. Beside it, ``torch.sum`` over the case's own bytes, rotated
past the L2: the same-size read floor, which pays the same kind of ramp and drain (``torch.sum``'s rate in the
header line comes from 2 GiB, where they vanish). On the H100 (2026-12-07) the M = 1 rows fit time = 1.035 x
bytes / rate + 12.8 µs: this line says which parts make the 12.8 µs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from codegen.build.config import TileConfig
from codegen.runtime import launch
from codegen.runtime.schedule import balance
from codegen.tune.measure import random_weights
from codegen.tune.selection import select_config
from codegen.tune.timing import (grouped_mm_bytes, l2_cache_bytes, measure_hbm_read_bandwidth, measure_read_time,
                                 time_cuda)
from mxfp4.format.layout import ATOM_BYTES, ATOM_K, ATOM_N

from .problems import MODEL_SHAPES

LATENCIES_NS = (600, 800, 1000)  # loaded HBM latencies to size Little's law with (the probe cannot measure it)
CALLS = 20


def ring_bytes_per_sm(config: TileConfig) -> int:
    """The bytes the ring of one SM holds: CTAs per SM x stages x (x stage + weight stage)."""
    x_stage = config.tile_m * config.tile_k * (1 if config.activations == "fp8" else 2)
    w_stage = (config.tile_n // ATOM_N) * (config.tile_k // ATOM_K) * ATOM_BYTES
    return config.ctas_per_sm * config.stages * (x_stage + w_stage)


CONSUMER_PARTS = ("consumer_full_wait", "consumer_mma_wait", "consumer_drain_wait", "consumer_epilogue")


def shares(sums: dict[str, int]) -> dict[str, float]:
    """The probe's sums as shares of each side's cycles (0..1), cycles per stage and the epilogue's cycles per unit.
    A consumer's cycles split into its waits for bytes (full), for its previous WGMMA batch (mma), for a unit's last
    WGMMAs (drain), its epilogues, and the rest: decode, WGMMA issue, bookkeeping (work)."""
    producer, consumer = max(1, sums["producer_cycles"]), max(1, sums["consumer_cycles"])
    parts = {name: sums[name] / consumer for name in CONSUMER_PARTS}
    return {
        "producer_empty_wait": sums["producer_empty_wait"] / producer,
        **parts,
        "consumer_work": 1.0 - sum(parts.values()),
        "consumer_cycles_per_stage": sums["consumer_cycles"] / max(1, sums["consumer_stages"]),
        "producer_cycles_per_stage": sums["producer_cycles"] / max(1, sums["producer_stages"]),
        "epilogue_cycles_per_unit": sums["consumer_epilogue"] / max(1, sums["consumer_units"]),
    }


COPY_ROOF = "copy roof"  # the copy-only build (launch.load(copy_only=True)): its name among the timed builds


def _load_builds(config: TileConfig, device: torch.device, baselines: Sequence[str]) -> list[tuple[str, Any]]:
    """The builds timed side by side (ABAB): shipped, the wait probe, the copy roof, then each baseline's."""
    builds = [("shipped", launch.load(config, device)), ("probe", launch.load(config, device, wait_probe=True)),
              (COPY_ROOF, launch.load(config, device, copy_only=True))]
    return builds + [(f"baseline {directory}", launch.load(config, device, templates_dir=directory))
                     for directory in baselines]


def _time_builds(builds: list[tuple[str, Any]], call: Callable[[Any, torch.Tensor], None],
                 outs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Best of two median times per build, the builds interleaved (ABAB): clock and temperature drift fall on every
    build alike."""
    samples: dict[str, list[float]] = {name: [] for name, _ in builds}
    for _ in range(2):
        for name, kernel in builds:
            run = lambda kernel=kernel, out=outs[name]: call(kernel, out)  # noqa: E731
            samples[name].append(time_cuda(run, rep=40, warmup_ms=10.0).median_us)
    return {name: min(values) for name, values in samples.items()}


def _probe_sums(kernel: Any, call: Callable[[Any, torch.Tensor], None], out: torch.Tensor) -> dict[str, int]:
    """A wait-probe build's sums over CALLS launches."""
    launch.reset_wait_probe(kernel)
    for _ in range(CALLS):
        call(kernel, out)
    return launch.read_wait_probe(kernel)


TIMELINE_LAUNCHES = 5  # single launches read one by one; each metric is their median


def timeline_metrics(line: dict[str, int]) -> dict[str, float]:
    """One launch's timeline (launch.read_timeline) in µs: span from the first consumer's start to the last one's end,
    the spread of starts (launch skew) and of ends (tail), the mean wait for the first landed stage (ramp) and the mean
    consumer lifetime; the SM clock from cycles over ns."""
    consumers, landed = max(1, line["consumers"]), max(1, line["landed"])
    start_min, end_min = ~line["start_min_not"] & (2**64 - 1), ~line["end_min_not"] & (2**64 - 1)
    clock_ghz = line["busy_cycles"] / max(1, line["busy_ns"])
    return {
        "span_us": (line["end_max"] - start_min) / 1e3,
        "start_skew_us": (line["start_max"] - start_min) / 1e3,
        "end_skew_us": (line["end_max"] - end_min) / 1e3,
        "ramp_us": line["first_cycles"] / landed / max(clock_ghz, 1e-9) / 1e3,
        "busy_us": line["busy_ns"] / consumers / 1e3,
        "clock_ghz": clock_ghz,
    }


def _timeline(kernel: Any, call: Callable[[Any, torch.Tensor], None], out: torch.Tensor) -> dict[str, float]:
    """The median over TIMELINE_LAUNCHES single launches of a wait-probe build's timeline metrics, each after a read
    of twice the L2 (clean lines: nothing of the weights left in L2, nothing dirty to write back during the launch)."""
    scratch = torch.ones(2 * l2_cache_bytes() // 4, dtype=torch.float32, device=out.device)
    runs = []
    for _ in range(TIMELINE_LAUNCHES):
        scratch.sum()
        launch.reset_wait_probe(kernel)
        call(kernel, out)
        runs.append(timeline_metrics(launch.read_timeline(kernel)))
    return {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}


def _grid_balance(config: TileConfig, kernel: Any, m: int, shape: Any, k_atoms: int) -> dict[str, Any]:
    """The scheduler's assignment of this case's tiles to the grid the launch sizes (launch.grid_size)."""
    e, n, k = shape.num_experts, shape.n, shape.k
    tiles = launch.tile_bound(config, rows=e * m, num_experts=e, n=n, masked=False, max_m=0)
    return asdict(balance(config, [m] * e, n, k, launch.grid_size(config, kernel, tiles, k_atoms)))


def probe_case(model: str, projection: str, m: int, seed: int, baselines: Sequence[str] = ()) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    shape = MODEL_SHAPES[model][projection]
    packed, _ = random_weights(shape, device, seed=seed)
    e, n, k = shape.num_experts, shape.n, shape.k
    generator = torch.Generator(device=device).manual_seed(seed + m)
    x = torch.randn((e * m, k), generator=generator, dtype=torch.bfloat16, device=device)
    offsets = (torch.arange(e + 1, dtype=torch.int32, device=device) * m).contiguous()
    config = select_config(e, n, k, m, torch.cuda.get_device_name(device)).config
    builds = _load_builds(config, device, baselines)
    kernels = dict(builds)
    call = lambda kernel, out: launch.grouped_mm_sm90(x, packed.data, n, k, offsets, False, config, out,  # noqa: E731
                                                      kernel=kernel)
    outs = {name: torch.full((e * m, n), float("nan"), dtype=torch.bfloat16, device=device) for name, _ in builds}
    for name, kernel in builds:
        call(kernel, outs[name])
    torch.cuda.synchronize()
    checked = [out for name, out in outs.items() if name != COPY_ROOF]  # the copy roof computes nothing
    same = all(torch.equal(outs["shipped"], out) for out in checked) and not bool(outs["shipped"].isnan().any())
    timings = _time_builds(builds, call, outs)
    sums = _probe_sums(kernels["probe"], call, outs["probe"])
    timeline = _timeline(kernels["probe"], call, outs["probe"])
    roof_sums = _probe_sums(launch.load(config, device, wait_probe=True, copy_only=True), call, outs[COPY_ROOF])
    must_move = grouped_mm_bytes(e, n, k, e * m)  # the bytes that must move (per second: TB/s)
    same_size_read_us = measure_read_time(must_move).median_us  # what any streaming kernel of this size takes
    bandwidth = must_move / (timings["shipped"] * 1e-6)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return {
        "model": model, "projection": projection, "m": m, "config": config.name, "bit_equal": same,
        "shipped_us": timings["shipped"], "probe_us": timings["probe"], "copy_roof_us": timings[COPY_ROOF],
        "baselines_us": {name.split(" ", 1)[1]: us for name, us in timings.items() if name.startswith("baseline ")},
        "weight_bytes": packed.data.numel(), "bytes_per_s": bandwidth,
        "copy_roof_bytes_per_s": must_move / (timings[COPY_ROOF] * 1e-6),
        "ring_bytes_per_sm": ring_bytes_per_sm(config), "sums": sums, "copy_roof_sums": roof_sums,
        "copy_roof_waits": shares(roof_sums), "timeline": timeline, "same_size_read_us": same_size_read_us,
        "balance": _grid_balance(config, kernels["shipped"], m, shape, packed.data.shape[2]),
        "little_bytes_per_sm": {ns: bandwidth / sms * ns * 1e-9 for ns in LATENCIES_NS}, **shares(sums),
    }


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%"


def format_row(r: dict[str, Any], read_bytes_per_s: float) -> str:
    """One case: the shipped build against its copy roof (the first line says which bounds it), then the waits of
    the probe builds, the tile balance and the raw sums."""
    little = " / ".join(f"{v / 1024:.0f}" for v in r["little_bytes_per_sm"].values())
    roof, b = r["copy_roof_waits"], r["balance"]
    reading = (f"{r['model']} {r['projection']:<7} M={r['m']:<3} {r['config']:<26} shipped {r['shipped_us']:7.1f} us "
               f"{r['bytes_per_s'] / 1e12:5.2f} TB/s = {_percent(r['bytes_per_s'], read_bytes_per_s)} of torch.sum's | "
               f"copy roof {r['copy_roof_us']:7.1f} us {r['copy_roof_bytes_per_s'] / 1e12:5.2f} TB/s = "
               f"{_percent(r['copy_roof_bytes_per_s'], read_bytes_per_s)} | shipped at "
               f"{_percent(r['copy_roof_us'], r['shipped_us'])} of its copy roof | bit-equal {r['bit_equal']}")
    probe = (f"  probe {r['probe_us']:7.1f} us"
             + "".join(f" {Path(directory).name} {us:7.1f} us" for directory, us in r["baselines_us"].items())
             + f" | producer waits on empty {100 * r['producer_empty_wait']:5.1f}% | consumer waits on full "
             f"{100 * r['consumer_full_wait']:5.1f}%, on WGMMA {100 * r['consumer_mma_wait']:5.1f}%, drains "
             f"{100 * r['consumer_drain_wait']:5.1f}%, epilogue {100 * r['consumer_epilogue']:5.1f}% "
             f"({r['epilogue_cycles_per_unit']:.0f} cycles/unit), works {100 * r['consumer_work']:5.1f}% "
             f"({r['consumer_cycles_per_stage']:.0f} cycles/stage) | ring "
             f"{r['ring_bytes_per_sm'] / 1024:.0f} KiB/SM vs Little {little} KiB at {'/'.join(map(str, LATENCIES_NS))} ns")
    roof_waits = (f"  copy roof waits: producer on empty {100 * roof['producer_empty_wait']:5.1f}% | consumers on full "
                  f"{100 * roof['consumer_full_wait']:5.1f}% ({roof['consumer_cycles_per_stage']:.0f} cycles/stage)")
    spread = (f"  balance: {b['tiles']} tiles over {b['ctas']} CTAs: at most {b['max_tiles']} per CTA, avg/max "
              f"{100 * b['tile_efficiency']:.0f}% (weight bytes {100 * b['atom_efficiency']:.0f}%)")
    t = r["timeline"]
    line = (f"  one launch (probe build, median of {TIMELINE_LAUNCHES}): consumers span {t['span_us']:.1f} us, starts "
            f"spread {t['start_skew_us']:.1f} us, first stage lands {t['ramp_us']:.1f} us after a start, lifetime "
            f"{t['busy_us']:.1f} us, ends spread {t['end_skew_us']:.1f} us, SM clock {t['clock_ghz']:.2f} GHz | "
            f"torch.sum over the same bytes {r['same_size_read_us']:.1f} us: shipped at "
            f"{_percent(r['same_size_read_us'], r['shipped_us'])} of it")
    return "\n".join([reading, probe, roof_waits, spread, line, f"  sums {r['sums']}",
                      f"  copy roof sums {r['copy_roof_sums']}"])


def run(args: argparse.Namespace, m_values: list[int]) -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("bench waits: needs an SM90 GPU", file=sys.stderr)
        return 2
    projections = [p for p in args.projections.split(",") if p]
    read = measure_hbm_read_bandwidth().value
    print(f"device: {torch.cuda.get_device_name()}; torch.sum reads {read / 1e12:.2f} TB/s")
    failed = False
    for model in args.model or ["gpt-oss-20b"]:
        for projection in projections:
            for m in m_values:
                try:
                    row = probe_case(model, projection, m, args.seed, args.baseline_templates)
                except Exception as error:  # one case failing must not hide the others
                    print(f"{model} {projection} M={m}: failed: {type(error).__name__}: {error}")
                    failed = True
                    continue
                torch.cuda.empty_cache()  # the case's weights before the next case's
                print(format_row(row, read))
                failed |= not row["bit_equal"]
    return 1 if failed else 0
