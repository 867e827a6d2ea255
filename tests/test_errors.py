"""One error hierarchy, and every error's two faces: `public` (our sentence, Event-safe) and `detail`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

import istio_pod_network_controller as product
from istio_pod_network_controller.errors import (
    SHOWN_LENGTH,
    ControllerError,
    DataplaneError,
    SpecError,
    ToolError,
    escaped,
    public_message,
    shown,
)


def _product_exceptions() -> dict[str, type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(product.__path__, product.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__.removeprefix(product.__name__ + '.')}.{name}"] = obj
    return found


def test_every_error_type_is_under_the_project_base() -> None:
    outside = {name for name, cls in _product_exceptions().items() if not issubclass(cls, ControllerError)}
    assert not outside, f"error types outside ControllerError: {sorted(outside)}"


def test_a_plain_message_gets_the_class_sentence_as_its_public_face() -> None:
    error = DataplaneError("setns /proc/4242/ns/net (net:[4026532291]): Bad file descriptor")
    assert error.public == DataplaneError.PUBLIC
    assert "4242" not in error.public and "4026532291" not in error.public
    assert "4242" in error.detail and str(error) == error.detail


def test_public_message_for_foreign_exceptions_names_only_the_type() -> None:
    assert public_message(ValueError("secret /etc/shadow")) == (
        "the controller hit an unexpected ValueError; details are in its log"
    )
    assert public_message(ToolError("nft", "line 1: root:x:0:0")) == (
        "nft refused the change; the tool's output is in the controller's log"
    )


@given(st.text(max_size=400))
def test_shown_is_one_printable_bounded_quoted_line(value: str) -> None:
    text = shown(value)
    assert text.isprintable() and text.startswith("'")
    assert len(text) <= SHOWN_LENGTH + 40
    if value.isprintable() and len(value) <= SHOWN_LENGTH and "'" not in value and "\\" not in value:
        assert text == f"'{value}'"


@given(st.text(max_size=3000))
def test_detail_never_holds_a_control_character(text: str) -> None:
    error = ControllerError(text)
    assert error.detail.isprintable()
    assert error.detail == escaped(text)


@pytest.mark.parametrize("separator", ["\n", "\r", "\u2028", "\u2029", "\x85", "\x00", "\x1b", "\t"])
def test_a_refused_value_cannot_start_a_new_line_in_an_event_or_log(separator: str) -> None:
    error = SpecError("annotation x", f"80{separator}Warning Forged event", "bad")
    assert separator not in error.public and separator not in str(error)
    assert error.public.isprintable()
