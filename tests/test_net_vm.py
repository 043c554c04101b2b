"""Real Linux guests on pvbus virtio-net (TCG, slow: marked ``vm``).

* Two guests, one over PCI and one over virtio-mmio, on one ``pvbus switch``: they ping each
  other and copy 32 MiB with busybox nc; the checksums match.
* A guest pings the host over a tap in a network namespace the test creates.
* A guest reaches a host TCP service through passt (``pvbus serve net --stream``), which maps
  its gateway address to the host's loopback.

Link-local addresses only (169.254/16).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvbus.vm import GuestImage, RunResult, Vm, VmConfig

pytestmark = pytest.mark.vm


def qemu_net_args(
    transport: str, socket_path: Path, mac: str, queues: int = 1, *, packed: bool = False
) -> tuple[str, ...]:
    """QEMU options for a vhost-user virtio-net device served at ``socket_path``."""
    netdev = f"vhost-user,id=net0,chardev=net0chr,queues={queues}"
    device = "virtio-net-device" if transport == "mmio" else "virtio-net-pci"
    device += f",netdev=net0,mac={mac}" + (",packed=on" if packed else "")
    if queues > 1:
        device += f",mq=on{',vectors=' + str(2 * queues + 2) if transport == 'pci' else ''}"
    return (
        "-chardev",
        f"socket,id=net0chr,path={socket_path}",
        "-netdev",
        netdev,
        "-device",
        device,
    )


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        assert time.monotonic() < deadline
        time.sleep(0.02)


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def pvbus(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*prefix, sys.executable, "-m", "pvbus.cli.main", *args])


def run_vms(vms: list[Vm], timeout: float) -> list[RunResult]:
    """Start every VM, then wait for all of them at once."""
    results: dict[int, RunResult | BaseException] = {}

    def wait(i: int, vm: Vm) -> None:
        try:
            results[i] = vm.wait(timeout)
        except BaseException as err:
            results[i] = err

    for vm in vms:
        vm.start()
    threads = [threading.Thread(target=wait, args=(i, vm)) for i, vm in enumerate(vms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out: list[RunResult] = []
    for i in range(len(vms)):
        r = results[i]
        if isinstance(r, BaseException):
            raise r
        out.append(r)
    return out


UP = "ip link set eth0 up && ip addr add {ip}/16 dev eth0 && "
WAIT_PEER = (
    "i=0; until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do "
    "i=$((i+1)); [ $i -gt 60 ] && echo peer-unreachable && exit 3; done; "
    "ping -c 3 {peer} | grep -o '3 packets received'; "
)
SENDER = (
    UP.format(ip="169.254.7.1")
    + "dd if=/dev/urandom of=/tmp/data bs=1M count=32 2>/dev/null; "
    + "echo sent $(md5sum < /tmp/data); "
    + WAIT_PEER.format(peer="169.254.7.2")
    + "nc -l -p 5000 < /tmp/data"
)
RECEIVER = (
    UP.format(ip="169.254.7.2")
    + WAIT_PEER.format(peer="169.254.7.1")
    # stdin that never ends: busybox nc would half-close on EOF and the sender stop early
    + "mkfifo /tmp/hold; sleep 600 > /tmp/hold & "
    + "i=0; until nc 169.254.7.1 5000 < /tmp/hold > /tmp/got; do "
    + "i=$((i+1)); [ $i -gt 120 ] && exit 4; sleep 1; done; kill $!; "
    + "echo got $(md5sum < /tmp/got) $(wc -c < /tmp/got); "
    # VIRTIO_F_RING_PACKED (bit 34) as the guest's driver negotiated it
    + "echo ring-packed=$(cut -c35 /sys/class/net/eth0/device/features)"
)


def test_two_guests_over_switch_pci_and_mmio(guest: GuestImage, tmp_path: Path) -> None:
    """A split-ring guest on PCI sends 32 MiB to a packed-ring guest on virtio-mmio."""
    with processes() as procs:
        sw = tmp_path / "switch.sock"
        procs.append(pvbus("switch", "--socket-path", str(sw)))
        wait_for(sw, procs[-1])
        vms = []
        for name, transport, mac, script in (
            ("a", "pci", "52:54:00:07:00:01", SENDER),
            ("b", "mmio", "52:54:00:07:00:02", RECEIVER),
        ):
            sock = tmp_path / f"{name}-net.sock"
            procs.append(
                pvbus("serve", "net", "--socket-path", str(sock), "--switch", str(sw), "--mac", mac)
            )  # fmt: skip
            wait_for(sock, procs[-1])
            net = qemu_net_args(transport, sock, mac, packed=name == "b")
            config = VmConfig(transport=transport, accel="tcg", extra_args=net)
            (tmp_path / name).mkdir()
            vms.append(Vm(config, script, guest=guest, workdir=tmp_path / name))
        try:
            sender, receiver = run_vms(vms, timeout=240)
        finally:
            for vm in vms:
                vm.stop()
    a_out, b_out = sender.output.decode(), receiver.output.decode()
    assert sender.status == 0, a_out
    assert receiver.status == 0, b_out
    assert "3 packets received" in a_out and "3 packets received" in b_out
    sent = re.search(r"sent ([0-9a-f]{32})", a_out)
    got = re.search(r"got ([0-9a-f]{32})[ -]+(\d+)", b_out)
    assert sent and got, (a_out, b_out)
    assert got.group(2) == str(32 << 20)
    assert got.group(1) == sent.group(1)
    assert "ring-packed=1" in b_out


def test_guest_pings_host_over_tap(guest: GuestImage, tmp_path: Path, netns: str) -> None:
    ns = ("ip", "netns", "exec", netns)
    tap = "pvtap0"
    subprocess.run([*ns, "ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    subprocess.run([*ns, "ip", "addr", "add", "169.254.9.1/16", "dev", tap], check=True)
    subprocess.run([*ns, "ip", "link", "set", tap, "up"], check=True)
    with processes() as procs:
        sock = tmp_path / "net.sock"
        mac = "52:54:00:09:00:02"
        procs.append(
            pvbus("serve", "net", "--socket-path", str(sock), "--tap", tap, "--mac", mac,
                  prefix=ns)
        )  # fmt: skip
        wait_for(sock, procs[-1])
        config = VmConfig(accel="tcg", extra_args=qemu_net_args("pci", sock, mac))
        script = UP.format(ip="169.254.9.2") + WAIT_PEER.format(peer="169.254.9.1")
        vm = Vm(config, script, guest=guest)
        try:
            (result,) = run_vms([vm], timeout=180)
        finally:
            vm.stop()
        neigh = subprocess.run(
            [*ns, "ip", "neigh", "show", "dev", tap], capture_output=True, text=True, check=True
        ).stdout
    assert result.status == 0, result.output
    assert b"3 packets received" in result.output
    assert mac in neigh  # the host learnt the guest's MAC from its frames


def test_guest_reaches_host_service_through_passt(guest: GuestImage, tmp_path: Path) -> None:
    if shutil.which("passt") is None:
        pytest.skip("passt not installed")
    # The service: one connection on the host's loopback, answered and recorded.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        with server:
            server.settimeout(200)
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"hello-from-host\n")
                conn.settimeout(30)
                got.append(conn.recv(100))

    threading.Thread(target=serve, daemon=True).start()
    # passt drops root for nobody before it binds: its socket goes in a directory nobody can
    # reach and write (pytest's tmp_path is private to root).
    rundir = Path(tempfile.mkdtemp(prefix="pvbus-passt-"))
    rundir.chmod(0o777)
    passt_sock = rundir / "passt.sock"
    try:
        with processes() as procs:
            procs.append(
                subprocess.Popen(
                    ["passt", "--foreground", "--quiet", "--socket", str(passt_sock),
                     "--address", "169.254.10.2", "--netmask", "16", "--gateway", "169.254.10.1"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
            wait_for(passt_sock, procs[-1])
            sock = tmp_path / "net.sock"
            mac = "52:54:00:0a:00:02"
            procs.append(
                pvbus("serve", "net", "--socket-path", str(sock), "--stream", str(passt_sock),
                      "--mac", mac)
            )  # fmt: skip
            wait_for(sock, procs[-1])
            script = UP.format(ip="169.254.10.2") + (
                f"i=0; until echo hi-from-guest | nc 169.254.10.1 {port} > /tmp/reply; do "
                "i=$((i+1)); [ $i -gt 30 ] && exit 5; sleep 1; done; cat /tmp/reply"
            )
            vm = Vm(
                VmConfig(accel="tcg", extra_args=qemu_net_args("pci", sock, mac)),
                script,
                guest=guest,
            )
            try:
                (result,) = run_vms([vm], timeout=180)
            finally:
                vm.stop()
            assert procs[0].poll() is None, "passt exited"
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    assert result.status == 0, result.output
    assert b"hello-from-host" in result.output
    assert got == [b"hi-from-guest\n"]
