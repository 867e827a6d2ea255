"""The wheel holds only the product: no emulator, simulator or demo, and none of the lab's dependencies."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAB_ONLY_DEPENDENCIES = ("rich", "cryptography")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("istio_pod_network_controller-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_has_only_the_product_package(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"istio_pod_network_controller"}
    lab_words = ("localapi", "sim/", "demo", "ipnc_lab", "emulator", "chaos")
    assert not [n for n in names if any(word in n for word in lab_words)]
    modules = {n.split("/")[1] for n in names if n.startswith("istio_pod_network_controller/")}
    assert {"cli", "controller", "dataplane", "install", "rules", "settings", "waiter"} <= modules


def test_wheel_does_not_require_the_lab_dependencies(wheel: zipfile.ZipFile) -> None:
    (meta_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = Parser().parsestr(wheel.read(meta_name).decode())
    runtime = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert runtime, "the product has runtime dependencies"
    assert not [r for r in runtime if r.split(">")[0].split("=")[0].strip() in LAB_ONLY_DEPENDENCIES]


def test_product_commands_do_not_include_the_lab() -> None:
    from istio_pod_network_controller.cli import SUBCOMMANDS

    assert "demo" not in SUBCOMMANDS and "local-apiserver" not in SUBCOMMANDS
