"""Reading request bodies: the size cap, one byte budget shared by every request in flight, and
the content-encodings openedits decodes (gzip, deflate)."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from starlette.requests import Request

from openedits.errors import InvalidInput, PayloadTooLarge, ServerBusy, UnsupportedEncoding
from openedits.errors import describe_value as _shown

__all__ = ["BodyBudget", "BodyHold", "read_body"]

_STEP = 1 << 20
"""A body of unknown length (chunked) takes budget in steps of this many bytes as it arrives."""
_ENCODINGS = {"identity": None, "gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
              "deflate": zlib.MAX_WBITS}


class BodyBudget:
    """How many bytes of request bodies this process holds at once, across all requests.

    A request takes room before it buffers its body (its declared length, or step by step as
    a chunked one arrives) and gives it back once the body is no longer held (for a submit:
    once the task is stored). When the room is taken, it waits up to `wait_seconds`, then
    is answered 503 with Retry-After, so a burst of large bodies costs a bounded amount of
    memory instead of all of it. A body larger than the whole budget may still pass alone.
    """

    def __init__(self, limit: int, wait_seconds: float) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self.used = 0
        self._waiters: list[asyncio.Future[None]] = []

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[BodyHold]:
        """Room for one request's body, given back when the block ends."""
        hold = BodyHold(self, asyncio.get_running_loop().time() + self.wait_seconds)
        try:
            yield hold
        finally:
            hold.release()

    async def _take(self, n: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.used and self.used + n > self.limit:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ServerBusy(
                    f"the server is reading {self.used:,} bytes of other request bodies, its "
                    f"limit for bodies in flight (OPENEDITS_MAX_BODY_BYTES_IN_FLIGHT="
                    f"{self.limit:,}); retry shortly",
                    retry_after=max(1, round(self.wait_seconds)),
                )
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += n

    def _give(self, n: int) -> None:
        self.used -= n
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class BodyHold:
    """One request's share of the BodyBudget."""

    def __init__(self, budget: BodyBudget, deadline: float) -> None:
        self.budget = budget
        self.deadline = deadline
        self.held = 0

    async def need(self, total: int) -> None:
        """Hold room for `total` bytes (waits, or raises ServerBusy past the deadline)."""
        if total > self.held:
            await self.budget._take(total - self.held, self.deadline)
            self.held = total

    def release(self) -> None:
        """Give all of it back."""
        if self.held:
            self.budget._give(self.held)
            self.held = 0


async def read_body(request: Request, hold: BodyHold, limit: int) -> bytes:
    """The body's bytes, decoded from its content-encoding, at most `limit` of them (before
    and after decoding), buffered only with room held in the budget."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding not in _ENCODINGS:
        raise UnsupportedEncoding(
            f"the body's content-encoding {_shown(encoding)} is not read here; send the JSON "
            "uncompressed (identity), or compressed with gzip or deflate"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"the request body is {int(declared):,} bytes; at most {limit:,} are accepted "
                "(send large images by URL instead of inline)"
            )
        await hold.need(int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit:,} bytes")
        if size > hold.held:
            await hold.need(min(limit, max(size, hold.held + _STEP)))
        chunks.append(chunk)
    raw = b"".join(chunks)
    del chunks
    wbits = _ENCODINGS[encoding]
    if wbits is None:
        return raw
    # The decoded size is unknown until decoded: hold room for the most it may be.
    await hold.need(len(raw) + limit)
    return await to_thread.run_sync(_decompress, raw, wbits, encoding, limit)


def _decompress(raw: bytes, wbits: int, encoding: str, limit: int) -> bytes:
    """`raw` decoded, refusing output past `limit` bytes (a zip bomb stops there)."""
    attempts = [wbits, -zlib.MAX_WBITS] if encoding == "deflate" else [wbits]
    for bits in attempts:  # "deflate" is zlib-wrapped by the standard, raw by some clients
        decoder = zlib.decompressobj(bits)
        try:
            out = decoder.decompress(raw, limit + 1)
        except zlib.error as exc:
            if bits != attempts[-1]:
                continue
            raise InvalidInput(
                f"the body is not valid {encoding} data ({exc}); send it uncompressed, or "
                f"compress it with {encoding} exactly as the content-encoding header says"
            ) from None
        if len(out) > limit or decoder.unconsumed_tail:
            raise PayloadTooLarge(
                f"the request body decompresses to over {limit:,} bytes; at most {limit:,} "
                "are accepted"
            )
        if not decoder.eof:
            raise InvalidInput(f"the {encoding} body is truncated; send the whole stream")
        return out
    raise AssertionError("unreachable")
