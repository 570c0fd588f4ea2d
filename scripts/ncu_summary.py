"""A short summary of Nsight Compute raw CSV pages (``ncu --import X.ncu-rep --csv --page raw``).

    python3 scripts/ncu_summary.py LABEL=FILE.csv [LABEL=FILE.csv ...]

Per kernel: grid x block, dynamic shared memory, registers, DRAM and L2 throughput (% of peak and bytes/s), L1/shared %,
issue slots busy, warps issued per scheduler per cycle, the global stores (warp instructions, L1 requests, sectors
and sectors per request, where the report has them), the top three stall reasons (warps
stalled per issue, from the WarpStateStats section), and, where the report has them (ComputeWorkloadAnalysis),
the tensor pipes' utilization (every metric naming a tensor pipe, % of peak: whatever this ncu version calls them).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import Sequence

STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TENSOR_PIPE = re.compile(r"^sm\w*pipe_tensor\w*\.(avg|max|sum)\.pct_of_peak_sustained_\w+$")
COLUMNS = {
    "grid": "launch__grid_size",
    "block": "launch__block_size",
    "dyn smem": "launch__shared_mem_per_block_dynamic",
    "regs": "launch__registers_per_thread",
    "DRAM %": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "DRAM bytes/s": "dram__bytes.sum.per_second",
    "L2 %": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "L2 bytes/s": "lts__t_bytes.sum.per_second",
    "L1/smem %": "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "issue busy %": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "issued/sched/cycle": "smsp__issue_active.avg.per_cycle_active",
    "warp insts": "smsp__inst_executed.sum",
    "LDS warp insts": "smsp__inst_executed_op_shared_ld.sum",
    "SM clock/s": "sm__cycles_elapsed.avg.per_second",
    "duration": "gpu__time_duration.sum",
    # The epilogue's global stores: warp instructions, L1 requests and the 32-byte sectors they touch (sectors per
    # request: 4 for a warp writing 128 contiguous bytes, more when its 4-byte stores spread over rows).
    "global st insts": "smsp__inst_executed_op_global_st.sum",
    "st requests": "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "st sectors": "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
}
STORE_REQUESTS, STORE_SECTORS = COLUMNS["st requests"], COLUMNS["st sectors"]


def read_raw(text: str) -> list[dict[str, tuple[str, str]]]:
    """Rows of a raw CSV page as {metric: (value, unit)}; ncu's own "==PROF==" lines are skipped."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    table = list(csv.reader(lines))
    if len(table) < 2:
        return []
    header, units = table[0], table[1]
    return [{name: (value, unit) for name, unit, value in zip(header, units, row)} for row in table[2:]]


def top_stalls(row: dict[str, tuple[str, str]], count: int = 3) -> list[tuple[str, float]]:
    stalls = []
    for name, (value, _) in row.items():
        match = STALL.match(name)
        if match and match.group(1) not in ("not_issued",):
            try:
                stalls.append((match.group(1), float(value.replace(",", ""))))
            except ValueError:
                continue
    return sorted(stalls, key=lambda item: -item[1])[:count]


def sectors_per_request(row: dict[str, tuple[str, str]]) -> float | None:
    """Global-store sectors per L1 request, where the report has both counts (and any requests)."""
    try:
        requests = float(row[STORE_REQUESTS][0].replace(",", ""))
        sectors = float(row[STORE_SECTORS][0].replace(",", ""))
    except (KeyError, ValueError):
        return None
    return sectors / requests if requests > 0 else None


def tensor_pipes(row: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """(metric, value) of every tensor-pipe utilization (% of peak) in the row, by name."""
    return sorted((name, value) for name, (value, _) in row.items() if TENSOR_PIPE.match(name))


def summarize(label: str, rows: Sequence[dict[str, tuple[str, str]]]) -> list[str]:
    if not rows:
        return [f"{label}: no kernels in the report (wrong NVTX range or kernel filter?)"]
    out = []
    for row in rows:
        name = row.get("Kernel Name", ("?", ""))[0]
        cells = []
        for title, metric in COLUMNS.items():
            value, unit = row.get(metric, ("n/a", ""))
            cells.append(f"{title} {value}{(' ' + unit) if unit and unit not in ('%',) else ''}")
        per_request = sectors_per_request(row)
        if per_request is not None:
            cells.append(f"st sectors/request {per_request:.2f}")
        stalls = ", ".join(f"{reason} {value:.2f}" for reason, value in top_stalls(row)) or "n/a"
        pipes = "; ".join(f"{metric} {value} %" for metric, value in tensor_pipes(row))
        out.append(f"{label}: {name[:60]}\n    " + "; ".join(cells) + f"\n    top stalls (warps per issue): {stalls}"
                   + (f"\n    tensor pipes: {pipes}" if pipes else ""))
    return out


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for item in argv:
        label, _, path = item.partition("=")
        file = Path(path or label)
        text = file.read_text(errors="replace") if file.is_file() else ""
        print("\n".join(summarize(label, read_raw(text))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
