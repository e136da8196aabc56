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
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
