"""Fold an exit head's gated mixed pool into one pooling branch, a depthwise scale and the head's first layer.

The SDN-style image head (:func:`mexit.train.heads.image_exit_head`) pools its features as
``α·MaxPool(h) + (1 − α)·AvgPool(h)`` with ``α = sigmoid(gate)`` a learnt scalar, then ``Flatten`` and
``Gemm(W, b)``. Exported, that is eight nodes (``Sigmoid``, ``Sub``, two pools, two ``Mul``, ``Add``, ``Flatten``),
and ONNX Runtime's blocked (NCHWc) layout cannot take the two scalar ``Mul`` nodes, so each pool's output is
reordered back to NCHW first. On a batch-1 request every node costs its dispatch (1–2 µs), which is what the
internal heads spend beside their weights (issue 14).

Since ``α`` is a constant, ``α·m + (1 − α)·a = c·(m + β·a)`` with ``c = α``, ``β = (1 − α)/α`` (or the two branches
swapped when ``α < 1/2``, so that ``β ≤ 1``), and the factor ``c`` moves into the next layer's weight
(``W·(c·z) = (c·W)·z``). :func:`fold_mixed_pools` writes ``β·a`` as a depthwise 1×1 ``Conv`` and the sum as an
``Add``, which ONNX Runtime fuses into that convolution in the blocked layout: two pools, one convolution, one
reorder, ``Flatten``. The values change only by float32 rounding (the products are associated differently).

Measured on ResNet-56 ×6 at batch 1 with int8 heads (``benchmarks/session_variants.py --variants
default,control,no_fold_pools``, several runtimes per version, since a rewrite cannot be switched on one session):
21 µs [11, 31] a request saved, pooled over five runs on a busy host; the same exit for every test sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mexit.runtime.onnx_parts import node_attributes

#: Gates whose ``α`` lies closer than this to 0 or 1 are left as they are (one branch all but unused).
MIN_BRANCH_WEIGHT = 1e-3


def _scalar(graph: Any, name: str) -> float | None:
    """The value of a one-element initializer or ``Constant`` output, else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            value = numpy_helper.to_array(init)
            return float(value.ravel()[0]) if value.size == 1 else None
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = node_attributes(node).get("value")
            if value is not None:
                array = numpy_helper.to_array(value)
                return float(array.ravel()[0]) if array.size == 1 else None
    return None


def _match(graph: Any, add: Any, features: str, producer: dict[str, Any],
           consumers: dict[str, list[Any]]) -> dict[str, Any] | None:
    """The mixed pool of ``features`` ending in ``add`` and the ``Flatten → Gemm`` after it, or None when ``add`` is
    not one."""
    muls = [producer.get(name) for name in add.input]
    if len(muls) != 2 or any(m is None or m.op_type != "Mul" for m in muls):
        return None
    branches: dict[str, tuple[Any, Any]] = {}
    for mul in muls:
        parts = [producer.get(name) for name in mul.input]
        pool = next((p for p in parts if p is not None and p.op_type in ("MaxPool", "AveragePool")), None)
        gate = next((p for p in parts if p is not pool), None)
        if pool is None or gate is None or pool.op_type in branches:
            return None
        branches[pool.op_type] = (pool, gate)
    if set(branches) != {"MaxPool", "AveragePool"}:
        return None
    (max_pool, sigmoid), (avg_pool, sub) = branches["MaxPool"], branches["AveragePool"]
    if (sigmoid.op_type != "Sigmoid" or sub.op_type != "Sub" or not max_pool.input[0] == avg_pool.input[0] == features
            or list(sub.input) != [sub.input[0], sigmoid.output[0]] or _scalar(graph, sub.input[0]) != 1.0):
        return None
    gate = _scalar(graph, sigmoid.input[0])
    after = consumers.get(add.output[0], [])
    if gate is None or len(after) != 1 or after[0].op_type != "Flatten":
        return None
    gemms = consumers.get(after[0].output[0], [])
    if len(gemms) != 1 or gemms[0].op_type != "Gemm" or node_attributes(gemms[0]).get("transA", 0):
        return None
    if any(consumers.get(mul.output[0], []) != [add] for mul in muls):  # the products are read by the sum alone
        return None
    return {"max": max_pool, "avg": avg_pool, "sigmoid": sigmoid, "sub": sub, "muls": muls, "flatten": after[0],
            "gemm": gemms[0], "alpha": float(1.0 / (1.0 + np.exp(-np.float64(gate))))}


