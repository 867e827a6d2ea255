"""deploy/ holds the chart rendered for users without Helm; it must never be stale."""

from __future__ import annotations

import kubernetes_validate
import yaml
from install_helpers import K8S_VERSION, ROOT, render_tool


def test_deploy_manifests_are_up_to_date() -> None:
    stale = render_tool().stale_files(ROOT / "deploy")
    assert stale == [], f"stale: {stale}; run `make manifests` (tools/render_manifests.py)"


def test_deploy_manifests_are_valid() -> None:
    for path in (ROOT / "deploy").glob("*/istio-pod-network-controller.yaml"):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs
        for obj in docs:
            if obj["kind"] != "SecurityContextConstraints":
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_check_mode_detects_a_stale_file(tmp_path) -> None:
    tool = render_tool()
    assert tool.main(["--out", str(tmp_path)]) == 0
    assert tool.main(["--check", "--out", str(tmp_path)]) == 0
    target = tmp_path / "kubernetes" / "istio-pod-network-controller.yaml"
    target.write_text(target.read_text() + "# hand edit\n")
    assert tool.main(["--check", "--out", str(tmp_path)]) == 1
