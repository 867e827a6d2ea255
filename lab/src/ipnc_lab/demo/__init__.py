"""`istio-pod-network-controller demo`: the whole system on one machine, with real namespaces and traffic."""
