"""Int8 weights for the internal exit heads (ONNX Runtime's ``MatMulNBits``): an opt-in speed option.

Why the heads: at batch 1 an internal head's first ``Linear`` is a matrix-vector product, so its cost is
reading its weights, not its FLOPs. The backbone's forward pass evicts them from the core's cache between
requests, and they come back from memory on every call. On the CIFAR-10 ResNet-56 ×6 bundle the five internal
heads are 1.1 % of the full path's FLOPs, yet heads and decisions add ~300 µs at the last exit
(``benchmarks/runtime_breakdown.py``; the 1024 → 512 head alone is 84 µs of its stage's 355 µs), which is why the
realised early-exit speed-up trailed the FLOPs prediction (issue 14). The vanilla model has no internal heads;
making them cheap is what lets the early exit realise its FLOPs saving (batch-1 realised / predicted +0.06 on
ResNet-56 ×6, +0.22 on FCN-18-1 ×6, ``benchmarks/runtime_latency.py``).

What changes: every ``Gemm``/``MatMul`` of an *internal* stage that does not lie on the path to the stage's
feature output (the head, not the backbone) and whose constant weight holds at least
:data:`MIN_WEIGHT_ELEMENTS` values is rewritten as ``MatMulNBits`` with 8-bit symmetric weights, one float
scale per block of 32 input values, and ``accuracy_level=4`` (activations quantised per block to int8, the
product in int8 with AVX-512 VNNI/AMX where the CPU has it; ONNX Runtime's fp32-compute path for these weights
dequantises them every call and was 2-4× *slower* than fp32). Activations are quantised per row, so a sample's
exit does not depend on its batch mates; ``DynamicQuantizeMatMul`` (one activation scale per batch) would break
that. Batches gain nothing: the int8 kernel at 20-64 rows is no faster than float32's. Small layers (the
512 → C classifier) stay float32: they are cheap to read and their rounding would buy nothing (measured: no
faster, more exits moved). The backbone and the final stage (which the vanilla model has too) are untouched, so
the comparison with the full-depth graph stays fair.

Cost in fidelity: the heads' probabilities move by ~1e-3 to 1e-2, so a sample whose top probability lies that
close to the threshold can take another exit. ``benchmarks/runtime_latency.py`` measures the exit and label
agreement with the float32 runtime on the bundle's test split; an auditor should audit the deployment as it
runs (this option on or off), since the exits are what the timing channel shows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mexit.errors import ConfigError
from mexit.runtime.onnx_parts import node_attributes

#: Weights smaller than this (elements) stay float32 (64 Ki values = 256 KiB as float32).
MIN_WEIGHT_ELEMENTS = 1 << 16
#: Block length of the per-block weight scales, and the weight width.
BLOCK_SIZE, BITS = 32, 8
#: ``MatMulNBits`` accuracy level 4: int8 activations and int8 products (see the module docstring).
ACCURACY_LEVEL = 4


def _backbone_outputs(graph: Any, feature_output: str) -> set[str]:
    """Output names of every node the feature output depends on (the stage's backbone)."""
    producer = {out: node for node in graph.node for out in node.output}
    seen: set[str] = set()
    todo = [feature_output]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.output[0] in seen:
            continue
        seen.update(node.output)
        todo.extend(node.input)
    return seen


def head_matmuls(model: Any, feature_output: str | None) -> list[Any]:
    """The head's ``Gemm``/``MatMul`` nodes worth int8 weights (see the module docstring); none for the last stage."""
    if feature_output is None:
        return []
    graph = model.graph
    backbone = _backbone_outputs(graph, feature_output)
    weights = {init.name: init for init in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type not in ("Gemm", "MatMul") or node.output[0] in backbone or len(node.input) < 2:
            continue
        w = weights.get(node.input[1])
        if w is None or len(w.dims) != 2 or int(np.prod(w.dims)) < MIN_WEIGHT_ELEMENTS:
            continue
        attrs = node_attributes(node)
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
            continue
        found.append(node)
    return found


def _gemm_as_matmul(model: Any, node: Any) -> str:
    """Replace ``Gemm(x, W, b)`` by ``MatMul(x, W') + b`` in place (W' the [K, N] weight); returns the MatMul's name."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    attrs = node_attributes(node)
    w = numpy_helper.to_array(weights[node.input[1]])
    if attrs.get("transB", 0):
        w = w.T
    w_name = f"{node.input[1]}_mexit_kn"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), w_name))
    out = node.output[0]
    name = f"{node.name or out}_mexit_matmul"
    replacement = [helper.make_node("MatMul", [node.input[0], w_name], [out if len(node.input) < 3 else f"{out}_mm"],
                                    name=name)]
    if len(node.input) >= 3 and node.input[2]:
        bias = node.input[2]
        beta = float(attrs.get("beta", 1.0))
        if beta != 1.0:
            b = numpy_helper.to_array(weights[bias]) * np.float32(beta)
            bias = f"{bias}_mexit_beta"
            graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), bias))
        replacement.append(helper.make_node("Add", [f"{out}_mm", bias], [out], name=f"{name}_bias"))
    at = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(replacement):
        graph.node.insert(at + offset, new)
    return name


def quantize_internal_head(model: Any, feature_output: str | None) -> tuple[Any, int]:
    """``(model, n)``: the stage graph with its head's large layers as int8 ``MatMulNBits`` (``n`` of them).

    ``model`` (an ``onnx.ModelProto``) is changed in place when there is nothing to do and replaced otherwise;
    the last stage (``feature_output`` None) is returned unchanged. Raises :class:`ConfigError` when the
    installed ONNX Runtime cannot quantise to 8 bits.
    """
    nodes = head_matmuls(model, feature_output)
    if not nodes:
        return model, 0
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
    except ImportError as exc:
        raise ConfigError(f"int8 heads need onnxruntime's quantization tools (onnxruntime >= 1.20): {exc}") from exc
    for n in model.graph.node:  # the quantiser picks nodes by name: name the unnamed ones
        if n.op_type == "MatMul" and not n.name:
            n.name = f"{n.output[0]}_mexit_matmul"
    names = [_gemm_as_matmul(model, n) if n.op_type == "Gemm" else n.name for n in nodes]
    # it also takes every MatMul it is not told to leave alone (its op-type default): exclude the backbone's
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, bits=BITS,
                                          accuracy_level=ACCURACY_LEVEL)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs every node it skips at INFO
    try:
        quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_include=names, nodes_to_exclude=others)
        quantizer.process()
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"the installed onnxruntime cannot quantise the heads to {BITS} bits ({exc}); "
                          "upgrade onnxruntime or leave int8_heads off") from exc
    finally:
        quiet.setLevel(level)
    out = quantizer.model.model
    done = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    if done != len(names):
        raise ConfigError(f"only {done} of {len(names)} head layers were quantised; leave int8_heads off")
    return out, done
