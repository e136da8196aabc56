"""Per-stage ONNX export: valid graphs, chained names, dynamic batch, parity with PyTorch, full graph."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from mexit.bundle import load_bundle
from mexit.errors import BackendUnavailableError, BundleError, ConfigError, InputError
from mexit.export import export_bundle
from tests.export import tiny


@pytest.fixture(scope="module")
def conv_model():
    return tiny.tiny_conv(seed=3)


@pytest.fixture(scope="module")
def samples():
    return tiny.conv_inputs(24, seed=7)


@pytest.fixture(scope="module")
def dynamo_bundle(tmp_path_factory, conv_model, samples) -> Path:
    """Exported once with the default exporter (dynamo, legacy fallback) and torch programs."""
    out = tmp_path_factory.mktemp("export") / "conv"
    return export_bundle(conv_model, out, sample_inputs=samples, threshold=0.7, dataset_name="toy",
                         dataset_kind="image", class_names=["a", "b", "c", "d"])


def _sessions(bundle_dir: Path):
    b = load_bundle(bundle_dir)
    sess = [ort.InferenceSession(str(b.stage_path(k)), providers=["CPUExecutionProvider"]) for k in range(3)]
    full = ort.InferenceSession(str(b.full_path), providers=["CPUExecutionProvider"])
    return b, sess, full


def _chain(b, sessions, x):
    outs, h = [], x
    for e, s in zip(b.manifest.exits, sessions, strict=True):
        names = [e.logits_output] if e.feature_output is None else [e.feature_output, e.logits_output]
        res = s.run(names, {e.input_name: h})
        h = res[0]
        outs.append(res[-1])
    return outs


def test_stages_are_valid_onnx_with_chained_names(dynamo_bundle):
    b = load_bundle(dynamo_bundle)
    m = b.manifest
    expected = [("input", ["h0", "logits0"]), ("h0", ["h1", "logits1"]), ("h1", ["logits2"])]
    for k, (inp, outs) in enumerate(expected):
        model = onnx.load(str(b.stage_path(k)))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == [inp]
        assert [o.name for o in model.graph.output] == outs
        for v in [*model.graph.input, *model.graph.output]:
            assert v.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert m.exits[k].input_name == inp
        assert m.exits[k].logits_output == outs[-1]
    full = onnx.load(str(b.full_path))
    onnx.checker.check_model(full, full_check=True)
    assert [i.name for i in full.graph.input] == ["input"] and [o.name for o in full.graph.output] == ["logits"]
    assert m.exits[0].feature_shape == (4, 8, 8) and m.exits[1].feature_shape == (8, 4, 4)
    assert m.exits[2].feature_shape is None


def test_manifest_records_costs_parity_and_provenance(dynamo_bundle, conv_model):
    m = load_bundle(dynamo_bundle).manifest
    assert [e.cumulative_flops for e in m.exits] == conv_model.costs()
    assert [e.runtime_flops for e in m.exits] == conv_model.runtime_costs()
    assert m.parity.batch_sizes == (1, 24) and m.parity.samples == 24
    assert max(m.parity.max_abs_diff) <= 1e-4 and m.parity.full_max_abs_diff <= 1e-4
    assert m.provenance["exporters"] == ["dynamo"]
    assert m.model.class_names == ("a", "b", "c", "d")
    assert m.input.shape == (-1, 1, 8, 8) and m.input.value_range == (0.0, 1.0)
    assert set(m.torch_programs["stages"]) == {"stage_0.pt2", "stage_1.pt2", "stage_2.pt2"}
    assert {"stage_0.pt2", "full.pt2"} <= set(m.extra_files)
    on_disk = json.loads((dynamo_bundle / "manifest.json").read_text())
    assert on_disk["format_version"] == 1 and on_disk["exits"][2]["feature_output"] is None


@pytest.mark.parametrize("n", [1, 7, 64])
def test_dynamic_batch_parity_with_torch(dynamo_bundle, conv_model, n):
    b, sessions, full = _sessions(dynamo_bundle)
    x = tiny.conv_inputs(n, seed=100 + n)
    got = _chain(b, sessions, x)
    want = tiny.torch_logits(conv_model, x)
    for k in range(3):
        assert got[k].shape == (n, tiny.NUM_CLASSES)
        np.testing.assert_allclose(got[k], want[k], atol=1e-4)
    full_out = full.run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(full_out, got[-1], atol=1e-5)
    np.testing.assert_allclose(full_out, want[-1], atol=1e-4)


def test_legacy_exporter_mlp(tmp_path):
    model = tiny.tiny_mlp(seed=4)
    x = tiny.mlp_inputs(10, seed=8)
    out = export_bundle(model, tmp_path / "mlp", sample_inputs=x, threshold=0.3, policy="entropy",
                        dataset_name="rows", dataset_kind="tabular", exporter="legacy", save_torch_programs=False)
    b, sessions, _ = _sessions(out)
    assert b.manifest.provenance["exporters"] == ["legacy"]
    assert b.manifest.input.value_range is None and b.manifest.torch_programs is None
    got = _chain(b, sessions, tiny.mlp_inputs(5, seed=9))
    want = tiny.torch_logits(model, tiny.mlp_inputs(5, seed=9))
    for k in range(3):
        np.testing.assert_allclose(got[k], want[k], atol=1e-4)


def test_export_restores_nothing_it_should_not_touch(tmp_path, conv_model, samples):
    conv_model.train()
    try:
        export_bundle(conv_model, tmp_path / "b", sample_inputs=samples[:4], threshold=0.5, dataset_name="t",
                      dataset_kind="image", exporter="legacy", save_torch_programs=False)
        assert conv_model.training  # the caller's model is not switched to eval behind its back
    finally:
        conv_model.eval()


def test_export_argument_errors(tmp_path, conv_model, samples):
    kw = dict(threshold=0.5, dataset_name="t", dataset_kind="image", exporter="legacy", save_torch_programs=False)
    with pytest.raises(InputError, match=r"\(n, 1, 8, 8\)"):
        export_bundle(conv_model, tmp_path / "a", sample_inputs=samples[:, :, :4], **kw)
    with pytest.raises(InputError, match="empty"):
        export_bundle(conv_model, tmp_path / "a", sample_inputs=samples[:0], **kw)
    with pytest.raises(ConfigError, match="policy"):
        export_bundle(conv_model, tmp_path / "a", sample_inputs=samples, **{**kw, "policy": "margin"})
    with pytest.raises(ConfigError, match="class names"):
        export_bundle(conv_model, tmp_path / "a", sample_inputs=samples, class_names=["x"], **kw)
    (tmp_path / "exists").mkdir()
    with pytest.raises(BundleError, match="--overwrite"):
        export_bundle(conv_model, tmp_path / "exists", sample_inputs=samples, **kw)
    assert not (tmp_path / "a").exists()


def test_build_engines_without_tensorrt(dynamo_bundle, monkeypatch):
    from mexit.export.tensorrt import build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not importable, whether or not it is installed
    with pytest.raises(BackendUnavailableError, match=r"pip install mexit\[tensorrt\]"):
        build_engines(dynamo_bundle)


def test_cli_export_command(tmp_path, monkeypatch):
    """``mexit export RUN_DIR --out BUNDLE`` against a stand-in for the trainer's ``load_run``."""
    import mexit.train.runner as runner
    from mexit.cli.export import command

    model = tiny.tiny_mlp(seed=5)
    rows = tiny.mlp_inputs(80, seed=12)
    dataset = types.SimpleNamespace(name="rows", kind="tabular", class_names=None,
                                    inputs=lambda idx: rows[np.asarray(idx)])
    run = types.SimpleNamespace(
        model=model, threshold=0.6, dataset=dataset,
        config=types.SimpleNamespace(role="target", dataset="rows", arch="tiny-mlp", exits=3),
        splits=types.SimpleNamespace(target_val=np.arange(40, 80), shadow_val=np.arange(0, 40)),
    )
    seen = {}

    def fake_load_run(run_dir, data_root=None):
        seen["run_dir"] = Path(run_dir)
        return run

    monkeypatch.setattr(runner, "load_run", fake_load_run)
    out = tmp_path / "bundle"
    res = CliRunner().invoke(command, [str(tmp_path / "run"), "--out", str(out), "--samples", "8",
                                       "--exporter", "legacy"])
    assert res.exit_code == 0, res.output
    assert "exported tiny-mlp (3 exits, rows)" in res.output
    m = load_bundle(out).manifest
    assert m.policy.threshold == pytest.approx(0.6) and m.parity.samples == 8
    assert m.provenance["run_dir"] == str(tmp_path / "run")
    res = CliRunner().invoke(command, [str(tmp_path / "run"), "--out", str(out)])
    assert res.exit_code != 0 and "--overwrite" in str(res.exception or res.output)


