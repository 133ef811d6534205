"""Webhook callbacks: the durable outbox, signing and delivery."""

from openedits.webhooks.delivery import DeliveryLoop, parse_retry_after, scheduled_delay
from openedits.webhooks.outbox import Delivery, DeliveryState, Outbox, Outcome, owe_callback
from openedits.webhooks.signing import Signer

__all__ = [
    "Delivery",
    "DeliveryLoop",
    "DeliveryState",
    "Outbox",
    "Outcome",
    "Signer",
    "owe_callback",
    "parse_retry_after",
    "scheduled_delay",
]
