"""Fast tests of the VM layer: no QEMU, no downloads."""

from __future__ import annotations

import argparse
import dataclasses
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import pvbus.vm
from pvbus.cli.main import build_parser
from pvbus.vm._cpio import CpioWriter
from pvbus.vm._modules import ModuleError, ModuleIndex, module_name, parse_modinfo
from pvbus.vm.accel import HostFacts, choose_accel
from pvbus.vm.backends import pvbus_blk_argv, qsd_blk_argv
from pvbus.vm.guest import INIT_SCRIPT, OUTPUT_PORT, command_archive
from pvbus.vm.qemu import DiskSpec, VmConfig, VmPaths, host_tsc_khz, kernel_cmdline, qemu_argv
from pvbus.vm.runner import _MarkerStream, command_script

# --- kernel modules -------------------------------------------------------------------------


def fake_module(info: dict[str, str]) -> bytes:
    """A minimal ELF64 object with a .modinfo section."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    data_off = 64
    modinfo_off = data_off + len(shstrtab)
    shoff = modinfo_off + len(modinfo)
    shoff += -shoff % 8
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)
    body = header + shstrtab + modinfo
    body += bytes(shoff - len(body))
    sections = bytes(64)
    sections += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, data_off, len(shstrtab), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 11, 1, 0, 0, modinfo_off, len(modinfo), 0, 0, 1, 0)
    return body + sections


def test_parse_modinfo() -> None:
    info = parse_modinfo(fake_module({"depends": "a,b", "softdep": "pre: crc32c", "name": "x"}))
    assert info["depends"] == ["a,b"]
    assert info["softdep"] == ["pre: crc32c"]
    with pytest.raises(ModuleError):
        parse_modinfo(b"not elf")


def test_module_name() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert module_name("ext4.ko") == "ext4"


def make_tree(tmp_path: Path, modules: dict[str, dict[str, str]], builtin: list[str]) -> Path:
    for name, info in modules.items():
        path = tmp_path / "kernel" / f"{name.replace('_', '-')}.ko.xz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(fake_module(info)))
    (tmp_path / "modules.builtin").write_text("".join(f"kernel/{b}.ko\n" for b in builtin))
    return tmp_path


def test_resolve_orders_dependencies_first(tmp_path: Path) -> None:
    tree = make_tree(
        tmp_path,
        {
            "ext4": {"depends": "jbd2,crc16,mbcache", "softdep": "pre: crc32c_generic"},
            "jbd2": {"depends": ""},
            "crc16": {"depends": ""},
            "mbcache": {"depends": ""},
            "crc32c_generic": {"depends": ""},
            "vmw_vsock_virtio_transport": {"depends": "vmw_vsock_virtio_transport_common,vsock"},
            "vmw_vsock_virtio_transport_common": {"depends": "vsock"},
            "vsock": {"depends": ""},
        },
        builtin=["virtio_pci", "virtio_console"],
    )
    index = ModuleIndex.from_tree(tree)
    order = [m.name for m in index.resolve(["virtio_pci", "ext4", "vmw_vsock_virtio_transport"])]
    assert "virtio_pci" not in order
    assert order.index("crc32c_generic") < order.index("ext4")
    for dep in ("jbd2", "crc16", "mbcache"):
        assert order.index(dep) < order.index("ext4")
    assert order.index("vsock") < order.index("vmw_vsock_virtio_transport_common")
    assert order[-1] == "vmw_vsock_virtio_transport"
    assert len(order) == len(set(order))


def test_resolve_errors(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"a": {"depends": "b"}, "b": {"depends": "a"}}, [])
    index = ModuleIndex.from_tree(tree)
    with pytest.raises(ModuleError, match="cycle"):
        index.resolve(["a"])
    with pytest.raises(ModuleError, match="not found"):
        index.resolve(["nope"])


# --- cpio and guest protocol ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_cpio_is_readable_by_cpio() -> None:
    cpio = CpioWriter()
    cpio.directory("pvbus")
    cpio.file("pvbus/cmd", b"echo hi\n", 0o755)
    cpio.symlink("bin/sh", "busybox")
    data = cpio.finish()
    assert len(data) % 512 == 0
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True
    ).stdout.split()
    assert listing == [b"pvbus", b"pvbus/cmd", b"bin/sh"]


def test_command_archive_and_init() -> None:
    data = command_archive("exit 3", "MARK")
    assert b"pvbus/cmd" in data and b"exit 3\n" in data and b"MARK" in data
    assert OUTPUT_PORT in INIT_SCRIPT
    assert "/pvbus/marker" in INIT_SCRIPT


def test_command_script() -> None:
    assert command_script(["echo hi; exit 3"]) == "echo hi; exit 3"
    assert command_script(["ls", "-l", "a b"]) == "ls -l 'a b'"
    with pytest.raises(ValueError):
        command_script([])


def test_marker_stream_byte_by_byte() -> None:
    seen: list[bytes] = []
    stream = _MarkerStream(b"END-123", seen.append)
    for byte in b"out\nEND-12 is not it\nEND-123 42\ntrailing":
        stream.feed(bytes([byte]))
    assert stream.status == 42
    assert bytes(stream.output) == b"out\nEND-12 is not it\n"
    assert b"".join(seen) == bytes(stream.output)


def test_marker_stream_negative_and_partial() -> None:
    stream = _MarkerStream(b"M", None)
    stream.feed(b"xM -1")
    assert stream.status is None
    stream.feed(b"\n")
    assert stream.status == -1


# --- accelerator ----------------------------------------------------------------------------


def facts(**kw: object) -> HostFacts:
    base: dict[str, object] = {
        "kvm_device": True,
        "kvm_accessible": True,
        "modules": frozenset({"kvm", "kvm_intel"}),
        "cpu_flags": frozenset({"vmx", "sse2"}),
    }
    base.update(kw)
    return HostFacts(**base)  # type: ignore[arg-type]


def test_accel_auto() -> None:
    assert choose_accel("auto", facts()).name == "kvm"
    assert choose_accel("auto", facts(kvm_device=False)).name == "tcg"
    assert choose_accel("auto", facts(kvm_accessible=False)).name == "tcg"
    pvm = facts(modules=frozenset({"kvm", "kvm_pvm"}), cpu_flags=frozenset({"hypervisor"}))
    choice = choose_accel("auto", pvm)
    assert choice.name == "tcg" and "PVM" in choice.reason
    assert choose_accel("auto", facts(cpu_flags=frozenset())).name == "tcg"
    assert choose_accel("auto", facts(modules=frozenset({"kvm"}))).name == "tcg"


def test_accel_forced() -> None:
    assert choose_accel("kvm", facts(kvm_device=False)).name == "kvm"
    assert choose_accel("tcg", facts()).name == "tcg"
    with pytest.raises(ValueError):
        choose_accel("hvf")


# --- QEMU command line ----------------------------------------------------------------------


def paths(n_disks: int) -> VmPaths:
    return VmPaths(
        kernel=Path("/k/vmlinuz"),
        initrd=Path("/w/initrd.img"),
        console_log=Path("/w/console.log"),
        output_socket=Path("/w/out.sock"),
        qmp_socket=Path("/w/qmp.sock"),
        disk_sockets=tuple(Path(f"/w/disk{i}.sock") for i in range(n_disks)),
    )


def test_qemu_argv_pci() -> None:
    cfg = VmConfig(disks=(DiskSpec(Path("a.img")), DiskSpec(Path("b.img"), True, 2)))
    argv = qemu_argv(cfg, paths(2), "tcg", 2_000_000)
    line = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in argv
    assert "q35,memory-backend=mem" in argv
    assert "-bios" not in argv
    assert "vhost-user-blk-pci,id=vdisk0,chardev=disk0,num-queues=1" in argv
    assert "vhost-user-blk-pci,id=vdisk1,chardev=disk1,num-queues=2" in argv
    assert "socket,id=disk1,path=/w/disk1.sock,reconnect-ms=200" in argv
    assert "virtio-serial-pci,id=vser" in argv
    assert f"name={OUTPUT_PORT}" in line
    assert "unix:/w/qmp.sock,server=on,wait=off" in argv
    assert "tsc_early_khz" not in line
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-cpu") + 1] == "max"


def test_qemu_argv_mmio() -> None:
    cfg = VmConfig(transport="mmio", disks=(DiskSpec(Path("a.img")),), memory_mib=256, cpus=2)
    argv = qemu_argv(cfg, paths(1), "kvm", 2_445_404)
    assert cfg.machine_type == "microvm"
    machine = argv[argv.index("-machine") + 1]
    assert machine.startswith("microvm,") and machine.endswith("memory-backend=mem")
    assert argv[argv.index("-bios") + 1] == "/usr/share/qemu/qboot.rom"
    assert "virtio-mmio.force-legacy=false" in argv
    assert "tsc_early_khz=2445404" in argv[argv.index("-append") + 1]
    assert "vhost-user-blk,id=vdisk0,chardev=disk0,num-queues=1,queue-size=1024" in argv
    assert "virtio-serial-device,id=vser" in argv
    assert argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-smp") + 1] == "2"


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_qemu_argv_packed_on_every_pvbus_device(transport: str) -> None:
    from pvbus.vm.devices import DeviceSpec

    specs = (
        DeviceSpec("net", ("--switch", "/w/sw")),
        DeviceSpec.rng(),
        DeviceSpec.vsock(Path("/w/v.sock")),
        DeviceSpec.console("null"),
    )
    cfg = VmConfig(transport=transport, disks=(DiskSpec(Path("a.img")),), devices=specs)
    packed = dataclasses.replace(cfg, packed=True)
    p = dataclasses.replace(paths(1), device_sockets=tuple(Path(f"/w/d{i}") for i in range(4)))
    plain = [a for a in qemu_argv(cfg, p, "tcg") if "packed" in a]
    assert plain == []
    argv = qemu_argv(packed, p, "tcg")
    devices = [a for a in argv if a.startswith(("vhost-user-", "virtio-net"))]
    assert len(devices) == 5 and all(a.endswith(",packed=on") for a in devices)
    # QEMU's own virtio-serial (the output port) stays as it is.
    assert not any("virtio-serial" in a and "packed" in a for a in qemu_argv(packed, p, "tcg"))
    with pytest.raises(ValueError, match="packed rings need pvbus disks"):
        VmConfig(disks=(DiskSpec(Path("a.img")),), disk_backend="qsd", packed=True)


def test_kernel_cmdline_extra() -> None:
    cfg = VmConfig(kernel_args=("quiet",))
    assert kernel_cmdline(cfg).endswith(" quiet")


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        VmConfig(transport="mmio", machine="q35")
    with pytest.raises(ValueError):
        VmConfig(transport="isa")
    with pytest.raises(ValueError):
        VmConfig(memory_mib=8)
    with pytest.raises(ValueError):
        VmConfig(disk_backend="nbd")
    with pytest.raises(ValueError):
        qemu_argv(VmConfig(disks=(DiskSpec(Path("a")),)), paths(0), "tcg")


def test_disk_spec_parse() -> None:
    assert DiskSpec.parse("a.img") == DiskSpec(Path("a.img"))
    assert DiskSpec.parse("a.img,ro") == DiskSpec(Path("a.img"), read_only=True)
    assert DiskSpec.parse("a.img,ro,queues=4") == DiskSpec(Path("a.img"), True, 4)
    for bad in ("", "a.img,bogus", "a.img,queues=0"):
        with pytest.raises(ValueError):
            DiskSpec.parse(bad)


def test_host_tsc_khz(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2445.404\n")
    assert host_tsc_khz(info) == 2445404
    assert host_tsc_khz(tmp_path / "missing") == 0


def test_backend_argv() -> None:
    disk = DiskSpec(Path("/d.img"), read_only=True, num_queues=2)
    pv = pvbus_blk_argv(disk, Path("/s.sock"))
    assert pv[1:5] == ["-m", "pvbus.cli.main", "serve", "blk"]
    assert "--read-only" in pv and pv[pv.index("--num-queues") + 1] == "2"
    assert pv[pv.index("--queue-size") + 1] == "1024"  # what virtio-mmio offers the guest
    qsd = " ".join(qsd_blk_argv(disk, Path("/s.sock")))
    assert "addr.path=/s.sock" in qsd and "writable=off" in qsd and "num-queues=2" in qsd


# --- CLI and exports ------------------------------------------------------------------------


def test_cli_run_parses() -> None:
    args = build_parser().parse_args(
        ["run", "--transport", "mmio", "--disk", "a.img,ro", "--", "echo", "hi"]
    )
    assert isinstance(args, argparse.Namespace)
    assert args.transport == "mmio" and args.disk == ["a.img,ro"]
    assert args.command[-2:] == ["echo", "hi"]
    assert args.disk_backend == "pvbus"
    assert not args.packed
    packed = build_parser().parse_args(["run", "--packed", "--disk", "a.img", "--", "true"])
    from pvbus.cli.run import vm_config

    assert vm_config(packed, (DiskSpec(Path("a.img")),)).packed


def test_cli_run_errors() -> None:
    from pvbus.cli.main import main

    assert main(["run", "--disk", "/nonexistent.img", "--", "true"]) == 2
    assert main(["run", "--disk", "/nonexistent.img"]) == 2  # the shell, too


def test_exports() -> None:
    for name in pvbus.vm.__all__:
        assert hasattr(pvbus.vm, name), name


def test_marker_stream_passes_paused_output_through() -> None:
    """Output that stops mid-stream is emitted at once, except a possible marker prefix."""
    seen: list[bytes] = []
    stream = _MarkerStream(b"PVBUS-EXIT-abc", seen.append)
    stream.feed(b"written 1234\n")
    assert b"".join(seen) == b"written 1234\n"
    stream.feed(b"tail PVBUS-")
    assert b"".join(seen) == b"written 1234\ntail "
    stream.feed(b"not the marker\n")
    assert b"".join(seen) == b"written 1234\ntail PVBUS-not the marker\n"
    stream.feed(b"PVBUS-EXIT-abc 3\n")
    assert stream.status == 3


def test_reconnect_option_by_qemu_version() -> None:
    from pvbus.vm.qemu import reconnect_option

    assert reconnect_option(200, (10, 0)) == ",reconnect-ms=200"
    assert reconnect_option(200, (9, 2)) == ",reconnect-ms=200"
    assert reconnect_option(200, (7, 2)) == ",reconnect=1"
    assert reconnect_option(2500, (8, 0)) == ",reconnect=2"
    assert reconnect_option(0, (10, 0)) == ""


@pytest.mark.parametrize(
    ("transport", "device"), [("pci", "virtio-net-pci"), ("mmio", "virtio-net-device")]
)
def test_net_device_spec_renders_a_vhost_user_netdev(transport: str, device: str) -> None:
    from pvbus.vm.devices import DeviceSpec, qemu_device_args, serve_argv

    spec = DeviceSpec.parse("net:switch=/run/sw.sock,mac=52:54:00:00:00:07,queue-pairs=2")
    args = qemu_device_args(spec, transport, 1, Path("/w/dev1.sock"))
    assert args[:2] == ["-chardev", "socket,id=pvdev1,path=/w/dev1.sock"]
    assert args[2:4] == ["-netdev", "vhost-user,id=pvnet1,chardev=pvdev1,queues=2"]
    props = args[5].split(",")
    assert props[0] == device and "netdev=pvnet1" in props and "mq=on" in props
    assert "mac=52:54:00:00:00:07" in props
    assert ("vectors=6" in props) == (transport == "pci")
    argv = serve_argv(spec, Path("/w/dev1.sock"))
    assert argv[argv.index("serve") + 1] == "net"
    assert argv[argv.index("--switch") + 1] == "/run/sw.sock"


def test_interactive_archive_and_qemu_console() -> None:
    archive = command_archive(None, "M", term="xterm-256color", size=(40, 120))
    assert b"pvbus/interactive" in archive and b"pvbus/cmd" not in archive
    assert b"TERM=xterm-256color\nrows=40\ncols=120\n" in archive
    assert b"TERM='x; reboot'" in command_archive(None, "M", term="x; reboot")
    base = paths(0)
    assert "virtconsole" not in " ".join(qemu_argv(VmConfig(), base, "tcg"))
    with_console = dataclasses.replace(base, console_socket=Path("/w/hvc0.sock"))
    argv = qemu_argv(VmConfig(), with_console, "tcg")
    assert "socket,id=pvbusterm,path=/w/hvc0.sock,server=on,wait=off" in argv
    assert "virtconsole,bus=vser.0,chardev=pvbusterm" in argv


# --- ccw (s390x) ----------------------------------------------------------------------------


def test_qemu_argv_ccw() -> None:
    from pvbus.vm.devices import DeviceSpec

    net = DeviceSpec.parse("net:switch=/w/sw,mac=52:54:00:00:00:09")
    cfg = VmConfig(transport="ccw", disks=(DiskSpec(Path("a.img")),), devices=(net,))
    assert cfg.machine_type == "s390-ccw-virtio" and cfg.arch == "s390x"
    p = dataclasses.replace(paths(1), device_sockets=(Path("/w/d0"),))
    argv = qemu_argv(cfg, p, "tcg")
    assert argv[0] == "qemu-system-s390x"
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in argv
    assert argv[argv.index("-machine") + 1] == "s390-ccw-virtio,memory-backend=mem"
    assert argv[argv.index("-cpu") + 1] == "max"
    assert "-bios" not in argv
    cmdline = argv[argv.index("-append") + 1]
    assert "console=ttysclp0" in cmdline and "ttyS0" not in cmdline
    assert "virtio-serial-ccw,id=vser" in argv
    assert "vhost-user-blk-ccw,id=vdisk0,chardev=disk0,num-queues=1" in argv
    assert "vhost-user,id=pvnet0,chardev=pvdev0,queues=1" in argv
    nic = next(a for a in argv if a.startswith("virtio-net-ccw,"))
    assert "netdev=pvnet0" in nic and "mac=52:54:00:00:00:09" in nic and "vectors" not in nic
    packed = qemu_argv(dataclasses.replace(cfg, packed=True), p, "tcg")
    assert "vhost-user-blk-ccw,id=vdisk0,chardev=disk0,num-queues=1,packed=on" in packed


def test_ccw_config_and_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from pvbus.vm import devices
    from pvbus.vm.devices import DeviceSpec, qemu_device_name, unsupported_reason
    from pvbus.vm.qemu import default_qemu

    assert VmConfig(transport="ccw", qemu="/opt/q").qemu == "/opt/q"
    monkeypatch.setenv("PVBUS_QEMU_S390X", "/opt/qemu-s390x")
    monkeypatch.setenv("PVBUS_QEMU", "/opt/qemu-x86")
    assert VmConfig(transport="ccw").qemu == default_qemu("ccw") == "/opt/qemu-s390x"
    assert VmConfig().qemu == "/opt/qemu-x86"
    with pytest.raises(ValueError, match="does not fit transport ccw"):
        VmConfig(transport="ccw", machine="q35")
    assert qemu_device_name("rng", "ccw") == "vhost-user-rng-ccw"
    assert qemu_device_name("net", "ccw") == "virtio-net-ccw"
    listed = frozenset({"virtio-net-ccw", "vhost-user-fs-ccw"})
    monkeypatch.setattr(devices, "_creatable_devices", lambda _qemu: listed)
    assert unsupported_reason(DeviceSpec("net"), "ccw", "q") is None
    why = unsupported_reason(DeviceSpec.rng(), "ccw", "q")
    assert why is not None and "vhost-user-rng-ccw" in why and "no CCW proxy" in why


def test_accel_for_a_foreign_guest() -> None:
    choice = choose_accel("auto", facts(), guest_arch="s390x")
    assert choice.name == "tcg" and "s390x guest" in choice.reason
    assert choose_accel("auto", facts(machine="s390x"), guest_arch="s390x").name == "kvm"
    assert choose_accel("auto", facts(), guest_arch="amd64").name == "kvm"


def test_cli_run_ccw() -> None:
    from pvbus.cli.run import vm_config

    parser = build_parser()
    args = parser.parse_args(["run", "--transport", "ccw", "--", "true"])
    assert vm_config(args, ()).transport == "ccw"
    args = parser.parse_args(["run", "--machine", "s390-ccw-virtio", "--", "true"])
    config = vm_config(args, ())
    assert config.transport == "ccw" and config.arch == "s390x"
    args = parser.parse_args(["guest", "build", "--arch", "s390x"])
    assert args.arch == "s390x"


def test_guest_image_json_keeps_arch() -> None:
    from pvbus.vm.guest import GuestImage, guest_modules

    image = GuestImage(Path("/g/vmlinuz"), Path("/g/initramfs.img"), "6.12-s390x", "s390x")
    assert GuestImage.from_json(image.to_json()) == image
    old = '{"kernel": "/k", "initramfs": "/i", "kernel_version": "6.12-amd64"}'
    assert GuestImage.from_json(old).arch == "amd64"
    assert "virtio_pci" not in guest_modules("s390x") and "virtio_blk" in guest_modules("s390x")
    assert "virtio_mmio" in guest_modules("amd64")
