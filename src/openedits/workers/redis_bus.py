"""RedisEventBus: the EventBus, with events carried between processes over Redis pub/sub."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import Any

from openedits.schemas import TaskState
from openedits.workers.events import EventBus, TaskEvent, TaskFinished, TaskProgress, TaskStarted

__all__ = ["CHANNEL", "RedisEventBus", "decode_event", "encode_event"]

log = logging.getLogger(__name__)

CHANNEL = "openedits:events"
"""One channel for every task's events: each API node wants the ends of all tasks (the webhook
loop wakes on them) and the progress of the few it streams; the messages are tens of bytes."""
# A failed publish is logged at most this often: Redis down must not flood the log.
_LOG_EVERY = 60.0
_RECONNECT_MAX = 2.0
# After a failed publish, events are not sent for this long: a Redis that is down must not
# stall the engine's thread for a connect timeout at every progress step.
_BACKOFF = 2.0


def encode_event(event: TaskEvent, node: str) -> str:
    """The event as a small JSON message tagged with the publishing node."""
    body: dict[str, Any] = {"n": node, "t": event.task_id}
    if isinstance(event, TaskProgress):
        body["p"] = event.progress
    elif isinstance(event, TaskFinished):
        body["s"] = event.state.value
    return json.dumps(body, separators=(",", ":"))


def decode_event(raw: bytes | str) -> tuple[str, TaskEvent] | None:
    """(publishing node, event), or None for a message that is not one of ours."""
    try:
        body = json.loads(raw)
        task_id = str(body["t"])
        node = str(body["n"])
        if "p" in body:
            return node, TaskProgress(task_id, int(body["p"]))
        if "s" in body:
            return node, TaskFinished(task_id, TaskState(body["s"]))
        return node, TaskStarted(task_id)
    except (ValueError, KeyError, TypeError):
        return None


class RedisEventBus(EventBus):
    """Local listeners and watchers hear local events at once, as on EventBus; every event is
    also published to Redis, and, when `listen` is set, other processes' events are fed to the
    local listeners and watchers too.

    Best effort by design: the task row is the truth and every waiter re-reads it each second,
    so a lost message (Redis restarting, a network blip) delays a view but never hangs it.
    """

    def __init__(self, url: str, *, listen: bool = True, client: Any = None) -> None:
        super().__init__()
        import redis

        self.url = url
        self.node = secrets.token_hex(6)
        self.listen = listen
        self._client = client or redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=10
        )
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_failure_log = -_LOG_EVERY
        self._quiet_until = 0.0

    def start(self) -> None:
        """Begin listening for other processes' events (no-op when `listen` is off)."""
        if not self.listen or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="openedits-events", daemon=True)
        self._thread.start()
        # Wait briefly for the subscription, so an event published right after start (a task
        # submitted at once) is heard; a Redis that is down must not block the start.
        self._ready.wait(2.0)

    def stop(self) -> None:
        """Stop listening."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def publish(self, event: TaskEvent) -> None:
        """Deliver locally, then to Redis for the other processes."""
        super().publish(event)
        if time.monotonic() < self._quiet_until:
            return
        try:
            self._client.publish(CHANNEL, encode_event(event, self.node))
        except Exception as exc:
            now = time.monotonic()
            self._quiet_until = now + _BACKOFF
            if now - self._last_failure_log >= _LOG_EVERY:
                self._last_failure_log = now
                log.warning("publishing a task event to Redis failed (%s); views fall back "
                            "to the store", exc)

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                self._ready.set()
                delay = 0.1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None or message.get("type") != "message":
                        continue
                    decoded = decode_event(message["data"])
                    if decoded is None or decoded[0] == self.node:
                        continue
                    super().publish(decoded[1])
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.info("task events from Redis interrupted (%s); reconnecting", exc)
                self._stop.wait(delay)
                delay = min(_RECONNECT_MAX, delay * 2)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    log.debug("closing the pub/sub connection failed", exc_info=True)
