"""The runner's device specs and vsock command channel, without booting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvbus.vm.devices import DeviceSpec, qemu_device_args, serve_argv
from pvbus.vm.guest import INIT_SCRIPT, RUN_SCRIPT, command_archive
from pvbus.vm.qemu import VmConfig, VmPaths, qemu_argv


def test_parse_device_specs() -> None:
    assert DeviceSpec.parse("rng") == DeviceSpec("rng")
    spec = DeviceSpec.parse("vsock:uds-path=/tmp/v.sock,guest-cid=9")
    assert spec.args == ("--uds-path", "/tmp/v.sock", "--guest-cid", "9")
    assert spec.option("guest-cid") == "9" and spec.option("nope") is None
    assert DeviceSpec.parse("rng:rate-limit=4096") == DeviceSpec.rng(4096)
    with pytest.raises(ValueError, match="unknown device"):
        DeviceSpec.parse("gpu")
    with pytest.raises(ValueError, match="key=value"):
        DeviceSpec.parse("rng:fast")


def test_console_queue_count_matches_the_backend() -> None:
    assert DeviceSpec.console("null").console_queues() == 2
    assert DeviceSpec.console("null", "null,name=a", "null,name=b").console_queues() == 8
    spec = DeviceSpec("console", ("--port", "null", "--max-ports", "4"))
    assert spec.console_queues() == 10


@pytest.mark.parametrize(
    ("spec", "transport", "device"),
    [
        (DeviceSpec.rng(), "pci", "vhost-user-rng-pci,id=pvdev2dev,chardev=pvdev2"),
        (DeviceSpec.rng(), "mmio", "vhost-user-rng,id=pvdev2dev,chardev=pvdev2"),
        (
            DeviceSpec.vsock(Path("/v")),
            "mmio",
            "vhost-user-vsock-device,id=pvdev2dev,chardev=pvdev2",
        ),
        (
            DeviceSpec.console("null", "null,name=x"),
            "pci",
            "vhost-user-device-pci,id=pvdev2dev,chardev=pvdev2,virtio-id=3,num_vqs=6,config_size=12",
        ),
    ],
)
def test_qemu_device_args(spec: DeviceSpec, transport: str, device: str) -> None:
    args = qemu_device_args(spec, transport, 2, Path("/w/dev2.sock"))
    assert args == ["-chardev", "socket,id=pvdev2,path=/w/dev2.sock", "-device", device]


def test_serve_argv() -> None:
    argv = serve_argv(DeviceSpec.vsock(Path("/v"), 5), Path("/w/s"))
    assert argv[1:] == [
        "-m",
        "pvbus.cli.main",
        "serve",
        "vsock",
        "--socket-path",
        "/w/s",
        "--uds-path",
        "/v",
        "--guest-cid",
        "5",
    ]


def test_qemu_argv_carries_config_and_runner_devices() -> None:
    cfg = VmConfig(devices=(DeviceSpec.rng(),))
    paths = VmPaths(
        kernel=Path("/k"),
        initrd=Path("/i"),
        console_log=Path("/c"),
        output_socket=Path("/o"),
        qmp_socket=Path("/q"),
        device_sockets=(Path("/w/dev0.sock"), Path("/w/dev1.sock")),
        runner_devices=(DeviceSpec.vsock(Path("/w/vsock.sock")),),
    )
    argv = qemu_argv(cfg, paths, "tcg")
    assert "vhost-user-rng-pci,id=pvdev0dev,chardev=pvdev0" in argv
    assert "vhost-user-vsock-pci,id=pvdev1dev,chardev=pvdev1" in argv
    # The virtio-serial port stays for the fallback.
    assert any(a.startswith("virtserialport") for a in argv)


def test_config_rejects_unknown_channel() -> None:
    with pytest.raises(ValueError, match="channel"):
        VmConfig(command_channel="carrier-pigeon")


def _names(archive: bytes) -> list[str]:
    names = []
    off = 0
    while off < len(archive):
        header = archive[off : off + 110]
        namesize = int(header[94:102], 16)
        filesize = int(header[54:62], 16)
        name = archive[off + 110 : off + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            break
        names.append(name)
        off += (110 + namesize + 3) & ~3
        off += (filesize + 3) & ~3
    return names


def test_command_archive_vsock_port() -> None:
    assert "pvbus/vsock_port" not in _names(command_archive("true", "M"))
    with_port = command_archive("true", "M", 1024)
    assert "pvbus/vsock_port" in _names(with_port)
    assert b"1024\n" in with_port


def test_init_falls_back_only_when_the_command_did_not_run() -> None:
    # vsock-exec exits 111 before exec; /pvbus/run marks that the command started.
    assert "vsock-exec c 2" in INIT_SCRIPT
    assert "/tmp/.pvbus-ran" in INIT_SCRIPT and "touch /tmp/.pvbus-ran" in RUN_SCRIPT
    assert INIT_SCRIPT.index("vsock-exec") < INIT_SCRIPT.index("/sys/class/virtio-ports")
