"""``pvbus soak blk``: the CI variant of the 64-device soak (8 devices, 8 s, through the CLI),
``--processes``, a running daemon, and that the checks can fail: a stopped backend is reported
as starvation, data changed under the backend as mismatches, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvbus.bench.soak import SoakJob, SoakReport, format_report, run_soak
from pvbus.bus.client import BusClient

CLI = [sys.executable, "-m", "pvbus.cli.main"]


def soak_cli(*args: str, timeout: float = 240) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [*CLI, "soak", "blk", "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, report, proc.stderr


def workdir_of(stderr: str) -> Path:
    """The /dev/shm directory the soak announced in its first progress line."""
    for line in stderr.splitlines():
        if line.startswith("creating "):
            return Path(line.rsplit(" in ", 1)[1])
    raise AssertionError(f"no workdir in {stderr!r}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pids_with(text: str) -> list[int]:
    """Processes whose command line contains ``text``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        out.append(int(entry))
            except OSError:
                pass
    return out


def test_ci_soak_eight_devices_through_the_daemon() -> None:
    """The CI variant of the documented soak: no starvation, fds flat, data intact."""
    status, r, stderr = soak_cli("--devices", "8", "--seconds", "8")
    assert r, stderr
    assert r["mode"] == "daemon"
    assert r["measured_seconds"] >= 6
    assert r["device_seconds"] == 8 * r["measured_seconds"]
    assert r["starved_device_seconds"] == 0, r["starved_cells"]
    assert len(r["per_device_total"]) == 8
    assert all(n > 0 for n in r["per_device_total"].values())
    assert r["requests"] == sum(r["per_device_total"].values())
    assert r["reads"] > 0 and r["writes"] > 0
    assert r["errors"] == 0 and r["error_samples"] == []
    assert r["read_mismatches"] == 0
    assert r["image_mismatches"] == 0 and r["blocks_checked"] > 0
    assert r["stats_mismatches"] == 0
    assert r["fds_start"] == r["fds_end"] and len(r["fds_start"]) == 8
    assert r["fds_idle_start"] == r["fds_idle_end"]
    assert r["daemon_fds_start"] == r["daemon_fds_end"] > 0
    assert r["rss_start"] > 0 and r["rss_end"] > 0
    assert r["failures"] == [] and r["ok"]
    assert status == 0
    # Everything it created is gone: images, the daemon and its workers.
    assert not workdir_of(stderr).exists()
    assert not alive(r["daemon_pid"])
    assert "s  " in stderr and "req/s" in stderr  # the progress lines


def test_processes_mode_reports_a_stopped_backend_as_starvation() -> None:
    """``--processes``: one ``pvbus serve blk`` per device; SIGSTOP one for ~2.5 s and its
    device-seconds without progress are counted, named, and fail the run."""
    lines: list[str] = []
    stopped = threading.Event()

    def progress(line: str) -> None:
        lines.append(line)
        if "2/" in line.split("s", 1)[0] and not stopped.is_set():
            stopped.set()
            workdir = next(ln for ln in lines if ln.startswith("creating ")).rsplit(" in ", 1)[1]
            (pid,) = pids_with(f"{workdir}/soak1.sock")
            threading.Thread(target=pause, args=(pid,), daemon=True).start()

    def pause(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(2.5)
        os.kill(pid, signal.SIGCONT)

    report = run_soak(
        SoakJob(devices=3, seconds=7, processes=True, frontends=1, warmup=1), progress
    )
    assert report.mode == "processes"
    assert stopped.is_set()
    assert report.starved_device_seconds >= 1
    assert report.starved_devices == ["soak1"]
    assert any(f.startswith("starvation:") for f in report.failures)
    assert not report.ok
    cells = report.starved_cells
    assert len(cells) == report.starved_device_seconds
    assert {c["device"] for c in cells} == {"soak1"}
    assert all(0 < c["length_s"] <= c["window_s"] for c in cells)
    # The other checks still pass: the device recovered and its data is intact.
    assert report.errors == 0 and report.read_mismatches == 0 and report.image_mismatches == 0
    assert report.fds_start == report.fds_end
    assert "FAIL: starvation" in format_report(report)
    assert report.stats_mismatches is None  # no daemon, no counters to compare


def test_data_changed_under_the_backend_is_a_mismatch() -> None:
    """Overwrite an image while it is driven: reads and the final check see it. (Reads only:
    writes would soon replace the garbage, and the model would agree with the image again.)"""
    workdir: list[Path] = []
    corrupted = threading.Event()

    def progress(line: str) -> None:
        if line.startswith("creating "):
            workdir.append(Path(line.rsplit(" in ", 1)[1]))
        elif "1/" in line.split("s", 1)[0] and not corrupted.is_set():
            with (workdir[0] / "disk0.img").open("r+b") as f:
                f.write(b"\xab" * (4 << 20))
            corrupted.set()

    report = run_soak(SoakJob(devices=2, seconds=4, frontends=1, warmup=1, read_pct=100), progress)
    assert corrupted.is_set()
    assert report.writes == 0 and report.reads > 0
    assert report.image_mismatches == (4 << 20) // 4096  # every block of disk0, none of disk1
    assert report.read_mismatches > 0
    assert any("image blocks differ" in f for f in report.failures)
    assert report.starved_device_seconds == 0
    assert not workdir[0].exists()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, BusClient]]:
    api = tmp_path / "api.sock"
    proc = subprocess.Popen(
        [*CLI, "daemon", "--api-socket", str(api)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not api.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.05)
    client = BusClient(api)
    try:
        yield api, client
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)


