"""``pvbus fuzz TARGET``: coverage-guided fuzzing of what hostile peers control."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any

from pvbus.cli._common import CliError

TARGETS = ("messages", "rings", "packed-rings")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "fuzz", help="fuzz the vhost-user parser or descriptor-chain processing (atheris)"
    )
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs to run (default 1e6)")
    parser.add_argument("--seconds", type=int, default=0, help="stop after this long (0: no limit)")
    parser.add_argument("--corpus", help="corpus directory (seeded with valid inputs)")
    parser.add_argument("--timeout", type=int, default=5, help="seconds one input may take")
    parser.set_defaults(handler=_fuzz)


def _fuzz(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("atheris") is None:
        raise CliError("atheris is not installed (pip install atheris)")
    from pvbus.testing.fuzz import command

    options = [f"-runs={args.runs}", f"-timeout={args.timeout}", "-print_final_stats=1"]
    if args.seconds:
        options.append(f"-max_total_time={args.seconds}")
    if args.corpus:
        options.insert(0, args.corpus)
    sys.stdout.flush()
    os.execv(sys.executable, command(args.target, options))
