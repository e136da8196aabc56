"""Pieces the runtime's graph rewrites share (needs the ``onnx`` package; imported only where a rewrite runs).

The exit decision folded into stage graphs, the single batch-1 early-exit graph
(:func:`mexit.runtime.backends.early_exit_graph`) and the batch graph (:mod:`mexit.runtime.batch_graph`) all
compute the same max-probability decision and merge graphs that may import different opsets.
"""

from __future__ import annotations

from typing import Any


def default_opset(model: Any) -> int:
    """The model's version of the default ONNX domain (13 when it imports none)."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)


def node_attributes(node: Any) -> dict[str, Any]:
    """A node's attributes as ``{name: value}`` (``onnx.helper.get_attribute_value`` of each)."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def max_prob_nodes(logits: str, probs: str, conf: str, axes: str, opset: int) -> tuple[list[Any], list[Any]]:
    """``(nodes, initializers)`` computing ``probs = Softmax(logits)`` and ``conf`` = its row maximum (shape (n,)).

    ``axes`` names the constant ReduceMax takes as an input from opset 18 on (unused before).
    """
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Softmax", [logits], [probs], axis=1)]
    if opset >= 18:
        return ([*nodes, helper.make_node("ReduceMax", [probs, axes], [conf], keepdims=0)],
                [helper.make_tensor(axes, TensorProto.INT64, [1], [1])])
    return [*nodes, helper.make_node("ReduceMax", [probs], [conf], axes=[1], keepdims=0)], []


def merged_opsets(models: list[Any]) -> list[Any]:
    """Every domain any of ``models`` imports, at its highest version (a quantised head adds com.microsoft)."""
    from onnx import helper

    domains: dict[str, int] = {}
    for model in models:
        for o in model.opset_import:
            domains[o.domain] = max(domains.get(o.domain, 0), o.version)
    return [helper.make_opsetid(d, v) for d, v in domains.items()]


def tau_initializers(name: str, count: int, default: float | None) -> list[Any]:
    """Initializers giving the threshold inputs ``name.format(k)``, k < ``count``, the value ``default`` (none when
    ``default`` is None). A graph input with an initializer of the same name takes it when the caller does not feed
    the input and is overridden when it does (ONNX IR ≥ 4), so a request at the default threshold feeds its input
    alone, and forcing an exit (±inf) still works."""
    if default is None:
        return []
    from onnx import TensorProto, helper

    return [helper.make_tensor(name.format(k), TensorProto.FLOAT, [], [default]) for k in range(count)]
