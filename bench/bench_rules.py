#!/usr/bin/env python3
"""What a large rule set costs the control path: ms to add N filters to a
RuleSet one by one (what `filter add` and a box config do) and to print
them as `tc filter show` does (`ctctl filter show`), for each N given.
Each filter is a slide-9 style line with its own port, two actions (a ct
and a mirred), spread over 8 chains; the best of three runs.  No root.

Before issue 18's session both grew with the square of N: each add
rebuilt the table of every filter's actions to number the new ones, and
show() counted every action's holders once per filter.

examples:
  .venv/bin/python bench/bench_rules.py
  .venv/bin/python bench/bench_rules.py --filters 1000,4000
"""

from __future__ import annotations

import argparse
import sys
import time

from common import ROOT  # noqa: E402  (bench/ is the script's own directory)
sys.path.insert(0, str(ROOT))

from ctctl.rules import RuleSet, parse_filter  # noqa: E402
from ctctl.rules.tcshow import show  # noqa: E402


def lines(n: int) -> list:
    return [parse_filter(f"dev eth5 protocol ip chain {i % 8} prio {i // 8 + 1} flower ip_proto tcp "
                         f"dst_port {i % 60000 + 1} ct_state +trk+est action ct zone 2 "
                         "action mirred egress redirect dev eth6") for i in range(n)]


def best(fn, runs: int = 3) -> float:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out) * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filters", default="500,2000", help="comma-separated filter counts (default 500,2000)")
    args = ap.parse_args(argv)
    print(f"{'filters':>8} {'add (ms)':>10} {'show (ms)':>10}")
    for n in (int(x) for x in args.filters.split(",")):
        fs = lines(n)

        def add():
            rs = RuleSet()
            for f in fs:
                rs.add(f)
            return rs

        rs = add()
        print(f"{n:>8} {best(add):>10.0f} {best(lambda: show(rs)):>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
