"""Exit stealing on synthetic latencies with known exits, the Eq. 1 planner and the noisy channel."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mexit.attacks.stealing import (
    ExitTimingModel,
    KDEExitStealer,
    SupervisedExitStealer,
    _monotone_match,
    choose_stealer,
    clip_exits,
    cross_fit_exits,
    describe_jitter,
    estimate_offset,
    fit_timing_model,
    isj_bandwidth,
    latency_features,
    paper_kde_steal,
    plan_queries,
    reduce_latencies,
    replay_sequential,
    sequential_stop,
    simulate_noisy_channel,
    steal,
    steal_exits,
    ztest_queries,
)
from mexit.errors import InputError

MS = 1e-3  # latencies in seconds below


def synthetic(n: int = 3000, exits: int = 6, *, gap: float = 0.3 * MS, base: float = 0.4 * MS, repeats: int = 10,
              outliers: float = 0.01, seed: int = 0, shares: list[float] | None = None,
              jitter: tuple[float, float] = (0.02 * MS, 0.05 * MS)) -> tuple[np.ndarray, np.ndarray]:
    """(n, repeats) latencies: clean time per exit (+ small per-sample spread), skewed jitter growing with
    depth, and a fraction ``outliers`` of queries slowed 5-20x (stragglers)."""
    rng = np.random.default_rng(seed)
    true = rng.choice(exits, size=n, p=shares)
    scale = np.linspace(*jitter, exits)[true][:, None]
    clean = base + gap * true + rng.normal(0, 0.01 * MS, n)
    lat = clean[:, None] + rng.gamma(2.0, scale / 1.4, size=(n, repeats))
    slow = rng.random((n, repeats)) < outliers
    lat[slow] *= rng.uniform(5, 20, size=int(slow.sum()))
    return lat, true


@pytest.mark.parametrize("seed", [0, 1])
def test_kde_recovers_six_exits_with_repeats(seed: int) -> None:
    lat, true = synthetic(seed=seed)
    stealer = KDEExitStealer()
    pred = stealer.fit_predict(lat)
    assert stealer.n_exits_ == 6
    assert (pred == true).mean() >= 0.99
    assert np.all(np.diff(stealer.boundaries_) > 0)
    # the boundaries fall in the gaps between the clean per-exit times
    clean = 0.4 * MS + 0.3 * MS * np.arange(6)
    assert np.all((stealer.boundaries_ > clean[:-1]) & (stealer.boundaries_ < clean[1:]))
    assert stealer.bandwidth_method_ == "isj" and 0 < stealer.bandwidth_ < 0.05 * MS


def test_kde_single_queries_with_stragglers_where_the_paper_variant_fails() -> None:
    lat, true = synthetic(repeats=1, seed=2)
    straggler = lat[:, 0] > 0.4 * MS + 0.3 * MS * 5 + 0.5 * MS  # slowed beyond the last exit's range
    stealer = KDEExitStealer()
    pred = stealer.fit_predict(lat)
    assert stealer.n_exits_ == 6
    clean_ok = lat[:, 0] < 4 * (0.4 * MS + 0.3 * MS * true)  # samples that were not slowed 5-20x
    assert (pred[clean_ok] == true[clean_ok]).mean() >= 0.99
    assert np.all(pred[straggler] == 5)  # stragglers beyond the range go to the extreme cluster
    paper = paper_kde_steal(lat / MS, num_exits=6)  # the reference's procedure, in ms as it expects
    assert (paper == true).mean() < 0.5


@pytest.mark.parametrize(("exits", "shares"), [(1, None), (2, None), (4, [0.6, 0.25, 0.1, 0.05]),
                                                (6, [0.02, 0.03, 0.05, 0.1, 0.3, 0.5])])
def test_kde_discovers_the_number_of_exits(exits: int, shares: list[float] | None) -> None:
    lat, true = synthetic(n=2000, exits=exits, shares=shares, seed=4)
    stealer = KDEExitStealer()
    pred = stealer.fit_predict(lat)
    assert stealer.n_exits_ == exits
    assert (pred == true).mean() >= 0.99
    assert stealer.cluster_sizes_.sum() > 0.99 * len(true)


@pytest.mark.parametrize("shape", ["gamma", "lognormal", "uniform"])
def test_kde_finds_one_exit_in_single_mode_timings_with_stragglers(shape: str) -> None:
    """No spurious exits in one skewed cluster, even with 1 % sparse stragglers at 5-20x (a vanilla model)."""
    rng = np.random.default_rng(7)
    n = 5000
    base = {"gamma": 1 + rng.gamma(1.5, 0.1, n), "lognormal": np.exp(rng.normal(0, 0.3, n)),
            "uniform": rng.uniform(1, 2, n)}[shape]
    slow = rng.random(n) < 0.01
    base[slow] *= rng.uniform(5, 20, int(slow.sum()))
    stealer = KDEExitStealer()
    assert stealer.fit(base).n_exits_ == 1
    assert np.all(stealer.predict(base) == 0)


def test_kde_log_scale_and_fixed_bandwidth() -> None:
    lat, true = synthetic(n=1500, seed=5)
    assert (KDEExitStealer(scale="log").fit_predict(lat) == true).mean() >= 0.99
    fixed = KDEExitStealer(bandwidth=0.01 * MS)
    assert (fixed.fit_predict(lat) == true).mean() >= 0.99
    assert fixed.bandwidth_method_ == "given"
    # Silverman's rule on six modes spanning 1.5 ms oversmooths: far fewer exits are found
    assert KDEExitStealer(bandwidth="silverman").fit(lat).n_exits_ < 6


def test_kde_with_a_known_number_of_exits_keeps_the_strongest_modes() -> None:
    """Few samples, 3 queries each, heavy per-query noise: discovery misses an exit (every index above it
    shifts), a known exit count keeps the four strongest modes."""
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(4), [50, 34, 50, 50])
    clean = 0.7 + 1.2 * true + rng.uniform(-0.2, 0.2, len(true))  # ms
    lat = clean[:, None] + rng.exponential(1.0, (len(true), 3))  # one-sided (queueing) noise: the minimum fits
    discovered = KDEExitStealer(reduce="min")
    assert (discovered.fit_predict(lat) == true).mean() < 0.5 and discovered.n_exits_ < 4
    known = KDEExitStealer(n_exits=4, reduce="min")
    assert (known.fit_predict(lat) == true).mean() >= 0.9 and known.n_exits_ == 4
    assert KDEExitStealer(n_exits=2).fit(lat).n_exits_ == 2
    with pytest.raises(InputError):
        KDEExitStealer(n_exits=0)


def test_kde_trimmed_mean_beats_minimum_on_two_sided_noise() -> None:
    """Per-query speed varies both ways (a shared VM): the minimum of the repeats is an extreme value."""
    rng = np.random.default_rng(3)
    true = np.repeat(np.arange(6), 60)
    lat = 1.3 + 0.5 * true[:, None] + rng.normal(0, 0.18, (len(true), 10))  # ms; sd 0.18 ms per query
    trimmed = KDEExitStealer(n_exits=6).fit_predict(lat)  # default: 20 % trimmed mean of the repeats
    minimum = KDEExitStealer(n_exits=6, reduce="min").fit_predict(lat)
    assert (trimmed == true).mean() >= 0.99 > (minimum == true).mean()


def test_align_numbers_clusters_by_the_shadow_exits_when_fast_exits_are_unused() -> None:
    lat, true = synthetic(n=1200, seed=4, shares=[0, 0, 0.3, 0.3, 0.2, 0.2])
    shadow, shadow_exits = synthetic(n=1200, seed=5, shares=[0.1, 0.1, 0.2, 0.2, 0.2, 0.2])
    stealer = KDEExitStealer(max_exits=6).fit(lat)
    assert stealer.n_exits_ == 4 and (stealer.predict(lat) == true).mean() < 0.05  # ranks 0..3 for exits 2..5
    stealer.align(shadow, shadow_exits, 6)
    assert stealer.exit_map_.tolist() == [2, 3, 4, 5]
    assert (stealer.predict(lat) == true).mean() >= 0.99
    assert stealer.describe()["exit_map"] == [2, 3, 4, 5]
    # exits the shadow never took are extrapolated from its per-exit spacing
    only_fast = shadow_exits < 3
    stealer.align(shadow[only_fast], shadow_exits[only_fast], 6)
    assert stealer.exit_map_.tolist() == [2, 3, 4, 5]
    with pytest.raises(InputError):
        stealer.align(shadow, shadow_exits[:10], 6)
    with pytest.raises(InputError):
        stealer.align(shadow, shadow_exits + 6, 6)


def test_alignment_maps_a_split_cluster_to_one_exit() -> None:
    """Told to find more clusters than the target forms, the KDE splits one; both halves keep its exit
    instead of pushing every later cluster one exit up."""
    exit_centres = np.array([0.4, 0.7, 1.0, 1.3, 1.6, 1.9])
    assert _monotone_match(np.array([0.40, 0.45, 0.70, 1.3]), exit_centres).tolist() == [0, 0, 1, 3]
    assert _monotone_match(np.array([0.7, 1.0]), exit_centres).tolist() == [1, 2]


def test_align_single_cluster_goes_to_the_only_exit_the_shadow_used() -> None:
    rng = np.random.default_rng(0)
    lat = 3.0 + rng.normal(0, 0.02, (200, 5))  # every sample leaves at the last of six exits
    shadow = 3.1 + rng.normal(0, 0.02, (200, 5))
    stealer = KDEExitStealer(max_exits=6).fit(lat).align(shadow, np.full(200, 5), 6)
    assert stealer.n_exits_ == 1 and set(stealer.predict(lat).tolist()) == {5}


def test_kde_caps_the_number_of_exits_and_validates() -> None:
    lat, _ = synthetic(n=1500, seed=6)
    assert KDEExitStealer(max_exits=3).fit(lat).n_exits_ == 3
    with pytest.raises(InputError):
        KDEExitStealer(trim=(0.5, 0.1))
    with pytest.raises(InputError):
        KDEExitStealer(bandwidth="wide")
    with pytest.raises(InputError):
        KDEExitStealer().predict(lat)
    with pytest.raises(InputError):
        reduce_latencies(np.array([[1.0, 2.0], [np.nan, np.nan]]))  # a sample without any recorded repeat
    with pytest.raises(InputError):
        reduce_latencies(np.array([[1.0, np.inf]]))
    assert reduce_latencies(np.array([[1.0, np.nan, 3.0]]), "mean").tolist() == [2.0]  # NaN = repeat not made
    lat = np.array([[1.0, 2.0, 3.0, 4.0, 100.0]])  # one straggler in five repeats
    assert reduce_latencies(lat).tolist() == [3.0]  # trimmed: 20 % cut from each end, mean of 2, 3, 4
    assert reduce_latencies(lat, "min").tolist() == [1.0] and reduce_latencies(lat, "median").tolist() == [3.0]
    with pytest.raises(InputError):
        reduce_latencies(lat, "max")


def test_kde_density_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    data = np.r_[rng.normal(0, 1, 400), rng.normal(6, 0.5, 200)]
    stealer = KDEExitStealer(bandwidth=0.3, trim=(0.0, 1.0)).fit(data)
    kde = stats.gaussian_kde(data, bw_method=0.3 / data.std(ddof=1))
    probe = stealer.grid_[:: max(1, len(stealer.grid_) // 50)]
    assert np.allclose(stealer.density_[:: max(1, len(stealer.grid_) // 50)], kde(probe), atol=2e-3)
    assert stealer.n_exits_ == 2


def test_isj_bandwidth_on_gaussian_data_is_close_to_the_normal_reference() -> None:
    x = np.random.default_rng(1).normal(size=5000)
    silverman = 1.06 * x.std() * len(x) ** -0.2
    assert 0.7 < isj_bandwidth(x) / silverman < 1.3
    # on well-separated modes ISJ follows the modes' width, not the whole spread
    modes = np.r_[x[:2500] * 0.01, x[2500:] * 0.01 + 1.0]
    assert isj_bandwidth(modes) < 0.05 * 1.06 * modes.std() * len(modes) ** -0.2
    with pytest.raises(ValueError):
        isj_bandwidth(np.ones(10))


@pytest.mark.parametrize("model", ["gbt", "logistic"])
def test_supervised_stealer(model: str) -> None:
    shadow, shadow_exits = synthetic(n=1500, seed=10, jitter=(0.05 * MS, 0.1 * MS))
    target, target_exits = synthetic(n=1500, seed=11, jitter=(0.05 * MS, 0.1 * MS))
    stealer = SupervisedExitStealer(model).fit(shadow, shadow_exits)
    assert (stealer.predict(target) == target_exits).mean() >= 0.98
    assert stealer.predict_proba(target).shape == (1500, 6)


def test_supervised_single_class_and_features() -> None:
    lat = np.full((5, 3), 1e-3)
    stealer = SupervisedExitStealer().fit(lat, np.zeros(5, dtype=int))
    assert stealer.predict(lat).tolist() == [0] * 5
    f = latency_features(np.array([[1.0, 2.0, 6.0]]))
    assert f.tolist() == [[1.5, 2.0, 4.0, 3.0]]  # quartiles (linear interpolation) and mean
    with pytest.raises(InputError):
        SupervisedExitStealer("svm")


def test_ztest_queries_matches_eq1() -> None:
    # N >= 2 (z sigma / gap)^2 with z = 1.959964 at 95 %
    assert ztest_queries(3.0, 10.0) == 86  # 2 * (1.959964 * 10 / 3)^2 = 85.37
    assert ztest_queries(1.0, 1.0) == 8  # 7.68
    assert ztest_queries(1.0, 1.0, confidence=0.99) == 14  # 2 * 2.575829^2 = 13.27
    assert ztest_queries(5e-3, 0.0) == 1
    assert ztest_queries(11.0, 1.0) == 1
    n = ztest_queries(0.3, 0.5)
    z = 0.3 / (0.5 * np.sqrt(2 / n))  # Eq. 1 at the planned N clears 1.96, at N - 1 it does not
    assert z >= 1.959964 and 0.3 / (0.5 * np.sqrt(2 / (n - 1))) < 1.959964
    assert plan_queries([10.0, 1.0, 5.5, 4.0], noise_sigma=1.5) == ztest_queries(1.5, 1.5)
    with pytest.raises(InputError):
        ztest_queries(0.0, 1.0)
    with pytest.raises(InputError):
        plan_queries([1.0], 1.0)


def test_noisy_channel_averaging_reduces_variance() -> None:
    clean = np.full(20000, 1e-3)
    one = simulate_noisy_channel(clean, mu=2e-3, sigma=1e-3, queries=1, rng=0)
    many = simulate_noisy_channel(clean, mu=2e-3, sigma=1e-3, queries=16, rng=1)
    assert one.shape == clean.shape and np.all(one > clean)
    ratio = np.var(one - clean) / np.var(many - clean)
    assert 13 < ratio < 19  # 1/Q
    # the mean added delay is E|N(mu, sigma^2)| whatever Q
    assert np.mean(many - clean) == pytest.approx(np.mean(one - clean), rel=0.02)
    assert np.array_equal(simulate_noisy_channel(clean[:5], 0, 1, 3, rng=7),
                          simulate_noisy_channel(clean[:5], 0, 1, 3, rng=7))
    assert simulate_noisy_channel(np.ones((4, 2)), 0, 1, 2, rng=0).shape == (4, 2)


# ------------------------------------------------------------------ adversary 2: the timing model and choice
def test_timing_model_posterior_matches_the_closed_form_for_gaussian_noise() -> None:
    """Two exits at 0 and 1, unit Gaussian noise: log-odds of exit 1 = sum over repeats of (t - 1/2)."""
    model = ExitTimingModel(centres=np.array([0.0, 1.0]), used=np.array([True, True]), df=np.inf, scale=1.0)
    t = np.random.default_rng(0).normal(0.3, 1.0, (50, 4))
    t[:, 3] = np.nan  # a repeat not made is ignored
    expected = 1 / (1 + np.exp(-(t[:, :3] - 0.5).sum(axis=1)))
    assert np.allclose(model.posterior(t)[:, 1], expected)
    model.offset = (7.0, 1.0)  # the target runs 7 units slower: the same decision on shifted timings
    assert np.allclose(model.posterior(t + 7.0)[:, 1], expected)


def test_sequential_stopping_rule_meets_the_wald_expectation() -> None:
    """SPRT between two Gaussian exits (gap = sigma): stop at posterior 0.95 after about ln(19) / (gap²/2σ²) queries
    (Wald: 5.9, plus the overshoot of the last step) and err at most about 5 % of the time."""
    model = ExitTimingModel(centres=np.array([0.0, 1.0]), used=np.array([True, True]), df=np.inf, scale=1.0)
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 3000)
    t = truth[:, None] + rng.normal(0, 1, (3000, 80))
    out = replay_sequential(model, t, truth, confidence=0.95, min_queries=1)
    wald = np.log(19) / 0.5
    assert wald <= out["mean_queries"] <= wald + 3
    assert 0.93 <= out["accuracy"] <= 0.99 and out["undecided"] < 10
    # a well-separated pair stops at the minimum; identical exits never become confident
    sharp = ExitTimingModel(centres=np.array([0.0, 1.0]), used=np.array([True, True]), df=np.inf, scale=0.1)
    post, confident = sequential_stop(sharp, truth[:, None] + rng.normal(0, 0.1, (3000, 2)), 0.95)
    assert confident.all() and np.array_equal(post.argmax(axis=1), truth)
    flat = ExitTimingModel(centres=np.array([1.0, 1.0]), used=np.array([True, True]), df=np.inf, scale=1.0)
    assert not flat.informative() and not sequential_stop(flat, t, 0.95)[1].any()
    with pytest.raises(InputError):
        sequential_stop(model, t, 1.0)


def test_timing_model_fit_and_jitter_plan() -> None:
    shadow, exits = synthetic(n=600, seed=20, jitter=(0.05 * MS, 0.1 * MS))
    model = ExitTimingModel.fit(shadow, exits, 6)
    assert np.allclose(np.diff(model.centres), 0.3 * MS, rtol=0.1) and model.informative()
    target, truth = synthetic(n=600, seed=21, jitter=(0.05 * MS, 0.1 * MS))
    assert (model.predict(target) == truth).mean() >= 0.98
    plan = describe_jitter(shadow, exits, 6)
    assert plan["eq1_queries"] >= 1 and plan["min_gap"] == pytest.approx(0.3 * MS, rel=0.1)
    assert 1 <= plan["sequential"]["mean_queries"] <= 10 and plan["sequential"]["accuracy"] >= 0.98


def test_estimate_offset_recovers_a_shift_and_a_scale() -> None:
    shadow, exits = synthetic(n=800, seed=22)
    target, _ = synthetic(n=800, seed=23)
    shift, scale = estimate_offset(target + 2.5 * MS, shadow, exits)
    assert shift == pytest.approx(2.5 * MS, abs=0.03 * MS) and scale == 1.0
    shift, scale = estimate_offset(1.5 * target + 1.0 * MS, shadow, affine=True)
    assert scale == pytest.approx(1.5, rel=0.05) and shift == pytest.approx(1.0 * MS, abs=0.1 * MS)


@pytest.mark.parametrize("offset", [0.0, 0.45 * MS, 4.0 * MS])
def test_no_stealer_falls_below_chance_when_the_target_is_offset(offset: float) -> None:
    """Target timings = shadow-like timings + a constant (a slower serving stack): issue 16 saw the aligned KDE
    fall to 0.245 at 10 repeats. Every stealer that uses the shadow stays far above the majority-exit share."""
    shares = [0.05, 0.05, 0.1, 0.2, 0.2, 0.4]
    shadow, exits = synthetic(n=500, seed=24, shares=shares, jitter=(0.05 * MS, 0.1 * MS))
    target, truth = synthetic(n=500, seed=25, shares=shares, jitter=(0.05 * MS, 0.1 * MS))
    chance = np.bincount(truth).max() / len(truth)
    res = steal_exits(target + offset, shadow, exits, 6, seed=0)
    assert res.offset[0] == pytest.approx(offset, abs=0.05 * MS)
    for name in ("kde", "supervised", "likelihood", "chosen"):
        assert (res.stolen[name] == truth).mean() >= max(chance, 0.95), name
    blind = steal_exits(target, shadow, exits, 6, seed=0).stolen["kde-blind"]
    assert np.array_equal(res.stolen["kde-blind"], blind)  # uses no shadow timing: an offset cannot move it
    assert set(res.stolen) == {"kde", "kde-blind", "supervised", "nearest", "likelihood", "chosen"}


def test_stealer_choice_by_cross_validation() -> None:
    """The choice is the best CV balanced accuracy on the shadow, and it transfers to the target."""
    shares = [0.02, 0.03, 0.05, 0.1, 0.3, 0.5]  # rare fast exits, as on Location
    shadow, exits = synthetic(n=600, seed=26, shares=shares, jitter=(0.1 * MS, 0.2 * MS), repeats=5)
    target, truth = synthetic(n=600, seed=27, shares=shares, jitter=(0.1 * MS, 0.2 * MS), repeats=5)
    choice = choose_stealer(shadow, exits, 6, seed=0)
    best_cv = max(s["balanced_accuracy"] for s in choice.scores.values())
    assert choice.scores[choice.name]["balanced_accuracy"] == best_cv
    assert choice.describe()["chosen"] == choice.name and len(choice.scores[choice.name]["per_exit_recall"]) == 6
    res = steal_exits(target, shadow, exits, 6, seed=0)
    acc = {k: (v == truth).mean() for k, v in res.stolen.items()}
    assert acc["chosen"] >= max(acc[k] for k in ("kde", "supervised", "likelihood")) - 0.02
    with pytest.raises(InputError, match="unknown stealer"):
        choose_stealer(shadow, exits, 6, candidates=("oracle",))


def test_balanced_supervised_stealer_recovers_rare_exits() -> None:
    shares = [0.03, 0.03, 0.04, 0.1, 0.2, 0.6]
    shadow, exits = synthetic(n=800, seed=28, shares=shares, jitter=(0.1 * MS, 0.2 * MS))
    target, truth = synthetic(n=800, seed=29, shares=shares, jitter=(0.1 * MS, 0.2 * MS))
    pred = SupervisedExitStealer().fit(shadow, exits).predict(target)
    recall = [(pred[truth == k] == k).mean() for k in range(6)]
    assert min(recall) >= 0.8


def test_cross_fit_returns_stolen_exits_not_the_true_ones() -> None:
    """Each shadow sample's exit comes from a stealer fitted without its label: where the label disagrees with
    the timing (10 % relabelled at random), the cross-fitted exit follows the timing. Returning the true
    (given) exits, or fitting on all folds, would reproduce the labels and fail here."""
    shadow, timing_exit = synthetic(n=600, seed=30, jitter=(0.05 * MS, 0.1 * MS))
    rng = np.random.default_rng(3)
    labels = timing_exit.copy()
    flipped = rng.random(600) < 0.1
    labels[flipped] = (labels[flipped] + rng.integers(1, 6, flipped.sum())) % 6
    for stealer in ("chosen", "supervised", "likelihood", "kde"):
        stolen = cross_fit_exits(shadow, labels, 6, stealer=stealer, folds=5, seed=0)
        assert not np.array_equal(stolen, labels)
        assert (stolen[flipped] == labels[flipped]).mean() < 0.1, stealer
        assert (stolen[flipped] == timing_exit[flipped]).mean() > 0.9, stealer
    soft = cross_fit_exits(shadow, labels, 6, stealer="likelihood", soft=True)
    assert soft.shape == (600, 6) and np.allclose(soft.sum(axis=1), 1.0)


def test_steal_keeps_the_suite_interface_and_accepts_nan_padded_repeats() -> None:
    shadow, exits = synthetic(n=400, seed=31)
    target, truth = synthetic(n=400, seed=32)
    target[::2, 5:] = np.nan  # adaptive querying: half the samples needed only five queries
    stolen, fits = steal(target, shadow, exits, 6, 0)
    assert set(fits) == {"kde", "kde-blind"} and isinstance(fits["kde"], KDEExitStealer)
    assert (stolen["chosen"] == truth).mean() >= 0.98 and (stolen["supervised"] == truth).mean() >= 0.98
    assert np.array_equal(clip_exits(np.array([-1, 3, 9]), 6), [0, 3, 5])


def loaded(n: int = 400, *, seed: int, repeats: int = 10, shares: list[float] | None = None) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """Timings of a loaded machine: the noise only adds time, and most queries wait behind other work
    (exponential waits of 3 ms, 10x the 0.3 ms exit gap), so only a sample's fastest repeats show its exit."""
    rng = np.random.default_rng(seed)
    true = rng.choice(6, size=n, p=shares)
    clean = 0.5 * MS + 0.3 * MS * true
    busy = rng.random((n, repeats)) < 0.7
    wait = np.where(busy, rng.exponential(3 * MS, (n, repeats)), rng.exponential(0.02 * MS, (n, repeats)))
    return clean[:, None] + wait, true


