"""The CLI contract's table (cli_contract.toml) and the CLI's own command tree.

``cli_commands`` walks ``instavm.cli.build_parser()``: every leaf command (an
alias counted once), so a newer CLI's new command shows up without anyone
listing it. ``dummy_argv`` fills a command's required arguments with made-up
values, which is all a refusal needs.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from instavm.cli import build_parser
from sdk_contract import Row

TABLE = Path(__file__).with_name("cli_contract.toml")


def load_rows() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for command, value in tomllib.loads(TABLE.read_text())["commands"].items():
        kind, _, subject = str(value).partition(":")
        rows[command] = Row(command, kind.strip(), subject.strip())
    return rows


def _leaves(parser: argparse.ArgumentParser, path: list[str]) -> dict[str, argparse.ArgumentParser]:
    subparsers = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subparsers:
        return {" ".join(path): parser}
    found: dict[str, argparse.ArgumentParser] = {}
    for action in subparsers:
        seen: set[int] = set()
        for name, child in action.choices.items():
            if id(child) not in seen:  # an alias is the same parser under another name
                seen.add(id(child))
                found.update(_leaves(child, [*path, name]))
    return found


def cli_commands() -> dict[str, argparse.ArgumentParser]:
    return _leaves(build_parser(), [])


# Options without which a command stops before calling the server at all.
EXTRA_ARGV: dict[str, list[str]] = {
    "browser navigate": ["--session", "contract-x"],
    "browser read": ["--session", "contract-x"],
    "browser screenshot": ["--session", "contract-x"],
    "browser scroll": ["--x", "1"],
}


def dummy_argv(command: str, parser: argparse.ArgumentParser) -> list[str]:
    argv = command.split() + EXTRA_ARGV.get(command, [])
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        positional = not action.option_strings
        if not positional and not action.required:
            continue
        if positional and action.nargs in ("?", "*"):
            continue
        value = str(action.choices[0]) if action.choices else "1" if action.type is int else "contract-x"
        argv += [value] if positional else [action.option_strings[0], value]
    return argv
