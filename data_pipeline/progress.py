"""Progress reporting: a tqdm bar on a terminal, periodic log lines otherwise; and the summary table."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "img", every_s: float = 10.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.t0, self.last = 0, time.perf_counter(), 0.0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        else:
            log.info("%s: %d %s to do", desc, total, unit)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-9)
            log.info("%s: %d/%d %s (%.1f %s/s)", self.desc, self.n, self.total, self.unit, rate, self.unit)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.t0


def format_table(rows: list[tuple[str, object]], title: str = "") -> str:
    w = max((len(k) for k, _ in rows), default=0)
    lines = [title, "-" * (w + 20)] if title else []
    lines += [f"{k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)
