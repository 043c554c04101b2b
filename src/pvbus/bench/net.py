"""``pvbus bench net``: DPDK testpmd's virtio-user as a C traffic source and sink.

The frontend is ``dpdk-testpmd`` with one ``net_virtio_user`` port. Each backend reflects every
frame it takes back towards the frontend:

* ``pvbus``: ``pvbus serve net --loopback``;
* ``dpdk``: a second testpmd with a ``net_vhost`` port forwarding ``io`` on a loop topology.

Two modes, one number each:

* ``tx``: the frontend runs ``txonly``: it keeps its transmit ring full of ``size``-byte frames
  and never receives. The rate is how many frames per second the backend takes off that ring
  (testpmd's TX-packets over the forwarding time); what comes back only fills and drops. A
  backend may drop a frame it has no room for without copying it (pvbus does; DPDK's ``io``
  forwarding copies it into an mbuf first).
* ``loop``: the frontend runs ``flowgen``: it transmits and also receives (and frees) what
  comes back. The rate is frames that made the round trip (RX-packets over the time): both
  directions, every frame copied into a receive buffer.

The two forwarding cores run on different CPUs (frontend on ``frontend_cpu``, backend on
``backend_cpu``). Runs are repeated, backends interleaved, and the median is reported: on a
shared or nested machine single runs swing by 2x.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BACKENDS",
    "MODES",
    "NetBenchError",
    "NetResult",
    "main",
    "run_net_bench",
    "testpmd_available",
]

BACKENDS = ("pvbus", "dpdk")
#: Benchmark mode -> testpmd forwarding mode of the frontend.
MODES = {"tx": "txonly", "loop": "flowgen"}
TESTPMD = "dpdk-testpmd"
_EAL = ["--no-huge", "--no-pci", "-m", "1024"]
_PMD = ["--total-num-mbufs=16384"]
_TX_TOTAL = re.compile(r"TX-packets:\s+(\d+)")
_RX_TOTAL = re.compile(r"RX-packets:\s+(\d+)")


class NetBenchError(Exception):
    """A benchmark process failed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class NetResult:
    """One run: frames per second of forwarding as the mode counts them (see the module)."""

    backend: str
    mode: str
    frame_size: int
    mpps: float
    gbps: float
    frames: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def testpmd_available() -> bool:
    return shutil.which(TESTPMD) is not None


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise NetBenchError(f"{what} exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise NetBenchError(f"{what} did not create {path}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _backend(kind: str, sock: Path, cpu: int, other_cpu: int, log: Path) -> Iterator[None]:
    if kind == "pvbus":
        argv = ["taskset", "-c", str(cpu), sys.executable, "-m", "pvbus.cli.main"]
        argv += ["serve", "net", "--socket-path", str(sock), "--loopback"]
    elif kind == "dpdk":
        argv = [TESTPMD, "-l", f"{cpu},{other_cpu}", "--main-lcore", str(other_cpu), *_EAL]
        argv += ["--file-prefix", f"pvbus-be-{os.getpid()}"]
        argv += ["--vdev", f"net_vhost0,iface={sock},queues=1", "--"]
        argv += ["--forward-mode=io", "--port-topology=loop", "-a", *_PMD]
    else:
        raise ValueError(f"unknown backend {kind!r}")
    with log.open("wb") as out:
        # testpmd exits at end of input ("Press enter to exit"): give it a stdin that stays open.
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=out)
    try:
        _wait_socket(sock, proc, f"{kind} backend", 60)
        yield
    finally:
        _stop(proc, signal.SIGINT if kind == "dpdk" else signal.SIGTERM)


def _frontend(
    sock: Path, mode: str, size: int, seconds: float, *, cpu: int, other_cpu: int, packed: bool
) -> tuple[str, float]:
    """Run testpmd in ``mode`` for ``seconds`` of forwarding; its output and the time."""
    # Line-buffered, so "Press enter to exit" (forwarding started) is seen when it is printed.
    argv = ["stdbuf", "-oL", TESTPMD, "-l", f"{other_cpu},{cpu}", "--main-lcore", str(other_cpu)]
    argv += [*_EAL, "--file-prefix", f"pvbus-fe-{os.getpid()}"]
    vdev = f"net_virtio_user0,path={sock},queues=1" + (",packed_vq=1" if packed else "")
    argv += ["--vdev", vdev, "--"]
    argv += [f"--forward-mode={MODES[mode]}", f"--txpkts={size}", "-a", *_PMD]
    # testpmd exits at end of input ("Press enter to exit"): give it a stdin that stays open.
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    lines: list[bytes] = []
    started = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if b"Press enter to exit" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not started.wait(60):
        _stop(proc, signal.SIGKILL)
        reader.join(5)
        out = b"".join(lines).decode(errors="replace")
        raise NetBenchError(f"testpmd did not start forwarding:\n{out[-800:]}")
    begin = time.monotonic()
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    elapsed = time.monotonic() - begin
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(5)
    out = b"".join(lines).decode(errors="replace")
    if "No probed ethernet devices" in out or "Failed to setup backend" in out:
        raise NetBenchError(f"testpmd could not attach to {sock}:\n{out[-800:]}")
    return out, elapsed


