"""The user's terminal on a guest console: raw mode, an escape key, and a byte relay.

``pvbus run`` with no command gives an interactive shell on the guest's ``hvc0``. The console
port is a Unix socket on the host (pvbus's console device or QEMU's own ``virtconsole``);
:class:`TerminalRelay` copies the terminal's keys to it and its bytes to the terminal, with the
terminal in raw mode so that Ctrl-C, arrows and tab reach the guest's shell. The escape key
(Ctrl-], as in telnet and ``virsh console``) ends the session from the host side.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import termios
import tty
from collections.abc import Callable, Iterator

__all__ = ["ESCAPE", "ESCAPE_NAME", "TerminalRelay", "raw_terminal", "terminal_size"]

#: Ctrl-]: the byte that ends a session.
ESCAPE = b"\x1d"
ESCAPE_NAME = "Ctrl-]"


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Put ``fd`` in raw mode for the block if it is a terminal; restore it afterwards."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size(fd: int) -> tuple[int, int] | None:
    """``(rows, columns)`` of the terminal on ``fd``, or None if it is not one."""
    if not os.isatty(fd):
        return None
    size = os.get_terminal_size(fd)
    return size.lines, size.columns


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class TerminalRelay:
    """Copies bytes between a terminal (``in_fd``/``out_fd``) and a connected console socket.

    :meth:`run` returns why it ended: ``"escape"`` (the user pressed :data:`ESCAPE`),
    ``"closed"`` (the console's side hung up) or ``"stopped"`` (``keep_going`` said so; it is
    asked every ``tick`` seconds). If the input ends (the terminal went away), the output
    keeps flowing until one of those.
    """

    def __init__(
        self, console: socket.socket, in_fd: int = 0, out_fd: int = 1, escape: bytes = ESCAPE
    ) -> None:
        self.console = console
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.escape = escape

    def run(self, keep_going: Callable[[], bool] = lambda: True, tick: float = 0.2) -> str:
        console = self.console
        reading_input = True
        while True:
            watched: list[int | socket.socket] = [console]
            if reading_input:
                watched.append(self.in_fd)
            ready, _, _ = select.select(watched, [], [], tick)
            if console in ready:
                try:
                    data = console.recv(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    return "closed"
                try:
                    _write_all(self.out_fd, data)
                except OSError:  # the terminal is gone: nobody to show output to
                    return "closed"
            if self.in_fd in ready:
                try:
                    keys = os.read(self.in_fd, 4096)
                except OSError:  # EIO: the terminal hung up
                    keys = b""
                if not keys:
                    reading_input = False
                    continue
                keys, found, _ = keys.partition(self.escape)
                if keys:
                    try:
                        console.sendall(keys)
                    except (BrokenPipeError, ConnectionError):
                        return "closed"
                if found:
                    return "escape"
            if not ready and not keep_going():
                return "stopped"
