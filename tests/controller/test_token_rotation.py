"""In-cluster credentials: the controller's client re-reads the service-account token file when the API
server answers 401, so a token rotated by the kubelet (old one revoked) does not stop it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipnc_lab.localapi import LocalAPIServer
from ipnc_lab.localapi.server import ThreadedServer
from istio_pod_network_controller.controller.kube import ApiStatusError, KubeClient, load_config
from istio_pod_network_controller.controller.metrics import Metrics
from istio_pod_network_controller.install import rbac


@pytest.fixture
def tls_api() -> Iterator[ThreadedServer]:
    api = LocalAPIServer(tls=True).start_in_thread()
    try:
        yield api
    finally:
        api.stop()


async def test_rotated_token_is_picked_up_after_a_401(
    tls_api: ThreadedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    tls_api.add_user("system:serviceaccount:ipnc:controller", old, rbac.cluster_role_rules())
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(old)
    (account / "namespace").write_text("istio-pod-network-controller")
    ca = tls_api.api.ca_pem
    assert ca is not None
    (account / "ca.crt").write_bytes(ca)
    host, port = tls_api.url.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    client = KubeClient(load_config(None, str(account)), Metrics())
    try:
        await client.list("/api/v1/pods", {"fieldSelector": "spec.nodeName=n1"})
        # the kubelet rotates the token: new file content, the old token revoked by the API server
        tls_api.add_user("system:serviceaccount:ipnc:controller", new, rbac.cluster_role_rules())
        (account / "token").write_text(new)
        tls_api.api.revoke_token(old)
        items, _ = await client.list("/api/v1/pods", {"fieldSelector": "spec.nodeName=n1"})
        assert items == []
        records = [r for r in tls_api.requests.records() if r.path == "/api/v1/pods"]
        assert [(r.status, r.user) for r in records] == [
            (200, "system:serviceaccount:ipnc:controller"),
            (401, None),  # the old token, revoked
            (200, "system:serviceaccount:ipnc:controller"),  # the new token, read from the file after the 401
        ]
        # and a revoked token with no new file stays an error, not a silent success
        tls_api.api.revoke_token(new)
        with pytest.raises(ApiStatusError) as caught:
            await client.list("/api/v1/pods", {})
        assert caught.value.code == 401
    finally:
        await client.close()
