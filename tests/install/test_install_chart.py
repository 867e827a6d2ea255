"""The chart, rendered by Helm's own engine (helm-python-sdk), for Kubernetes, OpenShift, many values."""

from __future__ import annotations

import base64

import kubernetes_validate
import pytest
import yaml
from install_helpers import K8S_VERSION, ROOT, by_kind, one, render
from pss_rules import restricted_violations

from istio_pod_network_controller.install.injection import IMAGE_REPOSITORY, IMAGE_TAG
from istio_pod_network_controller.install.rbac import CLUSTER_ROLE_RULES, cluster_role_rules
from istio_pod_network_controller.settings import annotations as ann

VALUE_SETS: dict[str, dict] = {
    "kubernetes-default": {},
    "openshift-default": {"kubernetesDistribution": "OpenShift"},
    "2018-values": {
        "kubernetesDistribution": "OpenShift",
        "Namespace": "istio-pod-network-controller",
        "containerRuntime": "crio",
        "crioSocket": "/var/run/crio/crio.sock",
        "runcRoot": "/run/runc",
        "includeIPRanges": "172.30.0.0/16,172.20.0.0/16",
        "excludeIPRanges": "169.254.169.254/32",
        "excludeInboundPorts": "80,8080",
        "LogLevel": "debug",
        "image": {"repository": "quay.io/example/ipnc", "tag": "v1", "pullPolicy": "Always"},
        "nodeSelector": {"node-role.kubernetes.io/worker": ""},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "resources": {"requests": {"cpu": "10m"}},
    },
    "host-pid": {"controller": {"hostPID": True}},
    "modern-settings": {
        "Namespace": "",
        "controller": {
            "backend": "nft",
            "concurrency": 8,
            "repairInterval": 30,
            "netnsDeadline": 20,
            "excludedNamespaces": "kube-system,openshift-monitoring",
            "selectLegacyAnnotation": False,
            "selectInjected": True,
            "logFormat": "text",
            "metricsPort": 9200,
            "appArmorProfile": {"type": "RuntimeDefault"},
            "ignorePodOverrides": True,
        },
        "interception": {
            "mode": "TPROXY",
            "outboundPort": 15011,
            "inboundPort": 15016,
            "proxyUID": 2000,
            "proxyGID": 2000,
            "includeInboundPorts": "*",
            "excludeOutboundPorts": "5432",
            "captureDNS": "true",
            "ipv6": "block",
            "dropInvalid": True,
            "outboundOwnerGroupsExclude": "888,0",
        },
    },
    "webhook-generate": {"webhook": {"enabled": True}},
    "webhook-openshift": {"kubernetesDistribution": "OpenShift", "webhook": {"enabled": True, "replicas": 1}},
    "webhook-secret": {
        "webhook": {
            "enabled": True,
            "failurePolicy": "Ignore",
            "tls": {"mode": "secret", "secretName": "my-tls", "caBundle": base64.b64encode(b"PEM").decode()},
        }
    },
    "webhook-cert-manager": {
        "webhook": {"enabled": True, "tls": {"mode": "cert-manager", "certManager": {"issuerName": "ca"}}}
    },
    "no-injection-template": {"istioInjectionTemplate": {"enabled": False}},
    "no-node-restriction": {"nodeRestriction": {"enabled": False}},
}
NOT_KUBERNETES = {"SecurityContextConstraints", "Certificate"}


def controller_container(objects: list[dict]) -> dict:
    return one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(VALUE_SETS[request.param])


def test_every_object_is_valid_against_the_kubernetes_schemas(rendered: tuple[str, list[dict]]) -> None:
    _name, objects = rendered
    for obj in objects:
        if obj["kind"] in NOT_KUBERNETES:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_objects_per_distribution(rendered: tuple[str, list[dict]]) -> None:
    name, objects = rendered
    values = VALUE_SETS[name]
    kinds = sorted(o["kind"] for o in objects)
    openshift = values.get("kubernetesDistribution") == "OpenShift"
    expected = ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]
    if values.get("istioInjectionTemplate", {}).get("enabled", True):
        expected.append("ConfigMap")
    if values.get("nodeRestriction", {}).get("enabled", True):
        expected += ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"] * 2
    if openshift:
        expected.append("SecurityContextConstraints")
    if values.get("webhook", {}).get("enabled"):
        expected += ["Deployment", "MutatingWebhookConfiguration", "Service", "ServiceAccount"]
        mode = values["webhook"].get("tls", {}).get("mode", "auto")
        if mode in ("auto", "generate") and not openshift:
            expected.append("Secret")
        if mode == "cert-manager":
            expected.append("Certificate")
        if values["webhook"].get("replicas", 2) > 1:
            expected.append("PodDisruptionBudget")
    assert kinds == sorted(expected)


