"""The attack registry: names, declared adversary information, construction errors."""

from __future__ import annotations

import pytest

from mexit.attacks.mia import ATTACKS, MembershipAttack, attack_names, attacks_for, get_attack, register
from mexit.errors import ConfigError

EXPECTED = {
    "score": {"probs"},
    "score-hybrid": {"probs", "exit_index"},
    "loss": {"loss"},
    "loss-hybrid": {"loss", "exit_index"},
    "confidence": {"probs"},
    "confidence-hybrid": {"probs", "exit_index"},
    "exit-only": {"exit_index"},
    "label-only": {"pred_label", "label_only_score"},
    "label-only-hybrid": {"pred_label", "label_only_score", "exit_index"},
    "gradient": {"probs", "loss", "embedding", "gradient"},
    "gradient-hybrid": {"probs", "loss", "embedding", "gradient", "exit_index"},
    **{name: {"probs", "reference_score", "reference_in"}
       for name in ("lira-offline", "lira-online", "rmia-offline", "rmia-online")},
    **{name: {"probs", "reference_score", "reference_in", "exit_index", "reference_exit"}
       for name in ("lira-offline-hybrid", "lira-online-hybrid", "rmia-offline-hybrid", "rmia-online-hybrid")},
}


def test_every_attack_is_registered_with_its_adversary_information() -> None:
    assert attack_names() == sorted(EXPECTED)
    for name, requires in EXPECTED.items():
        cls = ATTACKS[name]
        assert set(cls.requires) == requires, name
        assert cls.hybrid == ("exit_index" in requires), name
        assert cls.info()["name"] == name and cls.description


def test_hybrid_filter_and_what_an_adversary_can_run() -> None:
    assert set(attack_names(hybrid=True)) == {n for n, r in EXPECTED.items() if "exit_index" in r}
    assert attacks_for({"probs", "loss"}) == ["confidence", "loss", "score"]
    assert attacks_for({"label_only_score"}) == ["label-only"]
    assert "exit-only" in attacks_for({"exit_index"})


def test_get_attack_builds_fresh_instances_and_refuses_unknown_names_and_options() -> None:
    a, b = get_attack("loss"), get_attack("loss")
    assert isinstance(a, MembershipAttack) and a is not b
    assert get_attack("score", seed=3, max_epochs=5).max_epochs == 5
    with pytest.raises(ConfigError, match=r"unknown membership attack 'nope'.*score-hybrid"):
        get_attack("nope")
    with pytest.raises(ConfigError, match="bad options for attack 'loss'"):
        get_attack("loss", max_epochs=3)


def test_register_refuses_duplicates_unknown_fields_and_inconsistent_hybrid_flags() -> None:
    class Dup(ATTACKS["loss"]):  # type: ignore[misc, valid-type]
        name = "loss"

    with pytest.raises(TypeError, match="already taken"):
        register(Dup)

    class BadField(ATTACKS["loss"]):  # type: ignore[misc, valid-type]
        name = "bad-field-test"
        requires = frozenset({"logits"})

    with pytest.raises(TypeError, match="unknown Signals fields"):
        register(BadField)

    class NotHybrid(ATTACKS["loss"]):  # type: ignore[misc, valid-type]
        name = "not-hybrid-test"
        requires = frozenset({"loss", "exit_index"})
        hybrid = False

    with pytest.raises(TypeError, match="hybrid"):
        register(NotHybrid)
    assert "bad-field-test" not in ATTACKS and "not-hybrid-test" not in ATTACKS
