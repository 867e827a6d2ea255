"""Installs Istio traffic capture into mesh pods from the node, so the pods need no NET_ADMIN."""
