"""The bundle format: manifest validation, refusal of newer/partial/tampered bundles, atomic writing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mexit.bundle import (
    FORMAT_VERSION,
    Manifest,
    engine_dir_name,
    load_bundle,
    read_manifest,
    staged_bundle_dir,
    update_manifest,
)
from mexit.errors import BundleError
from mexit.export import export_bundle
from mexit.train.multiexit import MultiExitNet
from tests.export import tiny


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "mlp"
    return export_bundle(tiny.tiny_mlp(), out, sample_inputs=tiny.mlp_inputs(8), threshold=0.5,
                         dataset_name="rows", dataset_kind="tabular", exporter="legacy", save_torch_programs=False)


@pytest.fixture
def manifest_dict(bundle_dir) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


def _copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_roundtrip(bundle_dir, manifest_dict):
    m = Manifest.from_dict(manifest_dict)
    assert m.format_version == FORMAT_VERSION
    assert json.loads(json.dumps(m.to_dict())) == manifest_dict
    b = load_bundle(bundle_dir)
    assert b.num_exits == 3 and b.input_shape == (12,) and b.num_classes == tiny.NUM_CLASSES
    assert b.manifest.listed_files().keys() == {"stage_0.onnx", "stage_1.onnx", "stage_2.onnx", "full.onnx"}
    assert oct((bundle_dir / "manifest.json").stat().st_mode & 0o777) != oct(0o600)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["exits"][1].pop("sha256"), "manifest.exits[1].sha256 is missing"),
        (lambda d: d["exits"][0].__setitem__("sha256", "abc"), "manifest.exits[0].sha256 must be a lowercase hex"),
        (lambda d: d["policy"].__setitem__("kind", "margin"), "manifest.policy.kind must be one of"),
        (lambda d: d["policy"].__setitem__("threshold", "high"), "manifest.policy.threshold must be a finite"),
        (lambda d: d["exits"][2].__setitem__("stage_file", "../evil.onnx"), "relative path inside the bundle"),
        (lambda d: d["exits"][2].__setitem__("stage_file", "/etc/passwd"), "relative path inside the bundle"),
        (lambda d: d["model"].__setitem__("num_exits", 2), "lists 3 exits but model.num_exits is 2"),
        (lambda d: d["exits"][1].__setitem__("input_name", "h7"), "does not match exits[0].feature_output"),
        (lambda d: d["exits"][2].__setitem__("feature_output", "h2"), "must be null for the last exit"),
        (lambda d: d["exits"][0].__setitem__("index", 1), "manifest.exits[0].index is 1"),
        (lambda d: d["input"].__setitem__("shape", [12]), "manifest.input.shape"),
        (lambda d: d["dataset"].__setitem__("kind", "audio"), "manifest.dataset.kind"),
        (lambda d: d["model"].__setitem__("class_names", ["a"]), "class_names has 1 names for 4 classes"),
        (lambda d: d.__setitem__("extra_files", {"x.bin": "zz"}), "manifest.extra_files['x.bin']"),
        (lambda d: d.pop("full_model"), "manifest.full_model is missing"),
        (lambda d: d.__setitem__("exits", {}), "manifest.exits must be a list"),
    ],
)
def test_manifest_validation_names_the_field(manifest_dict, mutate, needle):
    d = copy.deepcopy(manifest_dict)
    mutate(d)
    with pytest.raises(BundleError) as info:
        Manifest.from_dict(d)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_newer_format_is_refused(bundle_dir, tmp_path, manifest_dict):
    dst = _copy_bundle(bundle_dir, tmp_path / "b")
    manifest_dict["format_version"] = FORMAT_VERSION + 1
    (dst / "manifest.json").write_text(json.dumps(manifest_dict))
    with pytest.raises(BundleError, match=r"bundle format 2 is newer than this mexit supports \(1\); upgrade mexit"):
        load_bundle(dst)


def test_missing_things_are_refused(bundle_dir, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(tmp_path / "empty")
    dst = _copy_bundle(bundle_dir, tmp_path / "partial")
    (dst / "stage_1.onnx").unlink()
    with pytest.raises(BundleError, match=r"partial: stage_1\.onnx is missing"):
        load_bundle(dst)
    bad = _copy_bundle(bundle_dir, tmp_path / "badjson")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bad)


def test_one_flipped_byte_is_refused(bundle_dir, tmp_path):
    dst = _copy_bundle(bundle_dir, tmp_path / "tampered")
    data = bytearray((dst / "stage_2.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (dst / "stage_2.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tampered or partial: sha256 of stage_2\.onnx"):
        load_bundle(dst)
    load_bundle(dst, verify=False)  # manifest-only readers may skip hashing
    assert read_manifest(dst).model.num_exits == 3


class _Noisy(nn.Module):
    """Adds fresh random noise: PyTorch and ONNX Runtime draw different numbers, so parity must fail."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_failed_parity_leaves_nothing_behind(tmp_path):
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(12, 8), _Noisy()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]
    heads = [nn.Linear(8, 3), nn.Linear(8, 3)]
    net = MultiExitNet(stages, heads, arch="noisy", input_shape=(12,), num_classes=3).eval()
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match=r"parity check failed .* exit 0: [0-9.e-]+ \(allowed"):
        export_bundle(net, out, sample_inputs=tiny.mlp_inputs(6), threshold=0.5, dataset_name="rows",
                      dataset_kind="tabular", exporter="legacy", save_torch_programs=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left either


def test_overwrite_replaces_atomically(bundle_dir, tmp_path):
    dst = _copy_bundle(bundle_dir, tmp_path / "b")
    with pytest.raises(BundleError, match="already exists"), staged_bundle_dir(dst):
        pass
    with staged_bundle_dir(dst, overwrite=True) as staging:
        (staging / "marker").write_text("new")
        assert staging.parent == dst.parent and staging.name.startswith(".b.partial-")
        assert (dst / "manifest.json").exists()  # the old bundle stays usable until the rename
    assert (dst / "marker").read_text() == "new" and not (dst / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_crash_inside_staging_keeps_old_bundle(bundle_dir, tmp_path):
    dst = _copy_bundle(bundle_dir, tmp_path / "b")
    with pytest.raises(RuntimeError), staged_bundle_dir(dst, overwrite=True) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("crash")
    load_bundle(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_update_manifest_with_engine_files(bundle_dir, tmp_path):
    dst = _copy_bundle(bundle_dir, tmp_path / "b")
    key = engine_dir_name("NVIDIA H200", "10.3.0", fp16=True)
    assert key == "NVIDIA-H200_trt10.3.0_fp16"
    plan_dir = dst / "engines" / key
    plan_dir.mkdir(parents=True)
    extra = {}
    import hashlib

    for k in range(3):
        (plan_dir / f"stage_{k}.plan").write_bytes(bytes([k]) * 10)
        extra[f"engines/{key}/stage_{k}.plan"] = hashlib.sha256(bytes([k]) * 10).hexdigest()
    engines = {key: {"gpu": "NVIDIA H200", "tensorrt": "10.3.0", "fp16": True, "max_batch": 8,
                     "stages": sorted(extra), "full": None}}
    update_manifest(dst, extra_files=extra, engines=engines)
    b = load_bundle(dst)
    assert b.manifest.engines[key]["max_batch"] == 8
    (plan_dir / "stage_1.plan").write_bytes(b"tampered!!")
    with pytest.raises(BundleError, match="tampered"):
        load_bundle(dst)
    with pytest.raises(BundleError, match="not listed in extra_files"):
        bad = json.loads((dst / "manifest.json").read_text())
        bad["engines"][key]["stages"].append("engines/other.plan")
        Manifest.from_dict(bad)
    np.testing.assert_equal(b.manifest.input.sample_shape, (12,))
