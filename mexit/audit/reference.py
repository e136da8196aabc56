"""Train a reference set: N models of the target's architecture, exits and recipe on random halves of a pool.

LiRA and RMIA (:mod:`mexit.attacks.mia.lira`, :mod:`mexit.attacks.mia.rmia`) need models that did and
did not train on each audited sample. :func:`train_references` draws the halves
(:func:`mexit.attacks.reference.half_splits`: complementary pairs, so each pooled sample is IN for half
of the models), trains every model and exports it as a bundle — the same bundle format the target is
served from, so the references' exits are real — and writes the manifest
(:class:`mexit.attacks.reference.ReferenceSet`) last.

* **Parallel**: each model is one task on the sweep executors (:func:`mexit.audit.executors.map_tasks`: a
  local process pool, or Ray), ``threads`` torch/BLAS threads each.
* **Resumable**: a model's directory gets ``done.json`` after its bundle is complete; a re-run trains
  only the models without one, so an interrupted set resumes where it stopped.
* **Cached by configuration**: the set's digest hashes the dataset, architecture, exits, recipe, pool,
  model count, seed, threshold and exporter; a directory holding a set of another digest is refused,
  and a complete set of the same digest is returned without work.

Only the audit layer trains (it may import everything); the attacks read the manifest and bundles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mexit._io import atomic_write_json
from mexit.attacks.reference import MANIFEST_FILE, ReferenceModel, ReferenceSet, half_splits
from mexit.errors import ConfigError, UserError

log = logging.getLogger(__name__)

DIGEST_FILE = "reference_digest.json"
RECIPE_KEYS = ("epochs", "lr", "batch_size", "optimizer", "weighting")


def recipe_of(train_config: Any) -> dict[str, Any]:
    """The training recipe of a :class:`mexit.train.runner.TrainConfig` (what references must share with it)."""
    return {"epochs": train_config.resolved_epochs, "lr": train_config.resolved_lr,
            "batch_size": train_config.batch_size, "optimizer": train_config.optimizer,
            "weighting": train_config.weighting}


def reference_seed(seed: int, r: int) -> int:
    """Torch seed of reference model ``r``: mixed from (seed, 2 + r), so it never equals a target/shadow init."""
    return int(np.random.SeedSequence([int(seed), 2 + int(r)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def train_one_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """One task: train reference model ``spec["name"]`` on ``spec["train_index"]`` and export its bundle.

    Top-level (picklable) for the process pool and Ray. Returns a row with ``status`` ``ok`` (or ``cached``
    when ``done.json`` of the same digest exists), or ``error`` with the one-line message of a user error.
    """
    out = Path(spec["out"])
    done = out / "done.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("digest") == spec["digest"]:
            return {**record, "status": "cached"}
    start = time.perf_counter()
    try:
        metrics = _train_and_export(spec, out)
    except UserError as exc:
        return {"name": spec["name"], "status": "error", "error": str(exc), "seconds": time.perf_counter() - start}
    record = {"name": spec["name"], "digest": spec["digest"], "metrics": metrics,
              "seconds": time.perf_counter() - start}
    atomic_write_json(done, record)
    return {**record, "status": "ok"}


def _train_and_export(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    from mexit.data import load_dataset
    from mexit.export import export_bundle
    from mexit.train.runner import seed_everything
    from mexit.train.trainer import (
        exit_accuracies,
        exit_probabilities,
        exit_weights,
        recalibrate_batchnorm,
        train_epoch,
    )
    from mexit.train.zoo import build_model

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    ds = load_dataset(spec["dataset"], spec.get("data_root"))
    train_idx = np.asarray(spec["train_index"], dtype=np.int64)
    held_idx = np.setdiff1d(np.asarray(spec["pool"], dtype=np.int64), train_idx)
    seed_everything(int(spec["torch_seed"]))
    model = build_model(spec["arch"], exits=int(spec["exits"]), input_shape=ds.input_shape,
                        num_classes=ds.num_classes, normalization=ds.normalization)
    r = spec["recipe"]
    if r["optimizer"] == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=r["lr"])
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=0.9, weight_decay=1e-4)
    device = torch.device("cpu")
    x, y = ds.x[train_idx], ds.y[train_idx]
    epochs = int(r["epochs"])
    for epoch in range(1, epochs + 1):
        train_epoch(model, optimizer, x, y, batch_size=int(r["batch_size"]),
                    weights=exit_weights(model.num_exits, r["weighting"], epoch, epochs),
                    generator=np.random.default_rng([int(spec["torch_seed"]) % 2**32, epoch]), device=device)
    recalibrate_batchnorm(model, x)
    probe = np.random.default_rng(0)
    tr = probe.choice(train_idx, min(len(train_idx), 2000), replace=False)
    ho = probe.choice(held_idx, min(len(held_idx), 2000), replace=False) if len(held_idx) else held_idx
    final = model.num_exits - 1
    metrics = {"final_exit_train_accuracy": exit_accuracies(exit_probabilities(model, ds.inputs(tr)), ds.y[tr])[final]}
    if len(ho):
        metrics["final_exit_heldout_accuracy"] = exit_accuracies(exit_probabilities(model, ds.inputs(ho)),
                                                                 ds.y[ho])[final]
    export_bundle(model, out / "bundle", sample_inputs=ds.inputs(train_idx[:64]), threshold=float(spec["threshold"]),
                  dataset_name=ds.name, dataset_kind=ds.kind, class_names=ds.class_names,
                  exporter=spec["exporter"], save_torch_programs=False, overwrite=True,
                  provenance_extra={"audit_role": "reference", "reference": spec["name"]})
    return metrics


def train_references(*, dataset: str, arch: str, exits: int, pool: np.ndarray, n_models: int,
                     out_dir: str | Path, threshold: float, recipe: dict[str, Any], seed: int = 0,
                     data_root: str | Path | None = None, executor: Literal["local", "ray"] = "local",
                     workers: int = 1, threads: int = 1, address: str | None = None, exporter: str = "auto",
                     progress: bool = False) -> ReferenceSet:
    """Train (or resume, or reuse) ``n_models`` reference models into ``out_dir``; return the manifest.

    ``pool``: dataset indices the random halves are drawn from (include the audited query samples, so each
    is IN for about half of the models). ``recipe``: ``epochs, lr, batch_size, optimizer, weighting`` of the
    target (:func:`recipe_of`); ``threshold``: the target's deployed exit threshold, so the references exit
    the way the target does. ``workers`` models train at once on ``executor``.
    """
    missing = [k for k in RECIPE_KEYS if k not in recipe]
    if missing:
        raise ConfigError(f"the reference recipe lacks {', '.join(missing)}; pass recipe_of(target_train_config)")
    if n_models < 1:
        raise ConfigError(f"reference_models must be >= 1, got {n_models}")
    pool = np.unique(np.asarray(pool, dtype=np.int64))
    if len(pool) < 4:
        raise ConfigError(f"the reference pool needs at least 4 samples, got {len(pool)}")
    out = Path(out_dir).resolve()
    recipe = {k: recipe[k] for k in RECIPE_KEYS}
    identity = {"dataset": dataset, "arch": arch, "exits": int(exits), "recipe": recipe, "n_models": int(n_models),
                "seed": int(seed), "threshold": float(threshold), "exporter": exporter,
                "pool": hashlib.sha256(pool.tobytes()).hexdigest()}
    digest = _digest(identity)
    digest_path = out / DIGEST_FILE
    if digest_path.exists():
        if json.loads(digest_path.read_text()).get("digest") != digest:
            raise UserError(f"{out} holds a reference set of another configuration; choose another directory or "
                            "delete it")
        if (out / MANIFEST_FILE).exists():
            return ReferenceSet.load(out)
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a reference-set directory; choose another directory")
    atomic_write_json(digest_path, {"digest": digest, "identity": identity})

    halves = half_splits(pool, n_models, seed)
    specs = [{"name": f"ref-{r:03d}", "out": str(out / f"ref-{r:03d}"), "digest": digest, "dataset": dataset,
              "data_root": None if data_root is None else str(data_root), "arch": arch, "exits": int(exits),
              "recipe": recipe, "train_index": halves[r].tolist(), "pool": pool.tolist(),
              "torch_seed": reference_seed(seed, r), "threshold": float(threshold), "exporter": exporter,
              "threads": threads} for r in range(n_models)]
    from mexit.audit.executors import map_tasks

    start = time.perf_counter()
    rows = map_tasks(train_one_reference, [(s,) for s in specs], executor=executor, workers=workers,
                     threads=threads, address=address, progress=progress)
    failed = [(s["name"], row) for s, row in zip(specs, rows, strict=True) if row.get("status") not in ("ok", "cached")]
    if failed:
        name, row = failed[0]
        raise UserError(f"{len(failed)} of {n_models} reference models failed (first, {name}: {row.get('error')}); "
                        f"fix it and re-run: the {n_models - len(failed)} finished models are kept")
    log.info("reference set: %d models in %.1f s (%s, %d workers)", n_models, time.perf_counter() - start, executor,
             workers)
    from mexit.runtime import load_bundle

    manifest = load_bundle(out / "ref-000" / "bundle").manifest
    refs = ReferenceSet(dataset=dataset, arch=arch, num_exits=int(exits), num_classes=manifest.model.num_classes,
                        pool=tuple(int(i) for i in pool), recipe=recipe, recipe_digest=digest,
                        models=tuple(ReferenceModel(name=s["name"], bundle=f"{s['name']}/bundle",
                                                    train_index=tuple(s["train_index"]), seed=s["torch_seed"],
                                                    metrics={**row.get("metrics", {}), "seconds": row.get("seconds")})
                                     for s, row in zip(specs, rows, strict=True)),
                        root=out)
    refs.save(out)
    return refs
