"""The Engine Protocol: what every editing engine offers, and the typed parameters it takes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

__all__ = [
    "Capabilities",
    "Engine",
    "EngineInfo",
    "Preset",
    "ProgressCallback",
    "ShouldCancel",
    "add_note",
    "collecting_notes",
    "never_cancel",
    "no_progress",
]

Preset = Literal["turbo", "fast", "relax"]
ProgressCallback = Callable[[float], None]
"""Called with the fraction done, 0.0 to 1.0, at each step the engine can report."""
ShouldCancel = Callable[[], bool]
"""Polled at step boundaries; when it returns True the engine raises TaskCancelled."""


def no_progress(fraction: float) -> None:
    """A progress callback that ignores progress."""


def never_cancel() -> bool:
    """A cancel check that never cancels."""
    return False


_NOTES: ContextVar[list[str] | None] = ContextVar("openedits_engine_notes", default=None)


@contextmanager
def collecting_notes() -> Iterator[list[str]]:
    """Collect the notes an engine adds while this block runs (the task's `notes`).

    The runner wraps `engine.edit(...)` in it and keeps the list on the task record. A context
    variable, not an argument, so the Engine Protocol's `edit` signature stays as it is and an
    engine that has nothing to say needs no change.
    """
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def add_note(text: str) -> None:
    """Record something the engine did differently for this task (e.g. an out-of-memory retry).

    Outside `collecting_notes()` the note is dropped (the engine still logs what it did).
    """
    notes = _NOTES.get()
    if notes is not None:
        notes.append(text)


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, so the runner can refuse a request before any heavy work."""

    needs_mask: bool
    honours_prompt: bool
    max_side: int | None = None
    batch_size: int = 4


@dataclass
class EngineInfo:
    """What /healthz shows about the engine in use."""

    name: str
    device: str = "cpu"
    model: str | None = None
    loaded: bool = False
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """An image editor: images and typed parameters in, images out. Knows nothing of HTTP."""

    name: str
    capabilities: Capabilities

    def load(self, device: str = "auto") -> None:
        """Load weights (once) onto `device`; cheap when already loaded."""
        ...

    def info(self) -> EngineInfo:
        """Describe the engine for /healthz."""
        ...

    def validate(self, image: Image.Image, mask: Image.Image | None, prompt: str) -> None:
        """Refuse inputs this engine cannot edit (raise InvalidInput), before any heavy work."""
        ...

    def edit(
        self,
        image: Image.Image,
        mask: Image.Image | None,
        prompt: str,
        *,
        n: int,
        seed: int,
        preset: Preset,
        on_progress: ProgressCallback = no_progress,
        should_cancel: ShouldCancel = never_cancel,
    ) -> list[Image.Image]:
        """Return `n` edited RGB variants of `image`, each of the same size as `image`.

        `mask` is mode "L", 255 where the engine may repaint and 0 where it must keep the input
        (None: the whole image may change). Pixels outside the mask must equal the input's.
        Variant i uses seed `seed + i`, so a task's variants reproduce.
        """
        ...
