"""``benchmarks/batch_graph_throughput.py``'s other ways of running a batch take the runtime's own exits.

A throughput figure for a path that exits rows elsewhere would compare different work, so the benchmark checks
this on the real bundles too (``same_exits_as_chain``); here it is checked where rows leave at every exit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.export import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from batch_graph_throughput import bucketed_stream, masked  # a sibling script, not a package module


@pytest.mark.parametrize("bucket", [7, 64])
def test_masked_and_bucketed_take_the_chains_exits(conv_bundle, bucket: int) -> None:
    from mexit.runtime import EarlyExitRuntime

    x = tiny.conv_inputs(64, seed=21)
    probe = EarlyExitRuntime(conv_bundle)
    rt = EarlyExitRuntime(conv_bundle, threshold=tiny.mid_threshold(probe.predict(x, force_exit=0).probs.max(axis=1),
                                                                      0.5))
    want = rt.predict(x).exit_index
    assert len(np.unique(want)) == rt.num_exits  # rows leave at every exit
    np.testing.assert_array_equal(bucketed_stream(rt, x, bucket), want)
    np.testing.assert_array_equal(np.concatenate([masked(rt, x[s : s + bucket]) for s in range(0, 64, bucket)]), want)


@pytest.mark.parametrize(("threshold", "exit_k"), [(0.0, 0), (1.01, 2)])
def test_every_row_at_once_or_none_early(conv_bundle, threshold: float, exit_k: int) -> None:
    from mexit.runtime import EarlyExitRuntime

    rt = EarlyExitRuntime(conv_bundle, threshold=threshold)
    x = tiny.conv_inputs(9, seed=3)
    assert (bucketed_stream(rt, x, 4) == exit_k).all() and (masked(rt, x) == exit_k).all()
