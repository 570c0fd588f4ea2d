"""Which side of the pipeline waits (issue 21): the wait-probe build of the config the op picks, per (projection, M).

The probe build (templates/mxfp4_wait_probe.cuh, ``-DMXFP4_WAIT_PROBE``) times, with clock64, the producer thread's
waits for a free slot and each consumer warpgroup's waits for a stage's bytes and for its previous WGMMA batch. A
consumer-bound kernel shows a producer that mostly waits on the empty barrier and consumers that rarely wait on the
full one; a producer-bound (bytes-bound) kernel the opposite. Beside the shares it prints what Little's law asks:
the bytes one SM must keep in flight at the measured bandwidth for a range of DRAM latencies, against the ring's
capacity (CTAs per SM x stages x stage bytes). The shipped build is timed beside the probe build (the probe's
clock reads cost a few percent), and both are checked against each other bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from codegen.build.config import TileConfig
from codegen.runtime import launch
from codegen.tune.measure import random_weights
from codegen.tune.selection import select_config
from codegen.tune.timing import grouped_mm_bytes, measure_hbm_read_bandwidth, time_cuda
from mxfp4.format.layout import ATOM_BYTES, ATOM_K, ATOM_N

from .problems import MODEL_SHAPES

LATENCIES_NS = (600, 800, 1000)  # loaded HBM latencies to size Little's law with (the probe cannot measure it)
CALLS = 20


def ring_bytes_per_sm(config: TileConfig) -> int:
    """The bytes the ring of one SM holds: CTAs per SM x stages x (x stage + weight stage)."""
    x_stage = config.tile_m * config.tile_k * (1 if config.activations == "fp8" else 2)
    w_stage = (config.tile_n // ATOM_N) * (config.tile_k // ATOM_K) * ATOM_BYTES
    return config.ctas_per_sm * config.stages * (x_stage + w_stage)


def shares(sums: dict[str, int]) -> dict[str, float]:
    """The probe's sums as shares of each side's cycles (0..1), and cycles per stage."""
    producer, consumer = max(1, sums["producer_cycles"]), max(1, sums["consumer_cycles"])
    return {
        "producer_empty_wait": sums["producer_empty_wait"] / producer,
        "consumer_full_wait": sums["consumer_full_wait"] / consumer,
        "consumer_mma_wait": sums["consumer_mma_wait"] / consumer,
        "consumer_work": 1.0 - (sums["consumer_full_wait"] + sums["consumer_mma_wait"]) / consumer,
        "consumer_cycles_per_stage": sums["consumer_cycles"] / max(1, sums["consumer_stages"]),
        "producer_cycles_per_stage": sums["producer_cycles"] / max(1, sums["producer_stages"]),
    }


def probe_case(model: str, projection: str, m: int, seed: int, baselines: Sequence[str] = ()) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    shape = MODEL_SHAPES[model][projection]
    packed, _ = random_weights(shape, device, seed=seed)
    e, n, k = shape.num_experts, shape.n, shape.k
    generator = torch.Generator(device=device).manual_seed(seed + m)
    x = torch.randn((e * m, k), generator=generator, dtype=torch.bfloat16, device=device)
    offsets = (torch.arange(e + 1, dtype=torch.int32, device=device) * m).contiguous()
    config = select_config(e, n, k, m, torch.cuda.get_device_name(device)).config
    shipped, probed = launch.load(config, device), launch.load(config, device, wait_probe=True)
    builds = [("shipped", shipped), ("probe", probed)]
    builds += [(f"baseline {directory}", launch.load(config, device, templates_dir=directory)) for directory in baselines]
    outs = {}
    for name, kernel in builds:
        out = torch.full((e * m, n), float("nan"), dtype=torch.bfloat16, device=device)
        launch.grouped_mm_sm90(x, packed.data, n, k, offsets, False, config, out, kernel=kernel)
        outs[name] = out
    torch.cuda.synchronize()
    same = all(torch.equal(outs["shipped"], out) for out in outs.values()) and not bool(outs["shipped"].isnan().any())
    samples: dict[str, list[float]] = {name: [] for name, _ in builds}
    for _ in range(2):  # ABAB: clock and temperature drift fall on every build alike
        for name, kernel in builds:
            out = outs[name]
            run = lambda kernel=kernel, out=out: launch.grouped_mm_sm90(x, packed.data, n, k, offsets, False, config,
                                                                        out, kernel=kernel)
            samples[name].append(time_cuda(run, rep=40, warmup_ms=10.0).median_us)
    timings = {name: min(values) for name, values in samples.items()}
    launch.reset_wait_probe(probed)
    for _ in range(CALLS):
        launch.grouped_mm_sm90(x, packed.data, n, k, offsets, False, config, outs["probe"], kernel=probed)
    sums = launch.read_wait_probe(probed)
    weight_bytes = packed.data.numel()
    bandwidth = grouped_mm_bytes(e, n, k, e * m) / (timings["shipped"] * 1e-6)  # the bytes that must move, per s
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    result = {
        "model": model, "projection": projection, "m": m, "config": config.name, "bit_equal": same,
        "shipped_us": timings["shipped"], "probe_us": timings["probe"],
        "baselines_us": {name.split(" ", 1)[1]: us for name, us in timings.items() if name.startswith("baseline ")},
        "weight_bytes": weight_bytes,
        "bytes_per_s": bandwidth, "ring_bytes_per_sm": ring_bytes_per_sm(config), "sums": sums,
        "little_bytes_per_sm": {ns: bandwidth / sms * ns * 1e-9 for ns in LATENCIES_NS}, **shares(sums),
    }
    return result


def format_row(r: dict[str, Any], read_bytes_per_s: float) -> str:
    little = " / ".join(f"{v / 1024:.0f}" for v in r["little_bytes_per_sm"].values())
    return (f"{r['model']} {r['projection']:<7} M={r['m']:<3} {r['config']:<26} shipped {r['shipped_us']:7.1f} us "
            f"probe {r['probe_us']:7.1f} us"
            + "".join(f" {Path(directory).name} {us:7.1f} us" for directory, us in r["baselines_us"].items())
            + f"  {r['bytes_per_s'] / 1e12:5.2f} TB/s = "
            f"{100 * r['bytes_per_s'] / read_bytes_per_s:.0f}% of torch.sum's | producer waits on empty "
            f"{100 * r['producer_empty_wait']:5.1f}% | consumer waits on full {100 * r['consumer_full_wait']:5.1f}%, "
            f"on WGMMA {100 * r['consumer_mma_wait']:5.1f}%, works {100 * r['consumer_work']:5.1f}% "
            f"({r['consumer_cycles_per_stage']:.0f} cycles/stage) | ring {r['ring_bytes_per_sm'] / 1024:.0f} KiB/SM vs "
            f"Little {little} KiB at {'/'.join(map(str, LATENCIES_NS))} ns | bit-equal {r['bit_equal']}")


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
                print(f"  sums {row['sums']}")
                failed |= not row["bit_equal"]
    return 1 if failed else 0
