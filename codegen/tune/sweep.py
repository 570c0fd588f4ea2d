"""The tuning sweep: measure candidate configs per (shape, M) and write a tuning table.

:func:`run_sweep` runs four steps, each its own function:

1. **plan** (:func:`plan_sweep`): the (shape, M, config) items, the heuristic default first per M,
   less what the progress log already holds;
2. **compile** (:func:`compile_step`): the configs still needed, in parallel
   (``codegen.build.compiler.compile_many``, disk cache); a config that fails is recorded and skipped;
3. **measure** (:func:`measure_step`): every item with an injectable ``measure`` callable (the GPU
   one is :class:`codegen.tune.measure.GpuMeasurer`), under a watchdog, each result classified and
   appended to ``<out>.progress.jsonl`` as soon as it exists, so an interrupted sweep resumes where
   it stopped;
4. **record** (:func:`record_step`): the table (format in :mod:`codegen.tune.tables`) of the config
   :func:`codegen.tune.choice.choose` picks per bucket (one routing: the fastest correct one) with the
   heuristic default's time, the summary and the plot (:mod:`codegen.tune.report`).

An item is (shape, M, config, routing): with ``routings=("uniform", "zipf")`` every candidate is measured
under both loads of the same total rows (:mod:`codegen.tune.loads`), and the entry records both times.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence, TextIO

from codegen.build.config import TileConfig
from codegen.build.progress import Progress

from .choice import record_routing
from .loads import check_routings
from .measure import (
    DEFAULT_TOLERANCE,
    GpuMeasurer,
    Measurement,
    random_weights,  # noqa: F401  (benchmarks import it from here)
)
from .report import build_table, format_summary, plot_sweep, summarize
from .tables import Shape, read_table, write_table

# Exit status of a sweep worker that must be restarted (the CUDA context is lost, or a kernel hung).
EXIT_RESTART = 75

MeasureFn = Callable[[Shape, int, TileConfig, str], Measurement]
CompileFn = Callable[..., list]


class Item(NamedTuple):
    """One measurement: a config at M tokens per expert (on average) with ``routing``'s loads."""

    shape: Shape
    m: int
    config: TileConfig
    routing: str = "uniform"

_DONE = ("ok", "wrong", "error")  # statuses a resumed sweep does not measure again


class GpuContextLost(RuntimeError):
    """A kernel left the CUDA context unusable; the sweep must continue in a fresh process."""


def problem_bytes(shape: Shape, m: int, routing: str = "uniform") -> int:
    """Bytes that must move at M tokens per expert with ``routing``'s loads (an expert with no rows reads no
    weights; which experts are empty depends on the seed, how many do not)."""
    from .loads import row_loads
    from .timing import grouped_mm_bytes

    active = sum(1 for load in row_loads(routing, shape.num_experts, m) if load)
    return grouped_mm_bytes(active, shape.n, shape.k, shape.num_experts * m)


def problem_flops(shape: Shape, m: int) -> int:
    from .timing import grouped_mm_flops

    return grouped_mm_flops(shape.num_experts * m, shape.n, shape.k)


def progress_log_path(out_path: Path | str) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".progress.jsonl")


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    lines = text.splitlines()
    return "\n".join(lines[:20]) + ("\n..." if len(lines) > 20 else "")


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

    def measured(self, gpu: str, statuses: Sequence[str]) -> list[dict]:
        """This GPU's measurement records (not compile errors) whose status is one of ``statuses``."""
        return [r for r in self.records if r.get("gpu") == gpu and r.get("status") in statuses and "m" in r]


def _base_record(gpu: str, item: Item) -> dict[str, Any]:
    shape, m, config, routing = item
    return {"gpu": gpu, "E": shape.num_experts, "N": shape.n, "K": shape.k, "m": m, "config": config.name,
            "routing": routing}


def _record_key(record: dict) -> tuple:
    return (int(record["E"]), int(record["N"]), int(record["K"]), int(record["m"]), str(record["config"]),
            record_routing(record))


# ---------------------------------------------------------------------------------------------
# 1. plan
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepPlan:
    """What a sweep measures: ``items`` in order, and the unique ``configs`` among them."""

    shapes: list[Shape]
    m_values: list[int]
    items: list[Item]
    configs: list[TileConfig]
    routings: tuple[str, ...] = ("uniform",)

    @property
    def activations(self) -> str:
        """The kernel family swept (one per sweep: plan_sweep checks)."""
        return self.configs[0].activations if self.configs else "bf16"

    def remaining(self, log: _Log, gpu: str) -> list[Item]:
        """The items the log of ``gpu`` does not already hold a final result for."""
        done = {_record_key(r) for r in log.measured(gpu, _DONE)}
        return [item for item in self.items if _record_key(_base_record(gpu, item)) not in done]


