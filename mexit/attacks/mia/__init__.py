"""Membership-inference attacks on recorded :class:`~mexit.attacks.signals.Signals`.

Every attack follows one scikit-learn-like interface (:class:`MembershipAttack`): ``fit(shadow)`` on the
adversary's shadow signals, then ``score(target)`` (higher = more likely a member) and ``predict(target)``.
Attacks are looked up by name in a registry (LeakPro-style)::

    from mexit.attacks.mia import get_attack
    attack = get_attack("score-hybrid", seed=0).fit(shadow_signals)
    scores = attack.score(target_signals)

=====================  =========================================================  ======
name                   adversary observes (``requires``)                          hybrid
=====================  =========================================================  ======
score                  probs                                                       no
score-hybrid           probs, exit_index                                           yes
loss                   loss (from probs)                                           no
loss-hybrid            loss, exit_index                                            yes
confidence             probs                                                       no
confidence-hybrid      probs, exit_index                                           yes
exit-only              exit_index                                                  yes
label-only             pred_label, label_only_score                                no
label-only-hybrid      pred_label, label_only_score, exit_index                    yes
gradient               probs, loss, embedding, gradient (white-box)                no
gradient-hybrid        probs, loss, embedding, gradient, exit_index                yes
=====================  =========================================================  ======

Every public module of this package is imported here, so its ``@register`` decorators run: a new attack
is one new module. Hybrid attacks use ``Signals.exit_index`` — the exit the adversary *observed* (exposed by the server,
or stolen from latency) — and never ``true_exit``.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from mexit.attacks.mia.base import MembershipAttack, NotFittedError, best_threshold
from mexit.attacks.mia.label_only import (
    FlipChoice,
    boundary_distances,
    choose_flip_probability,
    collect_label_only_scores,
    flip_robustness,
)
from mexit.attacks.mia.registry import ATTACKS, attack_names, attacks_for, get_attack, register, signals_needed

__all__ = [
    "ATTACKS",
    "FlipChoice",
    "MembershipAttack",
    "NotFittedError",
    "attack_names",
    "attacks_for",
    "best_threshold",
    "boundary_distances",
    "choose_flip_probability",
    "collect_label_only_scores",
    "flip_robustness",
    "get_attack",
    "register",
    "signals_needed",
]

# Every public module of this package registers its attacks on import: adding an attack is adding a module.
for _module in _pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in ("base", "registry"):
        _importlib.import_module(f"{__name__}.{_module.name}")
