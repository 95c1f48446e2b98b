"""Tests of fastscnn_jax.reader: a folder decoded onto one canvas, the resumable training stream of whole
examples, its multi-host slices, and evaluation batches."""

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from fastscnn_jax import camvid_folder, reader
from tests.conftest import make_fake_camvid

VOID = 11
N = 6


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """A fake CamVid folder whose train split has images of two sizes (24x32 and 20x40)."""
    root = tmp_path_factory.mktemp("camvid_mixed")
    make_fake_camvid(root, splits=("train",), n=N, size=(24, 32), seed=0, sequences=("0001TP", "0006R0"))
    other = make_fake_camvid(tmp_path_factory.mktemp("other"), splits=("train",), n=2, size=(20, 40), seed=1)
    lines = (root / "train.txt").read_text()
    for i, name in enumerate(sorted(p.name for p in (other / "train").glob("*.png"))):
        new = f"0016E5_wide{i}.png"
        for folder in ("train", "trainannot"):
            (other / folder / name).rename(root / folder / new)
        lines += f"/SegNet/CamVid/train/{new} /SegNet/CamVid/trainannot/{new}\n"
    (root / "train.txt").write_text(lines)
    return root


def test_from_folder_puts_every_example_on_one_canvas(mixed_folder):
    """Each example sits at the canvas's top left as PIL decodes it, with its size; the rest is black and
    void."""
    split = reader.InMemorySplit.from_folder(mixed_folder, "train", VOID)
    assert len(split) == N + 2 and split.images.shape == (N + 2, 24, 40, 3) and split.images.dtype == np.uint8
    assert split.labels.shape == (N + 2, 24, 40) and split.sizes.dtype == np.int32
    assert {tuple(s) for s in split.sizes} == {(24, 32), (20, 40)}
    for image, label, (h, w), name in zip(split.images, split.labels, split.sizes, split.names, strict=True):
        np.testing.assert_array_equal(image[:h, :w], np.asarray(Image.open(mixed_folder / "train" / name)))
        np.testing.assert_array_equal(
            label[:h, :w], np.asarray(Image.open(mixed_folder / "trainannot" / name))
        )
        assert not image[h:].any() and not image[:, w:].any()
        assert np.all(label[h:] == VOID) and np.all(label[:, w:] == VOID)
    # Padding is void, so only real pixels are counted.
    counts = split.class_pixel_counts(11)
    real = np.concatenate(
        [lab[:h, :w].ravel() for lab, (h, w) in zip(split.labels, split.sizes, strict=True)]
    )
    np.testing.assert_array_equal(counts, np.bincount(real, minlength=12)[:11])
    assert split.sequences() == ["0001TP", "0006R0", "0016E5"]
    assert all(reader.sequence_of(n) != "0006R0" for n in split.without_sequence("0006R0").names)
    with pytest.raises(ValueError, match="0001TP, 0006R0, 0016E5"):
        split.without_sequence("0016E6")


def test_from_folder_refuses_bad_files(tmp_path):
    """A missing image, then masks with values above void, fail with a DatasetError naming each file."""
    root = make_fake_camvid(tmp_path / "bad", splits=("train",), n=3, with_list_files=False)
    names = sorted(p.name for p in (root / "train").glob("*.png"))
    (root / "train" / names[2]).unlink()
    with pytest.raises(camvid_folder.DatasetError, match=names[2]):
        reader.InMemorySplit.from_folder(root, "train", VOID)
    (root / "trainannot" / names[2]).unlink()
    for name in names[:2]:
        Image.fromarray(np.full((24, 32), 40, np.uint8)).save(root / "trainannot" / name)
    with pytest.raises(camvid_folder.DatasetError, match=f"(?s){names[0]}.*above 11.*{names[1]}"):
        reader.InMemorySplit.from_folder(root, "train", VOID)


