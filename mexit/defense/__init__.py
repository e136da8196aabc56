"""TimeGuard: a deterministic, keyed, per-input response delay that hides which exit a sample took.

No torch here: this package runs on edge boxes beside the runtime. See :mod:`mexit.defense.timeguard`
for the policy, :mod:`mexit.defense.guarded` for applying it while serving and
:mod:`mexit.defense.offline` for evaluating it on recorded latencies.
"""

from mexit.defense.guarded import GuardedRuntime, calibrate_clean_times
from mexit.defense.hashing import ExactHasher, InputHasher, PerceptualHasher, hasher_for
from mexit.defense.keys import MIN_KEY_BYTES, SecretKey, generate_key, load_key, write_key_file
from mexit.defense.offline import added_latency_summary, apply_offline, estimate_clean_times
from mexit.defense.timeguard import ConstantTimePadding, DelayPolicy, TimeGuard

__all__ = [
    "MIN_KEY_BYTES",
    "ConstantTimePadding",
    "DelayPolicy",
    "ExactHasher",
    "GuardedRuntime",
    "InputHasher",
    "PerceptualHasher",
    "SecretKey",
    "TimeGuard",
    "added_latency_summary",
    "apply_offline",
    "calibrate_clean_times",
    "estimate_clean_times",
    "generate_key",
    "hasher_for",
    "load_key",
    "write_key_file",
]
