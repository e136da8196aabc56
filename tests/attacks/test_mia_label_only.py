"""Label-only collection through a label-only client: random-flip robustness and HopSkipJump distance."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mexit.attacks.mia import boundary_distances, choose_flip_probability, collect_label_only_scores, flip_robustness
from mexit.errors import ConfigError, InputError, UserError
from mexit.serve.client import InferResult

from ._mia_world import D, world


def _some(member_count: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, m = world().target_xy
    idx = np.r_[np.flatnonzero(m)[:member_count], np.flatnonzero(~m)[:member_count]]
    return x[idx], y[idx], m[idx]


def test_the_client_is_label_only() -> None:
    out = world().target_client.infer(world().target_xy[0][:3]).outputs
    assert set(out) == {"label"}


def test_flip_robustness_is_a_fraction_zero_when_misclassified_and_seeded() -> None:
    x, y, m = _some()
    client = world().target_client
    s = flip_robustness(client, x, y, flip_probability=2 / D, n_noisy=50, seed=3)
    assert s.shape == (len(x),) and s.dtype == np.float32
    assert ((s >= 0) & (s <= 1)).all()
    wrong = client.infer(x).outputs["label"] != y
    assert wrong.any() and (s[wrong] == 0).all()
    np.testing.assert_array_equal(s, flip_robustness(client, x, y, flip_probability=2 / D, n_noisy=50, seed=3))
    assert roc_auc_score(m, s) > 0.65


def test_flip_copies_are_batched_and_batching_does_not_change_answers() -> None:
    x, y, _ = _some(10)
    runtime = world().target_client.runtime
    calls = []

    class Counting:
        def infer(self, batch: np.ndarray) -> InferResult:
            calls.append(len(batch))
            return world().target_client.infer(batch)

    big = flip_robustness(Counting(), x, y, flip_probability=3 / D, n_noisy=100, batch_size=1000, seed=0)
    assert max(calls) == 1000  # ten samples' copies share one request
    small = flip_robustness(world().target_client, x, y, flip_probability=3 / D, n_noisy=100, batch_size=7, seed=0)
    np.testing.assert_array_equal(big, small)  # per-sample exits: a batch never decides for its members
    assert runtime.rows > 0


def test_flip_probability_is_chosen_on_shadow_from_the_grid() -> None:
    xs, ys, ms = world().shadow_xy
    idx = np.r_[np.flatnonzero(ms)[:40], np.flatnonzero(~ms)[:40]]
    choice = choose_flip_probability(world().shadow_client, xs[idx], ys[idx], ms[idx], n_noisy=40, seed=0)
    assert set(choice.auc_by_probability) == {k / D for k in (1, 2, 3, 5, 10)}
    assert choice.auc_by_probability[choice.flip_probability] == max(choice.auc_by_probability.values())
    assert choice.shadow_scores.shape == (80,)
    assert world().flip_probability in choice.auc_by_probability


def test_flips_need_binary_features_and_sane_options() -> None:
    x, y, _ = _some(3)
    with pytest.raises(InputError, match=r"binary.*kind='image'"):
        flip_robustness(world().target_client, x * 0.5, y, flip_probability=0.1)
    with pytest.raises(ConfigError, match="flip_probability"):
        flip_robustness(world().target_client, x, y, flip_probability=0.9)
    with pytest.raises(ConfigError, match="choose_flip_probability"):
        collect_label_only_scores(world().target_client, x, y, "tabular")
    with pytest.raises(ConfigError, match="num_classes"):
        collect_label_only_scores(world().target_client, x, y, "image")
    with pytest.raises(ConfigError, match=r"'tabular'.*'image'"):
        collect_label_only_scores(world().target_client, x, y, "audio")


def test_an_oracle_without_labels_is_refused() -> None:
    class ProbsOnly:
        def infer(self, batch: np.ndarray) -> InferResult:
            return InferResult(outputs={"probabilities": np.zeros((len(batch), 4), np.float32)}, rtt_ns=0)

    x, y, _ = _some(2)
    with pytest.raises(UserError, match="no 'label' output"):
        flip_robustness(ProbsOnly(), x, y, flip_probability=0.1)


HSJ = {"max_iter": 3, "init_eval": 20, "max_eval": 100, "init_size": 20}


@pytest.mark.skipif(importlib.util.find_spec("art") is None,
                    reason="IBM ART (adversarial-robustness-toolbox) is not installed")
def test_boundary_distance_separates_members_is_seeded_and_zero_when_misclassified() -> None:
    x, y, m = _some(25)
    client = world().target_client
    state = np.random.get_state()
    d = collect_label_only_scores(client, x, y, "image", num_classes=4, seed=0, **HSJ)
    assert np.random.get_state()[1].tolist() == state[1].tolist(), "NumPy's global generator must be left alone"
    assert d.shape == (len(x),) and (d >= 0).all()
    wrong = client.infer(x).outputs["label"] != y
    assert (d[wrong] == 0).all() and (d[~wrong] > 0).all()
    assert d.max() <= np.sqrt(D) + 1e-6
    np.testing.assert_array_equal(d, boundary_distances(client, x, y, num_classes=4, seed=0, **HSJ))
    assert roc_auc_score(m, d) > 0.65


@pytest.mark.skipif(importlib.util.find_spec("art") is None,
                    reason="IBM ART (adversarial-robustness-toolbox) is not installed")
def test_boundary_distance_checks_its_inputs() -> None:
    x, y, _ = _some(2)
    with pytest.raises(InputError, match="clip_values"):
        boundary_distances(world().target_client, x * 3, y, num_classes=4)
    with pytest.raises(InputError, match=r"labels must lie in 0\.\.1"):
        boundary_distances(world().target_client, x, np.r_[3, np.zeros(len(x) - 1, np.int64)], num_classes=2, **HSJ)
    with pytest.raises(UserError, match=r"oracle returned label 3, outside 0\.\.2"):
        boundary_distances(world().target_client, world().target_xy[0][:50], np.zeros(50, np.int64), num_classes=3,
                           **HSJ)
