"""What the chart and the injection code assume about the image, read from both sides so they cannot drift:
the entrypoint is the CLI (no role sets `command`), each role's first argument is one of its subcommands,
the image's default user is the waiter's uid:gid, runAsNonRoot holds, and nothing in the image adds privilege
(no setuid/setgid file, no file capability), so a role has exactly the capabilities its securityContext adds.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from image_helpers import image_config, injection_template_waiter, podman, render_chart, workload

from istio_pod_network_controller.cli import SUBCOMMANDS
from istio_pod_network_controller.install import injection
from istio_pod_network_controller.install.injection import InjectOptions

pytestmark = pytest.mark.root
ENTRYPOINT = ["/opt/ipnc/bin/istio-pod-network-controller"]
RULE_TOOLS = (
    "iptables-legacy-restore", "iptables-legacy-save", "ip6tables-legacy-restore", "ip6tables-legacy-save",
    "iptables-nft-restore", "iptables-nft-save", "ip6tables-nft-restore", "ip6tables-nft-save", "nft", "ip",
)  # fmt: skip
CACHE_SCAN = """
import glob, json, os
found = [f"{d}/{n}" for d in ("/var/lib/apt/lists", "/var/cache/apt/archives", "/root/.cache", "/tmp")
         if os.path.isdir(d) for n in os.listdir(d) if n not in ("lock", "partial")]
found += glob.glob("/opt/ipnc/bin/pip*") + glob.glob("/opt/ipnc/bin/easy_install*")
print(json.dumps(found))
"""
PRIVILEGE_SCAN = """
import json, os, stat
found = []
for top, dirs, files in os.walk("/", onerror=None):
    dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(top, d))]
    for name in files:
        path = os.path.join(top, name)
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            continue
        if mode & (stat.S_ISUID | stat.S_ISGID):
            found.append(("setid", path))
        try:
            os.getxattr(path, "security.capability", follow_symlinks=False)
            found.append(("filecap", path))
        except OSError:
            pass
print(json.dumps(found))
"""


def roles(image: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(role, pod spec, container) for every container the chart or the injection code runs from the image."""
    objects = render_chart({"webhook": {"enabled": True}})
    found = []
    for kind, role in (("DaemonSet", "controller"), ("Deployment", "webhook")):
        spec = workload(objects, kind)["spec"]["template"]["spec"]
        found += [(role, spec, c) for c in spec["containers"]]
    found.append(("waiter (chart's Istio template)", {}, injection_template_waiter(objects)))
    coded = injection.waiter_container(InjectOptions(), injection.PODINFO_VOLUME, 1337, 1337, [])
    found.append(("waiter (inject, webhook)", {}, coded))
    assert all(container["image"] == image for _, _, container in found), [c["image"] for _, _, c in found]
    return found


def effective_user(image: str, pod_spec: dict[str, Any], container: dict[str, Any]) -> tuple[int, int]:
    sc, pod_sc = container.get("securityContext") or {}, pod_spec.get("securityContext") or {}
    uid, _, gid = str(image_config(image)["User"]).partition(":")
    return int(sc.get("runAsUser", pod_sc.get("runAsUser", uid))), int(
        sc.get("runAsGroup", pod_sc.get("runAsGroup", gid or uid))
    )


def test_entrypoint_and_subcommands_match_the_chart(image: str) -> None:
    config = image_config(image)
    assert config["Entrypoint"] == ENTRYPOINT
    for role, pod_spec, container in roles(image):
        assert "command" not in container, f"{role} overrides the image's entrypoint"
        subcommand = container["args"][0]
        assert subcommand in SUBCOMMANDS, (role, subcommand)
        uid, gid = effective_user(image, pod_spec, container)
        done = podman(
            "run", "--rm", "--network", "none", "--user", f"{uid}:{gid}", image, subcommand, "--help"
        )
        assert done.returncode == 0 and "Usage:" in done.stdout, (role, done.stderr)


def test_default_user_is_the_waiters_and_non_root_holds(image: str) -> None:
    user = str(image_config(image)["User"])
    assert user.replace(":", "").isdigit(), f"{user!r}: runAsNonRoot needs a numeric user"
    for role, pod_spec, container in roles(image):
        sc = container.get("securityContext") or {}
        non_root = sc.get("runAsNonRoot", (pod_spec.get("securityContext") or {}).get("runAsNonRoot"))
        uid, gid = effective_user(image, pod_spec, container)
        if non_root:
            assert uid != 0, role
        if role.startswith("waiter"):
            assert user == f"{sc['runAsUser']}:{sc['runAsGroup']}" == f"{uid}:{gid}", role
            assert sc["capabilities"] == {"drop": ["ALL"]}, role
        elif role == "controller":
            assert (uid, gid) == (0, 0)
            assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]


def test_nothing_in_the_image_adds_privilege(image: str) -> None:
    done = podman("run", "--rm", "--network", "none", "--user", "0:0", "--entrypoint", "/opt/ipnc/bin/python",
                  image, "-c", PRIVILEGE_SCAN)  # fmt: skip
    assert json.loads(done.stdout) == []


def test_rule_tools_in_the_image_and_no_lab_pip_compiler_or_caches(image: str) -> None:
    script = (
        "import importlib.util, shutil, sys; "
        f"missing = [t for t in {RULE_TOOLS!r} if shutil.which(t) is None]; "
        "lab = importlib.util.find_spec('ipnc_lab'); pip = importlib.util.find_spec('pip'); "
        "print(missing, lab, pip, shutil.which('gcc'), shutil.which('cc'))"
    )
    python = (
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        "0:0",
        "--entrypoint",
        "/opt/ipnc/bin/python",
        image,
    )
    assert podman(*python, "-c", script).stdout.strip() == "[] None None None None"
    left = podman(*python, "-c", CACHE_SCAN).stdout
    assert json.loads(left) == [], f"package or pip caches left in the image: {left}"
