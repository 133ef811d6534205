"""Editing engines behind one Protocol, built lazily by name."""

from openedits.engines.base import Capabilities, Engine, EngineInfo, Preset
from openedits.engines.registry import ENGINES, build_engine, resolve_engine_name

__all__ = [
    "ENGINES",
    "Capabilities",
    "Engine",
    "EngineInfo",
    "Preset",
    "build_engine",
    "resolve_engine_name",
]
