"""The e2e suite's command-line flags (no torch here: the bench parser reads them before any suite runs)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

MODES = ("eager", "compiled")
DEFAULT_BATCHES = (1, 8, 64)
DEFAULT_DIR = Path(tempfile.gettempdir()) / "hopper-mxfp4-e2e"


def check_modes(text: str) -> str:
    """The ``--modes`` argument: a comma list of eager / compiled."""
    modes = [m for m in text.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(MODES)}, got {text!r}")
    return ",".join(modes)


def check_layers(text: str) -> int | str:
    """The ``--layers`` argument: a positive layer count, or ``fit``."""
    if text == "fit":
        return text
    try:
        layers = int(text)
    except ValueError:
        layers = 0
    if layers < 1:
        raise argparse.ArgumentTypeError(f"expected a positive layer count or 'fit', got {text!r}")
    return layers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The e2e flags (the bench parser shares them with every suite)."""
    add = parser.add_argument
    add("--dir", metavar="DIR", default=str(DEFAULT_DIR),
        help=f"e2e: where the synthetic checkpoints go, one folder per model (default {DEFAULT_DIR}); reused when complete")
    add("--tiny", action="store_true", help="e2e: a tiny gpt-oss instead of the real ones (a smoke run; works on the CPU)")
    add("--batch", metavar="B,...", help=f"e2e: decode batch sizes (default {','.join(map(str, DEFAULT_BATCHES))})")
    add("--new-tokens", type=int, default=32, metavar="N", help="e2e: tokens generated per timed run (default 32)")
    add("--prompt-tokens", type=int, default=16, metavar="N", help="e2e: prompt length (default 16)")
    add("--reps", type=int, default=2, metavar="N", help="e2e: timed run pairs per point, median (default 2)")
    add("--modes", type=check_modes, default="eager,compiled", metavar="M,...",
        help="e2e: decode modes, eager (dynamic cache) and/or compiled (static cache) (default both)")
    add("--no-bf16", action="store_true", help="e2e: leave out transformers' bf16 experts")
    add("--layers", type=check_layers, metavar="N|fit",
        help="e2e: only the first N layers, at the real dimensions (default all; 'fit': the most whose checkpoint fits "
        "--dir and --spill-dir and whose weights fit the GPU). The tables say 'N of M layers'; per-layer figures and "
        "the full model extrapolated from them (said as such) follow")
    add("--per-layer", action="store_true",
        help="e2e: time each decode point with the model cut to 1 layer as well, for the ms per layer, also when all "
        "layers run (a run of fewer layers always does)")
    add("--spill-dir", action="append", default=[], metavar="DIR",
        help="e2e: where checkpoint shards go once --dir is full (linked into --dir; repeatable)")
    add("--budget", type=float, metavar="S",
        help="e2e: seconds the suite may take: a decode point that an earlier one of its kind says would end past "
        "it is skipped (the JSON is written after every point either way)")
