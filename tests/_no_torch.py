"""Run a snippet in a fresh interpreter where PyTorch cannot be imported (edge boxes have none)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PRELUDE = textwrap.dedent(
    """
    import importlib.abc, json, sys, warnings  # json: the snippets report results as JSON

    class _BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"import of {name} blocked by the test")
            return None

    sys.meta_path.insert(0, _BlockTorch())
    warnings.simplefilter("ignore")
    """
)

_EPILOGUE = textwrap.dedent(
    """
    if any(m == "torch" or m.startswith("torch.") for m in sys.modules):
        raise SystemExit("torch was loaded")
    """
)


def run_without_torch(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (with ``sys.argv[1:] == args``) with torch blocked; fails if torch got loaded anyway."""
    program = _PRELUDE + textwrap.dedent(code) + _EPILOGUE
    return subprocess.run([sys.executable, "-c", program, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)
