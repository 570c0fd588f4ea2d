"""The tuning sweep: measure candidate configs per (shape, M) and write a tuning table.

:func:`run_sweep` compiles the candidates in parallel (``codegen.compiler.compile_many``, disk
cache), then measures every (shape, M, config) with an injectable ``measure`` callable (the GPU one
is :class:`GpuMeasurer`: check against an fp32 reference, then time with ``codegen.timing``).
Every result (or error) is appended to ``<out>.progress.jsonl`` as soon as it exists, so an
interrupted sweep resumes where it stopped; a config that fails to compile, launch, or gives a
wrong answer is recorded and skipped. The table (format in :mod:`codegen.tuning`) keeps the
fastest correct config per bucket together with the heuristic default's time
(``codegen.selection.heuristic_config``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from .config import TileConfig
from .tuning import Shape, m_bucket, new_table, read_table, write_table

DEFAULT_TOLERANCE = 1e-2
# Exit status of a sweep worker that must be restarted (the CUDA context is lost, or a kernel hung).
EXIT_RESTART = 75

# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """What a measure step returns for one (shape, M, config).

    ``rel_error``: ``||out - ref|| / ||ref||`` (None: not checked, which the sweep counts as wrong).
    ``median_us`` may be None when the measure step skipped timing a wrong result.
    """

    median_us: float | None = None
    p10_us: float | None = None
    p90_us: float | None = None
    rel_error: float | None = None
    reps: int = 0
    note: str = ""


MeasureFn = Callable[[Shape, int, TileConfig], Measurement]
CompileFn = Callable[..., list]


class GpuContextLost(RuntimeError):
    """A kernel left the CUDA context unusable; the sweep must continue in a fresh process."""


def problem_bytes(shape: Shape, m: int) -> int:
    from .timing import grouped_mm_bytes

    return grouped_mm_bytes(shape.num_experts, shape.n, shape.k, shape.num_experts * m)


def problem_flops(shape: Shape, m: int) -> int:
    from .timing import grouped_mm_flops

    return grouped_mm_flops(shape.num_experts * m, shape.n, shape.k)


def progress_log_path(out_path: Path | str) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".progress.jsonl")


def _record_key(record: dict) -> tuple:
    return (int(record["E"]), int(record["N"]), int(record["K"]), int(record["m"]), str(record["config"]))


_DONE = ("ok", "wrong", "error")  # statuses a resumed sweep does not measure again


class _Log:
    """The JSONL progress log: one record per line, flushed and fsynced as it is written."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and path.exists():
            path.replace(path.with_name(path.name + ".old"))
        self.records: list[dict] = []
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash: ignore it
                    print(f"tune: {path}:{number}: skipping a damaged line", file=sys.stderr)

    def append(self, record: dict) -> None:
        with self.lock:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.records.append(record)


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    lines = text.splitlines()
    return "\n".join(lines[:20]) + ("\n..." if len(lines) > 20 else "")


@dataclass
class SweepRow:
    shape: Shape
    m: int
    best: dict | None
    default_config: str
    default: dict | None
    measured: int
    failed: int

    @property
    def gain(self) -> float | None:
        if not self.best or not self.default:
            return None
        return self.default["median_us"] / self.best["median_us"]


def _summarize(records: list[dict], shapes: Sequence[Shape], m_values: Sequence[int], gpu: str) -> list[SweepRow]:
    from .selection import heuristic_config

    rows = []
    for shape in shapes:
        for m in m_values:
            mine = [
                r for r in records
                if r.get("gpu") == gpu and (r.get("E"), r.get("N"), r.get("K"), r.get("m")) == (shape.num_experts, shape.n, shape.k, m)
            ]
            ok = [r for r in mine if r.get("status") == "ok"]
            best = min(ok, key=lambda r: r["median_us"]) if ok else None
            default_name = heuristic_config(m).name
            default = next((r for r in ok if r["config"] == default_name), None)
            rows.append(SweepRow(shape, m, best, default_name, default, len(mine), sum(r.get("status") != "ok" for r in mine)))
    return rows


