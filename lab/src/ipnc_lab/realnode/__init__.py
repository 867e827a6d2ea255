"""The real-node test tier's harness: a real kube-apiserver, kubelet and containerd on this machine,
private to one run (tests/realnode, bench/realnode_bench.py; docs/realnode.md)."""
