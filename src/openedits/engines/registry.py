"""The engine registry: names to classes, imported lazily, and the `auto` choice."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from openedits.errors import EngineUnavailable

if TYPE_CHECKING:
    from openedits.engines.base import Engine
    from openedits.settings import Settings

__all__ = ["ENGINES", "build_engine", "resolve_engine_name"]

log = logging.getLogger(__name__)

ENGINES: dict[str, str] = {
    "opencv": "openedits.engines.opencv:OpenCVEngine",
    "diffusers": "openedits.engines.diffusers:DiffusersEngine",
    "upstream": "openedits.engines.upstream:UpstreamEngine",
}


def _load_class(name: str) -> Any:
    try:
        target = ENGINES[name]
    except KeyError:
        raise EngineUnavailable(
            f"engine {name!r} is unknown; choose one of {', '.join(sorted(ENGINES))} or auto"
        ) from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(f"engine {name!r} cannot be imported: {exc}") from exc
    return getattr(module, class_name)


def resolve_engine_name(settings: Settings) -> str:
    """The engine `OPENEDITS_ENGINE` names; for `auto`, diffusers when a model is configured."""
    if settings.engine != "auto":
        return settings.engine
    return "diffusers" if settings.diffusers_model else "opencv"


def build_engine(settings: Settings, name: str | None = None) -> Engine:
    """Construct (not load) the engine; `auto` falls back to opencv if diffusers cannot load."""
    chosen = name or resolve_engine_name(settings)
    cls = _load_class(chosen)
    engine: Engine = cls.from_settings(settings)
    if settings.engine == "auto" and name is None and chosen == "diffusers":
        try:
            engine.load(settings.device)
        except EngineUnavailable as exc:
            log.warning("engine auto: diffusers cannot load (%s); using opencv", exc)
            fallback: Engine = _load_class("opencv").from_settings(settings)
            return fallback
    log.info("engine in use: %s", chosen)
    return engine
