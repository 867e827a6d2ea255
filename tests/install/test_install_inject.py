"""`inject` and the shared rewrite: Istio-injected workloads lose istio-init and pass PSS restricted."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from install_helpers import KUBE_INJECT, injected_deployment, istio_init, status_annotation
from pss_rules import baseline_violations, restricted_violations

from istio_pod_network_controller.cli import cli
from istio_pod_network_controller.cli.inject import inject_stream, split_documents
from istio_pod_network_controller.errors import SpecError
from istio_pod_network_controller.install.injection import (
    ANNOTATED_SETTINGS,
    FLAG_SETTINGS,
    InjectionError,
    InjectOptions,
    needs_rewrite,
    rewrite_object,
    rewrite_pod,
)
from istio_pod_network_controller.rules import plan
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.istio import parse_istio_iptables_args, pod_spec
from istio_pod_network_controller.settings.spec import (
    SETTINGS_BY_NAME,
    SPEC_ANNOTATIONS,
    Given,
    InterceptionMode,
    build_spec,
)

OPTIONS = InjectOptions(image="registry.example/ipnc:test")


def capabilities_added(spec: dict) -> set[str]:
    added: set[str] = set()
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            added |= set(
                ((container.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
            )
    return added


def test_fixture_is_not_restricted_before_the_rewrite(deployment: dict) -> None:
    spec = deployment["spec"]["template"]["spec"]
    violations = restricted_violations(spec)
    assert any("istio-init" in v for v in violations)
    assert capabilities_added(spec) == {"NET_ADMIN", "NET_RAW"}


def test_rewrite_makes_the_pod_restricted(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    assert result.changed
    assert restricted_violations(result.spec, result.metadata) == []
    assert capabilities_added(result.spec) == set()
    names = [c["name"] for c in result.spec["initContainers"]]
    assert names == [ann.WAITER_CONTAINER]
    waiter = result.spec["initContainers"][0]
    assert waiter["image"] == "registry.example/ipnc:test"
    assert waiter["args"][:5] == ["wait", "--file", "/etc/podinfo/pod_annotations", "--timeout", "300"]
    assert waiter["securityContext"]["runAsUser"] == 1337
    podinfo = next(v for v in result.spec["volumes"] if v["name"] == "podinfo")
    assert podinfo["downwardAPI"]["items"] == [
        {"path": "pod_annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
    ]
    # the input is untouched, the app container and the proxy are unchanged
    assert istio_init(template["spec"])
    assert result.spec["containers"] == template["spec"]["containers"]
    status = json.loads(result.metadata["annotations"][ann.SIDECAR_STATUS])
    assert status["initContainers"] == [ann.WAITER_CONTAINER]
    assert "podinfo" in status["volumes"]
    # default istio-iptables arguments translate to no annotation at all
    added = set(result.metadata["annotations"]) - set(template["metadata"]["annotations"])
    assert added == set()


def test_rewrite_is_idempotent(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    first = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    second = rewrite_pod(first.metadata, first.spec, OPTIONS)
    assert not second.changed
    assert second.spec == first.spec
    assert not needs_rewrite(first.spec)
    assert first.spec["initContainers"][0]["name"] == ann.WAITER_CONTAINER


def test_app_init_containers_follow_the_waiter(deployment: dict) -> None:
    spec = deployment["spec"]["template"]["spec"]
    spec["initContainers"].insert(0, {"name": "migrate", "image": "app:1"})
    result = rewrite_pod(None, spec, OPTIONS)
    new_spec = result.spec
    assert result.changed
    assert [c["name"] for c in new_spec["initContainers"]] == [ann.WAITER_CONTAINER, "migrate"]


def test_non_restricted_app_is_not_fixed(deployment: dict) -> None:
    """The app's own containers are not the rewrite's business: a root app stays a root app."""
    template = deployment["spec"]["template"]
    app = template["spec"]["containers"][0]
    app["securityContext"] = {"runAsUser": 0, "capabilities": {"add": ["SYS_TIME"]}}
    before = copy.deepcopy(app)
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    assert result.spec["containers"][0] == before
    violations = restricted_violations(result.spec, result.metadata)
    assert violations and all("containers[details]" in v for v in violations)


def test_istio_init_arguments_become_annotations(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    args = istio_init(template["spec"])["args"]
    args[args.index("-i") + 1] = "10.0.0.0/8,172.16.0.0/12"
    args[args.index("-x") + 1] = "169.254.169.254/32"
    args[args.index("-d") + 1] = "15090,15021,15020,8443"
    args[args.index("-p") + 1] = "15011"
    args += ["-o", "5432", "--redirect-dns", "-k", "net1"]
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    annotations = result.metadata["annotations"]
    assert annotations[ann.INCLUDE_OUTBOUND_IP_RANGES] == "10.0.0.0/8,172.16.0.0/12"
    assert annotations[ann.EXCLUDE_OUTBOUND_IP_RANGES] == "169.254.169.254/32"
    assert annotations[ann.EXCLUDE_INBOUND_PORTS] == "8443"
    assert annotations[ann.EXCLUDE_OUTBOUND_PORTS] == "5432"
    assert annotations[ann.CAPTURE_DNS] == "true"
    assert annotations[ann.REROUTE_VIRTUAL_INTERFACES] == "net1"
    waiter = result.spec["initContainers"][0]
    assert waiter["args"][-2:] == ["--outbound-port", "15011"]
    assert any("--outbound-port 15011" in w for w in result.warnings)


def test_pod_annotations_win_over_istio_init_arguments(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    template["metadata"]["annotations"][ann.INCLUDE_OUTBOUND_IP_RANGES] = "10.1.0.0/16"
    args = istio_init(template["spec"])["args"]
    args[args.index("-i") + 1] = "10.1.0.0/16"
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    assert result.metadata["annotations"][ann.INCLUDE_OUTBOUND_IP_RANGES] == "10.1.0.0/16"


def test_tproxy_keeps_the_proxy_net_admin_with_a_warning(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    args = istio_init(template["spec"])["args"]
    args[args.index("-m") + 1] = "TPROXY"
    proxy = template["spec"]["containers"][1]
    proxy["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    assert result.metadata["annotations"][ann.INTERCEPTION_MODE] == "TPROXY"
    assert capabilities_added(result.spec) == {"NET_ADMIN"}
    assert any("TPROXY" in w for w in result.warnings)


def test_redirect_strips_net_admin_from_the_proxy(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    template["spec"]["containers"][1]["securityContext"]["capabilities"]["add"] = ["NET_ADMIN", "NET_RAW"]
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    assert capabilities_added(result.spec) == set()
    assert baseline_violations(result.spec) == []


def test_opt_out_and_custom_uid(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    template["metadata"]["annotations"]["pod-network-controller.istio.io/inject"] = "false"
    assert not rewrite_pod(template["metadata"], template["spec"], OPTIONS).changed
    del template["metadata"]["annotations"]["pod-network-controller.istio.io/inject"]
    args = istio_init(template["spec"])["args"]
    args[args.index("-u") + 1] = "2000"
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    assert result.metadata["annotations"][ann.ENVOY_USERID] == "2000"
    assert result.spec["initContainers"][0]["securityContext"]["runAsUser"] == 2000


def test_volume_name_clash_uses_the_fallback(deployment: dict) -> None:
    spec = deployment["spec"]["template"]["spec"]
    spec["volumes"].append({"name": "podinfo", "configMap": {"name": "app-podinfo"}})
    new_spec = rewrite_pod(None, spec, OPTIONS).spec
    mount = new_spec["initContainers"][0]["volumeMounts"][0]
    assert mount["name"] == "istio-pod-network-podinfo"
    assert {"name": "podinfo", "configMap": {"name": "app-podinfo"}} in new_spec["volumes"]


def test_malformed_pods_raise_injection_error() -> None:
    with pytest.raises(InjectionError):
        rewrite_pod({}, {"initContainers": {"name": "istio-init"}}, OPTIONS)
    with pytest.raises(InjectionError):
        rewrite_pod({"annotations": []}, {"initContainers": [{"name": "istio-init"}]}, OPTIONS)


def test_parse_istio_iptables_args_spellings() -> None:
    assert parse_istio_iptables_args(
        ["istio-iptables", "--envoy-port=15011", "-z", "15016", "--redirect-dns"]
    ) == {
        "outbound_port": Given("15011", "istio-init argument --envoy-port"),
        "inbound_port": Given("15016", "istio-init argument --inbound-capture-port"),
        "capture_dns": Given("true", "istio-init argument --redirect-dns"),
    }


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("StatefulSet", ("spec", "template")),
        ("DaemonSet", ("spec", "template")),
        ("ReplicaSet", ("spec", "template")),
        ("Job", ("spec", "template")),
        ("CronJob", ("spec", "jobTemplate", "spec", "template")),
    ],
)
def test_every_workload_kind(kind: str, path: tuple[str, ...]) -> None:
    template = injected_deployment()["spec"]["template"]
    obj: dict = {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "w"}}
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = template
    changed, _ = rewrite_object(obj, OPTIONS)
    assert changed
    node = obj
    for key in path:
        node = node[key]
    assert restricted_violations(node["spec"], node["metadata"]) == []


def test_pod_and_list() -> None:
    template = injected_deployment()["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}
    listed = {"apiVersion": "v1", "kind": "List", "items": [copy.deepcopy(pod), {"kind": "Service"}]}
    assert rewrite_object(pod, OPTIONS)[0]
    assert restricted_violations(pod["spec"], pod["metadata"]) == []
    assert rewrite_object(listed, OPTIONS)[0]
    assert listed["items"][1] == {"kind": "Service"}


# --- the stream and the CLI ---------------------------------------------------------------------------------


def test_split_documents_round_trips() -> None:
    text = KUBE_INJECT.read_text()
    for sample in (text, "---\na: 1\n", "a: 1\n---\n---\nb: 2", "", "--- {a: 1}\n--- \nb: 1\n"):
        assert "".join(d.text for d in split_documents(sample)) == sample


def test_non_mesh_documents_are_byte_for_byte_identical() -> None:
    text = KUBE_INJECT.read_text()
    result = inject_stream(text, OPTIONS)
    assert result.changed == 1
    before = split_documents(text)
    after = split_documents(result.output)
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        obj = yaml.safe_load(old.body)
        if isinstance(obj, dict) and obj.get("kind") == "Deployment":
            assert new.text != old.text
            assert new.body.startswith("") and yaml.safe_load(new.body)["kind"] == "Deployment"
        else:
            assert new.text == old.text
    # Leading comments of the rewritten document stay; the output is valid YAML again.
    assert result.output.startswith("# Output of `istioctl kube-inject")
    docs = [d for d in yaml.safe_load_all(result.output) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    template = deployment["spec"]["template"]
    assert restricted_violations(template["spec"], template["metadata"]) == []
    assert status_annotation(template)["initContainers"] == [ann.WAITER_CONTAINER]


def test_stream_without_mesh_objects_is_unchanged() -> None:
    text = "# just a service\napiVersion: v1\nkind: Service\nmetadata: {name: x}\n---\nkind: ConfigMap\r\n"
    assert inject_stream(text, OPTIONS).output == text


def test_cli_reads_stdin_and_writes_stdout() -> None:
    runner = CliRunner()
    text = KUBE_INJECT.read_text()
    result = runner.invoke(cli, ["inject", "-f", "-", "--image", "r/i:1", "--timeout", "120"], input=text)
    assert result.exit_code == 0, result.output
    assert "rewrote 1 object(s)" in result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    waiter = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["initContainers"][
        0
    ]
    assert waiter["image"] == "r/i:1"
    assert "120" in waiter["args"]
    # the output fed back in changes nothing
    again = runner.invoke(
        cli, ["inject", "-f", "-", "-q", "--image", "r/i:1", "--timeout", "120"], input=result.stdout
    )
    assert again.exit_code == 0
    assert again.stdout == result.stdout


def test_cli_reports_bad_yaml_clearly(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\n---\nkind: [unclosed\n")
    result = CliRunner().invoke(cli, ["inject", "-f", str(bad)])
    assert result.exit_code == 1
    assert "document 2: not valid YAML" in result.stderr


@pytest.mark.parametrize("mode", ["TPROXY", "tproxy", "Tproxy", "REDIRECT", "redirect", "NONE", " TPROXY "])
@pytest.mark.parametrize("where", ["istio-init", "annotation"])
def test_mode_is_read_exactly_as_the_controller_reads_it(deployment: dict, mode: str, where: str) -> None:
    """`tproxy` used to keep NET_ADMIN on the sidecar (read with .upper()) while the controller refused the
    pod; now injection parses with the spec's parser, so both accept or refuse the same values."""
    template = deployment["spec"]["template"]
    if where == "istio-init":
        args = istio_init(template["spec"])["args"]
        args[args.index("-m") + 1] = mode
    else:
        template["metadata"]["annotations"][ann.INTERCEPTION_MODE] = mode
    template["spec"]["containers"][1]["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]
    try:
        controller_mode = build_spec({ann.INTERCEPTION_MODE: mode}).mode
    except SpecError:
        with pytest.raises(InjectionError, match=r"interceptionMode|interception-mode") as caught:
            rewrite_pod(template["metadata"], template["spec"], OPTIONS)
        assert repr(mode) in str(caught.value)
        return
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    keeps_net_admin = capabilities_added(result.spec) == {"NET_ADMIN"}
    assert keeps_net_admin == (controller_mode is InterceptionMode.TPROXY)
    assert build_spec(result.metadata["annotations"]).mode is controller_mode


def test_translated_values_are_parsed_and_canonical(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    args = istio_init(template["spec"])["args"]
    args[args.index("-i") + 1] = " 10.0.0.0/8 , 10.0.0.0/8,fd00::/8"
    args[args.index("-b") + 1] = "8080, 9090"
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    annotations = result.metadata["annotations"]
    assert annotations[ann.INCLUDE_OUTBOUND_IP_RANGES] == "10.0.0.0/8,fd00::/8"
    assert annotations[ann.INCLUDE_INBOUND_PORTS] == "8080,9090"
    assert ann.EXCLUDE_INBOUND_PORTS not in annotations  # -d 15090,15021,15020 is the spec's own default


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("-x", "169.254.169.254/32 -j RETURN\n-A ISTIO_OUTPUT -j ACCEPT"),
        ("-i", "10.0.0.0/8\nCOMMIT"),
        ("-b", '80;include "/etc/shadow"'),
        ("-u", "0"),
        ("-k", "net1 -j ACCEPT"),
    ],
)
def test_hostile_istio_init_arguments_are_refused(deployment: dict, flag: str, value: str) -> None:
    template = deployment["spec"]["template"]
    args = istio_init(template["spec"])["args"]
    args += [flag, value]
    with pytest.raises(InjectionError, match="istio-init argument --"):
        rewrite_pod(template["metadata"], template["spec"], OPTIONS)