def run_net_bench(
    backend: str,
    size: int = 64,
    seconds: float = 5.0,
    *,
    mode: str = "tx",
    frontend_cpu: int = 1,
    backend_cpu: int = 0,
    packed: bool = False,
) -> NetResult:
    """One run: start the backend, drive it with testpmd for ``seconds``, return the rates."""
    if not testpmd_available():
        raise NetBenchError(f"{TESTPMD} not found (Debian: apt-get install dpdk-dev)")
    if not 60 <= size <= 1518:
        raise ValueError(f"frame size {size} is not in 60..1518")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (use {', '.join(MODES)})")
    with tempfile.TemporaryDirectory(prefix="pvbus-bench-net-") as tmp:
        sock = Path(tmp) / "net.sock"
        log = Path(tmp) / "backend.log"
        try:
            with _backend(backend, sock, backend_cpu, frontend_cpu, log):
                out, elapsed = _frontend(
                    sock, mode, size, seconds, cpu=frontend_cpu, other_cpu=backend_cpu,
                    packed=packed,
                )  # fmt: skip
        except NetBenchError as err:
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise NetBenchError(f"{err}\nbackend log:\n{tail}") from err
    found = (_TX_TOTAL if mode == "tx" else _RX_TOTAL).findall(out)
    if not found:
        raise NetBenchError(f"no totals in testpmd's output:\n{out[-800:]}")
    frames = int(found[-1])
    pps = frames / elapsed
    return NetResult(backend, mode, size, pps / 1e6, pps * size * 8 / 1e9, frames, elapsed)


def median_result(runs: list[NetResult]) -> NetResult:
    """The run with the median rate (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: r.mpps)
    return ordered[(len(ordered) - 1) // 2]


def main(args: Any) -> int:
    """``pvbus bench net``: each mode, frame size and backend, ``--repeat`` times interleaved;
    the medians as a table (with pvbus over DPDK) or JSON (every run)."""
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    modes = tuple(MODES) if args.mode == "both" else (args.mode,)
    runs: list[NetResult] = []
    table: list[tuple[str, int, dict[str, NetResult]]] = []
    for mode in modes:
        for size in args.size or [64, 1500]:
            per_backend: dict[str, list[NetResult]] = {b: [] for b in backends}
            for _ in range(args.repeat):
                for backend in backends:
                    try:
                        result = run_net_bench(
                            backend, size, args.seconds, mode=mode, packed=args.packed
                        )
                    except (NetBenchError, ValueError) as err:
                        print(f"pvbus: bench net: {err}", file=sys.stderr)
                        return 1
                    per_backend[backend].append(result)
                    runs.append(result)
                    if not args.json:
                        print(
                            f"  {mode:4} {backend:5} {size:5} B  {result.mpps:7.3f} Mpps"
                            f"  {result.gbps:7.2f} Gbit/s",
                            file=sys.stderr,
                            flush=True,
                        )
            table.append((mode, size, {b: median_result(r) for b, r in per_backend.items()}))
    if args.json:
        print(json.dumps([r.as_dict() for r in runs], indent=2))
        return 0
    rings = "packed" if args.packed else "split"
    print(f"median of {args.repeat} run(s) of {args.seconds:g} s each, {rings} virtqueues")
    head = f"{'mode':4} {'frame':>6} " + " ".join(
        f"{b + ' Mpps':>11} {b + ' Gbit/s':>13}" for b in backends
    )
    print(head + ("  pvbus/dpdk" if len(backends) == 2 else ""))
    for mode, size, medians in table:
        cells = " ".join(f"{medians[b].mpps:11.3f} {medians[b].gbps:13.2f}" for b in backends)
        ratio = ""
        if len(backends) == 2 and medians["dpdk"].mpps > 0:
            ratio = f"  {100 * medians['pvbus'].mpps / medians['dpdk'].mpps:9.0f} %"
        print(f"{mode:4} {size:5}B {cells}{ratio}")
    return 0
