"""The fallback suite: the portable path forced on this (Hopper) GPU, beside bf16 torch and our SM90 kernel.

Per gpt-oss shape and M (rows per expert), on the same MXFP4 bytes, each output checked against float64 first:

* ``portable kernel``: ``mxfp4.grouped_mm`` on the forced portable path with the default budget (0 on a GPU
  where the in-register Triton kernel runs): no decoded copy;
* ``portable cached``: the same call with the decoded-weight cache allowed for every M (a budget, no size
  rule): ``torch._grouped_mm`` on the cached bf16 copy. Eager and device times only: a CUDA-graph capture
  takes the kernel by design (the copy is never filled inside a capture);
* ``torch bf16``: ``torch._grouped_mm`` on pre-dequantized bf16 weights;
* ``ours sm90``: the SM90 launcher called directly (the forced flag does not stop it), config from the table.

Times: CUDA-graph replay, eager back-to-back, device (kernel events); ratios are bf16 time over the path's
(> 1: faster than bf16); ``held`` is the weight memory the path keeps. ``--portable-sweep`` also times every
candidate tile config of the kernel per row (to re-tune ``portable_kernel.HOPPER_CONFIGS``), and
``--model-path DIR`` loads gpt-oss with ``load_gpt_oss`` on the forced portable path and reports its GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from . import measure, peers
from .bench_grouped_mm import Machine, operands
from .problems import MODEL_SHAPES, TOLERANCE, Row, make_row, routings, sample_rows
from .report import align, write_json

PATHS = ("portable kernel", "portable cached", "torch bf16", "ours sm90")
# Targets of issue 18 (H200, graph replay, no decoded copy): kernel vs bf16 at decode and at prefill.
DECODE_TARGET, PREFILL_TARGET = 2.0, 0.7
SWEEP_CANDIDATES = (
    "m16_n64_k256_w4_s3", "m16_n128_k128_w4_s3", "m16_n64_k128_w4_s4", "m16_n32_k256_w4_s3", "m32_n64_k256_w4_s3",
    "m64_n64_k128_w4_s3", "m64_n128_k128_w8_s3", "m128_n128_k64_w8_s3", "m128_n128_k128_w8_s3", "m256_n128_k64_w8_s3",
)


def force_portable() -> str:
    """Make ``mxfp4`` take its portable path on CUDA; returns the path's reason, raises Unavailable."""
    from mxfp4.ops import dispatch

    dispatch.force_portable(True)  # resets the cached decision
    choice = dispatch.select_path(torch.device("cuda"))
    if choice.path != dispatch.PORTABLE:
        raise peers.Unavailable("dispatch.force_portable(True) did not take effect: "
                                f"the op still takes {choice.path} ({choice.reason})")
    return choice.reason


def prepare_kernel(ops: peers.Operands) -> peers.Prepared:
    """The forced portable path with the default budget: the in-register kernel, no copy (checked by explain)."""
    import mxfp4

    prepared = peers.prepare_ours(ops)
    mode = [line for line in mxfp4.explain(ops.x, ops.packed, ops.offsets).splitlines() if "fallback:" in line]
    if not mode or "in-register kernel" not in mode[0]:
        raise peers.Unavailable(f"the portable path does not take the kernel here: {mode}")
    prepared.note = mode[0].split(":", 2)[1].strip()
    return prepared


def prepare_cached(ops: peers.Operands) -> peers.Prepared:
    """The portable path on the cached bf16 copy (under :func:`cache_policy` for this path)."""
    prepared = peers.prepare_ours(ops)
    prepared.note = "torch._grouped_mm on the cached bf16 copy"
    return prepared


@contextmanager
def cache_policy(path: str, ops: peers.Operands) -> Iterator[None]:
    """The cache allowed for every M on the cached path (a budget for every rotation copy, no size rule);
    the defaults (budget 0 where the kernel runs) elsewhere. Restored, and the cache emptied, afterwards."""
    import mxfp4
    from mxfp4.portable import fallback, weight_cache

    min_rows = fallback.CACHE_MIN_ROWS
    if path == "portable cached":
        copies = peers.copies_needed(ops.read_bytes, ops.packed.data.numel(), ops.l2_bytes, ops.budget)
        mxfp4.set_fallback_memory_budget(copies * ops.dequantized.numel() * 2 + (1 << 20))
        fallback.CACHE_MIN_ROWS = 0
    try:
        yield
    finally:
        fallback.CACHE_MIN_ROWS = min_rows
        mxfp4.set_fallback_memory_budget(None)
        weight_cache.clear()