def plan_sweep(
    shapes: Sequence[Shape],
    m_values: Sequence[int],
    configs: Sequence[TileConfig],
    m_filter: Callable[[Sequence[TileConfig], int], list[TileConfig]] | None = None,
    routings: Sequence[str] = ("uniform",),
) -> SweepPlan:
    """Per M, the candidates (``m_filter`` narrows them) with the heuristic default of their family first, so
    the best-so-far starts from the baseline, each under every routing in turn (a config's routings are
    adjacent: they share the inputs but for the offsets); raises ValueError for no shape, no M, M < 1, an
    unknown routing or configs of two kernel families (W4A16 and W4A8 tune in separate sweeps)."""
    from .selection import heuristic_config

    shapes = list(dict.fromkeys(shapes))
    m_values = sorted(set(int(m) for m in m_values))
    if not shapes or not m_values:
        raise ValueError("run_sweep: give at least one shape and one M value")
    if any(m < 1 for m in m_values):
        raise ValueError(f"run_sweep: M values must be >= 1, got {m_values}")
    routings = check_routings(routings, name="run_sweep: routings")
    configs = list(dict.fromkeys(configs))
    families = sorted({c.activations for c in configs}) or ["bf16"]
    if len(families) > 1:
        raise ValueError(f"run_sweep: configs of one kernel family per sweep, got activations {families}")
    per_m: dict[int, list[TileConfig]] = {}
    for m in m_values:
        default = heuristic_config(m, families[0])
        candidates = list(m_filter(configs, m)) if m_filter else list(configs)
        per_m[m] = [default] + [c for c in candidates if c != default]
    items = [Item(shape, m, config, routing) for shape in shapes for m in m_values for config in per_m[m]
             for routing in routings]
    unique = list(dict.fromkeys(c for m in m_values for c in per_m[m]))
    return SweepPlan(shapes, m_values, items, unique, routings)


# ---------------------------------------------------------------------------------------------
# 2. compile
# ---------------------------------------------------------------------------------------------


def _default_compile(configs: list[TileConfig], jobs: int | None, progress: bool) -> list:
    from codegen.build.compiler import compile_many

    return compile_many(configs, jobs=jobs, progress=progress)


_SERIALIZED = "ptxas serialized the WGMMAs:"  # how _unusable's reason starts for a kernel that did compile


def _unusable(result: object) -> str | None:
    """Why a compile result cannot be a candidate, or None: the compile failed, or ptxas serialized the kernel's
    WGMMAs (a kernel no table should pick; whether ptxas does depends on the toolkit, and the CPU tests reject such
    a config in a shipped table)."""
    if isinstance(result, BaseException):
        return _error_text(result)
    from codegen.build.compiler import serialized_wgmma

    serialized = serialized_wgmma(getattr(result, "ptxas_notes", ()))
    return f"{_SERIALIZED} {serialized[0]}" if serialized else None


def compile_step(
    remaining: Sequence[Item], log: _Log, gpu: str, *, compile_fn: CompileFn | None, jobs: int | None,
    progress: bool, stream: TextIO,
) -> dict[str, str]:
    """Compile the configs ``remaining`` needs (cache hits are instant); record each failure in the
    log and return ``{config name: error}`` of the configs the measure step must skip (:func:`_unusable`)."""
    errors: dict[str, str] = {}
    needed = list(dict.fromkeys(item.config for item in remaining))
    if not needed:
        return errors
    results = (compile_fn or _default_compile)(needed, jobs=jobs, progress=progress)
    for config, result in zip(needed, results):
        reason = _unusable(result)
        if reason is not None:
            errors[config.name] = reason
            log.append({"gpu": gpu, "config": config.name, "status": "compile_error", "error": errors[config.name], "t": time.time()})
    if errors:
        print(f"tune: {len(errors)} config(s) failed to compile or had their WGMMAs serialized, and are skipped: "
              f"{', '.join(sorted(errors))}", file=stream)
    return errors


# ---------------------------------------------------------------------------------------------
# 3. measure
# ---------------------------------------------------------------------------------------------


