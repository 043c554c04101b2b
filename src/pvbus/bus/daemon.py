"""Run the bus daemon: the API on a Unix socket (mode 0600), structured log lines, clean exit.

uvicorn serves the app on a socket this module binds itself (uvicorn's own ``uds=`` would
make it 0666). SIGTERM or SIGINT stops the server; the app's lifespan then unplugs devices,
stops the VMs the bus started and every worker, and the API socket is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from pvbus.bus.api import create_app

__all__ = ["JsonFormatter", "bind_api_socket", "run_daemon"]

log = logging.getLogger("pvbus.bus")

_STD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and key != "color_message" and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def bind_api_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0600 from the start.

    A stale socket file is replaced; a live one (another daemon) is an OSError(EADDRINUSE).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.stat().st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink()
            else:
                raise OSError(errno.EADDRINUSE, f"a daemon is already listening on {path}")
            finally:
                probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def setup_logging(level: int = logging.INFO) -> None:
    """Structured (JSON lines) logging on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _Server(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM once it has shut down, which would kill the process
    before the API socket is removed; here a signal only asks the server to stop. A signal
    that arrives while the daemon starts (the socket may already exist) is kept and acted on
    once the server's handlers are in place."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.early_signals: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        if self.early_signals:
            self.handle_exit(self.early_signals[0], None)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


def run_daemon(api_socket: Path, run_dir: Path | None = None) -> int:
    """Serve the API until SIGTERM/SIGINT; returns the exit status."""
    run_dir = run_dir or api_socket.parent
    app = create_app(run_dir)
    config = uvicorn.Config(
        app,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=2,
        access_log=False,
    )
    server = _Server(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: server.early_signals.append(signum))
    sock = bind_api_socket(api_socket)
    log.info("pvbus daemon listening", extra={"api_socket": str(api_socket), "pid": os.getpid()})
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            api_socket.unlink()
        for sub in ("devices", "vms"):
            with contextlib.suppress(OSError):
                (run_dir / sub).rmdir()
        log.info("pvbus daemon stopped")
    return 0 if server.started or server.early_signals else 1
