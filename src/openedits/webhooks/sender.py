"""Callback delivery: POST a finished task's body to its callback_url (one attempt)."""

from __future__ import annotations

import json
import logging
import threading

from openedits._net import NetPolicy, safe_request
from openedits.runtime import Runtime
from openedits.workers.events import TaskEvent, TaskFinished

__all__ = ["CallbackSender"]

log = logging.getLogger(__name__)


class CallbackSender:
    """Listens for finished tasks and sends their callback from a side thread."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.policy = NetPolicy.from_settings(rt.settings)

    def __call__(self, event: TaskEvent) -> None:
        if isinstance(event, TaskFinished):
            threading.Thread(target=self.deliver, args=(event.task_id,), daemon=True).start()

    def deliver(self, task_id: str) -> None:
        """One POST of the task's final body; failures are logged."""
        row = self.rt.store.get(task_id)
        if row is None or not row.callback_url or row.response is None:
            return
        body = json.dumps(row.response).encode()
        try:
            response = safe_request(
                "POST",
                row.callback_url,
                field="callback_url",
                policy=self.policy,
                content=body,
                headers={"content-type": "application/json"},
                follow_redirects=False,
            )
            log.info("callback answered %s", response.status_code, extra={"task_id": task_id})
        except Exception as exc:
            log.warning("callback failed: %s", exc, extra={"task_id": task_id})