def test_one_sided_noise_makes_the_cross_validation_choose_the_fastest_repeat() -> None:
    shadow, exits = loaded(seed=40)
    target, truth = loaded(seed=41)
    choice = choose_stealer(shadow, exits, 6, seed=0)
    assert choice.settings["nearest"] == "min" and choice.settings["likelihood"] == "min"
    assert choice.scores["nearest"]["balanced_accuracy_by_reduce"]["trimmed"] < 0.6
    res = steal_exits(target, shadow, exits, 6, seed=0)
    assert (res.stolen["chosen"] == truth).mean() >= 0.9 and res.timing.statistic == "min"
    model = fit_timing_model(shadow, exits, 6)
    assert model.statistic == "min" and model.informative()
    # the fastest-query model sharpens with more queries: the sequential test decides more samples at 10 than 3
    few = sequential_stop(model, target[:, :3])[1].mean()
    assert sequential_stop(model, target)[1].mean() > few
    padded = target.copy()
    padded[:, 6:] = np.nan  # fewer queries for some samples: each row uses the density of its own count
    assert (model.predict(padded) == truth).mean() >= 0.8


def test_constant_time_shadow_is_not_informative() -> None:
    rng = np.random.default_rng(5)
    exits = rng.integers(0, 6, 300)
    padded = 5 * MS + rng.exponential(0.1 * MS, (300, 8))  # every exit released at the same time
    model = ExitTimingModel.fit(padded, exits, 6)
    assert not model.informative()
    shadow, ex = synthetic(n=300, seed=42)
    assert ExitTimingModel.fit(shadow, ex, 6).informative()


