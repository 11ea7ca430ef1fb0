"""Progress of an experiment on the terminal: a bar for the sweep and one
for the run in progress, redrawn in place on a terminal; on a pipe or a
file, a plain line every few seconds instead (no control characters in a
log)."""

from __future__ import annotations

import sys
import time

WIDTH = 24
LINE_EVERY_S = 5.0


def bar(done: float, total: float, width: int = WIDTH) -> str:
    k = int(width * min(1.0, done / total)) if total else width
    return "[" + "#" * k + "." * (width - k) + "]"


class Progress:
    def __init__(self, scenario, stream=None):
        self.sc = scenario
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.run = None
        self.finished = 0
        self.last_line = 0.0

    def _say(self, text: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def start(self, run) -> None:
        self.run = run
        n = len(self.sc.runs)
        self._say(f"{self.sc.name} {bar(self.finished, n, 10)} run {run.index + 1}/{n}: {run.label()}",
                  final=True)

    def tick(self, t: float, total: float, rec: dict) -> None:
        now = time.monotonic()
        if not self.tty and now - self.last_line < LINE_EVERY_S:
            return
        self.last_line = now
        hit = "–" if rec["hit_ratio"] is None else f"{rec['hit_ratio']:.1%}"
        self._say(f"  {bar(t, total)} {t:5.0f}/{total:.0f} s  hw {rec['hardware']:,}  soft {rec['soft']:,}  "
                  f"pending {rec['pending']:,}  hit {hit}  punts/s {rec['punts_ps']:,.0f}  "
                  f"ctl CPU {rec['ctl_cpu']:.0%}")

    def done(self, res) -> None:
        self.finished += 1
        s = res.summary
        hit = "–" if s.get("hit_ratio") is None else f"{s['hit_ratio']:.1%}"
        self._say(f"  done: hit ratio {hit}, offloaded {s.get('offloaded', 0):,}, "
                  f"{s['packets']['punted']:,} punts, {s['packets']['perf_lost'] + s['packets']['ring_lost']:,} lost "
                  f"-> {res.dir}", final=True)
