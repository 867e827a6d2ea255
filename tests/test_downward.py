"""The downward-API annotations file: kubelet's Go-quoted `key="value"` lines, or JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from istio_pod_network_controller.errors import DownwardAPIError
from istio_pod_network_controller.settings.downward import parse_annotations, read_annotations


def test_kubelet_format_with_go_escapes() -> None:
    text = (
        'kubernetes.io/config.seen="2026-11-28T10:00:00Z"\n'
        'pod-network-controller.istio.io/status="initialized"\n'
        'sidecar.istio.io/status="{\\"initContainers\\":[\\"istio-validation\\"],\\"x\\":\\"a\\\\b\\"}"\n'
        'multi="line1\\nline2\\ttab \\u00e9 \\x41 \\101"\n'
        "\n"
    )
    parsed = parse_annotations(text)
    assert parsed["pod-network-controller.istio.io/status"] == "initialized"
    assert parsed["sidecar.istio.io/status"] == '{"initContainers":["istio-validation"],"x":"a\\b"}'
    assert parsed["multi"] == "line1\nline2\ttab é A A"
    assert len(parsed) == 4


def test_json_object() -> None:
    assert parse_annotations('{"a": "1", "b/c": "x"}') == {"a": "1", "b/c": "x"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no equals sign", 'line 1: expected key="value"'),
        ('a="unterminated\n', "line 1: expected"),
        ('a="ok"\nb=unquoted\n', "line 2: expected"),
        ('a="bad \\q escape"', "invalid escape sequence"),
        ('{"a": 1}', "object of string values"),
        ("{not json", "invalid JSON"),
        ("[]", "expected"),
    ],
)
def test_garbage_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(DownwardAPIError, match=message.replace("(", r"\(")):
        parse_annotations(text)


def test_read_errors_are_downward_api_errors(tmp_path: Path) -> None:
    with pytest.raises(DownwardAPIError, match="No such file"):
        read_annotations(str(tmp_path / "missing"))
    binary = tmp_path / "binary"
    binary.write_bytes(b'a="\xff\xfe"')
    with pytest.raises(DownwardAPIError, match="not UTF-8"):
        read_annotations(str(binary))
    huge = tmp_path / "huge"
    huge.write_text('a="' + "x" * (1 << 20) + '"')
    with pytest.raises(DownwardAPIError, match="larger than"):
        read_annotations(str(huge))
