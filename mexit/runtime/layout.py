"""A graph rewrite that keeps ONNX Runtime's blocked (NCHWc) layout through a residual stage.

ONNX Runtime's CPU NCHWc transformer moves a convolutional graph to its blocked layout node by node, and an
``Add`` joins the blocked path only when all of its inputs are blocked. A stage graph of a residual network
that starts inside a residual group feeds its *graph input* (plain NCHW) straight into the first block's
``Add`` as the skip connection; that ``Add`` then stays in NCHW, its output is the next block's skip, and so
every ``Add`` and ``Relu`` of the stage runs in NCHW with a reorder before and after each block. The
whole-model graph never shows this (its skips come from blocked nodes), so the chain of stages was slower
than the model it was cut from by more than its heads.

:func:`route_skips_through_conv` passes such a graph input through an identity 1×1 ``Conv`` (weights the
identity matrix, no bias: every output is ``1·x`` plus exact zeros, so the values are unchanged), which the
transformer does convert; the skip ``Add`` then fuses into the preceding convolution as in the whole model.
Measured on the CIFAR-10 ResNet-56 ×6 bundle (ONNX Runtime 1.32, one thread, ORT profiler, stage 1 of 6):
29.1 → 24.1 ms at batch 64 and 486 → 413 µs at batch 1; six ``Add``, five ``Relu``, six ``ReorderInput`` and
seven ``ReorderOutput`` nodes became one ``ReorderInput`` and three ``ReorderOutput``
(``benchmarks/runtime_latency.py`` records the effect on the whole chain).

:func:`hand_over_blocked` goes one step further, across the stages: each stage graph is optimised by ONNX Runtime
itself on the machine that will run it (:func:`ort_optimised`), and where one stage ends in a ``ReorderOutput`` and
the next begins with a ``ReorderInput`` both are removed, so the features cross the boundary — a stage session's
output, or a value entering an ``If`` branch of the single early-exit graph — in the blocked layout (ResNet-56 ×6:
the ``If``-chained backbone +120 → +4–35 µs over the full-depth graph at its last exit).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mexit.runtime.onnx_parts import node_attributes

#: Suffix of the identity convolution's output (and, with ``_w``, its weight) for graph input ``name``.
SKIP_CONV_SUFFIX = "_mexit_skipconv"


def route_skips_through_conv(model: Any) -> int:
    """Reroute every ``Add`` that reads a 4-D float graph input through an identity 1×1 ``Conv`` of that
    input (in place on the ``onnx.ModelProto``); returns how many ``Add`` inputs were rerouted.

    Only inputs with a known channel count are touched, and only ``Add`` consumers (the residual skip); the
    other consumers keep reading the input itself.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    rerouted = 0
    for inp in graph.input:
        tensor = inp.type.tensor_type
        dims = tensor.shape.dim
        if tensor.elem_type != TensorProto.FLOAT or len(dims) != 4 or dims[1].dim_value <= 0:
            continue
        adds = [n for n in graph.node if n.op_type == "Add" and inp.name in n.input]
        if not adds:
            continue
        channels = dims[1].dim_value
        out, weight = inp.name + SKIP_CONV_SUFFIX, inp.name + SKIP_CONV_SUFFIX + "_w"
        graph.initializer.append(
            numpy_helper.from_array(np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1), weight))
        for node in adds:
            for i, name in enumerate(node.input):
                if name == inp.name:
                    node.input[i] = out
                    rerouted += 1
        graph.node.insert(0, helper.make_node("Conv", [inp.name, weight], [out], kernel_shape=[1, 1],
                                              name=out))
    return rerouted


#: ONNX Runtime's domain for its blocked-layout (NCHWc) kernels, and the largest block it uses (AVX-512: 16
#: floats; AVX2: 8). A boundary is handed over blocked only when its channels fill whole blocks of either size,
#: so the blocked tensor carries no padding channels and keeps the plain tensor's shape.
NCHWC_DOMAIN = "com.microsoft.nchwc"
NCHWC_MAX_BLOCK = 16


def ort_optimised(model: Any) -> Any:
    """``model`` as ONNX Runtime's CPU provider optimises it on this machine (every level, the NCHWc layout
    included), read back as an ``onnx.ModelProto``.

    The result holds ONNX Runtime's own kernels (``com.microsoft.nchwc`` convolutions with weights already
    reordered for this CPU's vector width), so it is only valid for this ONNX Runtime on this machine: it is built
    in memory at load time and never written into a bundle.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # ORT warns that such a file is hardware-specific: that is the point here
    with tempfile.TemporaryDirectory(prefix="mexit-nchwc-") as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def _rename(graph: Any, old: str, new: str) -> None:
    """Every reference to value ``old`` in ``graph``'s nodes (inputs and outputs) now names ``new``."""
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new


