"""The defense runs on edge boxes without PyTorch: it must import and work with torch unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_defense_imports_and_runs_without_torch() -> None:
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import numpy as np\n"
        "import mexit.defense as d\n"
        "import mexit.cli.keygen\n"
        "g = d.TimeGuard(0.01, d.generate_key(), d.hasher_for('image'))\n"
        "assert g.delays_s(np.zeros((2, 3, 8, 8), np.float32)).shape == (2,)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
