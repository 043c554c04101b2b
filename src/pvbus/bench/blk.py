"""The block benchmark: a fixed queue depth of reads or writes through the userspace frontend.

Like ``fio --ioengine=libblkio --direct=1`` against a vhost-user-blk socket: ``iodepth``
requests are kept in flight on each queue with zero-copy guest buffers, each completion is
replaced at once, and kicks go out once per pass over the completions. Measured: IOPS,
throughput, completion latency percentiles, kicks and interrupts (calls) per request, and the
backend process's CPU time per request from /proc/PID/stat (SO_PEERCRED gives the pid) — the
number that does not depend on how fast this frontend is.
"""

from __future__ import annotations

import os
import random
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pvbus.frontend import BlockClient

RW_MODES = ("read", "write", "randread", "randwrite")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def parse_size(text: str) -> int:
    """``4k``, ``1M``, ``512`` -> bytes (binary units)."""
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    mult = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(number) * mult
    except ValueError:
        raise ValueError(f"bad size {text!r}") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


@dataclass(frozen=True, slots=True)
class BlkJob:
    """One benchmark run's parameters."""

    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 32
    seconds: float = 5.0
    num_queues: int = 1
    warmup: float = 0.5

    def __post_init__(self) -> None:
        if self.rw not in RW_MODES:
            raise ValueError(f"--rw must be one of {', '.join(RW_MODES)}")
        if self.bs % 512 or self.bs <= 0:
            raise ValueError(f"block size {self.bs} is not a positive multiple of 512")
        if not 1 <= self.iodepth <= 256:
            raise ValueError(f"iodepth {self.iodepth} is not in 1..256")
        if self.seconds <= 0:
            raise ValueError("seconds must be positive")


@dataclass(frozen=True, slots=True)
class BlkResult:
    """What one run measured (latencies in microseconds, CPU in microseconds per request)."""

    backend: str
    rw: str
    bs: int
    iodepth: int
    num_queues: int
    seconds: float
    requests: int
    iops: float
    mb_per_s: float
    lat_p50_us: float
    lat_p99_us: float
    kicks_per_req: float
    calls_per_req: float
    backend_cpu_us_per_req: float
    frontend_cpu_us_per_req: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(sorted_values: array[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _queue_size(iodepth: int) -> int:
    size = 8
    while size < 3 * iodepth:  # header, data and status descriptors per request
        size *= 2
    return size


def run_blk(
    socket_path: str,
    job: BlkJob,
    *,
    backend: str = "",
    progress: Callable[[float, int], None] | None = None,
) -> BlkResult:
    """Run ``job`` against the vhost-user-blk backend at ``socket_path``."""
    bs, depth = job.bs, job.iodepth
    memory = job.num_queues * (depth * (bs + 4096) + (1 << 20)) + (4 << 20)
    client = BlockClient.connect(
        socket_path,
        num_queues=job.num_queues,
        queue_size=_queue_size(depth),
        memory_size=memory,
    )
    try:
        return _run(client, job, backend or socket_path, progress)
    finally:
        client.close()


def _run(
    client: BlockClient,
    job: BlkJob,
    backend: str,
    progress: Callable[[float, int], None] | None,
) -> BlkResult:
    bs, depth = job.bs, job.iodepth
    capacity = client.capacity
    if capacity is None:
        raise ValueError("the backend has no config space: disk size unknown")
    blocks = capacity // bs
    if blocks < 1:
        raise ValueError(f"the disk ({capacity} bytes) is smaller than one block of {bs}")
    write = job.rw.endswith("write")
    rand = job.rw.startswith("rand")
    rng = random.Random(42)
    randrange = rng.randrange
    fill = os.urandom(bs)
    queues = client.queues
    frontend = client.frontend
    fqs = [q.fq for q in queues]
    next_block = [i * (blocks // len(queues)) for i in range(len(queues))]
    clock = time.perf_counter

    def offset_for(qi: int) -> int:
        if rand:
            return randrange(blocks) * bs
        block = next_block[qi]
        next_block[qi] = (block + 1) % blocks
        return block * bs

    # tag = (buffer, submit time); buffers are reused by the request that replaces them.
    for qi, q in enumerate(queues):
        for _ in range(depth):
            buf = client.alloc_buffer(bs)
            if write:
                buf.view[:] = fill
                q.submit_write(offset_for(qi), buf, (buf, clock()))
            else:
                q.submit_read(offset_for(qi), buf, (buf, clock()))
        q.kick()

    lat = array("d")
    start = clock()
    measure_from = start + min(job.warmup, job.seconds / 4)
    end = measure_from + job.seconds
    measuring = False
    done_count = 0
    kicks0 = calls0 = 0
    cpu0 = be0 = 0.0
    t0 = measure_from
    last_report = start
    pid = frontend.backend_pid
    stopping = False
    t1 = be1 = cpu1 = 0.0
    kicks = calls = 0
    in_flight = depth * len(queues)
    while in_flight:
        if not frontend.wait(fqs, 10.0):
            raise TimeoutError("no completion from the backend in 10 s")
        now = clock()
        if not measuring and now >= measure_from:
            measuring = True
            t0 = now
            kicks0 = sum(f.kicks for f in fqs)
            calls0 = sum(f.calls for f in fqs)
            cpu0 = time.process_time()
            be0 = cpu_seconds(pid)
        if now >= end and not stopping:
            # The window closes: what completes from here on is drained, not counted.
            stopping = True
            t1 = now
            be1 = cpu_seconds(pid)
            cpu1 = time.process_time()
            kicks = sum(f.kicks for f in fqs) - kicks0
            calls = sum(f.calls for f in fqs) - calls0
        for qi, q in enumerate(queues):
            q.fq.ack_calls()
            completed = q.reap()
            if not completed:
                continue
            now = clock()
            for c in completed:
                if c.status:
                    c.check()
                buf, submitted = c.tag
                if measuring and not stopping:
                    lat.append(now - submitted)
                    done_count += 1
                if stopping:
                    in_flight -= 1
                elif write:
                    q.submit_write(offset_for(qi), buf, (buf, now))
                else:
                    q.submit_read(offset_for(qi), buf, (buf, now))
            if not stopping:
                q.kick()
        if progress is not None and now - last_report >= 1.0:
            last_report = now
            progress(now - start, done_count)
    elapsed = t1 - t0 if measuring else 0.0
    n = max(done_count, 1)
    ordered = array("d", sorted(lat))
    return BlkResult(
        backend=backend,
        rw=job.rw,
        bs=bs,
        iodepth=depth,
        num_queues=len(queues),
        seconds=round(elapsed, 3),
        requests=done_count,
        iops=done_count / elapsed if elapsed else 0.0,
        mb_per_s=done_count * bs / elapsed / 1e6 if elapsed else 0.0,
        lat_p50_us=_percentile(ordered, 0.50) * 1e6,
        lat_p99_us=_percentile(ordered, 0.99) * 1e6,
        kicks_per_req=kicks / n,
        calls_per_req=calls / n,
        backend_cpu_us_per_req=(be1 - be0) / n * 1e6,
        frontend_cpu_us_per_req=(cpu1 - cpu0) / n * 1e6,
    )
