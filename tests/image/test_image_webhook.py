"""The webhook from the image with the chart's Deployment container (uid 65532, no capabilities, read-only
root), answering an AdmissionReview over TLS with a certificate mounted where the chart mounts its Secret."""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from image_helpers import ROOT, Containers, render_chart, security_flags, volume_flags, with_arg, workload

from ipnc_lab.localapi.tls import generate_certificates
from ipnc_lab.sim.controller import free_port, wait_for
from istio_pod_network_controller.settings import annotations as ann

pytestmark = pytest.mark.root
KUBE_INJECT = ROOT / "tests" / "install" / "fixtures" / "kube-inject-bookinfo.yaml"


def istio_injected_pod() -> dict[str, Any]:
    """A pod as Istio's injector leaves it (kube-inject output of bookinfo), with istio-init."""
    deployment = next(
        d for d in yaml.safe_load_all(KUBE_INJECT.read_text()) if d and d["kind"] == "Deployment"
    )
    template = deployment["spec"]["template"]
    metadata = {**template["metadata"], "name": "details-v1-abc", "namespace": "bookinfo"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def review(pod: dict[str, Any]) -> bytes:
    request = {
        "uid": "5d1e0b1a-0000-4000-8000-000000000016",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "bookinfo",
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod,
    }
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()


def certificates(folder: Path) -> Path:
    """tls.crt/tls.key for 127.0.0.1 as the chart's Secret volume holds them; returns the CA file."""
    pki = generate_certificates()
    folder.mkdir()
    (folder / "tls.crt").write_bytes(pki.cert_pem)
    (folder / "tls.key").write_bytes(pki.key_pem)
    for path in (folder / "tls.crt", folder / "tls.key"):
        os.chmod(path, 0o644)  # a throw-away key; uid 65532 must read it, as from a Secret volume
    os.chmod(folder, 0o755)  # noqa: S103
    ca = folder.parent / "ca.crt"
    ca.write_bytes(pki.ca_pem)
    return ca


def test_webhook_from_image_answers_an_admission_review(
    image: str, run_container: Containers, tmp_path: Path
) -> None:
    pod_spec = workload(render_chart({"webhook": {"enabled": True}}), "Deployment")["spec"]["template"][
        "spec"
    ]
    (container,) = pod_spec["containers"]
    assert container["image"] == image
    port = free_port()
    context = ssl.create_default_context(cafile=str(certificates(tmp_path / "certs")))
    flags = [
        *security_flags(pod_spec, container),
        *volume_flags(pod_spec, container, {"certs": tmp_path / "certs"}),
        "--network", "host",
    ]  # fmt: skip
    webhook = run_container.run(flags, with_arg(container["args"], "--listen-address", f"127.0.0.1:{port}"))
    url = f"https://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/readyz", context=context, timeout=5) as answer:  # noqa: S310
                return int(answer.status) == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    wait_for(ready, 60, f"webhook /readyz over TLS\n{webhook.logs()}", 0.2)
    pod = istio_injected_pod()
    request = urllib.request.Request(  # noqa: S310 - https on loopback
        f"{url}/mutate", data=review(pod), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as answer:  # noqa: S310
        response = json.loads(answer.read())["response"]
    assert response["uid"] == "5d1e0b1a-0000-4000-8000-000000000016" and response["allowed"] is True
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    (waiter,) = patched["spec"]["initContainers"]
    assert waiter["name"] == ann.WAITER_CONTAINER and waiter["image"] == image
    assert waiter["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert webhook.inspect()["HostConfig"]["ReadonlyRootfs"] is True
    assert "Traceback" not in webhook.logs()
