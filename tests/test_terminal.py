"""The terminal relay of ``pvbus run``'s interactive shell, on real pipes, sockets and a pty."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pty
import socket
import termios
import threading
from collections.abc import Iterator

import pytest

from pvbus.vm.terminal import ESCAPE, TerminalRelay, raw_terminal, terminal_size


@dataclasses.dataclass
class Wires:
    """The relay's console socket and the guest's end; its terminal as two pipes."""

    console: socket.socket
    guest: socket.socket
    keys_r: int
    keys_w: int
    screen_r: int
    screen_w: int

    def relay(self) -> TerminalRelay:
        return TerminalRelay(self.console, self.keys_r, self.screen_w)


@pytest.fixture
def wired() -> Iterator[Wires]:
    console, guest = socket.socketpair()
    keys_r, keys_w = os.pipe()
    screen_r, screen_w = os.pipe()
    yield Wires(console, guest, keys_r, keys_w, screen_r, screen_w)
    for s in (console, guest):
        s.close()
    for fd in (keys_r, keys_w, screen_r, screen_w):
        with contextlib.suppress(OSError):
            os.close(fd)


def _run(relay: TerminalRelay, **kw: object) -> tuple[threading.Thread, list[str]]:
    why: list[str] = []
    t = threading.Thread(target=lambda: why.append(relay.run(**kw)))  # type: ignore[arg-type]
    t.start()
    return t, why


def test_bytes_flow_both_ways_and_escape_ends(wired: Wires) -> None:
    w = wired
    thread, why = _run(w.relay())
    w.guest.sendall(b"pvbus:~# ")
    assert os.read(w.screen_r, 100) == b"pvbus:~# "
    os.write(w.keys_w, b"echo hi\r")
    assert w.guest.recv(100) == b"echo hi\r"
    # Keys typed before the escape in the same read still reach the guest; nothing after it.
    os.write(w.keys_w, b"ls" + ESCAPE + b"rm -rf /\r")
    thread.join(5)
    assert why == ["escape"]
    assert w.guest.recv(100) == b"ls"
    w.guest.setblocking(False)
    with pytest.raises(BlockingIOError):
        w.guest.recv(100)


def test_console_hangup_ends(wired: Wires) -> None:
    w = wired
    thread, why = _run(w.relay())
    w.guest.sendall(b"Power down.\r\n")
    w.guest.shutdown(socket.SHUT_RDWR)
    thread.join(5)
    assert why == ["closed"]
    assert os.read(w.screen_r, 100) == b"Power down.\r\n"


def test_input_eof_keeps_output_and_keep_going_stops(wired: Wires) -> None:
    w = wired
    stop = threading.Event()
    relay = w.relay()
    thread, why = _run(relay, keep_going=lambda: not stop.is_set(), tick=0.05)
    os.write(w.keys_w, b"exit\r")
    os.close(w.keys_w)  # the terminal went away: the guest's answer still comes through
    assert w.guest.recv(100) == b"exit\r"
    w.guest.sendall(b"bye\r\n")
    assert os.read(w.screen_r, 100) == b"bye\r\n"
    assert thread.is_alive()
    stop.set()
    thread.join(5)
    assert why == ["stopped"]


def test_raw_terminal_on_a_pty_is_restored() -> None:
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON and before[3] & termios.ECHO
        with raw_terminal(slave):
            raw = termios.tcgetattr(slave)
            assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert termios.tcgetattr(slave) == before
        assert terminal_size(slave) is not None
    finally:
        os.close(master)
        os.close(slave)


def test_raw_terminal_and_size_leave_pipes_alone() -> None:
    r, w = os.pipe()
    try:
        with raw_terminal(r):
            pass
        assert terminal_size(r) is None
    finally:
        os.close(r)
        os.close(w)


def test_a_terminal_that_hangs_up_ends_input_and_output_cleanly(wired: Wires) -> None:
    w = wired
    master, slave = pty.openpty()
    os.close(slave)  # reading the master now fails with EIO, as when the terminal closes
    relay = TerminalRelay(w.console, master, w.screen_w)
    ticks = iter(range(3))
    try:
        assert relay.run(keep_going=lambda: next(ticks, None) is not None, tick=0.01) == "stopped"
    finally:
        os.close(master)
    os.close(w.screen_r)  # nobody reads the screen any more: writing to it fails
    w.guest.sendall(b"late output")
    assert TerminalRelay(w.console, w.keys_r, w.screen_w).run() == "closed"