@dataclass
class _BestSoFar:
    """The fastest ``ok`` time per (shape, M, routing): from the log at the start, then from each new result."""

    best: dict[tuple[Shape, int, str], tuple[float, str]] = field(default_factory=dict)

    def offer(self, shape: Shape, m: int, median_us: float, config: str, routing: str = "uniform") -> tuple[float, str]:
        """Take a new ``ok`` result; return the best (time, config) of its (shape, M, routing)."""
        key = (shape, m, routing)
        if key not in self.best or median_us < self.best[key][0]:
            self.best[key] = (median_us, config)
        return self.best[key]

    @classmethod
    def from_log(cls, log: _Log, gpu: str) -> "_BestSoFar":
        found = cls()
        for r in log.measured(gpu, ("ok",)):
            found.offer(Shape(r["E"], r["N"], r["K"]), int(r["m"]), r["median_us"], r["config"], record_routing(r))
        return found


@contextmanager
def _watchdog(seconds: float | None, log: _Log, base: dict, stream: TextIO) -> Iterator[None]:
    """If the block runs longer than ``seconds``, record it as hung and ``os._exit(EXIT_RESTART)``."""
    if not seconds:
        yield
        return
    timer = threading.Timer(seconds, _hung, args=(log, base, seconds, stream))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _hung(log: _Log, base: dict, seconds: float, stream: TextIO) -> None:
    """Watchdog: the measurement did not return; record it and leave (a hung kernel cannot be stopped)."""
    message = f"no result after {seconds:.0f} s (kernel hang?)"
    try:
        log.append({**base, "status": "error", "error": message, "t": time.time()})
        print(f"\ntune: {base['config']} at E={base['E']} N={base['N']} K={base['K']} M={base['m']} "
              f"{base.get('routing', 'uniform')}: {message}; "
              "recorded; restarting the worker", file=stream, flush=True)
    finally:
        os._exit(EXIT_RESTART)


def _classify(result: Measurement, shape: Shape, m: int, tolerance: float, routing: str = "uniform") -> dict[str, Any]:
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
        "gbps": problem_bytes(shape, m, routing) / seconds / 1e9,
    }


@dataclass
class _Measuring:
    """The state of the measure step: where results go and what counts as correct."""

    measure: MeasureFn
    log: _Log
    gpu: str
    bar: Progress
    tolerance: float
    watchdog_s: float | None
    stream: TextIO
    best: _BestSoFar

    def item(self, item: Item, compile_errors: dict[str, str]) -> None:
        """Measure one item (skipped if its config did not compile) and record what came of it."""
        shape, m, config, routing = item
        base = _base_record(self.gpu, item)
        what = f"{shape.label} M={m}{'' if routing == 'uniform' else ' ' + routing} {config.name}"
        if config.name in compile_errors:
            # A WGMMA-serialized kernel compiled fine and is passed over on purpose: not a failure to chase.
            if compile_errors[config.name].startswith(_SERIALIZED):
                self.bar.skip(what, "ptxas serialized its WGMMAs")
            else:
                self.bar.advance(what, ok=False, note="compile error")
            return
        self.bar.working(what)
        try:
            with _watchdog(self.watchdog_s, self.log, base, self.stream):
                result = self.measure(shape, m, config, routing)
        except Exception as error:  # a launch failure, an out-of-memory, ...: record, skip, go on
            self._failed(base, what, error)
            return
        self._measured(base, what, item, result)

    def _failed(self, base: dict, what: str, error: Exception) -> None:
        text = _error_text(error)
        self.log.append({**base, "status": "error", "error": text, "t": time.time()})
        self.bar.advance(what, ok=False, note=text.splitlines()[0][:120])
        healthy = getattr(self.measure, "healthy", None)
        if healthy is not None and not healthy():
            raise GpuContextLost(
                f"the CUDA context is unusable after {base['config']} failed ({text.splitlines()[0]}); "
                "the error is recorded: rerun (resume) to continue in a fresh process"
            ) from error

    def _measured(self, base: dict, what: str, item: Item, result: Measurement) -> None:
        shape, m, config, routing = item
        record = {**base, **_classify(result, shape, m, self.tolerance, routing), "t": time.time()}
        self.log.append(record)
        if record["status"] == "ok":
            best_us, best_name = self.best.offer(shape, m, record["median_us"], config.name, routing)
            self.bar.advance(what, ok=True, note=f"{record['median_us']:.1f} us (best {best_name} {best_us:.1f} us)")
        else:
            self.bar.advance(what, ok=False, note=f"WRONG: rel. error {record.get('rel_error')} > {self.tolerance}; discarded")
            print(f"\ntune: {what} gives a wrong result (rel. error {record.get('rel_error')}); discarded", file=self.stream)

    def release(self) -> None:
        """Free the measure step's per-shape inputs (when it keeps any)."""
        if hasattr(self.measure, "release"):
            self.measure.release()