def test_the_translation_table_comes_from_the_spec_settings() -> None:
    from istio_pod_network_controller.cli.wait import wait

    for setting, key in ANNOTATED_SETTINGS.items():
        assert key == SETTINGS_BY_NAME[setting].annotations[0]
        assert key in SPEC_ANNOTATIONS
    for setting in FLAG_SETTINGS:
        assert not SETTINGS_BY_NAME[setting].annotations
        flag = "--" + setting.replace("_", "-")
        assert any(flag in p.opts for p in wait.params), flag  # the waiter accepts what injection passes
    assert set(ANNOTATED_SETTINGS) | set(FLAG_SETTINGS) == {*parse_istio_iptables_args(
        ["-p", "1", "-z", "2", "-u", "3", "-g", "4", "-m", "NONE", "-b", "", "-d", "", "-i", "", "-x", "",
         "-q", "", "-o", "", "-k", "", "-c", "", "--redirect-dns", "--capture-all-dns", "--drop-invalid"]
    ), "outbound_owner_groups", "outbound_owner_groups_exclude"}  # fmt: skip


def test_the_waiter_learns_the_controller_namespace(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    options = InjectOptions(controller_namespace="istio-system")
    waiter = rewrite_pod(template["metadata"], template["spec"], options).spec["initContainers"][0]
    at = waiter["args"].index("--controller-namespace")
    assert waiter["args"][at + 1] == "istio-system"
    assert "--trust-annotation" not in waiter["args"]


def test_cli_passes_the_controller_namespace_and_never_trust() -> None:
    runner = CliRunner()
    text = KUBE_INJECT.read_text()

    def waiter_args(*flags: str) -> list[str]:
        result = runner.invoke(cli, ["inject", "-f", "-", "-q", *flags], input=text)
        assert result.exit_code == 0, result.output
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        return deployment["spec"]["template"]["spec"]["initContainers"][0]["args"]

    default = waiter_args()
    assert default[default.index("--controller-namespace") + 1] == "istio-system"
    mesh = waiter_args("--controller-namespace", "mesh-system", "--waiter-arg=--delay=1")
    assert mesh[mesh.index("--controller-namespace") + 1] == "mesh-system"
    assert mesh[-1] == "--delay=1"
    refused = runner.invoke(cli, ["inject", "-f", "-", "--waiter-arg=--trust-annotation"], input=text)
    assert refused.exit_code == 2
    assert "--trust-annotation is never injected" in refused.output


def test_openshift_sidecar_pod_needs_no_grant_and_keeps_istios_capture() -> None:
    """A sidecar-mode pod the injector shaped on OpenShift (istio-init `-u` = the top of the namespace's uid
    range, no `-g`; proxyMetadata in istio-init's env): the waiter runs as that uid and gid (restricted-v2's
    MustRunAsRange admits it: no nonroot/anyuid grant), and the controller, reading the rewritten pod,
    builds exactly the spec istio-init would have used (DNS capture, drop-invalid, the exempt uid/gid)."""
    fixture = Path(__file__).parents[1] / "fixtures" / "istio-pods" / "sidecar-openshift.yaml"
    pod = yaml.safe_load(fixture.read_text())
    result = rewrite_pod(pod["metadata"], pod["spec"], OPTIONS)
    (waiter, *_) = result.spec["initContainers"]
    uid = 1000629999
    assert (waiter["securityContext"]["runAsUser"], waiter["securityContext"]["runAsGroup"]) == (uid, uid)
    assert 1000620000 <= uid < 1000620000 + 10000
    ours = [v for v in restricted_violations(result.spec, result.metadata) if ann.WAITER_CONTAINER in v]
    assert ours == []  # the others are Istio's and the tenant's (OpenShift's SCC admission defaults them)
    notes = result.metadata["annotations"]
    assert (notes[ann.CAPTURE_DNS], notes[ann.DROP_INVALID]) == ("true", "true")
    assert notes[ann.ENVOY_USERID] == notes[ann.ENVOY_GROUPID] == str(uid)
    istio_init_spec = pod_spec(pod)
    controller_spec = pod_spec({"metadata": result.metadata, "spec": result.spec})
    for v6 in (False, True):  # the same rules (-d's 15090,15021,15020 are the implied exclusions)
        assert plan.build(controller_spec.with_ipv6(v6)) == plan.build(istio_init_spec.with_ipv6(v6))
    assert (controller_spec.proxy_uid, controller_spec.proxy_gid, controller_spec.capture_dns) == (
        uid,
        uid,
        True,
    )


def test_istio_init_cidr_with_host_bits_is_masked_and_said(deployment: dict) -> None:
    template = deployment["spec"]["template"]
    args = istio_init(template["spec"])["args"]
    args[args.index("-i") + 1] = "10.96.0.2/12"
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    assert result.metadata["annotations"][ann.INCLUDE_OUTBOUND_IP_RANGES] == "10.96.0.0/12"
    assert (
        "istio-init argument --istio-service-cidr: 10.96.0.2/12 has host bits set, read as 10.96.0.0/12"
        in (result.warnings)
    )


def test_native_sidecar_istio_proxy_loses_net_admin_too(deployment: dict) -> None:
    """Istio >= 1.27 may inject istio-proxy as an init container with restartPolicy Always."""
    template = deployment["spec"]["template"]
    proxy = next(c for c in template["spec"]["containers"] if c["name"] == "istio-proxy")
    template["spec"]["containers"].remove(proxy)
    proxy["restartPolicy"] = "Always"
    proxy.setdefault("securityContext", {}).setdefault("capabilities", {})["add"] = ["NET_ADMIN", "NET_RAW"]
    template["spec"]["initContainers"].append(proxy)
    result = rewrite_pod(template["metadata"], template["spec"], OPTIONS)
    (moved,) = [c for c in result.spec["initContainers"] if c["name"] == "istio-proxy"]
    assert "add" not in moved["securityContext"]["capabilities"]
    assert result.spec["initContainers"][0]["name"] == ann.WAITER_CONTAINER