def test_cluster_role_is_exactly_what_the_controller_uses(rendered: tuple[str, list[dict]]) -> None:
    _name, objects = rendered
    role = one(objects, "ClusterRole")
    assert role["rules"] == cluster_role_rules()
    assert len(role["rules"]) == len(CLUSTER_ROLE_RULES)
    binding = one(objects, "ClusterRoleBinding")
    account = next(
        o for o in by_kind(objects, "ServiceAccount") if o["metadata"]["name"] == role["metadata"]["name"]
    )
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]


def test_daemonset_is_not_privileged_and_asks_for_exactly_four_capabilities(
    rendered: tuple[str, list[dict]],
) -> None:
    name, objects = rendered
    daemonset = one(objects, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    container = controller_container(objects)
    sc = container["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("hostNetwork") is False
    assert not pod.get("hostIPC")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    if VALUE_SETS[name].get("controller", {}).get("hostPID"):
        assert pod["hostPID"] is True
        assert "/host/proc" not in mounts
        assert "--proc-root=/proc" in container["args"]
    else:
        assert "hostPID" not in pod
        assert mounts["/host/proc"]["readOnly"] is True
        assert volumes[mounts["/host/proc"]["name"]]["hostPath"]["path"] == "/proc"
        assert "--proc-root=/host/proc" in container["args"]
    assert volumes[mounts["/run/xtables.lock"]["name"]]["hostPath"] == {
        "path": "/run/xtables.lock",
        "type": "FileOrCreate",
    }
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    hostpaths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert hostpaths <= {
        "/proc",
        "/run/xtables.lock",
    }  # no container runtime socket, whatever the 2018 values
    if VALUE_SETS[name].get("kubernetesDistribution") == "OpenShift":
        assert sc["seLinuxOptions"] == {"type": "spc_t"}
    else:
        assert "seLinuxOptions" not in sc


def test_daemonset_operations(rendered: tuple[str, list[dict]]) -> None:
    name, objects = rendered
    daemonset = one(objects, "DaemonSet")
    template = daemonset["spec"]["template"]
    pod = template["spec"]
    container = controller_container(objects)
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    port = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    # As Istio's CNI chart: never injected, or its waiter would wait for the capture only this pod installs.
    assert annotations["sidecar.istio.io/inject"] == "false"
    assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert f"--listen-address=0.0.0.0:{port}" in container["args"]
    assert container["resources"]["requests"]
    if "resources" not in VALUE_SETS[name]:
        assert container["resources"]["limits"]
    assert container["args"][0] == "run"
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert "app.kubernetes.io/instance" not in selector  # the release name must not pin the selector


def test_2018_values_map_to_controller_flags() -> None:
    objects = render(VALUE_SETS["2018-values"])
    container = controller_container(objects)
    args = container["args"]
    assert "--include-outbound-ip-ranges=172.30.0.0/16,172.20.0.0/16" in args
    assert "--exclude-outbound-ip-ranges=169.254.169.254/32" in args
    assert "--exclude-inbound-ports=80,8080" in args
    assert "--log-level=debug" in args
    assert not any("container-runtime" in a or "crio" in a for a in args)
    assert container["image"] == "quay.io/example/ipnc:v1"
    assert container["imagePullPolicy"] == "Always"
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert {"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["nodeSelector"]["node-role.kubernetes.io/worker"] == ""  # merged with the default os selector
    assert all(
        o["metadata"]["namespace"] == "istio-pod-network-controller"
        for o in objects
        if "namespace" in o["metadata"]
    )


def test_modern_values_map_to_controller_flags_and_release_namespace() -> None:
    objects = render(VALUE_SETS["modern-settings"], namespace="mesh-system")
    args = controller_container(objects)["args"]
    for flag in (
        "--backend=nft",
        "--concurrency=8",
        "--repair-interval=30",
        "--netns-deadline=20",
        "--excluded-namespaces=kube-system,openshift-monitoring",
        "--no-select-legacy-annotation",
        "--select-injected",
        "--log-format=text",
        "--listen-address=0.0.0.0:9200",
        "--interception-mode=TPROXY",
        "--outbound-port=15011",
        "--inbound-port=15016",
        "--proxy-uid=2000",
        "--proxy-gid=2000",
        "--include-inbound-ports=*",
        "--exclude-outbound-ports=5432",
        "--capture-dns=true",
        "--ipv6=block",
        "--drop-invalid=true",
        "--outbound-owner-groups-exclude=888,0",
        "--ignore-pod-overrides",
    ):
        assert flag in args
    assert {o["metadata"]["namespace"] for o in objects if "namespace" in o["metadata"]} == {"mesh-system"}


@pytest.mark.parametrize(("values", "flagged"), [({}, False), ({"controller": {"confine": False}}, True)])
def test_confinement_is_on_unless_the_values_turn_it_off(values: dict, flagged: bool) -> None:
    args = controller_container(render(values))["args"]
    assert ("--no-confine" in args) is flagged


def test_default_namespace_is_the_2018_one_whatever_helm_is_told() -> None:
    objects = render({}, namespace="istio-pod-network-controller")
    assert {o["metadata"]["namespace"] for o in objects if "namespace" in o["metadata"]} == {"istio-system"}
    policies = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    assert {o["metadata"]["name"] for o in objects if o["kind"] not in {"ConfigMap", *policies}} == {
        "istio-pod-network-controller"
    }
    assert {o["metadata"]["name"] for o in objects if o["kind"] in policies} == {
        "istio-pod-network-controller-pods",
        "istio-pod-network-controller-events",
    }


def test_openshift_scc_shape() -> None:
    objects = render(VALUE_SETS["openshift-default"])
    scc = one(objects, "SecurityContextConstraints")
    assert scc["apiVersion"] == "security.openshift.io/v1"
    assert scc["allowPrivilegedContainer"] is False
    assert scc["allowHostNetwork"] is False
    assert scc["allowHostIPC"] is False
    assert scc["allowHostPorts"] is False
    assert scc["allowHostPID"] is False
    assert scc["allowHostDirVolumePlugin"] is True
    assert scc["readOnlyRootFilesystem"] is True
    assert scc["requiredDropCapabilities"] == ["ALL"]
    assert scc["allowedCapabilities"] == ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]
    assert scc["defaultAddCapabilities"] is None
    assert scc["runAsUser"] == {"type": "MustRunAs", "uid": 0}
    for strategy in ("seLinuxContext", "fsGroup", "supplementalGroups"):
        assert scc[strategy]["type"] in {"RunAsAny", "MustRunAs", "MustRunAsRange"}
    assert scc["seccompProfiles"] == ["runtime/default"]
    assert set(scc["volumes"]) >= {"hostPath", "emptyDir", "projected"}
    assert "*" not in scc["volumes"]
    assert scc["users"] == ["system:serviceaccount:istio-system:istio-pod-network-controller"]
    assert scc["groups"] == []
    assert "namespace" not in scc["metadata"]
    assert set(scc) <= {
        "apiVersion", "kind", "metadata", "priority", "allowPrivilegedContainer", "allowPrivilegeEscalation",
        "defaultAllowPrivilegeEscalation", "allowHostDirVolumePlugin", "allowHostIPC", "allowHostNetwork",
        "allowHostPID", "allowHostPorts", "readOnlyRootFilesystem", "requiredDropCapabilities",
        "allowedCapabilities", "defaultAddCapabilities", "runAsUser", "seLinuxContext", "fsGroup",
        "supplementalGroups", "seccompProfiles", "volumes", "users", "groups",
    }  # fmt: skip
    # The SCC admits the DaemonSet's pod: every capability, volume and the uid it asks for.
    container = controller_container(objects)
    assert set(container["securityContext"]["capabilities"]["add"]) <= set(scc["allowedCapabilities"])
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert {next(k for k in v if k != "name") for v in pod["volumes"]} <= set(scc["volumes"])
    assert scc["allowHostPID"] is bool(pod.get("hostPID"))
    assert render(VALUE_SETS["host-pid"] | {"kubernetesDistribution": "OpenShift"})[0]["allowHostPID"] is True


def test_kubernetes_has_no_scc() -> None:
    assert not by_kind(render({}), "SecurityContextConstraints")


def test_injection_template_waiter_is_restricted_and_matches_inject() -> None:
    config_map = one(render({"interception": {"outboundPort": 15011}}), "ConfigMap")
    template = yaml.safe_load(config_map["data"]["ipnc.yaml"])
    inits = template["spec"]["initContainers"]
    assert inits[0] == {"name": "istio-init", "$patch": "delete"}
    waiter = inits[1]
    assert waiter["name"] == ann.WAITER_CONTAINER
    assert "--outbound-port=15011" in waiter["args"]
    assert waiter["image"] == f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
    spec = {"securityContext": {}, "initContainers": [waiter], "volumes": template["spec"]["volumes"]}
    assert restricted_violations(spec) == []
    # same container as the inject/webhook path builds, apart from the flags
    from istio_pod_network_controller.install.injection import InjectOptions, podinfo_volume, waiter_container

    ours = waiter_container(InjectOptions(), "podinfo", 1337, 1337, [])
    for key in ("name", "image", "securityContext", "volumeMounts", "resources", "terminationMessagePolicy"):
        assert waiter[key] == ours[key], key
    assert template["spec"]["volumes"] == [podinfo_volume()]
    overlay = yaml.safe_load(config_map["data"]["istio-operator-overlay.yaml"])
    webhook_values = overlay["spec"]["values"]["sidecarInjectorWebhook"]
    assert webhook_values["defaultTemplates"] == ["sidecar", "ipnc"]
    assert yaml.safe_load(webhook_values["templates"]["ipnc"]) == template
    istiod = yaml.safe_load(config_map["data"]["istiod-helm-values.yaml"])
    assert yaml.safe_load(istiod["sidecarInjectorWebhook"]["templates"]["ipnc"]) == template


def test_injected_waiters_ignore_overrides_with_the_controller() -> None:
    for ignore in (False, True):
        objects = render({"controller": {"ignorePodOverrides": ignore}, "webhook": {"enabled": True}})
        waiter = yaml.safe_load(one(objects, "ConfigMap")["data"]["ipnc.yaml"])["spec"]["initContainers"][1]
        assert ("--ignore-pod-overrides" in waiter["args"]) is ignore
        webhook = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        assert ("--waiter-arg=--ignore-pod-overrides" in webhook["args"]) is ignore


def test_webhook_objects() -> None:
    objects = render(VALUE_SETS["webhook-generate"] | {"interception": {"inboundPort": 15016}})
    config = one(objects, "MutatingWebhookConfiguration")
    hook = config["webhooks"][0]
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["failurePolicy"] == "Fail"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["clientConfig"]["service"]["path"] == "/mutate"
    assert base64.b64decode(hook["clientConfig"]["caBundle"]).startswith(b"-----BEGIN CERTIFICATE-----")
    assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["istio-system"]} in hook[
        "namespaceSelector"
    ]["matchExpressions"]
    assert "istio-init" in hook["matchConditions"][0]["expression"]
    secret = one(objects, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod, deployment["spec"]["template"]["metadata"]) == []
    for where in ("labels", "annotations"):
        assert deployment["spec"]["template"]["metadata"][where]["sidecar.istio.io/inject"] == "false"
    args = pod["containers"][0]["args"]
    assert args[0] == "webhook"
    assert "--waiter-arg=--inbound-port=15016" in args
    assert pod["volumes"][0]["secret"]["secretName"] == secret["metadata"]["name"]
    ignore = one(render(VALUE_SETS["webhook-secret"]), "MutatingWebhookConfiguration")["webhooks"][0]
    assert ignore["failurePolicy"] == "Ignore"
    openshift = render(VALUE_SETS["webhook-openshift"])
    service = one(openshift, "Service")
    assert service["metadata"]["annotations"]["service.beta.openshift.io/serving-cert-secret-name"]
    assert one(openshift, "MutatingWebhookConfiguration")["metadata"]["annotations"] == {
        "service.beta.openshift.io/inject-cabundle": "true"
    }


def test_bad_values_are_refused() -> None:
    import helm_python

    with pytest.raises(helm_python.HelmError):
        render({"kubernetesDistribution": "Openshift"})
    with pytest.raises(helm_python.HelmError, match="secretName is required"):
        render({"webhook": {"enabled": True, "tls": {"mode": "secret"}}})


def test_chart_version_matches_the_package() -> None:
    chart = yaml.safe_load((ROOT / "chart" / "istio-pod-network-controller" / "Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "chart" / "istio-pod-network-controller" / "values.yaml").read_text())
    assert chart["appVersion"] == IMAGE_TAG
    assert values["image"]["repository"] == IMAGE_REPOSITORY
