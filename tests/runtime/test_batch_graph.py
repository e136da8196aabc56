"""A batch's per-sample early exit as one graph (OrtCpuBackend(batch_graph=True), mexit.runtime.batch_graph)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mexit.errors import ConfigError
from mexit.runtime import EarlyExitRuntime
from tests.export import tiny


def test_batch_graph_takes_the_chains_exits_and_probabilities(conv_bundle) -> None:
    x = tiny.conv_inputs(64, seed=21)
    chain = EarlyExitRuntime(conv_bundle)
    tau = tiny.mid_threshold(chain.predict(x, force_exit=0).probs.max(axis=1), 0.5)
    chain = EarlyExitRuntime(conv_bundle, threshold=tau)
    one = EarlyExitRuntime(conv_bundle, threshold=tau, batch_graph=True)
    assert one.backend.options["batch_graph"] and one._many is not None and chain._many is None
    want, got = chain.predict(x), one.predict(x)
    assert len(np.unique(want.exit_index)) == 3  # rows leave at every exit, so every level compresses
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert len(set(got.latency_ns.tolist())) == 1 and got.latency_ns[0] > 0  # one graph: the call's end for all
    for k in range(3):
        forced = one.predict(x, force_exit=k)
        assert (forced.exit_index == k).all()
        np.testing.assert_allclose(forced.probs, chain.predict(x, force_exit=k).probs, atol=1e-6)
    tiny.assert_batch1_matches(one, x[:8], want)  # batch 1 keeps the single graph and its own timestamp


@pytest.mark.parametrize(("threshold", "exit_k"), [(0.0, 0), (1.01, 2)])
def test_batch_graph_when_every_row_leaves_at_once_or_none_leaves_early(conv_bundle, threshold, exit_k) -> None:
    """All rows out at exit 0 runs the empty branch; none out early runs every level down to the last."""
    x = tiny.conv_inputs(5, seed=3)
    got = EarlyExitRuntime(conv_bundle, threshold=threshold, batch_graph=True).predict(x)
    assert (got.exit_index == exit_k).all() and got.probs.shape == (5, tiny.NUM_CLASSES)
    np.testing.assert_allclose(got.probs, EarlyExitRuntime(conv_bundle, threshold=threshold).predict(x).probs,
                               atol=1e-6)


def test_batch_graph_needs_the_max_prob_policy_and_onnx(mlp_bundle, conv_bundle, monkeypatch) -> None:
    assert EarlyExitRuntime(mlp_bundle, batch_graph=True)._many is None  # entropy policy: the per-stage chain
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ConfigError, match="batch_graph needs the onnx package"):
        EarlyExitRuntime(conv_bundle, batch_graph=True)
