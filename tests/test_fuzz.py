"""The fuzz targets run clean on a short budget (the 10^6-input campaigns are in
docs/reliability.md): libFuzzer reports no crash, no leak and no timeout."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="atheris not installed"
)


@pytest.mark.parametrize("target", ["messages", "rings", "packed-rings"])
def test_fuzz_target_short_campaign(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pvbus.cli.main",
            "fuzz",
            target,
            "--runs",
            "30000",
            "--corpus",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Done 30000 runs" in log
    assert (corpus / "seed-0").exists()  # seeded with valid inputs
    assert len(list(corpus.iterdir())) > 1  # and it found new coverage


def test_rings_target_faults_outside_guest_memory() -> None:
    """The guard pages are real: touching one kills the process (so the check is not assumed)."""
    code = (
        "import ctypes; from pvbus.testing.fuzz import GuardedGuest, PAGE\n"
        "g = GuardedGuest(); g.view[0] = 1; g.view[-1] = 1\n"
        "addr = ctypes.addressof(ctypes.c_char.from_buffer(g._area))\n"
        "ctypes.c_char.from_address(addr + PAGE - 1).value = b'x'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert result.returncode < 0  # killed by SIGSEGV