def test_a_running_daemon_is_used_and_left_as_it_was(
    daemon: tuple[Path, BusClient],
) -> None:
    api, client = daemon
    status, r, stderr = soak_cli("--devices", "2", "--seconds", "3", "--api-socket", str(api))
    assert status == 0, stderr
    assert r["mode"] == "daemon (existing)"
    assert r["starved_device_seconds"] == 0 and all(r["per_device_total"].values())
    assert r["stats_mismatches"] == 0
    assert client.devices() == []  # its devices were deleted; the daemon still runs
    events = [e["type"] for e in client.events()]
    assert events.count("DEVICE_CREATED") == events.count("DEVICE_DELETED") == 2


def test_ctrl_c_cleans_up_everything() -> None:
    proc = subprocess.Popen(
        [*CLI, "soak", "blk", "--devices", "3", "--seconds", "60", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None and proc.stdout is not None
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if "2/60 s" in line:
            break
    else:
        raise AssertionError("".join(seen))
    workdir = workdir_of("".join(seen))
    assert workdir.exists()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    r = json.loads(out)
    assert r["interrupted"] and "interrupted" in r["failures"]
    assert r["errors"] == 0 and r["read_mismatches"] == 0 and r["image_mismatches"] == 0
    assert not workdir.exists()
    assert not alive(r["daemon_pid"])
    assert not pids_with(str(workdir))


def test_sigterm_leaves_nothing_behind() -> None:
    """The same on SIGTERM, before the run even started (while devices are created)."""
    proc = subprocess.Popen(
        [*CLI, "soak", "blk", "--devices", "6", "--seconds", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = [proc.stderr.readline(), proc.stderr.readline()]
    assert seen[1].startswith("starting 6 blk backends"), seen
    workdir = workdir_of("".join(seen))
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not workdir.exists()
    deadline = time.monotonic() + 10
    while pids_with(str(workdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids_with(str(workdir))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "0"], "devices 0 is not in 1..1024"),
        (["--bs", "1000"], "block size 1000"),
        (["--iodepth", "16", "--image-size", "64k"], "hold at least 64 blocks"),
        (["--read-pct", "101"], "read percentage"),
        (["--seconds", "1"], "at least 2"),
        (["--api-socket", "/nonexistent/api.sock"], "no pvbus daemon on /nonexistent/api.sock"),
    ],
)
def test_bad_arguments_are_one_line_errors(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [*CLI, "soak", "blk", "--seconds", "2", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("pvbus: soak blk: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_report_round_trips_to_json_and_judges() -> None:
    report = SoakReport("daemon", 2, 10, 4, 4096, 50, 1, measured_seconds=10)
    assert report.ok and json.loads(json.dumps(report.as_dict()))["ok"] is True
    text = format_report(report)
    assert text.endswith("PASS") and "starved device-seconds   0 of 0" in text
