"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (no download, no files).

It lets every stage, the tests and a first-time user run end to end without fetching anything. It is
served as a tabular dataset (64 features scaled to [0, 1]) so the FCN backbones apply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mexit.data.dataset import Dataset


def load_digits(root: Path | None = None) -> Dataset:
    """1,797 samples, 64 float32 features in [0, 1] (pixel / 16), 10 classes; ``root`` is ignored."""
    from sklearn.datasets import load_digits as sk_load_digits  # lazy: keeps `import mexit.data` light

    bunch = sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return Dataset(name="digits", x=x, y=bunch.target.astype(np.int64), num_classes=10, kind="tabular",
                   input_shape=(x.shape[1],), normalization=None, class_names=[str(i) for i in range(10)])
