"""What the real-node tests share: the session's node, and a fresh namespace per test."""

from __future__ import annotations

from dataclasses import dataclass

from ipnc_lab.realnode import workloads as wl
from ipnc_lab.realnode.kubeapi import KubeAPI, wait_for
from ipnc_lab.realnode.node import RealNode
from ipnc_lab.sim.cluster import unique_name


@dataclass
class Tier:
    node: RealNode
    api: KubeAPI
    service_ca: str

    def namespace(self) -> str:
        name = unique_name("mesh")
        wl.ensure_namespace(self.api, name, self.service_ca)
        return name

    def delete_pods(self, namespace: str) -> None:
        for pod in self.api.pods(namespace):
            self.api.delete(f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}", grace=0)
        wait_for(
            f"the pods of {namespace} gone", lambda: not self.api.pods(namespace), timeout=120, interval=0.5
        )
