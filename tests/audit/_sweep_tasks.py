"""Light module-level tasks for the executor tests: Ray and pool workers import this module, not the test file,
so that a worker starts in a blink (no pytest, no torch)."""

from __future__ import annotations

import os
import time
from typing import Any

#: The task index whose worker process dies (as an out-of-memory kill or a segfault in native code would).
DIES = 1


def nap(i: int, seconds: float) -> dict[str, Any]:
    """Sleep, and say when and where: the tests check how many of these ran at once."""
    start = time.time()
    if i == DIES:
        os._exit(3)
    time.sleep(seconds)
    return {"i": i, "start": start, "end": time.time(), "pid": os.getpid(), "status": "ok"}
