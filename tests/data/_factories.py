"""Writers of small dataset files in the exact formats users have, for the reader tests."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_cifar_batch(path: Path, labels: np.ndarray, *, label_key: bytes = b"labels", seed: int = 0,
                      protocol: int = 2) -> np.ndarray:
    """A CIFAR-style batch pickle with random images; returns the images as (N, 3, 32, 32)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    batch = {b"batch_label": b"generated", label_key: [int(v) for v in labels], b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return data.reshape(-1, 3, 32, 32)


def make_cifar10(folder: Path, batch_labels: dict[str, np.ndarray], *, meta: bool = True) -> dict[str, np.ndarray]:
    """A ``cifar-10-batches-py`` folder with the named batches; returns each batch's images."""
    images = {name: write_cifar_batch(folder / name, labels, seed=i)
              for i, (name, labels) in enumerate(batch_labels.items())}
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return images


def make_cifar100(folder: Path, train: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """A ``cifar-100-python`` folder (fine and coarse labels, meta); returns the images per file."""
    images = {}
    for i, (name, labels) in enumerate((("train", train), ("test", test))):
        images[name] = write_cifar_batch(folder / name, labels, label_key=b"fine_labels", seed=10 + i)
    names = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names, b"coarse_label_names": coarse}))
    return images


def make_tinyimagenet(folder: Path, wnids: list[str], per_class: int, val: list[tuple[str, str]],
                      *, words: bool = True) -> None:
    """A miniature ``tiny-imagenet-200``: solid-colour JPEGs, the first training image of each class grayscale,
    one validation image 32x32 (to be resized); ``val`` lists (filename, wnid) pairs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    if words:
        (folder / "words.txt").write_text("".join(f"{w}\tthing {w}, other name\n" for w in wnids)
                                          + "n99999999\tunused\n")
    for c, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            colour = (40 * c % 256, 90, 200)
            img = Image.new("L", (64, 64), 128) if i == 0 else Image.new("RGB", (64, 64), colour)
            img.save(images / f"{wnid}_{i}.JPEG", quality=95)
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for j, (name, wnid) in enumerate(val):
        size = (32, 32) if j == 0 else (64, 64)
        Image.new("RGB", size, (10, 20, 30)).save(folder / "val" / "images" / name, quality=95)
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    (folder / "test" / "images").mkdir(parents=True)


def labelled_csv(labels: np.ndarray, features: np.ndarray, *, quote: bool = False) -> bytes:
    """CSV lines ``label,f1..fD`` (labels as given, i.e. 1-based), optionally with quoted labels."""
    lines = []
    for label, row in zip(labels, features, strict=True):
        head = f'"{label}"' if quote else str(label)
        lines.append(head + "," + ",".join(str(int(v)) for v in row))
    return ("\n".join(lines) + "\n").encode()


def matrix_csv(values: np.ndarray) -> bytes:
    """Headerless CSV of an integer matrix (one row per line)."""
    return ("\n".join(",".join(str(int(v)) for v in row) for row in np.atleast_2d(values)) + "\n").encode()


def write_tgz(path: Path, members: dict[str, bytes]) -> Path:
    """A gzip-compressed tar holding ``members`` (name -> content), like the privacytrustlab archives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return path


def random_binary(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return rng.integers(0, 2, size=(rows, cols))
