"""The artifact cache of an audit run directory: one folder per stage, keyed by what produced it.

Each stage writes into ``RUN_DIR/<stage>-<key>/`` where ``key`` is a hash of the config parts the stage
depends on and of the keys of the stages it consumes, so changing one setting redoes exactly the stages
downstream of it. A stage marks completion by writing ``done.json`` last (atomically): its result
summary, timing and a listing of the files it wrote (size of each). A folder with a valid ``done.json``
is reused without running the stage; a folder without one is a stage that was interrupted — it is wiped
and redone, or, for stages that can resume (training, signal collection), handed back to the stage as is.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mexit._io import atomic_write_json
from mexit.audit.config import sha256_json

log = logging.getLogger(__name__)

STAGE_FORMAT = "mexit.audit.stage/1"
DONE_FILE = "done.json"


@dataclass(frozen=True)
class StageResult:
    """What a stage produced: its folder, its key, its JSON result, how long it took, and whether it was cached."""

    name: str
    key: str
    path: Path
    result: dict[str, Any]
    seconds: float
    cached: bool


class StageStore:
    """Runs stages in a run directory, reusing the complete ones (see the module docstring)."""

    def __init__(self, root: Path, *, on_stage: Callable[[str, bool], None] | None = None) -> None:
        self.root = Path(root)
        self.on_stage = on_stage
        self.results: dict[str, StageResult] = {}

    @staticmethod
    def key_of(name: str, deps: dict[str, Any]) -> str:
        """The 12-hex-digit key of stage ``name`` with dependencies ``deps`` (JSON-able)."""
        return sha256_json({"stage": name, "format": STAGE_FORMAT, "deps": deps})[:12]

    def path_of(self, name: str, deps: dict[str, Any]) -> Path:
        return self.root / f"{name}-{self.key_of(name, deps)}"

    def run(self, name: str, deps: dict[str, Any], fn: Callable[[Path], dict[str, Any]], *,
            resumable: bool = False) -> StageResult:
        """Return the cached result of stage ``name`` or run ``fn(stage_dir)`` and record its result."""
        key = self.key_of(name, deps)
        path = self.root / f"{name}-{key}"
        cached = self._load_done(path, name, key)
        if self.on_stage is not None:
            self.on_stage(name, cached is not None)
        if cached is not None:
            log.info("stage %s: reusing %s", name, path.name)
            res = StageResult(name, key, path, cached["result"], float(cached.get("seconds", 0.0)), True)
            self.results[name] = res
            return res
        if path.exists() and not resumable:
            log.info("stage %s: removing the incomplete %s", name, path.name)
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        log.info("stage %s: running into %s", name, path.name)
        start = time.perf_counter()
        result = fn(path)
        seconds = time.perf_counter() - start
        atomic_write_json(path / DONE_FILE, {
            "format": STAGE_FORMAT,
            "stage": name,
            "key": key,
            "deps": deps,
            "seconds": seconds,
            "files": _listing(path),
            "result": result,
        })
        res = StageResult(name, key, path, json.loads((path / DONE_FILE).read_text())["result"], seconds, False)
        self.results[name] = res
        return res

    @staticmethod
    def _load_done(path: Path, name: str, key: str) -> dict[str, Any] | None:
        done = path / DONE_FILE
        if not done.is_file():
            return None
        try:
            record = json.loads(done.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("stage %s: %s is unreadable; redoing the stage", name, done)
            return None
        if record.get("format") != STAGE_FORMAT or record.get("stage") != name or record.get("key") != key:
            log.warning("stage %s: %s does not describe this stage; redoing it", name, done)
            return None
        for rel, size in record.get("files", {}).items():
            f = path / rel
            if not f.is_file() or f.stat().st_size != size:
                log.warning("stage %s: %s is missing or changed; redoing the stage", name, f)
                return None
        return record


def _listing(path: Path) -> dict[str, int]:
    """Relative path → size of every file under ``path`` (except done.json and temporary files)."""
    out: dict[str, int] = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != DONE_FILE and not f.name.endswith(".tmp"):
            out[f.relative_to(path).as_posix()] = f.stat().st_size
    return out
