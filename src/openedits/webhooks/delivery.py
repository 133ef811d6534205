"""The delivery loop: sends owed callbacks, retries them on a schedule, records every attempt."""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

from openedits._net import NetPolicy, safe_request
from openedits.errors import OpenEditsError
from openedits.settings import Settings
from openedits.webhooks.outbox import Claim, Outbox, Outcome, encode_body, new_message_id
from openedits.webhooks.signing import Signer
from openedits.workers.events import TaskEvent, TaskFinished

if TYPE_CHECKING:
    from openedits.runtime import Runtime

__all__ = ["Attempted", "DeliveryLoop", "parse_retry_after", "scheduled_delay"]

log = logging.getLogger(__name__)

# Concurrent sends per process: enough that one receiver timing out does not hold up the
# others, few enough that a backlog after an outage does not flood anyone.
_SENDERS = 4
# A receiver's answer is only looked at for its status and Retry-After; cap what is read.
_RESPONSE_CAP = 1_000_000
# Retry-After beyond a day is treated as a day: the schedule spans days, not weeks.
_MAX_RETRY_AFTER = 86_400.0
# Jitter spreads the retries of many callbacks that failed together (a receiver outage).
_JITTER = 0.15
# Progress POSTs: at most one per task per interval, and never two in flight.
PROGRESS_INTERVAL = 0.5


def scheduled_delay(
    delays: Sequence[float], failures: int, rng: random.Random
) -> float | None:
    """The wait after the `failures`-th failed attempt (1-based), jittered by ±15%; None when
    the schedule is spent and the delivery is given up."""
    if failures > len(delays):
        return None
    base = delays[failures - 1]
    return max(0.0, base * rng.uniform(1 - _JITTER, 1 + _JITTER))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now), _MAX_RETRY_AFTER)


@dataclass(frozen=True)
class Attempted:
    """What one attempt came to, and when the next is due (None: no next one)."""

    outcome: Outcome
    status: int | None
    error: str | None
    next_attempt_at: float | None


