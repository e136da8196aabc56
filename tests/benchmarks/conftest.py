"""The runtime tests' tiny bundles, for the benchmark scripts' functions that run on a bundle."""

from tests.runtime.conftest import conv_bundle, conv_model  # noqa: F401  (fixtures, found by name)
