"""The API half of preflight: may this identity do what the controller does? (SelfSubjectAccessReview)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, Final

import httpx2 as httpx
from lightkube.config.client_adapter import AsyncClient as _adapter_client
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import SingleConfig

from ..dataplane.apply import BackendChoice
from ..errors import ControllerError
from .preflight import Access, ApiProblem, Check, Report, decide_access, local_checks
from .wire import BadResponse, bounded_body, parse_access_review, show

API_TIMEOUT: Final = 10.0
REVIEWS: Final = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


async def probe_access(
    config: SingleConfig, needed: Sequence[Access]
) -> tuple[list[Access], ApiProblem | None]:
    """One SelfSubjectAccessReview per needed verb, cluster-wide (the controller acts in every namespace)."""
    try:
        client = _adapter_client(config, ConnectionParams(timeout=httpx.Timeout(API_TIMEOUT)))
    except (OSError, ValueError) as exc:
        return [], ApiProblem(0, f"cannot set up the connection: {exc}")
    client.headers["Accept-Encoding"] = "identity"
    try:
        reviews = [_review(client, access) for access in needed]
        return list(await asyncio.gather(*reviews)), None
    except _Refused as exc:
        return [], exc.problem
    except (httpx.HTTPError, OSError) as exc:
        return [], ApiProblem(0, str(exc) or type(exc).__name__)
    finally:
        await client.aclose()


class _Refused(ControllerError):
    """An access review the API server answered with an error: carries the problem to report."""

    def __init__(self, problem: ApiProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


async def _review(client: httpx.AsyncClient, access: Access) -> Access:
    attributes = {"group": access.group, "resource": access.resource, "verb": access.verb}
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }
    async with client.stream("POST", REVIEWS, json=review) as response:
        code = response.status_code
        try:
            body = await bounded_body(response.aiter_raw(), "SelfSubjectAccessReview answer")
            if code >= 400:
                raise _Refused(ApiProblem(code, _status_message(body)))
            allowed = parse_access_review(body)
        except BadResponse as exc:
            raise _Refused(ApiProblem(code, f"the answer is not a SelfSubjectAccessReview: {exc}")) from None
    return Access(access.group, access.resource, access.verb, allowed)


def _status_message(body: bytes) -> str:
    """The message of a Status answer, else the start of the body, escaped."""
    try:
        status: Any = json.loads(body)
    except (ValueError, RecursionError):
        status = None
    message = status.get("message") if isinstance(status, dict) else None
    return show(message) if isinstance(message, str) else show(body)


async def api_check(config: SingleConfig, server: str, needed: Sequence[Access]) -> Check:
    answers, problem = await probe_access(config, needed)
    return decide_access(server, answers, problem)


async def run_checks(
    proc_root: str,
    backend: BackendChoice,
    config: SingleConfig,
    server: str,
    needed: Sequence[Access],
    capeff: int | None = None,
) -> Report:
    """`capeff`: the capabilities the process started with (a confined controller has dropped one since)."""
    local = await asyncio.get_running_loop().run_in_executor(None, local_checks, proc_root, backend, capeff)
    return Report((*local, await api_check(config, server, needed)))
