"""Tests of fastscnn_jax.input_pipeline: the decoded split, the resumable tf.data training stream (the same
batches as the numpy reader's), eval batches. The augmentation's tests are in augmentation_test.py."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from fastscnn_jax import camvid, input_pipeline, reader, sources, steps
from tests.conftest import make_fake_camvid

VOID = camvid.IGNORE_LABEL
N_TRAIN, N_VAL, SIZE = 6, 5, (24, 32)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """Synthetic CamVid (6 train, 5 val examples of 24x32), its prepared builder and decoded train split."""
    root = tmp_path_factory.mktemp("fake_camvid")
    make_fake_camvid(root, splits=("train",), n=N_TRAIN, size=SIZE, seed=0)
    make_fake_camvid(root, splits=("val",), n=N_VAL, size=SIZE, seed=1)
    builder = camvid.get_builder(dataset_dir=str(root), data_dir=str(tmp_path_factory.mktemp("tfds")))
    return root, builder, input_pipeline.read_split(builder, "train", VOID)


def _batches(split, steps: int, seed: int = 0, **kwargs) -> list[dict[str, np.ndarray]]:
    """The first `steps` batches of `train_dataset` as numpy."""
    config = tiny.get_config()
    config.seed = seed
    dataset = input_pipeline.train_dataset(split, config, **kwargs)
    return list(dataset.take(steps).as_numpy_iterator())


def _reader_batches(split, steps: int, seed: int = 0, **kwargs) -> list[dict[str, np.ndarray]]:
    """The first `steps` batches of the numpy reader's `train_batches`."""
    config = tiny.get_config()
    config.seed = seed
    stream = reader.train_batches(split, config, **kwargs)
    return [next(stream) for _ in range(steps)]


def _assert_batches_equal(a: list[dict], b: list[dict]):
    """Two lists of batches are exactly equal, dtypes included."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"image", "label", "size", "index"}
        for key in x:
            assert x[key].dtype == y[key].dtype, key
            np.testing.assert_array_equal(x[key], y[key])


def test_train_dataset_yields_the_readers_batches(fake_data):
    """tf.data yields exactly the numpy reader's batches: whole examples, sizes and global indices, in the
    same order, for a resumed start, for each process's slice and for another seed."""
    _, _, split = fake_data
    full = _batches(split, 6, local_batch_size=2)
    assert full[0]["image"].shape == (2, *SIZE, 3) and full[0]["image"].dtype == np.uint8
    assert full[0]["label"].shape == (2, *SIZE) and full[0]["label"].dtype == np.uint8
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in full]), np.arange(12))
    _assert_batches_equal(full, _reader_batches(split, 6, local_batch_size=2))
    _assert_batches_equal(_batches(split, 3, local_batch_size=2, start_step=3), full[3:])
    for p in range(2):
        kwargs = dict(local_batch_size=1, start_step=1, process_index=p, process_count=2)
        _assert_batches_equal(_batches(split, 3, **kwargs), _reader_batches(split, 3, **kwargs))
    other = _batches(split, 6, seed=1, local_batch_size=2)
    _assert_batches_equal(other, _reader_batches(split, 6, seed=1, local_batch_size=2))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(full, other, strict=True))


