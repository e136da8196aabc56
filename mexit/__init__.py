"""mexit: audit and defend the membership privacy of multi-exit networks as they are deployed.

The package is a pipeline, one sub-package per stage (see DESIGN.md):
``data -> train -> export -> runtime -> serve <- attacks``, with ``defense`` wrapping the runtime and
``audit`` orchestrating everything. Importing :mod:`mexit` itself is cheap and never imports PyTorch.
"""

__version__ = "0.1.0"
