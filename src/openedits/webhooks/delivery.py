"""The delivery loop: sends owed callbacks, retries them on a schedule, records every attempt."""

from __future__ import annotations

import logging
import os
import random
import re
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

__all__ = [
    "PER_HOST",
    "SENDERS",
    "Attempted",
    "DeliveryLoop",
    "destination",
    "parse_retry_after",
    "scheduled_delay",
]

log = logging.getLogger(__name__)

# Concurrent sends per process, and at most PER_HOST of them to any one destination: a
# receiver that hangs holds at most PER_HOST senders for at most the timeout, so it takes
# SENDERS / PER_HOST hanging destinations at once to delay anyone else, and a backlog after a
# receiver's outage never floods it with more than PER_HOST requests at a time.
SENDERS = 32
PER_HOST = 2
# Progress POSTs (best effort) get their own few senders, one in flight per destination.
_PROGRESS_SENDERS = 8
# A receiver's body is never read on a 2xx (only the status matters); of any other answer a
# short prefix goes into the attempt's error, to tell the operator what the receiver said.
_ERROR_PREFIX = 512
_ERROR_SHOWN = 200
# Rows looked at per claim query, per free sender: room to skip destinations at their limit.
_WINDOW = 4
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


def destination(url: str) -> str:
    """The destination a callback URL sends to, as `scheme://host:port` (lower case): the unit
    of the per-destination limit. An unparsable URL is its own destination (it fails fast)."""
    try:
        parsed = httpx.URL(url.strip())
        host = parsed.host.lower()
    except (httpx.InvalidURL, ValueError, TypeError):
        return url
    scheme = parsed.scheme.lower()
    port = parsed.port or {"http": 80, "https": 443}.get(scheme, 0)
    return f"{scheme}://{host}:{port}"


def _origin_text(url: str) -> str:
    """The URL's `scheme://authority` exactly as written: a prefix the database can match."""
    match = re.match(r"[^:/?#]+://[^/?#]*", url)
    return match.group(0) if match else url


def _keep_error_prefix(status: int) -> int:
    return 0 if 200 <= status < 300 else _ERROR_PREFIX


