"""``pvbus bench net``: DPDK testpmd's virtio-user as a C traffic source and sink.

The frontend is ``dpdk-testpmd`` with a ``net_virtio_user`` port in ``txonly`` mode: it
keeps its transmit ring full of ``size``-byte frames, and the rate is how many frames per
second the backend takes off that ring (testpmd's TX-packets over the forwarding time). Each
backend reflects every frame back towards the frontend, which does not receive, so the
return path only fills and drops:

* ``pvbus``: ``pvbus serve net --loopback``;
* ``dpdk``: a second testpmd with a ``net_vhost`` port forwarding ``io`` on a loop topology.

The two forwarding cores run on different CPUs (frontend on ``--frontend-cpu``, backend on
``--backend-cpu``).
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
    "NetBenchError",
    "NetResult",
    "main",
    "run_net_bench",
    "testpmd_available",
]

BACKENDS = ("pvbus", "dpdk")
TESTPMD = "dpdk-testpmd"
_EAL = ["--no-huge", "--no-pci", "-m", "1024"]
_PMD = ["--total-num-mbufs=16384"]
_TOTAL = re.compile(r"TX-packets:\s+(\d+)")


class NetBenchError(Exception):
    """A benchmark process failed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class NetResult:
    """Frames the backend took off testpmd's transmit ring, per second of forwarding."""

    backend: str
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


def _frontend(sock: Path, size: int, seconds: float, cpu: int, other_cpu: int) -> tuple[str, float]:
    """Run testpmd txonly for ``seconds`` of forwarding; its output and the forwarding time."""
    # Line-buffered, so "Press enter to exit" (forwarding started) is seen when it is printed.
    argv = ["stdbuf", "-oL", TESTPMD, "-l", f"{other_cpu},{cpu}", "--main-lcore", str(other_cpu)]
    argv += [*_EAL, "--file-prefix", f"pvbus-fe-{os.getpid()}"]
    argv += ["--vdev", f"net_virtio_user0,path={sock},queues=1", "--"]
    argv += ["--forward-mode=txonly", f"--txpkts={size}", "-a", *_PMD]
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
    frontend_cpu: int = 1,
    backend_cpu: int = 0,
) -> NetResult:
    """One run: start the backend, drive it with testpmd for ``seconds``, return the rates."""
    if not testpmd_available():
        raise NetBenchError(f"{TESTPMD} not found (Debian: apt-get install dpdk-dev)")
    if not 60 <= size <= 1518:
        raise ValueError(f"frame size {size} is not in 60..1518")
    with tempfile.TemporaryDirectory(prefix="pvbus-bench-net-") as tmp:
        sock = Path(tmp) / "net.sock"
        log = Path(tmp) / "backend.log"
        try:
            with _backend(backend, sock, backend_cpu, frontend_cpu, log):
                out, elapsed = _frontend(sock, size, seconds, frontend_cpu, backend_cpu)
        except NetBenchError as err:
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise NetBenchError(f"{err}\nbackend log:\n{tail}") from err
    found = _TOTAL.findall(out)
    if not found:
        raise NetBenchError(f"no totals in testpmd's output:\n{out[-800:]}")
    tx = int(found[-1])
    pps = tx / elapsed
    return NetResult(backend, size, pps / 1e6, pps * size * 8 / 1e9, tx, elapsed)


def main(args: Any) -> int:
    """``pvbus bench net``: each backend at each frame size, as a table or JSON."""
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    results: list[NetResult] = []
    for size in args.size or [64, 1500]:
        for backend in backends:
            try:
                result = run_net_bench(backend, size, args.seconds)
            except (NetBenchError, ValueError) as err:
                print(f"pvbus: bench net: {err}", file=sys.stderr)
                return 1
            results.append(result)
            if not args.json:
                print(
                    f"{backend:6} {size:5} B  {result.mpps:8.3f} Mpps  {result.gbps:7.3f} Gbit/s"
                    f"  ({result.frames} frames in {result.seconds:.1f} s)",
                    flush=True,
                )
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    return 0
