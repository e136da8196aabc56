"""The defense runs on edge boxes without PyTorch: it must import and work with torch unimportable."""

from __future__ import annotations

from tests._no_torch import run_without_torch

CHILD = """
import numpy as np
import mexit.defense as d
import mexit.cli.keygen
g = d.TimeGuard(0.01, d.generate_key(), d.hasher_for('image'))
assert g.delays_s(np.zeros((2, 3, 8, 8), np.float32)).shape == (2,)
clean = d.CleanTimes.from_samples([[1e-3, 1.1e-3], [2e-3, 2.1e-3]], [3, 1])
opt = d.build_policy(d.parse_defense('optimal', {'epsilon': '0.1'}), key=d.generate_key(), kind='tabular').fit(clean)
assert opt.target_latency_s(np.zeros((2, 4), np.float32), np.array([0, 1]), clean.medians()).shape == (2,)
assert 0.5 <= d.bayes_balanced_accuracy([np.array([1e-3, 1.1e-3]), np.array([2e-3, 2.1e-3])]) <= 1.0
print('ok')
"""


def test_defense_imports_and_runs_without_torch() -> None:
    out = run_without_torch(CHILD)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