def _said(body: bytes) -> str:
    """A receiver's answer body, shortened to one printable line for the attempt's error."""
    text = " ".join(body.decode("utf-8", errors="replace").split())
    if not text:
        return ""
    return ": " + (text if len(text) <= _ERROR_SHOWN else text[:_ERROR_SHOWN] + "…")


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
    are claimed per attempt with a guarded UPDATE, so no attempt is made twice and each
    callback is received once (barring a 2xx lost on its way back). Sends run on `senders`
    threads, at most `per_host` of them to one destination, so a receiver that hangs delays
    only its own callbacks. `on_outcome`, when given, is called with each attempt's outcome
    (`delivered`, `retry`, `gone`, `failed`), for metrics. `run_once` does one pass
    synchronously, for tests that drive time with a fake clock.
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
        senders: int = SENDERS,
        per_host: int = PER_HOST,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        if senders < 1 or per_host < 1:
            raise ValueError("senders and per_host must be at least 1")
        self.outbox = outbox
        self.settings = settings
        self.clock = clock
        self.delays = settings.retry_delays
        self.rng = rng or random.Random()
        self.node = node or f"{os.getpid()}-{secrets.token_hex(3)}"
        self.transport = transport
        self.senders = senders
        self.per_host = per_host
        self.on_outcome = on_outcome
        # A send runs at most the timeout; the lease adds room so a slow send is never
        # overtaken by another process's next attempt.
        self.lease_seconds = settings.webhook_timeout_seconds * 2 + 5
        self.policy = NetPolicy(
            allow_private=settings.allow_private_urls,
            timeout=settings.webhook_timeout_seconds,
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
        # Each send in flight, with its destination and the URL's origin as written.
        self._inflight: dict[Future[Any], tuple[str, str]] = {}
        self._progress_pool: ThreadPoolExecutor | None = None
        self._progress_last: dict[str, float] = {}
        self._progress_busy: set[str] = set()
        self._progress_hosts: set[str] = set()

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
        self._pool = ThreadPoolExecutor(self.senders, thread_name_prefix="openedits-webhook")
        self._progress_pool = ThreadPoolExecutor(_PROGRESS_SENDERS,
                                                 thread_name_prefix="openedits-progress")
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

    def _busy(self) -> tuple[int, dict[str, int], list[str]]:
        """Free senders, sends in flight per destination, and the origins (as written) of
        the destinations at their limit, which the next claim query leaves out."""
        with self._lock:
            per: dict[str, int] = {}
            for dest, _origin in self._inflight.values():
                per[dest] = per.get(dest, 0) + 1
            full = {o for d, o in self._inflight.values() if per[d] >= self.per_host}
            return self.senders - len(self._inflight), per, sorted(full)

    def _pass(self) -> float:
        """Claim what is due and hand it to the senders; return how long to sleep.

        Rows are taken earliest-due first, skipping destinations already at their limit (the
        query leaves their origins out, so a deep backlog for a hanging receiver does not hide
        the rows behind it); a pass repeats while it makes progress and senders are free."""
        poll = self.settings.webhook_poll_seconds
        skipped = False
        while not self._stop.is_set():
            free, per, full = self._busy()
            if free <= 0:
                return poll  # a finishing send wakes us
            window = free * _WINDOW
            candidates = self.outbox.due(limit=window, exclude_origins=full)
            taken = 0
            for candidate in candidates:
                if taken == free:
                    break
                dest = destination(candidate.url)
                if per.get(dest, 0) >= self.per_host:
                    skipped = True  # the same destination spelt differently; after a send
                    continue
                claim = self.outbox.claim(candidate.id, self.node,
                                          seen_attempts=candidate.attempts,
                                          lease_seconds=self.lease_seconds)
                if claim is None:
                    continue  # another process took it
                self._submit(claim, dest, _origin_text(candidate.url))
                per[dest] = per.get(dest, 0) + 1
                taken += 1
            if taken == 0 or len(candidates) < window:
                break
        if skipped:
            return poll  # rows wait for a send to their destination to finish; that wakes us
        _free, _per, full = self._busy()
        due = self.outbox.next_due(exclude_origins=full)
        if due is None:
            return poll
        # A row due now that we could not claim was taken by another process; look again soon.
        return min(poll, max(0.01, due - self.clock()))

    def _submit(self, claim: Claim, dest: str, origin: str) -> None:
        assert self._pool is not None
        with self._lock:
            future = self._pool.submit(self.attempt, claim)
            self._inflight[future] = (dest, origin)
        future.add_done_callback(self._done)

    def _done(self, future: Future[Any]) -> None:
        with self._lock:
            self._inflight.pop(future, None)
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
                keep_body=_keep_error_prefix,  # any 2xx is delivered, whatever its body
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
                error = f"HTTP {status}{_said(response.content)}"
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
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome.value)
            except Exception:
                log.exception("the on_outcome hook failed", extra=extra)
        return Attempted(outcome, status, error, next_at)

    # --- progress (best effort)

    def post_progress(self, task_id: str, url: str, body: dict[str, Any]) -> bool:
        """POST a progress body to a task's callback_url, signed but not retried and not kept.

        Throttled to one per PROGRESS_INTERVAL per task with none overlapping, and one in
        flight per destination (a hanging receiver holds one progress sender, not all); a body
        that comes too soon or finds no sender free is dropped (a later one carries newer
        progress anyway). Returns whether it was sent off."""
        pool = self._progress_pool
        if pool is None:
            return False
        now = time.monotonic()
        dest = destination(url)
        with self._lock:
            last = self._progress_last.get(task_id)
            if (
                task_id in self._progress_busy
                or dest in self._progress_hosts
                or len(self._progress_busy) >= _PROGRESS_SENDERS
                or (last is not None and now - last < PROGRESS_INTERVAL)
            ):
                return False
            self._progress_busy.add(task_id)
            self._progress_hosts.add(dest)
            self._progress_last[task_id] = now
        try:
            pool.submit(self._send_progress, task_id, url, body)
        except RuntimeError:  # shutting down
            self._progress_done(task_id, dest)
            return False
        return True

    def forget_progress(self, task_id: str) -> None:
        """Drop a task's throttle state (its stream ended)."""
        with self._lock:
            self._progress_last.pop(task_id, None)

    def _progress_done(self, task_id: str, dest: str) -> None:
        with self._lock:
            self._progress_busy.discard(task_id)
            self._progress_hosts.discard(dest)

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
                                    follow_redirects=False, transport=self.transport,
                                    keep_body=lambda _status: 0)
            log.debug("progress POST answered %s", response.status_code,
                      extra={"task_id": task_id})
        except Exception as exc:
            log.info("progress POST failed (not retried): %s", exc, extra={"task_id": task_id})
        finally:
            self._progress_done(task_id, destination(url))
