"""The deployment bundle format, shared by its writer (:mod:`mexit.export`) and its reader (:mod:`mexit.runtime`).

A bundle is a directory that holds everything an edge box needs to run a multi-exit model without
PyTorch or training code::

    manifest.json     what the files are, how they chain, their sha256, costs, exit policy, parity report
    stage_0.onnx      input "input" -> ("h0", "logits0")
    stage_k.onnx      "h{k-1}"      -> ("h{k}", "logits{k}")
    stage_{K-1}.onnx  "h{K-2}"      -> "logits{K-1}"
    full.onnx         "input"       -> "logits" (the full-depth graph: the vanilla baseline)
    stage_k.pt2 …     optional torch.export programs (for the PyTorch backend)
    engines/<gpu>_trt<version>[_fp16]/stage_k.plan   optional TensorRT engines

This module sits low in the package (json, hashlib and :mod:`mexit._io` only) so that the exporter,
which runs earlier in the pipeline, and the runtime, which runs later, share one definition of the
format without the runtime importing the exporter (or torch).

Integrity: every file the manifest lists carries a sha256 that :func:`load_bundle` checks, so a
tampered or half-copied bundle is refused instead of silently producing wrong predictions. Writing is
atomic at directory level: :func:`staged_bundle_dir` builds the bundle in a hidden sibling directory
and renames it into place only when everything (export, checks, parity, manifest) succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mexit._io import atomic_write_json, sha256_file
from mexit.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INPUT_NAME = "input"
FULL_OUTPUT_NAME = "logits"
POLICIES = ("max_prob", "entropy")
DATASET_KINDS = ("image", "tabular")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def feature_name(k: int) -> str:
    """Name of the feature tensor that stage ``k`` produces and stage ``k + 1`` consumes."""
    return f"h{k}"


def logits_name(k: int) -> str:
    """Name of exit ``k``'s logits output."""
    return f"logits{k}"


def stage_file_name(k: int) -> str:
    return f"stage_{k}.onnx"


