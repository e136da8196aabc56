"""TinyImageNet reader on a generated miniature in the Stanford/Kaggle layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mexit.data import load_dataset
from mexit.errors import DataError
from tests.data._factories import make_tinyimagenet

WNIDS = ["n02000001", "n01000002", "n03000003"]  # deliberately not sorted: wnids.txt order defines labels
VAL = [("val_0.JPEG", "n03000003"), ("val_1.JPEG", "n02000001"), ("val_2.JPEG", "n03000003")]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-imagenet-200"
    make_tinyimagenet(folder, WNIDS, per_class=3, val=VAL)
    return folder


def test_layout_pools_train_and_val(tiny: Path) -> None:
    for root in (tiny, tiny.parent):
        ds = load_dataset("tinyimagenet", root)
        assert ds.kind == "image" and ds.num_classes == 3 and ds.input_shape == (3, 64, 64)
        assert ds.x.shape == (12, 3, 64, 64) and ds.x.dtype == np.uint8
        assert ds.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 2]
        assert ds.class_names == [f"thing {w}" for w in WNIDS]


def test_grayscale_becomes_rgb_and_small_images_are_resized(tiny: Path) -> None:
    ds = load_dataset("tinyimagenet", tiny)
    gray = ds.x[0]  # first training image of class 0 is an "L" image of value 128
    assert np.all(np.abs(gray.astype(int) - 128) <= 2)
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    colour = ds.x[1].reshape(3, -1).mean(axis=1)  # RGB (0, 90, 200) survives the JPEG round trip closely
    np.testing.assert_allclose(colour, [0, 90, 200], atol=4)
    resized = ds.x[9].reshape(3, -1).mean(axis=1)  # the 32x32 validation image, upscaled to 64x64
    np.testing.assert_allclose(resized, [10, 20, 30], atol=4)


def test_without_words_txt_names_are_wnids(tiny: Path) -> None:
    (tiny / "words.txt").unlink()
    assert load_dataset("tinyimagenet", tiny).class_names == WNIDS


def test_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected wnids.txt, train/<wnid>/images/\*.JPEG") as err:
        load_dataset("tinyimagenet", tmp_path)
    assert "cs231n.stanford.edu/tiny-imagenet-200.zip" in str(err.value)


def test_missing_class_folder(tiny: Path) -> None:
    (tiny / "wnids.txt").write_text("\n".join([*WNIDS, "n09999999"]) + "\n")
    with pytest.raises(DataError, match=r"train/n09999999/images is missing"):
        load_dataset("tinyimagenet", tiny)


def test_unknown_wnid_in_val_annotations(tiny: Path) -> None:
    path = tiny / "val" / "val_annotations.txt"
    path.write_text(path.read_text() + "val_9.JPEG\tn05555555\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt line 4: class n05555555 is not listed"):
        load_dataset("tinyimagenet", tiny)


def test_missing_val_image(tiny: Path) -> None:
    (tiny / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(DataError, match=r"val_1.JPEG is missing \(listed in .*val_annotations.txt line 2\)"):
        load_dataset("tinyimagenet", tiny)


def test_corrupt_jpeg_names_file(tiny: Path) -> None:
    bad = tiny / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_2.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = load_dataset("tinyimagenet", tiny)  # decoding is lazy: the bad file is found when it is used
    ds.x[:5]  # the images before it decode fine
    with pytest.raises(DataError, match=rf"cannot decode .*{WNIDS[1]}_2.JPEG"):
        ds.inputs()


def test_images_are_decoded_only_when_used(tiny: Path) -> None:
    """``--limit`` works before decoding: the split indexes the labels, training decodes only its samples."""
    ds = load_dataset("tinyimagenet", tiny)
    assert ds.x.decoded() == 0 and len(ds.x) == 12 and ds.x.shape == (12, 3, 64, 64)
    from mexit.data import make_splits

    splits = make_splits(ds.y, seed=0, max_per_split=1)  # labels only: nothing decoded yet
    assert ds.x.decoded() == 0
    part = ds.x[splits.target_train]
    assert part.shape == (len(splits.target_train), 3, 64, 64) and ds.x.decoded() == len(splits.target_train)
    assert np.array_equal(ds.x[splits.target_train], part)  # cached, same pixels
    assert ds.inputs(np.array([0])).dtype == np.float32
    full = ds.inputs()  # everything on request
    assert full.shape == (12, 3, 64, 64) and ds.x.decoded() == 12
    np.testing.assert_allclose(full[0] * 255, ds.x[0].astype(np.float32), atol=1e-3)


def test_a_32px_copy_is_used_at_its_own_size(tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    from PIL import Image

    for path in [*tiny.glob("train/*/images/*.JPEG"), *tiny.glob("val/images/*.JPEG")]:
        with Image.open(path) as img:
            img.resize((32, 32)).save(path, quality=95)
    with caplog.at_level("INFO", logger="mexit.data.tinyimagenet"):
        ds = load_dataset("tinyimagenet", tiny)
    assert ds.input_shape == (3, 32, 32) and ds.x[:].shape == (12, 3, 32, 32)
    assert any("32x32 images: using them at that size" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(ds.x[9].reshape(3, -1).mean(axis=1), [10, 20, 30], atol=4)
