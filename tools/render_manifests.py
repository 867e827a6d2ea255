"""Render the chart into plain manifests under deploy/ (for users without Helm): `make manifests`.

Uses Helm's own engine through helm-python-sdk (offline: nothing is fetched). `--check` exits 1 when deploy/
is stale; tests/install/test_install_manifests.py does the same comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "chart" / "istio-pod-network-controller"
DEPLOY = ROOT / "deploy"
RELEASE = "istio-pod-network-controller"
NAMESPACE = "istio-system"
HEADER = (
    "# Generated from chart/istio-pod-network-controller by tools/render_manifests.py (make manifests).\n"
    "# Do not edit: change the chart and re-run. Values: {values}\n"
)
#: Apply order, as `helm template` would: identities and policy first, workloads, then admission config.
KIND_ORDER = [
    "Namespace",
    "SecurityContextConstraints",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    # before the DaemonSet: the controller never runs unrestricted, not even for its first write
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "Service",
    "DaemonSet",
    "Deployment",
    "PodDisruptionBudget",
    "Certificate",
    "MutatingWebhookConfiguration",
]

#: output file -> chart values
VARIANTS: dict[str, dict[str, Any]] = {
    "kubernetes/istio-pod-network-controller.yaml": {"kubernetesDistribution": "Kubernetes"},
    "openshift/istio-pod-network-controller.yaml": {"kubernetesDistribution": "OpenShift"},
}


def render_chart(
    values: dict[str, Any], namespace: str = NAMESPACE, release: str = RELEASE
) -> dict[str, str]:
    """Template path -> rendered text, exactly as Helm renders it."""
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=release, namespace=namespace, is_install=True)


def split_rendered(rendered: dict[str, str]) -> list[tuple[str, str]]:
    """(source template, document text) for every non-empty document, in apply order."""
    documents: list[tuple[str, str]] = []
    for source in sorted(rendered):
        if source.endswith("NOTES.txt"):
            continue
        for text in rendered[source].split("\n---"):
            body = text.strip("\n")
            obj = yaml.safe_load(body) if body.strip() else None
            if isinstance(obj, dict) and obj:
                documents.append((source, body))

    def rank(item: tuple[str, str]) -> tuple[int, str]:
        kind = yaml.safe_load(item[1])["kind"]
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), item[0])

    return sorted(documents, key=rank)


def manifest_text(values: dict[str, Any]) -> str:
    parts = [HEADER.format(values=yaml.safe_dump(values, default_flow_style=True).strip())]
    for source, body in split_rendered(render_chart(values)):
        parts.append(f"---\n# Source: {source}\n{body}\n")
    return "".join(parts)


def istio_files(values: dict[str, Any]) -> dict[str, str]:
    """The injection-template overlays, as files users hand to istioctl or to istiod's Helm chart."""
    rendered = render_chart(values)
    config_map = next(
        yaml.safe_load(body)
        for _source, body in split_rendered(rendered)
        if yaml.safe_load(body)["kind"] == "ConfigMap"
    )
    header = HEADER.format(values=yaml.safe_dump(values, default_flow_style=True).strip())
    return {
        "istio/istio-operator-overlay.yaml": header + config_map["data"]["istio-operator-overlay.yaml"],
        "istio/istiod-helm-values.yaml": header + config_map["data"]["istiod-helm-values.yaml"],
    }


def expected_files() -> dict[str, str]:
    files = {path: manifest_text(values) for path, values in VARIANTS.items()}
    files.update(istio_files({}))
    return files


def stale_files(deploy: Path = DEPLOY) -> list[str]:
    stale = []
    for path, text in expected_files().items():
        target = deploy / path
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            stale.append(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if deploy/ differs from the chart")
    parser.add_argument("--out", type=Path, default=DEPLOY)
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for path in stale:
            print(f"stale: deploy/{path} (run make manifests)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in expected_files().items():
        target = args.out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
