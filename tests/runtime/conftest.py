"""Bundles exported once per test session (legacy exporter: fast) for the runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export import tiny


@pytest.fixture(scope="session")
def conv_model():
    return tiny.tiny_conv()


@pytest.fixture(scope="session")
def mlp_model():
    return tiny.tiny_mlp()


@pytest.fixture(scope="session")
def conv_bundle(tmp_path_factory: pytest.TempPathFactory, conv_model) -> Path:
    """Image bundle with torch.export programs (for the torch backend and the no-torch test)."""
    from mexit.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "conv"
    return export_bundle(conv_model, out, sample_inputs=tiny.conv_inputs(16, seed=5), threshold=0.8,
                         dataset_name="toy-images", dataset_kind="image", exporter="legacy",
                         save_torch_programs=True)


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory, mlp_model) -> Path:
    from mexit.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "mlp"
    return export_bundle(mlp_model, out, sample_inputs=tiny.mlp_inputs(16, seed=6), threshold=0.5,
                         policy="entropy", dataset_name="toy-rows", dataset_kind="tabular", exporter="legacy",
                         save_torch_programs=False)

