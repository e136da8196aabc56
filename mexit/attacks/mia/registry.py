"""Name → attack class registry (LeakPro's attack factory, keyed by the names configs and the CLI use)."""

from __future__ import annotations

from typing import Any, TypeVar

from mexit.attacks.mia.base import ALWAYS_PRESENT, OPTIONAL_FIELDS, MembershipAttack
from mexit.errors import ConfigError

ATTACKS: dict[str, type[MembershipAttack]] = {}

A = TypeVar("A", bound=type[MembershipAttack])


def register(cls: A) -> A:
    """Class decorator: add an attack under its ``name``; names are unique, ``requires`` must be real fields."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name` to be registered")
    if name in ATTACKS and ATTACKS[name] is not cls:
        raise TypeError(f"attack name {name!r} is already taken by {ATTACKS[name].__name__}")
    unknown = set(cls.requires) - OPTIONAL_FIELDS - ALWAYS_PRESENT
    if unknown:
        raise TypeError(f"{cls.__name__}.requires names unknown Signals fields: {sorted(unknown)}")
    if cls.hybrid != ("exit_index" in cls.requires):
        raise TypeError(f"{cls.__name__}: hybrid attacks (and only they) must require 'exit_index'")
    ATTACKS[name] = cls
    return cls


def attack_names(*, hybrid: bool | None = None) -> list[str]:
    """Registered attack names, sorted; ``hybrid`` filters on whether the attack uses the observed exit."""
    return sorted(n for n, c in ATTACKS.items() if hybrid is None or c.hybrid == hybrid)


def get_attack(name: str, **kwargs: Any) -> MembershipAttack:
    """A new, unfitted instance of the attack ``name`` (keyword arguments go to its constructor)."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ConfigError(f"unknown membership attack {name!r}; known: {', '.join(attack_names())}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for attack {name!r}: {exc}") from None


def attacks_for(available: set[str] | frozenset[str]) -> list[str]:
    """The attacks an adversary can run given the Signals fields it observes (e.g. ``{"probs", "loss"}``)."""
    have = set(available) | ALWAYS_PRESENT
    return sorted(n for n, c in ATTACKS.items() if c.requires <= have)


def signals_needed(names: list[str] | tuple[str, ...] | set[str] | frozenset[str]) -> frozenset[str]:
    """The Signals fields the attacks ``names`` read: what a collector must record for them, and no more."""
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        raise ConfigError(f"unknown membership attack(s) {', '.join(unknown)}; known: {', '.join(attack_names())}")
    return frozenset().union(*(ATTACKS[n].requires for n in names)) if names else frozenset()