def test_runtime_graph_rewrites_work_on_the_default_exporter_opset(dynamo_bundle, samples):
    """The runtime's in-memory graphs (single early-exit graph, folded decision) on a dynamo-exported bundle
    (opset >= 18: ReduceMax takes its axes as an input) agree with the plain per-stage chain."""
    from mexit.runtime import EarlyExitRuntime

    opset = max(o.version for o in onnx.load(str(load_bundle(dynamo_bundle).stage_path(0))).opset_import
                if o.domain in ("", "ai.onnx"))
    plain = EarlyExitRuntime(dynamo_bundle, single_graph=False, fold_decision=False)
    tau = tiny.mid_threshold(plain.predict(samples, force_exit=0).probs.max(axis=1), 0.5)
    plain = EarlyExitRuntime(dynamo_bundle, threshold=tau, single_graph=False, fold_decision=False)
    fast = EarlyExitRuntime(dynamo_bundle, threshold=tau)
    assert fast.backend.options["single_graph"] and fast.backend.options["fold_decision"], opset
    want = plain.predict(samples)
    np.testing.assert_array_equal(fast.predict(samples).exit_index, want.exit_index)
    for i in range(len(samples)):
        one = fast.predict(samples[i : i + 1])
        assert one.exit_index[0] == want.exit_index[i]
        np.testing.assert_allclose(one.probs[0], want.probs[i], atol=1e-6)
