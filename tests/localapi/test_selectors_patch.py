"""Pure tests of selector parsing/matching and the three patch types."""

from __future__ import annotations

import pytest

from ipnc_lab.localapi.patch import (
    PatchError,
    PatchFormatError,
    json_patch,
    merge_patch,
    strategic_merge_patch,
)
from ipnc_lab.localapi.resources import PODS
from ipnc_lab.localapi.selectors import (
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)

LABELS = {"app": "web", "tier": "front", "example.com/team": "mesh"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app=db", False),
        ("app!=db", True),
        ("missing!=x", True),
        ("app in (db, web)", True),
        ("app in (db)", False),
        ("app notin (db,cache)", True),
        ("missing notin (a)", True),
        ("app notin (web)", False),
        ("tier", True),
        ("missing", False),
        ("!missing", True),
        ("!tier", False),
        ("example.com/team=mesh,app=web,!missing", True),
        ("app=web,tier=back", False),
    ],
)
def test_label_selector_matches(selector: str, expected: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is expected


@pytest.mark.parametrize(
    "selector", ["app=", "app in ()", "app in (a", "=x", "app==web==x", "a b", "-bad=x", "a=(x"]
)
def test_invalid_label_selectors_are_rejected(selector: str) -> None:
    if selector == "app=":  # an empty value is valid: it matches an empty label value
        assert parse_label_selector(selector).matches({"app": ""})
        return
    with pytest.raises(SelectorError):
        parse_label_selector(selector)


def test_field_selector() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running"},
    }
    sel = parse_field_selector("spec.nodeName=n1,status.phase!=Pending", PODS.supports_field)
    assert sel.matches(pod)
    assert not parse_field_selector("metadata.namespace==other", PODS.supports_field).matches(pod)
    assert parse_field_selector("spec.nodeName=", PODS.supports_field).matches({"metadata": {}})
    with pytest.raises(SelectorError, match=r"field label not supported: spec\.hostname"):
        parse_field_selector("spec.hostname=x", PODS.supports_field)
    with pytest.raises(SelectorError):
        parse_field_selector("spec.nodeName", PODS.supports_field)


def test_merge_patch_leaves_input_untouched() -> None:
    target = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}}
    result = merge_patch(target, {"metadata": {"labels": {"a": None, "c": "3"}}, "spec": {"x": [3]}})
    assert result == {"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"x": [3]}}
    assert target["metadata"]["labels"] == {"a": "1", "b": "2"}


def test_strategic_merge_patch_merges_lists_by_key() -> None:
    target = {
        "metadata": {"finalizers": ["a"]},
        "spec": {
            "containers": [{"name": "app", "image": "v1"}, {"name": "side", "image": "s1"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "tolerations": [{"key": "t1"}],
        },
    }
    patch = {
        "metadata": {"finalizers": ["b", "a"]},
        "spec": {
            "containers": [{"name": "app", "image": "v2"}, {"name": "new", "image": "n"}],
            "volumes": [{"name": "data", "$patch": "delete"}],
            "tolerations": [{"key": "t2"}],
        },
    }
    result = strategic_merge_patch(target, patch)
    assert result["spec"]["containers"] == [
        {"name": "app", "image": "v2"},
        {"name": "side", "image": "s1"},
        {"name": "new", "image": "n"},
    ]
    assert result["spec"]["volumes"] == []
    assert result["spec"]["tolerations"] == [{"key": "t2"}]  # no merge key: replaced
    assert result["metadata"]["finalizers"] == ["a", "b"]
    assert target["spec"]["containers"][0]["image"] == "v1"
    with pytest.raises(PatchFormatError):
        strategic_merge_patch(target, [1])


def test_json_patch_operations_and_errors() -> None:
    doc = {"a": {"b": [1, 2]}, "c": "x"}
    result = json_patch(
        doc,
        [
            {"op": "test", "path": "/c", "value": "x"},
            {"op": "add", "path": "/a/b/-", "value": 3},
            {"op": "add", "path": "/a/b/0", "value": 0},
            {"op": "replace", "path": "/c", "value": "y"},
            {"op": "copy", "from": "/c", "path": "/d"},
            {"op": "move", "from": "/d", "path": "/e~1f"},
            {"op": "remove", "path": "/a/b/1"},
        ],
    )
    assert result == {"a": {"b": [0, 2, 3]}, "c": "y", "e/f": "y"}
    assert doc == {"a": {"b": [1, 2]}, "c": "x"}
    for bad in (
        [{"op": "test", "path": "/c", "value": "nope"}],
        [{"op": "remove", "path": "/missing"}],
        [{"op": "replace", "path": "/a/b/9", "value": 1}],
        [{"op": "add", "path": "/x/y", "value": 1}],
        [{"op": "frobnicate", "path": "/c"}],
    ):
        with pytest.raises(PatchError):
            json_patch(doc, bad)
    with pytest.raises(PatchFormatError):
        json_patch(doc, {"op": "add"})
