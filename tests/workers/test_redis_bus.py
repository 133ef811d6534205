"""RedisEventBus: events cross processes over Redis pub/sub; a broken Redis never breaks a task."""

from __future__ import annotations

import asyncio

from openedits.schemas import TaskState
from openedits.workers.events import TaskEvent, TaskFinished, TaskProgress, TaskStarted
from openedits.workers.redis_bus import RedisEventBus, decode_event, encode_event
from tests.scale._fleet import REDIS_URL, needs_redis
from tests.servers import free_port


def test_events_encode_and_decode() -> None:
    for event in (TaskStarted("t"), TaskProgress("t", 42), TaskFinished("t", TaskState.failed)):
        assert decode_event(encode_event(event, "node-1")) == ("node-1", event)
    assert decode_event(b"not json") is None
    assert decode_event('{"n": "x"}') is None


def test_publishing_with_redis_down_still_reaches_local_listeners() -> None:
    bus = RedisEventBus(f"redis://127.0.0.1:{free_port()}/0", listen=False)
    heard: list[TaskEvent] = []
    bus.subscribe(heard.append)
    bus.publish(TaskProgress("t", 10))  # logs once, raises nothing
    assert heard == [TaskProgress("t", 10)]


@needs_redis
async def test_a_watcher_hears_another_processes_events() -> None:
    assert REDIS_URL
    worker = RedisEventBus(REDIS_URL, listen=False)
    api = RedisEventBus(REDIS_URL)
    heard: list[TaskEvent] = []
    api.subscribe(heard.append)
    await asyncio.to_thread(api.start)
    try:
        with api.watch("task-1") as watch:
            worker.publish(TaskStarted("task-1"))
            worker.publish(TaskProgress("task-2", 50))  # another task: not this watcher's
            worker.publish(TaskProgress("task-1", 30))
            worker.publish(TaskFinished("task-1", TaskState.succeeded))
            got = [await watch.next(5) for _ in range(3)]
        assert got == [TaskStarted("task-1"), TaskProgress("task-1", 30),
                       TaskFinished("task-1", TaskState.succeeded)]
        assert TaskProgress("task-2", 50) in heard
        # A node's own events are delivered once, locally, not again from Redis.
        api.publish(TaskProgress("task-3", 7))
        await asyncio.sleep(0.3)
        assert heard.count(TaskProgress("task-3", 7)) == 1
    finally:
        await asyncio.to_thread(api.stop)


def test_start_without_listening_starts_nothing() -> None:
    bus = RedisEventBus("redis://127.0.0.1:1/0", listen=False)
    bus.start()
    assert bus._thread is None
    bus.stop()
