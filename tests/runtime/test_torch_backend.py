"""The PyTorch backend (torch.export programs from the bundle) agrees with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from mexit.errors import BackendUnavailableError, BundleError, ConfigError
from mexit.runtime import EarlyExitRuntime, get_backend
from tests.export import tiny

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def batch():
    return tiny.conv_inputs(40, seed=31)


def test_torch_backend_matches_onnxruntime(conv_bundle, batch):
    ort_rt = EarlyExitRuntime(conv_bundle)
    tau = tiny.mid_threshold(ort_rt.predict(batch, force_exit=0).probs.max(axis=1), 0.4)
    ort_rt = EarlyExitRuntime(conv_bundle, threshold=tau)
    torch_rt = EarlyExitRuntime(conv_bundle, backend="torch", threshold=tau, threads=1)
    a, b = ort_rt.predict(batch), torch_rt.predict(batch)
    assert len(np.unique(a.exit_index)) >= 2
    np.testing.assert_array_equal(a.exit_index, b.exit_index)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    for k in range(3):
        np.testing.assert_allclose(ort_rt.predict(batch, force_exit=k).probs,
                                   torch_rt.predict(batch, force_exit=k).probs, atol=1e-5)
    np.testing.assert_allclose(ort_rt.predict(batch, full_depth=True).probs,
                               torch_rt.predict(batch, full_depth=True).probs, atol=1e-5)
    one = torch_rt.predict(batch[:1])
    assert one.exit_index[0] == a.exit_index[0]


def test_torch_backend_needs_programs(mlp_bundle):
    with pytest.raises(BundleError, match=r"no torch\.export programs"):
        get_backend("torch", mlp_bundle)


def test_torch_backend_options(conv_bundle):
    with pytest.raises(ConfigError, match="cuda_graphs"):
        get_backend("torch", conv_bundle, cuda_graphs=True)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            get_backend("torch", conv_bundle, device="cuda")
