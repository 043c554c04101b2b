"""The bus's REST API (FastAPI), served on a Unix socket; OpenAPI document at ``/openapi.json``.

Resources: ``/devices`` (create, list, inspect, delete; ``/devices/{id}/attachment`` to
hot-plug into a VM and unplug), ``/vms`` (start or adopt, list, stop), ``/events``
(server-sent events, or a JSON list with ``follow=false``), ``/stats`` and ``/metrics``
(Prometheus text). Errors are ``{"detail": "<one line>"}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from pvbus import __version__
from pvbus.bus._bus import Bus, BusError, Coalesce, VmSpec
from pvbus.bus._registry import device_types
from pvbus.bus._stats import LATENCY_BOUNDS, DeviceSnapshot

__all__ = ["create_app", "prometheus_text"]


class Attachment(pydantic.BaseModel):
    """Where to plug a device in."""

    model_config = pydantic.ConfigDict(extra="forbid")
    vm: str


def _create_models() -> Any:
    """One request model per device type, discriminated by ``type``."""
    models = []
    for name, dtype in device_types().items():
        models.append(
            pydantic.create_model(
                f"Create{name.capitalize()}Device",
                __config__=pydantic.ConfigDict(extra="forbid"),
                type=(Literal[name], ...),  # type: ignore[arg-type]
                id=(str | None, pydantic.Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")),
                config=(dtype.config_model, ...),
                coalesce=(Coalesce | None, None),
            )
        )
    if len(models) == 1:
        return models[0]
    union: Any = models[0]
    for model in models[1:]:
        union = union | model
    return Annotated[union, pydantic.Field(discriminator="type")]


def prometheus_text(snapshots: dict[str, tuple[str, DeviceSnapshot]]) -> str:
    """Prometheus exposition text for ``{device: (type, snapshot)}``."""
    counters = [
        ("kicks", "Driver notifications (kicks) handled"),
        ("requests", "Requests completed"),
        ("bytes", "Payload bytes moved"),
        ("calls", "Interrupts (used-buffer notifications) sent"),
        ("errors", "Requests completed with an error, and ring errors"),
        ("coalesced", "Interrupts held back by the coalescing policy"),
    ]
    out: list[str] = []
    for name, help_ in counters:
        out.append(f"# HELP pvbus_queue_{name}_total {help_}.")
        out.append(f"# TYPE pvbus_queue_{name}_total counter")
        for dev, (dtype, snap) in snapshots.items():
            for i, q in enumerate(snap.queues):
                labels = f'device="{dev}",type="{dtype}",queue="{i}"'
                out.append(f"pvbus_queue_{name}_total{{{labels}}} {getattr(q, name)}")
    out.append("# HELP pvbus_queue_in_flight Requests taken from the ring and not completed.")
    out.append("# TYPE pvbus_queue_in_flight gauge")
    for dev, (dtype, snap) in snapshots.items():
        for i, q in enumerate(snap.queues):
            out.append(
                f'pvbus_queue_in_flight{{device="{dev}",type="{dtype}",queue="{i}"}} {q.in_flight}'
            )
    out.append(
        "# HELP pvbus_queue_latency_seconds Service time of the batch each request completed"
        " in (per batch, not per request; requests completed outside a batch are not counted)."
    )
    out.append("# TYPE pvbus_queue_latency_seconds histogram")
    for dev, (dtype, snap) in snapshots.items():
        for i, q in enumerate(snap.queues):
            labels = f'device="{dev}",type="{dtype}",queue="{i}"'
            total = 0
            approx_sum = 0.0
            for b, count in enumerate(q.latency):
                total += count
                bound = LATENCY_BOUNDS[b] if b < len(LATENCY_BOUNDS) else None
                approx_sum += count * (bound if bound else LATENCY_BOUNDS[-1]) / (2 if b else 1)
                le = f"{bound:.9g}" if bound is not None else "+Inf"
                out.append(f'pvbus_queue_latency_seconds_bucket{{{labels},le="{le}"}} {total}')
            out.append(f"pvbus_queue_latency_seconds_sum{{{labels}}} {approx_sum:.9g}")
            out.append(f"pvbus_queue_latency_seconds_count{{{labels}}} {total}")
    out.append("# HELP pvbus_device_connected 1 while a vhost-user frontend is connected.")
    out.append("# TYPE pvbus_device_connected gauge")
    for dev, (dtype, snap) in snapshots.items():
        out.append(f'pvbus_device_connected{{device="{dev}",type="{dtype}"}} {int(snap.connected)}')
    return "\n".join(out) + "\n"


def create_app(run_dir: Path) -> FastAPI:
    """The API app; the :class:`Bus` starts and stops with the app's lifespan."""
    bus = Bus(run_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bus.start()
        try:
            yield
        finally:
            await bus.close()

    app = FastAPI(
        title="pvbus",
        version=__version__,
        summary="The PV bus: paravirtual devices, VMs and hot-plug over vhost-user.",
        lifespan=lifespan,
    )
    app.state.bus = bus
    create_model = _create_models()

    @app.exception_handler(BusError)
    async def bus_error(request: Request, exc: BusError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/types", summary="Device types and their config schemas")
    async def list_types() -> dict[str, Any]:
        return {
            name: {
                "capabilities": t.capabilities,
                "qemu_driver": t.qemu.driver if t.qemu else None,
                "config_schema": t.config_model.model_json_schema(),
            }
            for name, t in device_types().items()
        }

    @app.get("/devices", summary="List devices")
    async def list_devices() -> list[dict[str, Any]]:
        return [d.info() for d in bus.devices.values()]

    async def create_device(body: Any) -> dict[str, Any]:
        rec = await bus.create_device(
            body.type, body.config, dev_id=body.id, coalesce=body.coalesce
        )
        return rec.info()

    # The body's model is built at run time from the device types, so it is set by hand here.
    create_device.__annotations__["body"] = create_model
    app.post("/devices", status_code=201, summary="Create a device (starts its worker)")(
        create_device
    )

    @app.get("/devices/{dev_id}", summary="Inspect a device")
    async def get_device(dev_id: str) -> dict[str, Any]:
        return bus.device(dev_id).info()

    @app.delete("/devices/{dev_id}", status_code=204, summary="Delete a detached device")
    async def delete_device(dev_id: str) -> None:
        await bus.delete_device(dev_id)

    @app.put("/devices/{dev_id}/attachment", summary="Hot-plug a device into a VM")
    async def attach(dev_id: str, body: Attachment) -> dict[str, Any]:
        return (await bus.attach(dev_id, body.vm)).info()

    @app.delete("/devices/{dev_id}/attachment", summary="Hot-unplug a device from its VM")
    async def detach(dev_id: str) -> dict[str, Any]:
        return (await bus.detach(dev_id)).info()

    @app.get("/devices/{dev_id}/stats", summary="Counters of one device, per queue")
    async def device_stats(dev_id: str) -> dict[str, Any]:
        return bus.snapshot(dev_id).to_dict()

    @app.get("/stats", summary="Counters of every device, per queue")
    async def all_stats() -> dict[str, Any]:
        return {d.id: {"type": d.type.name, **d.snapshot().to_dict()} for d in bus.devices.values()}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> PlainTextResponse:
        snaps = {d.id: (d.type.name, d.snapshot()) for d in bus.devices.values()}
        return PlainTextResponse(
            prometheus_text(snaps), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/vms", summary="List VMs")
    async def list_vms() -> list[dict[str, Any]]:
        return [v.info() for v in bus.vms.values()]

    @app.post("/vms", status_code=201, summary="Start a VM, or adopt one by its QMP socket")
    async def start_vm(spec: VmSpec) -> dict[str, Any]:
        return (await bus.start_vm(spec)).info()

    @app.get("/vms/{vm_id}", summary="Inspect a VM (with QEMU's chardevs, from query-chardev)")
    async def get_vm(vm_id: str) -> dict[str, Any]:
        return {**bus.vm(vm_id).info(), "chardevs": await bus.chardevs(vm_id)}

    @app.delete("/vms/{vm_id}", status_code=204, summary="Stop (or release an adopted) VM")
    async def stop_vm(vm_id: str) -> None:
        await bus.stop_vm(vm_id)

    @app.get(
        "/events",
        summary="Event stream (text/event-stream), or the kept events as JSON with follow=false",
    )
    async def events(
        since: Annotated[int, Query(ge=0)] = 0,
        follow: bool = True,
    ) -> Any:
        bus.observe()
        if not follow:
            return [e.to_dict() for e in bus.events.since(since)]

        async def stream() -> AsyncIterator[bytes]:
            seq = since
            yield b": pvbus events\n\n"
            while not bus.events.closed:
                batch = await bus.events.wait(seq, 15.0)
                if not batch:
                    yield b": keep-alive\n\n"
                    continue
                for e in batch:
                    seq = e.seq
                    data = json.dumps(e.to_dict())
                    yield f"id: {e.seq}\nevent: {e.type}\ndata: {data}\n\n".encode()
            await asyncio.sleep(0)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app
