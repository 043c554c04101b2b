"""ConsoleClient against the pvbus console backend over vhost-user, with real socket ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvbus.devices.console import ConsoleConfig, ConsoleDevice, PortSpec, open_backend
from pvbus.frontend.console import PORT_READY, ConsoleClient, ConsoleClientError
from pvbus.testing import ServedDevice


class Served(ServedDevice):
    """A ConsoleDevice served on a Unix socket by an event loop thread."""

    device: ConsoleDevice

    def __init__(self, path: str, config: ConsoleConfig) -> None:
        backends = [open_backend(p.backend) for p in config.ports]
        super().__init__(ConsoleDevice(config, backends), path)


def connect_host(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(5)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return out


@pytest.fixture
def multi(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    config = ConsoleConfig(
        ports=(
            PortSpec(f"socket:{tmp_path / 'con.sock'}"),
            PortSpec(f"socket:{tmp_path / 'ctl.sock'}", "org.pvbus.ctl"),
            PortSpec(f"file:{tmp_path / 'log'}", "org.pvbus.log"),
        )
    )
    served = Served(str(tmp_path / "vhost.sock"), config)
    yield served, tmp_path
    served.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_single_port_echo_both_ways(tmp_path: Path, packed: bool) -> None:
    served = Served(
        str(tmp_path / "vhost.sock"), ConsoleConfig(ports=(PortSpec(f"socket:{tmp_path / 'c'}"),))
    )
    try:
        host = connect_host(tmp_path / "c")
        with ConsoleClient.connect(str(tmp_path / "vhost.sock"), packed=packed) as client:
            assert not client.multiport and client.ports[0].is_console
            client.write(0, b"guest says hi\n")
            assert recv_exactly(host, 14) == b"guest says hi\n"
            payload = os.urandom(100_000)
            host.sendall(payload)
            assert client.read(0, len(payload)) == payload
        host.close()
    finally:
        served.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_multiport_names_console_and_host_open(multi: tuple[Served, Path], packed: bool) -> None:
    _, tmp = multi
    host_ctl = connect_host(tmp / "ctl.sock")
    with ConsoleClient.connect(str(tmp / "vhost.sock"), packed=packed) as client:
        ports = client.wait_ready(names=["org.pvbus.ctl", "org.pvbus.log"])
        assert client.multiport and client.max_ports == 3
        client.wait_for(lambda: ports[0].is_console, "CONSOLE_PORT")
        assert ports[0].is_console and ports[0].name is None
        assert client.port("org.pvbus.ctl").id == 1
        # A log file is always there to write to.
        client.wait_for(lambda: client.port("org.pvbus.log").host_connected, "log open")
        client.wait_for(lambda: ports[1].host_connected, "host open on port 1")
        assert not ports[0].host_connected
        # Host input waits until the guest opens the port.
        host_ctl.sendall(b"early bird\n")
        client.open(1)
        assert client.read(1, 11) == b"early bird\n"
        client.write(1, b"pong\n")
        assert recv_exactly(host_ctl, 5) == b"pong\n"
        client.write(2, b"to the log\n")
        # The host peer of the console connects late: the guest hears PORT_OPEN.
        host_con = connect_host(tmp / "con.sock")
        client.wait_for(lambda: ports[0].host_connected, "host open on port 0")
        client.write(0, b"console line\n")
        assert recv_exactly(host_con, 13) == b"console line\n"
        host_con.close()
        client.wait_for(lambda: not ports[0].host_connected, "host close on port 0")
        client.emergency_write(ord("!"))
        host_con = connect_host(tmp / "con.sock")
        client.wait_for(lambda: ports[0].host_connected, "host reopen on port 0")
        client.write(0, b"again\n")
        assert recv_exactly(host_con, 6) == b"again\n"
        host_con.close()
    host_ctl.close()
    deadline = time.monotonic() + 5
    while (tmp / "log").read_bytes() != b"to the log\n":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_malformed_control_then_still_works(multi: tuple[Served, Path]) -> None:
    served, tmp = multi
    with ConsoleClient.connect(str(tmp / "vhost.sock")) as client:
        client.wait_ready()
        client.send_control(0, 0, 0, raw=b"\x01")
        client.send_control(77, PORT_READY, 1)
        client.send_control(0, 0xFFFF, 3)
        client.poll()
        client.open(1)
        host = connect_host(tmp / "ctl.sock")
        host.sendall(b"x")
        assert client.read(1, 1) == b"x"
        host.close()
    assert served.device.control_errors == 3


def test_read_timeout_is_a_clean_error(multi: tuple[Served, Path]) -> None:
    _, tmp = multi
    with ConsoleClient.connect(str(tmp / "vhost.sock")) as client:
        client.wait_ready()
        with pytest.raises(ConsoleClientError):
            client.read(1, 1, timeout=0.2)


def wait_listening(proc: subprocess.Popen[bytes], vhost: Path) -> None:
    """Until ``pvbus serve`` has created its socket (its stderr if it exits first)."""
    deadline = time.monotonic() + 15
    while not vhost.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_pvbus_serve_console_process(tmp_path: Path) -> None:
    vhost = tmp_path / "vhost.sock"
    argv = [sys.executable, "-m", "pvbus.cli.main", "serve", "console"]
    argv += ["--socket-path", str(vhost), "--port", f"socket:{tmp_path / 'c'}"]
    argv += ["--port", f"file:{tmp_path / 'log'},name=org.pvbus.log"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        wait_listening(proc, vhost)
        host = connect_host(tmp_path / "c")
        with ConsoleClient.connect(str(vhost)) as client:
            client.wait_ready()
            client.write(0, b"from the guest\n")
            assert recv_exactly(host, 15) == b"from the guest\n"
            host.sendall(b"from the host\n")
            assert client.read(0, 14) == b"from the host\n"
        host.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("source", ["file", "devnull"])
def test_stdio_port_on_a_file_or_dev_null(tmp_path: Path, source: str) -> None:
    """``pvbus serve console`` with stdin a regular file or /dev/null (what ``pvbus run``
    gives its backends): epoll refuses such fds, so the port reads them as always ready: the
    file's bytes reach the guest, /dev/null is a clean EOF, and output still goes to stdout."""
    vhost = tmp_path / "vhost.sock"
    stdin_path = tmp_path / "input"
    stdin_path.write_bytes(b"from a file\n" * 1000)
    out_path = tmp_path / "out"
    argv = [sys.executable, "-m", "pvbus.cli.main", "serve", "console", "--socket-path", str(vhost)]
    with (
        (stdin_path if source == "file" else Path(os.devnull)).open("rb") as stdin,
        out_path.open("wb") as stdout,
    ):
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    try:
        wait_listening(proc, vhost)
        with ConsoleClient.connect(str(vhost)) as client:
            client.wait_ready()
            if source == "file":
                assert client.read(0, 12 * 1000) == b"from a file\n" * 1000
            client.write(0, b"to stdout\n")
            deadline = time.monotonic() + 10
            while out_path.read_bytes() != b"to stdout\n":
                assert time.monotonic() < deadline, out_path.read_bytes()
                time.sleep(0.02)
        assert proc.poll() is None  # the backend is still serving
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