def test_train_dataset_visits_each_example_once_per_epoch(fake_data):
    """Each epoch's batches are a permutation of the split, labels with their images, reshuffled."""
    root, _, split = fake_data
    sources = _source_pairs(root, "train")
    batches = _batches(split, 3 * N_TRAIN // 2, local_batch_size=2)  # Three epochs.
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    order = []
    for image, label in zip(images, labels, strict=True):
        matches = [j for j, (src, _) in enumerate(sources) if np.array_equal(image, src)]
        assert len(matches) == 1
        np.testing.assert_array_equal(label, sources[matches[0]][1])
        order.append(matches[0])
    epochs = [order[e * N_TRAIN : (e + 1) * N_TRAIN] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(N_TRAIN))
    assert len({tuple(e) for e in epochs}) > 1  # Reshuffled between epochs.


def _source_pairs(root: pathlib.Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) of every file of a fake split, decoded with PIL."""
    return [
        (np.asarray(Image.open(p)), np.asarray(Image.open(root / f"{split}annot" / p.name)))
        for p in sorted((root / split).glob("*.png"))
    ]


def _real_rows(batches: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, label) of every row marked real in `batches`; padding rows must be all zero."""
    rows = []
    for batch in batches:
        for image, label, real in zip(batch["image"], batch["label"], batch["mask"], strict=True):
            if real:
                rows.append((image, label))
            else:
                assert not image.any() and not label.any()
    return rows


def _assert_covers_once(rows, sources):
    """Every source (image, mask) pair is among `rows` exactly once, and nothing else is."""
    assert len(rows) == len(sources)
    for src_image, src_mask in sources:
        hits = [label for image, label in rows if np.array_equal(image, src_image)]
        assert len(hits) == 1
        np.testing.assert_array_equal(hits[0], src_mask)


def test_eval_batches_pad_and_cover_each_example_once(fake_data):
    """5 examples in batches of 2: 3 full-size batches, the last padded, every example once."""
    root, builder, _ = fake_data
    batches = list(input_pipeline.eval_batches(builder, "val", 2))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (2, *SIZE, 3)
        assert batch["label"].shape == (2, *SIZE) and batch["label"].dtype == np.int32
        assert batch["mask"].dtype == bool
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
    _assert_covers_once(_real_rows(batches), _source_pairs(root, "val"))


def test_eval_batches_two_processes(fake_data):
    """Two processes yield as many batches each and together cover every example exactly once."""
    root, builder, _ = fake_data
    per_process = [
        list(input_pipeline.eval_batches(builder, "val", 2, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 2
    for batches in per_process:
        assert all(b["image"].shape == (2, *SIZE, 3) for b in batches)
    rows = _real_rows(per_process[0]) + _real_rows(per_process[1])
    _assert_covers_once(rows, _source_pairs(root, "val"))


def test_class_pixel_counts(fake_data):
    """Per-class pixel counts equal a numpy bincount over the mask files, void left out."""
    root, _, split = fake_data
    masks = np.stack([m for _, m in _source_pairs(root, "train")])
    expected = np.bincount(masks.ravel(), minlength=VOID + 1)[:VOID]
    counts = split.class_pixel_counts(camvid.NUM_CLASSES)
    assert counts.shape == (camvid.NUM_CLASSES,)
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == (masks != VOID).sum()


def test_read_split_decodes_the_prepared_split(fake_data):
    """The decoded split holds every train example as PIL decodes its files, and the folder reader's arrays;
    an empty split raises."""
    root, _, split = fake_data
    assert len(split) == N_TRAIN
    assert sorted(split.names) == sorted(p.name for p in (root / "train").glob("*.png"))
    np.testing.assert_array_equal(split.sizes, np.tile(SIZE, (N_TRAIN, 1)))
    for name, image, label in zip(split.names, split.images, split.labels, strict=True):
        np.testing.assert_array_equal(image, np.asarray(Image.open(root / "train" / name)))
        np.testing.assert_array_equal(label, np.asarray(Image.open(root / "trainannot" / name)))
    folder = reader.InMemorySplit.from_folder(root, "train", VOID)
    assert folder.names == split.names
    np.testing.assert_array_equal(folder.images, split.images)
    np.testing.assert_array_equal(folder.labels, split.labels)
    with pytest.raises(ValueError):
        reader.InMemorySplit.from_examples([], [], [], VOID)


def test_both_sources_give_the_same_data(fake_data):
    """`sources.FolderSource` (no TensorFlow) gives the TFDS source's decoded 'train+val', train first, and
    its eval batches of val, so a run reads the same data with or without TensorFlow."""
    root, builder, _ = fake_data
    config = tiny.get_config()
    config.dataset_dir = str(root)
    folder, tfds_source = sources.FolderSource(config), sources.TFDSSource(config, builder)
    both, expected = folder.read("train+val"), tfds_source.read("train+val")
    assert len(both) == N_TRAIN + N_VAL and both.names == expected.names
    assert both.names[:N_TRAIN] == folder.read("train").names
    for key in ("images", "labels", "sizes"):
        np.testing.assert_array_equal(getattr(both, key), getattr(expected, key))
    for a, b in zip(
        folder.eval_batches("val", 2, 0, 1), tfds_source.eval_batches("val", 2, 0, 1), strict=True
    ):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key])


def test_folder_source_names_what_it_cannot_read(tmp_path, monkeypatch):
    """Without TFDS only a local CamVid folder is read: another dataset, a folder that is not CamVid's, or
    no folder found at all is refused, naming the key or what to set."""
    config = tiny.get_config()
    config.dataset = "cityscapes"
    with pytest.raises(steps.ConfigError, match="config.dataset='cityscapes' is read through TensorFlow"):
        sources.FolderSource(config)
    config = tiny.get_config()
    config.dataset_dir = str(tmp_path)
    with pytest.raises(camvid.DatasetError, match=f"dataset_dir={tmp_path} is not a CamVid folder"):
        sources.FolderSource(config)
    monkeypatch.setattr(sources.camvid_folder, "find_camvid_dir", lambda dataset_dir: None)
    with pytest.raises(camvid.DatasetError, match=r"set config.dataset_dir or \$CAMVID_DIR"):
        sources.FolderSource(tiny.get_config())
