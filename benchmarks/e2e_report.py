"""The e2e suite's tables, issue 15's targets, and for a run of fewer layers the per-layer figures and the
full model extrapolated from them (CPU only, tested)."""

from __future__ import annotations

from typing import Any, Sequence

from .e2e_plan import label
from .report import align

OURS_LABEL, BF16_LABEL = "mxfp4 (hopper_mxfp4)", "bf16 (transformers grouped_mm)"
# (name, model, mode, batch, the least ours/bf16 tokens/s ratio)
SPEEDUP_TARGETS = (
    ("compiled decode B=1 >= 1.3x bf16", "gpt-oss-20b", "compiled", 1, 1.3),
    ("compiled decode B=64 >= 3x bf16", "gpt-oss-20b", "compiled", 64, 3.0),
    ("eager decode B=1 >= 1.2x bf16", "gpt-oss-20b", "eager", 1, 1.2),
)
PEAK_TARGETS = {"gpt-oss-20b": 15.0, "gpt-oss-120b": 70.0}  # GB (1e9 bytes) during load_gpt_oss
HELD_TARGETS = {"gpt-oss-120b": 70.0}  # GB held after load_gpt_oss, one GPU (issue 22)
EXTRAPOLATED = "EXTRAPOLATED, not measured"


def name_of(result: dict[str, Any]) -> str:
    """The model as every line shows it: "gpt-oss-120b (8 of 36 layers)" for a reduced run."""
    layers = result.get("layers")
    return result["model"] if layers is None else label(result["model"], layers, result["full_layers"])


def is_full(result: dict[str, Any]) -> bool:
    return result.get("layers") is None or result["layers"] >= result["full_layers"]


