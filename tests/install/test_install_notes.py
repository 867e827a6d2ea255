"""The chart's NOTES tell a 2018 user how to migrate, and how to check a node and explain a pod."""

from __future__ import annotations

from install_helpers import ROOT, render_tool


def notes(values: dict[str, object]) -> str:
    rendered = render_tool().render_chart(values, namespace="mesh-ops", release="r")
    return next(text for source, text in rendered.items() if source.endswith("NOTES.txt"))


def test_notes_name_the_2018_migration_steps_and_the_day_2_commands() -> None:
    text = notes({"Namespace": ""})
    assert "kubectl -n mesh-ops delete daemonset istio-pod-network-controller" in text
    assert "istio-sidecar-injector ConfigMap back" in text
    assert '"Migrating from the 2018 project"' in text
    assert "istio-pod-network-controller check --proc-root /host/proc" in text
    assert "status POD -n NAMESPACE --controller-namespace mesh-ops" in text
    assert "check --proc-root /proc" in notes({"Namespace": "", "controller": {"hostPID": True}})


def test_the_migration_section_exists_where_the_notes_point() -> None:
    install = (ROOT / "docs" / "install.md").read_text()
    assert "## Migrating from the 2018 project" in install
