import json

import numpy as np
import pytest

from mexit.errors import ConfigError
from mexit.train.threshold import (
    TAU_GRID,
    ThresholdSearch,
    choose_threshold,
    deployed_accuracy,
    search_threshold,
    simulate_exits,
    vanilla_accuracy,
)


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


def _curve_world():
    """Exit 0 right on 80 % of samples, the final exit on 70 %: the two τ rules must disagree."""
    n = 200
    labels = np.zeros(n, dtype=np.int64)
    conf0 = np.where(np.arange(n) < 120, 0.95, 0.55)
    probs = _probs(np.stack([conf0, np.full(n, 0.99)], axis=1).tolist())
    wrong0 = (np.arange(n) >= 160)  # exit 0 wrong on the last 40 (80 % right)
    probs[0][wrong0] = probs[0][wrong0][:, [1, 0, 2]]
    wrong1 = np.arange(n) < 60  # final exit wrong on the first 60 (70 % right)
    probs[1][wrong1] = probs[1][wrong1][:, [1, 0, 2]]
    return probs, labels


def test_vanilla_rule_compares_with_the_vanilla_model_not_the_final_exit():
    probs, labels = _curve_world()
    costs = [1.0, 4.0]
    final = search_threshold(probs, labels, costs, tolerance=0.0, rule="final-exit")
    assert final.rule == "final-exit" and final.reference_accuracy == pytest.approx(0.7)
    # everyone at exit 0 (80 %) already beats the final exit (70 %); ties in cost go to the largest such τ
    assert final.flops_fraction == 0.25 and final.tau == 0.55
    strict = search_threshold(probs, labels, costs, tolerance=0.0, rule="vanilla", vanilla_accuracy=0.9)
    assert strict.rule == "vanilla" and strict.reference_accuracy == 0.9 and strict.vanilla_accuracy == 0.9
    assert strict.final_accuracy == pytest.approx(0.7)
    # only τ that keep the uncertain samples (exit 0 wrong on 40 of them) for the final exit reach 0.9
    assert strict.within_tolerance and strict.accuracy == 1.0 and strict.flops_fraction == pytest.approx(0.55)
    capped = [p for p in strict.curve if p.accuracy < 0.85]
    fallback = choose_threshold(capped, rule="vanilla", final_accuracy=0.7, vanilla_accuracy=0.9, tolerance=0.0)
    assert not fallback.within_tolerance and fallback.accuracy == max(p.accuracy for p in capped)
    loose = choose_threshold(strict.curve, rule="vanilla", final_accuracy=0.7, vanilla_accuracy=0.85,
                             tolerance=0.05)
    assert loose.within_tolerance and loose.accuracy >= 0.8 - 1e-9
    assert loose.flops_fraction == min(p.flops_fraction for p in strict.curve if p.accuracy >= 0.8 - 1e-9)


def test_vanilla_rule_without_vanilla_model_is_one_config_error():
    probs, labels = _curve_world()
    with pytest.raises(ConfigError, match="vanilla model") as err:
        search_threshold(probs, labels, [1.0, 4.0], rule="vanilla")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown threshold rule"):
        choose_threshold(search_threshold(probs, labels, [1.0, 4.0]).curve, rule="best", final_accuracy=0.7)


def test_search_round_trips_through_json():
    probs, labels = _curve_world()
    res = search_threshold(probs, labels, [1.0, 4.0], rule="vanilla", vanilla_accuracy=0.75)
    back = ThresholdSearch.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back == res
    old = {k: v for k, v in res.to_dict().items() if k not in ("rule", "final_accuracy", "vanilla_accuracy",
                                                                "within_tolerance")}
    assert ThresholdSearch.from_dict(old).rule == "final-exit"  # runs written before the rule was recorded


def test_deployed_accuracy_uses_the_exit_each_sample_leaves_at():
    probs, labels = _curve_world()
    dep = deployed_accuracy(probs, labels, 0.9)
    # 120 confident samples leave at exit 0 (all right there), 80 go on to the final exit (60..119 overlap)
    assert dep["exit_shares"] == [0.6, 0.4]
    exits = simulate_exits(probs, 0.9)
    expected = np.mean([probs[e][i].argmax() == 0 for i, e in enumerate(exits)])
    assert dep["accuracy"] == pytest.approx(expected)
    assert dep["final_exit_accuracy"] == pytest.approx(0.7)
    assert dep["accuracy"] != dep["final_exit_accuracy"]


def test_vanilla_accuracy_reads_a_one_exit_run(tmp_path):
    run = tmp_path / "van"
    run.mkdir()
    metrics = {"exits": 1, "arch": "fcn18-1", "dataset": "location", "final_exit": {"val_accuracy": 0.61}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert vanilla_accuracy(run, arch="fcn18-1", dataset="location") == 0.61
    with pytest.raises(ConfigError, match="same --arch"):
        vanilla_accuracy(run, arch="fcn18-2")
    with pytest.raises(ConfigError, match="1-exit run"):
        vanilla_accuracy({**metrics, "exits": 6})
    with pytest.raises(ConfigError, match="not a finished training run"):
        vanilla_accuracy(tmp_path / "missing")
