"""CamVid's folder layout, read without TensorFlow: find a local folder, list a split's (image, mask) pairs,
decode and check them.

`fastscnn_jax.camvid` (the TFDS builder) and the TensorFlow-free reader (`fastscnn_jax.reader`) both read
folders through these functions; `camvid` re-exports them under their old names.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib

import numpy as np
from PIL import Image

from fastscnn_jax.classes import IGNORE_LABEL
from fastscnn_jax.images import open_image

SPLITS = ("train", "val", "test")
ENV_VAR = "CAMVID_DIR"

# PIL errors raised by unreadable, truncated, corrupt or oversized files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """Missing or bad data (of any dataset); the message lists every problem found, one per line."""

    def __init__(self, message: str, problems: list[str] | tuple[str, ...] = ()):
        """Builds the message from a headline and the list of problems (each naming its file)."""
        self.problems = list(problems)
        if self.problems:
            message += f" ({len(self.problems)} problem(s)):\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


def _is_camvid_dir(path: pathlib.Path) -> bool:
    """Whether `path` holds `train/` and `trainannot/`."""
    return (path / "train").is_dir() and (path / "trainannot").is_dir()


def find_camvid_dir(dataset_dir: str = "") -> pathlib.Path | None:
    """Finds a local CamVid folder.

    Args:
      dataset_dir: explicit folder; if given it must be a CamVid folder.

    Returns:
      `dataset_dir` if given, else $CAMVID_DIR if set, else the first CamVid folder among
      `../shared/camvid` relative to the repository root and to the current directory, else
      None (the caller downloads).

    Raises:
      DatasetError: `dataset_dir` or $CAMVID_DIR is given but is not a CamVid folder.
    """
    # An explicit choice that is wrong is an error, never silently replaced by another copy.
    for given, what in ((dataset_dir, "dataset_dir"), (os.environ.get(ENV_VAR, ""), f"${ENV_VAR}")):
        if given:
            path = pathlib.Path(given).expanduser().resolve()
            if not _is_camvid_dir(path):
                raise DatasetError(f"{what}={path} is not a CamVid folder: it needs train/ and trainannot/")
            return path
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    for base in (repo_root, pathlib.Path.cwd()):
        path = (base.parent / "shared" / "camvid").resolve()
        if _is_camvid_dir(path):
            return path
    return None


def available_splits(root: str | os.PathLike) -> list[str]:
    """Splits present in a CamVid folder (those whose `<split>/` folder exists), in SPLITS order.

    Args:
      root: CamVid folder.

    Returns:
      Split names, e.g. ['train', 'val'].
    """
    return [s for s in SPLITS if (pathlib.Path(root) / s).is_dir()]


def list_split(root: str | os.PathLike, split: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Lists the (image, mask) pairs of a split.

    Args:
      root: CamVid folder.
      split: split name, e.g. 'train'.

    Returns:
      Pairs in the order of `<split>.txt` when present (its absolute paths are resolved by
      their last two components, `<split>/x.png`, inside `root`), else matched by file name
      between `<split>/*.png` and `<split>annot/*.png`, sorted by file name.

    Raises:
      DatasetError: listing every missing file, unpaired image or mask, duplicate or
        malformed list entry, or an empty split.
    """
    root = pathlib.Path(root)
    list_file = root / f"{split}.txt"
    problems, pairs = [], []
    if list_file.is_file():
        seen = set()
        for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
            fields = line.split()
            where = f"{list_file}:{lineno}"
            if not fields:
                continue
            if len(fields) != 2:
                problems.append(f'{where}: expected "image mask", got {line!r}')
                continue
            image, mask = (root.joinpath(*pathlib.PurePosixPath(f).parts[-2:]) for f in fields)
            missing = [str(p) for p in (image, mask) if not p.is_file()]
            if missing:
                problems.append(f"{where}: missing file {' and '.join(missing)}")
            elif image.name in seen:  # File names are the TFDS keys: they must be unique.
                problems.append(f"{where}: {image} listed twice")
            else:
                seen.add(image.name)
                pairs.append((image, mask))
    else:
        image_dir, mask_dir = root / split, root / f"{split}annot"
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                problems.append(f"{folder}: folder missing")
        images = {p.name: p for p in image_dir.glob("*.png")}
        masks = {p.name: p for p in mask_dir.glob("*.png")}
        problems += [
            f"{images[n]}: image has no mask {mask_dir / n}" for n in sorted(images.keys() - masks.keys())
        ]
        problems += [
            f"{masks[n]}: mask has no image {image_dir / n}" for n in sorted(masks.keys() - images.keys())
        ]
        pairs = [(images[n], masks[n]) for n in sorted(images.keys() & masks.keys())]
    if not pairs and not problems:
        problems.append(f"{list_file if list_file.is_file() else root / split}: split {split!r} is empty")
    if problems:
        raise DatasetError(f"CamVid split {split!r} in {root} is bad", problems)
    return pairs


def _open_full(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image, raising on truncated, corrupt or oversized files."""
    with open_image(path) as im:
        im.verify()  # Checks every chunk's CRC up to IEND, which decoding alone does not.
    im = open_image(path)
    try:
        im.load()  # Full decode now, so bad files fail here and not halfway through TFDS.
    except BaseException:
        im.close()
        raise
    return im


def validate_pair(
    image_path: str | os.PathLike, mask_path: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray] | str:
    """Decodes and checks one image and its mask.

    Args:
      image_path: PNG image; grayscale, RGBA and palette images are converted to RGB.
      mask_path: 8-bit mask; an 'L' mask gives its values, a palette ('P') mask its indices.

    Returns:
      (image uint8 [H, W, 3], mask uint8 [H, W]), or a string naming every problem found
      (unreadable or truncated file, unsupported mask mode, size mismatch, values > 11).
    """
    problems, image, mask = [], None, None
    try:
        with _open_full(image_path) as im:
            image = np.asarray(im.convert("RGB"))
    except _DECODE_ERRORS as e:
        problems.append(f"{image_path}: unreadable image ({e})")
    try:
        with _open_full(mask_path) as m:
            # Palette masks store labels as indices: asarray keeps them, convert('L') would not.
            if m.mode in ("L", "P", "I", "I;16"):
                mask = np.asarray(m)
            else:
                problems.append(
                    f"{mask_path}: mask mode {m.mode}, expected 8-bit grayscale (L) or palette (P)"
                )
    except _DECODE_ERRORS as e:
        problems.append(f"{mask_path}: unreadable mask ({e})")
    if mask is not None:
        bad = np.unique(mask[mask > IGNORE_LABEL])
        if bad.size:
            problems.append(f"{mask_path}: mask values {bad[:8].tolist()} above {IGNORE_LABEL}")
        mask = mask.astype(np.uint8)
    if image is not None and mask is not None and image.shape[:2] != mask.shape:
        problems.append(
            f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but mask {mask_path} is "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )
    return "; ".join(problems) if problems else (image, mask)


def _check_pairs(pairs: list[tuple[pathlib.Path, pathlib.Path]]) -> list[str]:
    """Problems of all pairs, decoded in threads (PIL releases the GIL while decoding)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda p: validate_pair(*p), pairs)
        return [r for r in results if isinstance(r, str)]
