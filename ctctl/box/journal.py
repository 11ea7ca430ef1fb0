"""The record a controller keeps of its offloaded connections, so that the
next one can adopt the running program when it dies (ctctl.box.adopt).

One JSON object per line, appended with one write(2) each:

    {"put": {"id": 7, ...}}     the connection's record as it is now
    {"gone": 7}                 it left the hardware

The last line about an id wins.  A controller killed at any moment leaves
every line it wrote (a dead process's writes are in the page cache; the
maps die with the machine anyway) and at most one torn last line, which
`replay` skips.  When the file holds many more lines than live records, it
is rewritten whole: into a temporary file, then renamed over the old one,
so that a reader finds the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

COMPACT_MIN = 4096     # lines before a rewrite is worth its cost


class Journal:
    def __init__(self, path: Path, compact_min: int = COMPACT_MIN, records: dict[int, dict] | None = None):
        """A new record at `path` (what was there is replaced), holding
        `records` to begin with (an adopting controller's)."""
        self.path = Path(path)
        self.compact_min = compact_min
        self._latest: dict[int, str] = {}     # id -> its "put" line, as written
        self.lines = 0                        # lines in the file
        self.rewrites = 0
        self.fd: int | None = None
        for cid, rec in (records or {}).items():
            self._latest[cid] = _line({"put": rec})
        self._rewrite()

    def __len__(self) -> int:
        return len(self._latest)

    def put(self, cid: int, record: dict) -> None:
        line = _line({"put": record})
        if self._latest.get(cid) == line:
            return                     # nothing changed: nothing to write
        self._latest[cid] = line
        self._append(line)

    def gone(self, cid: int) -> None:
        if self._latest.pop(cid, None) is not None:
            self._append(_line({"gone": cid}))

    def _append(self, line: str) -> None:
        os.write(self.fd, line.encode())
        self.lines += 1
        if self.lines > self.compact_min + 2 * len(self._latest):
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.writelines(self._latest.values())
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
        os.replace(tmp, self.path)
        if self.fd is not None:
            os.close(self.fd)
        self.fd = fd
        self.lines = len(self._latest)
        self.rewrites += 1

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def stats(self) -> dict:
        return {"records": len(self._latest), "lines": self.lines, "rewrites": self.rewrites}


def _line(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def replay(path: Path) -> tuple[dict[int, dict], int]:
    """The live records of a journal (by id), and how many of its lines
    could not be read (a torn last line; anything else is damage)."""
    out: dict[int, dict] = {}
    bad = 0
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out, 0
    for line in text.splitlines():
        try:
            obj = json.loads(line)
            if "put" in obj:
                rec = obj["put"]
                out[int(rec["id"])] = rec
            else:
                out.pop(int(obj["gone"]), None)
        except (ValueError, KeyError, TypeError):
            bad += 1
    return out, bad