def build_table(records: list[dict], gpu: str, base: dict | None = None) -> dict[str, Any]:
    """The tuning table of every ``ok`` record of ``gpu``: the fastest config per (shape, M bucket).

    When several measured M values share a bucket, the largest M (nearest the bucket's top) speaks
    for it. ``base`` (an existing table of the same GPU) keeps its other entries.
    """
    from .selection import heuristic_config

    table = new_table(gpu)
    if base and base.get("gpu") == gpu and isinstance(base.get("entries"), dict):
        table["entries"] = {shape: dict(buckets) for shape, buckets in base["entries"].items()}
    ok = [r for r in records if r.get("gpu") == gpu and r.get("status") == "ok" and r.get("median_us")]
    by_shape_m: dict[tuple[str, int], list[dict]] = {}
    for r in ok:
        by_shape_m.setdefault((f"{r['E']},{r['N']},{r['K']}", int(r["m"])), []).append(r)
    chosen: dict[tuple[str, int], int] = {}
    for shape_key, m in by_shape_m:
        bucket = m_bucket(m)
        if m > chosen.get((shape_key, bucket), 0):
            chosen[(shape_key, bucket)] = m
    for (shape_key, bucket), m in sorted(chosen.items()):
        candidates = by_shape_m[(shape_key, m)]
        best = min(candidates, key=lambda r: r["median_us"])
        default_name = heuristic_config(m).name
        default = next((r for r in candidates if r["config"] == default_name), None)
        table["entries"].setdefault(shape_key, {})[str(bucket)] = {
            "config": best["config"],
            "m": m,
            "median_us": round(best["median_us"], 3),
            "tflops": _significant(best.get("tflops") or 0.0),
            "gbps": _significant(best.get("gbps") or 0.0),
            "default_config": default_name,
            "default_us": round(default["median_us"], 3) if default else None,
        }
    return table


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def format_summary(rows: list[SweepRow]) -> str:
    header = ("shape", "M", "best config", "us", "TFLOP/s", "GB/s", "default config", "default us", "gain")
    lines = []
    for row in rows:
        best, default = row.best, row.default
        lines.append((
            row.shape.label,
            str(row.m),
            best["config"] if best else f"(none of {row.measured} valid)",
            f"{best['median_us']:.1f}" if best else "-",
            f"{best['tflops']:.3g}" if best else "-",
            f"{best['gbps']:.4g}" if best else "-",
            row.default_config,
            f"{default['median_us']:.1f}" if default else "failed/untimed",
            f"{row.gain:.2f}x" if row.gain else "-",
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 2, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(line) for line in lines)])


