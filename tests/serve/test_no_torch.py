"""The server and clients must run on a box without PyTorch: import and use them with torch blocked."""

from __future__ import annotations

import json

from tests._no_torch import run_without_torch

CHILD = """
    import numpy as np
    import mexit.serve
    from mexit.serve import LocalClient, OIPClient, ServerProcess, ToyRuntime, create_app, serve
    from mexit.serve import deploy, factory, server  # noqa: F401
    import mexit.cli  # noqa: F401 (ServerProcess runs `python -m mexit.cli serve`: every command module imports)
    from starlette.testclient import TestClient

    client = TestClient(create_app(ToyRuntime(), model_name="toy"))
    x = np.zeros((2, 16), dtype=np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
    status = client.post("/v2/models/toy/infer", json=body).status_code
    print(json.dumps({
        "status": status,
        "local": LocalClient(ToyRuntime()).infer(x).outputs["label"].tolist(),
    }))
"""


def test_serve_imports_and_answers_without_torch() -> None:
    done = run_without_torch(CHILD)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 200 and len(result["local"]) == 2
