"""A client of the bus daemon's API over its Unix socket (httpx), used by the CLI and tests."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

__all__ = ["BusClient", "ClientError", "NoDaemonError", "default_api_socket"]


def default_api_socket() -> Path:
    """``$PVBUS_API_SOCKET``, else ``/run/pvbus/api.sock`` for root, else
    ``$XDG_RUNTIME_DIR/pvbus/api.sock`` (or ``/tmp/pvbus-<uid>/api.sock``)."""
    env = os.environ.get("PVBUS_API_SOCKET")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/pvbus/api.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/pvbus-{os.geteuid()}"
    return Path(runtime) / "pvbus" / "api.sock"


class ClientError(Exception):
    """The daemon refused a request; the message is its one-line reason."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class NoDaemonError(ClientError):
    """Nothing listens on the API socket."""


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail:
        first = detail[0]
        loc = ".".join(str(p) for p in first.get("loc", ())[1:])
        return f"{loc}: {first.get('msg', 'invalid')}" if loc else str(first.get("msg"))
    return str(detail or response.reason_phrase)


class BusClient:
    """Calls to the daemon at ``api_socket``."""

    def __init__(self, api_socket: Path | None = None, timeout: float = 300.0) -> None:
        self.api_socket = api_socket or default_api_socket()
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.api_socket)),
            base_url="http://pvbus",
            timeout=timeout,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> BusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; the decoded JSON body (None for 204)."""
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.TransportError) as err:
            if isinstance(err, httpx.ConnectError) or not self.api_socket.exists():
                raise NoDaemonError(
                    f"no pvbus daemon on {self.api_socket} (start one with `pvbus daemon`)", 0
                ) from err
            raise ClientError(f"daemon connection failed: {err}", 0) from err
        if response.status_code >= 400:
            raise ClientError(_detail(response), response.status_code)
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    # -- resources --------------------------------------------------------------------------

    def add_device(
        self,
        type_name: str,
        config: dict[str, Any],
        dev_id: str | None = None,
        coalesce: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"type": type_name, "config": config}
        if dev_id is not None:
            body["id"] = dev_id
        if coalesce is not None:
            body["coalesce"] = coalesce
        result: dict[str, Any] = self.request("POST", "/devices", json=body)
        return result

    def devices(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/devices")
        return result

    def device(self, dev_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/devices/{dev_id}")
        return result

    def remove_device(self, dev_id: str) -> None:
        self.request("DELETE", f"/devices/{dev_id}")

    def attach(self, dev_id: str, vm: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "PUT", f"/devices/{dev_id}/attachment", json={"vm": vm}
        )
        return result

    def detach(self, dev_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("DELETE", f"/devices/{dev_id}/attachment")
        return result

    def start_vm(self, **spec: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/vms", json=spec)
        return result

    def vms(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/vms")
        return result

    def vm(self, vm_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/vms/{vm_id}")
        return result

    def stop_vm(self, vm_id: str) -> None:
        self.request("DELETE", f"/vms/{vm_id}")

    def stats(self, dev_id: str | None = None) -> dict[str, Any]:
        path = f"/devices/{dev_id}/stats" if dev_id else "/stats"
        result: dict[str, Any] = self.request("GET", path)
        return result

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """Events kept by the daemon, numbered above ``since``."""
        result: list[dict[str, Any]] = self.request(
            "GET", "/events", params={"since": since, "follow": "false"}
        )
        return result

    def follow_events(self, since: int = 0) -> Iterator[dict[str, Any]]:
        """Events as they happen (server-sent events), until the daemon stops."""
        try:
            with self._http.stream(
                "GET", "/events", params={"since": since}, timeout=httpx.Timeout(5, read=None)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(_detail(response), response.status_code)
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        event: dict[str, Any] = json.loads(line[6:])
                        yield event
        except httpx.ConnectError as err:
            raise NoDaemonError(f"no pvbus daemon on {self.api_socket}", 0) from err
        except httpx.RemoteProtocolError:
            return