def plot_sweep(rows: list[SweepRow], path: Path | str, title: str = "") -> Path | None:
    """Time vs M per shape, best vs default, as a PNG; None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tune: matplotlib is not installed; skipping the plot (pip install 'hopper-mxfp4[bench]')", file=sys.stderr)
        return None
    shapes = list(dict.fromkeys(row.shape for row in rows))
    figure, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for axis, shape in zip(axes[0], shapes):
        mine = [row for row in rows if row.shape == shape]
        for label, pick, style in (("best", lambda r: r.best, "o-"), ("default", lambda r: r.default, "s--")):
            points = [(r.m, pick(r)["median_us"]) for r in mine if pick(r)]
            if points:
                axis.plot(*zip(*points), style, label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens per expert (M)")
        axis.set_ylabel("time (us)")
        axis.set_title(shape.label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _default_compile(configs: list[TileConfig], jobs: int | None, progress: bool) -> list:
    from .compiler import compile_many

    return compile_many(configs, jobs=jobs, progress=progress)


def run_sweep(
    shapes: Sequence[Shape],
    m_values: Sequence[int],
    configs: Sequence[TileConfig],
    *,
    out_path: Path | str,
    jobs: int | None = None,
    resume: bool = True,
    progress: bool = True,
    measure: MeasureFn | None = None,
    compile_fn: CompileFn | None = None,
    m_filter: Callable[[Sequence[TileConfig], int], list[TileConfig]] | None = None,
    device_name: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    watchdog_s: float | None = None,
    plot: bool = True,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Measure every (shape, M, config), write the tuning table to ``out_path`` and return it.

    ``configs``: the candidates; the heuristic default of every M is added (its time is the
    baseline). ``m_filter(configs, m)`` narrows the candidates per M (e.g. :func:`configs_for_m`).
    ``measure(shape, m, config) -> Measurement``: default a :class:`GpuMeasurer` on the current CUDA
    device; an exception it raises is recorded as the config's error (and, if the measurer says the
    CUDA context is gone, the sweep stops with :class:`GpuContextLost` after recording it).
    ``compile_fn(configs, jobs=, progress=)``: default ``codegen.compiler.compile_many``; a config
    whose result is an exception is recorded as a compile error and skipped.
    ``resume``: skip what ``<out>.progress.jsonl`` already holds (False: start a fresh log).
    ``watchdog_s``: if one measurement takes longer, record it as hung and ``os._exit(EXIT_RESTART)``
    (for a supervised worker process only: a hung kernel cannot be interrupted otherwise).
    Progress goes to ``stream`` (stderr); the summary table to stdout.
    """
    from .progress import Progress
    from .selection import heuristic_config

    stream = stream if stream is not None else sys.stderr
    out_path = Path(out_path)
    shapes = list(dict.fromkeys(shapes))
    m_values = sorted(set(int(m) for m in m_values))
    if not shapes or not m_values:
        raise ValueError("run_sweep: give at least one shape and one M value")
    if any(m < 1 for m in m_values):
        raise ValueError(f"run_sweep: M values must be >= 1, got {m_values}")
    configs = list(dict.fromkeys(configs))
    if measure is None:
        measure = GpuMeasurer(tolerance=tolerance)
    if device_name is None:
        device_name = getattr(measure, "device_name", None) or "unknown GPU"
    gpu = device_name

    # The plan: per M, the candidates (default first: the best-so-far starts from the baseline).
    plan: list[tuple[Shape, int, TileConfig]] = []
    per_m: dict[int, list[TileConfig]] = {}
    for m in m_values:
        default = heuristic_config(m)
        candidates = list(m_filter(configs, m)) if m_filter else list(configs)
        per_m[m] = [default] + [c for c in candidates if c != default]
    for shape in shapes:
        for m in m_values:
            plan += [(shape, m, config) for config in per_m[m]]
    to_compile = list(dict.fromkeys(c for m in m_values for c in per_m[m]))

    log = _Log(progress_log_path(out_path), resume)
    done = {_record_key(r) for r in log.records if r.get("gpu") == gpu and r.get("status") in _DONE and "m" in r}
    remaining = [item for item in plan if (item[0].num_experts, item[0].n, item[0].k, item[1], item[2].name) not in done]
    print(
        f"tune: {gpu}: {len(shapes)} shape(s) x {len(m_values)} M value(s), {len(to_compile)} config(s), "
        f"{len(plan)} measurements" + (f" ({len(plan) - len(remaining)} already in {log.path})" if len(remaining) < len(plan) else "")
        + f"; log: {log.path}",
        file=stream,
    )

    # Compile what is still needed, in parallel (cache hits are instant).
    compile_errors: dict[str, str] = {}
    needed = list(dict.fromkeys(config for _, _, config in remaining))
    if needed:
        compile_fn = compile_fn or _default_compile
        results = compile_fn(needed, jobs=jobs, progress=progress)
        for config, result in zip(needed, results):
            if isinstance(result, BaseException):
                compile_errors[config.name] = _error_text(result)
                log.append({"gpu": gpu, "config": config.name, "status": "compile_error", "error": compile_errors[config.name], "t": time.time()})
        if compile_errors:
            print(f"tune: {len(compile_errors)} config(s) failed to compile and are skipped: {', '.join(sorted(compile_errors))}", file=stream)

    bar = Progress(len(remaining), label="tune", enabled=progress, stream=stream)
    best_so_far: dict[tuple[Shape, int], tuple[float, str]] = {}
    for r in log.records:
        if r.get("gpu") == gpu and r.get("status") == "ok" and "m" in r:
            key = (Shape(r["E"], r["N"], r["K"]), int(r["m"]))
            if key not in best_so_far or r["median_us"] < best_so_far[key][0]:
                best_so_far[key] = (r["median_us"], r["config"])
    current_shape = None
    try:
        for shape, m, config in remaining:
            if shape != current_shape:
                if current_shape is not None and hasattr(measure, "release"):
                    measure.release()
                current_shape = shape
            base = {"gpu": gpu, "E": shape.num_experts, "N": shape.n, "K": shape.k, "m": m, "config": config.name}
            what = f"{shape.label} M={m} {config.name}"
            if config.name in compile_errors:
                bar.advance(what, ok=False, note="compile error")
                continue
            bar.working(what)
            watchdog = None
            if watchdog_s:
                watchdog = threading.Timer(watchdog_s, _hung, args=(log, base, watchdog_s, stream))
                watchdog.daemon = True
                watchdog.start()
            try:
                result = measure(shape, m, config)
            except Exception as error:  # a launch failure, an out-of-memory, ...: record, skip, go on
                if watchdog:
                    watchdog.cancel()
                log.append({**base, "status": "error", "error": _error_text(error), "t": time.time()})
                bar.advance(what, ok=False, note=_error_text(error).splitlines()[0][:120])
                healthy = getattr(measure, "healthy", None)
                if healthy is not None and not healthy():
                    raise GpuContextLost(
                        f"the CUDA context is unusable after {config.name} failed ({_error_text(error).splitlines()[0]}); "
                        "the error is recorded: rerun (resume) to continue in a fresh process"
                    ) from error
                continue
            finally:
                if watchdog:
                    watchdog.cancel()
            record = {**base, **_classify(result, shape, m, tolerance), "t": time.time()}
            log.append(record)
            if record["status"] == "ok":
                key = (shape, m)
                if key not in best_so_far or record["median_us"] < best_so_far[key][0]:
                    best_so_far[key] = (record["median_us"], config.name)
                best_us, best_name = best_so_far[key]
                bar.advance(what, ok=True, note=f"{record['median_us']:.1f} us (best {best_name} {best_us:.1f} us)")
            else:
                bar.advance(what, ok=False, note=f"WRONG: rel. error {record.get('rel_error')} > {tolerance}; discarded")
                print(f"\ntune: {what} gives a wrong result (rel. error {record.get('rel_error')}); discarded", file=stream)
    finally:
        bar.close()
        if current_shape is not None and hasattr(measure, "release"):
            measure.release()

    base_table = None
    if out_path.exists():
        try:
            base_table = read_table(out_path)
        except (ValueError, OSError) as error:
            print(f"tune: replacing unreadable {error}", file=stream)
    table = build_table(log.records, gpu, base_table)
    write_table(out_path, table)
    rows = _summarize(log.records, shapes, m_values, gpu)
    print(format_summary(rows))
    print(f"tune: wrote {out_path}", file=stream)
    if plot:
        png = plot_sweep(rows, out_path.with_suffix(".png"), title=gpu)
        if png is not None:
            print(f"tune: plot {png}", file=stream)
    return table


