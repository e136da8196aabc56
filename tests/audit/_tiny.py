"""The tiny audit every audit test builds on: digits, 40 samples per split, 2 epochs, in-process, few attacks."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

TINY: dict[str, Any] = {
    "seed": 0,
    "threads": 1,
    "dataset": {"name": "digits"},
    "target": {"arch": "fcn18-1", "exits": 3, "epochs": 2, "limit": 40, "threshold": 0.2},
    "vanilla": {"attack": True},
    "deployment": {"mode": "in-process"},
    "attacks": {"names": ["loss", "loss-hybrid", "confidence", "confidence-hybrid", "exit-only"], "bootstrap": 20},
    "queries": {"members": 30, "nonmembers": 30, "repeats": 2, "warmup": 2},
    "timeguard": {"sigma_grid_ms": [0.1, 1.0]},
}

#: Stage folders that hold trained models (copied to give a test a run that was "killed after training").
TRAINED_PREFIXES = ("splits-", "train-", "export-")


def tiny(**sections: dict[str, Any]) -> dict[str, Any]:
    """TINY with some sections updated (``tiny(deployment={"mode": "server"})``)."""
    cfg = copy.deepcopy(TINY)
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg


def copy_trained(src: Path, dst: Path) -> Path:
    """A new run directory holding only the split, training and export stages of ``src``."""
    dst.mkdir(parents=True)
    for stage in src.iterdir():
        if stage.is_dir() and stage.name.startswith(TRAINED_PREFIXES):
            shutil.copytree(stage, dst / stage.name)
    shutil.copy2(src / "audit.json", dst / "audit.json")
    return dst


def toml_of(cfg: dict[str, Any]) -> str:
    """A TOML document of a (two-level) config dict, for CLI and sweep tests."""
    import json

    def lit(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)

    lines = [f"{k} = {lit(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {lit(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
