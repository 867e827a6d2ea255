"""The node's pod network: a bridge of its own with a pod subnet and a service subnet nobody else
routes, and a TCP relay standing in for kube-proxy for the `kubernetes` Service (the pods' way to the API).

Only the bridge gets addresses; pods get no default route (only the service subnet, via the bridge), there is
no NAT and no forwarding change: everything stays on this machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Subnets:
    pods: ipaddress.IPv4Network
    services: ipaddress.IPv4Network

    @property
    def gateway(self) -> str:
        """The bridge's address: the node's InternalIP and the pods' next hop to the services."""
        return str(self.pods.network_address + 1)

    @property
    def api_service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP (the API server takes the range's first address)."""
        return str(self.services.network_address + 1)


def _ip_json(*args: str) -> list[dict[str, object]]:
    done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
    result: list[dict[str, object]] = json.loads(done.stdout or "[]")
    return result


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = str(route.get("dst", ""))
        if dst and dst != "default":
            used.append(ipaddress.ip_network(dst, strict=False))
    for link in _ip_json("-4", "addr"):
        for info in link.get("addr_info", []):  # type: ignore[attr-defined]
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    return [n for n in used if isinstance(n, ipaddress.IPv4Network)]


def choose_subnets() -> Subnets:
    """Two adjacent /24s in 10.64.0.0/10 that no route or address of this machine overlaps (random, so that
    parallel runs pick different ones)."""
    used = _used_networks()
    for _ in range(200):
        base = ipaddress.ip_network(f"10.{64 + secrets.randbelow(64)}.{2 * secrets.randbelow(128)}.0/23")
        if not any(base.overlaps(n) for n in used):
            pods, services = (ipaddress.IPv4Network(n) for n in base.subnets(new_prefix=24))
            return Subnets(pods, services)
    raise RuntimeError("no free /23 in 10.64.0.0/10 for the node's pods and services")


def free_port() -> int:
    """A TCP port on loopback nobody listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def add_bridge(name: str, subnets: Subnets) -> None:
    """The bridge with a MAC address of its own: left unset, a bridge takes the lowest MAC of its ports, so it
    changes as pods come and go and the pods' neighbour entries for their gateway go stale (their traffic to
    the node, the API relay included, is then dropped until they resolve it again)."""
    mac = "02:" + ":".join(f"{secrets.randbelow(256):02x}" for _ in range(5))
    subprocess.run(["ip", "link", "add", name, "address", mac, "type", "bridge"], check=True)
    subprocess.run(
        ["ip", "addr", "add", f"{subnets.gateway}/{subnets.pods.prefixlen}", "dev", name], check=True
    )
    subprocess.run(["ip", "addr", "add", f"{subnets.api_service_ip}/32", "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


def delete_bridge(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


class ServiceRelay:
    """LISTEN_IP:443 → 127.0.0.1:PORT, byte for byte, in a thread of its own (stops with `close`)."""

    def __init__(self, listen_ip: str, listen_port: int, target_port: int) -> None:
        self._listen = (listen_ip, listen_port)
        self._target = target_port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="service-relay", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            server = self._loop.run_until_complete(asyncio.start_server(self._handle, *self._listen))
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, target_writer), _pipe(target_reader, writer))

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
