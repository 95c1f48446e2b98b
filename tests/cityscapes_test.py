"""Cityscapes (fastscnn_jax.cityscapes) on a synthetic miniature in the official layout: the two archives by
their official names, cities, `*_leftImg8bit.png` images and `*_gtFine_labelIds.png` masks of label IDs."""

import io
import json
import pathlib
import re
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import cityscapes as cityscapes_config
from fastscnn_jax import camvid, checkpointing, cityscapes, classes, train

SIZE = (32, 64)  # height, width: Cityscapes' 1:2 aspect
CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",)}


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of an array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_cityscapes(root: pathlib.Path, per_city: int = 2, seed: int = 0) -> pathlib.Path:
    """Writes `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` into `root`, as the official ones
    are laid out (with the colour, instance and polygon files beside the label IDs, and test labels all 0).

    Returns:
      `root`.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    label_ids = np.array([0, 1, 4, 7, 8, 11, 21, 23, 24, 26, 33])  # void ones and some of the 19
    with (
        zipfile.ZipFile(root / cityscapes.IMAGES_ZIP, "w") as images,
        zipfile.ZipFile(root / cityscapes.LABELS_ZIP, "w") as labels,
    ):
        images.writestr("README", "synthetic")
        for split, cities in CITIES.items():
            for city in cities:
                for k in range(per_city):
                    stem = f"{city}_{k:06d}_000019"
                    image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
                    ids = label_ids[rng.integers(0, len(label_ids), (SIZE[0] // 4, SIZE[1] // 4))]
                    ids = np.kron(ids, np.ones((4, 4), np.int64)).astype(np.uint8)
                    if split == "test":
                        ids[:] = 0  # Withheld: the official test labels are all void.
                    images.writestr(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", _png(image))
                    gt = f"gtFine/{split}/{city}/{stem}_gtFine"
                    labels.writestr(f"{gt}_labelIds.png", _png(ids))
                    labels.writestr(f"{gt}_color.png", _png(image))
                    labels.writestr(f"{gt}_instanceIds.png", _png(ids))
                    labels.writestr(f"{gt}_polygons.json", json.dumps({"objects": []}))
    return root


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """(archive folder, TFDS data folder) of the miniature, prepared once."""
    base = tmp_path_factory.mktemp("cityscapes")
    root = make_cityscapes(base / "download")
    cityscapes.get_builder(str(root), str(base / "tfds"))
    return root, base / "tfds"


def test_label_ids_become_the_19_train_ids():
    """The official mapping: road 7 -> 0, car 26 -> 13, bicycle 33 -> 18; 0, 4 (static), 9 (parking) and
    29 (caravan) are void; 19 train IDs in classes.CITYSCAPES' order."""
    ids = np.array([7, 8, 11, 26, 33, 0, 4, 9, 29, 255], np.uint8)
    assert cityscapes.train_ids(ids).tolist() == [0, 1, 2, 13, 18, 255, 255, 255, 255, 255]
    assert sorted(cityscapes.LABEL_TO_TRAIN_ID.values()) == list(range(19))
    assert classes.CITYSCAPES.num_classes == 19 and classes.CITYSCAPES.names[13] == "car"


def test_prepared_splits_hold_the_images_and_train_ids(miniature):
    """Train and val (not test) are prepared; each example is its archive image and its labels mapped."""
    root, tfds_dir = miniature
    builder = cityscapes.get_builder(str(root), str(tfds_dir))
    assert set(builder.info.splits.keys()) == {"train", "val"}
    assert builder.info.splits["train"].num_examples == 4
    examples = list(tfds.as_numpy(camvid.load_split(builder, "val")))
    assert [ex["file_name"].decode() for ex in examples] == [
        "frankfurt_000000_000019_leftImg8bit.png",
        "frankfurt_000001_000019_leftImg8bit.png",
    ]
    with (
        zipfile.ZipFile(root / cityscapes.IMAGES_ZIP) as images,
        zipfile.ZipFile(root / cityscapes.LABELS_ZIP) as labels,
    ):
        for ex in examples:
            stem = ex["file_name"].decode().removesuffix("_leftImg8bit.png")
            image = np.asarray(
                Image.open(io.BytesIO(images.read(f"leftImg8bit/val/frankfurt/{stem}_leftImg8bit.png")))
            )
            ids = np.asarray(
                Image.open(io.BytesIO(labels.read(f"gtFine/val/frankfurt/{stem}_gtFine_labelIds.png")))
            )
            np.testing.assert_array_equal(ex["image"], image)
            np.testing.assert_array_equal(ex["label"][..., 0], cityscapes.train_ids(ids))


def test_trains_a_few_steps_with_the_paper_recipe(miniature, tmp_path):
    """configs/cityscapes.py (SGD with momentum, poly schedule) made tiny trains, and scores val with the
    19 Cityscapes classes, void (255) left out; the weights record those classes."""
    root, tfds_dir = miniature
    config = cityscapes_config.get_config()
    config.dataset_dir = str(root)
    config.tfds_data_dir = str(tfds_dir)
    config.update_from_flattened_dict(
        {
            "model.width": 0.25,
            "crop_size": SIZE,
            "batch_size": 2,
            "eval_batch_size": 2,
            "num_train_steps": 2,
            "log_every_steps": 1,
            "eval_every_steps": 2,
            "checkpoint_every_steps": 2,
        }
    )
    scores = train.train_and_evaluate(config, str(tmp_path))
    assert list(scores["per_class_iou"]) == list(classes.CITYSCAPES.names)
    with zipfile.ZipFile(root / cityscapes.LABELS_ZIP) as labels:
        non_void = sum(
            int((cityscapes.train_ids(np.asarray(Image.open(io.BytesIO(labels.read(n))))) != 255).sum())
            for n in labels.namelist()
            if n.startswith("gtFine/val/") and n.endswith("_labelIds.png")
        )
    recorded = json.loads((tmp_path / "eval_val.json").read_text())
    assert np.asarray(recorded["confusion_matrix"]).sum() == non_void
    _, meta = checkpointing.load_variables(str(tmp_path))
    assert classes.from_meta(meta) == classes.CITYSCAPES and meta["data"]["dataset"] == "cityscapes"


def test_missing_archive_and_unpaired_members_are_named(tmp_path):
    """A missing archive is named; an image without its label and a label without its image are listed
    together, by member and archive."""
    root = make_cityscapes(tmp_path / "download", per_city=1)
    (root / cityscapes.LABELS_ZIP).rename(tmp_path / "elsewhere.zip")
    with pytest.raises(
        camvid.DatasetError, match=re.escape(f"{root.resolve() / cityscapes.LABELS_ZIP}: missing")
    ):
        cityscapes.get_builder(str(root), str(tmp_path / "tfds"))

    with (
        zipfile.ZipFile(tmp_path / "elsewhere.zip") as source,
        zipfile.ZipFile(root / cityscapes.LABELS_ZIP, "w") as labels,
    ):
        for name in source.namelist():
            if "aachen_000000" not in name:  # drop one train label
                labels.writestr(name, source.read(name))
        labels.writestr(
            "gtFine/val/frankfurt/frankfurt_000009_000019_gtFine_labelIds.png", _png(np.zeros(SIZE, np.uint8))
        )
    with pytest.raises(camvid.DatasetError) as info:
        cityscapes.get_builder(str(root), str(tmp_path / "tfds"))
    message = str(info.value)
    assert "(2 problem(s))" in message
    assert "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png has no label" in message
    assert "gtFine/val/frankfurt/frankfurt_000009_000019_gtFine_labelIds.png has no image" in message
