"""The public surface of openedits.webhooks is what its __all__ lists, and all of it exists."""

from __future__ import annotations

import openedits.webhooks as webhooks


def test_all_lists_the_public_names() -> None:
    assert sorted(webhooks.__all__) == [
        "Delivery", "DeliveryLoop", "DeliveryState", "Outbox", "Outcome", "Signer",
        "owe_callback", "parse_retry_after", "scheduled_delay",
    ]
    for name in webhooks.__all__:
        assert getattr(webhooks, name) is not None
    public = {n for n in vars(webhooks) if not n.startswith("_")}
    modules = {"delivery", "outbox", "signing"}
    assert public - modules - {"annotations"} == set(webhooks.__all__)
