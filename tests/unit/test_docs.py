"""The docs say what the code does: every option of every ctctl command is
in docs/cli.md, and every command's --help ends with examples."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ctctl.cli.parser import build_parser

CLI_MD = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()


def _commands() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_top_level_option_is_documented():
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in CLI_MD or f" {flag}" in CLI_MD, flag


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_of_every_command_is_documented(name):
    parser = _commands()[name]
    assert f"## {name}" in CLI_MD
    section = CLI_MD.split(f"## {name}", 1)[1].split("\n## ", 1)[0]
    for action in parser._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert flag in section, f"{name}: {flag} is not in docs/cli.md"
        for choice in action.choices or ():
            assert choice in section, f"{name}: {choice} is not in docs/cli.md"
    assert "examples" in (parser.epilog or ""), f"{name} --help has no examples"


def test_the_config_in_load_help_is_a_config_ctctl_takes():
    """`ctctl load --help` shows every key; what it shows must load."""
    import yaml

    from ctctl.box.config import KEYS
    from ctctl.cli.parser import LOAD_EPILOG
    from ctctl.kernel.offload.aging import AgingConfig
    from ctctl.kernel.offload.eviction import EvictionConfig
    from ctctl.kernel.offload.policy import OffloadPolicy
    from ctctl.nic.caps import HwCaps

    shown = yaml.safe_load(LOAD_EPILOG.split("\n", 1)[1].split("\nexamples")[0])
    assert set(shown) | {"forward"} == set(KEYS)
    OffloadPolicy.from_config(shown["offload"])
    AgingConfig.from_config(shown["aging"])
    EvictionConfig.from_config(shown["eviction"])
    HwCaps.from_config(shown["hardware"])
