"""The e2e suite's tables and issue 15's targets (CPU only, tested)."""

from __future__ import annotations

from typing import Any, Sequence

from .report import align

OURS_LABEL, BF16_LABEL = "mxfp4 (hopper_mxfp4)", "bf16 (transformers grouped_mm)"
# (name, model, mode, batch, the least ours/bf16 tokens/s ratio)
SPEEDUP_TARGETS = (
    ("compiled decode B=1 >= 1.3x bf16", "gpt-oss-20b", "compiled", 1, 1.3),
    ("compiled decode B=64 >= 3x bf16", "gpt-oss-20b", "compiled", 64, 3.0),
    ("eager decode B=1 >= 1.2x bf16", "gpt-oss-20b", "eager", 1, 1.2),
)
PEAK_TARGETS = {"gpt-oss-20b": 15.0, "gpt-oss-120b": 70.0}  # GB (1e9 bytes) during load_gpt_oss


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def memory_table(results: Sequence[dict[str, Any]]) -> str:
    header = ("model", "experts", "checkpoint", "load s", "peak GB", "after GB", "peak/after")
    lines = []
    for r in results:
        ours, ckpt = r["ours"], r["checkpoint"]
        how = "reused" if ckpt["reused"] else f"written in {ckpt['seconds']:.0f} s"
        written = f"{ckpt['bytes'] / 1e9:.1f} GB, {how}"
        ratio = ours["peak_gb"] / ours["after_gb"] if ours.get("after_gb") else None
        lines.append((r["model"], OURS_LABEL, written, f"{ours['load_s']:.1f}", _gb(ours.get("peak_gb")),
                      _gb(ours.get("after_gb")), "-" if ratio is None else f"{ratio:.3f}"))
        bf16 = r["bf16"]
        note = bf16.get("error") or "dequantized from the packed experts"
        lines.append((r["model"], BF16_LABEL, note[:60], "-", "-", _gb(bf16.get("after_gb")), "-"))
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
    for r in results:
        for label, side in ((OURS_LABEL, r["ours"]), (BF16_LABEL, r["bf16"])):
            if "decode" not in side:
                lines.append((r["model"], label, "-", *([side.get("error", "-")[:40]] + ["-"] * (len(batches) - 1))))
                continue
            for mode in modes:
                points = side["decode"].get(mode, {})
                compiled = any(p.get("compiled") for p in points.values())
                shown = mode if mode == "eager" else ("compiled" if compiled else "static, not compiled")
                lines.append((r["model"], label, shown, *(_cell(points.get(str(b))) for b in batches)))
    return align(header, lines, {0, 1, 2})


def speedups(results: Sequence[dict[str, Any]], batches: Sequence[int], modes: Sequence[str]) -> list[str]:
    """ours / bf16 tokens/s per (model, mode, batch), where both were measured."""
    out = []
    for r in results:
        for mode in modes:
            cells = []
            for b in batches:
                ratio = _ratio(r, mode, b)
                cells.append(f"B={b} {'-' if ratio is None else f'{ratio:.2f}x'}")
            if any(not c.endswith(" -") for c in cells):
                out.append(f"{r['model']} {mode}: ours/bf16 tokens/s " + ", ".join(cells))
    return out


def _ratio(result: dict[str, Any], mode: str, batch: int) -> float | None:
    get = lambda side: result[side].get("decode", {}).get(mode, {}).get(str(batch), {}).get("tokens_per_s")  # noqa: E731
    ours, bf16 = get("ours"), get("bf16")
    return ours / bf16 if ours and bf16 else None


def targets(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 15's targets, met or not, where this run measured them."""
    out: dict[str, Any] = {}
    by_model = {r["model"]: r for r in results}
    for model, limit in PEAK_TARGETS.items():
        peak = by_model.get(model, {}).get("ours", {}).get("peak_gb")
        if peak is not None:
            out[f"{model} load peak <= {limit:.0f} GB"] = {"value": peak, "limit": limit, "met": peak <= limit}
    for name, model, mode, batch, least in SPEEDUP_TARGETS:
        ratio = _ratio(by_model[model], mode, batch) if model in by_model else None
        if ratio is not None:
            out[name] = {"value": ratio, "limit": least, "met": ratio >= least}
    return out


def format_e2e(results: Sequence[dict[str, Any]], batches: Sequence[int], modes: Sequence[str]) -> str:
    parts = [memory_table(results), "", decode_table(results, batches, modes)]
    lines = speedups(results, batches, modes)
    if lines:
        parts += ["", *lines]
    verdicts = targets(results)
    if verdicts:
        parts += ["", "targets:"] + [f"  {name}: {v['value']:.2f} (limit {v['limit']:g}) {'met' if v['met'] else 'MISSED'}"
                                     for name, v in verdicts.items()]
    return "\n".join(parts)