def measure_step(remaining: Sequence[Item], measuring: _Measuring, compile_errors: dict[str, str]) -> None:
    """Measure ``remaining`` in order, freeing the measure step's inputs whenever the shape changes."""
    current_shape = None
    try:
        for item in remaining:
            if item.shape != current_shape:
                if current_shape is not None:
                    measuring.release()
                current_shape = item.shape
            measuring.item(item, compile_errors)
    finally:
        measuring.bar.close()
        if current_shape is not None:
            measuring.release()


# ---------------------------------------------------------------------------------------------
# 4. record
# ---------------------------------------------------------------------------------------------


def record_step(log: _Log, gpu: str, plan: SweepPlan, out_path: Path, *, plot: bool, stream: TextIO) -> dict[str, Any]:
    """Write the table of every result in the log (merged into the one at ``out_path``), print the
    summary, draw the plot; return the table."""
    base_table = None
    if out_path.exists():
        try:
            base_table = read_table(out_path)
        except (ValueError, OSError) as error:
            print(f"tune: replacing unreadable {error}", file=stream)
    table = build_table(log.records, gpu, base_table)
    write_table(out_path, table)
    rows = summarize(log.records, plan.shapes, plan.m_values, gpu, plan.activations)
    print(format_summary(rows))
    print(f"tune: wrote {out_path}", file=stream)
    if plot:
        png = plot_sweep(rows, out_path.with_suffix(".png"), title=gpu)
        if png is not None:
            print(f"tune: plot {png}", file=stream)
    return table


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------


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
    routings: Sequence[str] = ("uniform",),
    device_name: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    watchdog_s: float | None = None,
    plot: bool = True,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Measure every (shape, M, config), write the tuning table to ``out_path`` and return it.

    ``configs``: the candidates; the heuristic default of every M is added (its time is the
    baseline). ``m_filter(configs, m)`` narrows the candidates per M (e.g. :func:`configs_for_m`).
    ``routings``: measure every (shape, M, config) under each of these (:mod:`codegen.tune.loads`: "uniform",
    "zipf": the same total rows); the table takes the config of :func:`codegen.tune.choice.choose` over them.
    ``measure(shape, m, config, routing) -> Measurement``: default a :class:`GpuMeasurer` on the current CUDA
    device; an exception it raises is recorded as the config's error (and, if the measurer says the
    CUDA context is gone, the sweep stops with :class:`GpuContextLost` after recording it).
    ``compile_fn(configs, jobs=, progress=)``: default ``codegen.build.compiler.compile_many``; a config
    whose result is an exception is recorded as a compile error and skipped.
    ``resume``: skip what ``<out>.progress.jsonl`` already holds (False: start a fresh log).
    ``watchdog_s``: if one measurement takes longer, record it as hung and ``os._exit(EXIT_RESTART)``
    (for a supervised worker process only: a hung kernel cannot be interrupted otherwise).
    Progress goes to ``stream`` (stderr); the summary table to stdout.
    """
    stream = stream if stream is not None else sys.stderr
    out_path = Path(out_path)
    plan = plan_sweep(shapes, m_values, configs, m_filter, routings)
    if measure is None:
        measure = GpuMeasurer(tolerance=tolerance)
    gpu = device_name if device_name is not None else getattr(measure, "device_name", None) or "unknown GPU"
    log = _Log(progress_log_path(out_path), resume)
    remaining = plan.remaining(log, gpu)
    already = f" ({len(plan.items) - len(remaining)} already in {log.path})" if len(remaining) < len(plan.items) else ""
    print(f"tune: {gpu}: {len(plan.shapes)} shape(s) x {len(plan.m_values)} M value(s), {len(plan.configs)} config(s), "
          f"routing {'+'.join(plan.routings)}, {len(plan.items)} measurements{already}; log: {log.path}", file=stream)
    compile_errors = compile_step(remaining, log, gpu, compile_fn=compile_fn, jobs=jobs, progress=progress, stream=stream)
    bar = Progress(len(remaining), label="tune", enabled=progress, stream=stream)
    measuring = _Measuring(measure, log, gpu, bar, tolerance, watchdog_s, stream, _BestSoFar.from_log(log, gpu))
    measure_step(remaining, measuring, compile_errors)
    return record_step(log, gpu, plan, out_path, plot=plot, stream=stream)
