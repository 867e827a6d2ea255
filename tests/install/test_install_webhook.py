"""The webhook over real TLS (throwaway CA, certificate for 127.0.0.1) with AdmissionReview v1 requests."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
from install_helpers import injected_pod
from pss_rules import restricted_violations

from ipnc_lab.localapi.tls import generate_certificates
from istio_pod_network_controller.install.injection import InjectOptions
from istio_pod_network_controller.install.webhook.listener import Limits
from istio_pod_network_controller.install.webhook.patch import pod_patch
from istio_pod_network_controller.install.webhook.server import serving
from istio_pod_network_controller.settings import annotations as ann


def make_pki(directory: Path, serial: int = 1) -> Path:
    """A fresh throw-away CA and a server certificate for 127.0.0.1 (the emulator's generator), written as
    tls.crt / tls.key; returns the CA file, named by `serial` so a rotation keeps the old one to test with."""
    pki = generate_certificates()
    (directory / "tls.crt").write_bytes(pki.cert_pem)
    (directory / "tls.key").write_bytes(pki.key_pem)
    ca_file = directory / f"ca{serial}.crt"
    ca_file.write_bytes(pki.ca_pem)
    return ca_file


class Hook:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def post(self, body: bytes | str | dict[str, Any]) -> tuple[int, Any]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        async with self.session.post(
            self.url + "/mutate", data=data, headers={"Content-Type": "application/json"}
        ) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text


@pytest.fixture
async def hook(tmp_path: Path) -> AsyncIterator[Hook]:
    ca_file = make_pki(tmp_path)
    options = InjectOptions(image="r/ipnc:test", extra_args=("--outbound-port=15011",))
    async with serving(options, "127.0.0.1", 0, str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")) as (
        _runner,
        port,
    ):
        context = ssl.create_default_context(cafile=str(ca_file))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            yield Hook(session, f"https://127.0.0.1:{port}")


def review(pod: Any, uid: str = "7c5c1d0e-0000-4000-8000-000000000001", **request: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bookinfo",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            **request,
        },
    }


async def test_istio_pod_is_rewritten_with_a_clean_json_patch(hook: Hook) -> None:
    pod = injected_pod()
    status, answer = await hook.post(review(pod))
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "7c5c1d0e-0000-4000-8000-000000000001"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    patched = jsonpatch.apply_patch(pod, patch)
    assert pod == injected_pod()  # apply_patch copies
    assert restricted_violations(patched["spec"], patched["metadata"]) == []
    inits = patched["spec"]["initContainers"]
    assert [c["name"] for c in inits] == [ann.WAITER_CONTAINER]
    assert inits[0]["args"][-1] == "--outbound-port=15011"
    assert patched["spec"]["containers"] == pod["spec"]["containers"]
    assert json.loads(patched["metadata"]["annotations"][ann.SIDECAR_STATUS])["initContainers"] == [
        ann.WAITER_CONTAINER
    ]


async def test_reinvocation_changes_nothing(hook: Hook) -> None:
    pod = injected_pod()
    _, first = await hook.post(review(pod))
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(first["response"]["patch"])))
    status, second = await hook.post(review(patched))
    assert status == 200
    assert second["response"] == {"uid": second["response"]["uid"], "allowed": True}


async def test_pod_without_annotations_or_volumes_gets_them_added(hook: Hook) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "x-"},
        "spec": {
            "initContainers": [
                {"name": "istio-init", "image": "proxyv2", "args": ["istio-iptables", "-m", "TPROXY"]}
            ],
            "containers": [{"name": "app", "image": "app"}],
        },
    }
    _, answer = await hook.post(review(pod))
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    patched = jsonpatch.apply_patch(pod, patch)
    assert patched["metadata"]["annotations"] == {ann.INTERCEPTION_MODE: "TPROXY"}
    assert patched["spec"]["volumes"][0]["name"] == "podinfo"


async def test_annotation_keys_with_slashes_are_escaped(hook: Hook) -> None:
    pod = injected_pod()
    args = pod["spec"]["initContainers"][0]["args"]
    args[args.index("-x") + 1] = "10.0.0.1/32"
    _, answer = await hook.post(review(pod))
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    assert any(
        op["path"] == "/metadata/annotations/traffic.sidecar.istio.io~1excludeOutboundIPRanges"
        for op in patch
    )
    assert jsonpatch.apply_patch(pod, patch)["metadata"]["annotations"][ann.EXCLUDE_OUTBOUND_IP_RANGES] == (
        "10.0.0.1/32"
    )


@pytest.mark.parametrize(
    "request_fields",
    [
        {"operation": "UPDATE"},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
        {
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "subResource": "ephemeralcontainers",
        },
    ],
)
async def test_other_requests_are_allowed_unchanged(hook: Hook, request_fields: dict[str, Any]) -> None:
    status, answer = await hook.post(review(injected_pod(), **request_fields))
    assert status == 200
    assert answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]


async def test_non_mesh_pod_is_allowed_unchanged(hook: Hook) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a"}]},
    }
    _, answer = await hook.post(review(pod))
    assert answer["response"] == {"uid": answer["response"]["uid"], "allowed": True}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {"uid": "x"}}',
            "v1",
        ),
        (b'{"kind": "Pod", "apiVersion": "admission.k8s.io/v1"}', "kind must be AdmissionReview"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', "request is missing"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": 5}}', "uid"),
    ],
)
async def test_malformed_reviews_are_400(hook: Hook, body: bytes, reason: str) -> None:
    status, text = await hook.post(body)
    assert status == 400
    assert reason in text


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        (None, "not a Pod object"),
        ("pod", "not a Pod object"),
        ({"metadata": [], "spec": {}}, "metadata"),
        ({"metadata": {}}, "spec"),
        ({"metadata": {}, "spec": {"initContainers": {"name": "istio-init"}}}, "must be a list"),
        (
            {"metadata": {"annotations": "x"}, "spec": {"initContainers": [{"name": "istio-init"}]}},
            "annotations",
        ),
        (
            {"metadata": {}, "spec": {"initContainers": [{"name": "istio-init", "args": "istio-iptables"}]}},
            "must be a list",
        ),
    ],
)
async def test_malformed_pods_are_denied_with_a_reason(hook: Hook, pod: Any, reason: str) -> None:
    status, answer = await hook.post(review(copy.deepcopy(pod)))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert reason in response["status"]["message"]


async def test_health_and_wrong_methods(hook: Hook) -> None:
    async with hook.session.get(hook.url + "/healthz") as response:
        assert response.status == 200
    async with hook.session.get(hook.url + "/readyz") as response:
        assert response.status == 200
    async with hook.session.get(hook.url + "/mutate") as response:
        assert response.status == 405
    # the server is still fine after everything above
    status, _ = await hook.post(review(injected_pod()))
    assert status == 200


async def test_plain_http_is_refused(hook: Hook) -> None:
    plain = hook.url.replace("https://", "http://")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(plain + "/mutate", data=b"{}") as response:
                await response.read()


async def test_certificate_rotation(tmp_path: Path) -> None:
    ca1 = make_pki(tmp_path, serial=1)
    async with serving(
        InjectOptions(), "127.0.0.1", 0, str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), 0.05
    ) as (
        _runner,
        port,
    ):
        import asyncio

        url = f"https://127.0.0.1:{port}/healthz"
        for ca, expect_ok in ((ca1, True),):
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca)))
                ) as session,
                session.get(url) as response,
            ):
                assert (response.status == 200) is expect_ok
        ca2 = make_pki(tmp_path, serial=10)  # rotate: new CA, new pair in place
        await asyncio.sleep(0.3)
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca2)))
            ) as session,
            session.get(url) as response,
        ):
            assert response.status == 200
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca1)))
        ) as session:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(url)


def test_pod_patch_add_replace_remove() -> None:
    before = {"metadata": {"annotations": {"a/b": "1", "gone": "x"}}, "spec": {"x": 1, "y": [1], "old": True}}
    after = {"metadata": {"annotations": {"a/b": "2", "new~": "3"}}, "spec": {"x": 1, "y": [2], "z": {}}}
    assert jsonpatch.apply_patch(before, pod_patch(before, after)) == after
    assert pod_patch(after, after) == []
    assert jsonpatch.apply_patch(
        {"spec": {}}, pod_patch({"spec": {}}, {"metadata": {"annotations": {"k": "v"}}, "spec": {}})
    ) == {
        "spec": {},
        "metadata": {"annotations": {"k": "v"}},
    }


def test_chart_passes_the_release_namespace_and_never_trust() -> None:
    """The waiter's timeout advice must name the namespace the chart really installed into."""
    from install_helpers import one, render

    objects = render({"Namespace": "", "webhook": {"enabled": True, "tls": {"mode": "generate"}}},
                     namespace="mesh-system")  # fmt: skip
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--controller-namespace=mesh-system" in args
    assert not any("trust-annotation" in a for a in args)
    config_map = next(
        o for o in objects if o["kind"] == "ConfigMap" and "injection-template" in o["metadata"]["name"]
    )
    import yaml

    waiter = yaml.safe_load(config_map["data"]["ipnc.yaml"])["spec"]["initContainers"][1]
    at = waiter["args"].index("--controller-namespace")
    assert waiter["args"][at + 1] == "mesh-system"
    assert not any("trust-annotation" in a for a in waiter["args"])


def test_webhook_refuses_to_inject_trust_annotation() -> None:
    from click.testing import CliRunner

    from istio_pod_network_controller.cli import cli

    result = CliRunner().invoke(cli, ["webhook", "--waiter-arg=--trust-annotation"])
    assert result.exit_code == 2
    assert "--trust-annotation is never injected" in result.output
    with pytest.raises(ValueError, match="never injected"):
        InjectOptions(extra_args=("--trust-annotation",))


@pytest.mark.parametrize(
    ("where", "value", "named"),
    [
        ("annotation", "tproxy", "annotation sidecar.istio.io/interceptionMode: invalid value 'tproxy'"),
        (
            "istio-init",
            "tproxy",
            "istio-init argument --istio-inbound-interception-mode: invalid value 'tproxy'",
        ),
        (
            "istio-init-x",
            "10.0.0.0/8\n-A ISTIO_OUTPUT -j ACCEPT",
            "istio-init argument --istio-service-exclude-cidr",
        ),
    ],
)
async def test_values_the_controller_refuses_are_denied_at_admission(
    hook: Hook, where: str, value: str, named: str
) -> None:
    """Webhook and controller read settings with the same parsers: what the controller refuses is denied here,
    instead of a pod that keeps NET_ADMIN on its sidecar and then never gets capture."""
    pod = injected_pod()
    if where == "annotation":
        pod["metadata"]["annotations"][ann.INTERCEPTION_MODE] = value
    else:
        init = next(c for c in pod["spec"]["initContainers"] if c["name"] == ann.ISTIO_INIT_CONTAINER)
        flag = "-m" if where == "istio-init" else "-x"
        init["args"][init["args"].index(flag) + 1] = value
    status, answer = await hook.post(review(pod))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is False and response["status"]["code"] == 400
    assert named in response["status"]["message"]
    assert "\n" not in response["status"]["message"]  # the tenant's newline is shown escaped (repr)


async def test_at_the_cap_idle_connections_make_room_and_a_request_in_progress_is_kept(
    tmp_path: Path,
) -> None:
    """Cap 3: a request whose body is still arriving survives six newcomers; the idle ones are closed."""
    ca_file = make_pki(tmp_path)
    options = InjectOptions(image="r/ipnc:test")
    cert, key = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    async with serving(options, "127.0.0.1", 0, cert, key, limits=Limits(max_connections=3)) as (_, port):
        context = ssl.create_default_context(cafile=str(ca_file))

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port, ssl=context)

        body = json.dumps(review(injected_pod())).encode()
        reader, writer = await connect()
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])  # fmt: skip
        await writer.drain()
        idle = [await connect() for _ in range(2)]  # by their handshakes' end the headers above are in
        newcomers = [await connect() for _ in range(6)]
        closed = [await r.read(1) for r, _ in [*idle, *newcomers[:4]]]  # the oldest idle ones, in order
        assert closed == [b""] * 6
        writer.write(body[10:])
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        for _, w in [(reader, writer), *idle, *newcomers]:
            w.close()
