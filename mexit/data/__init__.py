"""The data layer: dataset registry, file-format readers, normalisation statistics and the seeded split.

``load_dataset(name, root)`` returns a :class:`Dataset` (all samples in memory: images as uint8 NCHW,
tabular rows as float32); ``make_splits(dataset.y, seed=...)`` partitions it into the six disjoint
index sets every later stage uses. Only numpy is imported here (scikit-learn and Pillow lazily, inside
the readers that need them); never torch.
"""

from mexit.data.dataset import Dataset, DatasetSpec
from mexit.data.registry import DATASETS, dataset_names, get_spec, load_dataset
from mexit.data.splits import PARTS, Splits, make_splits

__all__ = [
    "DATASETS",
    "PARTS",
    "Dataset",
    "DatasetSpec",
    "Splits",
    "dataset_names",
    "get_spec",
    "load_dataset",
    "make_splits",
]
