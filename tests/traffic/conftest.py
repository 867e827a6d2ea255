"""Fixtures of the traffic tests; the harness itself is traffic_harness.py (a unique module name, so test
modules can import its types whichever other conftest.py pytest loaded first)."""

from traffic_harness import _no_leftover_namespaces, backend, capture, stack, stack_capture, stack_topo, topo

__all__ = ["_no_leftover_namespaces", "backend", "capture", "stack", "stack_capture", "stack_topo", "topo"]
