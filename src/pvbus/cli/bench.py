"""``pvbus bench blk`` and ``pvbus bench notify``: measure vhost-user backends, pvbus beside
qemu-storage-daemon, through the userspace frontend."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvbus.cli._common import CliError

if TYPE_CHECKING:
    from pvbus.bench import BlkResult

#: Same as pvbus.bench.blk.RW_MODES (kept here so that the parser imports nothing heavy).
RW_MODES = ("read", "write", "randread", "randwrite")
BACKEND_KINDS = ("pvbus", "qsd")


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmark vhost-user backends (pvbus, qsd)")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)

    blk = kinds.add_parser("blk", help="block I/O at a queue depth: IOPS, latency, CPU/request")
    _target_args(blk)
    blk.add_argument("--rw", choices=RW_MODES, default="randread", help="pattern (randread)")
    blk.add_argument("--bs", default="4k", help="request size, e.g. 4k, 1M (4k)")
    blk.add_argument(
        "--iodepth", default="32", help="requests in flight per queue; a list sweeps (32)"
    )
    blk.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (5)")
    blk.add_argument("--num-queues", type=int, default=1, help="request queues (1)")
    blk.add_argument("--plot", metavar="PNG", help="plot IOPS and CPU/request against iodepth")
    blk.set_defaults(handler=_bench_blk)

    notify = kinds.add_parser("notify", help="kick-to-call round trip against eventfd ping-pong")
    _target_args(notify)
    notify.add_argument("--round-trips", type=int, default=20000, help="round trips (20000)")
    notify.set_defaults(handler=_bench_notify)

    # virtio-net (pvbus.bench.net, imported when run): DPDK testpmd virtio-user as the load.
    net = kinds.add_parser("net", help="virtio-net: DPDK testpmd against pvbus and DPDK vhost")
    net.add_argument("--backend", choices=("pvbus", "dpdk", "both"), default="both")
    net.add_argument("--size", type=int, action="append", help="frame size (64 and 1500)")
    net.add_argument("--seconds", type=float, default=5.0, help="seconds per run (5)")
    net.add_argument(
        "--mode",
        choices=("tx", "loop", "both"),
        default="both",
        help="tx: frames taken off testpmd's txonly ring; loop: frames back at testpmd "
        "(flowgen) after a round trip; both (default)",
    )
    net.add_argument("--repeat", type=int, default=3, help="runs per case; the median (3)")
    net.add_argument(
        "--packed", action="store_true", help="packed virtqueues (testpmd's packed_vq=1)"
    )
    net.add_argument("--json", action="store_true", help="print JSON instead of a table")
    net.set_defaults(handler=lambda a: __import__("pvbus.bench.net", fromlist=["main"]).main(a))


def _target_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", help="an already running vhost-user-blk backend")
    where.add_argument("--backend", choices=BACKEND_KINDS, help="start this backend on --image")
    parser.add_argument("--image", help="raw image for --backend/--compare (created if missing)")
    parser.add_argument("--size", default="256M", help="size of a created image (256M)")
    parser.add_argument("--compare", action="store_true", help="pvbus and qsd back to back")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _targets(args: argparse.Namespace) -> list[str | None]:
    """Backend kinds to start, or [None] for --socket-path."""
    if args.compare:
        if args.socket_path:
            raise CliError("--compare starts both backends itself; drop --socket-path")
        kinds: list[str | None] = list(BACKEND_KINDS)
    elif args.backend:
        kinds = [args.backend]
    elif args.socket_path:
        return [None]
    else:
        raise CliError("one of --socket-path, --backend or --compare is required")
    if not args.image:
        raise CliError("--image is required to start a backend")
    _ensure_image(Path(args.image), args.size)
    return kinds


def _ensure_image(path: Path, size_text: str) -> None:
    """Create a missing image filled with data (reads of holes would flatter the backend)."""
    from pvbus.bench import parse_size

    if path.exists():
        return
    try:
        size = parse_size(size_text)
    except ValueError as err:
        raise CliError(str(err)) from err
    size -= size % 512
    chunk = os.urandom(1 << 20)
    try:
        with path.open("wb") as f:
            left = size
            while left > 0:
                left -= f.write(chunk[: min(left, len(chunk))])
    except OSError as err:
        raise CliError(f"cannot create {path}: {err.strerror}") from err


@contextmanager
def _socket_for(args: argparse.Namespace, kind: str | None, num_queues: int) -> Iterator[str]:
    from pvbus.bench import managed_backend
    from pvbus.vm.backends import BackendError

    if kind is None:
        yield args.socket_path
        return
    try:
        with managed_backend(kind, Path(args.image), num_queues=num_queues) as backend:
            yield str(backend.socket_path)
    except BackendError as err:
        raise CliError(f"cannot start {kind}: {err}") from err


def _progress(label: str) -> Any:
    def report(elapsed: float, done: int) -> None:
        print(f"  {label}: {elapsed:5.1f} s, {done} requests", file=sys.stderr, flush=True)

    return report


# -- blk ---------------------------------------------------------------------------------------


def _bench_blk(args: argparse.Namespace) -> int:
    from pvbus.bench import BlkJob, parse_size, run_blk
    from pvbus.frontend import FrontendError

    try:
        depths = [int(d) for d in str(args.iodepth).split(",") if d]
        bs = parse_size(args.bs)
        jobs = [
            BlkJob(args.rw, bs, d, args.seconds, args.num_queues, min(0.5, args.seconds / 4))
            for d in depths
        ]
    except ValueError as err:
        raise CliError(f"bench blk: {err}") from err
    if not jobs:
        raise CliError("bench blk: --iodepth lists no depth")
    results: list[BlkResult] = []
    for kind in _targets(args):
        with _socket_for(args, kind, args.num_queues) as path:
            name = kind or path
            for job in jobs:
                label = f"{name} {job.rw} bs={args.bs} iodepth={job.iodepth}"
                print(f"running {label} for {job.seconds:g} s", file=sys.stderr, flush=True)
                try:
                    results.append(run_blk(path, job, backend=name, progress=_progress(name)))
                except (FrontendError, OSError, TimeoutError, ValueError) as err:
                    raise CliError(f"bench blk ({name}): {err}") from err
    ratios = _blk_ratios(results)
    if args.json:
        print(json.dumps({"results": [r.as_dict() for r in results], "ratios": ratios}, indent=2))
    else:
        print(format_blk_table(results))
        if ratios:
            print()
            print(format_ratio_table(ratios))
    if args.plot:
        plot_blk(results, args.plot)
    return 0


_BLK_COLUMNS = (
    ("backend", "backend", "{}"),
    ("rw", "rw", "{}"),
    ("bs", "bs", "{}"),
    ("iodepth", "qd", "{}"),
    ("iops", "IOPS", "{:.0f}"),
    ("mb_per_s", "MB/s", "{:.1f}"),
    ("lat_p50_us", "p50 us", "{:.1f}"),
    ("lat_p99_us", "p99 us", "{:.1f}"),
    ("kicks_per_req", "kicks/req", "{:.3f}"),
    ("calls_per_req", "calls/req", "{:.3f}"),
    ("backend_cpu_us_per_req", "backend CPU us/req", "{:.2f}"),
    ("frontend_cpu_us_per_req", "frontend CPU us/req", "{:.2f}"),
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def format_blk_table(results: list[BlkResult]) -> str:
    """The results as an aligned text table."""
    rows = []
    for r in results:
        d = r.as_dict()
        rows.append([fmt.format(d[key]) for key, _, fmt in _BLK_COLUMNS])
    return _table([title for _, title, _ in _BLK_COLUMNS], rows)


def _blk_ratios(results: list[BlkResult]) -> list[dict[str, Any]]:
    """pvbus / qsd for each iodepth both ran at."""
    by = {(r.backend, r.iodepth): r for r in results}
    out = []
    for (backend, depth), pv in by.items():
        qsd = by.get(("qsd", depth))
        if backend != "pvbus" or qsd is None:
            continue
        out.append(
            {
                "iodepth": depth,
                "iops": _ratio(pv.iops, qsd.iops),
                "mb_per_s": _ratio(pv.mb_per_s, qsd.mb_per_s),
                "lat_p50": _ratio(pv.lat_p50_us, qsd.lat_p50_us),
                "calls_per_req": _ratio(pv.calls_per_req, qsd.calls_per_req),
                "backend_cpu_per_req": _ratio(
                    pv.backend_cpu_us_per_req, qsd.backend_cpu_us_per_req
                ),
            }
        )
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def format_ratio_table(ratios: list[dict[str, Any]]) -> str:
    header = ["pvbus/qsd at qd", "IOPS", "MB/s", "p50 latency", "calls/req", "backend CPU/req"]
    keys = ["iodepth", "iops", "mb_per_s", "lat_p50", "calls_per_req", "backend_cpu_per_req"]
    rows = [["-" if r[k] is None else f"{r[k]}" for k in keys] for r in ratios]
    return _table(header, rows)


def plot_blk(results: list[BlkResult], path: str) -> None:
    """IOPS and backend CPU per request against iodepth, one line per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise CliError("--plot needs matplotlib: pip install 'pvbus[bench]'") from err
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in dict.fromkeys(r.backend for r in results):
        rs = sorted((r for r in results if r.backend == backend), key=lambda r: r.iodepth)
        depths = [r.iodepth for r in rs]
        ax1.plot(depths, [r.iops for r in rs], marker="o", label=backend)
        ax2.plot(depths, [r.backend_cpu_us_per_req for r in rs], marker="o", label=backend)
    first = results[0]
    title = f"{first.rw}, bs={first.bs}, {first.num_queues} queue(s)"
    for ax, ylabel in ((ax1, "IOPS"), (ax2, "backend CPU per request (us)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("iodepth")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- notify ------------------------------------------------------------------------------------


def _bench_notify(args: argparse.Namespace) -> int:
    from pvbus.bench import NotifyResult, backend_roundtrip, eventfd_pingpong
    from pvbus.frontend import FrontendError

    if args.round_trips < 1:
        raise CliError("--round-trips must be positive")
    print("running eventfd ping-pong", file=sys.stderr, flush=True)
    floor = eventfd_pingpong(args.round_trips)
    results: list[NotifyResult] = [floor]
    for kind in _targets(args):
        with _socket_for(args, kind, 1) as path:
            name = kind or path
            print(f"running kick-to-call via {name}", file=sys.stderr, flush=True)
            try:
                results.append(backend_roundtrip(path, args.round_trips, name=name))
            except (FrontendError, OSError) as err:
                raise CliError(f"bench notify ({name}): {err}") from err
    if args.json:
        out = {
            "results": [r.as_dict() for r in results],
            "ratio_to_floor_p50": {r.name: round(r.p50_us / floor.p50_us, 3) for r in results[1:]},
        }
        print(json.dumps(out, indent=2))
        return 0
    header = ["round trip", "n", "p50 us", "mean us", "p99 us", "p50 / floor"]
    rows = [
        [
            r.name,
            str(r.round_trips),
            f"{r.p50_us:.1f}",
            f"{r.mean_us:.1f}",
            f"{r.p99_us:.1f}",
            f"{r.p50_us / floor.p50_us:.2f}",
        ]
        for r in results
    ]
    print(_table(header, rows))
    return 0
