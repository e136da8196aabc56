"""The runtime must work on a box without PyTorch: import it, load a bundle and predict with torch blocked."""

from __future__ import annotations

import json

import numpy as np

from tests._no_torch import run_without_torch
from tests.export import tiny

CHILD = """
    import numpy as np
    import mexit.runtime as rt_mod
    from mexit.runtime import EarlyExitRuntime, load_bundle
    from mexit.errors import BackendUnavailableError

    bundle = load_bundle(sys.argv[1])
    x = np.load(sys.argv[2])
    rt = EarlyExitRuntime(bundle)
    pred = rt.predict(x)
    full = rt.predict(x, full_depth=True)
    try:
        EarlyExitRuntime(bundle, backend="torch")
        torch_backend = "loaded?!"
    except BackendUnavailableError as exc:
        torch_backend = str(exc)
    print(json.dumps({
        "exit_index": pred.exit_index.tolist(),
        "probs": pred.probs.tolist(),
        "full": full.probs.tolist(),
        "torch_backend": torch_backend,
    }))
"""


def test_runtime_runs_without_torch(conv_bundle, tmp_path):
    x = tiny.conv_inputs(12, seed=41)
    np.save(tmp_path / "x.npy", x)
    proc = run_without_torch(CHILD, str(conv_bundle), str(tmp_path / "x.npy"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "PyTorch" in out["torch_backend"]

    from mexit.runtime import EarlyExitRuntime

    want = EarlyExitRuntime(conv_bundle).predict(x)
    np.testing.assert_array_equal(np.array(out["exit_index"]), want.exit_index)
    np.testing.assert_allclose(np.array(out["probs"], dtype=np.float32), want.probs, atol=1e-6)
    assert np.array(out["full"]).shape == (12, tiny.NUM_CLASSES)
