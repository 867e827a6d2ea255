"""The API half of preflight: may this identity do what the controller does? (SelfSubjectAccessReview)"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

import httpx2 as httpx
import lightkube
from lightkube.config.kubeconfig import SingleConfig
from lightkube.core.exceptions import ApiError
from lightkube.models.authorization_v1 import ResourceAttributes, SelfSubjectAccessReviewSpec
from lightkube.resources.authorization_v1 import SelfSubjectAccessReview

from ..dataplane.apply import BackendChoice
from .preflight import Access, ApiProblem, Check, Report, decide_access, local_checks

API_TIMEOUT: Final = 10.0


async def probe_access(
    config: SingleConfig, needed: Sequence[Access]
) -> tuple[list[Access], ApiProblem | None]:
    """One SelfSubjectAccessReview per needed verb, cluster-wide (the controller acts in every namespace)."""
    try:
        client = lightkube.AsyncClient(config=config, timeout=httpx.Timeout(API_TIMEOUT))
    except (OSError, ValueError) as exc:
        return [], ApiProblem(0, f"cannot set up the connection: {exc}")
    try:
        reviews = [_review(client, access) for access in needed]
        return list(await asyncio.gather(*reviews)), None
    except ApiError as exc:
        return [], ApiProblem(int(exc.status.code or 0) or 500, str(exc.status.message or exc))
    except (httpx.HTTPError, OSError) as exc:
        return [], ApiProblem(0, str(exc) or type(exc).__name__)
    finally:
        await client.close()


async def _review(client: lightkube.AsyncClient, access: Access) -> Access:
    attributes = ResourceAttributes(group=access.group, resource=access.resource, verb=access.verb)
    review = SelfSubjectAccessReview(spec=SelfSubjectAccessReviewSpec(resourceAttributes=attributes))
    answer: Any = await client.create(review)
    allowed = bool(getattr(getattr(answer, "status", None), "allowed", False))
    return Access(access.group, access.resource, access.verb, allowed)


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
