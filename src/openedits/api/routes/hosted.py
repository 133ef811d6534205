"""The hosted service's other endpoints, answered with api_not_implemented."""

from __future__ import annotations

from fastapi import APIRouter

from openedits.api.deps import CallerDep
from openedits.errors import NotImplementedOnServer

__all__ = ["NOT_SERVED", "router"]

router = APIRouter(tags=["hosted"])

NOT_SERVED = ("imagine", "videos", "describe", "translate", "seed", "shorten")


@router.post("/midjourney/{endpoint}", include_in_schema=False)
async def not_served(endpoint: str, caller: CallerDep) -> None:
    """Any other /midjourney/ endpoint is part of the hosted service, not of openedits."""
    raise NotImplementedOnServer(
        f"/midjourney/{endpoint} is not implemented by openedits; it serves "
        "/midjourney/edits and /midjourney/tasks"
    )
