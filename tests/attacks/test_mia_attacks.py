"""Membership attacks on signals of a deliberately overfitted two-exit model (see ``_mia_world``).

Each attack must beat chance on real membership signal, sit at chance when membership is independent
of everything observed, read the observed exit (``exit_index``) and never ``true_exit``, refuse missing
or mismatched signals with a clear message, be seeded, and never learn anything from the target.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mexit.attacks.mia import ATTACKS, MembershipAttack, NotFittedError, attack_names, get_attack
from mexit.attacks.signals import Signals, SignalsError

from ._mia_world import FAST, fitted, null_target, world

ALL = attack_names()
HYBRID = attack_names(hybrid=True)
LEARNED = ["score", "score-hybrid", "gradient", "gradient-hybrid"]


@pytest.mark.parametrize("name", ALL)
def test_attack_beats_chance_on_an_overfitted_model(name: str) -> None:
    target = world().target
    attack = fitted(name)
    auc = roc_auc_score(target.member, attack.score(target))
    assert auc > 0.65, f"{name}: AUC {auc:.3f}"
    predicted = attack.predict(target)
    balanced_acc = 0.5 * (predicted[target.member].mean() + (~predicted[~target.member]).mean())
    assert balanced_acc > 0.6, f"{name}: balanced accuracy {balanced_acc:.3f} with the shadow-chosen threshold"


@pytest.mark.parametrize("name", ALL)
def test_attack_sits_at_chance_without_membership_signal(name: str) -> None:
    target = null_target()
    auc = roc_auc_score(target.member, fitted(name, null=True).score(target))
    assert abs(auc - 0.5) < 0.08, f"{name}: AUC {auc:.3f} on signals with no membership information"


@pytest.mark.parametrize("name", HYBRID)
def test_hybrid_attacks_read_the_observed_exit_and_never_true_exit(name: str) -> None:
    target = world().target
    attack = fitted(name)
    scores = attack.score(target)
    rng = np.random.default_rng(0)
    scrambled_truth = replace(target, true_exit=rng.integers(0, target.num_exits, len(target)))
    np.testing.assert_array_equal(attack.score(scrambled_truth), scores)
    np.testing.assert_array_equal(attack.score(replace(target, true_exit=None)), scores)
    stolen = target.with_exits(1 - target.exit_index, source="stolen")  # what a (bad) stealer observed
    assert not np.allclose(attack.score(stolen), scores), "changing the observed exit must change the scores"
    # fitting is blind to the shadow's true exits too (a short fit on part of the shadow data is enough)
    shadow = world().shadow.subset(np.arange(0, len(world().shadow), 2))
    kw = {"max_epochs": 2, "patience": 2} if name in FAST else {}
    plain = get_attack(name, **kw).fit(shadow).score(target)
    blind = get_attack(name, **kw).fit(replace(shadow, true_exit=rng.integers(0, 2, len(shadow)))).score(target)
    np.testing.assert_array_equal(blind, plain)


@pytest.mark.parametrize("name", sorted(set(ALL) - set(HYBRID)))
def test_non_hybrid_attacks_ignore_exits(name: str) -> None:
    target = world().target
    attack = fitted(name)
    np.testing.assert_array_equal(attack.score(target.with_exits(1 - target.exit_index, "stolen")),
                                  attack.score(target))
    np.testing.assert_array_equal(attack.score(replace(target, exit_index=None, true_exit=None)),
                                  attack.score(target))


class _Spy(MembershipAttack):
    """Records what the implementation is handed (not registered)."""

    name = "spy"
    requires = frozenset({"probs", "exit_index"})
    hybrid = True
    seen: list[Signals]

    def _fit(self, shadow: Signals) -> None:
        self.seen = [shadow]
        self.threshold_ = 0.5

    def _score(self, target: Signals) -> np.ndarray:
        self.seen.append(target)
        return np.zeros(len(target))


def test_implementations_only_see_declared_fields_and_never_target_membership() -> None:
    spy = _Spy().fit(world().shadow)
    spy.score(world().target)
    shadow_view, target_view = spy.seen
    for view in (shadow_view, target_view):
        assert view.true_exit is None
        assert view.exit_index is not None and view.probs is not None
        assert view.loss is None and view.embedding is None and view.gradient is None
        assert view.label_only_score is None and view.latency_ns is None
    assert shadow_view.member.any() and not target_view.member.any()


@pytest.mark.parametrize("name", ALL)
def test_fit_is_the_only_method_that_sees_membership(name: str) -> None:
    cls = ATTACKS[name]
    assert list(inspect.signature(cls.fit).parameters) == ["self", "shadow"]
    assert list(inspect.signature(cls.score).parameters) == ["self", "target"]
    assert list(inspect.signature(cls.predict).parameters) == ["self", "target"]
    attack = fitted(name)
    threshold = attack.threshold_
    target = world().target
    scores = attack.score(target)
    flipped = attack.score(replace(target, member=~target.member))
    np.testing.assert_array_equal(scores, flipped)
    assert attack.threshold_ == threshold
    np.testing.assert_array_equal(attack.predict(target), scores >= threshold)


def test_scoring_before_fitting_is_a_clear_error() -> None:
    with pytest.raises(NotFittedError, match=r"call fit\(shadow_signals\)"):
        get_attack("loss").score(world().target)


@pytest.mark.parametrize("name", sorted(set(ALL) - set(LEARNED)))
def test_rules_are_deterministic(name: str) -> None:
    target = world().target
    np.testing.assert_array_equal(get_attack(name).fit(world().shadow).score(target), fitted(name).score(target))


@pytest.mark.parametrize("name", LEARNED)
def test_learned_attacks_are_seeded(name: str) -> None:
    shadow = world().shadow.subset(np.arange(0, len(world().shadow), 3))
    target = world().target.subset(np.arange(50))
    kw = {"max_epochs": 3, "patience": 3}
    a = get_attack(name, seed=5, **kw).fit(shadow).score(target)
    b = get_attack(name, seed=5, **kw).fit(shadow).score(target)
    c = get_attack(name, seed=6, **kw).fit(shadow).score(target)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------------------------ refusals
def test_score_attack_on_a_label_only_target_says_what_is_missing() -> None:
    labels_only = replace(world().target, probs=None, loss=None)
    with pytest.raises(SignalsError, match="score attack needs probabilities, but the target exposes labels only"):
        fitted("score").score(labels_only)
    with pytest.raises(SignalsError, match=r"loss attack needs per-sample losses.*target exposes labels only"):
        fitted("loss").score(labels_only)
    with pytest.raises(SignalsError, match="shadow exposes labels only"):
        get_attack("confidence").fit(replace(world().shadow, probs=None, loss=None))


@pytest.mark.parametrize("name", HYBRID)
def test_hybrid_attack_without_observed_exit_points_to_stealing(name: str) -> None:
    with pytest.raises(SignalsError, match=f"{name} attack needs the exit index.*steal it from latency"):
        fitted(name).score(replace(world().target, exit_index=None, true_exit=None))


@pytest.mark.parametrize(("name", "field", "words"), [
    ("gradient", "embedding", "white-box embeddings"),
    ("gradient", "gradient", "white-box last-layer gradients"),
    ("label-only", "label_only_score", "collect_label_only_scores"),
])
def test_missing_fields_are_named(name: str, field: str, words: str) -> None:
    with pytest.raises(SignalsError, match=words):
        get_attack(name).fit(replace(world().shadow, **{field: None}))


def test_mismatched_shadow_and_target_are_refused() -> None:
    target = world().target
    with pytest.raises(SignalsError, match="number of exits"):
        fitted("loss").score(replace(target, num_exits=3))
    five = replace(target, num_classes=5, probs=np.pad(target.probs, ((0, 0), (0, 1))),
                   gradient=np.zeros((len(target), 5 * 16), np.float32), meta={})
    with pytest.raises(SignalsError, match="number of classes"):
        fitted("confidence").score(five)
    with pytest.raises(SignalsError, match="white-box features differ"):
        fitted("gradient").score(replace(target, embedding=target.embedding[:, :8],
                                         gradient=target.gradient[:, :32], meta={"gradient_shape": [4, 8]}))
    with pytest.raises(SignalsError, match="both members and non-members"):
        get_attack("loss").fit(world().shadow.subset(world().shadow.member))
