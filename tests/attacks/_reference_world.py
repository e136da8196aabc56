"""Reference models for the tiny two-exit world of ``_mia_world``, so the generic attack suite covers LiRA/RMIA.

Four tiny models train on complementary random halves of all the world's samples (each sample IN for two
of them), are queried like the target (exit 0 when its top probability >= TAU) and give the three
reference arrays of :class:`~mexit.attacks.signals.Signals`. ``_mia_world._build_world`` attaches them to
the shadow's and the target's signals with :func:`reference_arrays` (the dataset indices of each role's
samples decide which references trained on them).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from mexit.attacks.reference import half_splits, logit_confidence

N_REFERENCES = 4


@cache
def tiny_references(n_models: int = N_REFERENCES, seed: int = 100) -> tuple[tuple[object, np.ndarray], ...]:
    """(model, training indices) of ``n_models`` tiny two-exit models on random halves of the world's data."""
    from ._mia_world import make_data, train_model

    x, y = make_data(0)
    halves = half_splits(np.arange(len(x)), n_models, seed)
    return tuple((train_model(x[h], y[h], seed + r), h) for r, h in enumerate(halves))


def reference_arrays(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The three (n, R) reference arrays of the samples ``x``, whose dataset indices are ``idx``."""
    from ._mia_world import TAU

    scores, exits, inside = [], [], []
    for model, train in tiny_references():
        (p0, _), (p1, _) = model.exits(x)  # type: ignore[attr-defined]
        exit_index = np.where(p0.max(axis=1) >= TAU, 0, 1).astype(np.int64)
        probs = np.where(exit_index[:, None] == 0, p0, p1)
        scores.append(logit_confidence(probs, y))
        exits.append(exit_index)
        inside.append(np.isin(idx, train))
    return {"reference_score": np.stack(scores, axis=1), "reference_in": np.stack(inside, axis=1),
            "reference_exit": np.stack(exits, axis=1)}
