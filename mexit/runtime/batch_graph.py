"""The per-sample early exit of a whole batch as ONE ONNX graph (ONNX Runtime CPU, ``batch_graph=True``).

Why: a batch through the per-stage chain costs one ``session.run`` per stage plus numpy work between stages
(the decision, bookkeeping of the rows that leave, compaction of the rest), ~50 µs per stage on the 2-core VM.
On a tabular model whose stage is ~500 µs at 20–60 rows that is 7 % of a batch-64 call. Here the decision and the
compaction happen inside the graph: after stage ``k`` the rows whose top probability reaches ``τ_k`` are taken
out with ``Compress`` (their probabilities, original row numbers and exit index are the level's outputs), the
other rows' features and row numbers are compressed the same way and, if any row is left, an ``If`` runs stage
``k + 1`` on them, nested down to the last stage. The outputs of every level are concatenated, so one ``run``
returns ``mexit_probs`` (n, C), ``mexit_rows`` (n,) and ``mexit_exit`` (n,) in exit order; the runtime puts them
back in input order. Decisions are per row, exactly as in the chain (same softmax, same comparison).

What it gives up: the time of each decision. ``latency_ns`` of every sample of a batch is then the end of the
call. Measured (``benchmarks/runtime_latency.py``): Location FCN-18-1 ×6 batch 64 ~7 % more samples/s than the
per-stage chain; ResNet-56 ×6 unchanged (its stages are compute-bound). Hence opt-in.
"""

from __future__ import annotations

from typing import Any

from mexit.runtime.onnx_parts import default_opset, max_prob_nodes, merged_opsets, tau_initializers

#: Outputs of the batch graph: probabilities, original row numbers, exit index, all in exit order.
BATCH_PROBS, BATCH_ROWS, BATCH_EXIT = "mexit_probs", "mexit_rows", "mexit_exit"
#: One float32 scalar input per internal exit (as the single batch-1 graph takes).
BATCH_TAU = "mexit_tau{}"