def _classify(result: Measurement, shape: Shape, m: int, tolerance: float) -> dict[str, Any]:
    rel = result.rel_error
    fields = {"rel_error": rel, "reps": result.reps}
    if result.note:
        fields["note"] = result.note
    if rel is None or not math.isfinite(rel) or rel > tolerance:
        return {**fields, "status": "wrong", "median_us": result.median_us}
    if result.median_us is None or not result.median_us > 0:
        return {**fields, "status": "error", "error": "the measure step returned no time"}
    seconds = result.median_us * 1e-6
    return {
        **fields,
        "status": "ok",
        "median_us": result.median_us,
        "p10_us": result.p10_us,
        "p90_us": result.p90_us,
        "tflops": problem_flops(shape, m) / seconds / 1e12,
        "gbps": problem_bytes(shape, m) / seconds / 1e9,
    }


def _hung(log: _Log, base: dict, seconds: float, stream: TextIO) -> None:
    """Watchdog: the measurement did not return; record it and leave (a hung kernel cannot be stopped)."""
    message = f"no result after {seconds:.0f} s (kernel hang?)"
    try:
        log.append({**base, "status": "error", "error": message, "t": time.time()})
        print(f"\ntune: {base['config']} at E={base['E']} N={base['N']} K={base['K']} M={base['m']}: {message}; "
              "recorded; restarting the worker", file=stream, flush=True)
    finally:
        os._exit(EXIT_RESTART)


