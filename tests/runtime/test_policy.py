"""The runtime's decision shortcut (decide from exp-sums, divide only leaving rows) equals softmax-then-rule exactly."""

from __future__ import annotations

import numpy as np
import pytest

from mexit.runtime.policy import ExitPolicy, shifted_exp, softmax


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_shifted_exp_matches_softmax_bit_for_bit(classes):
    rng = np.random.default_rng(classes)
    z = (rng.normal(size=(500, classes)) * rng.choice([0.1, 3.0, 40.0], size=(500, 1))).astype(np.float32)
    z[0] = 0.0  # all tied
    z[1, :2] = 7.0  # tied maximum
    e, s = shifted_exp(z)
    p = softmax(z)
    np.testing.assert_array_equal(e / s, p)
    conf = p.max(axis=1)
    for kind, taus in (("max_prob", [0.0, 0.5, 0.9, 1.0, *conf[:50].tolist()]),
                       ("entropy", [0.0, 0.2, 0.7, 1.0])):
        for tau in taus:  # thresholds exactly at observed confidences: the boundary case
            pol = ExitPolicy(kind, float(tau))
            np.testing.assert_array_equal(pol.exits_shifted(e, s), pol.exits(p))
    assert shifted_exp(z.astype(np.float64))[0].dtype == np.float32
