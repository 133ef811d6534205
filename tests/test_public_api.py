"""Each package's public surface is exactly its `__all__` (as httpx checks its own)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

PACKAGES = ["openedits", "openedits.client", "openedits.engines", "openedits.imaging"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_lists_every_public_name(name: str) -> None:
    module = importlib.import_module(name)
    declared = set(module.__all__)
    public = {n for n, v in vars(module).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)
              and n != "annotations"}
    assert declared - {"__version__"} == public
    for item in declared:
        assert hasattr(module, item)


@pytest.mark.parametrize("name", PACKAGES)
def test_importing_starts_nothing(name: str) -> None:
    # Nothing connects, reads the environment or loads weights at import time: importing
    # the package must not pull in the web framework, the database driver or torch.
    code = (f"import sys, {name}; "
            "heavy = [m for m in ('torch', 'diffusers', 'fastapi', 'sqlalchemy') "
            "if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(filter(None, out.stdout.strip().split(",")))
    assert "torch" not in loaded and "diffusers" not in loaded
    if name in ("openedits", "openedits.client"):
        assert loaded == set(), f"importing {name} loaded {loaded}"
