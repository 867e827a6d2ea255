"""A simulated node for the demo, the end-to-end tests and the benchmarks: real namespaces, real
processes in kubelet-style cgroups, real listeners and real clients."""