def engine_dir_name(gpu_name: str, trt_version: str, *, fp16: bool = False) -> str:
    """Directory (under ``engines/``) for TensorRT plans: engines only run on the GPU model and TensorRT
    version that built them, so both are part of the key; FP16 plans differ from FP32 ones."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-") or "gpu"
    return f"{slug}_trt{trt_version}{'_fp16' if fp16 else ''}"


# --------------------------------------------------------------------------------------------------
# Manifest dataclasses
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitEntry:
    """One exit: the stage file that produces it, how it chains, and what it costs.

    ``feature_shape`` is the per-sample shape of ``feature_output`` (None for the last exit); backends
    that need static shape information (TensorRT profiles) read it from here.
    """

    index: int
    stage_file: str
    sha256: str
    input_name: str
    feature_output: str | None
    logits_output: str
    cumulative_flops: int
    runtime_flops: int
    feature_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FileEntry:
    file: str
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    num_exits: int
    num_classes: int
    class_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str


@dataclass(frozen=True)
class InputSpec:
    """The model input. Normalisation is folded into stage 0, so inputs are what the data layer yields:
    images as float32 in ``value_range`` (usually [0, 1]), tabular rows as they are (``value_range`` None)."""

    name: str
    shape: tuple[int, ...]  # batch axis first, as -1
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None
    note: str = ""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])


@dataclass(frozen=True)
class PolicySpec:
    """Early-exit rule: ``max_prob`` exits when the top softmax probability is ``>= threshold``;
    ``entropy`` exits when the softmax entropy divided by ``ln(num_classes)`` (so in [0, 1]) is
    ``<= threshold``."""

    kind: str
    threshold: float


@dataclass(frozen=True)
class ParityReport:
    """How closely the exported graphs reproduce PyTorch on real inputs.

    ``max_abs_diff[k]``: largest |ONNX Runtime − PyTorch| logit difference at exit ``k`` over every
    batch size in ``batch_sizes``; ``logit_scale[k]``: largest |PyTorch logit| there. A check passes
    when ``max_abs_diff <= tolerance * max(1, logit_scale)``.
    """

    max_abs_diff: tuple[float, ...]
    full_max_abs_diff: float
    batch_sizes: tuple[int, ...]
    tolerance: float
    samples: int
    logit_scale: tuple[float, ...] = ()


@dataclass(frozen=True)
class Manifest:
    format_version: int
    provenance: Mapping[str, Any]
    model: ModelInfo
    dataset: DatasetInfo
    input: InputSpec
    exits: tuple[ExitEntry, ...]
    full_model: FileEntry
    policy: PolicySpec
    parity: ParityReport
    extra_files: Mapping[str, str] = field(default_factory=dict)
    torch_programs: Mapping[str, Any] | None = None  # {"stages": [relpath, ...], "full": relpath | None}
    engines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # key -> {gpu, tensorrt, ...}

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to ``manifest.json``."""

        def conv(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                return {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            if isinstance(obj, tuple | list):
                return [conv(v) for v in obj]
            if isinstance(obj, Mapping):
                return {str(k): conv(v) for k, v in obj.items()}
            return obj

        return conv(self)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate a parsed ``manifest.json``; any problem raises :class:`BundleError` naming the field."""
        r = _Reader(data, "manifest")
        version = r.integer("format_version", minimum=1)
        if version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format {version} is newer than this mexit supports ({FORMAT_VERSION}); upgrade mexit"
            )
        model_r = r.sub("model")
        model = ModelInfo(
            arch=model_r.text("arch"),
            num_exits=model_r.integer("num_exits", minimum=1),
            num_classes=model_r.integer("num_classes", minimum=1),
            class_names=model_r.opt_str_list("class_names"),
        )
        if model.class_names is not None and len(model.class_names) != model.num_classes:
            raise BundleError(
                f"manifest.model.class_names has {len(model.class_names)} names for {model.num_classes} classes"
            )
        ds_r = r.sub("dataset")
        dataset = DatasetInfo(name=ds_r.text("name"), kind=ds_r.choice("kind", DATASET_KINDS))
        in_r = r.sub("input")
        shape = in_r.int_list("shape")
        if len(shape) < 2 or shape[0] != -1 or any(d <= 0 for d in shape[1:]):
            raise BundleError(f"manifest.input.shape must be [-1, d1, ...] with positive dims, got {list(shape)}")
        vr = in_r.opt_float_list("value_range")
        if vr is not None and (len(vr) != 2 or not vr[0] < vr[1]):
            raise BundleError(f"manifest.input.value_range must be [low, high] with low < high, got {list(vr)}")
        input_spec = InputSpec(
            name=in_r.text("name"),
            shape=shape,
            dtype=in_r.choice("dtype", ("float32",)),
            value_range=vr,  # type: ignore[arg-type]
            note=in_r.opt_str("note") or "",
        )
        exits_raw = r.array("exits")
        if len(exits_raw) != model.num_exits:
            raise BundleError(f"manifest.exits lists {len(exits_raw)} exits but model.num_exits is {model.num_exits}")
        exits = tuple(
            _read_exit(_Reader(e, f"manifest.exits[{i}]"), i, model.num_exits) for i, e in enumerate(exits_raw)
        )
        if exits[0].input_name != input_spec.name:
            raise BundleError(
                f"manifest.exits[0].input_name is {exits[0].input_name!r} but the input is named {input_spec.name!r}"
            )
        for k in range(1, len(exits)):
            if exits[k].input_name != exits[k - 1].feature_output:
                raise BundleError(
                    f"manifest.exits[{k}].input_name {exits[k].input_name!r} does not match "
                    f"exits[{k - 1}].feature_output {exits[k - 1].feature_output!r}"
                )
        full_r = r.sub("full_model")
        full_model = FileEntry(file=full_r.relpath("file"), sha256=full_r.sha("sha256"))
        pol_r = r.sub("policy")
        policy = PolicySpec(kind=pol_r.choice("kind", POLICIES), threshold=pol_r.number("threshold"))
        par_r = r.sub("parity")
        parity = ParityReport(
            max_abs_diff=par_r.float_list("max_abs_diff"),
            full_max_abs_diff=par_r.number("full_max_abs_diff"),
            batch_sizes=par_r.int_list("batch_sizes"),
            tolerance=par_r.number("tolerance"),
            samples=par_r.integer("samples", minimum=0),
            logit_scale=par_r.opt_float_list("logit_scale") or (),
        )
        extra = r.opt_mapping("extra_files") or {}
        extra_files: dict[str, str] = {}
        for rel, digest in extra.items():
            _check_relpath(rel, f"manifest.extra_files[{rel!r}]")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise BundleError(f"manifest.extra_files[{rel!r}] must be a lowercase hex sha256")
            extra_files[rel] = digest
        torch_programs = r.opt_mapping("torch_programs")
        if torch_programs is not None:
            tp = _Reader(torch_programs, "manifest.torch_programs")
            stages = tp.array("stages")
            for i, rel in enumerate(stages):
                if rel is not None and rel not in extra_files:
                    raise BundleError(f"manifest.torch_programs.stages[{i}] {rel!r} is not listed in extra_files")
            full_prog = torch_programs.get("full")
            if full_prog is not None and full_prog not in extra_files:
                raise BundleError(f"manifest.torch_programs.full {full_prog!r} is not listed in extra_files")
        engines = r.opt_mapping("engines") or {}
        for key, info in engines.items():
            er = _Reader(info, f"manifest.engines[{key!r}]")
            for i, rel in enumerate(er.array("stages")):
                if rel not in extra_files:
                    raise BundleError(f"manifest.engines[{key!r}].stages[{i}] {rel!r} is not listed in extra_files")
            er.integer("max_batch", minimum=1)
            full_plan = info.get("full")
            if full_plan is not None and full_plan not in extra_files:
                raise BundleError(f"manifest.engines[{key!r}].full {full_plan!r} is not listed in extra_files")
        return cls(
            format_version=version,
            provenance=r.opt_mapping("provenance") or {},
            model=model,
            dataset=dataset,
            input=input_spec,
            exits=exits,
            full_model=full_model,
            policy=policy,
            parity=parity,
            extra_files=extra_files,
            torch_programs=torch_programs,
            engines=engines,
        )

    def listed_files(self) -> dict[str, str]:
        """Every file the manifest vouches for, relpath -> sha256."""
        files = {e.stage_file: e.sha256 for e in self.exits}
        files[self.full_model.file] = self.full_model.sha256
        files.update(self.extra_files)
        return files


def _read_exit(r: _Reader, i: int, num_exits: int) -> ExitEntry:
    index = r.integer("index", minimum=0)
    if index != i:
        raise BundleError(f"{r.where}.index is {index}, expected {i} (exits must be listed in depth order)")
    last = i == num_exits - 1
    feature_output = r.opt_str("feature_output")
    if last and feature_output is not None:
        raise BundleError(f"{r.where}.feature_output must be null for the last exit")
    if not last and feature_output is None:
        raise BundleError(f"{r.where}.feature_output is missing (only the last exit has none)")
    fshape = r.opt_int_list("feature_shape")
    return ExitEntry(
        index=index,
        stage_file=r.relpath("stage_file"),
        sha256=r.sha("sha256"),
        input_name=r.text("input_name"),
        feature_output=feature_output,
        logits_output=r.text("logits_output"),
        cumulative_flops=r.integer("cumulative_flops", minimum=0),
        runtime_flops=r.integer("runtime_flops", minimum=0),
        feature_shape=fshape,
    )


def _check_relpath(rel: Any, where: str) -> str:
    # Manifest paths must stay inside the bundle: a tampered manifest must not make us read other files.
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{where} must be a non-empty relative path")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise BundleError(f"{where} {rel!r} must be a relative path inside the bundle")
    return rel


class _Reader:
    """Typed field access on a JSON object that reports the failing field's dotted path."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise BundleError(f"{where} must be a JSON object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise BundleError(f"{self.where}.{key} is missing")
        return self.data[key]

    def _fail(self, key: str, what: str, value: Any) -> BundleError:
        return BundleError(f"{self.where}.{key} must be {what}, got {value!r}"[:300])

    def sub(self, key: str) -> _Reader:
        return _Reader(self._get(key), f"{self.where}.{key}")

    def text(self, key: str) -> str:
        v = self._get(key)
        if not isinstance(v, str) or not v:
            raise self._fail(key, "a non-empty string", v)
        return v

    def opt_str(self, key: str) -> str | None:
        return None if self.data.get(key) is None else self.text(key)

    def choice(self, key: str, options: Sequence[str]) -> str:
        v = self._get(key)
        if v not in options:
            raise self._fail(key, f"one of {list(options)}", v)
        return v

    def integer(self, key: str, minimum: int | None = None) -> int:
        v = self._get(key)
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            raise self._fail(key, "an integer" + (f" >= {minimum}" if minimum is not None else ""), v)
        return v

    def number(self, key: str) -> float:
        v = self._get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self._fail(key, "a finite number", v)
        return float(v)

    def array(self, key: str) -> list[Any]:
        v = self._get(key)
        if not isinstance(v, list):
            raise self._fail(key, "a list", v)
        return v

    def int_list(self, key: str) -> tuple[int, ...]:
        v = self.array(key)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in v):
            raise self._fail(key, "a list of integers", v)
        return tuple(v)

    def opt_int_list(self, key: str) -> tuple[int, ...] | None:
        return None if self.data.get(key) is None else self.int_list(key)

    def float_list(self, key: str) -> tuple[float, ...]:
        v = self.array(key)
        if not all(isinstance(d, int | float) and not isinstance(d, bool) and math.isfinite(d) for d in v):
            raise self._fail(key, "a list of finite numbers", v)
        return tuple(float(d) for d in v)

    def opt_float_list(self, key: str) -> tuple[float, ...] | None:
        return None if self.data.get(key) is None else self.float_list(key)

    def opt_str_list(self, key: str) -> tuple[str, ...] | None:
        if self.data.get(key) is None:
            return None
        v = self.array(key)
        if not all(isinstance(s, str) for s in v):
            raise self._fail(key, "a list of strings", v)
        return tuple(v)

    def opt_mapping(self, key: str) -> Mapping[str, Any] | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, Mapping):
            raise self._fail(key, "a JSON object", v)
        return v

    def sha(self, key: str) -> str:
        v = self.text(key)
        if not _SHA256_RE.match(v):
            raise self._fail(key, "a lowercase hex sha256", v)
        return v

    def relpath(self, key: str) -> str:
        return _check_relpath(self._get(key), f"{self.where}.{key}")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: its directory and its manifest."""

    path: Path
    manifest: Manifest

    def file(self, relpath: str) -> Path:
        return self.path / relpath

    def stage_path(self, k: int) -> Path:
        return self.path / self.manifest.exits[k].stage_file

    @property
    def full_path(self) -> Path:
        return self.path / self.manifest.full_model.file

    @property
    def num_exits(self) -> int:
        return self.manifest.model.num_exits

    @property
    def num_classes(self) -> int:
        return self.manifest.model.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape (no batch axis)."""
        return self.manifest.input.sample_shape


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``<bundle>/manifest.json`` without checking the files it lists."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(
            f"bundle directory {root} does not exist; export one with `mexit export RUN_DIR --out {root}`"
        )
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST_NAME} is missing (partial copy or wrong directory?)")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc}); the bundle is damaged, re-export it") from exc
    return Manifest.from_dict(data)


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check that every listed file exists and has its recorded sha256."""
    for rel, digest in manifest.listed_files().items():
        fpath = root / rel
        if not fpath.is_file():
            raise BundleError(f"bundle {root} is partial: {rel} is missing; re-export or re-copy the bundle")
        actual = sha256_file(fpath)
        if actual != digest:
            raise BundleError(
                f"bundle {root} is tampered or partial: sha256 of {rel} is {actual[:12]}…, "
                f"manifest says {digest[:12]}…; re-export or re-copy the bundle"
            )


def load_bundle(path: str | os.PathLike[str] | Bundle, *, verify: bool = True) -> Bundle:
    """Load a bundle directory, refusing missing, unparsable, too-new, partial or tampered bundles.

    ``verify=False`` skips the sha256 pass (for tools that only read the manifest); runtimes keep it on.
    """
    if isinstance(path, Bundle):
        return path
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    return Bundle(path=root.resolve(), manifest=manifest)


# --------------------------------------------------------------------------------------------------
# Writing (used by mexit.export)
# --------------------------------------------------------------------------------------------------


def file_entry(root: Path, relpath: str) -> FileEntry:
    """A :class:`FileEntry` for a file already written under ``root``."""
    return FileEntry(file=relpath, sha256=sha256_file(root / relpath))


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Validate ``manifest`` by round-tripping it, check the files, then write ``manifest.json`` atomically."""
    data = manifest.to_dict()
    Manifest.from_dict(json.loads(json.dumps(data)))  # never write a manifest the reader would refuse
    verify_files(root, manifest)
    atomic_write_json(root / MANIFEST_NAME, data)
    os.chmod(root / MANIFEST_NAME, 0o666 & ~_umask())  # the atomic temp file is created 0600


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_target(out_dir: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Refuse an existing ``out_dir`` unless ``overwrite`` (checked early, before expensive work)."""
    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists; choose another --out or pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise BundleError(f"{target} exists and is not a directory; remove it or choose another --out")
    return target


@contextlib.contextmanager
def staged_bundle_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``out_dir`` to build a bundle in; publish it on success.

    On any exception the staging directory is deleted, so a failed or interrupted export never leaves a
    directory that :func:`load_bundle` accepts. An existing ``out_dir`` is replaced only with
    ``overwrite=True``: it is first renamed aside, then the new bundle renamed into place, then the old
    one deleted (a crash in between leaves the old bundle in a hidden ``.old`` sibling, never a mix).
    """
    target = check_target(out_dir, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; a published bundle gets normal permissions
    try:
        yield staging
        old: Path | None = None
        if target.exists():
            if not overwrite:
                raise BundleError(f"{target} appeared during the export; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except OSError:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def update_manifest(root: str | os.PathLike[str], **changes: Any) -> Manifest:
    """Replace top-level manifest fields of an existing, verified bundle (e.g. after building engines)."""
    bundle = load_bundle(root)
    manifest = dataclasses.replace(bundle.manifest, **changes)
    write_manifest(bundle.path, manifest)
    return manifest
