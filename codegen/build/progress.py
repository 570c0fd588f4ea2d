"""A one-line progress counter on stderr (no dependency).

On a terminal the line is redrawn in place (``[3/6] compile  n128_m64_k128_s7_wg2 ok 17.9 s  0:41``);
elsewhere (CI logs, pipes) each finished item is one plain line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str = "", *, enabled: bool = True, stream: TextIO | None = None):
        self.total = total
        self.label = label
        self.enabled = enabled and total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.failed = 0
        self.start = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0

    def _elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def _draw(self, text: str) -> None:
        line = f"[{self.done}/{self.total}] {self.label} {text}  {self._elapsed()}"
        if self._tty:
            padding = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * padding)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def working(self, what: str) -> None:
        """Say what is being worked on (terminal only: it is redrawn by the next call)."""
        if self.enabled and self._tty:
            self._draw(f"{what} ...")

    def advance(self, item: str, *, ok: bool = True, note: str = "") -> None:
        """One more item finished."""
        self.done += 1
        self.failed += not ok
        if self.enabled:
            status = "ok" if ok else "FAILED"
            self._draw(f"{item} {status}{' ' + note if note else ''}")

    def skip(self, item: str, why: str) -> None:
        """One more item passed over on purpose (not a failure): ``why`` says what made it unusable."""
        self.done += 1
        if self.enabled:
            self._draw(f"{item} skipped ({why})")

    def close(self) -> None:
        if self.enabled and self._tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False