def test_selection_score_does_not_let_one_rare_shadow_sample_decide():
    """A stealer missing the only shadow sample of a rare exit loses 1/K of raw balanced accuracy; the
    selection score shrinks that exit's recall towards the overall accuracy, so it loses far less."""
    from mexit.attacks.stealing import _balanced, _selection_score

    y = np.r_[np.zeros(60, int), np.ones(60, int), 2]
    miss_rare = y.copy()
    miss_rare[-1] = 1
    assert _balanced(y, miss_rare) == pytest.approx(2 / 3)
    assert _selection_score(y, miss_rare) > 0.85
    miss_common = y.copy()
    miss_common[60:84] = 0  # 24 of 60 exit-1 samples wrong: a real weakness on a common exit
    assert _selection_score(y, miss_common) < _selection_score(y, miss_rare)
    assert _selection_score(y, y) == 1.0 and _selection_score(y, y, prior=0) == _balanced(y, y)
    assert _selection_score(y, miss_rare, prior=0) == pytest.approx(_balanced(y, miss_rare))


def test_an_adaptive_recording_is_stolen_with_the_sequential_tests_own_model() -> None:
    """Adaptive querying stopped each sample when the likelihood model was confident: that model is the pick."""
    from mexit.attacks.stealing import ADAPTIVE_RULE

    shadow, exits = synthetic(400, seed=50)
    target, _ = synthetic(200, seed=51)
    fixed = steal_exits(target, shadow, exits, 6, seed=0)
    assert fixed.choice.rule == "cross-validation on the shadow"
    padded = target.copy()
    padded[::2, 3:] = np.nan  # easy samples stopped after three queries
    res = steal_exits(padded, shadow, exits, 6, seed=0, adaptive=True)
    assert res.choice.name == "likelihood" and res.describe()["rule"] == ADAPTIVE_RULE
    assert np.array_equal(res.stolen["chosen"], res.stolen["likelihood"])
    assert res.describe()["cv"] == fixed.describe()["cv"]  # the shadow's cross-validation is still reported


def test_fastest_query_density_extrapolates_beyond_the_shadows_repeats() -> None:
    """Adaptive querying asks uncertain samples far more often than the shadow's R repeats: the fastest of
    m > R queries is faster still, so its density moves left with m instead of reusing R's."""
    shadow, exits = loaded(seed=40, repeats=10)
    model = ExitTimingModel.fit(shadow, exits, 6, statistic="min")
    grid = model._min_density(10)[0]
    modes = [grid[np.argmax(model._min_density(m)[1])] for m in (10, 40, 160)]
    assert modes[0] > modes[1] > modes[2]  # the fastest of more queries sits lower
    step = grid[1] - grid[0]
    for m in (40, 160):
        assert np.exp(model._min_density(m)[1]).sum() * step == pytest.approx(1.0, abs=0.05)
    assert np.array_equal(model._min_density(3)[1], model.min_logpdfs[2])  # measured up to R
    target, truth = loaded(seed=41, repeats=60)
    assert (model.predict(target) == truth).mean() >= 0.9
