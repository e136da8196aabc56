"""The backend contract, and the ONNX Runtime backends (CPU and GPU).

A backend runs the bundle's graphs; the runtime (:mod:`mexit.runtime.chained`) owns the exit logic.
The contract (:class:`Backend`) is deliberately small:

* ``run_stage(k, inputs) -> (features, logits)``: run stage ``k``. ``inputs`` is the validated float32
  input batch for ``k = 0`` and a features handle returned by stage ``k - 1`` (or by ``take``) after
  that. Features stay in whatever form is cheapest for the backend (numpy view of ONNX Runtime's own
  buffer, OrtValue on the GPU, device buffer, torch tensor); only the logits come back as numpy.
  The last stage returns ``features=None``.
* ``take(features, idx)``: the rows ``idx`` of a features handle, for the samples that did not exit.
  The runtime calls it only when some rows exit and some continue, so the batch-1 path never copies.
* ``full(x) -> logits``: the full-depth graph (vanilla baseline).

Backends are registered by name in :mod:`mexit.runtime.registry` (which also documents the options
every backend takes: ``threads``, ``device``, ``fp16``) and loaded with
:func:`mexit.runtime.registry.get_backend`. ``thread_safe`` says whether ``predict`` calls may overlap
(the runtime serialises them otherwise) and ``max_batch`` caps the batch one call may carry (the
runtime splits larger batches).

Packaging: exactly one ONNX Runtime build may be installed — ``onnxruntime`` (``pip install mexit[cpu]``)
or ``onnxruntime-gpu`` (``pip install mexit[gpu]``). Both share the ``onnxruntime`` module, so with both
installed whichever was installed last wins, usually the CPU one (ORT issues #7748, #26996);
:func:`ort_install_problem` detects that and says how to repair it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mexit.bundle import Bundle, load_bundle
from mexit.errors import BackendUnavailableError, BundleError, ConfigError, InputError
from mexit.runtime.inputs import nonfinite_message
from mexit.runtime.onnx_parts import default_opset, max_prob_nodes, merged_opsets, tau_initializers
from mexit.runtime.registry import get_backend, gpu_index, refuse_gpu_options, register_backend
from mexit.runtime.types import Backend

try:
    import onnxruntime as ort
except ImportError as _exc:  # the runtime package still imports: torch/TensorRT backends do not need ORT
    ort = None
    _ORT_IMPORT_ERROR: ImportError | None = _exc
else:
    _ORT_IMPORT_ERROR = None

log = logging.getLogger(__name__)

__all__ = ["Backend", "OrtCpuBackend", "OrtGpuBackend", "get_backend", "session_options"]

#: The repair for a broken GPU install: remove both builds (they share files), then install the GPU one.
GPU_INSTALL_HINT = (
    'run `pip uninstall -y onnxruntime onnxruntime-gpu && pip install "mexit[gpu]"` on a machine with an NVIDIA '
    "GPU, its driver, and the CUDA 12 / cuDNN 9 libraries onnxruntime-gpu was built for on the library path"
)
CPU_INSTALL_HINT = 'install ONNX Runtime: `pip install "mexit[cpu]"` (or "mexit[gpu]" on an NVIDIA GPU machine)'
CUDNN_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
GPU_BACKENDS = "onnxruntime-gpu, tensorrt or torch"


def require_ort() -> Any:
    """The ``onnxruntime`` module, or :class:`BackendUnavailableError` saying how to install it."""
    if ort is None:
        raise BackendUnavailableError(f"ONNX Runtime is not importable ({_ORT_IMPORT_ERROR}); {CPU_INSTALL_HINT}")
    return ort


def ort_distributions() -> list[str]:
    """Installed distributions that provide the ``onnxruntime`` module (normally exactly one)."""
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def ort_install_problem(dists: list[str] | None = None) -> str | None:
    """What is wrong with the ONNX Runtime install for GPU use, or None (see the module docstring)."""
    dists = ort_distributions() if dists is None else dists
    if "onnxruntime" in dists and "onnxruntime-gpu" in dists:
        return "both onnxruntime and onnxruntime-gpu are installed and they overwrite each other's files"
    if "onnxruntime-gpu" not in dists:
        return f"the installed ONNX Runtime is the CPU build ({', '.join(dists) or 'none found'})"
    return None


def session_options(*, threads: int = 1, spinning: bool = False) -> ort.SessionOptions:
    """Explicit ONNX Runtime options for stable, comparable latency.

    One session per stage means N thread pools: ``threads`` (intra-op) is pinned (default 1) rather than
    ORT's "all physical cores" default, which oversubscribes the CPU with a chain of sessions and
    makes per-exit latency noisy. Spinning threads cut latency slightly but burn CPU that co-tenants
    (and the timing measurements) feel, so it is off by default. Sequential execution and full graph
    optimisation are ORT's defaults, set here so they are recorded and cannot drift.
    """
    rt = require_ort()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    so = rt.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


def _check_io(sess: ort.InferenceSession, path: Path, input_name: str, outputs: list[str]) -> None:
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != [input_name] or not set(outputs) <= set(got_out):
        raise BundleError(
            f"{path.name} has inputs {got_in} and outputs {got_out}, but the manifest expects "
            f"{[input_name]} -> {outputs}; the bundle is inconsistent, re-export it"
        )


class _Stage:
    """One stage session with the names the manifest gives its tensors."""

    def __init__(self, sess: ort.InferenceSession, input_name: str, feature: str | None, logits: str) -> None:
        self.sess = sess
        self.input_name = input_name
        self.feature = feature
        self.logits = logits
        self.outputs = [logits] if feature is None else [feature, logits]


def _load_stages(bundle: Bundle, make: Callable[[Path], ort.InferenceSession]) -> tuple[list[_Stage], _Stage]:
    stages = []
    for e in bundle.manifest.exits:
        path = bundle.file(e.stage_file)
        sess = make(path)
        stage = _Stage(sess, e.input_name, e.feature_output, e.logits_output)
        _check_io(sess, path, e.input_name, stage.outputs)
        stages.append(stage)
    full_sess = make(bundle.full_path)
    full = _Stage(full_sess, bundle.manifest.input.name, None, full_sess.get_outputs()[0].name)
    _check_io(full_sess, bundle.full_path, full.input_name, full.outputs)
    return stages, full


@register_backend("onnxruntime", description="ONNX Runtime on the CPU, one session per stage (the default)",
                  extra="cpu")
class OrtCpuBackend:
    """ONNX Runtime on the CPU, one session per stage.

    Hand-off between stages: features are the numpy arrays ``InferenceSession.run`` returns, which on the CPU
    EP are views of ORT's own output buffers (no copy), and ORT wraps contiguous float32 numpy inputs without
    copying either. ``take`` copies only the surviving rows (one ``np.take``), and only when some rows exit and
    others continue. ``threads`` is each session's intra-op thread count.

    ``fold_decision=True`` (default; needs the ``onnx`` package, else silently the numpy path): each
    internal stage's graph gets two more outputs at load time, ``Softmax(logits)`` and its row maximum,
    so the runtime's max-probability decision is one comparison in Python instead of a numpy softmax
    per stage (:meth:`run_stage_scored`). The bundle's files are unchanged (the graphs are extended in
    memory). ORT's softmax differs from numpy's by ~1e-8, so an exit can flip only for a sample whose
    top probability lies within that distance of the threshold.

    ``skip_conv=True`` (default; needs ``onnx``): a stage whose input feeds a residual ``Add`` directly gets an
    identity 1×1 convolution on that skip, so ONNX Runtime keeps the whole stage in its blocked layout
    (:mod:`mexit.runtime.layout`; ResNet-56 stage 1: −17 % at batch 64, −15 % at batch 1).

    ``int8_heads=True`` (off by default; needs ``onnx``): the internal heads' large layers run with 8-bit weights
    (:mod:`mexit.runtime.quantize`), which makes them cheap at batch 1, where reading their weights dominates;
    exits and probabilities then differ slightly from the float32 model (the benchmark measures how often).

    ``fold_pools=True`` (default; needs ``onnx``): each image head's gated mixed pool (``α·MaxPool + (1 − α)·AvgPool``)
    is rewritten as one pool plus a depthwise scale that ONNX Runtime fuses in its blocked layout, with ``α`` moved
    into the head's first weight (:mod:`mexit.runtime.pool_fold`; five fewer nodes a head, values equal up to float32
    rounding). ResNet-56 ×6 at batch 1 with int8 heads: 21 µs [11, 31] a request saved, pooled over five runs on a busy
    host, each paired across 5–6 runtimes per version (``benchmarks/session_variants.py --variants
    default,control,no_fold_pools``); batches level.

    ``blocked_handoff=True`` (default; needs ``onnx``): the stage graphs are optimised by ONNX Runtime on this
    machine at load time and each stage boundary hands its features over in ONNX Runtime's blocked (NCHWc) layout,
    without the reorder to NCHW at the end of one stage and back at the start of the next
    (:func:`mexit.runtime.layout.hand_over_blocked`; bit-identical values; convolutional stages whose channels fill
    whole 16-float blocks only, the other boundaries and models are left as they are). It holds for the single
    graph's ``If`` branches, the per-stage chain and the batch graph alike. Loading takes one more ONNX Runtime
    optimisation pass per stage (ResNet-56 ×6: +0.3 s).

    ``batch_graph=True`` (off by default; needs ``onnx``): batches of two or more run the per-sample early exit as
    one graph too (:mod:`mexit.runtime.batch_graph`: decision and compaction inside, one ``run`` per batch); every
    sample's ``latency_ns`` is then the end of the call.

    ``single_graph`` (default: on when the ``onnx`` package is importable and the stage files total at
    most 512 MiB, since the graph holds every weight a second time): batch-1 calls run the whole chain
    as one graph with nested ``If`` nodes (:func:`early_exit_graph`, :meth:`predict_one`) — one
    ``run`` per request, and ONNX Runtime still stops at the exit taken. Batches keep the per-stage
    chain (per-sample exits need compaction between stages).

    Tried and dropped (issue 14): IOBinding. An ``io_binding`` option (features kept as ``OrtValue``s, bound per
    call) lost to plain ``run`` at batch 1 by 0.06 (ResNet-56 ×6) and 0.11 (FCN-18-1 ×6) of the realised /
    FLOPs-predicted speed-up on the same per-stage chain, and 0.10 / 0.22 against the single graph, in every repeat,
    and was behind or level at batches of 64 and 256 (``benchmarks/io_binding_paired.py`` of commit 0b9d4c5); a
    per-thread cached IOBinding per stage with preallocated output buffers and inputs pre-bound to the previous
    stage's buffer was ~1 µs per call *slower* than plain ``run`` at batch 1 (tiny 3-exit conv bundle).
    """

    name = "onnxruntime"
    thread_safe = True
    max_batch: int | None = None

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """A GPU index or ``fp16`` is refused up front: this backend runs float32 on the CPU."""
        refuse_gpu_options(cls.name, options.get("device"), bool(options.get("fp16")), gpu_backends=GPU_BACKENDS)

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        threads: int = 1,
        device: int | str | None = None,
        fp16: bool = False,
        spinning: bool = False,
        fold_decision: bool = True,
        single_graph: bool | None = None,
        skip_conv: bool = True,
        int8_heads: bool = False,
        fold_pools: bool = True,
        batch_graph: bool = False,
        blocked_handoff: bool = True,
    ) -> None:
        self.validate_options({"device": device, "fp16": fp16})
        rt = require_ort()
        self.bundle = load_bundle(bundle)
        so = session_options(threads=threads, spinning=spinning)
        # each stage file read once, for the stage sessions and the single graph
        rewrites = fold_decision or skip_conv or int8_heads or fold_pools or batch_graph or blocked_handoff
        graphs = _stage_graphs(self.bundle, skip_conv=skip_conv, int8_heads=int8_heads, fold_pools=fold_pools) \
            if rewrites or single_graph is not False else None
        for wanted, name in ((int8_heads, "int8_heads"), (batch_graph, "batch_graph")):
            if wanted and graphs is None:
                raise ConfigError(f"{name} needs the onnx package: pip install onnx")
        handed = 0
        if blocked_handoff and graphs is not None:
            from mexit.runtime.layout import hand_over_blocked

            exits = self.bundle.manifest.exits
            graphs, handed = hand_over_blocked(graphs, [e.feature_output for e in exits], [e.input_name for e in exits])
        folded = None if graphs is None else _stage_models(self.bundle, graphs, fold=fold_decision)
        self.folds_decision = fold_decision and folded is not None
        self.options = {"threads": threads, "spinning": spinning,
                        "fold_decision": self.folds_decision, "skip_conv": skip_conv and folded is not None,
                        "int8_heads": bool(int8_heads), "fold_pools": fold_pools and graphs is not None,
                        "blocked_handoff": handed > 0}

        def make(path: Path) -> Any:
            model = folded.get(path) if folded else None
            return rt.InferenceSession(model if model is not None else str(path), so,
                                       providers=["CPUExecutionProvider"])

        self._stages, self._full = _load_stages(self.bundle, make)
        self._scored = [[st.feature, f"{FOLD_PREFIX}probs", f"{FOLD_PREFIX}maxprob"] for st in self._stages]
        self._single = None
        #: What the single and batch graphs' threshold inputs default to when not fed (the bundle's threshold, as
        #: float32): a runtime at that threshold feeds the input alone (:meth:`EarlyExitRuntime._taus`) instead of one
        #: scalar per internal exit — 4–7 µs less a request, paired on the same request and runtime
        #: (``benchmarks/request_path_paired.py --compare thresholds``).
        self.tau_default = float(np.float32(self.bundle.manifest.policy.threshold))
        if single_graph is None:  # auto: not for models whose weights would be duplicated at great cost
            size = sum(self.bundle.file(e.stage_file).stat().st_size for e in self.bundle.manifest.exits)
            single_graph = size <= SINGLE_GRAPH_MAX_BYTES
        if single_graph:
            model = early_exit_graph(self.bundle, skip_conv=skip_conv, graphs=graphs, tau_default=self.tau_default)
            if model is not None:
                self._single = rt.InferenceSession(model, so, providers=["CPUExecutionProvider"])
                self._single_input = self._single.get_inputs()[0].name
                self._single_outputs = [SINGLE_PROBS, SINGLE_EXIT, SINGLE_LABEL, SINGLE_NONFINITE]
        self.options["single_graph"] = self._single is not None
        self._batch = None
        if batch_graph and self.bundle.manifest.model.num_exits > 1:
            from mexit.runtime.batch_graph import early_exit_batch_graph

            self._batch = rt.InferenceSession(early_exit_batch_graph(self.bundle, graphs, self.tau_default), so,
                                              providers=["CPUExecutionProvider"])
            self._batch_input = self._batch.get_inputs()[0].name
        self.options["batch_graph"] = self._batch is not None

    @property
    def has_single_graph(self) -> bool:
        """Whether :meth:`predict_one` is available (see :func:`early_exit_graph`)."""
        return self._single is not None

    #: :meth:`predict_one` checks that its input is finite (inside the graph): callers need not.
    checks_finite_one = True

    def predict_one(self, x: np.ndarray, taus: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One sample through the single early-exit graph: ``(probs (1, C), exit index (1,), label (1,))``, the
        shapes :meth:`predict_batch` returns for a batch. A NaN or infinite input is an :class:`InputError`.

        ``taus`` maps ``mexit_tau{k}`` to a float32 scalar per internal exit (the runtime builds it)."""
        probs, exit_k, label, nonfinite = self._single.run(self._single_outputs, {self._single_input: x, **taus})
        flag = nonfinite.item()
        if flag != flag:  # NaN: the input held a NaN or an infinity (nothing is returned for it)
            raise InputError(nonfinite_message(x))
        return probs, exit_k, label

    @property
    def has_batch_graph(self) -> bool:
        """Whether :meth:`predict_batch` is available (``batch_graph=True``, :mod:`mexit.runtime.batch_graph`)."""
        return self._batch is not None

    def predict_batch(self, x: np.ndarray, taus: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch through the batch early-exit graph: ``(probs (n, C), exit index (n,), labels (n,))`` in input
        order (the input is not checked for finiteness here: the runtime has done it)."""
        from mexit.runtime.batch_graph import BATCH_EXIT, BATCH_PROBS, BATCH_ROWS

        p, rows, exits = self._batch.run([BATCH_PROBS, BATCH_ROWS, BATCH_EXIT], {self._batch_input: x, **taus})
        probs = np.empty_like(p)
        probs[rows] = p
        exit_index = np.empty(len(x), dtype=np.int64)
        exit_index[rows] = exits
        return probs, exit_index, probs.argmax(axis=1)

    def run_stage_scored(self, k: int, inputs: Any) -> tuple[Any, np.ndarray, np.ndarray]:
        """Internal stage ``k`` with the folded decision: ``(features, probs (n, C), max prob (n,))``.

        Only when :attr:`folds_decision`; the runtime uses it for the ``max_prob`` policy."""
        st = self._stages[k]
        features, probs, conf = st.sess.run(self._scored[k], {st.input_name: inputs})
        return features, probs, conf

    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]:
        st = self._stages[k]
        outs = st.sess.run(st.outputs, {st.input_name: inputs})
        return (outs[0] if st.feature else None), outs[-1]

    def take(self, features: Any, idx: np.ndarray) -> Any:
        return np.take(features, idx, axis=0)

    def full(self, x: np.ndarray) -> np.ndarray:
        return self._full.sess.run(self._full.outputs, {self._full.input_name: x})[0]

    def close(self) -> None:
        self._stages = []


FOLD_PREFIX = "mexit_decision_"


def _stage_graphs(bundle: Bundle, *, skip_conv: bool, int8_heads: bool = False,
                  fold_pools: bool = True) -> list[Any] | None:
    """Every stage's ``onnx.ModelProto`` in exit order, with ``skip_conv`` its residual skips read from the stage
    input routed through an identity 1×1 convolution so the stage stays in ONNX Runtime's blocked layout
    (:mod:`mexit.runtime.layout`), with ``fold_pools`` the heads' gated mixed pools folded
    (:mod:`mexit.runtime.pool_fold`), with ``int8_heads`` the internal heads' large layers in 8 bits
    (:mod:`mexit.runtime.quantize`); None when the ``onnx`` package is not installed."""
    try:
        import onnx
    except ImportError:
        return None
    from mexit.runtime.layout import route_skips_through_conv

    graphs = [onnx.load(str(bundle.file(e.stage_file))) for e in bundle.manifest.exits]
    if skip_conv:
        for model in graphs:
            route_skips_through_conv(model)
    if fold_pools:  # before int8_heads: the pool's factor moves into the weight that is then quantised
        from mexit.runtime.pool_fold import fold_mixed_pools

        for model, e in zip(graphs, bundle.manifest.exits, strict=True):
            if e.feature_output is not None and e.feature_shape is not None and len(e.feature_shape) == 3:
                fold_mixed_pools(model, e.feature_output, e.feature_shape[0])
    if int8_heads:
        from mexit.runtime.quantize import quantize_internal_head

        graphs = [quantize_internal_head(model, e.feature_output)[0]
                  for model, e in zip(graphs, bundle.manifest.exits, strict=True)]
    return graphs


def _stage_models(bundle: Bundle, graphs: list[Any], *, fold: bool) -> dict[Path, bytes]:
    """The stage graphs as the stage sessions load them (serialised, keyed by the stage file); with ``fold``,
    internal stages also output ``Softmax(logits)`` and its row maximum (the graphs are extended on copies)."""
    from onnx import ModelProto, TensorProto, helper

    out: dict[Path, bytes] = {}
    for e, original in zip(bundle.manifest.exits, graphs, strict=True):
        path = bundle.file(e.stage_file)
        if not fold or e.feature_output is None:  # the last stage: every sample leaves there, no decision
            out[path] = original.SerializeToString()
            continue
        model = ModelProto()
        model.CopyFrom(original)
        graph = model.graph
        probs, conf = f"{FOLD_PREFIX}probs", f"{FOLD_PREFIX}maxprob"
        nodes, axes = max_prob_nodes(e.logits_output, probs, conf, f"{FOLD_PREFIX}axes", default_opset(model))
        graph.node.extend(nodes)
        graph.initializer.extend(axes)
        graph.output.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, None))
        graph.output.append(helper.make_tensor_value_info(conf, TensorProto.FLOAT, None))
        out[path] = model.SerializeToString()
    return out


#: Inputs and outputs of the single early-exit graph (:func:`early_exit_graph`).
SINGLE_TAU = "mexit_tau{}"
SINGLE_PROBS, SINGLE_EXIT = "mexit_probs", "mexit_exit"
#: ``ArgMax`` of the probabilities (int64, (1,)), and ``ReduceSum(x * 0)``: 0 for a finite input, NaN when it holds a
#: NaN or an infinity (``inf * 0`` is NaN) — the request's finiteness check, two small nodes instead of numpy calls
#: between requests (each of which measurably slows the next ``run``: ~16 µs per request on FCN-18-1 ×6).
SINGLE_LABEL, SINGLE_NONFINITE = "mexit_label", "mexit_nonfinite"
#: Stage files larger than this in total are not duplicated into a single graph (it holds every weight again).
SINGLE_GRAPH_MAX_BYTES = 512 << 20


def early_exit_graph(bundle: Bundle, *, skip_conv: bool = True, graphs: list[Any] | None = None,
                     tau_default: float | None = None) -> bytes | None:
    """The whole early-exit chain of ``bundle`` as ONE graph for batch 1, or None without ``onnx``.

    Stage ``k``'s nodes, then ``Softmax`` of its logits, their maximum and ``max >= tau_k``, then an
    ``If``: the *then* branch returns (probs, k), the *else* branch holds stage ``k + 1`` and the next
    decision, nested down to the last stage. ONNX Runtime runs only the branch taken, so one ``run``
    does exactly the work of a natural exit — no per-stage ``run`` calls, no boundary conversions, no
    Python between stages. Inputs: the stage-0 input and one float32 scalar ``mexit_tau{k}`` per
    internal exit (the runtime feeds the policy threshold, or ±inf to force an exit); outputs
    ``mexit_probs`` (1, C), ``mexit_exit`` (1,) int64, ``mexit_label`` (1,) int64 (the probabilities' argmax) and
    ``mexit_nonfinite`` (a scalar, NaN when the input holds a NaN or an infinity). ``graphs``: the stage graphs
    already loaded (and rewritten as ``skip_conv`` says, :func:`_stage_graphs`), left unchanged; else they are read
    here. ``tau_default``: a value every ``mexit_tau{k}`` input takes when the caller does not feed it (an
    initializer of the same name, :func:`~mexit.runtime.onnx_parts.tau_initializers`).
    """
    try:
        from onnx import TensorProto, compose, helper
    except ImportError:
        return None
    m = bundle.manifest
    k_exits = m.model.num_exits
    if k_exits < 2:
        return None
    if graphs is None:  # the previous stage's features arrive from the enclosing scope in plain NCHW
        graphs = _stage_graphs(bundle, skip_conv=skip_conv)
    stages = [compose.add_prefix(model, f"s{e.index}_") for model, e in zip(graphs, m.exits, strict=True)]
    for k in range(1, k_exits):  # stage k reads stage k-1's feature output from the enclosing scope
        src, dst = f"s{k}_{m.exits[k].input_name}", f"s{k - 1}_{m.exits[k - 1].feature_output}"
        for node in stages[k].graph.node:
            for i, name in enumerate(node.input):
                if name == src:
                    node.input[i] = dst
    opset = default_opset(stages[0])

    def out(name: str, dtype: int) -> Any:
        return helper.make_tensor_value_info(name, dtype, None)

    def exit_const(k: int, name: str) -> Any:
        value = helper.make_tensor(f"{name}_v", TensorProto.INT64, [1], [k])
        return helper.make_node("Constant", [], [name], value=value)

    last = m.exits[-1]
    g = stages[-1].graph
    p_out, x_out = f"d{k_exits - 1}_p", f"d{k_exits - 1}_x"
    inner = helper.make_graph(
        [*g.node, helper.make_node("Softmax", [f"s{k_exits - 1}_{last.logits_output}"], [p_out], axis=1),
         exit_const(k_exits - 1, x_out)],
        f"stage{k_exits - 1}", [], [out(p_out, TensorProto.FLOAT), out(x_out, TensorProto.INT64)],
        initializer=list(g.initializer))
    for k in range(k_exits - 2, -1, -1):
        e, g = m.exits[k], stages[k].graph
        p, conf, cond = f"d{k}_p", f"d{k}_conf", f"d{k}_cond"
        decide, axes = max_prob_nodes(f"s{k}_{e.logits_output}", p, conf, f"d{k}_axes", opset)
        nodes = [*g.node, *decide]
        inits = [*g.initializer, *axes]
        nodes.append(helper.make_node("GreaterOrEqual", [conf, SINGLE_TAU.format(k)], [cond]))
        then = helper.make_graph([helper.make_node("Identity", [p], [f"t{k}_p"]), exit_const(k, f"t{k}_x")],
                                 f"exit{k}", [], [out(f"t{k}_p", TensorProto.FLOAT), out(f"t{k}_x", TensorProto.INT64)])
        p_out, x_out = (SINGLE_PROBS, SINGLE_EXIT) if k == 0 else (f"o{k}_p", f"o{k}_x")
        nodes.append(helper.make_node("If", [cond], [p_out, x_out], then_branch=then, else_branch=inner))
        outputs = [out(p_out, TensorProto.FLOAT), out(x_out, TensorProto.INT64)]
        if k > 0:
            inner = helper.make_graph(nodes, f"stage{k}", [], outputs, initializer=inits)
            continue
        inputs = [helper.make_tensor_value_info(f"s0_{e.input_name}", TensorProto.FLOAT, [1, *m.input.sample_shape])]
        inputs += [helper.make_tensor_value_info(SINGLE_TAU.format(j), TensorProto.FLOAT, [])
                   for j in range(k_exits - 1)]
        nodes += [helper.make_node("ArgMax", [SINGLE_PROBS], [SINGLE_LABEL], axis=1, keepdims=0),
                  helper.make_node("Mul", [inputs[0].name, "mexit_zero"], ["mexit_zeroed"]),
                  helper.make_node("ReduceSum", ["mexit_zeroed"], [SINGLE_NONFINITE], keepdims=0)]
        inits.append(helper.make_tensor("mexit_zero", TensorProto.FLOAT, [], [0.0]))
        inits += tau_initializers(SINGLE_TAU, k_exits - 1, tau_default)
        outputs += [out(SINGLE_LABEL, TensorProto.INT64), out(SINGLE_NONFINITE, TensorProto.FLOAT)]
        model = helper.make_model(helper.make_graph(nodes, "early_exit", inputs, outputs, initializer=inits),
                                  opset_imports=merged_opsets(stages))
        model.ir_version = stages[0].ir_version
        return model.SerializeToString()
    return None


#: A one-node ONNX graph ``out = Gather(data, idx, axis=0)`` (opset 13, IR 8) for on-device row compaction.
#: Embedded as bytes so that a runtime-only GPU install (no ``onnx`` package) still compacts on the
#: device; ``tests/runtime/test_backends.py`` rebuilds it with ``onnx.helper`` and checks it is identical.
GATHER_MODEL = (
    b'\x08\x08:^\n%\n\x04data\n\x03idx\x12\x03out"\x06Gather*\x0b\n\x04axis\x18\x00\xa0\x01\x02\x12\x06gather'
    b"Z\x0c\n\x04data\x12\x04\n\x02\x08\x01Z\x12\n\x03idx\x12\x0b\n\t\x08\x07\x12\x05\n\x03\x12\x01nb\x0b\n\x03out"
    b"\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


def gather_model_bytes() -> bytes:
    """The serialised gather graph (:data:`GATHER_MODEL`); kept as a function for existing callers."""
    return GATHER_MODEL


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mexit"


@register_backend("onnxruntime-gpu", extra="gpu",
                  description="ONNX Runtime with the CUDA (or, provider=tensorrt, the TensorRT) execution provider")
class OrtGpuBackend:
    """ONNX Runtime with the CUDA (or TensorRT) execution provider; features stay on the GPU.

    Stage inputs are bound with IOBinding: the batch is copied to the device once, each stage's feature
    output is bound to ``cuda`` and handed to the next stage as an ``OrtValue`` (no host round trip),
    and only the logits are bound to ``cpu`` for the exit decision. Compaction runs the embedded
    one-node ``Gather`` graph (:data:`GATHER_MODEL`) on the device.

    Options, and why their defaults:

    * ``cudnn_conv_algo_search="HEURISTIC"``: ORT's own default, EXHAUSTIVE, benchmarks every cuDNN
      algorithm for each new input shape, and compaction produces a new shape (survivor count) at
      every stage, so the search would land inside timed ``predict`` calls. ``warmup(batch_sizes=…)``
      pre-pays it when EXHAUSTIVE is wanted.
    * ``tf32=False``: TF32 convolutions/matmuls drift ~1e-3 from the CPU parity check, enough to flip
      exits near the threshold; turn it on only with a threshold recalibrated on this backend.
    * ``fp16`` only with ``provider="tensorrt"`` (ORT's TensorRT EP, engine cache in ``trt_cache_dir``,
      default ``~/.cache/mexit/ort-trt/<bundle>``, batch profile 1..``max_batch``).
    * ``threads``: intra-op threads for the nodes ONNX Runtime places on the CPU.

    Never falls back to the CPU silently: a session whose first provider is not the one asked for is
    refused, and ORT's run-time CPU fall-back is disabled.
    """

    name = "onnxruntime-gpu"
    thread_safe = True
    max_batch: int | None = None

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """The option values refused whatever the machine: provider, fp16 without TensorRT, the cuDNN search
        mode, max_batch, a device that is no GPU index (``options``: all of them, as the constructor has them)."""
        provider = options["provider"]
        if provider not in ("cuda", "tensorrt"):
            raise ConfigError(f"provider must be 'cuda' or 'tensorrt', got {provider!r}")
        if options.get("fp16") and provider != "tensorrt":
            raise ConfigError("fp16 needs provider=tensorrt for backend onnxruntime-gpu (or use backend tensorrt)")
        search = str(options["cudnn_conv_algo_search"]).upper()
        if search not in CUDNN_SEARCH:
            raise ConfigError(f"cudnn_conv_algo_search must be one of {', '.join(CUDNN_SEARCH)}, got {search!r}")
        max_batch = options["max_batch"]
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        gpu_index(cls.name, options.get("device"))

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        threads: int = 1,
        device: int | str | None = None,
        fp16: bool = False,
        provider: str = "cuda",
        cudnn_conv_algo_search: str = "HEURISTIC",
        tf32: bool = False,
        trt_cache_dir: str | None = None,
        max_batch: int = 256,
    ) -> None:
        self.validate_options({"device": device, "fp16": fp16, "provider": provider,
                               "cudnn_conv_algo_search": cudnn_conv_algo_search, "max_batch": max_batch})
        search = str(cudnn_conv_algo_search).upper()
        rt = require_ort()
        self.bundle = load_bundle(bundle)
        self.device_id = gpu_index(self.name, device)
        available = rt.get_available_providers()
        needed = ["CUDAExecutionProvider"] + (["TensorrtExecutionProvider"] if provider == "tensorrt" else [])
        missing = [p for p in needed if p not in available]
        if missing:
            problem = ort_install_problem()
            raise BackendUnavailableError(
                f"ONNX Runtime {getattr(rt, '__version__', '?')} here has no {', '.join(missing)} (available: "
                f"{', '.join(available)}{'; ' + problem if problem else ''}); {GPU_INSTALL_HINT}"
            )
        cuda_opts = {"device_id": str(self.device_id), "cudnn_conv_algo_search": search,
                     "use_tf32": "1" if tf32 else "0"}
        so = session_options(threads=threads)
        manifest = self.bundle.manifest
        cache = Path(trt_cache_dir) if trt_cache_dir else _cache_dir() / "ort-trt" / manifest.full_model.sha256[:16]
        if provider == "tensorrt":
            self.max_batch = int(max_batch)
            cache.mkdir(parents=True, exist_ok=True)

        def providers_for(path: Path) -> list[Any]:
            chain: list[Any] = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
            if provider == "tensorrt":
                name, shape = self._input_of(path)
                dims = "x".join(str(d) for d in shape)
                trt_opts = {
                    "device_id": str(self.device_id),
                    "trt_fp16_enable": "True" if fp16 else "False",
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(cache),
                    "trt_profile_min_shapes": f"{name}:1x{dims}",
                    "trt_profile_opt_shapes": f"{name}:1x{dims}",
                    "trt_profile_max_shapes": f"{name}:{int(max_batch)}x{dims}",
                }
                chain.insert(0, ("TensorrtExecutionProvider", trt_opts))
            return chain

        def make(path: Path | bytes) -> Any:
            what = "the gather graph" if isinstance(path, bytes) else path.name
            chain = [("CUDAExecutionProvider", cuda_opts)] if isinstance(path, bytes) else providers_for(path)
            sess = rt.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=chain)
            first = sess.get_providers()[0]
            if first != needed[-1] and not isinstance(path, bytes):
                raise BackendUnavailableError(
                    f"ONNX Runtime fell back to {first} for {what} (the CUDA/cuDNN or TensorRT libraries could not be "
                    f"loaded, or there is no GPU {self.device_id}); {GPU_INSTALL_HINT}"
                )
            if first != "CUDAExecutionProvider" and isinstance(path, bytes):
                raise BackendUnavailableError(f"ONNX Runtime could not put {what} on the GPU; {GPU_INSTALL_HINT}")
            disable = getattr(sess, "disable_fallback", None)
            if callable(disable):  # a CUDA failure at run time must raise, not re-run on the CPU
                disable()
            return sess

        self._stages, self._full = _load_stages(self.bundle, make)
        self._gather = make(GATHER_MODEL)

    def _input_of(self, path: Path) -> tuple[str, tuple[int, ...]]:
        m = self.bundle.manifest
        if path == self.bundle.full_path:
            return m.input.name, m.input.sample_shape
        for e in m.exits:
            if self.bundle.file(e.stage_file) == path:
                if e.index == 0:
                    return e.input_name, m.input.sample_shape
                prev = m.exits[e.index - 1].feature_shape
                if prev is None:
                    raise BundleError(f"manifest.exits[{e.index - 1}].feature_shape is missing; re-export the bundle")
                return e.input_name, tuple(prev)
        raise BundleError(f"{path} is not a stage of this bundle")

    def _bind_input(self, binding: Any, name: str, inputs: Any) -> None:
        if isinstance(inputs, ort.OrtValue):
            binding.bind_ortvalue_input(name, inputs)
        else:
            binding.bind_cpu_input(name, inputs)

    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]:
        st = self._stages[k]
        binding = st.sess.io_binding()
        self._bind_input(binding, st.input_name, inputs)
        if st.feature:
            binding.bind_output(st.feature, "cuda", self.device_id)
        binding.bind_output(st.logits, "cpu")
        st.sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return (outs[0] if st.feature else None), outs[-1].numpy()

    def take(self, features: Any, idx: np.ndarray) -> Any:
        binding = self._gather.io_binding()
        binding.bind_ortvalue_input("data", features)
        binding.bind_cpu_input("idx", np.ascontiguousarray(idx, dtype=np.int64))
        binding.bind_output("out", "cuda", self.device_id)
        self._gather.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def full(self, x: np.ndarray) -> np.ndarray:
        binding = self._full.sess.io_binding()
        binding.bind_cpu_input(self._full.input_name, x)
        binding.bind_output(self._full.logits, "cpu")
        self._full.sess.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def close(self) -> None:
        self._stages = []
        self._gather = None
