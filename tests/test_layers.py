"""Layering: the spec layers import no I/O machinery; public packages export what they name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import pvbus

SRC = Path(pvbus.__file__).parent
FORBIDDEN = {"socket", "select", "selectors", "asyncio"}
SANS_IO = ["virtio", "vhost_user"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", SANS_IO)
def test_sans_io_layers_import_no_sockets_or_event_loops(layer: str) -> None:
    files = sorted((SRC / layer).rglob("*.py"))
    assert files
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"
        upward = {m for m in imported_modules(path) if m.startswith(("pvbus.server", "pvbus.cli"))}
        assert not upward, f"{path.relative_to(SRC)} imports {sorted(upward)}"


def test_the_import_checker_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import socket\nfrom selectors import DefaultSelector\nimport os.path\n")
    assert imported_modules(sample) == {"socket", "selectors", "os.path"}


@pytest.mark.parametrize(
    "package", ["pvbus.testing", "pvbus.virtio", "pvbus.vhost_user", "pvbus.server"]
)
def test_public_names_are_exported(package: str) -> None:
    module = importlib.import_module(package)
    exported = getattr(module, "__all__", None)
    assert exported, f"{package} has no __all__"
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(module, name), f"{package}.__all__ names missing {name}"
    # Everything the package itself defines (not what it imports from elsewhere) is exported.
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, type(pvbus))
        and getattr(value, "__module__", "").startswith(package)
    }
    assert public <= set(exported), f"{package} defines unexported {sorted(public - set(exported))}"


def test_testing_exports_the_mock_driver() -> None:
    import pvbus.testing

    assert {"FakeGuest", "MockDriverQueue"} <= set(pvbus.testing.__all__)


def test_served_device_serves_a_real_socket_and_cleans_up(tmp_path: Path) -> None:
    """pvbus.testing.ServedDevice: a frontend connects, closing removes nothing it does not own."""
    import socket

    from pvbus.devices.rng import RngConfig, RngDevice
    from pvbus.testing import ServedDevice

    path = tmp_path / "rng.sock"
    with ServedDevice(RngDevice(RngConfig()), path) as served:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.close()
        assert served.running
    assert not served.running
    assert served.server.listener.fileno() == -1  # closed
