"""TimeGuard (Li et al. CCS'22, Algorithm 1): release each response at ``t_exit + |N(0, σ²)|``.

The delay must be *deterministic per input* (same input → same delay, across repeats, threads and
restarts), otherwise an attacker queries an input many times and takes the minimum, recovering
``t_exit``. It must also be *unpredictable without the key*, otherwise an attacker computes the delay
and subtracts it. Both come from HKDF-SHA256 with the deployment's secret key as input keying
material and ``context ‖ hasher name ‖ hash(x)`` as info: 8 output bytes become ``u ∈ (0, 1)`` and
the half-normal inverse CDF ``σ·√2·erfinv(u)`` turns ``u`` into a delay. No global RNG is touched, so
this is thread-safe, and the key gives 2^53 distinct delays per σ rather than the reference's 256.

:class:`ConstantTimePadding` is the naive baseline the paper starts from: every response waits until
the final exit's calibrated time, which hides the exit perfectly and gives up early exit's latency
benefit entirely.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any, Protocol, runtime_checkable

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from scipy.special import erf, erfinv

from mexit.defense.hashing import InputHasher
from mexit.defense.keys import SecretKey, as_secret_key
from mexit.errors import ConfigError, InputError

DEFAULT_CONTEXT = b"mexit-timeguard-v1"
_OKM_BYTES = 8
_MANTISSA_BITS = 53  # a float64 holds 53 bits exactly; u = (k + 1/2) / 2^53 is strictly inside (0, 1)


@runtime_checkable
class DelayPolicy(Protocol):
    """Decides, per sample, the latency (seconds since the request arrived) at which to release it."""

    def target_latency_s(self, x_batch: np.ndarray, exit_index: np.ndarray, clean_times_s: np.ndarray) -> np.ndarray:
        """Target release latency per sample, given the exit each took and the per-exit clean times."""
        ...


def check_clean_times(clean_times_s: np.ndarray | list[float] | tuple[float, ...]) -> np.ndarray:
    """Per-exit clean times as a finite, non-negative float64 vector, or a ConfigError."""
    times = np.asarray(clean_times_s, dtype=np.float64)
    if times.ndim != 1 or times.size == 0 or not np.all(np.isfinite(times)) or np.any(times < 0):
        raise ConfigError(f"clean_times_s must be a non-empty 1-D vector of finite times >= 0 (one per exit), "
                          f"got {times.tolist() if times.size <= 16 else times.shape}")
    return times


def _check_exits(exit_index: np.ndarray | int, n: int, num_exits: int) -> np.ndarray:
    exits = np.asarray(exit_index)
    if exits.ndim == 0:
        exits = np.full(n, int(exits))
    if exits.shape != (n,) or exits.dtype.kind not in "iu":
        raise InputError(f"exit_index must be {n} integers (one per sample), got shape {exits.shape} "
                         f"dtype {exits.dtype}")
    if n and (exits.min() < 0 or exits.max() >= num_exits):
        raise InputError(f"exit_index must lie in [0, {num_exits - 1}] for {num_exits} clean times, "
                         f"got range [{exits.min()}, {exits.max()}]")
    return exits.astype(np.int64, copy=False)


def _hkdf_extract(salt: bytes | None, key: bytes) -> bytes:
    """RFC 5869 HKDF-Extract (the PRK), so each request only pays for HKDF-Expand."""
    extract = getattr(HKDF, "extract", None)  # cryptography >= 44
    if extract is not None:
        return bytes(extract(hashes.SHA256(), salt, key))
    return hmac.new(salt or bytes(hashlib.sha256().digest_size), key, hashlib.sha256).digest()


class TimeGuard:
    """Deterministic, keyed, half-normal per-input delay; a :class:`DelayPolicy`.

    ``sigma_s`` is the half-normal scale in seconds (mean delay ``σ·√(2/π)``); ``key`` >= 32 secret
    bytes (see :mod:`mexit.defense.keys`); ``hasher`` maps one sample to its identity
    (:func:`mexit.defense.hashing.hasher_for`); ``cap_s`` optionally caps the *delay*; ``context``
    versions the derivation (change it to re-draw every delay without a new key); ``salt`` is the
    optional HKDF salt (a per-deployment random value; the key alone is already uniformly random).
    ``HKDF(SHA-256, length=8, salt, info=context‖0‖hasher.name‖0‖hash(x)).derive(key)`` is the seed.
    """

    def __init__(self, sigma_s: float, key: bytes, hasher: InputHasher, *, cap_s: float | None = None,
                 context: bytes = DEFAULT_CONTEXT, salt: bytes | None = None) -> None:
        sigma = float(sigma_s)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ConfigError(f"TimeGuard sigma_s must be a finite number of seconds >= 0, got {sigma_s!r}")
        if cap_s is not None and not (math.isfinite(float(cap_s)) and float(cap_s) >= 0):
            raise ConfigError(f"TimeGuard cap_s must be None or a finite number of seconds >= 0, got {cap_s!r}")
        if not isinstance(context, bytes):
            raise ConfigError(f"TimeGuard context must be bytes, got {type(context).__name__}")
        if not isinstance(hasher, InputHasher):
            raise ConfigError(f"TimeGuard hasher must have .name and .digest(x); got {type(hasher).__name__}")
        self.sigma_s = sigma
        self.cap_s = None if cap_s is None else float(cap_s)
        self.context = context
        self.hasher = hasher
        self._key: SecretKey = as_secret_key(key)
        self._salt = salt
        self._prk = SecretKey(_hkdf_extract(salt, bytes(self._key)))  # as secret as the key itself
        self._algorithm = hashes.SHA256()
        self._info_prefix = context + b"\x00" + hasher.name.encode() + b"\x00"

    @property
    def expected_delay_s(self) -> float:
        """Mean of the uncapped half-normal delay, ``σ·√(2/π)``."""
        return self.sigma_s * math.sqrt(2.0 / math.pi)

    def uniform(self, x_row: np.ndarray) -> float:
        """The keyed, deterministic ``u ∈ (0, 1)`` of one sample (exposed for tests and audits)."""
        info = self._info_prefix + self.hasher.digest(x_row)
        okm = HKDFExpand(self._algorithm, _OKM_BYTES, info).derive(self._prk)
        k = int.from_bytes(okm, "big") >> (8 * _OKM_BYTES - _MANTISSA_BITS)
        return (k + 0.5) / float(1 << _MANTISSA_BITS)

    def _delay_from_u(self, u: np.ndarray | float) -> np.ndarray:
        delay = self.sigma_s * math.sqrt(2.0) * erfinv(np.asarray(u, dtype=np.float64))
        return delay if self.cap_s is None else np.minimum(delay, self.cap_s)

    def delay_s(self, x_row: np.ndarray) -> float:
        """The delay of one sample (no batch axis), in seconds."""
        delay = self.sigma_s * math.sqrt(2.0) * float(erfinv(self.uniform(x_row)))  # scalar path: no array
        return delay if self.cap_s is None else min(delay, self.cap_s)

    def delays_s(self, x_batch: np.ndarray) -> np.ndarray:
        """Per-sample delays (n,) float64 for a batch ``(n, ...)``."""
        batch = np.asarray(x_batch)
        if batch.ndim < 1:
            raise InputError(f"expected a batch (n, ...) of inputs, got a scalar of shape {batch.shape}")
        return np.asarray(self._delay_from_u([self.uniform(row) for row in batch]), dtype=np.float64).reshape(-1)

    def release_time_s(self, x_row: np.ndarray, exit_index: int, clean_times_s: np.ndarray) -> float:
        """Algorithm 1: ``t' = t_exit + delay(x)``, seconds since the request arrived."""
        times = check_clean_times(clean_times_s)
        exit_k = int(_check_exits(int(exit_index), 1, times.size)[0])
        return float(times[exit_k] + self.delay_s(x_row))

    def target_latency_s(self, x_batch: np.ndarray, exit_index: np.ndarray, clean_times_s: np.ndarray) -> np.ndarray:
        times = check_clean_times(clean_times_s)
        delays = self.delays_s(x_batch)
        return times[_check_exits(exit_index, delays.size, times.size)] + delays

    def release_cdf(self, exit_k: int, grid_s: np.ndarray, clean_times_s: np.ndarray) -> np.ndarray:
        """CDF over inputs of exit ``exit_k``'s release time on ``grid_s``: ``t_k`` + a (capped) half-normal.

        The keyed uniform is uniform over inputs, so this is the exact distribution the Bayes bound
        (:mod:`mexit.defense.bayes`) needs.
        """
        t_k = float(check_clean_times(clean_times_s)[int(exit_k)])
        d = np.asarray(grid_s, dtype=np.float64) - t_k
        if self.sigma_s == 0:
            cdf = (d >= 0).astype(np.float64)
        else:
            cdf = np.where(d >= 0, erf(np.maximum(d, 0.0) / (self.sigma_s * math.sqrt(2.0))), 0.0)
        if self.cap_s is not None:
            cdf = np.where(d >= self.cap_s, 1.0, cdf)
        return cdf

    def describe(self) -> dict[str, Any]:
        """Settings for reports and provenance (never the key or salt)."""
        return {"policy": "timeguard", "sigma_s": self.sigma_s, "cap_s": self.cap_s, "hasher": self.hasher.name,
                "context": self.context.decode("utf-8", "replace"), "expected_delay_s": self.expected_delay_s,
                "salted": self._salt is not None}

    def __repr__(self) -> str:
        return (f"TimeGuard(sigma_s={self.sigma_s!r}, hasher={self.hasher!r}, cap_s={self.cap_s!r}, "
                f"context={self.context!r}, key=<redacted>)")


