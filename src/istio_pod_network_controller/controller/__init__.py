"""The node controller behind `istio-pod-network-controller run` (see docs/controller.md)."""
