"""A Kubernetes API emulator for end-to-end tests and the demo (see docs/localapi.md)."""

from .errors import ApiError
from .faults import Faults, RequestLog, RequestRecord, Restart
from .hostile import Hostile
from .rbac import Rule, User, load_users
from .resources import CORE_EVENTS, EVENTS_V1, NAMESPACES, NODES, PODS, ResourceType
from .server import LocalAPIServer, ThreadedServer
from .store import Store

__all__ = [
    "CORE_EVENTS",
    "EVENTS_V1",
    "NAMESPACES",
    "NODES",
    "PODS",
    "ApiError",
    "Faults",
    "Hostile",
    "LocalAPIServer",
    "RequestLog",
    "RequestRecord",
    "ResourceType",
    "Restart",
    "Rule",
    "Store",
    "ThreadedServer",
    "User",
    "load_users",
]
