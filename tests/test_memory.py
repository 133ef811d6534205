"""The malloc arena cap: applied on glibc, harmless elsewhere."""

from __future__ import annotations

import subprocess
import sys

from openedits._memory import tune_malloc


def test_the_cap_applies_on_glibc_and_is_a_no_op_elsewhere() -> None:
    libc = sys.platform.startswith("linux") and subprocess.run(
        ["ldd", "--version"], capture_output=True, text=True).stdout.lower().find("glibc") >= 0
    # In a fresh process, as serve calls it; allocating afterwards still works.
    code = ("from openedits._memory import tune_malloc as f; ok = f(); "
            "b = [bytearray(2**20) for _ in range(64)]; print(ok)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ("True" if libc else "False")
    assert isinstance(tune_malloc(), bool)