def _blocked_output(graph: Any, name: str) -> Any | None:
    """The ``ReorderOutput`` that turns a blocked tensor into graph output ``name``, if that is how ``name`` is
    made, its channels fill whole blocks and nothing inside the graph reads ``name`` itself; else None."""
    node = next((n for n in graph.node if name in n.output), None)
    if node is None or node.domain != NCHWC_DOMAIN or node.op_type != "ReorderOutput":
        return None
    attrs = node_attributes(node)
    channels = attrs.get("channels", 0)
    if attrs.get("channels_last", 0) or channels <= 0 or channels % NCHWC_MAX_BLOCK:
        return None
    if any(name in n.input for n in graph.node):
        return None
    return node


def _blocked_inputs(graph: Any, name: str) -> list[Any] | None:
    """The ``ReorderInput`` nodes that read graph input ``name``, if they are all that read it; else None."""
    readers = [n for n in graph.node if name in n.input]
    if not readers or any(n.domain != NCHWC_DOMAIN or n.op_type != "ReorderInput"
                          or node_attributes(n).get("channels_last", 0) for n in readers):
        return None
    return readers


def _drop_identity_skip(graph: Any, name: str) -> None:
    """Bypass the identity 1×1 convolution :func:`route_skips_through_conv` put on input ``name``: once the input
    arrives blocked it has nothing left to do (its output is its input)."""
    for node in list(graph.node):
        if (node.domain == NCHWC_DOMAIN and node.op_type == "Conv" and node.name.startswith(name + SKIP_CONV_SUFFIX)
                and node.input[0] == name and len(node.input) == 2 and "activation" not in node_attributes(node)):
            graph.node.remove(node)
            _rename(graph, node.output[0], name)


def hand_over_blocked(graphs: list[Any], features: list[str | None], inputs: list[str]) -> tuple[list[Any], int]:
    """The stage graphs, optimised by ONNX Runtime on this machine (:func:`ort_optimised`), with each boundary
    between two blocked-layout stages handed over *in the blocked layout*: stage ``k`` returns its blocked
    features without the ``ReorderOutput`` back to NCHW, and stage ``k + 1`` reads them without its
    ``ReorderInput``. Returns the graphs and how many boundaries were rewritten; when none qualifies the graphs are
    returned as given (a fully connected model, a convolution whose channels do not fill whole blocks).

    Why: ONNX Runtime chooses layouts graph by graph, so every stage boundary — and in the single early-exit
    graph every ``If`` branch, whose values arrive from the enclosing scope in plain NCHW — costs two full
    feature-map reorders. ResNet-56 ×6 loses 45–75 µs to them on its last exit's path at batch 1
    (``benchmarks/runtime_breakdown.py``, ``nesting_split``). A boundary qualifies only when stage ``k``'s feature
    output comes from one ``ReorderOutput`` of whole blocks and every reader of stage ``k + 1``'s input is a
    ``ReorderInput``; both ends then agree on the layout, and the values are bit-identical (a reorder only moves
    floats). The blocked tensor keeps the plain tensor's shape, and its batch axis stays outermost, so row
    compaction between stages (``take``, ``Compress``) is unchanged. ``features[k]``/``inputs[k]``: stage ``k``'s
    feature output (None for the last) and input names.
    """
    try:
        optimised = [ort_optimised(g) for g in graphs]
    except Exception as exc:  # an optimisation only: the graphs as given still run
        logging.getLogger(__name__).info("stage boundaries stay in NCHW: ONNX Runtime could not save its optimised "
                                         "stage graphs (%s)", exc)
        return graphs, 0
    rewritten = 0
    for k in range(len(optimised) - 1):
        src, dst, feature = optimised[k].graph, optimised[k + 1].graph, features[k]
        out = _blocked_output(src, feature) if feature is not None else None
        readers = _blocked_inputs(dst, inputs[k + 1]) if out is not None else None
        if out is None or readers is None:
            continue
        src.node.remove(out)
        _rename(src, out.input[0], feature)
        for node in readers:
            dst.node.remove(node)
            _rename(dst, node.output[0], inputs[k + 1])
        _drop_identity_skip(dst, inputs[k + 1])
        rewritten += 1
    if not rewritten:
        return graphs, 0
    for model in optimised:  # shapes ORT inferred for values that were renamed away
        del model.graph.value_info[:]
    return optimised, rewritten
