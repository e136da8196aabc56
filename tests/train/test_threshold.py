import numpy as np
import pytest

from mexit.train.threshold import TAU_GRID, search_threshold, simulate_exits


def _probs(conf_rows: list[list[float]], classes: int = 3) -> list[np.ndarray]:
    """Per-exit probability arrays whose max equals the given confidences (class 0 wins)."""
    conf = np.asarray(conf_rows, dtype=np.float64)  # (n, exits)
    out = []
    for k in range(conf.shape[1]):
        p = np.full((conf.shape[0], classes), 0.0)
        p[:, 0] = conf[:, k]
        p[:, 1:] = ((1 - conf[:, k]) / (classes - 1))[:, None]
        out.append(p)
    return out


def test_grid_is_the_papers():
    assert TAU_GRID[0] == 0.0 and TAU_GRID[-1] == 1.0 and len(TAU_GRID) == 21


def test_simulate_exits_is_per_sample():
    probs = _probs([[0.9, 0.95, 0.99], [0.5, 0.8, 0.99], [0.4, 0.5, 0.6]])
    assert simulate_exits(probs, 0.85).tolist() == [0, 2, 2]
    assert simulate_exits(probs, 0.75).tolist() == [0, 1, 2]
    assert simulate_exits(probs, 0.0).tolist() == [0, 0, 0]


def test_single_exit_always_final():
    probs = _probs([[0.9], [0.2]])
    assert simulate_exits(probs, 0.5).tolist() == [0, 0]
    res = search_threshold(probs, np.array([0, 1]), [10.0])
    assert res.flops_fraction == 1.0


def test_search_prefers_cheapest_within_tolerance():
    rng = np.random.default_rng(0)
    n = 400
    labels = np.zeros(n, dtype=np.int64)
    # exit 0 is confident and right on half the samples, unsure and wrong on the rest
    conf0 = np.where(np.arange(n) < n // 2, 0.97, 0.45)
    probs = _probs(np.stack([conf0, np.full(n, 0.99)], axis=1).tolist())
    wrong = np.arange(n) >= n // 2
    probs[0][wrong] = probs[0][wrong][:, [1, 0, 2]]  # unsure half predicts class 1 at exit 0
    res = search_threshold(probs, labels, [1.0, 3.0], tolerance=0.0)
    assert res.reference_accuracy == 1.0
    assert res.accuracy == 1.0
    assert 0.5 < res.tau <= 0.95
    assert res.flops_fraction == pytest.approx((0.5 * 1.0 + 0.5 * 3.0) / 3.0)
    assert len(res.curve) == 21
    del rng
