"""The server and clients must run on a box without PyTorch: import and use them with torch blocked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys, warnings

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"import of {name} blocked by the test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    warnings.simplefilter("ignore")
    import numpy as np
    import mexit.serve
    from mexit.serve import LocalClient, OIPClient, ServerProcess, ToyRuntime, create_app, serve
    from mexit.serve import factory, server, __main__  # noqa: F401
    import mexit.cli.serve  # noqa: F401
    from starlette.testclient import TestClient

    client = TestClient(create_app(ToyRuntime(), model_name="toy"))
    x = np.zeros((2, 16), dtype=np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
    status = client.post("/v2/models/toy/infer", json=body).status_code
    print(json.dumps({
        "status": status,
        "local": LocalClient(ToyRuntime()).infer(x).outputs["label"].tolist(),
        "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules),
    }))
    """
)


def test_serve_imports_and_answers_without_torch() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 200 and len(result["local"]) == 2
    assert result["torch_loaded"] is False
