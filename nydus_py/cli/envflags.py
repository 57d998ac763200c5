"""Flags that environment variables can set, as nydusify's urfave/cli flags do (`EnvVars`):
`SOURCE=... TARGET=... nydusify-py convert` works like the flags. A flag given on the command
line wins over its variable. Booleans take Go's `strconv.ParseBool` spellings."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from ..config.goformat import parse_go_bool as go_bool
from ..config.goformat import parse_human_bytes


def parse_go_bool(name: str, text: str) -> bool:
    try:
        return go_bool(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not a boolean (true/false/1/0)") from None


def apply_env(parser: argparse.ArgumentParser, env_vars: Mapping[str, str],
              environ: Mapping[str, str] | None = None) -> None:
    """Make each flag of `parser` named in `env_vars` (dest -> variable) default to its variable
    when that is set; a required flag whose variable is set is no longer required."""
    env = os.environ if environ is None else environ
    by_dest = {a.dest: a for a in parser._actions}
    for dest, var in env_vars.items():
        if var not in env:
            continue
        action = by_dest[dest]
        text = env[var]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            value: object = parse_go_bool(var, text)
        elif action.type is not None and callable(action.type):
            try:
                value = action.type(text)
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise ValueError(f"environment variable {var}={text!r}: {e}") from None
        else:
            value = text
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"environment variable {var}={text!r}: choose from "
                             f"{', '.join(map(str, action.choices))}")
        action.default = value
        action.required = False
        for group in parser._mutually_exclusive_groups:
            if action in group._group_actions:
                group.required = False  # the command checks that one of them is set


def push_chunk_size(text: str) -> int:
    """nydusify's `--push-chunk-size` (go-humanize sizes: 0MB, 10MB, 16MiB)."""
    try:
        return parse_human_bytes(text)
    except ValueError as e:
        raise ValueError(f"--push-chunk-size: {e}") from None
