"""rng, console and vsock with real Linux guests (TCG) over PCI and virtio-mmio. Slow: ``vm``.

The console needs QEMU's generic vhost-user-device, which many QEMU builds (Debian's 10.0)
do not let users create: that test skips there.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from pvbus.vm import GuestImage, Vm, VmConfig, run_command
from pvbus.vm.devices import DeviceSpec, unsupported_reason

pytestmark = pytest.mark.vm


def test_command_output_comes_over_vsock(guest: GuestImage) -> None:
    # stdout of the command is a socket (vsock), not the virtio-serial port.
    result = run_command(
        VmConfig(accel="tcg", transport="mmio"),
        ["readlink /proc/$$/fd/1; echo err >&2; exit 5"],
        timeout=180,
        guest=guest,
    )
    assert result.status == 5
    lines = result.output.decode().splitlines()
    assert lines[0].startswith("socket:")
    assert "err" in lines


def test_serial_channel_still_works(guest: GuestImage) -> None:
    result = run_command(
        VmConfig(accel="tcg", command_channel="serial"),
        ["readlink /proc/$$/fd/1"],
        timeout=180,
        guest=guest,
    )
    assert result.status == 0
    assert result.output.startswith(b"/dev/vport")


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_guest_reads_1mib_from_hwrng(guest: GuestImage, transport: str) -> None:
    script = (
        "cat /sys/class/misc/hw_random/rng_current; "
        "dd if=/dev/hwrng bs=4096 count=256 2>/dev/null | wc -c; "
        "dd if=/dev/hwrng bs=4096 count=4 2>/dev/null | md5sum; "
        "dd if=/dev/hwrng bs=4096 count=4 2>/dev/null | md5sum"
    )
    cfg = VmConfig(accel="tcg", transport=transport, devices=(DeviceSpec.rng(),))
    result = run_command(cfg, [script], timeout=180, guest=guest)
    assert result.status == 0, result.output
    current, count, md5a, md5b = result.output.decode().split("\n")[:4]
    assert current.startswith("virtio_rng")
    assert int(count.strip()) == 1 << 20
    assert md5a != md5b


def _recv_until(sock: socket.socket, needle: bytes, timeout: float = 120) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(1)
    while needle not in data:
        assert time.monotonic() < deadline, data
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        assert chunk, data
        data += chunk
    return data


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_console_echo_both_ways(guest: GuestImage, tmp_path: Path, transport: str) -> None:
    con, ctl = tmp_path / "con.sock", tmp_path / "ctl.sock"
    spec = DeviceSpec.console(f"socket:{con}", f"socket:{ctl},name=org.pvbus.test")
    cfg = VmConfig(accel="tcg", transport=transport, devices=(spec,))
    reason = unsupported_reason(spec, transport, cfg.qemu)  # $PVBUS_QEMU picks another QEMU
    if reason is not None:
        pytest.skip(reason)
    script = (
        "for p in /sys/class/virtio-ports/*; do"
        ' [ "$(cat $p/name)" = org.pvbus.test ] && port=/dev/${p##*/}; done; '
        'echo "named port $port"; '
        # Each port stays open from the write to the read of the answer, as a program using
        # it would hold it: what arrives for a port nobody has open may be dropped (5.3.6.2).
        "exec 4<>/dev/hvc0; stty -echo -icanon <&4 2>/dev/null; "
        "echo from-guest-hvc0 >&4; "
        "head -n 1 <&4 | sed 's/^/hvc0 got: /'; "
        'exec 3<>"$port"; echo from-guest-port >&3; '
        "head -n 1 <&3 | sed 's/^/port got: /'"
    )
    (tmp_path / "vm").mkdir()
    with Vm(cfg, script, guest=guest, workdir=tmp_path / "vm") as vm:
        # The backend's sockets exist once the VM started: connect before the guest writes.
        hosts = []
        for path in (con, ctl):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            hosts.append(sock)
        seen: dict[str, bytes] = {}

        def host_side() -> None:
            seen["con"] = _recv_until(hosts[0], b"from-guest-hvc0")
            hosts[0].sendall(b"reply-hvc0\n")
            seen["ctl"] = _recv_until(hosts[1], b"from-guest-port")
            hosts[1].sendall(b"reply-port\n")

        t = threading.Thread(target=host_side, daemon=True)
        t.start()
        result = vm.wait(240)
        t.join(5)
        for sock in hosts:
            sock.close()
    out = result.output.decode()
    assert result.status == 0, out
    assert "named port /dev/vport" in out
    assert "hvc0 got: reply-hvc0" in out
    assert "port got: reply-port" in out
    assert b"from-guest-hvc0" in seen["con"]
    assert b"from-guest-port" in seen["ctl"]


def test_vsock_connections_both_ways(guest: GuestImage, tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_5000")
    listener.listen(1)
    listener.settimeout(240)
    script = (
        # A guest service on port 6000 (the host connects to it) ...
        "vsock-exec l 6000 /bin/sh -c 'read x; echo \"echo:$x\"' & "
        "echo guest-listening; "
        # ... and a guest client of host port 5000.
        "vsock-exec c 2 5000 /bin/sh -c 'echo from-guest; read x; echo \"host said $x\" >&2'; "
        "wait"
    )
    cfg = VmConfig(accel="tcg", devices=(DeviceSpec.vsock(uds, guest_cid=3),))
    replies: dict[str, bytes] = {}

    def host_server() -> None:
        conn, _ = listener.accept()
        replies["guest"] = _recv_until(conn, b"from-guest\n")
        conn.sendall(b"hello-guest\n")
        conn.close()

    def host_client() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            try:
                sock.connect(str(uds))
                sock.sendall(b"CONNECT 6000\nping\n")
                data = b""
                while b"\n" not in data:
                    chunk = sock.recv(100)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"OK "):
                    replies["ok"] = data
                    replies["echo"] = _recv_until(sock, b"echo:ping")
                    return
            except OSError:
                pass
            finally:
                sock.close()
            time.sleep(0.5)  # the guest is not listening yet: RST, try again

    threads = [threading.Thread(target=f, daemon=True) for f in (host_server, host_client)]
    for t in threads:
        t.start()
    result = run_command(cfg, [script], timeout=240, guest=guest)
    for t in threads:
        t.join(10)
    listener.close()
    out = result.output.decode()
    assert result.status == 0, out
    assert "host said hello-guest" in out
    assert replies["guest"] == b"from-guest\n"
    assert replies["ok"].startswith(b"OK ")
    assert b"echo:ping" in replies["echo"]
