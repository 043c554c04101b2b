"""Run commands in a bus-started guest through its shell port (``org.pvbus.shell``).

A guest the bus starts runs ``sh`` on a virtio-serial port whose host end is a Unix socket
(``shell_socket`` of the VM). :class:`GuestShell` writes one command at a time followed by an
``echo`` of a random marker and the status, and reads up to that marker.
"""

from __future__ import annotations

import secrets
import select
import socket
import time
from pathlib import Path
from types import TracebackType

__all__ = ["GuestShell", "GuestShellError"]


class GuestShellError(Exception):
    """The shell did not answer in time, or the VM went away."""


class GuestShell:
    """A connection to a guest's shell port."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(path))
        except OSError as err:
            self.sock.close()
            raise GuestShellError(f"cannot connect to {path}: {err.strerror}") from err
        self.timeout = timeout
        self._buf = b""
        self.run("true")  # wait until the guest's shell reads the port

    def run(self, command: str, timeout: float | None = None) -> tuple[int, str]:
        """Run ``command`` with ``sh``; return its exit status and combined output."""
        marker = "PVBUS-SHELL-" + secrets.token_hex(8)
        line = f"{command}\necho; echo {marker} $?\n".encode()
        deadline = time.monotonic() + (timeout or self.timeout)
        self.sock.sendall(line)
        end = marker.encode() + b" "
        while True:
            idx = self._buf.find(end)
            if idx >= 0:
                nl = self._buf.find(b"\n", idx)
                if nl >= 0:
                    status = int(self._buf[idx + len(end) : nl])
                    output = self._buf[:idx].decode(errors="replace")
                    self._buf = self._buf[nl + 1 :]
                    return status, output.removesuffix("\n")
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestShellError(f"no answer to {command!r} in time")
            ready, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if ready:
                data = self.sock.recv(65536)
                if not data:
                    raise GuestShellError("the guest's shell port closed")
                self._buf += data

    def check(self, command: str, timeout: float | None = None) -> str:
        """Like :meth:`run`, raising :class:`GuestShellError` unless the status is 0."""
        status, output = self.run(command, timeout)
        if status != 0:
            raise GuestShellError(f"{command!r} failed ({status}): {output.strip()[-200:]}")
        return output

    def close(self) -> None:
        """Disconnect (the guest's shell exits and waits for the next connection)."""
        self.sock.close()

    def __enter__(self) -> GuestShell:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