def _batches(split, steps, **kwargs):
    """The first `steps` batches of `train_batches` with tiny.py's seed (or `seed`)."""
    config = tiny.get_config()
    config.seed = kwargs.pop("seed", config.seed)
    stream = reader.train_batches(split, config, **kwargs)
    return [next(stream) for _ in range(steps)]


def test_train_batches_resume_and_epochs(mixed_folder):
    """Batches of whole examples with their sizes and global indices; starting at step 3 continues the
    stream exactly; each epoch is a permutation of the split, reshuffled; another seed, another order."""
    split = reader.InMemorySplit.from_folder(mixed_folder, "train", VOID)
    n = len(split)
    full = _batches(split, 3 * n // 2, local_batch_size=2)  # three epochs
    assert full[0]["image"].shape == (2, 24, 40, 3) and full[0]["image"].dtype == np.uint8
    assert full[0]["label"].shape == (2, 24, 40) and full[0]["label"].dtype == np.uint8
    assert full[0]["size"].dtype == np.int32 and full[0]["index"].dtype == np.int32
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in full]), np.arange(3 * n))
    for resumed, batch in zip(_batches(split, 3, local_batch_size=2, start_step=3), full[3:6], strict=True):
        for key in batch:
            np.testing.assert_array_equal(resumed[key], batch[key])
    order = []
    for batch in full:  # labels and sizes travel with their images
        for image, label, size in zip(batch["image"], batch["label"], batch["size"], strict=True):
            j = next(j for j in range(n) if np.array_equal(image, split.images[j]))
            np.testing.assert_array_equal(label, split.labels[j])
            np.testing.assert_array_equal(size, split.sizes[j])
            order.append(j)
    epochs = [order[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    other = _batches(split, n // 2, local_batch_size=2, seed=1)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(full, other, strict=False))


def test_train_batches_process_slices(mixed_folder):
    """Two processes' local batches, process 0 first, equal the single-process global batch."""
    split = reader.InMemorySplit.from_folder(mixed_folder, "train", VOID)
    single = _batches(split, 3, local_batch_size=4, start_step=1)
    shards = [
        _batches(split, 3, local_batch_size=2, start_step=1, process_index=p, process_count=2)
        for p in range(2)
    ]
    for step in range(3):
        for key in single[step]:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, single[step][key])


def test_epoch_order_is_a_fixed_permutation():
    """The order is a permutation, the same on every call, different across epochs and seeds."""
    a = reader.epoch_order(0, 0, 367)
    assert sorted(a) == list(range(367))
    np.testing.assert_array_equal(a, reader.epoch_order(0, 0, 367))
    assert not np.array_equal(a, reader.epoch_order(0, 1, 367))
    assert not np.array_equal(a, reader.epoch_order(1, 0, 367))


def test_eval_batches_pad_and_cover_each_example_once(mixed_folder):
    """8 examples in batches of 3: three batches, the last padded; with two processes, as many batches
    each, every example once; a sequence's frames alone."""
    split = reader.InMemorySplit.from_folder(mixed_folder, "train", VOID)
    batches = list(reader.eval_batches(split, 3))
    assert [b["mask"].tolist() for b in batches] == [[True] * 3, [True] * 3, [True, True, False]]
    assert batches[-1]["label"].dtype == np.int32 and not batches[-1]["image"][2].any()
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[:8], split.images)
    per_process = [list(reader.eval_batches(split, 2, p, 2)) for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == 2
    rows = [
        image
        for batches in per_process
        for b in batches
        for image, real in zip(b["image"], b["mask"], strict=True)
        if real
    ]
    assert len(rows) == 8 and all(any(np.array_equal(r, i) for r in rows) for i in split.images)
    wide = [b for b in reader.eval_batches(split, 4, sequence="0016E5")]
    assert len(wide) == 1 and wide[0]["mask"].tolist() == [True, True, False, False]
    with pytest.raises(camvid_folder.DatasetError, match="0016E6"):
        list(reader.eval_batches(split, 4, sequence="0016E6"))
