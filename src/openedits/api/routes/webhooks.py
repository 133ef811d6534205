"""Admin endpoints for callbacks: list deliveries (failed ones by default) with their attempts,
show one, re-send one. Admin-scoped tokens only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request

from openedits.api.deps import CallerDep
from openedits.errors import NotFound, describe_value
from openedits.webhooks.delivery import DeliveryLoop
from openedits.webhooks.outbox import Delivery, DeliveryState, Outbox

__all__ = ["router"]

router = APIRouter(prefix="/admin/webhooks", tags=["webhooks (admin)"])


def _deliveries(request: Request) -> DeliveryLoop:
    loop: DeliveryLoop = request.app.state.deliveries
    return loop


DeliveriesDep = Annotated[DeliveryLoop, Depends(_deliveries)]


def _with_history(outbox: Outbox, rows: list[Delivery]) -> list[dict[str, Any]]:
    history = outbox.history([d.id for d in rows])
    return [d.to_json(history[d.id]) for d in rows]


def _one(outbox: Outbox, delivery_id: str) -> dict[str, Any]:
    delivery = outbox.get(delivery_id)
    if delivery is None:
        raise NotFound(
            f"no webhook delivery {describe_value(delivery_id)}; list them with "
            "GET /admin/webhooks/deliveries"
        )
    return _with_history(outbox, [delivery])[0]


@router.get("/deliveries")
async def list_deliveries(
    caller: CallerDep,
    deliveries: DeliveriesDep,
    state: Annotated[Literal["failed", "pending", "delivered", "all"], Query()] = "failed",
    task_id: Annotated[str | None, Query(max_length=36)] = None,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> dict[str, Any]:
    """Callback deliveries, newest first, each with its attempts: `{"items": […], "count": n}`."""
    caller.require("admin")
    wanted = None if state == "all" else DeliveryState(state)

    def read() -> dict[str, Any]:
        rows, count = deliveries.outbox.page(
            state=wanted, task_id=task_id, offset=offset, limit=limit
        )
        return {"items": _with_history(deliveries.outbox, rows), "count": count}

    return await to_thread.run_sync(read)


@router.get("/deliveries/{delivery_id}")
async def get_delivery(
    delivery_id: str, caller: CallerDep, deliveries: DeliveriesDep
) -> dict[str, Any]:
    """One delivery (its id is the `webhook-id` the receiver saw) with its attempts."""
    caller.require("admin")
    return await to_thread.run_sync(_one, deliveries.outbox, delivery_id)


@router.post("/deliveries/{delivery_id}/resend")
async def resend_delivery(
    delivery_id: str, caller: CallerDep, deliveries: DeliveriesDep
) -> dict[str, Any]:
    """Queue a delivery again, due now, with a fresh retry schedule and the same `webhook-id`
    (so a receiver that did get it can tell). Answers the delivery as queued."""
    caller.require("admin")

    def resend() -> dict[str, Any]:
        if deliveries.outbox.resend(delivery_id) is None:
            return _one(deliveries.outbox, delivery_id)  # raises NotFound
        deliveries.wake()
        return _one(deliveries.outbox, delivery_id)

    return await to_thread.run_sync(resend)
