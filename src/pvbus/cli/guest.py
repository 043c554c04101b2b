"""``pvbus guest build``: download a Debian kernel and busybox, build the guest initramfs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pvbus.cli._common import CliError
from pvbus.vm.guest import (
    ARCHES,
    DEFAULT_ARCH,
    DEFAULT_SUITE,
    SUITES,
    GuestBuildError,
    build_guest,
)


def add_suite_option(parser: argparse.ArgumentParser) -> None:
    """``--kernel-suite``, shared with ``run`` and ``demo``."""
    parser.add_argument(
        "--kernel-suite",
        choices=SUITES,
        default=DEFAULT_SUITE,
        help=f"Debian suite of linux-image-amd64 (default {DEFAULT_SUITE})",
    )


def register(sub: Any) -> None:
    guest = sub.add_parser("guest", help="manage the guest image (kernel + initramfs)")
    actions = guest.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="download the kernel and build the initramfs")
    add_suite_option(build)
    build.add_argument(
        "--cache-dir", type=Path, help="cache directory (default $XDG_CACHE_HOME/pvbus)"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument(
        "--arch",
        choices=ARCHES,
        default=DEFAULT_ARCH,
        help="guest architecture: amd64 (pci, mmio) or s390x (ccw; needs "
        "'dpkg --add-architecture s390x')",
    )
    build.set_defaults(handler=_build)


def _build(args: argparse.Namespace) -> int:
    try:
        guest = build_guest(
            suite=args.kernel_suite, cache_dir=args.cache_dir, force=args.force, arch=args.arch
        )
    except GuestBuildError as err:
        raise CliError(f"guest build failed: {err}") from err
    print(f"kernel     {guest.kernel}")
    print(f"initramfs  {guest.initramfs}")
    print(f"version    {guest.kernel_version}")
    return 0
