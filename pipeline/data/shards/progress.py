"""A dependency-free progress line for prepare (tqdm is not a project dependency)."""
from __future__ import annotations

import sys
import time


class PrepareProgress:
    """Prints 'label: done/total (skipped) rate' to stderr, redrawn in place on a terminal, else every 10%."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = self.skipped = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last_decile = -1

    def advance(self, skipped: bool) -> None:
        self.done += 1
        self.skipped += int(skipped)
        if not self.enabled:
            return
        decile = self.done * 10 // max(self.total, 1)
        if self.tty or decile != self._last_decile or self.done == self.total:
            self._last_decile = decile
            rate = self.done / max(time.monotonic() - self.started, 1e-9)
            end = "\n" if self.done == self.total or not self.tty else ""
            print(f"\r{self.label}: {self.done}/{self.total} shards ({self.skipped} already valid) {rate:.1f}/s",
                  end=end, file=sys.stderr, flush=True)
