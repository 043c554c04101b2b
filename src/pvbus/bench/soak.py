"""The block soak: many vhost-user-blk backends driven at once for a long time (issue 6).

``N`` blk devices on small images in ``/dev/shm`` are served either by a bus daemon (one
worker process per device, created through its API) or by ``N`` ``pvbus serve blk``
processes. A few frontend processes (``python -m pvbus.bench.soak``) connect one
:class:`~pvbus.frontend.BlockClient` per device and keep ``iodepth`` random reads and writes
in flight on each, on one epoll loop per process, with zero-copy guest buffers.

What is checked:

* **progress**: every frontend reports, once a second, how many requests each of its devices
  completed; a device-second with none is *starvation*;
* **data**: a device never has two requests in flight on the same block, so a read must return
  what the last completed write to that block put there (each write carries its device, block
  and a version number); at the end every block of every image file is compared with the model;
* **memory**: backend RSS (``VmRSS`` and its anonymous part ``RssAnon``, from
  ``/proc/PID/status``) after a warm-up and at the end; the anonymous growth must stay under
  :attr:`SoakJob.max_rss_growth` per backend process (default 1 MiB over the run);
* **fds**: open descriptors (``/proc/PID/fd``) of every backend and of the daemon, while
  connected after the warm-up vs. at the end, and idle before the frontends connected vs.
  after they left: they must be equal;
* **errors**: failed requests, disconnects, requests that never complete; with the daemon, its
  per-device ``requests`` counters must equal what the frontends completed.

Frontend protocol (JSON lines): the orchestrator writes the config then ``go``, ``close`` (and
``stop`` to end early) on a frontend's stdin; the frontend answers ``ready``, one ``tick`` per
second, ``drained`` and ``done`` on its stdout.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import itertools
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "SoakError",
    "SoakJob",
    "SoakReport",
    "fd_count",
    "format_report",
    "proc_memory",
    "run_soak",
]

_PDEATHSIG = 1  # prctl(PR_SET_PDEATHSIG)
_MiB = 1 << 20


class SoakError(Exception):
    """The soak could not be set up or run (not a failed check: those are in the report)."""


@dataclass(frozen=True, slots=True)
class SoakJob:
    """What to run. ``api_socket`` uses a running daemon; ``processes`` uses ``pvbus serve``."""

    devices: int = 64
    seconds: float = 600.0
    iodepth: int = 4
    bs: int = 4096
    image_size: int = 4 * _MiB
    read_pct: int = 50
    frontends: int = 0  # 0: one per CPU, at most one per device
    processes: bool = False
    api_socket: Path | None = None
    max_rss_growth: int = _MiB  # per backend process, RssAnon, warm-up to end
    warmup: float = -1.0  # <0: a tenth of the run, at least 1 s and at most 30 s
    seed: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 1024:
            raise ValueError(f"devices {self.devices} is not in 1..1024")
        if self.seconds < 2:
            raise ValueError("seconds must be at least 2")
        if not 1 <= self.iodepth <= 64:
            raise ValueError(f"iodepth {self.iodepth} is not in 1..64")
        if self.bs < 512 or self.bs % 512:
            raise ValueError(f"block size {self.bs} is not a positive multiple of 512")
        if self.image_size % self.bs or self.image_size // self.bs < 4 * self.iodepth:
            raise ValueError(
                f"image size {self.image_size} must be a multiple of the block size and hold "
                f"at least {4 * self.iodepth} blocks"
            )
        if not 0 <= self.read_pct <= 100:
            raise ValueError(f"read percentage {self.read_pct} is not in 0..100")
        if self.processes and self.api_socket is not None:
            raise ValueError("--processes and --api-socket exclude each other")

    @property
    def warmup_seconds(self) -> float:
        if self.warmup >= 0:
            return min(self.warmup, self.seconds / 2)
        return max(1.0, min(30.0, self.seconds / 10))

    @property
    def frontend_count(self) -> int:
        n = self.frontends or (os.cpu_count() or 1)
        return max(1, min(n, self.devices))


@dataclass(slots=True)
class SoakReport:
    """What a soak measured; :attr:`failures` lists every check that did not pass."""

    mode: str
    devices: int
    seconds: float
    iodepth: int
    bs: int
    read_pct: int
    frontends: int
    measured_seconds: int = 0
    requests: int = 0
    reads: int = 0
    writes: int = 0
    # Per-device average rates over the measured seconds, and single device-seconds.
    rate_min: float = 0.0
    rate_median: float = 0.0
    rate_max: float = 0.0
    second_min: int = 0
    second_median: float = 0.0
    second_max: int = 0
    device_seconds: int = 0
    starved_device_seconds: int = 0
    starved_devices: list[str] = field(default_factory=list)
    max_tick_seconds: float = 0.0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    read_mismatches: int = 0
    image_mismatches: int = 0
    blocks_checked: int = 0
    stats_mismatches: int | None = None
    rss_initial: int = 0
    rss_start: int = 0
    rss_end: int = 0
    rss_anon_start: int = 0
    rss_anon_end: int = 0
    rss_anon_growth_max: int = 0
    rss_limit_per_process: int = 0
    rss_series: list[tuple[float, int, int]] = field(default_factory=list)
    fds_idle_start: list[int] = field(default_factory=list)
    fds_idle_end: list[int] = field(default_factory=list)
    fds_start: list[int] = field(default_factory=list)
    fds_end: list[int] = field(default_factory=list)
    daemon_pid: int | None = None
    daemon_rss_start: int = 0
    daemon_rss_end: int = 0
    daemon_fds_start: int = 0
    daemon_fds_end: int = 0
    # Where the CPU went during the run (percent of the machine), and how long backends waited
    # on a run queue (runnable, not running) per second: starvation by the scheduler shows here.
    backend_cpu_seconds: float = 0.0
    cpu_backends_pct: float = 0.0
    cpu_frontends_pct: float = 0.0
    cpu_daemon_pct: float = 0.0
    cpu_other_pct: float = 0.0
    cpu_steal_pct: float = 0.0
    load_average: list[float] = field(default_factory=list)
    backend_wait_median_ms: float = 0.0  # run-queue wait per second of one backend
    backend_wait_max_ms: float = 0.0
    # Each starved device-second (up to 200) with its backend's scheduling around it: how long
    # it ran and how long it was runnable but waiting for a CPU, in the sampled window.
    starved_cells: list[dict[str, Any]] = field(default_factory=list)
    starved_waiting_for_cpu: int = 0  # ... of which the backend waited >= half the window
    per_second_total: list[int] = field(default_factory=list)
    per_second_min: list[int] = field(default_factory=list)
    per_device_total: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


# -- /proc ---------------------------------------------------------------------------------


def proc_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of ``pid`` in bytes, from /proc/PID/status; (0, 0) if it is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, anon


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (entries of /proc/PID/fd); -1 if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return -1


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` (all threads), from /proc/PID/stat; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _schedstat(pid: int) -> tuple[int, int]:
    """Nanoseconds ``pid``'s main thread ran, and spent runnable but not running (waiting on a
    run queue), from /proc/PID/schedstat; (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            ran, waited = f.read().split()[:2]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return 0, 0
    return int(ran), int(waited)


def _machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the machine since boot, from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    total = sum(values)
    idle = values[3] + values[4]
    return (total - idle - values[7]) / _CLK_TCK, values[7] / _CLK_TCK, total / _CLK_TCK


class _CpuAccount:
    """CPU time of the soak's processes against the whole machine's, between two points."""

    def __init__(self, backends: list[int], frontends: list[int], daemon: int | None) -> None:
        self.groups = {"backends": backends, "frontends": frontends, "daemon": [daemon or 0]}
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        out = {name: sum(_cpu_seconds(p) for p in pids if p) for name, pids in self.groups.items()}
        out["self"] = time.process_time()
        out["busy"], out["steal"], out["total"] = _machine_cpu()
        return out

    def finish(self, report: SoakReport) -> None:
        end = self._sample()
        d = {k: end[k] - self.start[k] for k in end}
        total = d["total"] or 1.0
        ours = d["backends"] + d["frontends"] + d["daemon"] + d["self"]
        report.backend_cpu_seconds = round(d["backends"], 2)
        report.cpu_backends_pct = round(100 * d["backends"] / total, 1)
        report.cpu_frontends_pct = round(100 * d["frontends"] / total, 1)
        report.cpu_daemon_pct = round(100 * d["daemon"] / total, 1)
        report.cpu_other_pct = round(100 * max(0.0, d["busy"] - ours) / total, 1)
        report.cpu_steal_pct = round(100 * d["steal"] / total, 1)


def _peer_pid(path: Path) -> int:
    """The pid listening on Unix socket ``path`` (SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        ucred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", ucred)[0]
    return pid


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the soak process dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _pvbus_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pvbus.cli.main", *args]


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- backends ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Backend:
    id: str
    socket: str
    image: str
    pid: int


class _DaemonBackends:
    """Devices on a bus daemon: ours on a temporary API socket, or a running one."""

    mode = "daemon"

    def __init__(self, workdir: Path, api_socket: Path | None) -> None:
        from pvbus.bus.client import BusClient

        self.proc: subprocess.Popen[bytes] | None = None
        self.created: list[str] = []
        if api_socket is None:
            api_socket = workdir / "api.sock"
            self.log = workdir / "daemon.log"
            with self.log.open("wb") as logf:
                self.proc = subprocess.Popen(
                    _pvbus_argv("daemon", "--api-socket", str(api_socket)),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads here)
                )
            deadline = time.monotonic() + 60
            while not api_socket.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-500:]
                    self.close()
                    raise SoakError(f"the daemon did not start: {tail}")
                time.sleep(0.05)
        else:
            self.mode = "daemon (existing)"
        self.client = BusClient(api_socket, timeout=60)
        try:
            self.daemon_pid: int | None = _peer_pid(api_socket)
        except OSError as err:
            self.close()
            raise SoakError(f"no pvbus daemon on {api_socket}: {err.strerror}") from err

    def add(self, index: int, image: Path, prefix: str) -> _Backend:
        from pvbus.bus.client import ClientError

        dev_id = f"{prefix}{index}"
        try:
            info = self.client.add_device("blk", {"image": str(image)}, dev_id=dev_id)
        except ClientError as err:
            raise SoakError(f"cannot create device {dev_id}: {err}") from err
        self.created.append(dev_id)
        return _Backend(dev_id, info["socket"], str(image), int(info["pid"]))

    def requests(self) -> dict[str, int]:
        """Completed requests per device, as the workers count them."""
        stats = self.client.stats()
        return {
            dev: sum(q["requests"] for q in s["queues"])
            for dev, s in stats.items()
            if dev in self.created
        }

    def touch(self) -> None:
        """One API call, so that the daemon's fd count includes our (kept-alive) connection."""
        self.client.request("GET", "/devices")

    def close(self) -> None:
        for dev_id in self.created:
            with contextlib.suppress(Exception):
                self.client.remove_device(dev_id)
        self.created.clear()
        if hasattr(self, "client"):
            self.client.close()
        if self.proc is not None:
            _terminate(self.proc)


class _ProcessBackends:
    """One ``pvbus serve blk`` process per device."""

    mode = "processes"
    daemon_pid: int | None = None

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, index: int, image: Path, prefix: str) -> _Backend:
        sock = self.workdir / f"{prefix}{index}.sock"
        log = self.workdir / f"{prefix}{index}.log"
        with log.open("wb") as logf:
            proc = subprocess.Popen(
                _pvbus_argv("serve", "blk", "--socket-path", str(sock), "--image", str(image)),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads here)
            )
        self.procs.append(proc)
        return _Backend(f"{prefix}{index}", str(sock), str(image), proc.pid)

    def wait_ready(self, backends: list[_Backend], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for backend, proc in zip(backends, self.procs, strict=True):
            while not os.path.exists(backend.socket):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = Path(backend.socket).with_suffix(".log")
                    tail = log.read_text(errors="replace").strip()[-300:]
                    raise SoakError(f"pvbus serve blk for {backend.id} did not start: {tail}")
                time.sleep(0.05)

    def touch(self) -> None:
        pass

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            _terminate(proc)
        self.procs.clear()


# -- frontend process ----------------------------------------------------------------------


def _pattern(dev: int, block: int, version: int, bs: int) -> bytes:
    """What write ``version`` puts in ``block`` of device ``dev`` (version 0: zeroes)."""
    if version == 0:
        return bytes(bs)
    return struct.pack("<IIQ", dev, block, version) * (bs // 16)


def _queue_size(iodepth: int) -> int:
    size = 8
    while size < 3 * iodepth:  # header, data and status descriptors per request
        size *= 2
    return size


class _Driven:
    """One device as a frontend process drives it: its client, buffers and data model."""

    def __init__(self, index: int, spec: dict[str, Any], cfg: dict[str, Any]) -> None:
        from pvbus.frontend import BlockClient

        self.index = index
        self.id: str = spec["id"]
        self.image: str = spec["image"]
        bs = self.bs = int(cfg["bs"])
        depth = int(cfg["iodepth"])
        qsize = _queue_size(depth)
        self.client = BlockClient.connect(
            spec["socket"],
            queue_size=qsize,
            memory_size=depth * (bs + 4096) + 64 * qsize + (256 << 10),
            timeout=60.0,
        )
        capacity = self.client.capacity or 0
        self.blocks = capacity // bs
        if self.blocks < 4 * depth:
            raise SoakError(f"{self.id}: the disk has {capacity} bytes, too small")
        self.queue = self.client.queues[0]
        self.fq = self.queue.fq
        self.buffers = [self.client.alloc_buffer(bs) for _ in range(depth)]
        self.versions = array("q", bytes(8 * self.blocks))  # -1: unknown after a failed write
        self.busy: set[int] = set()
        self.rng = random.Random(int(cfg["seed"]) * 100003 + index)
        self.read_frac = int(cfg["read_pct"]) / 100
        self.next_version = 1
        self.done = 0
        self.reads = 0
        self.writes = 0
        self.errors: list[str] = []
        self.mismatches = 0
        self.alive = True

    def submit(self, buf: Any) -> None:
        rng = self.rng
        busy = self.busy
        block = rng.randrange(self.blocks)
        while block in busy:
            block = rng.randrange(self.blocks)
        busy.add(block)
        if rng.random() < self.read_frac:
            self.queue.submit_read(block * self.bs, buf, (buf, block, -1))
        else:
            version = self.next_version
            self.next_version = version + 1
            buf.view[:] = _pattern(self.index, block, version, self.bs)
            self.queue.submit_write(block * self.bs, buf, (buf, block, version))

    def start(self) -> None:
        for buf in self.buffers:
            self.submit(buf)
        self.queue.kick()

    def on_call(self, running: bool) -> None:
        self.fq.ack_calls()
        completed = self.queue.reap()
        versions = self.versions
        for c in completed:
            buf, block, version = c.tag
            self.busy.discard(block)
            if c.status:
                if len(self.errors) < 5:
                    self.errors.append(f"{self.id}: {c.op.name} at {c.offset}: status {c.status}")
                else:
                    self.errors.append("")
                if version >= 0:
                    versions[block] = -1
            elif version < 0:
                self.reads += 1
                expected = versions[block]
                if expected >= 0 and buf.view != _pattern(self.index, block, expected, self.bs):
                    self.mismatches += 1
            else:
                self.writes += 1
                versions[block] = version
            if running:
                self.submit(buf)
        self.done += len(completed)
        if running and completed:
            self.queue.kick()

    def verify_image(self) -> tuple[int, int]:
        """(blocks compared, blocks that differ from the model) in the image file."""
        bs = self.bs
        checked = bad = 0
        with open(self.image, "rb") as f:
            for block in range(self.blocks):
                data = f.read(bs)
                version = self.versions[block]
                if version < 0:
                    continue
                checked += 1
                if data != _pattern(self.index, block, version, bs):
                    bad += 1
        return checked, bad


class _LineReader:
    """Lines from a file descriptor, without the read-ahead of a buffered reader."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def feed(self) -> bool:
        """Read what is there (raises BlockingIOError if nothing); False at end of file."""
        data = os.read(self.fd, 1 << 16)
        self.buf += data
        return bool(data)

    def pop(self) -> str | None:
        """The next complete line, if one arrived."""
        line, sep, rest = self.buf.partition(b"\n")
        if not sep:
            return None
        self.buf = rest
        return line.decode().strip()

    def next_line(self) -> str | None:
        """Block for the next line; None at end of file."""
        while (line := self.pop()) is None:
            if not self.feed():
                return None
        return line


def _emit(obj: dict[str, Any]) -> None:
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def _frontend_main() -> int:
    """A frontend process: connect to the devices of the config on stdin and drive them."""
    from pvbus.frontend import FrontendError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator decides when to stop
    stdin_fd = sys.stdin.fileno()
    lines = _LineReader(stdin_fd)
    cfg = json.loads(lines.next_line() or "{}")
    seconds = float(cfg["seconds"])
    devs: list[_Driven] = []
    try:
        for index, spec in zip(cfg["indices"], cfg["devices"], strict=True):
            devs.append(_Driven(index, spec, cfg))
    except (FrontendError, OSError, SoakError) as err:
        _emit({"type": "fatal", "error": f"connecting: {err}"})
        return 1
    _emit({"type": "ready"})
    go = (lines.next_line() or "").split()
    if not go or go[0] != "go":
        return 0
    # Ticks fall on whole seconds after the orchestrator's start time (CLOCK_MONOTONIC is the
    # same clock in every process), so the frontends' seconds line up.
    t0 = float(go[1]) if len(go) > 1 else time.monotonic()
    ep = select.epoll()
    by_fd: dict[int, tuple[_Driven, bool]] = {}
    for d in devs:
        by_fd[d.fq.call_fd] = (d, True)
        by_fd[d.client.frontend.sock.fileno()] = (d, False)
        ep.register(d.fq.call_fd, select.EPOLLIN)
        ep.register(d.client.frontend.sock.fileno(), select.EPOLLIN)
    ep.register(stdin_fd, select.EPOLLIN)
    os.set_blocking(stdin_fd, False)
    for d in devs:
        d.start()
    clock = time.monotonic
    last_tick = clock()
    end = t0 + seconds
    next_tick = t0 + 1.0
    last = [0] * len(devs)
    running = True
    drain_deadline = 0.0
    maxevents = len(by_fd) + 1

    def in_flight() -> int:
        return sum(d.queue.in_flight for d in devs if d.alive)

    while True:
        now = clock()
        if running:
            timeout = max(0.0, min(next_tick, end) - now)
        else:
            if not in_flight() or now > drain_deadline:
                break
            timeout = 0.1
        for fd, _ in ep.poll(timeout, maxevents):
            if fd == stdin_fd:
                # "stop" (or the orchestrator went away): end the run now.
                with contextlib.suppress(BlockingIOError):
                    if not lines.feed():
                        ep.unregister(stdin_fd)
                    end = min(end, clock())
                continue
            d, is_call = by_fd[fd]
            if not d.alive:
                continue
            try:
                if is_call:
                    d.on_call(running)
                else:
                    d.client.frontend.check_alive()
            except (FrontendError, OSError) as err:
                d.alive = False
                d.errors.append(f"{d.id}: {err}")
                ep.unregister(d.fq.call_fd)
                ep.unregister(d.client.frontend.sock.fileno())
        now = clock()
        if running and now >= next_tick:
            # Second k ends at t0 + k + 1. A frontend that was not scheduled for longer than a
            # second reports one longer tick, numbered by the last second it closes.
            whole = int(now - t0)
            counts = [d.done for d in devs]
            _emit(
                {
                    "type": "tick",
                    "k": whole - 1,
                    "a": last_tick,
                    "b": now,
                    "d": [c - p for c, p in zip(counts, last, strict=True)],
                }
            )
            last = counts
            last_tick = now
            next_tick = t0 + whole + 1.0
        if running and now >= end:
            running = False
            drain_deadline = now + 30.0
    stuck = in_flight()
    _emit(
        {
            "type": "drained",
            "stuck": stuck,
            "done": [d.done for d in devs],
            "reads": sum(d.reads for d in devs),
            "writes": sum(d.writes for d in devs),
            "mismatches": sum(d.mismatches for d in devs),
            "errors": sum(len(d.errors) for d in devs),
            "error_samples": [e for d in devs for e in d.errors if e][:10],
        }
    )
    os.set_blocking(stdin_fd, True)
    while lines.next_line() not in ("close", None):  # the orchestrator measured the backends
        pass
    checked = bad = 0
    for d in devs:
        c, b = d.verify_image()
        checked += c
        bad += b
        d.client.close()
    ep.close()
    _emit({"type": "done", "checked": checked, "bad": bad})
    return 0


# -- orchestrator --------------------------------------------------------------------------


class _Frontend:
    """A frontend process and the JSON lines it wrote."""

    def __init__(self, cfg: dict[str, Any], log: Path) -> None:
        self.log = log
        with log.open("wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pvbus.bench.soak"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=logf,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads here)
            )
        self.indices: list[int] = cfg["indices"]
        self.buf = b""
        self.send(json.dumps(cfg))

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def read_messages(self) -> list[dict[str, Any]]:
        """What arrived (call when stdout is readable); raises SoakError at EOF."""
        data = os.read(self.stdout.fileno(), 1 << 16)
        if not data:
            tail = self.log.read_text(errors="replace").strip()[-800:]
            raise SoakError(f"a frontend process exited ({self.proc.wait()}): {tail}")
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        pending: list[dict[str, Any]] = []
        while True:
            for msg in pending:
                if msg["type"] == "fatal":
                    raise SoakError(f"frontend: {msg['error']}")
                if msg["type"] == kind:
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise SoakError(f"no {kind!r} from a frontend process in {timeout:g} s")
            ready, _, _ = select.select([self.stdout], [], [], left)
            pending = self.read_messages() if ready else []

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        _terminate(self.proc, 10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _shm_dir() -> Path:
    base = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="pvbus-soak-", dir=base if base.is_dir() else None))


def _median(values: list[int] | list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    try:
        old = [signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)]
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_soak(job: SoakJob, progress: Callable[[str], None] | None = None) -> SoakReport:
    """Run ``job`` and return its report. Everything it created is removed, also on Ctrl-C
    (the report then says ``interrupted``) and on SIGTERM."""
    say = progress or (lambda _msg: None)
    workdir = _shm_dir()
    backends: _DaemonBackends | _ProcessBackends | None = None
    frontends: list[_Frontend] = []
    with _sigterm_as_interrupt():
        try:
            if job.processes:
                backends = _ProcessBackends(workdir)
            else:
                backends = _DaemonBackends(workdir, job.api_socket)
            return _run(job, workdir, backends, frontends, say)
        finally:
            # A second Ctrl-C must not leave devices, a daemon or images behind.
            with _signals_ignored():
                for fe in frontends:
                    fe.close()
                if backends is not None:
                    backends.close()
                shutil.rmtree(workdir, ignore_errors=True)


def _run(
    job: SoakJob,
    workdir: Path,
    backends: _DaemonBackends | _ProcessBackends,
    frontends: list[_Frontend],
    say: Callable[[str], None],
) -> SoakReport:
    n = job.devices
    report = SoakReport(
        mode=backends.mode,
        devices=n,
        seconds=job.seconds,
        iodepth=job.iodepth,
        bs=job.bs,
        read_pct=job.read_pct,
        frontends=job.frontend_count,
        rss_limit_per_process=job.max_rss_growth,
        daemon_pid=backends.daemon_pid,
    )
    prefix = f"soak{os.getpid()}-" if job.api_socket is not None else "soak"
    say(f"creating {n} images of {job.image_size >> 10} KiB in {workdir}")
    images = []
    for i in range(n):
        image = workdir / f"disk{i}.img"
        with image.open("wb") as f:
            f.truncate(job.image_size)
        images.append(image)
    say(f"starting {n} blk backends ({backends.mode})")
    devs = [backends.add(i, images[i], prefix) for i in range(n)]
    if isinstance(backends, _ProcessBackends):
        backends.wait_ready(devs)
    pids = [d.pid for d in devs]
    daemon_pid = backends.daemon_pid
    report.fds_idle_start = [fd_count(p) for p in pids]

    # Frontends: devices dealt out round-robin.
    count = job.frontend_count
    cfg_base = {
        "seconds": job.seconds,
        "iodepth": job.iodepth,
        "bs": job.bs,
        "read_pct": job.read_pct,
        "seed": job.seed,
    }
    for k in range(count):
        indices = list(range(k, n, count))
        cfg = {
            **cfg_base,
            "indices": indices,
            "devices": [asdict(devs[i]) for i in indices],
        }
        frontends.append(_Frontend(cfg, workdir / f"frontend{k}.log"))
    say(f"connecting {count} frontend processes")
    for fe in frontends:
        fe.expect("ready", 120)
    report.rss_initial = sum(proc_memory(p)[0] for p in pids)

    # Run.
    cpu = _CpuAccount(pids, [fe.proc.pid for fe in frontends], daemon_pid)
    report.load_average = [round(x, 2) for x in os.getloadavg()]
    # Samples of every backend's (ran, run-queue wait) in ns, about once a second.
    sched: list[tuple[float, list[tuple[int, int]]]] = []
    cells: list[list[tuple[int, float, float, int]]] = [[] for _ in range(n)]  # (k, a, b, done)
    rows: dict[int, dict[int, int]] = {}  # second -> device -> completed
    latest = [-1] * count  # last second each frontend reported
    t0 = time.monotonic()
    sched.append((t0, [_schedstat(p) for p in pids]))
    for fe in frontends:
        fe.send(f"go {t0!r}")
    next_sched = t0 + 1.0
    warm_at = t0 + job.warmup_seconds
    baseline_taken = False
    anon_start: list[int] = []
    drained: dict[int, dict[str, Any]] = {}
    next_sample = t0
    last_line = -1
    by_stdout = {fe.stdout.fileno(): k for k, fe in enumerate(frontends)}
    try:
        while len(drained) < count:
            ready, _, _ = select.select(list(by_stdout), [], [], 0.2)
            for fd in ready:
                k = by_stdout[fd]
                for msg in frontends[k].read_messages():
                    if msg["type"] == "tick":
                        second = int(msg["k"])
                        row = rows.setdefault(second, {})
                        for pos, delta in enumerate(msg["d"]):
                            i = frontends[k].indices[pos]
                            row[i] = delta
                            cells[i].append((second, float(msg["a"]), float(msg["b"]), delta))
                        latest[k] = second
                    elif msg["type"] == "drained":
                        drained[k] = msg
                    elif msg["type"] == "fatal":
                        raise SoakError(f"frontend: {msg['error']}")
            now = time.monotonic()
            if not baseline_taken and now >= warm_at:
                baseline_taken = True
                backends.touch()
                report.fds_start = [fd_count(p) for p in pids]
                if daemon_pid:
                    report.daemon_fds_start = fd_count(daemon_pid)
                    report.daemon_rss_start = proc_memory(daemon_pid)[0]
                mem = [proc_memory(p) for p in pids]
                anon_start = [a for _, a in mem]
                report.rss_start = sum(r for r, _ in mem)
                report.rss_anon_start = sum(anon_start)
            if now >= next_sched:
                next_sched = now + 1.0
                sched.append((now, [_schedstat(p) for p in pids]))
            if now >= next_sample:
                next_sample += 5.0
                mem = [proc_memory(p) for p in pids]
                report.rss_series.append(
                    (round(now - t0, 1), sum(r for r, _ in mem), sum(a for _, a in mem))
                )
            while last_line < min(latest):
                last_line += 1
                if last_line not in rows:
                    continue
                values = sorted(rows[last_line].values())
                say(
                    f"{last_line + 1:5d}/{int(job.seconds)} s  {sum(values):7d} req/s  "
                    f"per device min {values[0]} median {_median(values):.0f} max {values[-1]}  "
                    f"starved {sum(1 for v in values if v == 0)}  "
                    f"RSS {report.rss_series[-1][1] / _MiB:.0f} MiB"
                )
    except KeyboardInterrupt:
        report.interrupted = True
        say("interrupted: stopping the frontends")
        for fe in frontends:
            fe.send("stop")
        for k, fe in enumerate(frontends):
            if k not in drained:
                with contextlib.suppress(SoakError):
                    drained[k] = fe.expect("drained", 40)

    # The end, still connected: the same state as the baseline.
    cpu.finish(report)
    report.load_average += [round(x, 2) for x in os.getloadavg()]
    backends.touch()
    if baseline_taken:
        report.fds_end = [fd_count(p) for p in pids]
        if daemon_pid:
            report.daemon_fds_end = fd_count(daemon_pid)
            report.daemon_rss_end = proc_memory(daemon_pid)[0]
        mem = [proc_memory(p) for p in pids]
        report.rss_end = sum(r for r, _ in mem)
        report.rss_anon_end = sum(a for _, a in mem)
        report.rss_anon_growth_max = max(
            (a - s for (_, a), s in zip(mem, anon_start, strict=True)), default=0
        )
        report.rss_series.append(
            (round(time.monotonic() - t0, 1), report.rss_end, report.rss_anon_end)
        )
    done = [0] * n
    for k, msg in drained.items():
        for pos, value in enumerate(msg["done"]):
            done[frontends[k].indices[pos]] = value
        report.reads += msg["reads"]
        report.writes += msg["writes"]
        report.read_mismatches += msg["mismatches"]
        report.errors += msg["errors"] + msg["stuck"]
        report.error_samples += msg["error_samples"]
        if msg["stuck"]:
            report.error_samples.append(f"{msg['stuck']} requests never completed")
    report.requests = sum(done)
    report.per_device_total = {devs[i].id: done[i] for i in range(n)}
    if isinstance(backends, _DaemonBackends):
        report.stats_mismatches = _stats_mismatches(backends, devs, done)

    # Disconnect, check the images, and the idle backends' fds.
    for fe in frontends:
        fe.send("close")
    for fe in frontends:
        with contextlib.suppress(SoakError):
            msg = fe.expect("done", 120)
            report.blocks_checked += msg["checked"]
            report.image_mismatches += msg["bad"]
    report.fds_idle_end = _settled_fds(pids, report.fds_idle_start)

    sched.append((time.monotonic(), [_schedstat(p) for p in pids]))
    _summarize(report, rows, cells, devs, sched)
    _judge(report, job, baseline_taken)
    return report


def _stats_mismatches(backends: _DaemonBackends, devs: list[_Backend], done: list[int]) -> int:
    """Devices whose worker counted other than the frontend completed (counters are published
    every 20 ms, so wait a little for the last ones)."""
    deadline = time.monotonic() + 2.0
    while True:
        counted = backends.requests()
        bad = sum(1 for d, n in zip(devs, done, strict=True) if counted.get(d.id) != n)
        if not bad or time.monotonic() > deadline:
            return bad
        time.sleep(0.05)


def _settled_fds(pids: list[int], want: list[int], timeout: float = 5.0) -> list[int]:
    """fd counts once the backends handled the disconnects (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [fd_count(p) for p in pids]
        if counts == want or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def _summarize(
    report: SoakReport,
    rows: dict[int, dict[int, int]],
    cells: list[list[tuple[int, float, float, int]]],
    devs: list[_Backend],
    sched: list[tuple[float, list[tuple[int, int]]]],
) -> None:
    n = len(devs)
    report.measured_seconds = len(rows)
    counts = [c[3] for dev in cells for c in dev]
    report.device_seconds = len(counts)
    report.max_tick_seconds = round(max((c[2] - c[1] for d in cells for c in d), default=0.0), 3)
    if counts:
        report.second_min = min(counts)
        report.second_median = _median(counts)
        report.second_max = max(counts)
    rates = [
        sum(c[3] for c in dev) / span
        for dev in cells
        if (span := sum(c[2] - c[1] for c in dev)) > 0
    ]
    if rates:
        report.rate_min = min(rates)
        report.rate_median = _median(rates)
        report.rate_max = max(rates)
    for second in sorted(rows):
        row = rows[second]
        if len(row) == n:
            report.per_second_total.append(sum(row.values()))
            report.per_second_min.append(min(row.values()))
    waits = [
        (w1 - w0) / (t1 - t0)
        for (t0, s0), (t1, s1) in itertools.pairwise(sched)
        if t1 > t0
        for (_, w0), (_, w1) in zip(s0, s1, strict=True)
    ]
    report.backend_wait_median_ms = round(_median(waits) / 1e6, 1)
    report.backend_wait_max_ms = round(max(waits, default=0) / 1e6, 1)
    times = [t for t, _ in sched]
    starved: set[int] = set()
    for i, dev in enumerate(cells):
        for second, a, b, done in dev:
            if done:
                continue
            starved.add(i)
            report.starved_device_seconds += 1
            # The backend's scheduling in the sampled window around the starved tick.
            lo = max(0, bisect.bisect_right(times, a) - 1)
            hi = min(len(times) - 1, bisect.bisect_left(times, b))
            window = times[hi] - times[lo]
            ran = (sched[hi][1][i][0] - sched[lo][1][i][0]) / 1e6
            waited = (sched[hi][1][i][1] - sched[lo][1][i][1]) / 1e6
            if window > 0 and waited >= 500 * window:
                report.starved_waiting_for_cpu += 1
            if len(report.starved_cells) < 200:
                report.starved_cells.append(
                    {
                        "device": devs[i].id,
                        "second": second,
                        "length_s": round(b - a, 3),
                        "window_s": round(window, 3),
                        "ran_ms": round(ran, 1),
                        "waited_ms": round(waited, 1),
                    }
                )
    report.starved_cells.sort(key=lambda c: (c["second"], c["device"]))
    report.starved_devices = [devs[i].id for i in sorted(starved)]


def _judge(report: SoakReport, job: SoakJob, baseline_taken: bool) -> None:
    fail = report.failures.append
    if report.interrupted:
        fail("interrupted")
    if report.measured_seconds == 0:
        fail("no complete second was measured")
    if report.starved_device_seconds:
        fail(
            f"starvation: {report.starved_device_seconds} device-seconds without progress "
            f"({', '.join(report.starved_devices[:8])})"
        )
    idle = [d for d, t in report.per_device_total.items() if t == 0]
    if idle:
        fail(f"devices that completed nothing: {', '.join(idle[:8])}")
    if report.errors:
        fail(f"{report.errors} request errors")
    if report.read_mismatches:
        fail(f"{report.read_mismatches} reads returned other data than last written")
    if report.image_mismatches:
        fail(f"{report.image_mismatches} image blocks differ from what was written")
    if report.stats_mismatches:
        fail(f"{report.stats_mismatches} devices' request counters differ from the frontend's")
    if not baseline_taken:
        return
    if report.fds_end != report.fds_start:
        grew = sum(1 for s, e in zip(report.fds_start, report.fds_end, strict=True) if s != e)
        fail(f"fd counts changed in {grew} backends while connected")
    if report.fds_idle_end != report.fds_idle_start:
        grew = sum(
            1 for s, e in zip(report.fds_idle_start, report.fds_idle_end, strict=True) if s != e
        )
        fail(f"fd counts changed in {grew} idle backends (before connect vs after disconnect)")
    if report.daemon_pid and report.daemon_fds_end != report.daemon_fds_start:
        fail(f"daemon fds {report.daemon_fds_start} -> {report.daemon_fds_end}")
    if report.rss_anon_growth_max > job.max_rss_growth:
        fail(
            f"backend memory grew: RssAnon +{report.rss_anon_growth_max >> 10} KiB in one "
            f"process (limit {job.max_rss_growth >> 10} KiB)"
        )


# -- report --------------------------------------------------------------------------------


def _spread(values: list[int]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}..{hi}"


def format_report(r: SoakReport) -> str:
    """The end-of-run table."""

    def mib(v: int) -> str:
        return f"{v / _MiB:.1f} MiB"

    lines = [
        f"pvbus soak blk: {r.devices} devices ({r.mode}), {r.frontends} frontend processes, "
        f"{r.measured_seconds} s measured of {r.seconds:g}, iodepth {r.iodepth}, bs {r.bs}, "
        f"{r.read_pct}% reads",
        "",
        f"{'':34}{'min':>10}{'median':>10}{'max':>10}",
        f"{'requests/s per device (average)':34}{r.rate_min:10.1f}{r.rate_median:10.1f}"
        f"{r.rate_max:10.1f}",
        f"{'requests in one device-second':34}{r.second_min:10d}{r.second_median:10.1f}"
        f"{r.second_max:10d}",
        f"{'all devices, requests/s':34}{min(r.per_second_total, default=0):10d}"
        f"{_median(r.per_second_total):10.0f}{max(r.per_second_total, default=0):10d}",
        "",
        f"starved device-seconds   {r.starved_device_seconds} of {r.device_seconds}"
        f"  (longest frontend tick {r.max_tick_seconds:.2f} s)",
        f"requests                 {r.requests} ({r.reads} reads verified, {r.writes} writes)",
        f"errors                   {r.errors}",
        f"data mismatches          reads {r.read_mismatches}, image blocks {r.image_mismatches}"
        f" of {r.blocks_checked}",
    ]
    if r.stats_mismatches is not None:
        lines.append(f"daemon counters differ   {r.stats_mismatches} devices")
    lines += [
        f"backend RSS (sum)        connected {mib(r.rss_initial)}, after warm-up "
        f"{mib(r.rss_start)}, end {mib(r.rss_end)} ({(r.rss_end - r.rss_start) / _MiB:+.1f})",
        f"backend RssAnon (sum)    {mib(r.rss_anon_start)} -> {mib(r.rss_anon_end)} "
        f"({(r.rss_anon_end - r.rss_anon_start) / _MiB:+.2f}); most in one process "
        f"{r.rss_anon_growth_max / 1024:+.0f} KiB (limit {r.rss_limit_per_process >> 10} KiB)",
        f"fds per backend          connected {_spread(r.fds_start)} -> "
        f"{_spread(r.fds_end)}; idle {_spread(r.fds_idle_start)} -> {_spread(r.fds_idle_end)}",
    ]
    per_req = r.backend_cpu_seconds / r.requests * 1e6 if r.requests else 0.0
    lines += [
        f"backend CPU per request  {per_req:.0f} us",
        f"CPU (% of the machine)   backends {r.cpu_backends_pct}, frontends "
        f"{r.cpu_frontends_pct}, daemon {r.cpu_daemon_pct}, other processes "
        f"{r.cpu_other_pct}, steal {r.cpu_steal_pct}; load average "
        f"{' -> '.join(f'{x:.1f}' for x in r.load_average[::3])}",
        f"backend run-queue wait   per second median {r.backend_wait_median_ms} ms, max "
        f"{r.backend_wait_max_ms} ms",
    ]
    if r.starved_device_seconds:
        lines.append(
            f"starved device-seconds whose backend was runnable but waiting for a CPU for at "
            f"least half the time around them: {r.starved_waiting_for_cpu} of "
            f"{r.starved_device_seconds}"
        )
        for c in r.starved_cells[:8]:
            lines.append(
                f"  {c['device']} second {c['second']}: {c['length_s']:.2f} s without progress; "
                f"in {c['window_s']:.1f} s around it the backend ran {c['ran_ms']:.0f} ms and "
                f"waited {c['waited_ms']:.0f} ms"
            )
    if r.daemon_pid:
        lines.append(
            f"daemon (pid {r.daemon_pid})     fds {r.daemon_fds_start} -> {r.daemon_fds_end}, "
            f"RSS {mib(r.daemon_rss_start)} -> {mib(r.daemon_rss_end)}"
        )
    lines.append("")
    if r.ok:
        lines.append("PASS")
    else:
        lines += [f"FAIL: {f}" for f in r.failures]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_frontend_main())
