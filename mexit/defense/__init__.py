"""Timing defenses: delay policies that hide which exit a sample took, their registry and their judges.

No torch here: this package runs on edge boxes beside the runtime. :mod:`mexit.defense.registry` maps
names (``timeguard``, ``padding``, ``optimal``) to validated parameters and policy builders;
:mod:`mexit.defense.timeguard`, :mod:`~mexit.defense.padding` and :mod:`~mexit.defense.optimal` are
the policies, :mod:`mexit.defense.guarded` applies one while serving, :mod:`mexit.defense.offline`
evaluates one on recorded latencies and :mod:`mexit.defense.bayes` computes the best balanced
exit-stealing accuracy any stealer can reach against it.
"""

from mexit.defense.bayes import bayes_balanced_accuracy, schedule_bound
from mexit.defense.calibration import CleanTimes
from mexit.defense.guarded import GuardedRuntime, calibrate_clean_times, calibrate_samples
from mexit.defense.hashing import ExactHasher, InputHasher, PerceptualHasher, hasher_for
from mexit.defense.keys import MIN_KEY_BYTES, SecretKey, generate_key, load_key, write_key_file
from mexit.defense.offline import added_latency_summary, apply_offline, estimate_clean_times
from mexit.defense.optimal import OptimalSchedule
from mexit.defense.padding import QuantilePadding
from mexit.defense.registry import (
    DEFENSES,
    DefenseConfig,
    build_guarded,
    build_policy,
    defense_names,
    describe_defenses,
    parse_defense,
    parse_defense_list,
    parse_param_pairs,
)
from mexit.defense.timeguard import ConstantTimePadding, DelayPolicy, TimeGuard

__all__ = [
    "DEFENSES",
    "MIN_KEY_BYTES",
    "CleanTimes",
    "ConstantTimePadding",
    "DefenseConfig",
    "DelayPolicy",
    "ExactHasher",
    "GuardedRuntime",
    "InputHasher",
    "OptimalSchedule",
    "PerceptualHasher",
    "QuantilePadding",
    "SecretKey",
    "TimeGuard",
    "added_latency_summary",
    "apply_offline",
    "bayes_balanced_accuracy",
    "build_guarded",
    "build_policy",
    "calibrate_clean_times",
    "calibrate_samples",
    "defense_names",
    "describe_defenses",
    "estimate_clean_times",
    "generate_key",
    "hasher_for",
    "load_key",
    "parse_defense",
    "parse_defense_list",
    "parse_param_pairs",
    "schedule_bound",
    "write_key_file",
]
