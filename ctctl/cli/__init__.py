"""The ctctl command line: `main` parses (ctctl.cli.parser) and runs one
command (ctctl.cli.commands)."""

from __future__ import annotations

import os

from .commands import die
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0 and not (args.command == "load" and args.ebpf):
        return die("must run as root (BPF, namespaces, /run/ctctl)")
    return args.func(args)
