"""Log set-up: JSON (one object a line) or text, and every line about a pod carries namespace and name."""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping
from typing import Any

_POD_FIELDS = ("namespace", "pod")


def pod_extra(pod: Mapping[str, Any]) -> dict[str, str]:
    """`extra=` for a log call about `pod` (fields `namespace` and `pod`)."""
    meta = pod.get("metadata") or {}
    return {"namespace": str(meta.get("namespace", "")), "pod": str(meta.get("name", ""))}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _POD_FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if hasattr(record, "pod"):
            text += f" namespace={getattr(record, 'namespace', '')} pod={record.pod}"
        return text


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
