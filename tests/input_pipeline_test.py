"""Tests of fastscnn_jax.input_pipeline: augmentation alignment, resumable training stream, eval batches.

Alignment is checked with images whose colour is the palette colour of their mask class, so any drift of
the geometry between image and mask shows as a colour that does not match the label.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import tiny
from fastscnn_jax import camvid, input_pipeline
from tests.conftest import make_fake_camvid

VOID = camvid.IGNORE_LABEL
N_TRAIN, N_VAL, SIZE = 6, 5, (24, 32)


def _config(**overrides):
    """Tiny config with augmentation off (no scaling, no flip, no jitter), then `overrides`."""
    config = tiny.get_config()
    config.min_scale = config.max_scale = 1.0
    config.flip = False
    config.brightness = config.contrast = config.saturation = config.hue = 0.0
    config.crop_size = SIZE
    for key, value in overrides.items():
        config[key] = value
    return config


def _blocky_pair(size, block: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random mask of `block`-sized squares (void included) and the image of its palette colours."""
    h, w = size
    blocks = np.random.default_rng(seed).integers(0, VOID + 1, (-(-h // block), -(-w // block)))
    mask = np.kron(blocks, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
    return camvid.PALETTE[mask], mask


def _augment(image, mask, seed, config, in_dataset=False) -> tuple[np.ndarray, np.ndarray]:
    """Runs augment eagerly, or inside a tf.data map, on numpy inputs; returns numpy outputs."""
    args = (tf.constant(image), tf.constant(mask[..., None]), tf.constant(seed, tf.int64))
    if not in_dataset:
        out = input_pipeline.augment(*args, config)
        return out[0].numpy(), out[1].numpy()
    ds = tf.data.Dataset.from_tensors(args).map(lambda i, m, s: input_pipeline.augment(i, m, s, config))
    return next(ds.as_numpy_iterator())


def _find_window(out_image, out_label, image, mask) -> tuple[int, int, bool] | None:
    """(y, x, flipped) of the window of the bottom/right void-padded source that the output equals."""
    crop_h, crop_w = out_label.shape
    pad_h, pad_w = max(crop_h - mask.shape[0], 0), max(crop_w - mask.shape[1], 0)
    padded_mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=VOID)
    padded_image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    for flipped in (False, True):
        label = out_label[:, ::-1] if flipped else out_label
        img = out_image[:, ::-1] if flipped else out_image
        for y in range(padded_mask.shape[0] - crop_h + 1):
            for x in range(padded_mask.shape[1] - crop_w + 1):
                if np.array_equal(padded_mask[y : y + crop_h, x : x + crop_w], label) and np.array_equal(
                    padded_image[y : y + crop_h, x : x + crop_w], img
                ):
                    return y, x, flipped
    return None


@pytest.mark.parametrize("crop", [(16, 20), (32, 40), (16, 40)])
def test_augment_crop_and_flip_keep_image_and_mask_aligned(crop):
    """Without scaling, outputs are one (maybe flipped) window of the source, padding void and black."""
    image, mask = _blocky_pair((24, 32), 4)
    config = _config(crop_size=crop, flip=True)
    flips = set()
    for s in range(6):
        out_image, out_label = _augment(image, mask, [7, s], config)
        assert out_image.shape == (*crop, 3) and out_image.dtype == np.float32
        assert out_label.shape == crop and out_label.dtype == np.int32
        # Every pixel's colour is its label's colour (void and padding are black).
        np.testing.assert_array_equal(out_image, camvid.PALETTE[out_label].astype(np.float32))
        window = _find_window(out_image, out_label, image, mask)
        assert window is not None, f"seed {s}: output is not a window of the source"
        flips.add(window[2])
        if crop[0] > 24:  # Taller than the image: the bottom rows are padding.
            assert window[0] == 0 and np.all(out_label[24:] == VOID) and np.all(out_image[24:] == 0)
    assert flips == {False, True}


def test_augment_with_scaling_keeps_alignment():
    """With 0.5-2x scaling, pixels inside label regions have exactly their label's colour, others blend."""
    image, mask = _blocky_pair((48, 64), 12, seed=1)
    config = _config(crop_size=(40, 56), flip=True, min_scale=0.5, max_scale=2.0)
    sizes, counts = set(), np.zeros(2, np.int64)
    for s in range(8):
        out_image, out_label = _augment(image, mask, [3, s], config)
        assert out_label.shape == (40, 56)
        # Interior: the 3x3 label neighbourhood is one non-void class, so bilinear blending of the image
        # (which only happens across class boundaries) cannot touch it.
        padded = np.pad(out_label, 1, mode="edge")
        neighbours = np.stack([padded[dy : dy + 40, dx : dx + 56] for dy in range(3) for dx in range(3)])
        interior = np.all(neighbours == out_label, axis=0) & (out_label != VOID)
        counts += [interior.sum(), (out_label != VOID).sum()]
        np.testing.assert_allclose(
            out_image[interior], camvid.PALETTE[out_label[interior]].astype(np.float32), atol=1e-3
        )
        # Boundary pixels are blends: each channel lies between the colours of the nearby labels.
        colours = camvid.PALETTE[neighbours].astype(np.float32)  # [9, h, w, 3]
        assert np.all(out_image >= colours.min(0) - 1e-3) and np.all(out_image <= colours.max(0) + 1e-3)
        sizes.add(int((out_label != VOID).sum()))
    assert len(sizes) > 1  # The scale really varies with the seed.
    assert counts[0] >= 0.5 * counts[1]  # Most labelled pixels are interior: the check has teeth.


def test_augment_eager_equals_tf_data():
    """The same seed gives identical outputs eagerly and inside a tf.data map (full augmentation)."""
    image, mask = _blocky_pair((48, 64), 8, seed=2)
    config = _config(
        crop_size=(40, 56), flip=True, min_scale=0.5, max_scale=2.0, brightness=0.25, contrast=0.25
    )
    config.saturation, config.hue = 0.25, 0.02
    for s in range(3):
        eager = _augment(image, mask, [5, s], config)
        graph = _augment(image, mask, [5, s], config, in_dataset=True)
        np.testing.assert_array_equal(eager[1], graph[1])
        np.testing.assert_array_equal(eager[0], graph[0])


def test_photometric_jitter_changes_image_not_label():
    """Colour jitter changes the image but, with the same seed, never the label."""
    image, mask = _blocky_pair((48, 64), 8, seed=3)
    geometry = dict(crop_size=(40, 56), flip=True, min_scale=0.5, max_scale=2.0)
    plain = _config(**geometry)
    jitter = _config(**geometry, brightness=0.25, contrast=0.25, saturation=0.25, hue=0.02)
    for s in range(3):
        plain_image, plain_label = _augment(image, mask, [9, s], plain)
        jitter_image, jitter_label = _augment(image, mask, [9, s], jitter)
        np.testing.assert_array_equal(plain_label, jitter_label)
        assert np.abs(plain_image - jitter_image).max() > 1.0
        assert jitter_image.min() >= 0.0 and jitter_image.max() <= 255.0


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """Synthetic CamVid (6 train, 5 val examples of 24x32), its prepared builder and in-memory train split."""
    root = tmp_path_factory.mktemp("fake_camvid")
    make_fake_camvid(root, splits=("train",), n=N_TRAIN, size=SIZE, seed=0)
    make_fake_camvid(root, splits=("val",), n=N_VAL, size=SIZE, seed=1)
    builder = camvid.get_builder(dataset_dir=str(root), data_dir=str(tmp_path_factory.mktemp("tfds")))
    return root, builder, input_pipeline.InMemorySplit.from_builder(builder, "train")


def _decode(png: bytes) -> np.ndarray:
    """PNG bytes to a numpy array with PIL."""
    return np.asarray(Image.open(io.BytesIO(png)))


def _batches(split, config, steps: int, **kwargs) -> list[dict[str, np.ndarray]]:
    """The first `steps` batches of `train_dataset` as numpy."""
    return list(input_pipeline.train_dataset(split, config, **kwargs).take(steps).as_numpy_iterator())


def _assert_batches_equal(a: list[dict], b: list[dict]):
    """Two lists of batches are exactly equal."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"image", "label"}
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_train_dataset_resume_and_seed(fake_data):
    """Starting at step 3 continues the stream exactly; same seed same batches, other seed other batches."""
    _, _, split = fake_data
    config = _config(crop_size=(16, 16), flip=True, min_scale=0.5, max_scale=1.5, brightness=0.25)
    full = _batches(split, config, 6, local_batch_size=2)
    assert full[0]["image"].shape == (2, 16, 16, 3) and full[0]["image"].dtype == np.float32
    assert full[0]["label"].shape == (2, 16, 16) and full[0]["label"].dtype == np.int32
    _assert_batches_equal(_batches(split, config, 3, local_batch_size=2, start_step=3), full[3:])
    _assert_batches_equal(_batches(split, config, 6, local_batch_size=2), full)
    config.seed = 1
    other = _batches(split, config, 6, local_batch_size=2)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(full, other, strict=True))


def test_train_dataset_visits_each_example_once_per_epoch(fake_data):
    """With augmentation off, each epoch's batches are a permutation of the split, labels with images."""
    _, _, split = fake_data
    sources = [
        (_decode(i).astype(np.float32), _decode(m)) for i, m in zip(split.images, split.labels, strict=True)
    ]
    assert len(sources) == N_TRAIN
    batches = _batches(split, _config(), 3 * N_TRAIN // 2, local_batch_size=2)  # Three epochs.
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    order = []
    for image, label in zip(images, labels, strict=True):
        matches = [j for j, (src, _) in enumerate(sources) if np.allclose(image, src, atol=1e-3)]
        assert len(matches) == 1
        np.testing.assert_array_equal(label, sources[matches[0]][1])
        order.append(matches[0])
    epochs = [order[e * N_TRAIN : (e + 1) * N_TRAIN] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(N_TRAIN))
    assert len({tuple(e) for e in epochs}) > 1  # Reshuffled between epochs.


def test_train_dataset_process_sharding(fake_data):
    """Two processes' local batches, process 0 first, equal the single-process global batch."""
    _, _, split = fake_data
    config = _config(crop_size=(16, 16), flip=True, min_scale=0.5, max_scale=1.5, brightness=0.25)
    single = _batches(split, config, 3, local_batch_size=4, start_step=1)
    shards = [
        _batches(split, config, 3, local_batch_size=2, start_step=1, process_index=p, process_count=2)
        for p in range(2)
    ]
    for step in range(3):
        for key in ("image", "label"):
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, single[step][key])


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


def test_in_memory_split_from_builder(fake_data):
    """The in-memory split holds every train example's PNG bytes; an empty split raises."""
    root, _, split = fake_data
    assert len(split) == N_TRAIN
    assert sorted(split.names) == sorted(p.name for p in (root / "train").glob("*.png"))
    for name, png in zip(split.names, split.images, strict=True):
        np.testing.assert_array_equal(_decode(png), np.asarray(Image.open(root / "train" / name)))
    with pytest.raises(ValueError):
        input_pipeline.InMemorySplit([], [], [])