class DeliveryLoop:
    """Sends due callbacks from the outbox, on a thread started and stopped with the app.

    It is woken by TaskFinished events (so a callback leaves within milliseconds of the task's
    end) and otherwise polls the outbox every `webhook_poll_seconds`, which also picks up rows
    written by other processes and rows whose retry fell due. Every process may run one: rows
    are claimed per attempt, so none is sent twice. `run_once` does one pass synchronously,
    for tests that drive time with a fake clock.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        secret: Callable[[], str],
        settings: Settings,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        node: str | None = None,
        transport: httpx.BaseTransport | None = None,
        task_ended: Callable[[str], bool] | None = None,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self.clock = clock
        self.delays = settings.retry_delays
        self.rng = rng or random.Random()
        self.node = node or f"{os.getpid()}-{secrets.token_hex(3)}"
        self.transport = transport
        # A send runs at most the timeout; the lease adds room so a slow send is never
        # overtaken by another process's next attempt.
        self.lease_seconds = settings.webhook_timeout_seconds * 2 + 5
        self.policy = NetPolicy(
            allow_private=settings.allow_private_urls,
            timeout=settings.webhook_timeout_seconds,
            max_bytes=_RESPONSE_CAP,
            max_redirects=0,
        )
        self._secret = secret
        self._signer: Signer | None = None
        self._task_ended = task_ended
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: set[Future[Any]] = set()
        self._progress_pool: ThreadPoolExecutor | None = None
        self._progress_last: dict[str, float] = {}
        self._progress_busy: set[str] = set()

    @classmethod
    def from_runtime(cls, rt: Runtime, **kwargs: Any) -> DeliveryLoop:
        """The loop over a Runtime's database, secret, settings and clock."""

        def task_ended(task_id: str) -> bool:
            row = rt.store.get(task_id)
            return row is None or row.state.is_terminal()

        return cls(
            Outbox(rt.db, clock=rt.clock),
            secret=rt.webhook_secret,
            settings=rt.settings,
            clock=rt.clock,
            task_ended=task_ended,
            **kwargs,
        )

    # --- lifecycle

    def signer(self) -> Signer:
        """The signer, built on first use (the secret may be generated and stored then)."""
        if self._signer is None:
            self._signer = Signer(self._secret())
        return self._signer

    def start(self) -> None:
        """Check the secret, then start sending (owed rows from a previous life go first)."""
        self.signer()
        self._stop.clear()
        self._pool = ThreadPoolExecutor(_SENDERS, thread_name_prefix="openedits-webhook")
        self._progress_pool = ThreadPoolExecutor(2, thread_name_prefix="openedits-progress")
        self._thread = threading.Thread(target=self._run, name="openedits-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop claiming; wait briefly for sends in flight (an unfinished one is retried after
        its lease runs out, by this process after a restart or by another)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            inflight = set(self._inflight)
        wait_futures(inflight, timeout=timeout)
        for pool in (self._pool, self._progress_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """Look at the outbox now."""
        self._wake.set()

    def __call__(self, event: TaskEvent) -> None:
        """Event-bus listener: a finished task may owe a callback, so look at once."""
        if isinstance(event, TaskFinished):
            self._wake.set()

    # --- the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                timeout = self._pass()
            except Exception:
                log.exception("webhook delivery pass failed; retrying")
                timeout = self.settings.webhook_poll_seconds
            if timeout > 0:
                self._wake.wait(timeout)

    def _pass(self) -> float:
        """Claim what is due and hand it to the senders; return how long to sleep."""
        poll = self.settings.webhook_poll_seconds
        with self._lock:
            free = _SENDERS - len(self._inflight)
        if free <= 0:
            return poll  # a finishing send wakes us
        claims = self.outbox.claim_due(self.node, limit=free, lease_seconds=self.lease_seconds)
        for claim in claims:
            self._submit(claim)
        if len(claims) == free:
            return 0.0  # there may be more due
        due = self.outbox.next_due()
        if due is None:
            return poll
        # A row due now that we could not claim was taken by another process; look again soon.
        return min(poll, max(0.01, due - self.clock()))

    def _submit(self, claim: Claim) -> None:
        assert self._pool is not None
        future = self._pool.submit(self.attempt, claim)
        with self._lock:
            self._inflight.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[Any]) -> None:
        with self._lock:
            self._inflight.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            # Recording the attempt failed (the store was unreachable): the row's lease runs
            # out and the delivery is attempted again; say so instead of losing the traceback.
            log.error("callback attempt could not be recorded", exc_info=exc)
        self._wake.set()

    def run_once(self, limit: int = 100) -> list[Attempted]:
        """Claim every due delivery and attempt each here, one after another (for tests)."""
        claims = self.outbox.claim_due(self.node, limit=limit, lease_seconds=self.lease_seconds)
        return [self.attempt(claim) for claim in claims]

    # --- one attempt

    def attempt(self, claim: Claim) -> Attempted:
        """Send one claimed attempt, decide what comes next, and record both."""
        delivery = claim.delivery
        extra = {"task_id": delivery.task_id, "webhook_id": delivery.id}
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            headers = self.signer().headers(delivery.id, delivery.body, self.clock())
            response = safe_request(
                "POST",
                delivery.url,
                field="callback_url",
                policy=self.policy,
                content=delivery.body.encode(),
                headers=headers,
                follow_redirects=False,  # a redirect could point a signed body anywhere
                transport=self.transport,
            )
            status = response.status_code
            if status in (429, 503):
                retry_after = parse_retry_after(response.headers.get("retry-after"), self.clock())
            if 300 <= status < 400:
                error = (
                    f"HTTP {status} redirect to {response.headers.get('location', '?')!r}; "
                    "callbacks do not follow redirects: give the final URL"
                )
            elif not 200 <= status < 300:
                error = f"HTTP {status}"
        except OpenEditsError as exc:
            error = exc.message
        except Exception as exc:
            # Whatever goes wrong with one delivery must not stop the loop; it is retried.
            log.exception("callback attempt crashed", extra=extra)
            error = f"{type(exc).__name__}: {exc}"
        duration_ms = (time.monotonic() - started) * 1000
        now = self.clock()
        next_at: float | None = None
        if status is not None and 200 <= status < 300:
            outcome = Outcome.delivered
        elif status == 410:
            outcome = Outcome.gone
            error = "HTTP 410 Gone: the receiver asked for no more attempts"
        else:
            delay = scheduled_delay(self.delays, delivery.failures + 1, self.rng)
            if delay is None:
                outcome = Outcome.failed
                error = f"{error}; given up after {claim.number} attempts"
            else:
                outcome = Outcome.retry
                next_at = now + (retry_after if retry_after is not None else delay)
        self.outbox.record(
            claim,
            outcome=outcome,
            status=status,
            error=error,
            duration_ms=duration_ms,
            next_attempt_at=next_at,
        )
        level = logging.INFO if outcome is Outcome.delivered else logging.WARNING
        log.log(level, "callback attempt %d: %s (%s)", claim.number, outcome.value,
                error or f"HTTP {status}", extra=extra)
        return Attempted(outcome, status, error, next_at)

    # --- progress (best effort)

    def post_progress(self, task_id: str, url: str, body: dict[str, Any]) -> bool:
        """POST a progress body to a task's callback_url, signed but not retried and not kept.

        Throttled to one per PROGRESS_INTERVAL per task with none overlapping; a body that
        comes too soon is dropped (a later one carries newer progress anyway). Returns
        whether it was sent off."""
        pool = self._progress_pool
        if pool is None:
            return False
        now = time.monotonic()
        with self._lock:
            last = self._progress_last.get(task_id)
            if task_id in self._progress_busy or (
                last is not None and now - last < PROGRESS_INTERVAL
            ):
                return False
            self._progress_busy.add(task_id)
            self._progress_last[task_id] = now
        try:
            pool.submit(self._send_progress, task_id, url, body)
        except RuntimeError:  # shutting down
            with self._lock:
                self._progress_busy.discard(task_id)
            return False
        return True

    def forget_progress(self, task_id: str) -> None:
        """Drop a task's throttle state (its stream ended)."""
        with self._lock:
            self._progress_last.pop(task_id, None)

    def _send_progress(self, task_id: str, url: str, body: dict[str, Any]) -> None:
        try:
            # Once the task has ended, its final callback (from the outbox) says it all; a
            # late progress POST would only make the receiver think it is running again.
            if self._task_ended is not None and self._task_ended(task_id):
                return
            text = encode_body(body)
            headers = self.signer().headers(new_message_id(), text, self.clock())
            response = safe_request("POST", url, field="callback_url", policy=self.policy,
                                    content=text.encode(), headers=headers,
                                    follow_redirects=False, transport=self.transport)
            log.debug("progress POST answered %s", response.status_code,
                      extra={"task_id": task_id})
        except Exception as exc:
            log.info("progress POST failed (not retried): %s", exc, extra={"task_id": task_id})
        finally:
            with self._lock:
                self._progress_busy.discard(task_id)
