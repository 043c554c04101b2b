"""The bus end to end with a real guest (TCG): a VM started by the daemon with no disks,
two pvbus disks hot-plugged (one read-only), I/O from the guest, a detach while the other disk
stays busy, ordered events, stats that agree with the guest's I/O, repeated attach/detach
with nothing leaked, and microvm's refusal."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvbus.bus.client import ClientError
from pvbus.bus.shell import GuestShell
from test_bus_api import Daemon, alive, wait_for

pytestmark = pytest.mark.vm


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        assert d.stop() == 0


def make_image(path: Path, size: int = 8 << 20) -> Path:
    with path.open("wb") as f:
        f.write(os.urandom(size))
    return path


def disks_by_serial(sh: GuestShell) -> dict[str, str]:
    out = sh.check("for d in /sys/block/vd*; do [ -e $d ] && echo ${d##*/} $(cat $d/serial); done")
    pairs = (line.split() for line in out.splitlines() if line.strip())
    return {serial: name for name, serial in pairs}


def queue0(daemon: Daemon, dev: str) -> dict[str, Any]:
    q: dict[str, Any] = daemon.client.stats(dev)["queues"][0]
    return q


def settled(daemon: Daemon, dev: str, requests: int) -> dict[str, Any]:
    """The stats once the worker has published ``requests`` completions."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (q := queue0(daemon, dev))["requests"] >= requests and q, f"{dev} stats"
    )