class ConstantTimePadding:
    """The naive baseline: release every response at the final exit's clean time (plus ``margin_s``)."""

    def __init__(self, margin_s: float = 0.0) -> None:
        margin = float(margin_s)
        if not (math.isfinite(margin) and margin >= 0):
            raise ConfigError(f"ConstantTimePadding margin_s must be a finite number of seconds >= 0, got {margin_s!r}")
        self.margin_s = margin

    def target_latency_s(self, x_batch: np.ndarray, exit_index: np.ndarray, clean_times_s: np.ndarray) -> np.ndarray:
        times = check_clean_times(clean_times_s)
        n = int(np.asarray(x_batch).shape[0]) if np.ndim(x_batch) else 1
        _check_exits(exit_index, n, times.size)
        return np.full(n, times[-1] + self.margin_s, dtype=np.float64)

    def release_cdf(self, exit_k: int, grid_s: np.ndarray, clean_times_s: np.ndarray) -> np.ndarray:
        """CDF of the release time on ``grid_s``: a step at the final exit's clean time plus the margin."""
        release = float(check_clean_times(clean_times_s)[-1]) + self.margin_s
        return (np.asarray(grid_s, dtype=np.float64) >= release).astype(np.float64)

    def describe(self) -> dict[str, Any]:
        return {"policy": "constant_time_padding", "margin_s": self.margin_s}

    def __repr__(self) -> str:
        return f"ConstantTimePadding(margin_s={self.margin_s!r})"
