"""The waiter: the first init container of a mesh pod, which exits 0 once the pod's traffic is captured.

Everything under this package is on the pod's start-up path and imports only the standard library plus the
stdlib-only modules spec, downward, annotations and errors (see docs/waiter.md).
"""