def early_exit_batch_graph(bundle: Any, graphs: list[Any], tau_default: float | None = None) -> bytes:
    """The batch graph for ``bundle`` from its stage graphs (``onnx.ModelProto``, already rewritten as the backend
    loads them); the graphs are not modified. Input: the stage-0 input with a free batch axis and one
    ``mexit_tau{k}`` per internal exit (defaulting to ``tau_default`` when given, as in the single graph)."""
    from onnx import TensorProto, compose, helper

    m = bundle.manifest
    k_exits, classes = m.model.num_exits, m.model.num_classes
    stages = [compose.add_prefix(g, f"s{e.index}_") for g, e in zip(graphs, m.exits, strict=True)]
    for k in range(1, k_exits):  # stage k reads the rows of stage k-1 that stayed: "h{k}"
        src = f"s{k}_{m.exits[k].input_name}"
        for node in stages[k].graph.node:
            node.input[:] = [f"h{k}" if name == src else name for name in node.input]

    def info(name: str, dtype: int = TensorProto.FLOAT) -> Any:
        return helper.make_tensor_value_info(name, dtype, None)

    def scalar(name: str, value: int) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(f"{name}_v", TensorProto.INT64, [],
                                                                                   [value]))

    def exit_column(k: int, rows: str, out: str) -> list[Any]:
        """``out`` = k repeated once per element of ``rows``."""
        return [helper.make_node("Shape", [rows], [f"{out}_n"]), scalar(f"{out}_k", k),
                helper.make_node("Expand", [f"{out}_k", f"{out}_n"], [out])]

    def outputs(p: str, r: str, x: str) -> list[Any]:
        return [info(p), info(r, TensorProto.INT64), info(x, TensorProto.INT64)]

    last, g = m.exits[-1], stages[-1].graph
    k = k_exits - 1
    inner = helper.make_graph(
        [*g.node, helper.make_node("Softmax", [f"s{k}_{last.logits_output}"], [f"P{k}"], axis=1),
         helper.make_node("Identity", [f"rows{k}"], [f"R{k}"]), *exit_column(k, f"rows{k}", f"X{k}")],
        f"stage{k}", [], outputs(f"P{k}", f"R{k}", f"X{k}"), initializer=list(g.initializer))
    opset = default_opset(stages[0])
    for k in range(k_exits - 2, -1, -1):
        e, g = m.exits[k], stages[k].graph
        p, conf, leave, stay = f"p{k}", f"conf{k}", f"leave{k}", f"stay{k}"
        decide, axes = max_prob_nodes(f"s{k}_{e.logits_output}", p, conf, f"axes{k}", opset)
        nodes = [*g.node, *decide]
        inits = [*g.initializer, *axes]
        nodes += [
            helper.make_node("GreaterOrEqual", [conf, BATCH_TAU.format(k)], [leave]),
            helper.make_node("Not", [leave], [stay]),
            helper.make_node("Compress", [p, leave], [f"Pk{k}"], axis=0),
            helper.make_node("Compress", [f"rows{k}", leave], [f"Rk{k}"], axis=0),
            *exit_column(k, f"Rk{k}", f"Xk{k}"),
            helper.make_node("Compress", [f"s{k}_{e.feature_output}", stay], [f"h{k + 1}"], axis=0),
            helper.make_node("Compress", [f"rows{k}", stay], [f"rows{k + 1}"], axis=0),
            helper.make_node("Size", [f"rows{k + 1}"], [f"left{k}"]), scalar(f"none{k}", 0),
            helper.make_node("Greater", [f"left{k}", f"none{k}"], [f"more{k}"]),
        ]
        nothing = helper.make_graph(
            [helper.make_node("Constant", [], [f"eP{k}"], value=helper.make_tensor(f"eP{k}_v", TensorProto.FLOAT,
                                                                                   [0, classes], [])),
             helper.make_node("Constant", [], [f"eR{k}"], value=helper.make_tensor(f"eR{k}_v", TensorProto.INT64,
                                                                                   [0], [])),
             helper.make_node("Constant", [], [f"eX{k}"], value=helper.make_tensor(f"eX{k}_v", TensorProto.INT64,
                                                                                   [0], []))],
            f"nothing{k}", [], outputs(f"eP{k}", f"eR{k}", f"eX{k}"))
        nodes.append(helper.make_node("If", [f"more{k}"], [f"Pr{k}", f"Rr{k}", f"Xr{k}"], then_branch=inner,
                                      else_branch=nothing))
        p_out, r_out, x_out = (BATCH_PROBS, BATCH_ROWS, BATCH_EXIT) if k == 0 else (f"P{k}", f"R{k}", f"X{k}")
        nodes += [helper.make_node("Concat", [f"Pk{k}", f"Pr{k}"], [p_out], axis=0),
                  helper.make_node("Concat", [f"Rk{k}", f"Rr{k}"], [r_out], axis=0),
                  helper.make_node("Concat", [f"Xk{k}", f"Xr{k}"], [x_out], axis=0)]
        if k > 0:
            inner = helper.make_graph(nodes, f"stage{k}", [], outputs(p_out, r_out, x_out), initializer=inits)
            continue
        x0 = f"s0_{e.input_name}"
        start = [helper.make_node("Shape", [x0], ["mexit_xshape"], end=1),  # (n,): the batch size
                 helper.make_node("Squeeze", ["mexit_xshape"], ["mexit_n"]), scalar("mexit_zero", 0),
                 scalar("mexit_one", 1), helper.make_node("Range", ["mexit_zero", "mexit_n", "mexit_one"], ["rows0"])]
        inputs = [helper.make_tensor_value_info(x0, TensorProto.FLOAT, ["n", *m.input.sample_shape])]
        inputs += [helper.make_tensor_value_info(BATCH_TAU.format(j), TensorProto.FLOAT, [])
                   for j in range(k_exits - 1)]
        inits += tau_initializers(BATCH_TAU, k_exits - 1, tau_default)
        model = helper.make_model(helper.make_graph(start + nodes, "early_exit_batch", inputs,
                                                    outputs(p_out, r_out, x_out), initializer=inits),
                                  opset_imports=merged_opsets(stages))
        model.ir_version = stages[0].ir_version
        return model.SerializeToString()
    raise ValueError("a batch graph needs at least two exits")
