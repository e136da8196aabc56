"""A training *run*: config → data split → joint training → per-exit metrics → threshold, in one directory.

Layout of ``RUN_DIR``::

    config.json      the validated TrainConfig, its hash, seed and provenance (written first)
    splits.npz       the six disjoint index sets every later stage uses
    checkpoint.pt    model + optimiser + epoch, rewritten atomically after an epoch once ``checkpoint_every_s``
                     (default 30 s) have passed since the last one (resume point; an interruption loses at
                     most that much training). Writing it costs ~0.3 s per 80 MB, which dominated short runs.
                     Deleted once the run is complete: a finished run is never resumed, and the optimiser
                     state makes it 3x the size of the model.
    model.pt         final weights (written when training completes)
    metrics.json     per-exit accuracies, FLOPs, the whole τ curve and the chosen τ (with its rule), the deployed
                     model's accuracy on members/non-members per τ, the init seed, timings (written last = complete)

Re-running with the same options resumes from ``checkpoint.pt`` or, when ``metrics.json`` exists,
returns at once. A different config in an existing run directory is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm.auto import tqdm

from mexit._io import atomic_path, atomic_write_json, provenance
from mexit.data import Dataset, Splits, dataset_names, load_dataset, make_splits
from mexit.data.splits import ROLE_PARTS, class_skewed, label_shift
from mexit.errors import ConfigError, UserError
from mexit.train.multiexit import MAX_EXITS, MultiExitNet
from mexit.train.threshold import TAU_RULES, ThresholdSearch, choose_threshold, deployed_accuracy, search_threshold
from mexit.train.threshold import vanilla_accuracy as read_vanilla_accuracy
from mexit.train.trainer import (
    exit_accuracies,
    exit_probabilities,
    exit_weights,
    recalibrate_batchnorm,
    train_epoch,
)
from mexit.train.zoo import ARCHITECTURES, build_model

log = logging.getLogger(__name__)

RUN_FORMAT = 1
DEFAULT_EPOCHS = 100  # the paper trains every model for 100 epochs


class TrainConfig(BaseModel):
    """Everything that determines a trained model. Field ranges are checked on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    data_root: Path | None = None
    arch: str
    exits: int = Field(6, ge=1, le=MAX_EXITS)
    epochs: int | None = Field(None, ge=1, le=10_000)
    lr: float | None = Field(None, gt=0, le=10)
    batch_size: int = Field(128, ge=2, le=65_536)
    optimizer: Literal["adam", "sgd"] = "adam"
    weighting: Literal["sum", "sdn"] = "sum"
    seed: int = Field(0, ge=0)
    role: Literal["target", "shadow"] = "target"
    limit: int | None = Field(None, ge=8)
    # "class-skewed": train (and query) on a subset of the role's parts with a skewed class prior, a shadow whose data
    # are distributed differently from the target's (adversary 3 with other data, paper Fig. 18).
    subset: Literal["all", "class-skewed"] = "all"
    tolerance: float = Field(0.01, ge=0, le=1)
    threads: int | None = Field(None, ge=1, le=512)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in dataset_names():
            raise ValueError(f"unknown dataset {v!r}; choose one of {', '.join(dataset_names())}")
        return v

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {v!r}; choose one of {', '.join(ARCHITECTURES)}")
        return v

    @property
    def resolved_epochs(self) -> int:
        return self.epochs or DEFAULT_EPOCHS

    @property
    def resolved_lr(self) -> float:
        return self.lr or (1e-3 if self.optimizer == "adam" else 0.1)

    def identity(self) -> dict[str, Any]:
        """The fields that define the result (threads and data location do not)."""
        data = self.model_dump(mode="json", exclude={"threads", "data_root"})
        if data["subset"] == "all":  # runs from before the option keep their identity
            del data["subset"]
        data["epochs"], data["lr"] = self.resolved_epochs, self.resolved_lr
        return data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def make_config(**kwargs: Any) -> TrainConfig:
    """Build a TrainConfig, turning pydantic's validation errors into one actionable line."""
    try:
        return TrainConfig(**kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "config"
        raise ConfigError(f"invalid {field}: {err['msg'].removeprefix('Value error, ')}") from None


ROLE_CODES = {"target": 0, "shadow": 1}


def role_seed(seed: int, role: str) -> int:
    """The torch seed of one role's model, derived from ``(seed, role)``.

    The split is seeded by ``seed`` alone, so a target and a shadow trained with the same ``seed`` get the
    six disjoint parts of one partition; their *initial weights* must still differ, or the shadow starts
    where the target started and attacks transfer more easily than they would for a real attacker (issue
    11). ``SeedSequence`` mixes both numbers so that no two (seed, role) pairs collide.
    """
    if role not in ROLE_CODES:
        raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLE_CODES)}")
    return int(np.random.SeedSequence([int(seed), ROLE_CODES[role]]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) for weight init and dropout; numpy generators are passed explicitly."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


OTHER_ROLE = {"target": "shadow", "shadow": "target"}


def _role_indices(splits: Splits, role: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, test, val)`` indices of one role's parts."""
    train, val, test = (getattr(splits, part) for part in ROLE_PARTS[role])
    return train, test, val


def _prepare_run_dir(out_dir: Path, config: TrainConfig) -> None:
    cfg_path = out_dir / "config.json"
    if cfg_path.exists():
        try:
            existing = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{cfg_path} is unreadable; delete {out_dir} or choose another --out") from None
        if existing.get("run_format") != RUN_FORMAT:
            raise UserError(
                f"{out_dir} was written by an incompatible mexit (run format {existing.get('run_format')}, "
                f"this is {RUN_FORMAT}); choose another --out"
            )
        if existing.get("digest") != config.digest():
            raise UserError(
                f"{out_dir} already holds a run with a different configuration; choose another --out or delete it"
            )
        return
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not a mexit run directory; choose another --out")
    atomic_write_json(
        cfg_path,
        {
            "run_format": RUN_FORMAT,
            "digest": config.digest(),
            "config": config.model_dump(mode="json"),
            "identity": config.identity(),
            "provenance": provenance(),
        },
    )


def _load_or_make_splits(path: Path, dataset: Dataset, config: TrainConfig) -> Splits:
    if path.exists():
        return Splits.load(path)
    splits = make_splits(dataset.y, seed=config.seed, max_per_split=config.limit)
    if config.subset == "class-skewed":
        full, splits = splits, class_skewed(splits, dataset.y, config.role)
        mine, was = _role_indices(splits, config.role)[0], _role_indices(full, config.role)[0]
        other = OTHER_ROLE[config.role]
        theirs = _role_indices(full, other)[0]
        log.info("class-skewed %s data: %d of %d training samples; label shift vs the %s's (total variation) "
                 "%.3f, was %.3f", config.role, len(mine), len(was), other, label_shift(dataset.y, mine, theirs),
                 label_shift(dataset.y, was, theirs))
    splits.save(path)
    return splits


CHECKPOINT_EVERY_S = 30.0


def _build(config: TrainConfig, dataset: Dataset) -> MultiExitNet:
    """The freshly initialised model of ``config`` (one place, so training and reloading build the same net)."""
    return build_model(
        config.arch,
        exits=config.exits,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        normalization=dataset.normalization,
    )


def resolve_tau_rule(config: TrainConfig, tau_rule: str | None,
                     vanilla_run: str | Path | None) -> tuple[str, float | None]:
    """The τ rule to apply and the vanilla accuracy it needs, checked before any training starts.

    ``tau_rule=None`` means the paper's rule when a vanilla run is given, else the final-exit rule. Asking
    for the vanilla rule without a vanilla run is a one-line ConfigError (a 1-exit model needs no τ: any rule).
    """
    rule = tau_rule or ("vanilla" if vanilla_run is not None else "final-exit")
    if rule not in TAU_RULES:
        raise ConfigError(f"unknown threshold rule {rule!r}; use one of {', '.join(TAU_RULES)}")
    if vanilla_run is None:
        if rule == "vanilla" and config.exits > 1:
            raise ConfigError("--tau-rule vanilla needs the vanilla model: pass --vanilla-run DIR of a finished "
                              "1-exit run of the same arch and dataset, or use --tau-rule final-exit")
        return rule, None
    return rule, read_vanilla_accuracy(vanilla_run, arch=config.arch, dataset=config.dataset)


def rechoose_threshold(run_dir: str | Path, *, rule: str, vanilla_accuracy: float | None = None,
                       tolerance: float | None = None) -> dict[str, Any]:
    """Re-pick a finished run's τ from its recorded τ curve by ``rule``; rewrite ``metrics.json``; return it.

    The curve and the per-τ deployed accuracies are recorded at training time, so no model is needed.
    """
    path = Path(run_dir) / "metrics.json"
    metrics = json.loads(path.read_text())
    old = ThresholdSearch.from_dict(metrics["threshold"])
    new = choose_threshold(old.curve, rule=rule, final_accuracy=float(metrics["final_exit"]["val_accuracy"]),
                           vanilla_accuracy=vanilla_accuracy, tolerance=old.tolerance if tolerance is None
                           else tolerance)
    metrics["threshold"] = new.to_dict()
    metrics["deployed"] = _deployed_at(metrics.get("deployed_curve", []), new.tau)
    atomic_write_json(path, metrics)
    return metrics


def _deployed_at(deployed_curve: list[dict[str, Any]], tau: float) -> dict[str, Any] | None:
    return next((dict(row) for row in deployed_curve if abs(row["tau"] - tau) < 1e-9), None)


def train_run(config: TrainConfig, out_dir: str | Path, *, progress: bool = True,
              checkpoint_every_s: float = CHECKPOINT_EVERY_S, tau_rule: str | None = None,
              vanilla_run: str | Path | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse) the run described by ``config`` in ``out_dir``; return its metrics.

    ``checkpoint_every_s``: the least time between two checkpoints (0: after every epoch). The last epoch is
    never checkpointed: the final weights follow at once. ``tau_rule``/``vanilla_run``: how the early-exit
    threshold is picked (:func:`resolve_tau_rule`); a finished run asked for another rule has its τ re-picked
    from its recorded curve.
    """
    out_dir = Path(out_dir)
    rule, vanilla_acc = resolve_tau_rule(config, tau_rule, vanilla_run)
    dataset = load_dataset(config.dataset, config.data_root)  # fails before anything is written
    _prepare_run_dir(out_dir, config)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        log.info("run in %s is complete; reusing it", out_dir)
        metrics = json.loads(metrics_path.read_text())
        recorded = metrics["threshold"]
        if recorded.get("rule", "final-exit") != rule or recorded.get("vanilla_accuracy") != vanilla_acc:
            metrics = rechoose_threshold(out_dir, rule=rule, vanilla_accuracy=vanilla_acc)
        return metrics

    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = _load_or_make_splits(out_dir / "splits.npz", dataset, config)
    train_idx, test_idx, val_idx = _role_indices(splits, config.role)

    init_seed = role_seed(config.seed, config.role)
    seed_everything(init_seed)
    model = _build(config, dataset).to(device)
    params = model.parameters()
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.resolved_lr)
    else:
        optimizer = torch.optim.SGD(params, lr=config.resolved_lr, momentum=0.9, weight_decay=1e-4)

    ckpt_path = out_dir / "checkpoint.pt"
    start_epoch, history = 1, []
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
        except Exception as exc:  # a checkpoint is only ever replaced atomically, so this is real damage
            raise UserError(f"{ckpt_path} is unreadable ({exc}); delete it to restart training") from None
        start_epoch, history = state["epoch"] + 1, state["history"]
        log.info("resuming %s from epoch %d", out_dir, start_epoch)

    x_train, y_train = dataset.x[train_idx], dataset.y[train_idx]
    epochs = config.resolved_epochs
    bar = tqdm(total=epochs, initial=start_epoch - 1, desc=f"train {config.arch}", unit="epoch",
               disable=not progress or None)
    t0 = time.perf_counter()
    last_saved = t0
    for epoch in range(start_epoch, epochs + 1):
        loss = train_epoch(
            model,
            optimizer,
            x_train,
            y_train,
            batch_size=config.batch_size,
            weights=exit_weights(model.num_exits, config.weighting, epoch, epochs),
            generator=np.random.default_rng([config.seed, ROLE_CODES[config.role], epoch]),
            device=device,
        )
        history.append({"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - t0})
        if epoch < epochs and time.perf_counter() - last_saved >= checkpoint_every_s:
            _save_checkpoint(ckpt_path, model, optimizer, epoch, history)
            last_saved = time.perf_counter()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    recalibrate_batchnorm(model, x_train)

    metrics = evaluate_run(model, dataset, train_idx, test_idx, val_idx, config, tau_rule=rule,
                           vanilla_accuracy=vanilla_acc)
    metrics["history"] = history
    metrics["init_seed"] = init_seed
    # how far this role's class prior is from the other role's (total variation; ~0 for the stratified parts)
    other_train = _role_indices(splits, OTHER_ROLE[config.role])[0]
    metrics["data"] = {"subset": config.subset, "label_shift": label_shift(dataset.y, train_idx, other_train)}
    metrics["provenance"] = provenance(seed=config.seed, config=config.identity())
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save({"model": model.state_dict(), "config": config.model_dump(mode="json")}, tmp)
    atomic_write_json(metrics_path, metrics)
    ckpt_path.unlink(missing_ok=True)
    return metrics


def _save_checkpoint(path: Path, model: MultiExitNet, optimizer: torch.optim.Optimizer, epoch: int,
                     history: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
                "torch_rng": torch.get_rng_state(),
            },
            tmp,
        )


def evaluate_run(
    model: MultiExitNet,
    dataset: Dataset,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    *,
    tau_rule: str = "final-exit",
    vanilla_accuracy: float | None = None,
) -> dict[str, Any]:
    """Per-exit train/test/validation accuracy, FLOPs per exit, the τ curve and the chosen τ.

    ``deployed_curve`` holds, for every candidate τ, the accuracy of the early-exit model as deployed on the
    members (train) and non-members (test) — not the final exit's, which most members never reach — so the
    deployed accuracy at any later choice of τ is a lookup (``deployed`` is the row of the chosen τ).
    """
    split_probs = {
        name: exit_probabilities(model, dataset.x[idx])
        for name, idx in (("train", train_idx), ("test", test_idx), ("val", val_idx))
    }
    acc = {name: exit_accuracies(p, dataset.y[idx]) for (name, p), idx in
           zip(split_probs.items(), (train_idx, test_idx, val_idx), strict=True)}
    costs, runtime_costs = model.costs(), model.runtime_costs()
    search = search_threshold(split_probs["val"], dataset.y[val_idx], runtime_costs, tolerance=config.tolerance,
                              rule=tau_rule, vanilla_accuracy=vanilla_accuracy)
    deployed_curve = []
    for point in search.curve:
        tr = deployed_accuracy(split_probs["train"], dataset.y[train_idx], point.tau)
        te = deployed_accuracy(split_probs["test"], dataset.y[test_idx], point.tau)
        deployed_curve.append({"tau": point.tau, "train_accuracy": tr["accuracy"], "test_accuracy": te["accuracy"],
                               "train_exit_shares": tr["exit_shares"], "test_exit_shares": te["exit_shares"]})
    return {
        "run_format": RUN_FORMAT,
        "dataset": config.dataset,
        "arch": config.arch,
        "exits": model.num_exits,
        "exit_blocks": model.exit_blocks,
        "split_sizes": {"train": len(train_idx), "test": len(test_idx), "val": len(val_idx)},
        "per_exit": [
            {
                "exit": k,
                "train_accuracy": acc["train"][k],
                "test_accuracy": acc["test"][k],
                "val_accuracy": acc["val"][k],
                "flops": costs[k],
                "runtime_flops": runtime_costs[k],
                "flops_fraction": costs[k] / costs[-1],
            }
            for k in range(model.num_exits)
        ],
        "final_exit": {
            "train_accuracy": acc["train"][-1],
            "test_accuracy": acc["test"][-1],
            "val_accuracy": acc["val"][-1],
        },
        "threshold": search.to_dict(),
        "deployed_curve": deployed_curve,
        "deployed": _deployed_at(deployed_curve, search.tau),
    }


@dataclass
class LoadedRun:
    """A completed run, reloaded from its directory alone (no training code state needed)."""

    path: Path
    config: TrainConfig
    model: MultiExitNet
    dataset: Dataset
    splits: Splits
    metrics: dict[str, Any]

    @property
    def threshold(self) -> float:
        return float(self.metrics["threshold"]["tau"])


def load_run(run_dir: str | Path, *, data_root: str | Path | None = None) -> LoadedRun:
    """Reload a completed run: its config, data split, dataset and trained model (eval mode, CPU)."""
    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.json", "model.pt", "splits.npz"):
        if not (run_dir / name).exists():
            hint = "re-run mexit train with the same options to finish it" if (run_dir / "config.json").exists() \
                else "pass the --out directory of a finished mexit train"
            raise UserError(f"{run_dir} is not a complete training run (no {name}); {hint}")
    record = json.loads((run_dir / "config.json").read_text())
    if record.get("run_format") != RUN_FORMAT:
        raise UserError(f"{run_dir} was written by an incompatible mexit (run format {record.get('run_format')})")
    raw = dict(record["config"])
    if data_root is not None:
        raw["data_root"] = str(data_root)
    config = make_config(**raw)
    dataset = load_dataset(config.dataset, config.data_root)
    model = _build(config, dataset)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    model.eval()
    return LoadedRun(run_dir, config, model, dataset, Splits.load(run_dir / "splits.npz"),
                     json.loads((run_dir / "metrics.json").read_text()))
