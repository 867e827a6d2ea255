"""ControllerConfig: everything `run` was told by flags and environment, validated once at start-up."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..dataplane.apply import BackendChoice
from ..errors import ControllerError
from ..settings.istio import given_cidr_notices
from ..settings.spec import SETTINGS_BY_NAME, Given, build_spec
from .cpus import usable_cpus
from .selection import SelectionOptions

log = logging.getLogger(__name__)
LEGACY_SPEC_FLAGS: dict[str, str] = {
    "--istio-inbound-interception-mode": "interception_mode",
    "--istio-include-outbound-ip-ranges": "include_outbound_ip_ranges",
    "--istio-exclude-outbound-ip-ranges": "exclude_outbound_ip_ranges",
    "--istio-exclude-inbound-ports": "exclude_inbound_ports",
}
"""The one table of 2018 `run` flags: flag -> spec setting. The modern flag for the same setting wins when
both are given; `run` derives its options from this table."""


class ConfigError(ControllerError, ValueError):
    """A flag or environment value that stops the controller from starting."""


@dataclass(frozen=True, slots=True)
class WatchTuning:
    """Server-side watch timeout (jittered), the inactivity watchdog and the relist jitter."""

    timeout: float = 300.0
    jitter: float = 0.2
    inactivity: float = 120.0
    relist_jitter: float = 2.0


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    node_name: str
    kubeconfig: str | None = None
    proc_root: str = "/proc"
    backend: BackendChoice = "auto"
    listen_host: str = "0.0.0.0"  # noqa: S104 - the metrics port is scraped from outside the pod
    listen_port: int = 9102
    concurrency: int = 2
    repair_interval: float = 60.0
    netns_deadline: float = 120.0
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    spec_defaults: Mapping[str, Given] = field(default_factory=dict)
    """Controller-wide settings, each with the flag or variable it came from (named in every refusal)."""
    ignore_pod_overrides: bool = False
    """Drop the pods' annotations.GATEABLE_OVERRIDES and every proxy id settings.proxyids does not admit:
    the controller-wide values apply instead."""
    log_level: str = "info"
    log_format: str = "json"
    shutdown_grace: float = 25.0
    watch: WatchTuning = field(default_factory=WatchTuning)


MAX_DEFAULT_CONCURRENCY = 4
"""The default's cap: the project's sweep (docs/benchmarks.md) shows throughput falling past 2 workers on 2
cores; the work is mostly waiting on rule tools and the API, so more workers add contention, not speed."""


def default_concurrency(cpus: int | None = None) -> int:
    """2 x the CPUs the container may use (its CPU limit, not the node's cores), between 2 and the cap."""
    usable = cpus if cpus is not None else usable_cpus()
    return max(2, min(MAX_DEFAULT_CONCURRENCY, 2 * usable))


def parse_listen(address: str, flag: str = "--listen-address") -> tuple[str, int]:
    """host:port or [v6]:port (empty host: all addresses); the one parser of every listen flag."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag}: invalid value {address!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104


def legacy_param(flag: str) -> str:
    """The click parameter name of a 2018 flag."""
    return "legacy_" + LEGACY_SPEC_FLAGS[flag]


def spec_defaults(modern: Mapping[str, Given | None], legacy: Mapping[str, str | None]) -> dict[str, Given]:
    """Merge modern settings (by setting name) over 2018 ones (by 2018 flag), dropping unset values."""
    merged = {
        LEGACY_SPEC_FLAGS[flag]: Given(value, flag) for flag, value in legacy.items() if value is not None
    }
    merged.update({name: given for name, given in modern.items() if given is not None})
    unknown = set(merged) - set(SETTINGS_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown spec settings {sorted(unknown)}")
    return merged


def check_spec_defaults(defaults: Mapping[str, Given]) -> None:
    """Parse the defaults once now, so a bad flag stops start-up instead of failing every pod; say once
    which CIDRs had host bits, masked as Istio masks them."""
    build_spec({}, defaults)
    for notice in given_cidr_notices(defaults):
        log.warning("%s", notice)
