"""The ctctl command line: `main` parses (ctctl.cli.parser) and runs one
command (ctctl.cli.commands)."""

from __future__ import annotations

import os
import sys

from .commands import die
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0 and not (args.command == "load" and args.ebpf):
        return die("must run as root (BPF, namespaces, /run/ctctl)")
    try:
        return args.func(args)
    except BrokenPipeError:
        # `ctctl ... --json | head`: the reader is gone, which is no error.
        # Python would complain again flushing stdout at exit; point it at
        # nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
