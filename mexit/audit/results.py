"""What an audit run directory holds: the results schema, its file names, and how they are read back.

The pipeline writes these files and the report (and ``mexit report``) reads them; both import this
module, so neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mexit.errors import UserError

SCHEMA = "mexit.audit/2"  # 2: one attack flow (stealers with chance levels), defenses from the registry
AUDIT_FILE = "audit.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"


def check_run_dir(out_dir: Path) -> None:
    """Refuse a directory that is not an audit run of this schema (before anything is written)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; choose a directory for --out")
    marker = out_dir / AUDIT_FILE
    if not marker.exists():
        if any(out_dir.iterdir()):
            raise UserError(f"{out_dir} exists and is not a mexit audit directory; choose another --out")
        return
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{marker} is unreadable; choose another --out or delete {out_dir}") from None
    if record.get("schema") != SCHEMA:
        raise UserError(f"{out_dir} was written by an incompatible mexit (schema {record.get('schema')!r}, this "
                        f"is {SCHEMA!r}); choose another --out, or delete it to start over")



def load_results(run_dir: str | Path) -> dict[str, Any]:
    """``results.json`` of an audit run directory, schema-checked."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        hint = "re-run `mexit audit` with the same --out to finish it" if (run_dir / AUDIT_FILE).exists() else \
            "pass the --out directory of a finished `mexit audit`"
        raise UserError(f"{run_dir} holds no {RESULTS_FILE}; {hint}")
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path} is unreadable; re-run `mexit audit` with the same --out to rewrite it") from None
    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        got = results.get("schema") if isinstance(results, dict) else None
        raise UserError(f"{path} was written by an incompatible mexit (schema {got!r}, this reads {SCHEMA!r}); "
                        f"re-run the audit into a new --out")
    return results
