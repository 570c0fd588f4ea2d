"""Where a kernel's warps stall, instruction by instruction, from Nsight Compute's source page.

    ncu --section SourceCounters ... --export REP python3 -m codegen bench ncu-case ...
    ncu --import REP.ncu-rep --page source --csv --print-source sass > REP-sass.csv
    python3 scripts/ncu_stall_lines.py REP-sass.csv [--top 40]

Prints, per profiled kernel in the CSV, the instructions with the most warp-stall samples (address, SASS, the
samples and their share of the kernel's, and the instruction's top stall reasons), then the samples summed by
opcode. Nsight names its columns differently across versions, so they are found by pattern; when a pattern finds
nothing the script prints the header it read instead of guessing (the CSV is kept beside the summary).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from pathlib import Path

# "Warp Stall Sampling (All Samples)" (and not the "Not-issued" variant); per-reason columns such as
# "stall_long_sb" or "Warp Stall Sampling (All Samples): long_scoreboard" depending on the version.
ALL_SAMPLES = re.compile(r"warp stall sampling \(all samples\)$", re.IGNORECASE)
REASON = re.compile(r"^(?:stall_(\w+)|.*all samples\)?[:_ ]+(\w+))$", re.IGNORECASE)
SOURCE = re.compile(r"^(source|sass)$", re.IGNORECASE)
ADDRESS = re.compile(r"^address$", re.IGNORECASE)


def number(text: str) -> float:
    try:
        return float(text.replace(",", "")) if text.strip() else 0.0
    except ValueError:
        return 0.0


def blocks(lines: list[str]) -> list[list[str]]:
    """The CSV's tables: ncu writes one per kernel, each starting with its own header row (quoted "Address" or
    "Source" first), sometimes after a line naming the kernel."""
    tables: list[list[str]] = []
    for line in lines:
        if line.startswith('"Address"') or line.startswith('"Source"') or line.startswith('"#"'):
            tables.append([line])
        elif tables and line.strip():
            tables[-1].append(line)
    return tables


def summarize(rows: list[dict[str, str]], header: list[str], top: int) -> list[str]:
    samples_col = next((h for h in header if ALL_SAMPLES.search(h.strip())), None)
    source_col = next((h for h in header if SOURCE.match(h.strip())), None)
    address_col = next((h for h in header if ADDRESS.match(h.strip())), None)
    if samples_col is None or source_col is None:
        return [f"no stall-sampling or source column found; header: {header}"]
    reason_cols = {}
    for h in header:
        match = REASON.match(h.strip())
        if match and h != samples_col and "not issued" not in h.lower() and "not-issued" not in h.lower():
            reason_cols[h] = match.group(1) or match.group(2)
    total = sum(number(r[samples_col]) for r in rows) or 1.0
    out = [f"{len(rows)} instructions, {total:.0f} stall samples; top {top} by samples:"]
    for row in sorted(rows, key=lambda r: -number(r[samples_col]))[:top]:
        samples = number(row[samples_col])
        if samples <= 0:
            break
        reasons = sorted(((number(row[c]), name) for c, name in reason_cols.items()), reverse=True)[:3]
        why = ", ".join(f"{name} {value / samples:.0%}" for value, name in reasons if value > 0)
        address = row.get(address_col, "") if address_col else ""
        out.append(f"  {address:>8} {samples:8.0f} {samples / total:6.1%}  {row[source_col].strip()[:72]:72}  {why}")
    by_opcode: Counter[str] = Counter()
    for row in rows:
        text = re.sub(r"^@!?U?P\w+\s+", "", row[source_col].strip())
        by_opcode[text.split(" ")[0] if text else "?"] += number(row[samples_col])
    out.append("samples by opcode: " + ", ".join(f"{op} {n / total:.1%}" for op, n in by_opcode.most_common(12)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=40, help="instructions to list per kernel (default 40)")
    args = parser.parse_args(argv)
    try:
        lines = args.csv.read_text().splitlines()
    except OSError as error:
        print(f"ncu_stall_lines: cannot read {args.csv}: {error.strerror}", file=sys.stderr)
        return 1
    tables = blocks(lines)
    if not tables:
        print(f"ncu_stall_lines: {args.csv}: no source table found (first lines: {lines[:3]})", file=sys.stderr)
        return 1
    for index, table in enumerate(tables):
        reader = csv.DictReader(table)
        rows = list(reader)
        print(f"== kernel {index + 1} of {len(tables)}")
        print("\n".join(summarize(rows, list(reader.fieldnames or []), args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
