"""One tiny audit per test session, shared (read-only) by the pipeline, report and CLI tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.audit._tiny import TINY


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(run directory, results) of the tiny audit; tests that modify a run copy it first."""
    from mexit.audit import run_audit

    out = tmp_path_factory.mktemp("audit") / "tiny"
    results = run_audit(TINY, out, progress=False)
    return out, results
