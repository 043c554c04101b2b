"""``pvbus soak blk``: many blk backends driven at once for a long time; checks progress of every
device every second, data, memory and fds (docs/reliability.md, "Load (soak)")."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pvbus.cli._common import CliError


def register(sub: Any) -> None:
    soak = sub.add_parser("soak", help="drive many devices at once for a long time (reliability)")
    kinds = soak.add_subparsers(dest="soak", metavar="KIND", required=True)
    blk = kinds.add_parser(
        "blk",
        help="N blk devices under random reads and writes",
        description=(
            "Create N blk devices on small images in /dev/shm (on a daemon this command starts, "
            "a running daemon with --api-socket, or N `pvbus serve blk` processes with "
            "--processes), drive them all with random reads and writes, and check that every "
            "device makes progress every second, that data reads back as written, and that "
            "backend memory and fds stay flat. Exit status 1 if a check failed."
        ),
    )
    blk.add_argument("--devices", type=int, default=64, help="devices (64)")
    blk.add_argument("--seconds", type=float, default=600.0, help="run time (600)")
    blk.add_argument("--iodepth", type=int, default=4, help="requests in flight per device (4)")
    blk.add_argument("--bs", default="4k", help="request size (4k)")
    blk.add_argument("--image-size", default="4M", help="size of each image (4M)")
    blk.add_argument("--read-pct", type=int, default=50, help="share of reads in %% (50)")
    blk.add_argument(
        "--frontends", type=int, default=0, help="frontend processes (default: one per CPU)"
    )
    blk.add_argument(
        "--max-rss-growth",
        default="1M",
        help="allowed RssAnon growth of one backend process after the warm-up (1M)",
    )
    blk.add_argument(
        "--warmup", type=float, default=-1.0, help="seconds before the baseline (run/10, 1..30)"
    )
    where = blk.add_mutually_exclusive_group()
    where.add_argument("--api-socket", type=Path, help="use the daemon running on this socket")
    where.add_argument(
        "--processes", action="store_true", help="one `pvbus serve blk` process per device"
    )
    blk.add_argument("--json", action="store_true", help="print the report as JSON")
    blk.set_defaults(handler=_soak_blk)


def _soak_blk(args: argparse.Namespace) -> int:
    from pvbus.bench import parse_size
    from pvbus.bench.soak import SoakError, SoakJob, format_report, run_soak

    try:
        job = SoakJob(
            devices=args.devices,
            seconds=args.seconds,
            iodepth=args.iodepth,
            bs=parse_size(args.bs),
            image_size=parse_size(args.image_size),
            read_pct=args.read_pct,
            frontends=args.frontends,
            processes=args.processes,
            api_socket=args.api_socket,
            max_rss_growth=parse_size(args.max_rss_growth),
            warmup=args.warmup,
        )
    except ValueError as err:
        raise CliError(f"soak blk: {err}") from err

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        report = run_soak(job, progress)
    except SoakError as err:
        raise CliError(f"soak blk: {err}") from err
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
