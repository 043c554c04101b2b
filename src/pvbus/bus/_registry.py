"""Device types the bus can host: each ``pvbus.devices.<type>.cli`` module, found at run time.

A device type is the module ``pvbus serve <type>`` uses (``CAPABILITIES``,
``add_arguments(parser)``, ``make_device(args)``). The bus derives from its argparse options a
pydantic model (unknown fields rejected) for the API, and turns a validated config back into
the same command line for the worker. :data:`QEMU_DRIVERS` says how QEMU plugs each type in.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import pydantic

import pvbus.devices
from pvbus.virtio.constants import DeviceId

log = logging.getLogger(__name__)

__all__ = [
    "QEMU_DRIVERS",
    "DeviceType",
    "QemuDriver",
    "UnknownDeviceTypeError",
    "device_type",
    "device_types",
]


class UnknownDeviceTypeError(LookupError):
    """No ``pvbus.devices.<type>.cli`` module for that name."""


@dataclass(frozen=True, slots=True)
class QemuDriver:
    """How QEMU renders a vhost-user device of one type on PCI.

    ``netdev``: the device needs ``netdev_add type=vhost-user`` and a ``netdev=`` property
    instead of ``chardev=``. ``queues_property``: the device property that takes the number of
    queues, filled from the config field named by ``queues_field``.
    """

    driver: str
    netdev: bool = False
    queues_property: str | None = None
    queues_field: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)


#: QEMU drivers by pvbus device type (QEMU 10 has no generic vhost-user-device-pci built in
#: Debian, so a type missing here cannot be hot-plugged; the error says so).
QEMU_DRIVERS: dict[str, QemuDriver] = {
    "blk": QemuDriver(
        "vhost-user-blk-pci", queues_property="num-queues", queues_field="num_queues"
    ),
    "net": QemuDriver("virtio-net-pci", netdev=True, queues_field="num_queue_pairs"),
    "rng": QemuDriver("vhost-user-rng-pci"),
    "vsock": QemuDriver("vhost-user-vsock-pci"),
    "console": QemuDriver("vhost-user-device-pci", properties={"virtio-id": int(DeviceId.CONSOLE)}),
}


_PY_TYPES: dict[Any, type] = {None: str, str: str, int: int, float: float}


@dataclass(frozen=True)
class DeviceType:
    """One pluggable device type: its CLI module, config model and option table."""

    name: str
    module: ModuleType
    config_model: type[pydantic.BaseModel]
    #: config field -> (option string, is a flag)
    options: dict[str, tuple[str, bool]]

    @property
    def capabilities(self) -> dict[str, Any]:
        """The backend-program capabilities the type declares."""
        caps: dict[str, Any] = getattr(self.module, "CAPABILITIES", {})
        return caps

    @property
    def qemu(self) -> QemuDriver | None:
        """How QEMU plugs this type in, if it can."""
        return QEMU_DRIVERS.get(self.name)

    def argv(self, config: pydantic.BaseModel) -> list[str]:
        """The ``pvbus serve <type>`` options for a validated ``config``."""
        out: list[str] = []
        for name, (option, flag) in self.options.items():
            value = getattr(config, name)
            if flag:
                if value:
                    out.append(option)
            elif value is not None:
                out += [option, str(value)]
        return out

    def parse_args(self, argv: list[str]) -> argparse.Namespace:
        """Parse device options as ``pvbus serve <type>`` does (SystemExit on bad input)."""
        parser = argparse.ArgumentParser(prog=f"pvbus serve {self.name}")
        self.module.add_arguments(parser)
        return parser.parse_args(argv)


def _options(module: ModuleType) -> list[argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    return [a for a in parser._actions if a.option_strings]


def _field(action: argparse.Action) -> tuple[Any, Any, bool]:
    """(annotation, default, is a flag) of one argparse option."""
    if isinstance(action, argparse._StoreTrueAction):
        return bool, False, True
    if action.nargs not in (None, "?"):
        raise TypeError(f"option {action.dest}: nargs={action.nargs!r} is not supported")
    base: Any = _PY_TYPES.get(action.type)
    if base is None:
        raise TypeError(f"option {action.dest}: type {action.type!r} is not supported")
    if action.choices is not None:
        base = Literal[tuple(action.choices)]
    if action.required:
        return base, ..., False
    if action.default is None:
        return base | None, None, False
    return base, action.default, False


def _long_option(action: argparse.Action) -> str:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return (longs or action.option_strings)[0]


def _load(name: str) -> DeviceType:
    try:
        module = importlib.import_module(f"pvbus.devices.{name}.cli")
    except ModuleNotFoundError as err:
        raise UnknownDeviceTypeError(name) from err
    fields: dict[str, Any] = {}
    options: dict[str, tuple[str, bool]] = {}
    for action in _options(module):
        annotation, default, flag = _field(action)
        fields[action.dest] = (
            annotation,
            pydantic.Field(default, description=(action.help or "").replace("%%", "%")),
        )
        options[action.dest] = (_long_option(action), flag)
    model = pydantic.create_model(
        f"{name.capitalize()}Config",
        __config__=pydantic.ConfigDict(extra="forbid"),
        **fields,
    )
    return DeviceType(name, module, model, options)


@functools.cache
def device_type(name: str) -> DeviceType:
    """The device type ``name``; raises :class:`UnknownDeviceTypeError`."""
    if not name.isidentifier():
        raise UnknownDeviceTypeError(name)
    return _load(name)


@functools.cache
def device_types() -> dict[str, DeviceType]:
    """Every device type with a ``cli`` module under :mod:`pvbus.devices`, by name."""
    found: dict[str, DeviceType] = {}
    for info in pkgutil.iter_modules(pvbus.devices.__path__):
        if not info.ispkg:
            continue
        try:
            found[info.name] = device_type(info.name)
        except UnknownDeviceTypeError:
            continue
        except Exception as err:  # a device type being written must not take the bus down
            log.warning("device type %s unusable: %s", info.name, err)
    return dict(sorted(found.items()))
