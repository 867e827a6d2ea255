"""The chart's monitoring bundle, tested with the real engines: promtool checks and unit-tests every alert
(series that fire it and series that must not), and a real Prometheus scrapes a running controller on
loopback, loads the chart's rules and answers every expression of the Grafana dashboard with data."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from install_helpers import by_kind, one, render

from ipnc_lab.sim.cluster import SimCluster, unique_name
from ipnc_lab.sim.controller import ControllerProcess, free_port, wait_for
from istio_pod_network_controller.controller.metrics import Metrics
from istio_pod_network_controller.settings import annotations as ann

ON = {"monitoring": {"enabled": True}}
JOB = "istio-pod-network-controller-metrics"
LABELS = {"job": JOB, "namespace": "istio-system", "pod": "ipnc-x1", "node": "node-1"}
METRIC = re.compile(r"\bistio_pod_network_controller_\w+")
BUNDLE = ("ServiceMonitor", "PrometheusRule")


def needs(tool: str) -> None:
    """Skip without the tool, except in CI, where these tests must run (make pytest installs it)."""
    if shutil.which(tool) is None:
        message = f"{tool} is not installed (Debian's prometheus package: `make tool-deps`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def alert_groups() -> dict[str, Any]:
    return dict(one(render(ON), "PrometheusRule")["spec"])


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in alert_groups()["groups"] for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    (configmap,) = [
        o for o in by_kind(render(ON), "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")
    ]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    return dict(json.loads(configmap["data"]["istio-pod-network-controller.json"]))


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel["targets"]
    ]


SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
}


def exposed_names() -> set[str]:
    """Every sample name the controller's registry can expose, labelled children created yet or not."""
    return {family.name + end for family in Metrics().registry.collect() for end in SUFFIXES[family.type]}


def test_bundle_is_off_by_default() -> None:
    objects = render()
    assert not [o for o in objects if o["kind"] in BUNDLE]
    assert not [o for o in by_kind(objects, "Service") if o["metadata"]["name"] == JOB]
    assert not [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]


