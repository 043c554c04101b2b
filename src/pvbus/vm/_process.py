"""Backend processes that serve a vhost-user socket: start, wait until listening, stop."""

from __future__ import annotations

import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class BackendError(Exception):
    """A backend could not be started or did not create its socket."""


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class ServeProcess:
    """A backend process serving a vhost-user socket, with its log file."""

    socket_path: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 5) -> str:
        """The last lines the backend printed."""
        return _tail(self.log_path, lines)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def spawn_serving(
    argv: list[str], socket_path: Path, log_path: Path, what: str, timeout: float = 15.0
) -> subprocess.Popen[bytes]:
    """Start ``argv`` and wait until it listens on ``socket_path``; raise BackendError if not.

    Output goes to ``log_path`` (appended: a restarted backend keeps one log).
    """
    socket_path.unlink(missing_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while not _is_socket(socket_path):
        if proc.poll() is not None:
            raise BackendError(f"{what} exited ({proc.returncode}): {_tail(log_path, 1)}")
        if time.monotonic() > deadline:
            ServeProcess(socket_path, proc, log_path).stop()
            raise BackendError(f"{what} did not create {socket_path}")
        time.sleep(0.02)
    return proc
