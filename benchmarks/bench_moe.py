"""The MoE-layer suite (issue 10): a gpt-oss expert layer (H = I = 2880, top-4; gpt-oss-20b's E = 32 by
default, gpt-oss-120b's E = 128 with ``--model gpt-oss-120b``) at T tokens, uniform and Zipf routing, four ways
(``benchmarks.moe_layers``), plus our two GEMMs alone (the "sum of our own gate_up and down GEMM times" the
fused layer is held to).

    python -m codegen bench moe [--model gpt-oss-120b] [--tokens 1,8,32,128,512,4096] [--routing zipf] [--out DIR]

Each layer's output is checked on sampled tokens against a float64 reference of the same math on
the dequantized weights, then timed: CUDA-graph replay, eager back-to-back, host µs per call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import mxfp4

from . import measure
from .bench_grouped_mm import Machine
from .moe_layers import FP8_LAYER, FP8_LAYER_TOLERANCE, LAYERS, ExpertWeights, reference_tokens, routing_plan
from .problems import MODEL_SHAPES, TOLERANCE, TOP_K, routings, topk_from_loads, uniform_loads, zipf_loads_total
from .report import align, write_json

HIDDEN = INTERMEDIATE = 2880  # both gpt-oss models
DEFAULT_MODEL = "gpt-oss-20b"
GEMMS = "ours GEMMs only (2x grouped_mm)"
FUSED = "ours fused (mxfp4.moe)"
# (name, the path measured, the path it is compared with, the most its time / that time may be, T range)
TARGETS = (
    ("fused <= 1.15x our two GEMMs", FUSED, GEMMS, 1.15, (1, 128)),
    ("fused >= 1.5x faster than unfused", FUSED, "ours unfused (2x grouped_mm + glue)", 1 / 1.5, (1, 128)),
    ("fused >= 3x faster than transformers bf16", FUSED, "transformers grouped_mm (bf16)", 1 / 3, (1, 128)),
    ("fused >= 0.95x bf16 torch layer throughput", FUSED, "bf16 torch layer (2x _grouped_mm + glue)", 1 / 0.95,
     (4096, 4096)),
    ("FP8 activations no slower than bf16 (issue 24)", FP8_LAYER, FUSED, 1.0, (1, 1 << 30)),
)


def layer_model(models: list[str]) -> str:
    """The one model whose layer the suite runs (``--model``, default gpt-oss-20b); ValueError for several."""
    if len(set(models)) > 1:
        raise ValueError(f"--model: the moe suite runs one model's layer per call, got {', '.join(models)}")
    return models[0] if models else DEFAULT_MODEL


def build_weights(seed: int, experts: int) -> ExpertWeights:
    from codegen.tune.sweep import random_weights
    from codegen.tune.tables import Shape

    device = torch.device("cuda")
    gate_up, gate_up_bf16 = random_weights(Shape(experts, 2 * INTERMEDIATE, HIDDEN), device, seed=seed)
    down, down_bf16 = random_weights(Shape(experts, HIDDEN, INTERMEDIATE), device, seed=seed + 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    bias = lambda *shape: (0.5 * torch.randn(shape, generator=generator, device=device)).to(torch.bfloat16)  # noqa: E731
    paired = mxfp4.pack_gate_up(mxfp4.unpack(gate_up))
    return ExpertWeights(gate_up, paired, down, gate_up_bf16, down_bf16, bias(experts, 2 * INTERMEDIATE), bias(experts, HIDDEN))


def routing(kind: str, tokens: int, experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids int32 [T, 4], topk_weights float32 [T, 4]) with uniform or Zipf loads over ``experts``."""
    total = tokens * TOP_K
    loads = uniform_loads(experts, total, seed=seed) if kind == "uniform" else zipf_loads_total(experts, total, seed=seed)
    ids = torch.tensor(topk_from_loads(loads, tokens, TOP_K, seed=seed), dtype=torch.int32, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    weights = torch.randn((tokens, TOP_K), generator=generator, device="cuda").softmax(dim=1)
    return ids, weights


class GemmsOnly:
    """Our gate_up and down GEMMs on the same routing, without the glue (the fused layer's yardstick).

    ``bind(x, ids)`` prepares the gathered rows and the offsets outside the timed call."""

    def __init__(self, w: ExpertWeights):
        self.w = w
        self.rows = self.inner = self.offsets = None

    def bind(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        _, _, tokens, self.offsets = routing_plan(ids, self.w.num_experts)
        self.rows = x[tokens].contiguous()
        self.inner = torch.randn((self.rows.shape[0], INTERMEDIATE), device=x.device, dtype=torch.bfloat16)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        import mxfp4

        mxfp4.grouped_mm(self.rows, self.w.gate_up, self.offsets)
        return mxfp4.grouped_mm(self.inner, self.w.down, self.offsets)


def run_layer(name: str, fn: Callable[..., torch.Tensor], args: tuple, check: tuple | None, settings: argparse.Namespace,
              flush: measure.L2Flush) -> dict[str, Any]:
    """Check (unless ``check`` is None) then time one layer (graph replay also with the L2 flushed before each call);
    errors recorded."""
    try:
        result: dict[str, Any] = {}
        if check is not None:
            tokens, ref = check
            result["rel_error"] = rel = measure.rel_error(fn(*args)[tokens], ref)
            tolerance = FP8_LAYER_TOLERANCE if name == FP8_LAYER else TOLERANCE
            if not rel <= tolerance:
                return {**result, "error": f"wrong result: rel. error {rel:.2e} vs float64 (> {tolerance:.0e}); not timed"}
        result.update(measure.time_all(fn, [args], graph=not settings.no_graph, device=False, quick=settings.quick))
        if not settings.no_graph and "graph_us" in result:
            result["graph_cold_us"] = measure.cold_graph_time(fn, [args], flush)
        # At most 50 calls: a layer is ~15 launches, and a full launch queue would block the host.
        result.update(measure.host_time(fn, [args], calls=min(settings.calls, 50)))
        return result
    except Exception as error:
        if not measure.healthy():
            raise
        return {"error": measure.error_text(error)}


def run_point(w: ExpertWeights, builders: dict[str, Any], kind: str, tokens: int, settings: argparse.Namespace,
              flush: measure.L2Flush) -> dict[str, Any]:
    ids, weights = routing(kind, tokens, w.num_experts, settings.seed + tokens)
    x = torch.randn((tokens, HIDDEN), device="cuda", dtype=torch.bfloat16) * HIDDEN**-0.5
    sampled = sorted({0, tokens - 1, *range(0, tokens, max(1, tokens // 14))})[:16]
    check = (torch.tensor(sampled, device="cuda"), reference_tokens(x, ids, weights, w, sampled))
    results: dict[str, Any] = {}
    for name, fn in builders.items():
        if isinstance(fn, str):
            results[name] = {"error": fn}
            continue
        if name == GEMMS:
            fn.bind(x, ids)
        results[name] = run_layer(name, fn, (x, ids, weights), None if name == GEMMS else check, settings, flush)
        torch.cuda.empty_cache()
    return {"routing": kind, "tokens": tokens, "results": results, "targets": targets(results, tokens)}


def targets(results: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Issue 10's ratios on graph-replay time (eager when no graph), met or not, where they apply."""
    out = {}
    for name, mine, other, limit, (low, high) in TARGETS:
        if not low <= tokens <= high:
            continue
        key = "graph_us" if results.get(mine, {}).get("graph_us") and results.get(other, {}).get("graph_us") else "eager_us"
        a, b = results.get(mine, {}).get(key), results.get(other, {}).get(key)
        out[name] = {"ratio": a / b, "limit": limit, "met": a / b <= limit, "on": key} if a and b else None
    return out


def builders_for(w: ExpertWeights) -> dict[str, Any]:
    """name -> layer callable, or a string saying why it cannot run here."""
    out: dict[str, Any] = {}
    for name, make in LAYERS.items():
        try:
            out[name] = make(w)
        except (ImportError, AttributeError) as error:
            out[name] = f"unavailable: {measure.error_text(error)}"
    out[GEMMS] = GemmsOnly(w)
    return out


def format_moe(points: list[dict[str, Any]]) -> str:
    header = ("routing", "T", "layer", "rel err", "graph us", "cold L2", "eager us", "host us")
    lines = []
    for point in points:
        for name, r in point["results"].items():
            cell = lambda k, f: "-" if r.get(k) is None else format(r[k], f)  # noqa: E731
            lines.append((point["routing"], str(point["tokens"]), name,
                          str(r["error"])[:70] if "error" in r else cell("rel_error", ".1e"),
                          cell("graph_us", ".1f"), cell("graph_cold_us", ".1f"), cell("eager_us", ".1f"),
                          cell("host_us", ".1f")))
    table = align(header, lines, {0, 2, 3})
    verdicts = [f"{p['routing']} T={p['tokens']}: {name}: " + ("not measured" if v is None else
                f"{v['ratio']:.2f} (limit {v['limit']:.2f}, {v['on']}) {'met' if v['met'] else 'MISSED'}")
                for p in points for name, v in p["targets"].items()]
    return table + ("\n\ntargets (time ratios):\n  " + "\n  ".join(verdicts) if verdicts else "")


def run(args: argparse.Namespace, token_values: list[int]) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = layer_model(args.model)
    except ValueError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    machine, started = Machine.measure(), time.time()
    w = build_weights(args.seed, MODEL_SHAPES[model]["gate_up"].num_experts)
    builders = builders_for(w)
    flush = measure.L2Flush()
    points = []
    for kind in routings(args.routing):
        for tokens in token_values:
            print(f"moe: {kind} T={tokens}", file=sys.stderr)
            points.append(run_point(w, builders, kind, tokens, args, flush))
    write_json(out_dir / "bench_moe.json", {**machine.as_dict(), "suite": "moe", "model": model, "H": HIDDEN,
                                            "I": INTERMEDIATE, "E": w.num_experts, "top_k": TOP_K,
                                            "seconds": round(time.time() - started, 1), "points": points})
    print(f"device: {machine.line()}")
    print(f"layer: {model} (E = {w.num_experts}, H = I = {HIDDEN}, top-{TOP_K})")
    for name, value in builders.items():
        if isinstance(value, str):  # e.g. mxfp4.moe not built yet, transformers not installed
            print(f"{name}: {value}")
    print(format_moe(points))
    return 0
