"""The benchmark: short smoke runs against real backends (no timing assertions) and its helpers."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from pvbus.bench import BlkJob, cpu_seconds, parse_size, run_blk
from pvbus.bench.blk import RW_MODES
from pvbus.cli import bench as cli_bench
from pvbus.cli.main import main

QSD = shutil.which("qemu-storage-daemon")


def test_parse_size() -> None:
    assert parse_size("4k") == 4096
    assert parse_size("1M") == 1 << 20
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512") == 512
    for bad in ("", "x", "-1k", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_cpu_seconds_counts_this_process() -> None:
    before = cpu_seconds(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert cpu_seconds(os.getpid()) > before


def test_cpu_seconds_of_a_thread_heavy_process() -> None:
    """Threads' time counts too (qemu-storage-daemon does its I/O in a thread pool)."""
    before = cpu_seconds(os.getpid())

    def spin() -> None:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass

    t = threading.Thread(target=spin)
    t.start()
    t.join()
    assert cpu_seconds(os.getpid()) - before >= 0.04


def test_job_validation() -> None:
    assert cli_bench.RW_MODES == RW_MODES
    with pytest.raises(ValueError, match="rw"):
        BlkJob(rw="trim")
    with pytest.raises(ValueError, match="512"):
        BlkJob(bs=1000)
    with pytest.raises(ValueError, match="iodepth"):
        BlkJob(iodepth=0)


def _image(tmp_path: Path) -> Path:
    image = tmp_path / "bench.img"
    image.write_bytes(os.urandom(4 << 20))
    return image


def test_bench_blk_pvbus_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = _image(tmp_path)
    argv = ["bench", "blk", "--backend", "pvbus", "--image", str(image), "--seconds", "0.3"]
    assert main([*argv, "--iodepth", "1,4", "--rw", "randwrite", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    results = out["results"]
    assert [r["iodepth"] for r in results] == [1, 4]
    for r in results:
        assert r["backend"] == "pvbus" and r["rw"] == "randwrite"
        assert r["requests"] > 0 and r["iops"] > 0
        assert r["lat_p50_us"] <= r["lat_p99_us"]
        assert r["kicks_per_req"] > 0 and r["calls_per_req"] > 0
        assert r["backend_cpu_us_per_req"] >= 0
    assert out["ratios"] == []


def test_bench_blk_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    image = _image(tmp_path)
    png = tmp_path / "plot.png"
    argv = ["bench", "blk", "--backend", "pvbus", "--image", str(image), "--seconds", "0.2"]
    assert main([*argv, "--iodepth", "2,8", "--bs", "8k", "--plot", str(png)]) == 0
    out = capsys.readouterr()
    assert "IOPS" in out.out and "backend CPU us/req" in out.out
    assert "pvbus" in out.err  # progress
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
def test_bench_blk_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "new.img"  # created by the benchmark
    argv = ["bench", "blk", "--compare", "--image", str(image), "--size", "4M"]
    assert main([*argv, "--seconds", "0.3", "--iodepth", "4", "--rw", "read", "--json"]) == 0
    assert image.stat().st_size == 4 << 20
    out = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in out["results"]] == ["pvbus", "qsd"]
    (ratio,) = out["ratios"]
    assert ratio["iodepth"] == 4 and ratio["iops"] > 0


def test_bench_against_running_socket(tmp_path: Path) -> None:
    from pvbus.bench import managed_backend

    image = _image(tmp_path)
    with managed_backend("pvbus", image, num_queues=2) as backend:
        result = run_blk(
            str(backend.socket_path),
            BlkJob("read", 4096, 2, 0.3, num_queues=2, warmup=0.05),
            backend="x",
        )
    assert result.num_queues == 2 and result.requests > 0


def test_bench_notify(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    image = _image(tmp_path)
    argv = ["bench", "notify", "--backend", "pvbus", "--image", str(image)]
    assert main([*argv, "--round-trips", "300", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in out["results"]]
    assert names == ["eventfd ping-pong", "pvbus"]
    assert all(r["round_trips"] == 300 and r["p50_us"] > 0 for r in out["results"])
    assert out["ratio_to_floor_p50"]["pvbus"] > 0


def test_bench_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "blk"]) == 2
    assert "required" in capsys.readouterr().err
    assert main(["bench", "blk", "--backend", "pvbus"]) == 2
    assert "--image" in capsys.readouterr().err
    assert main(["bench", "blk", "--socket-path", str(tmp_path / "none.sock")]) == 2
    assert "cannot connect" in capsys.readouterr().err
    assert main(["bench", "blk", "--socket-path", "x", "--bs", "1000"]) == 2
    assert "512" in capsys.readouterr().err