def prepare_sm90(ops: peers.Operands) -> peers.Prepared:
    """Our SM90 kernel through its launcher, past the forced flag; the config the op would pick."""
    from codegen.runtime.launch import grouped_mm_sm90
    from mxfp4.ops import dispatch

    w, offsets = ops.packed, ops.offsets
    hint = -(-ops.x.shape[0] // w.num_experts)
    config = dispatch.choose_config(w.num_experts, w.n, w.k, hint, torch.cuda.get_device_name()).config

    def call(x: torch.Tensor, weight: Any) -> torch.Tensor:
        out = x.new_empty((x.shape[0], weight.n))
        grouped_mm_sm90(x, weight.data, weight.n, weight.k, offsets, False, config, out)
        return out

    return peers.Prepared(call, [(ops.x, w)], f"sm90 {config.name}")


PREPARE = {"portable kernel": prepare_kernel, "portable cached": prepare_cached,
           "torch bf16": peers.prepare_torch_bf16, "ours sm90": prepare_sm90}


def held_bytes(path: str, ops: peers.Operands) -> int:
    """Weight memory a path keeps: packed, packed + the decoded copy, or the bf16 weights."""
    packed, decoded = ops.packed.data.numel(), ops.dequantized.numel() * 2
    return {"portable cached": packed + decoded, "torch bf16": decoded}.get(path, packed)


def time_path(path: str, ops: peers.Operands, index: torch.Tensor, ref: torch.Tensor, quick: bool) -> dict[str, Any]:
    with cache_policy(path, ops):
        prepared = PREPARE[path](ops)
        out = prepared.fn(*prepared.arg_sets[0])  # the first call (compiles, decodes / caches), untimed
        rel = measure.rel_error(out[index], ref)
        del out
        if not rel <= TOLERANCE:
            return {"rel_error": rel, "error": f"wrong result: rel. error {rel:.2e}; not timed"}
        result: dict[str, Any] = {"rel_error": rel, "note": prepared.note, "held_bytes": held_bytes(path, ops)}
        result.update(measure.time_all(prepared.fn, prepared.arg_sets, graph=path != "portable cached", quick=quick))
        return result


def run_row(row: Row, packed: Any, dequantized: torch.Tensor, args: argparse.Namespace) -> None:
    ops = operands(row, packed, dequantized, seed=args.seed + row.m)
    index, ref = measure.reference_rows(ops.x, dequantized, sample_rows(row.loads, seed=args.seed))
    for path in PATHS:
        try:
            row.results[path] = time_path(path, ops, index, ref, args.quick)
        except Exception as error:
            row.results[path] = {"error": measure.error_text(error)}
            if not measure.healthy():
                raise
        finally:
            torch.cuda.empty_cache()
    if args.portable_sweep:
        row.results["sweep"] = sweep_row(ops, index, ref)
    add_ratios(row)


def _best_time(result: dict[str, Any]) -> float | None:
    """Graph replay if there is one, else eager (the cached path is never captured)."""
    return result.get("graph_us") or result.get("eager_us")


def add_ratios(row: Row) -> None:
    bf16 = _best_time(row.results.get("torch bf16", {}))
    for path in PATHS:
        result = row.results.get(path, {})
        mine = _best_time(result)
        result["vs_bf16"] = bf16 / mine if mine and bf16 else None


def sweep_row(ops: peers.Operands, index: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Graph-replay µs of the kernel with each candidate tile config (each checked against float64 first)."""
    from mxfp4.portable import kernel as portable_kernel

    w, times = ops.packed, {}
    out = ops.x.new_empty((ops.x.shape[0], w.n))
    for name in SWEEP_CANDIDATES:
        config = portable_kernel.KernelConfig.from_name(name)
        call = lambda x, c=config: portable_kernel.launch(x, w.data, w.n, w.k, ops.offsets, False, out, c)  # noqa: E731
        try:
            out.fill_(float("nan"))
            call(ops.x)
            rel = measure.rel_error(out[index], ref)
            times[name] = round(measure.graph_time(call, [(ops.x,)], budget_ms=40.0).median_us, 2) if rel <= TOLERANCE else f"wrong ({rel:.1e})"
        except Exception as error:
            times[name] = measure.error_text(error)[:60]
    return times


def _cell(result: dict[str, Any], key: str, fmt: str = ".1f") -> str:
    if "error" in result:
        return "err"
    value = result.get(key)
    return "-" if value is None else format(value, fmt)


def target_note(row: Row) -> str:
    ratio = row.results.get("portable kernel", {}).get("vs_bf16")
    if ratio is None or 16 < row.m < 1024:
        return ""
    target = DECODE_TARGET if row.m <= 16 else PREFILL_TARGET
    return f"{'ok' if ratio >= target else 'MISS'} (>= {target}x)"


def format_fallback(rows: list[Row]) -> str:
    header = ("shape", "routing", "M", "kernel graph us", "cached eager us", "bf16 graph us", "sm90 graph us",
              "kernel x", "cached x", "sm90 x", "kernel target", "held kernel/cached/bf16 GiB", "kernel rel err")
    lines = []
    for row in rows:
        kernel, cached, bf16, sm90 = (row.results.get(path, {}) for path in PATHS)
        held = "/".join(f"{r.get('held_bytes', 0) / 2**30:.2f}" for r in (kernel, cached, bf16))
        lines.append((f"{row.model} {row.projection}", row.routing, str(row.m), _cell(kernel, "graph_us"),
                      _cell(cached, "eager_us"), _cell(bf16, "graph_us"), _cell(sm90, "graph_us"),
                      _cell(kernel, "vs_bf16", ".2f"), _cell(cached, "vs_bf16", ".2f"), _cell(sm90, "vs_bf16", ".2f"),
                      target_note(row), held, _cell(kernel, "rel_error", ".1e")))
    return align(header, lines, {0, 1, 10})


def format_errors(rows: list[Row]) -> str:
    errors = [f"  {row.model} {row.projection} M={row.m} {row.routing} {path}: {result['error']}"
              for row in rows for path, result in row.results.items() if isinstance(result, dict) and "error" in result]
    return "\n".join(["errors:", *errors]) if errors else ""


def format_sweep(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        times = row.results.get("sweep")
        if times:
            timed = {name: t for name, t in times.items() if isinstance(t, float)}
            best = min(timed, key=timed.get) if timed else "-"
            lines.append(f"  {row.model} {row.projection} M={row.m} {row.routing}: best {best}; "
                         + ", ".join(f"{name} {t}" for name, t in times.items()))
    return "\n".join(["kernel tile sweep (graph us):", *lines]) if lines else ""


def run(args: argparse.Namespace, m_values: list[int]) -> int:
    from codegen.tune.sweep import random_weights

    try:
        reason = force_portable()
    except peers.Unavailable as error:
        print(f"fallback: cannot force the portable path: {error}")
        return 1
    if args.model_path:
        return model_memory(args.model_path)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine, started, rows = Machine.measure(), time.time(), []
    routing_kinds = routings(args.routing)
    for model in args.model or ["gpt-oss-20b"]:
        for projection, shape in MODEL_SHAPES[model].items():
            packed, dequantized = random_weights(shape, torch.device("cuda"), seed=args.seed)
            for m in m_values:
                for routing in routing_kinds:
                    row = make_row(model, projection, shape, routing, m, seed=args.seed)
                    print(f"fallback: {model} {projection} M={m} {routing}", file=sys.stderr)
                    run_row(row, packed, dequantized, args)
                    rows.append(row)
            del packed, dequantized
            torch.cuda.empty_cache()
    write_json(out_dir / "bench_fallback.json", {**machine.as_dict(), "suite": "fallback", "forced": reason,
                                                 "seconds": round(time.time() - started, 1),
                                                 "rows": [row.as_dict() for row in rows]})
    print(f"device: {machine.line()}\nforced portable path: {reason}")
    print("graph = CUDA-graph replay, eager = back-to-back calls (second call on); x = bf16 time / path time "
          "(> 1: faster); cached: eager (a capture takes the kernel); held = weight memory the path keeps")
    print(format_fallback(rows))
    for text in (format_errors(rows), format_sweep(rows)):
        if text:
            print(text)
    return 0


def model_memory(path: str) -> int:
    """GPU memory of gpt-oss loaded by ``load_gpt_oss`` on the forced portable path, and a short greedy decode."""
    from mxfp4.ops import dispatch
    from mxfp4.portable import weight_cache

    try:
        from mxfp4.integrations.transformers import load_gpt_oss
    except ImportError as error:
        print(f"fallback --model-path: load_gpt_oss is not available here ({error}); it comes with issue 13")
        return 1
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = load_gpt_oss(path, device="cuda")
    loaded = torch.cuda.memory_allocated() - before
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    started = time.perf_counter()
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=32, do_sample=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    stats = weight_cache.stats("cuda")
    print(f"device: {torch.cuda.get_device_name()}\nmodel {path} on the forced portable path "
          f"({dispatch.select_path(torch.device('cuda')).reason})")
    print(f"held after load {loaded / 2**30:.2f} GiB; peak {(torch.cuda.max_memory_allocated() - before) / 2**30:.2f} GiB; "
          f"decoded copies cached {stats.nbytes} bytes; {generated.shape[1] - ids.shape[1]} new tokens in "
          f"{seconds:.2f} s ({(generated.shape[1] - ids.shape[1]) / seconds:.1f} tokens/s, first call compiles)")
    return 0 if stats.nbytes == 0 else 1
