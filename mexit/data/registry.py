"""The dataset registry: names users type, what each dataset needs, and :func:`load_dataset`.

Nothing is ever downloaded: a dataset that needs files reads them from ``root`` (``--data-root``) and
a missing file is an error that names the expected files and where to get them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mexit.data._files import CIFAR_URL, PRIVACYTRUSTLAB_URL, TINYIMAGENET_URL
from mexit.data.cifar import load_cifar10, load_cifar100
from mexit.data.dataset import Dataset, DatasetSpec
from mexit.data.digits import load_digits
from mexit.data.tabular import (
    LOCATION_CLASSES,
    LOCATION_FEATURES,
    PURCHASE_CLASSES,
    PURCHASE_FEATURES,
    TEXAS_CLASSES,
    TEXAS_FEATURES,
    load_location,
    load_purchase,
    load_texas,
)
from mexit.data.tinyimagenet import load_tinyimagenet
from mexit.errors import ConfigError

log = logging.getLogger(__name__)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="cifar10", kind="image", input_shape=(3, 32, 32), num_classes=10,
            description="CIFAR-10: 60,000 32x32 colour images of 10 object classes",
            files="cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta (CIFAR-10 python version)",
            source=CIFAR_URL, loader=load_cifar10,
        ),
        DatasetSpec(
            name="cifar100", kind="image", input_shape=(3, 32, 32), num_classes=100,
            description="CIFAR-100: 60,000 32x32 colour images of 100 fine classes",
            files="cifar-100-python/: train, test, meta (CIFAR-100 python version)",
            source=CIFAR_URL, loader=load_cifar100,
        ),
        DatasetSpec(
            name="tinyimagenet", kind="image", input_shape=(3, 64, 64), num_classes=200,
            description="TinyImageNet-200: 110,000 labelled 64x64 colour images of 200 classes (train + val)",
            files="tiny-imagenet-200/: wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt, "
                  "val/images/*.JPEG",
            source=TINYIMAGENET_URL, loader=load_tinyimagenet,
        ),
        DatasetSpec(
            name="purchase", kind="tabular", input_shape=(PURCHASE_FEATURES,), num_classes=PURCHASE_CLASSES,
            description="Purchase-100: 197,324 shopping records, 600 binary features, 100 classes",
            files="dataset_purchase (CSV: label 1..100, then 600 features) or dataset_purchase.tgz holding it",
            source=PRIVACYTRUSTLAB_URL, loader=load_purchase,
        ),
        DatasetSpec(
            name="texas", kind="tabular", input_shape=(TEXAS_FEATURES,), num_classes=TEXAS_CLASSES,
            description="Texas-100: 67,330 hospital discharge records, 6,169 binary features, 100 classes",
            files="texas/100/feats (CSV of 6169 features) and texas/100/labels (1..100), or dataset_texas.tgz",
            source=PRIVACYTRUSTLAB_URL, loader=load_texas,
        ),
        DatasetSpec(
            name="location", kind="tabular", input_shape=(LOCATION_FEATURES,), num_classes=LOCATION_CLASSES,
            description="Location (Foursquare, Bangkok): 5,010 records, 446 binary features, 30 classes",
            files='bangkok (CSV: "label" 1..30, then 446 features) or dataset_location.tgz holding it',
            source=PRIVACYTRUSTLAB_URL, loader=load_location,
        ),
        DatasetSpec(
            name="digits", kind="tabular", input_shape=(64,), num_classes=10,
            description="scikit-learn's bundled 8x8 digits: 1,797 samples, 64 features in [0, 1], 10 classes",
            files="none (bundled with scikit-learn)",
            source="scikit-learn (sklearn.datasets.load_digits)", loader=load_digits, needs_root=False,
        ),
    )
}


def dataset_names() -> list[str]:
    """The registered dataset names, in registry order."""
    return list(DATASETS)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_spec(name: str) -> DatasetSpec:
    """The spec of ``name`` (case, '-' and '_' ignored: 'CIFAR-10' is cifar10); ConfigError if unknown."""
    spec = DATASETS.get(_canonical(str(name)))
    if spec is None:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return spec


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """Load the dataset ``name`` from the files under ``root`` (ignored for the embedded 'digits')."""
    spec = get_spec(name)
    if spec.needs_root and root is None:
        raise ConfigError(f"--data-root is required for {spec.name}: pass the folder that holds {spec.files}; "
                          f"get the files from {spec.source}")
    start = time.perf_counter()
    dataset = spec.loader(Path(root).expanduser() if root is not None else None)
    log.info("%s: %d samples loaded in %.1f s", spec.name, len(dataset), time.perf_counter() - start)
    return dataset
