"""TimeGuard delays: deterministic per input and key, half-normal, keyed with a real HKDF; padding."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy import stats

from mexit.defense import ConstantTimePadding, DelayPolicy, ExactHasher, PerceptualHasher, TimeGuard, generate_key
from mexit.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))  # a fixed test key, so that the statistical tests are reproducible


def _rows(n: int, seed: int = 0, d: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d)).astype(np.float32)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32)).astype(np.float32)


def test_same_input_and_key_same_delay_across_objects() -> None:
    x = _rows(50)
    a = TimeGuard(0.01, KEY, ExactHasher())
    b = TimeGuard(0.01, bytearray(KEY), ExactHasher())
    da = a.delays_s(x)
    assert np.array_equal(da, b.delays_s(x))
    assert np.array_equal(da, a.delays_s(x))  # repeats
    assert np.array_equal(da, [a.delay_s(row) for row in x])
    assert np.array_equal(a.delays_s(x[::-1]), da[::-1])  # a sample's delay ignores its batch-mates
    assert len(np.unique(da)) == len(da)  # distinct inputs, distinct delays


def test_known_answer() -> None:
    """Pins the derivation (hash encoding, HKDF info layout, u mapping): changing any of them re-draws
    every delay of a deployment, which an attacker who sees both versions could average over."""
    guard = TimeGuard(1.0, KEY, ExactHasher())
    assert guard.delay_s(np.arange(5, dtype=np.float32)) == pytest.approx(0.4447128322416375, rel=1e-12)
    img = (np.arange(3 * 32 * 32).reshape(3, 32, 32) % 97 / 96).astype(np.float32)
    assert PerceptualHasher().digest(img).hex() == "ef37912cda24da24"
    guard_img = TimeGuard(1.0, KEY, PerceptualHasher())
    assert guard_img.delay_s(img) == pytest.approx(0.4198955213635121, rel=1e-12)


@pytest.mark.parametrize("salt", [None, b"per-deployment-salt"])
def test_seed_is_rfc5869_hkdf_sha256(salt: bytes | None) -> None:
    hasher = ExactHasher()
    guard = TimeGuard(1.0, KEY, hasher, salt=salt)
    x = _rows(3)
    for row in x:
        info = b"mexit-timeguard-v1\x00sha512\x00" + hasher.digest(row)
        okm = HKDF(algorithm=hashes.SHA256(), length=8, salt=salt, info=info).derive(KEY)
        u = ((int.from_bytes(okm, "big") >> 11) + 0.5) / 2.0**53
        assert guard.uniform(row) == u
        assert 0.0 < u < 1.0
    if salt is not None:  # the salt is part of the derivation
        assert not np.any(guard.delays_s(x) == TimeGuard(1.0, KEY, hasher).delays_s(x))


def test_same_delay_in_a_fresh_process() -> None:
    script = (
        "import json, numpy as np\n"
        "from mexit.defense import TimeGuard, ExactHasher, PerceptualHasher\n"
        "key = bytes(range(32))\n"
        "rows = np.random.default_rng(0).random((20, 12)).astype(np.float32)\n"
        "imgs = np.random.default_rng(0).random((5, 3, 32, 32)).astype(np.float32)\n"
        "print(json.dumps([TimeGuard(0.01, key, ExactHasher()).delays_s(rows).tolist(),\n"
        "                  TimeGuard(0.01, key, PerceptualHasher()).delays_s(imgs).tolist()]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    tab, img = json.loads(out.stdout)
    assert tab == TimeGuard(0.01, KEY, ExactHasher()).delays_s(_rows(20)).tolist()
    assert img == TimeGuard(0.01, KEY, PerceptualHasher()).delays_s(_images(5)).tolist()


def test_different_key_or_context_different_delays() -> None:
    x = _rows(200)
    base = TimeGuard(0.01, KEY, ExactHasher()).delays_s(x)
    for other in (TimeGuard(0.01, generate_key(), ExactHasher()),
                  TimeGuard(0.01, KEY, ExactHasher(), context=b"mexit-timeguard-v2")):
        d = other.delays_s(x)
        assert not np.any(d == base)
        assert abs(stats.spearmanr(base, d).statistic) < 0.25  # unrelated, not just shifted


def test_tabular_delays_are_half_normal() -> None:
    sigma = 0.005
    guard = TimeGuard(sigma, KEY, ExactHasher())
    d = guard.delays_s(_rows(2000, seed=7))
    assert np.all(d >= 0)
    assert stats.kstest(d, "halfnorm", args=(0, sigma)).pvalue > 0.01
    assert d.mean() == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.05)
    assert guard.expected_delay_s == pytest.approx(sigma * math.sqrt(2 / math.pi))
    # Fails for the wrong shape: the same delays are not a plain normal or an exponential of that mean.
    assert stats.kstest(d, "expon", args=(0, d.mean())).pvalue < 0.01


def test_image_delays_are_half_normal() -> None:
    sigma = 0.002
    d = TimeGuard(sigma, KEY, PerceptualHasher()).delays_s(_images(400, seed=3))
    assert stats.kstest(d, "halfnorm", args=(0, sigma)).pvalue > 0.01


def test_cap_and_zero_sigma() -> None:
    x = _rows(300)
    capped = TimeGuard(0.01, KEY, ExactHasher(), cap_s=0.005).delays_s(x)
    free = TimeGuard(0.01, KEY, ExactHasher()).delays_s(x)
    assert capped.max() == 0.005 and np.any(free > 0.005)
    assert np.array_equal(capped, np.minimum(free, 0.005))
    assert np.all(TimeGuard(0.0, KEY, ExactHasher()).delays_s(x) == 0.0)
    for bad in (dict(sigma_s=-1.0), dict(sigma_s=float("nan")), dict(sigma_s=0.01, cap_s=-1.0)):
        with pytest.raises(ConfigError):
            TimeGuard(key=KEY, hasher=ExactHasher(), **bad)


def test_release_time_is_clean_time_plus_delay() -> None:
    guard = TimeGuard(0.01, KEY, ExactHasher())
    clean = np.array([0.002, 0.004, 0.006])
    x = _rows(4)
    exits = np.array([0, 2, 1, 2])
    target = guard.target_latency_s(x, exits, clean)
    assert np.allclose(target, clean[exits] + guard.delays_s(x))
    assert guard.release_time_s(x[1], 2, clean) == pytest.approx(target[1])
    assert isinstance(guard, DelayPolicy)
    with pytest.raises(InputError, match=r"\[0, 2\]"):
        guard.target_latency_s(x, np.array([0, 1, 3, 0]), clean)
    with pytest.raises(InputError, match="4 integers"):
        guard.target_latency_s(x, np.array([0, 1]), clean)
    with pytest.raises(ConfigError, match="clean_times_s"):
        guard.target_latency_s(x, exits, np.array([0.1, np.nan, 0.2]))


def test_constant_time_padding_releases_everything_at_the_final_exit() -> None:
    pad = ConstantTimePadding()
    assert isinstance(pad, DelayPolicy)
    clean = np.array([0.002, 0.004, 0.006])
    target = pad.target_latency_s(_rows(5), np.array([0, 1, 2, 0, 1]), clean)
    assert np.array_equal(target, np.full(5, 0.006))
    assert np.array_equal(ConstantTimePadding(0.001).target_latency_s(_rows(2), np.array([0, 0]), clean),
                          [0.007, 0.007])
    with pytest.raises(ConfigError):
        ConstantTimePadding(-0.1)