def _measured(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results that got as far as a load (an error before it has no table row)."""
    return [r for r in results if "ours" in r]


def layer_gb(result: dict[str, Any], side: str = "ours") -> float | None:
    """GB held per decoder layer: (held - the non-layer tensors' bytes) / layers."""
    held, rest = result.get(side, {}).get("after_gb"), result.get("ours", {}).get("non_layer_gb")
    if held is None or rest is None or not result.get("layers"):
        return None
    return (held - rest) / result["layers"]


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def memory_table(results: Sequence[dict[str, Any]]) -> str:
    header = ("model", "experts", "checkpoint", "load s", "peak GB", "after GB", "peak/after", "GB/layer")
    lines = []
    for r in _measured(results):
        ours, ckpt = r["ours"], r["checkpoint"]
        how = "reused" if ckpt["reused"] else f"written in {ckpt['seconds']:.0f} s"
        spilled = sum(ckpt.get("spilled", {}).values())
        written = f"{ckpt['bytes'] / 1e9:.1f} GB, {how}" + (f", {spilled / 1e9:.1f} GB spilled" if spilled else "")
        ratio = ours["peak_gb"] / ours["after_gb"] if ours.get("after_gb") else None
        lines.append((name_of(r), OURS_LABEL, written, f"{ours['load_s']:.1f}", _gb(ours.get("peak_gb")),
                      _gb(ours.get("after_gb")), "-" if ratio is None else f"{ratio:.3f}", _gb(layer_gb(r))))
        bf16 = r.get("bf16", {})
        note = bf16.get("error") or ("dequantized from the packed experts" if "bf16" in r else "not reached")
        lines.append((name_of(r), BF16_LABEL, note[:60], "-", "-", _gb(bf16.get("after_gb")), "-", _gb(layer_gb(r, "bf16"))))
    return align(header, lines, {0, 1, 2})


def _cell(point: dict[str, Any] | None) -> str:
    if point is None:
        return "-"
    if "error" in point:
        return point["error"][:40]
    return f"{point['tokens_per_s']:.1f} ({point['ms_per_step']:.2f} ms)"


def decode_table(results: Sequence[dict[str, Any]], batches: Sequence[int], modes: Sequence[str]) -> str:
    """tokens/s (ms per decode step) per batch size, ours and bf16, each mode."""
    header = ("model", "experts", "decode", *(f"B={b} tok/s (ms/step)" for b in batches))
    lines = []
    for r in _measured(results):
        for side_label, side in ((OURS_LABEL, r["ours"]), (BF16_LABEL, r.get("bf16", {}))):
            if "decode" not in side:
                said = side.get("error", "-" if "bf16" in r else "not reached")[:40]
                lines.append((name_of(r), side_label, "-", *([said] + ["-"] * (len(batches) - 1))))
                continue
            for mode in modes:
                points = side["decode"].get(mode, {})
                compiled = any(p.get("compiled") for p in points.values())
                shown = mode if mode == "eager" else ("compiled" if compiled else "static, not compiled")
                lines.append((name_of(r), side_label, shown, *(_cell(points.get(str(b))) for b in batches)))
    return align(header, lines, {0, 1, 2})


def per_layer_ms(result: dict[str, Any], side: str, mode: str, batch: int) -> tuple[float, float] | None:
    """(ms per layer per decode step, ms of the rest per step) from the run's two layer counts: the step at
    ``layers`` minus the step with the model cut to ``decode_short["layers"]``, over the layers between."""
    data = result.get(side, {})
    short = data.get("decode_short", {})
    full = data.get("decode", {}).get(mode, {}).get(str(batch), {}).get("ms_per_step")
    cut = short.get(mode, {}).get(str(batch), {}).get("ms_per_step")
    if full is None or cut is None or result["layers"] <= short["layers"]:
        return None
    per_layer = (full - cut) / (result["layers"] - short["layers"])
    return per_layer, full - result["layers"] * per_layer


def per_layer_table(results: Sequence[dict[str, Any]], batches: Sequence[int], modes: Sequence[str]) -> str:
    """ms per layer per decode step (and the non-layer rest), for the runs that timed two layer counts."""
    header = ("model", "experts", "decode", *(f"B={b} ms/layer (rest ms)" for b in batches))
    lines = []
    for r in _measured(results):
        for side_label, side in ((OURS_LABEL, "ours"), (BF16_LABEL, "bf16")):
            if "decode_short" not in r.get(side, {}):
                continue
            for mode in modes:
                cells = [per_layer_ms(r, side, mode, b) for b in batches]
                lines.append((name_of(r), side_label, mode, *("-" if c is None else f"{c[0]:.3f} ({c[1]:.2f})" for c in cells)))
    return align(header, lines, {0, 1, 2}) if lines else ""


def speedups(results: Sequence[dict[str, Any]], batches: Sequence[int], modes: Sequence[str]) -> list[str]:
    """ours / bf16 tokens/s per (model, mode, batch), where both were measured."""
    out = []
    for r in _measured(results):
        for mode in modes:
            cells = []
            for b in batches:
                ratio = _ratio(r, mode, b)
                cells.append(f"B={b} {'-' if ratio is None else f'{ratio:.2f}x'}")
            if any(not c.endswith(" -") for c in cells):
                out.append(f"{name_of(r)} {mode}: ours/bf16 tokens/s " + ", ".join(cells))
    return out


def _ratio(result: dict[str, Any], mode: str, batch: int) -> float | None:
    get = lambda side: result.get(side, {}).get("decode", {}).get(mode, {}).get(str(batch), {}).get("tokens_per_s")  # noqa: E731
    ours, bf16 = get("ours"), get("bf16")
    return ours / bf16 if ours and bf16 else None


def targets(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 15's (and 22's) targets, met or not, where this run measured them on the whole model (a run of
    fewer layers measures none: its extrapolation is reported apart)."""
    out: dict[str, Any] = {}
    by_model = {r["model"]: r for r in _measured(results) if is_full(r)}
    for what, key, limits in (("load peak", "peak_gb", PEAK_TARGETS), ("held", "after_gb", HELD_TARGETS)):
        for model, limit in limits.items():
            value = by_model.get(model, {}).get("ours", {}).get(key)
            if value is not None:
                out[f"{model} {what} <= {limit:.0f} GB"] = {"value": value, "limit": limit, "met": value <= limit}
    for name, model, mode, batch, least in SPEEDUP_TARGETS:
        ratio = _ratio(by_model[model], mode, batch) if model in by_model else None
        if ratio is not None:
            out[name] = {"value": ratio, "limit": least, "met": ratio >= least}
    return out


def _extrapolated_decode(result: dict[str, Any], side: str, to: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, points in result.get(side, {}).get("decode", {}).items():
        for batch, point in points.items():
            split = per_layer_ms(result, side, mode, int(batch))
            if split is not None and "ms_per_step" in point:
                step = point["ms_per_step"] + (to - result["layers"]) * split[0]
                out.setdefault(mode, {})[batch] = {"ms_per_step": step, "tokens_per_s": int(batch) * 1e3 / step}
    return out


def extrapolations(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each run of fewer layers: the whole model extrapolated from its per-layer figures (held memory:
    the non-layer bytes + layers x GB per layer; peak: held + the load's measured peak - held; decode step:
    the measured step + the missing layers x ms per layer). Estimates, never measurements."""
    out = []
    for r in _measured(results):
        if is_full(r):
            continue
        to, ours = r["full_layers"], r["ours"]
        entry: dict[str, Any] = {"model": r["model"], "measured_layers": r["layers"], "layers": to, "note": EXTRAPOLATED}
        per_gb = layer_gb(r)
        if per_gb is not None:
            entry["held_gb"] = ours["after_gb"] + (to - r["layers"]) * per_gb
            entry["peak_gb"] = entry["held_gb"] + ours["peak_gb"] - ours["after_gb"]
        for side in ("ours", "bf16"):
            decode = _extrapolated_decode(r, side, to)
            if decode:
                entry.setdefault("decode", {})[side] = decode
        out.append(entry)
    return out


def extrapolation_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for entry in extrapolations(results):
        head = (f"{EXTRAPOLATED}: {entry['model']}, all {entry['layers']} layers, from the {entry['measured_layers']} "
                f"of {entry['layers']} measured")
        if "held_gb" in entry:
            limit = HELD_TARGETS.get(entry["model"])
            within = "" if limit is None else f" (held <= {limit:.0f} GB: {'within' if entry['held_gb'] <= limit else 'OVER'}, by extrapolation)"
            head += f": held {entry['held_gb']:.1f} GB, load peak {entry['peak_gb']:.1f} GB{within}"
        lines.append(head)
        for side, modes in entry.get("decode", {}).items():
            for mode, points in modes.items():
                cells = ", ".join(f"B={b} {p['tokens_per_s']:.1f} tok/s ({p['ms_per_step']:.2f} ms)" for b, p in points.items())
                lines.append(f"  {EXTRAPOLATED}: {entry['model']} {side} {mode}: {cells}")
    return lines


def time_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """Where the run's time went, per model: the checkpoint, the load, and each mode's decode points."""
    lines = []
    for r in _measured(results):
        ckpt, parts = r["checkpoint"], []
        parts.append("checkpoint reused" if ckpt["reused"] else
                     f"checkpoint written {ckpt['seconds']:.0f} s ({ckpt['bytes'] / 1e9 / max(ckpt['seconds'], 1e-9):.2f} GB/s)")
        parts.append(f"load {r['ours']['load_s']:.0f} s")
        for side in ("ours", "bf16"):
            for key in ("decode", "decode_short"):
                for mode, points in r.get(side, {}).get(key, {}).items():
                    if isinstance(points, dict) and points:
                        total = sum(p.get("seconds", 0.0) for p in points.values())
                        warm = sum(p.get("warmup_s", 0.0) for p in points.values())
                        cut = "" if key == "decode" else f" ({r[side][key]['layers']} layer)"
                        parts.append(f"{side} {mode}{cut} {total:.0f} s (warm-up {warm:.0f} s)")
        lines.append(f"time, {name_of(r)}: " + ", ".join(parts))
    return lines


def format_e2e(results: Sequence[dict[str, Any]], batches: Sequence[int], modes: Sequence[str]) -> str:
    parts = [f"{name_of(r)}: {r['layers_why']}" for r in results if not is_full(r)]
    parts += [f"{name_of(r)}: error: {r['error']}" for r in results if "error" in r]
    if parts:
        parts.append("")
    parts += [memory_table(results), "", decode_table(results, batches, modes)]
    layer_table = per_layer_table(results, batches, modes)
    if layer_table:
        parts += ["", "per layer (ms per decode step: the step at both layer counts, differenced):", layer_table]
    lines = speedups(results, batches, modes)
    if lines:
        parts += ["", *lines]
    lines = extrapolation_lines(results)
    if lines:
        parts += ["", *lines]
    verdicts = targets(results)
    if verdicts:
        parts += ["", "targets:"] + [f"  {name}: {v['value']:.2f} (limit {v['limit']:g}) {'met' if v['met'] else 'MISSED'}"
                                     for name, v in verdicts.items()]
    parts += ["", *time_lines(results)]
    return "\n".join(parts)
