"""API errors and the `Status` objects the real API server answers them with."""

from __future__ import annotations

from typing import Any

from .resources import ResourceType


class ApiError(Exception):
    """An error a request ends with; `status()` is the body the client receives."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(res: ResourceType, name: str | None) -> dict[str, Any]:
    details: dict[str, Any] = {"kind": res.plural}
    if res.group:
        details["group"] = res.group
    if name:
        details["name"] = name
    return details


def _qualified(res: ResourceType) -> str:
    return f"{res.plural}.{res.group}" if res.group else res.plural


def not_found(res: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{_qualified(res)} "{name}" not found', details=_details(res, name))


def already_exists(res: ResourceType, name: str) -> ApiError:
    return ApiError(
        409, "AlreadyExists", f'{_qualified(res)} "{name}" already exists', details=_details(res, name)
    )


def conflict(res: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(res)} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        details=_details(res, name),
    )


def invalid(res: ResourceType, name: str, field: str, message: str) -> ApiError:
    details = {
        **_details(res, name),
        "kind": res.kind,
        "causes": [{"reason": "FieldValueInvalid", "message": message, "field": field}],
    }
    return ApiError(422, "Invalid", f'{res.kind} "{name}" is invalid: {field}: {message}', details=details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)
