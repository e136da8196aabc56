"""The seeded, class-stratified partition of a dataset into the paper's disjoint parts, plus owner-side validation.

The paper trains a target model on ``target_train`` (members) and evaluates the attack against
``target_test`` (non-members); the attacker's shadow model mirrors this on ``shadow_train`` /
``shadow_test``. Those four parts are disjoint and equally large. Before them, ``val_fraction`` of the
data is set aside and halved into ``target_val`` and ``shadow_val``: the data each model owner uses to
pick its early-exit threshold, so that the samples the attacks are scored on never influence the model.

How the partition is made (exact sizes, stratified, and graceful for classes with a handful of samples,
which scikit-learn's ``StratifiedShuffleSplit`` refuses): all samples are put in one random order grouped
by class (random class order, random order within a class). A part that takes every k-th position of
that order, or evenly spaced positions, therefore takes each class in proportion to its size, to within
one sample, and the part sizes are exact. A class with fewer samples than parts simply lands in fewer
parts. Each part is finally shuffled, so any prefix of it is a random sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mexit._io import load_npz, save_npz
from mexit.errors import ConfigError, DataError

PARTS = ("target_train", "target_val", "target_test", "shadow_train", "shadow_val", "shadow_test")
MAIN_PARTS = ("target_train", "target_test", "shadow_train", "shadow_test")
MIN_VAL_PER_SPLIT = 50
FORMAT = "mexit.splits/2"  # 2: seed and sizes in the JSON header (mexit._io.save_npz)


@dataclass(frozen=True, eq=False)
class Splits:
    """Six disjoint int64 index arrays into one :class:`~mexit.data.Dataset`, and the seed that made them."""

    target_train: np.ndarray
    target_val: np.ndarray
    target_test: np.ndarray
    shadow_train: np.ndarray
    shadow_val: np.ndarray
    shadow_test: np.ndarray
    seed: int

    def __post_init__(self) -> None:
        for name in PARTS:
            arr = np.array(getattr(self, name), dtype=np.int64).reshape(-1)
            arr.flags.writeable = False  # frozen means frozen: a stage must not edit another's split
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "seed", int(self.seed))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Splits):
            return NotImplemented
        return self.seed == other.seed and all(
            np.array_equal(getattr(self, n), getattr(other, n)) for n in PARTS)

    __hash__ = None  # type: ignore[assignment]

    def sizes(self) -> dict[str, int]:
        """Number of samples in each part."""
        return {name: len(getattr(self, name)) for name in PARTS}

    def as_dict(self) -> dict[str, np.ndarray]:
        """The six index arrays by name."""
        return {name: getattr(self, name) for name in PARTS}

    def check_fits(self, num_samples: int) -> None:
        """DataError unless every index is valid for a dataset of ``num_samples`` (e.g. splits of another dataset)."""
        top = max((int(a.max()) for a in self.as_dict().values() if len(a)), default=-1)
        if top >= num_samples:
            raise DataError(f"these splits index sample {top} but the dataset has only {num_samples}; they were "
                            "made for another dataset: delete the splits file to make new ones")

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` (the six arrays; seed, sizes and format tag in its header) atomically."""
        save_npz(path, self.as_dict(), {"format": FORMAT, "seed": int(self.seed), "sizes": self.sizes()})

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        """Read splits written by :meth:`save`; DataError if the file is missing, damaged or inconsistent."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"splits file {path} does not exist; run the training stage again to create it")
        try:
            header, arrays = load_npz(path, PARTS)
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
            if set(arrays) != set(PARTS):
                raise ValueError(f"missing parts {sorted(set(PARTS) - set(arrays))}")
            seed = int(header["seed"])
            sizes = dict(header["sizes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read splits file {path} ({type(exc).__name__}: {exc}); it is damaged or not a "
                            "mexit splits file: delete it to make new splits") from None
        for name, arr in arrays.items():
            if arr.ndim != 1 or arr.dtype.kind not in "iu" or sizes.get(name) != len(arr):
                raise DataError(f"splits file {path}: part {name} is damaged ({arr.dtype} {arr.shape}, recorded "
                                f"size {sizes.get(name)}); delete it to make new splits")
        splits = cls(**arrays, seed=seed)
        everything = np.concatenate(list(splits.as_dict().values()))
        if len(np.unique(everything)) != len(everything) or (len(everything) and everything.min() < 0):
            raise DataError(f"splits file {path}: parts overlap or hold negative indices; delete it to make new "
                            "splits")
        return splits


ROLE_PARTS = {"target": ("target_train", "target_val", "target_test"),
              "shadow": ("shadow_train", "shadow_val", "shadow_test")}


SKEW_KEEP = 0.25  # share of each down-weighted class a class-skewed part keeps


def class_skewed(splits: Splits, labels: np.ndarray, role: str) -> Splits:
    """``splits`` with ``role``'s three parts resampled to a skewed class prior.

    Adversary 3 of the paper (Sec. 4.3, Fig. 18) trains its shadow on data *distributed differently* from the
    target's. With one dataset, the honest way to get that is a label shift: half of the classes (drawn with the
    partition's seed) keep all their samples in the role's parts, the other half keep a quarter (at least one),
    so the shadow's class prior moves by a total-variation distance of about 0.3 from the target's stratified
    one (:func:`label_shift` measures it). A class-*balanced* cap would move Location's prior by only ~0.07-0.10:
    its classes are nearly balanced already. The other role's parts are untouched and the result is a subset of
    the partition, so :func:`check_disjoint` still holds; the same partition always gives the same subset.
    """
    if role not in ROLE_PARTS:
        raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLE_PARTS)}")
    labels = np.asarray(labels)
    rng = np.random.default_rng([splits.seed, 0x5CE])
    classes = np.unique(labels)
    light = set(rng.permutation(classes)[: len(classes) // 2].tolist())
    parts = splits.as_dict()
    for name in ROLE_PARTS[role]:
        idx = parts[name]
        keep = []
        for c in np.unique(labels[idx]):
            members = rng.permutation(idx[labels[idx] == c])
            keep.append(members[: max(1, int(np.ceil(SKEW_KEEP * len(members))))] if c in light else members)
        if keep:
            parts[name] = rng.permutation(np.concatenate(keep))
    return Splits(**parts, seed=splits.seed)


def label_shift(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance between the class distributions of index sets ``a`` and ``b`` (0: same prior)."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if len(labels) else 0
    pa = np.bincount(labels[a], minlength=k) / max(len(a), 1)
    pb = np.bincount(labels[b], minlength=k) / max(len(b), 1)
    return float(0.5 * np.abs(pa - pb).sum())


def make_splits(
    labels: np.ndarray, *, seed: int, val_fraction: float = 0.1, max_per_split: int | None = None
) -> Splits:
    """Partition ``range(len(labels))`` into the six disjoint, class-stratified parts of :class:`Splits`.

    ``val_fraction`` of the samples (rounded to an even number) become ``target_val`` and ``shadow_val``
    (half each); the rest are dealt into four parts whose sizes differ by at most one. ``max_per_split``
    caps each of the four main parts, and each validation part at ``max(max_per_split // 4, 50)``, by an
    evenly spread (still stratified) subsample: for quick runs. Same labels and seed, same splits.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or (len(y) and y.dtype.kind not in "iub"):
        raise ConfigError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_per_split is not None and max_per_split < 1:
        raise ConfigError(f"max_per_split must be a positive number of samples, got {max_per_split}")
    n = len(y)
    n_val = 2 * round(n * val_fraction / 2)
    if n - n_val < len(MAIN_PARTS):
        raise ConfigError(f"cannot split {n} samples into {len(MAIN_PARTS)} non-empty parts plus validation "
                          f"({val_fraction:.0%}); use a larger dataset")

    rng = np.random.default_rng(seed)
    order = _class_grouped_order(y, rng)
    val_pos = _spread(n, n_val, rng)
    in_val = np.zeros(n, dtype=bool)
    in_val[val_pos] = True
    val, rest = order[val_pos], order[~in_val]
    deal = (np.arange(len(rest)) + rng.integers(len(MAIN_PARTS))) % len(MAIN_PARTS)
    parts = {name: rest[deal == k] for k, name in enumerate(MAIN_PARTS)}
    parts["target_val"], parts["shadow_val"] = val[0::2], val[1::2]

    if max_per_split is not None:
        val_cap = max(max_per_split // 4, MIN_VAL_PER_SPLIT)
        for name, part in parts.items():
            cap = val_cap if name.endswith("_val") else max_per_split
            if len(part) > cap:
                parts[name] = part[_spread(len(part), cap, rng)]
    return Splits(**{name: rng.permutation(parts[name]) for name in PARTS}, seed=seed)


def _class_grouped_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All indices in random order, grouped by class, the classes themselves in random order."""
    perm = rng.permutation(len(y))
    _, inverse = np.unique(y, return_inverse=True)
    class_rank = rng.permutation(inverse.max() + 1 if len(y) else 0)
    return perm[np.argsort(class_rank[inverse[perm]], kind="stable")]


def _spread(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct, evenly spaced positions in ``range(n)`` with a random phase (systematic sampling)."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    return np.floor((np.arange(k) + rng.random()) * (n / k)).astype(np.int64)



def check_disjoint(target: Splits, shadow: Splits, *, target_role: str = "target", shadow_role: str = "shadow",
                   what: str = "target and shadow runs") -> None:
    """ConfigError naming the overlap unless the target's and the shadow's data are disjoint.

    Separately trained runs attacked together (a target and the adversary's shadow) must not share samples:
    the shadow's members would be the target's members or non-members, and the attack would be calibrated on
    the data it is scored on. Runs made with the same seed share one partition and pass; runs made with
    different seeds (or different ``--limit``) generally overlap and are refused. ``*_role`` says which half of
    each run's splits that run used (a run trained with ``--role shadow`` used the ``shadow_*`` parts).
    """
    def used(s: Splits, role: str) -> dict[str, np.ndarray]:
        if role not in ("target", "shadow"):
            raise ConfigError(f"role must be 'target' or 'shadow', got {role!r}")
        return {f"{role}_{p}": getattr(s, f"{role}_{p}") for p in ("train", "val", "test")}

    for t_name, t_idx in used(target, target_role).items():
        for s_name, s_idx in used(shadow, shadow_role).items():
            common = np.intersect1d(t_idx, s_idx)
            if len(common):
                raise ConfigError(
                    f"{what} overlap: {len(common)} samples of the target's {t_name} (split seed {target.seed}) are "
                    f"in the shadow's {s_name} (split seed {shadow.seed}), e.g. index {int(common[0])}; train both "
                    "with the same --seed and --limit so their splits come from one partition")