def test_hotplug_io_detach_events_and_stats(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    a = make_image(tmp_path / "a.img")
    b = make_image(tmp_path / "b.img")
    c.add_device("blk", {"image": str(a), "serial": "disk-a"}, "a")
    c.add_device("blk", {"image": str(b), "serial": "disk-b", "read_only": True}, "b")
    vm = c.start_vm(id="v1", hotplug_slots=2)
    assert vm["state"] == "running" and vm["machine"] == "q35" and vm["devices"] == []
    assert c.attach("a", "v1")["bus"] == "pvbus-rp0"
    assert c.attach("b", "v1")["bus"] == "pvbus-rp1"
    with pytest.raises(ClientError, match="already attached to VM v1"):
        c.attach("a", "v1")

    with GuestShell(Path(vm["shell_socket"])) as sh:
        names = wait_for(lambda: len(d := disks_by_serial(sh)) == 2 and d, "two disks in the guest")
        da, db = f"/dev/{names['disk-a']}", f"/dev/{names['disk-b']}"
        assert sh.check(f"cat /sys/block/{names['disk-b']}/ro").strip() == "1"
        assert sh.check(f"cat /sys/block/{names['disk-a']}/ro").strip() == "0"

        # Reads of the read-only disk return the host file's bytes.
        digest = sh.check(f"dd if={db} bs=65536 count=2 iflag=direct 2>/dev/null | md5sum")
        assert digest.split()[0] == hashlib.md5(b.read_bytes()[: 128 << 10]).hexdigest()
        b_before = b.read_bytes()
        sh.run(f"dd if=/dev/zero of={db} bs=4096 count=1 oflag=direct 2>/dev/null")
        assert b.read_bytes() == b_before  # the write was refused, in the guest or by pvbus

        # 64 direct 4 KiB writes: exactly 64 requests and 256 KiB more in the stats.
        before = settled(daemon, "a", 1)
        sh.check("dd if=/dev/urandom of=/tmp/pattern bs=4096 count=64 2>/dev/null")
        sh.check(f"dd if=/tmp/pattern of={da} bs=4096 count=64 seek=16 oflag=direct 2>/dev/null")
        after = settled(daemon, "a", before["requests"] + 64)
        assert after["requests"] - before["requests"] == 64
        assert after["bytes"] - before["bytes"] == 64 * 4096
        assert after["errors"] == 0
        assert sum(after["latency"]) == after["requests"]
        guest_sum = sh.check("md5sum /tmp/pattern").split()[0]
        assert hashlib.md5(a.read_bytes()[16 * 4096 : 80 * 4096]).hexdigest() == guest_sum

        # Detach b while a is busy with reads; a keeps working.
        sh.check(
            f"(while :; do dd if={da} of=/dev/null bs=4096 count=32 iflag=direct 2>/dev/null;"
            " done) >/dev/null 2>&1 & echo $! > /tmp/reader"
        )
        busy = queue0(daemon, "a")["requests"]
        c.detach("b")
        with pytest.raises(ClientError, match="not attached"):
            c.detach("b")
        wait_for(lambda: queue0(daemon, "a")["requests"] > busy + 32, "reads on a go on")
        sh.check("kill $(cat /tmp/reader)")
        assert sorted(disks_by_serial(sh)) == ["disk-a"]
        sh.check(f"dd if={da} of=/tmp/back bs=4096 count=64 skip=16 iflag=direct 2>/dev/null")
        assert sh.check("md5sum /tmp/back").split()[0] == guest_sum

    b_stats = queue0(daemon, "b")
    assert b_stats["requests"] >= 2 and b_stats["bytes"] >= 128 << 10

    c.detach("a")
    c.stop_vm("v1")
    events = [(e["type"], e["device"]) for e in c.events() if e["type"] != "ERROR"]
    ordered = [
        e for e in events if e[0] in ("VM_START", "DEVADD", "DRIVER_OK", "DEVDROP", "VM_STOP")
    ]
    assert ordered.index(("VM_START", None)) < ordered.index(("DEVADD", "a"))
    assert ordered.index(("DEVADD", "a")) < ordered.index(("DRIVER_OK", "a"))
    assert ordered.index(("DEVADD", "b")) < ordered.index(("DRIVER_OK", "b"))
    assert ordered.index(("DRIVER_OK", "b")) < ordered.index(("DEVDROP", "b"))
    assert ordered.index(("DEVDROP", "b")) < ordered.index(("DEVDROP", "a"))
    assert ordered[-1] == ("VM_STOP", None)
    assert c.vms() == []


def workers_of(daemon: Daemon) -> list[int]:
    """PIDs of the daemon's live worker processes, from /proc."""
    return sorted(
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit()
        and _ppid(int(p)) == daemon.proc.pid
        and "pvbus.bus._worker" in _cmd(p)
        and alive(int(p))
    )


def test_attach_detach_ten_times_leaks_nothing(daemon: Daemon, tmp_path: Path) -> None:
    """Each detach stops the worker that served the attachment (after chardev-remove) and a
    fresh one serves the socket; nothing piles up: one worker, one socket, QEMU's chardevs as
    before. The counters add up over all the workers, and each attachment's events end with
    DISCONNECTED before its DEVDROP."""
    c = daemon.client
    img = make_image(tmp_path / "a.img", 1 << 20)
    pids = [c.add_device("blk", {"image": str(img), "serial": "loop"}, "a")["pid"]]
    c.start_vm(id="v1", hotplug_slots=1)
    baseline = c.vm("v1")["chardevs"]
    requests = [0]
    for _ in range(10):
        assert c.attach("a", "v1")["pid"] == pids[-1]
        assert "pvbus-chr-a" in c.vm("v1")["chardevs"]
        info = c.detach("a")
        assert c.vm("v1")["chardevs"] == baseline
        assert info["state"] == "ready" and info["vm"] is None
        assert info["pid"] not in pids and not alive(pids[-1])
        assert workers_of(daemon) == [info["pid"]]
        assert [p.name for p in (daemon.dir / "devices").glob("*.sock")] == ["a.sock"]
        pids.append(info["pid"])
        # The guest read the new disk's partition table: more requests, none lost.
        requests.append(c.stats("a")["queues"][0]["requests"])
        assert requests[-1] > requests[-2]
    assert c.device("a")["workers"] == 11
    kinds = ("DEVADD", "CONNECTED", "DISCONNECTED", "DEVDROP")
    types = [e["type"] for e in c.events() if e["type"] in kinds]
    assert types == list(kinds) * 10

    # A worker killed while attached, in the middle of the guest's writes: the bus starts a
    # new one on the socket, QEMU reconnects (chardev-add with reconnect-ms), the requests in
    # flight are resubmitted from the inflight area, and the guest's dd ends without an error.
    seq = c.events()[-1]["seq"]
    pid = c.attach("a", "v1")["pid"]
    with GuestShell(Path(c.vm("v1")["shell_socket"])) as sh:
        name = wait_for(lambda: disks_by_serial(sh).get("loop"), "the disk in the guest")
        sh.check("dd if=/dev/urandom of=/tmp/pattern bs=4096 count=192 2>/dev/null")
        sh.check(
            f"(dd if=/tmp/pattern of=/dev/{name} bs=4096 count=192 oflag=direct 2>/tmp/dd.err;"
            " echo $? > /tmp/dd.rc) >/dev/null 2>&1 &"
        )
        wait_for(lambda: queue0(daemon, "a")["requests"] > requests[-1] + 8, "writes started")
        os.kill(pid, 9)
        back = wait_for(
            lambda: (d := c.device("a"))["state"] == "ready" and d["pid"] != pid and d,
            "a new worker",
        )
        assert back["vm"] == "v1" and alive(back["pid"])

        def dd_status() -> str:
            return sh.run("cat /tmp/dd.rc 2>/dev/null")[1].strip()

        rc = wait_for(dd_status, "the guest's dd")
        assert rc == "0", sh.run("cat /tmp/dd.err")[1]
        guest_sum = sh.check("md5sum /tmp/pattern").split()[0]
    assert hashlib.md5(img.read_bytes()[: 192 * 4096]).hexdigest() == guest_sum
    info = c.detach("a")
    assert info["state"] == "ready" and alive(info["pid"]) and info["pid"] != back["pid"]
    assert workers_of(daemon) == [info["pid"]]
    assert c.vm("v1")["chardevs"] == baseline
    types = [e["type"] for e in c.events(seq) if e["type"] in (*kinds, "ERROR")]
    revived = ["DEVADD", "CONNECTED", "ERROR", "DISCONNECTED", "CONNECTED"]
    assert types == [*revived, "DISCONNECTED", "DEVDROP"]
    assert c.stats("a")["queues"][0]["errors"] == 0
    pid = c.attach("a", "v1")["pid"]  # and the device plugs in again

    # Stopping the VM with the device attached drops it the same way: a new worker.
    seq = c.events()[-1]["seq"]
    c.stop_vm("v1")
    info = c.device("a")
    assert info["vm"] is None and info["state"] == "ready" and info["pid"] != pid
    assert workers_of(daemon) == [info["pid"]] and not alive(pid)
    tail = [(e["type"], e["detail"].get("reason")) for e in c.events(seq)]
    assert tail.index(("DEVDROP", "stopped")) < tail.index(("VM_STOP", "stopped"))


def test_microvm_refuses_hotplug(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    img = make_image(tmp_path / "a.img", 1 << 20)
    c.add_device("blk", {"image": str(img)}, "a")
    assert c.start_vm(id="m1", transport="mmio")["machine"] == "microvm"
    with pytest.raises(ClientError, match=re.escape("microvm (virtio-mmio): QEMU cannot hot-plug")):
        c.attach("a", "m1")
    assert c.device("a")["vm"] is None


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _cmd(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_adopted_qemu_gets_a_hot_plugged_disk(daemon: Daemon, tmp_path: Path) -> None:
    """A QEMU started elsewhere (the runner, with a free root port) is adopted by its QMP
    socket; a bus disk is hot-plugged into it and the guest reads the image's bytes; when that
    QEMU exits the bus lets go of it and the device."""
    from pvbus.vm import VmConfig
    from pvbus.vm.runner import Vm, command_script

    c = daemon.client
    img = make_image(tmp_path / "a.img", 1 << 20)
    c.add_device("blk", {"image": str(img), "serial": "adopted"}, "a")
    script = (
        "i=0; while [ ! -e /sys/block/vda ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done;"
        " echo serial $(cat /sys/block/vda/serial);"
        " echo md5 $(dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | md5sum)"
    )
    config = VmConfig(accel="tcg", extra_args=("-device", "pcie-root-port,id=ext-rp0,chassis=9"))
    vm = Vm(config, command_script([script]), workdir=tmp_path / "ext")
    (tmp_path / "ext").mkdir()
    with vm:
        wait_for(vm.qmp_socket.exists, "QEMU's QMP socket")
        adopted = c.start_vm(id="ext", qmp_socket=str(vm.qmp_socket))
        assert adopted["machine"] == "q35"
        assert c.attach("a", "ext")["bus"] == "ext-rp0"
        result = vm.wait(timeout=300)
    out = result.output.decode()
    assert "serial adopted" in out, out
    assert f"md5 {hashlib.md5(img.read_bytes()).hexdigest()}" in out, out
    # QEMU powered off: the bus notices, drops the device and forgets nothing else.
    wait_for(lambda: c.device("a")["vm"] is None, "the device released")
    kinds = [e["type"] for e in c.events() if e.get("vm") == "ext" or e["device"] == "a"]
    assert "DEVADD" in kinds and "DEVDROP" in kinds
