"""LiRA and RMIA on a synthetic world where the answer is known.

A "model" trained on a set S returns, for sample i, the true-class log-odds ``base_i + boost * [i in S] +
noise``: samples differ a lot in difficulty (``base_i``), which is what per-sample reference calibration
is for. Reference models train on random halves of the pool; the target memorises a known subset.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.special import expit

from mexit.attacks.metrics import attack_metrics, paired_bootstrap
from mexit.attacks.mia import get_attack
from mexit.attacks.mia.lira import lira_scores
from mexit.attacks.mia.rmia import rmia_scores
from mexit.attacks.reference import ReferenceError, half_splits, logit_confidence
from mexit.attacks.signals import Signals, SignalsError

N, R = 600, 16
ALL = ["lira-offline", "lira-online", "rmia-offline", "rmia-online"]
HYBRID = ["lira-offline-hybrid", "lira-online-hybrid", "rmia-offline-hybrid", "rmia-online-hybrid"]


class World:
    """Per-sample difficulty, a pool of N samples, R reference models on random halves (seeded)."""

    def __init__(self, seed: int = 0, boost: float = 1.0, noise: float = 0.3, num_exits: int = 3,
                 base: tuple[float, float] = (0.0, 3.0)) -> None:
        self.rng = np.random.default_rng(seed)
        self.base = self.rng.normal(base[0], base[1], N)
        self.boost, self.noise, self.num_exits = boost, noise, num_exits
        halves = half_splits(np.arange(N), R, seed)
        self.ref_in = np.stack([np.isin(np.arange(N), h) for h in halves], axis=1)
        self.ref_phi = np.stack([self.model(self.ref_in[:, r]) for r in range(R)], axis=1)
        self.ref_exit = np.stack([self.exits(self.ref_phi[:, r], self.ref_in[:, r]) for r in range(R)], axis=1)

    def model(self, trained_on: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        phi = self.base + self.boost * trained_on + self.rng.normal(0.0, self.noise, N)
        return phi if extra is None else phi + extra

    def exits(self, phi: np.ndarray, member: np.ndarray, exit_signal: float = 0.0) -> np.ndarray:
        """Confident samples leave early; ``exit_signal`` makes members leave earlier beyond their confidence."""
        u = phi - self.base + self.rng.normal(0.0, 1.0, N) + exit_signal * member
        return np.clip(2 - np.digitize(u, [0.5, 1.5]), 0, self.num_exits - 1).astype(np.int64)

    def signals(self, member: np.ndarray, phi: np.ndarray, exits: np.ndarray, cols: slice = slice(None)) -> Signals:
        p = expit(phi).astype(np.float64)
        probs = np.stack([1 - p, p], axis=1).astype(np.float32)
        return Signals(member=member, true_label=np.ones(N, np.int64), pred_label=(p >= 0.5).astype(np.int64),
                       sample_index=np.arange(N), num_exits=self.num_exits, num_classes=2, probs=probs,
                       exit_index=exits, reference_score=self.ref_phi[:, cols].astype(np.float32),
                       reference_in=self.ref_in[:, cols], reference_exit=self.ref_exit[:, cols])

    def deployment(self, exit_signal: float = 0.0, extra: np.ndarray | None = None) -> Signals:
        member = self.rng.random(N) < 0.5
        phi = self.model(member, extra)
        return self.signals(member, phi, self.exits(phi, member, exit_signal))


def test_logit_confidence_is_lira_statistic() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]], dtype=np.float32)
    phi = logit_confidence(probs, np.array([0, 2]))
    assert phi[0] == pytest.approx(np.log(0.7 / 0.3), rel=1e-5)
    assert np.isfinite(phi[1]) and phi[1] < -60  # a zero probability stays finite


@pytest.mark.parametrize("name", ALL + HYBRID)
def test_memorised_subset_is_ranked_first(name: str) -> None:
    # Memorised samples are the hard (atypical) ones. RMIA works on probabilities, and Pr(x|target)/Pr(x) of a
    # sample is at most 1/Pr(x): memorising an already-confident sample cannot show there, so the world's
    # samples are hard for a model that did not train on them (true-class probability ~0.05)
    w = World(seed=1, base=(-3.0, 1.0))
    shadow, target = w.deployment(), w.deployment()
    # the target memorises 20 known members far more strongly than the rest
    members = np.flatnonzero(target.member)
    memorised = members[:20]
    extra = np.zeros(N)
    extra[memorised] = 4.0
    target = replace(target, probs=w.signals(target.member, logit_confidence(target.probs, target.true_label)
                                             + extra, target.exit_index).probs)
    kwargs = {}
    if name.startswith("rmia") and name.endswith("hybrid"):  # exit-matched z needs a population of non-members
        out = np.zeros(N, bool)
        phi = w.model(out)
        kwargs["population"] = w.signals(out, phi, w.exits(phi, out))
    attack = get_attack(name, **kwargs).fit(shadow)
    scores = attack.score(target)
    top = np.argsort(-scores, kind="stable")[:20]
    assert len(np.intersect1d(top, memorised)) >= 18, name
    m = attack_metrics(target.member, scores, threshold=attack.threshold_, n_bootstrap=0)
    assert m["auc"]["value"] > 0.75  # per-sample calibration: a global threshold on phi would be near 0.6


@pytest.mark.parametrize("name", ["lira-online", "rmia-offline", "lira-offline-hybrid"])
def test_shuffled_membership_is_chance(name: str) -> None:
    w = World(seed=2)
    shadow, target = w.deployment(), w.deployment()
    shuffled = replace(target, member=np.random.default_rng(9).permutation(target.member))
    scores = get_attack(name).fit(shadow).score(shuffled)
    m = attack_metrics(shuffled.member, scores, threshold=0.0, n_bootstrap=400, seed=0)
    lo, hi = m["auc"]["ci"]
    assert lo <= 0.5 <= hi


def test_beats_global_loss_threshold() -> None:
    """Difficulty varies per sample: reference calibration must beat the global loss threshold clearly."""
    w = World(seed=3)
    shadow, target = w.deployment(), w.deployment()
    target = replace(target, loss=-np.log(target.probs[:, 1]))
    shadow = replace(shadow, loss=-np.log(shadow.probs[:, 1]))
    loss = get_attack("loss").fit(shadow).score(target)
    lira = get_attack("lira-online").fit(shadow).score(target)
    diff = paired_bootstrap(target.member, loss, lira, n_bootstrap=300)
    assert diff["auc"]["significant"] and diff["auc"]["difference"] > 0.2


def test_exit_aware_uses_exit_information() -> None:
    """When members leave earlier beyond what their confidence says, the exit-aware forms gain (paired)."""
    w = World(seed=4, boost=0.5)
    shadow, target = w.deployment(exit_signal=2.0), w.deployment(exit_signal=2.0)
    # reference exits follow the same rule as the deployments
    w.ref_exit = np.stack([w.exits(w.ref_phi[:, r], w.ref_in[:, r], 2.0) for r in range(R)], axis=1)
    shadow = replace(shadow, reference_exit=w.ref_exit)
    target = replace(target, reference_exit=w.ref_exit)
    for name in ("lira-online", "lira-offline"):
        plain = get_attack(name).fit(shadow).score(target)
        aware = get_attack(f"{name}-hybrid").fit(shadow).score(target)
        diff = paired_bootstrap(target.member, plain, aware, n_bootstrap=300)
        assert diff["auc"]["difference"] > 0 and diff["auc"]["significant"], name


def test_single_out_reference_offline() -> None:
    """The shadow model alone (OUT for every target sample) runs offline LiRA and RMIA; online refuses."""
    w = World(seed=5)
    shadow_model_phi = w.model(np.zeros(N, bool))
    target = w.deployment()
    target = replace(target, reference_score=shadow_model_phi[:, None].astype(np.float32),
                     reference_in=np.zeros((N, 1), bool),
                     reference_exit=w.exits(shadow_model_phi, np.zeros(N))[:, None])
    # the shadow's own samples, with the target model as their single OUT reference
    shadow = w.deployment()
    target_on_shadow = w.model(np.zeros(N, bool))
    shadow = replace(shadow, reference_score=target_on_shadow[:, None].astype(np.float32),
                     reference_in=np.zeros((N, 1), bool),
                     reference_exit=w.exits(target_on_shadow, np.zeros(N))[:, None])
    for name in ("lira-offline", "rmia-offline", "lira-offline-hybrid", "rmia-offline-hybrid"):
        attack = get_attack(name).fit(shadow)
        auc = attack_metrics(target.member, attack.score(target), threshold=attack.threshold_, n_bootstrap=0)
        assert auc["auc"]["value"] > 0.65, name
    with pytest.raises(ReferenceError, match=r"online LiRA needs >= 2 IN reference"):
        get_attack("lira-online", fix_variance=False).fit(shadow)
    with pytest.raises(ReferenceError, match="online RMIA needs >= 1 IN"):
        get_attack("rmia-online").fit(shadow)


def test_online_lira_needs_two_in_models_per_sample() -> None:
    w = World(seed=6)
    shadow = w.deployment()
    few = w.signals(shadow.member, logit_confidence(shadow.probs, shadow.true_label), shadow.exit_index,
                    cols=slice(0, 2))  # 2 complementary models: every sample IN for exactly 1
    with pytest.raises(ReferenceError, match=r">= 2 IN reference model\(s\) for every sample.*600 of 600"):
        get_attack("lira-online", fix_variance=False).fit(few)
    get_attack("lira-online", fix_variance=True).fit(few)  # fixed variance needs one of each side


def test_rmia_offline_a_is_tuned_on_shadow_and_population_checked() -> None:
    w = World(seed=7)
    shadow, target = w.deployment(), w.deployment()
    attack = get_attack("rmia-offline").fit(shadow)
    assert set(attack.a_auc_) == {round(a, 2) for a in np.linspace(0, 1, 11)}
    assert attack.a_auc_[attack.a_] == max(attack.a_auc_.values())
    fixed = get_attack("rmia-offline", offline_a=0.3).fit(shadow)
    assert fixed.a_ == 0.3 and not fixed.a_auc_
    # a population of known non-members gives the same ranking as the default (target samples) population
    pop_member = np.zeros(N, bool)
    pop = w.signals(pop_member, w.model(np.zeros(N, bool)), w.exits(w.model(np.zeros(N, bool)), pop_member))
    with_pop = get_attack("rmia-offline", offline_a=0.3, population=pop).fit(shadow).score(target)
    without = fixed.score(target)
    from scipy.stats import spearmanr

    assert spearmanr(with_pop, without).statistic > 0.99
    with pytest.raises(ReferenceError, match="population holds 5 members"):
        get_attack("rmia-online", population=replace(pop, member=np.r_[np.ones(5, bool), np.zeros(N - 5, bool)]))
    with pytest.raises(Exception, match="gamma must be > 0"):
        get_attack("rmia-online", gamma=0.0)


def test_missing_references_is_one_line() -> None:
    w = World(seed=8)
    plain = replace(w.deployment(), reference_score=None, reference_in=None, reference_exit=None)
    with pytest.raises(SignalsError, match="needs reference-model scores, but the shadow signals hold none"):
        get_attack("lira-offline").fit(plain)
    with_refs = w.deployment()
    with pytest.raises(SignalsError, match="exits the reference models took"):
        get_attack("lira-online-hybrid").fit(replace(with_refs, reference_exit=None))


def test_array_core_matches_hand_computation() -> None:
    phi = np.array([2.0, 0.0])
    ref = np.array([[1.0, 3.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    inn = np.array([[True, True, False, False], [True, False, True, False]])
    from scipy.stats import norm

    s = lira_scores(phi, ref, inn, online=True, fix_variance=False)
    assert s[0] == pytest.approx(norm.logpdf(2.0, 2.0, 1.0) - norm.logpdf(2.0, 0.0, 1.0))
    off = lira_scores(phi, ref, inn, online=False, fix_variance=True)
    sd_out = np.std([-1.0, 1.0, 0.0, 0.0])
    assert off[0] == pytest.approx(-norm.logsf((2.0 - 0.0) / sd_out))
    r = rmia_scores(np.array([1.0, 3.0, 10.0]), np.array([0.5, 2.0, 4.0]), gamma=1.0)
    assert r.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    matched = rmia_scores(np.array([3.0, 3.0]), np.array([0.5, 2.0, 4.0, 5.0]), exit_x=np.array([0, 1]),
                          exit_z=np.array([0, 0, 1, 1]), min_exit_population=2)
    assert matched.tolist() == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("name", ["lira-online", "rmia-online", "lira-online-hybrid", "rmia-offline"])
def test_fit_on_a_paired_reference(name: str) -> None:
    """A reference model as the shadow (its membership is the adversary's): no shadow reference arrays needed."""
    from mexit.attacks.reference import paired_shadow

    w = World(seed=10)
    target = w.deployment()
    pair = paired_shadow(target, 0)
    assert np.allclose(logit_confidence(pair.probs, pair.true_label), w.ref_phi[:, 0], atol=1e-3)
    assert pair.reference_score.shape == (N, R - 1) and np.array_equal(pair.member, w.ref_in[:, 0])
    attack = get_attack(name).fit(pair)
    m = attack_metrics(target.member, attack.score(target), threshold=attack.threshold_, n_bootstrap=0)
    assert m["auc"]["value"] > 0.8 and m["balanced_accuracy"]["value"] > 0.6


def test_registered_with_the_signals_they_need() -> None:
    from mexit.attacks.mia import ATTACKS, attacks_for

    for name in ALL + HYBRID:
        req = ATTACKS[name].requires
        assert {"probs", "reference_score", "reference_in"} <= req
        assert ATTACKS[name].hybrid == name.endswith("-hybrid") == ("exit_index" in req)
    assert ATTACKS["lira-online-hybrid"].requires >= {"reference_exit"}
    assert not set(ALL) & set(attacks_for({"probs", "loss", "exit_index"}))  # no references observed: not offered
    assert set(ALL + HYBRID) <= set(attacks_for({"probs", "exit_index", "reference_score", "reference_in",
                                                 "reference_exit"}))