def fold_mixed_pools(model: Any, features: str, channels: int) -> int:
    """Rewrite every gated mixed pool that ``model`` (an ``onnx.ModelProto``, in place) applies to its value
    ``features`` of ``channels`` channels (a stage's feature output), as the module docstring says; returns how many
    were folded. Pools of any other value are left alone, since their channel count is not known here."""
    from onnx import helper, numpy_helper

    graph = model.graph
    folded, stale = 0, True
    for add in [n for n in graph.node if n.op_type == "Add"]:
        if stale:  # the maps of the graph as it stands (built again after each fold, which changes it)
            stale = False
            producer = {out: node for node in graph.node for out in node.output}
            consumers: dict[str, list[Any]] = {}
            for node in graph.node:
                for name in node.input:
                    consumers.setdefault(name, []).append(node)
        found = _match(graph, add, features, producer, consumers)
        if found is None:
            continue
        alpha = found["alpha"]
        if not MIN_BRANCH_WEIGHT < alpha < 1 - MIN_BRANCH_WEIGHT:
            continue
        if alpha >= 0.5:  # c·(kept + β·scaled), β ≤ 1
            kept, scaled, c, beta = found["max"], found["avg"], alpha, (1 - alpha) / alpha
        else:
            kept, scaled, c, beta = found["avg"], found["max"], 1 - alpha, alpha / (1 - alpha)
        gemm = found["gemm"]
        weight = next((init for init in graph.initializer if init.name == gemm.input[1]), None)
        if weight is None:
            continue
        pooled = add.output[0]
        w = numpy_helper.to_array(weight).astype(np.float64) * c
        w_name, dw_name = f"{gemm.input[1]}_mexit_poolfold", f"{pooled}_mexit_poolfold_dw"
        graph.initializer.extend([
            numpy_helper.from_array(w.astype(np.float32), w_name),
            numpy_helper.from_array(np.full((channels, 1, 1, 1), beta, dtype=np.float32), dw_name),
        ])
        gemm.input[1] = w_name
        scaled_out = f"{pooled}_mexit_poolfold_scaled"
        conv = helper.make_node("Conv", [scaled.output[0], dw_name], [scaled_out], group=channels,
                                kernel_shape=[1, 1], name=f"{pooled}_mexit_poolfold_conv")
        total = helper.make_node("Add", [kept.output[0], scaled_out], [pooled], name=f"{pooled}_mexit_poolfold_add")
        for node in (*found["muls"], add):
            graph.node.remove(node)
        at = list(graph.node).index(found["flatten"])
        graph.node.insert(at, total)
        graph.node.insert(at, conv)
        _drop_unread(graph, [found["sigmoid"], found["sub"], producer.get(found["sub"].input[0])])
        folded, stale = folded + 1, True
    return folded


def _drop_unread(graph: Any, candidates: list[Any]) -> None:
    """Remove those of the gate's nodes (``Sub``, then ``Sigmoid`` and the ``Constant`` 1) whose outputs nothing
    reads any more; the rest of the graph is left as it was."""
    for node in sorted((n for n in candidates if n is not None), key=lambda n: n.op_type != "Sub"):
        read = {name for other in graph.node for name in other.input} | {o.name for o in graph.output}
        if node in graph.node and not any(out in read for out in node.output):
            graph.node.remove(node)
