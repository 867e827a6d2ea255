"""Log set-up: JSON (one object a line) or text; every line about a pod carries namespace and name.

PodLogger is bound to one pod (in the spirit of kopf's object logger): its lines carry the pod's fields,
and `normal`/`warning` also record the Event with the same sentence, so no branch threads the pod through.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import MutableMapping
from typing import Any

from . import events as ev

_POD_FIELDS = ("namespace", "pod")


class PodLogger(logging.LoggerAdapter[logging.Logger]):
    """Log lines about one pod; `normal` and `warning` also post the Event (Warnings deduped per pod)."""

    def __init__(self, logger: logging.Logger, pod: ev.PodRef, recorder: ev.EventRecorder) -> None:
        super().__init__(logger, {"namespace": pod.namespace, "pod": pod.name})
        self.pod = pod
        self.recorder = recorder

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs

    def normal(self, reason: str, message: str) -> None:
        """An info line and a Normal Event with the same sentence."""
        self.info("%s: %s", reason, message)
        self.recorder.record(self.pod, ev.NORMAL, reason, message)

    def warn_event(self, reason: str, message: str, detail: str = "") -> bool:
        """A Warning Event and a warning line (with `detail`, for the log only); False if already sent."""
        if not self.recorder.record(self.pod, ev.WARNING, reason, message):
            return False
        self.warning("%s: %s%s", reason, message, f" ({detail})" if detail else "")
        return True


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
