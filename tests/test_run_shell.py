"""``pvbus run`` with no command: an interactive shell on a real guest's hvc0, through a pty.

The test is the user's terminal: a pseudo-terminal of 40x120 whose keys it types and whose
screen it reads. ``exit`` powers the guest off and ends ``pvbus run``; the escape key (Ctrl-])
ends it while the guest is busy. Without a terminal, stdin is the script to run.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest

from pvbus.vm import GuestImage
from pvbus.vm.terminal import ESCAPE

pytestmark = pytest.mark.vm


class Terminal:
    """``pvbus run`` on a pty of ``rows`` x ``cols``; :meth:`expect` reads its screen."""

    def __init__(self, rows: int = 40, cols: int = 120) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pvbus.cli.main", "run", "--timeout", "180"],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.screen = b""

    def expect(self, text: bytes, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the screen: {self.screen[-600:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    self.screen += os.read(self.master, 4096)
                except OSError:  # the other side closed
                    assert text in self.screen, self.screen[-600:]

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def leftovers(self) -> bool:
        """Whether any process of the session (QEMU, backends) outlived ``pvbus run``."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def term(guest: GuestImage) -> Iterator[Terminal]:
    t = Terminal()
    yield t
    t.close()


def test_shell_on_hvc0_until_exit(term: Terminal) -> None:
    term.expect(b"Ctrl-] quits")
    term.expect(b"pvbus:~# ")
    # The guest's tty has the host terminal's size and type; keys and output go both ways.
    term.type(b"echo $((6 * 7)); stty size; echo $TERM; tty\r")
    term.expect(b"/dev/hvc0")
    out = term.screen.split(b"$TERM; tty")[-1]
    assert b"42" in out and b"40 120" in out and b"xterm" in out
    term.type(b"exit\r")
    assert term.proc.wait(60) == 0
    term.expect(b"guest powered off")
    assert not term.leftovers()


def test_escape_key_leaves_a_busy_guest(term: Terminal) -> None:
    term.expect(b"pvbus:~# ")
    term.type(b"echo busy; sleep 600\r")
    term.expect(b"busy\r\n")
    term.type(ESCAPE)
    assert term.proc.wait(30) == 0
    term.expect(b"escape: guest stopped")
    assert not term.leftovers()


def test_script_on_stdin_runs_as_the_command(guest: GuestImage) -> None:
    # Not a terminal: stdin is the script, run like ``pvbus run -- SCRIPT`` (status and all).
    out = subprocess.run(
        [sys.executable, "-m", "pvbus.cli.main", "run", "--timeout", "180"],
        input=b"echo piped-$((40 + 2))\nexit 3\n", capture_output=True, timeout=240, check=False,
    )  # fmt: skip
    assert out.returncode == 3, out.stderr[-600:]
    assert out.stdout == b"piped-42\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_stops_the_guest_and_its_backends(term: Terminal, sig: int) -> None:
    # A closed terminal (SIGHUP) or a kill (SIGTERM) must not leave QEMU or backends behind.
    term.expect(b"pvbus:~# ")
    term.proc.send_signal(sig)
    assert term.proc.wait(30) == 128 + sig
    assert not term.leftovers()
