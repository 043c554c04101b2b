"""The guest's vsock-exec helper: a valid ELF that runs here, and bytes that match its listing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pvbus.vm._vsock_helper import ASSEMBLY, CODE, EXIT_NO_VSOCK, helper_elf


@pytest.fixture
def helper(tmp_path: Path) -> Path:
    path = tmp_path / "vsock-exec"
    path.write_bytes(helper_elf())
    path.chmod(0o755)
    return path


def test_elf_header() -> None:
    elf = helper_elf()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1
    assert int.from_bytes(elf[18:20], "little") == 0x3E  # x86-64
    assert len(elf) == 64 + 56 + len(CODE) < 1024


@pytest.mark.parametrize(
    "args",
    [[], ["c"], ["x", "1", "2", "/bin/true"], ["c", "1", "2"]],
)
def test_bad_usage_exits_111_without_running_anything(helper: Path, args: list[str]) -> None:
    proc = subprocess.run([str(helper), *args], capture_output=True, timeout=10, check=False)
    assert proc.returncode == EXIT_NO_VSOCK
    assert proc.stdout == b""


@pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("objcopy") is None, reason="no binutils"
)
def test_code_matches_listing(tmp_path: Path) -> None:
    src = tmp_path / "v.s"
    src.write_text(ASSEMBLY)
    subprocess.run(["as", "--64", "-o", str(tmp_path / "v.o"), str(src)], check=True)
    subprocess.run(
        ["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "v.o"), str(tmp_path / "v")],
        check=True,
    )
    assert (tmp_path / "v").read_bytes() == CODE
    assert os.path.getsize(tmp_path / "v") == len(CODE)