def test_service_and_servicemonitor_select_the_controller_pods() -> None:
    objects = render(ON)
    template = one(objects, "DaemonSet")["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    (service,) = [o for o in by_kind(objects, "Service") if o["metadata"]["name"] == JOB]
    monitor = one(objects, "ServiceMonitor")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    assert port["targetPort"] in container_ports and port["port"] == container_ports[port["targetPort"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in endpoint[
        "relabelings"
    ]


def test_alerts_and_dashboard_use_only_exposed_metrics() -> None:
    names = exposed_names()
    assert "istio_pod_network_controller_build_info" in names
    used = {m for rule in alerts().values() for m in METRIC.findall(rule["expr"])}
    used |= {m for _, expr in dashboard_exprs() for m in METRIC.findall(expr)}
    assert used and used <= names, used - names
    assert set(alerts()) == {
        "IPNCPodsStuckUninitialized", "IPNCApplyFailures", "IPNCWatchRestarts", "IPNCControllerNotReady",
    }  # fmt: skip
    titles = {title for title, _ in dashboard_exprs()}
    for topic in ("initialized", "latency", "stage", "Failures by reason", "queue"):
        assert any(topic.lower() in title.lower() for title in titles), (topic, titles)


def test_values_are_validated_by_the_schema() -> None:
    for bad in (
        {"monitoring": {"enabled": True, "serviceMonitr": {}}},
        {"monitoring": {"prometheusRule": {"stuckFor": "ten minutes"}}},
        {"monitoring": {"dashboard": {"labels": {"grafana_dashboard": 1}}}},
    ):
        with pytest.raises(Exception, match="schema"):
            render(bad)


# -- promtool -----------------------------------------------------------------------------------------------


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(alert_groups()))
    return path


def test_promtool_checks_the_rules(rules_file: Path) -> None:
    needs("promtool")
    done = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 4 rules found" in done.stdout


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    body = ", ".join(f'{k}="{v}"' for k, v in {**LABELS, **labels}.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def expected(alert: str, value: float, **labels: str) -> dict[str, Any]:
    """An alert as Prometheus sends it: its labels, and its annotations expanded the way Go's template would
    expand the two forms the chart uses ({{ $labels.X }} and {{ $value | humanize }})."""
    rule = alerts()[alert]
    all_labels = {**labels, **rule["labels"]}

    def expand(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: all_labels.get(m.group(1), ""), text)
        return text.replace("{{ $value | humanize }}", f"{value:g}")

    return {
        "exp_labels": all_labels,
        "exp_annotations": {k: expand(v) for k, v in rule["annotations"].items()},
    }


def case(at: str, alert: str, fired: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": fired}


M = "istio_pod_network_controller"
NODE_LABELS = {k: LABELS[k] for k in ("namespace", "pod", "node")}
Check = tuple[str, str, list[tuple[float, dict[str, str]]]]
"""(eval time, alert, the alerts expected then as (value, labels))."""
PROMTOOL_TESTS: list[tuple[str, list[dict[str, str]], list[Check]]] = [
    (
        "a queue that never drains fires; one that empties from time to time does not",
        [
            series(f"{M}_queue_depth", "0 1+0x30"),
            series(f"{M}_queue_depth", "0 1 0 2 0 1 0 3 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0", node="node-2"),
        ],
        [("10m", "IPNCPodsStuckUninitialized", []),
         ("20m", "IPNCPodsStuckUninitialized", [(1, {**LABELS})])],
    ),
    (
        "a pod given up on (netns deadline, refused annotation) fires; apply errors are the other alert",
        [
            series(f"{M}_pods_failed_total", "0x5 1+0x20", reason="netns_not_found"),
            series(f"{M}_pods_failed_total", "0x5 1+0x20", reason="apply_error", node="node-2"),
            series(f"{M}_queue_depth", "0x25"),
        ],
        [("3m", "IPNCPodsStuckUninitialized", []),
         ("8m", "IPNCPodsStuckUninitialized", [(1, {**NODE_LABELS, "reason": "netns_not_found"})]),
         ("8m", "IPNCApplyFailures", [(1, {**NODE_LABELS, "node": "node-2", "reason": "apply_error"})]),
         ("3m", "IPNCApplyFailures", [])],
    ),
    (
        "failures that stopped more than 10 minutes ago no longer fire",
        [series(f"{M}_pods_failed_total", "0 1 1+0x30", reason="patch_error")],
        [("5m", "IPNCApplyFailures", [(1, {**NODE_LABELS, "reason": "patch_error"})]),
         ("25m", "IPNCApplyFailures", [])],
    ),
    (
        "watch restarts for inactivity fire above the threshold; routine closes never do",
        [
            series(f"{M}_watch_restarts_total", "0+1x30", resource="pods", reason="inactivity"),
            series(f"{M}_watch_restarts_total", "0+5x30", resource="pods", reason="closed", node="node-2"),
            series(f"{M}_watch_restarts_total", "0+5x30", resource="pods", reason="expired", node="node-2"),
        ],
        [("2m", "IPNCWatchRestarts", []),
         ("20m", "IPNCWatchRestarts", [(15, {**NODE_LABELS, "resource": "pods"})])],
    ),
    (
        "not ready for longer than notReadyFor fires, a short sync does not; a target down fires too",
        [
            series(f"{M}_ready", "0x10"),
            series(f"{M}_ready", "0 0 0 1+0x10", node="node-2"),
            series("up", "1x10"),
            series("up", "1x10", node="node-2"),
            series("up", "0x10", node="node-3"),
        ],
        [("3m", "IPNCControllerNotReady", []),
         ("8m", "IPNCControllerNotReady", [(0, {**LABELS}), (0, {**LABELS, "node": "node-3"})])],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("story", "inputs", "checks"), PROMTOOL_TESTS, ids=[t[0][:40] for t in PROMTOOL_TESTS]
)
def test_promtool_unit_tests_every_alert(
    rules_file: Path, story: str, inputs: list[dict[str, str]], checks: list[Any]
) -> None:
    needs("promtool")
    tests = [
        {
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [
                case(at, alert, [expected(alert, value, **labels) for value, labels in fired])
                for at, alert, fired in checks
            ],
        }
    ]
    spec = rules_file.parent / "tests.yaml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": tests})
    )
    done = subprocess.run(
        ["promtool", "test", "rules", str(spec)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{story}\n{done.stdout}{done.stderr}"


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    fired = {alert for _, _, checks in PROMTOOL_TESTS for _, alert, got in checks if got}
    silent = {alert for _, _, checks in PROMTOOL_TESTS for _, alert, got in checks if not got}
    assert fired == silent == set(alerts())


# -- a real Prometheus --------------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return int(response.status) == 200
        except OSError:
            return False


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """prometheus_for(controller, node) -> a Prometheus scraping it every second, the chart's rules loaded."""
    needs("prometheus")
    started: list[Prometheus] = []

    def start(controller: ControllerProcess, node: str) -> Prometheus:
        workdir = Path(tempfile.mkdtemp(prefix="ipnc-prom-", dir=tmp_path))
        (workdir / "rules.yaml").write_text(yaml.safe_dump(alert_groups()))
        target_labels = {**LABELS, "node": node}
        del target_labels["job"]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{controller.port}"], "labels": target_labels}
                    ],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = workdir / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        server = Prometheus(proc, port, log)
        started.append(server)
        wait_for(server.ready, 60, f"prometheus ready\n{log}", 0.2)
        return server

    try:
        yield start
    finally:
        for server in started:
            if server.proc.poll() is None:
                server.proc.terminate()
                try:
                    server.proc.wait(15)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait()


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


@pytest.mark.root
def test_real_prometheus_scrapes_the_controller_and_answers_the_dashboard(prometheus_for: Any) -> None:
    with SimCluster() as cluster:
        node = cluster.add_node()
        controller = cluster.start_controller(node)
        controller.wait_ready(60)
        prometheus = prometheus_for(controller, node.name)
        wait_for(lambda: has_data(prometheus.query(f'up{{job="{JOB}"}} == 1')), 60, "target up", 0.5)
        pods = []
        for round_ in range(2):  # two rounds, scraped apart, so every rate() has a change to see
            pods.append(cluster.add_pod(node, unique_name("app")))
            cluster.add_pod(node, unique_name("bad"), annotations={ann.INTERCEPTION_MODE: "SIDEWAYS"})
            cluster.wait_initialized(pods, 60, controller.log)
            wait_for(
                lambda n=round_ + 1: has_data(prometheus.query(f"{M}_pods_initialized_total >= {n}")),
                60,
                "the scrape sees the initialization",
                0.5,
            )
            time.sleep(2)
        rules = prometheus.get("/api/v1/rules")["data"]["groups"]
        loaded = {rule["name"]: rule for group in rules for rule in group["rules"]}
        assert set(loaded) == set(alerts())
        assert all(rule["health"] == "ok" for rule in loaded.values()), loaded
        assert loaded["IPNCControllerNotReady"]["state"] == "inactive"
        assert loaded["IPNCPodsStuckUninitialized"]["state"] in ("pending", "firing")  # the refused pods
        for title, expr in dashboard_exprs():
            query = expr.replace("$__rate_interval", "1m").replace("$node", node.name)
            wait_for(lambda q=query: has_data(prometheus.query(q)), 30, f"{title}: {query} returns data", 0.5)
        failures = prometheus.query(
            f'sum by (reason) (increase({M}_pods_failed_total{{node="{node.name}"}}[1m]))'
        )
        assert {s["metric"]["reason"]: float(s["value"][1]) > 0 for s in failures}["invalid_config"] is True