# ---------------------------------------------------------------------------------------------
# The GPU measure step
# ---------------------------------------------------------------------------------------------


def random_weights(shape: Shape, device: Any, *, seed: int = 0):
    """(packed, dequantized): random ``N(0, 1)`` weights ``[E, N, K]`` quantized to MXFP4 and packed,
    and their exact bf16 dequantization, built on ``device`` a few experts at a time."""
    import torch

    import mxfp4
    from mxfp4.layout import unpack_experts

    e, n, k = shape.num_experts, shape.n, shape.k
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + (zlib.crc32(shape.key.encode()) & 0xFFFF))
    step = max(1, (1 << 27) // (n * k))  # experts per chunk: bounded fp32 temporaries
    parts = []
    for e0 in range(0, e, step):
        w = torch.randn((min(e, e0 + step) - e0, n, k), generator=generator, dtype=torch.float32, device=device)
        parts.append(mxfp4.pack(mxfp4.quantize(w)).data)
        del w
    packed = mxfp4.PackedMXFP4(torch.cat(parts) if len(parts) > 1 else parts[0], n, k)
    del parts
    dequantized = torch.empty((e, n, k), dtype=torch.bfloat16, device=device)
    for e0 in range(0, e, step):
        e1 = min(e, e0 + step)
        dequantized[e0:e1] = mxfp4.dequantize(unpack_experts(packed, e0, e1), torch.bfloat16)
    return packed, dequantized


class GpuMeasurer:
    """``measure(shape, m, config)`` on the current CUDA device: check, then time ``mxfp4.grouped_mm``.

    Per shape (built once, freed by :meth:`release`): random bf16 weights ``N(0, 1)``, quantized and
    packed once, plus their bf16 dequantization (exact) for the reference. Per M: x with uniform
    routing (M rows per expert), int32 offsets, and enough copies of (weights, x) to rotate past
    the L2 (``codegen.timing.rotation_sets``). The check is ``||out - ref|| / ||ref||`` against an
    fp32 reference (TF32 off) computed per chunk of experts; a result over ``tolerance`` is
    returned untimed. A correct one is timed and checked once more after timing.
    """

    def __init__(
        self,
        *,
        rep: int = 50,
        warmup_ms: float = 20.0,
        max_ms: float = 1500.0,
        tolerance: float = DEFAULT_TOLERANCE,
        seed: int = 0,
        memory_budget: int | None = None,
        device: Any = None,
    ):
        import torch

        from mxfp4.dispatch import SM90, select_path

        if device is None:  # the real thing: the current CUDA device, on the SM90 path
            if not torch.cuda.is_available():
                raise RuntimeError("GpuMeasurer needs a CUDA device")
            device = torch.device("cuda", torch.cuda.current_device())
            choice = select_path(device)
            if choice.path != SM90:
                raise RuntimeError(f"mxfp4.grouped_mm would not run the SM90 kernel here: {choice.reason}")
            self.device_name = torch.cuda.get_device_name(device)
        else:  # an explicit device (a CPU dry run in tests; time_cuda must then be replaced)
            device = torch.device(device)
            self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        self.device = device
        self.rep, self.warmup_ms, self.max_ms = rep, warmup_ms, max_ms
        self.tolerance = tolerance
        self.seed = seed
        self.memory_budget = memory_budget
        self._shape: Shape | None = None
        self._weights: Any = None  # (packed, dequantized bf16)
        self._m: int | None = None
        self._sets: list[tuple] = []

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def _synchronize(self) -> None:
        import torch

        if self._cuda:
            torch.cuda.synchronize(self.device)

    # -- inputs ------------------------------------------------------------------------------
    def release(self) -> None:
        import torch

        self._shape = self._weights = self._m = None
        self._sets = []
        if self._cuda:
            torch.cuda.empty_cache()

    def _generator(self, salt: int):
        import torch

        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 1_000_003 + 7919 * salt + 1)
        return generator

    def _build_weights(self, shape: Shape) -> None:
        self.release()
        self._weights = random_weights(shape, self.device, seed=self.seed)
        self._shape = shape

    def _build_inputs(self, shape: Shape, m: int) -> None:
        import torch

        from .timing import l2_cache_bytes, rotation_sets

        if self._shape != shape:
            self._build_weights(shape)
        packed, _ = self._weights
        self._sets = []
        if self._cuda:
            torch.cuda.empty_cache()
        e, n, k = shape.num_experts, shape.n, shape.k
        tokens = e * m
        generator = self._generator(m)
        x = torch.randn((tokens, k), generator=generator, dtype=torch.bfloat16, device=self.device)
        offsets = (torch.arange(e + 1, dtype=torch.int32, device=self.device) * m).contiguous()
        per_set = packed.data.numel() + x.numel() * 2 + tokens * n * 2
        budget = self.memory_budget
        if budget is None:
            budget = min(4 << 30, int(torch.cuda.mem_get_info(self.device)[0] * 0.25)) if self._cuda else 8 << 20
        l2 = l2_cache_bytes(self.device) if self._cuda else l2_cache_bytes(None)
        count = rotation_sets(per_set, l2_bytes=l2, memory_budget=max(budget, per_set))
        self._sets = [(x, packed, offsets)]
        for _ in range(count - 1):
            import mxfp4

            self._sets.append((x.clone(), mxfp4.PackedMXFP4(packed.data.clone(), n, k), offsets.clone()))
        self._m = m

    # -- the check ---------------------------------------------------------------------------
    def relative_error(self, out, x, offsets_host: list[int]) -> float:
        """``||out - ref|| / ||ref||`` with ref in fp32 from the bf16 dequantized weights (TF32 off)."""
        import torch

        _, dequantized = self._weights
        e, n, k = dequantized.shape
        m = self._m
        step = max(1, (1 << 28) // max(1, n * k * 4 + m * (k + n) * 4))  # ~256 MB of fp32 per chunk
        diff2 = torch.zeros((), dtype=torch.float64, device=self.device)
        ref2 = torch.zeros((), dtype=torch.float64, device=self.device)
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            for e0 in range(0, e, step):
                e1 = min(e, e0 + step)
                rows = slice(offsets_host[e0], offsets_host[e1])
                xs = x[rows].float().view(e1 - e0, m, k)
                ref = torch.bmm(xs, dequantized[e0:e1].float().transpose(1, 2))
                got = out[rows].float().view(e1 - e0, m, n)
                diff2 += (got - ref).double().square().sum()
                ref2 += ref.double().square().sum()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        value = float((diff2.sqrt() / ref2.sqrt().clamp_min(1e-30)).item())
        return value if math.isfinite(value) else float("inf")

    def healthy(self) -> bool:
        """Whether the CUDA context still works (a faulting kernel makes every later call fail)."""
        import torch

        try:
            self._synchronize()
            return float(torch.ones(4, device=self.device).sum().item()) == 4.0
        except Exception:
            return False

    # -- the measure step --------------------------------------------------------------------
    def __call__(self, shape: Shape, m: int, config: TileConfig) -> Measurement:
        import mxfp4

        from .timing import time_cuda

        if self._shape != shape or self._m != m:
            self._build_inputs(shape, m)
        x, packed, offsets = self._sets[0]
        offsets_host = [i * m for i in range(shape.num_experts + 1)]
        out = mxfp4.grouped_mm(x, packed, offsets, config=config)
        self._synchronize()
        rel = self.relative_error(out, x, offsets_host)
        del out
        if not rel <= self.tolerance:
            return Measurement(rel_error=rel, note="untimed: wrong result")
        timing = time_cuda(
            lambda xi, wi, oi: mxfp4.grouped_mm(xi, wi, oi, config=config),
            rotate=self._sets,
            warmup_ms=self.warmup_ms,
            rep=self.rep,
            max_ms=self.max_ms,
        )
        out = mxfp4.grouped_mm(x, packed, offsets, config=config)
        rel = max(rel, self.relative_error(out, x, offsets_host))
        return Measurement(
            median_us=timing.median_us,
            p10_us=timing.p10_us,
            p90_us=timing.p90_us,
            rel_error=rel,
            reps=len(timing.samples),
            note=f"{len(self._sets)} rotating input set(s)",
        )
