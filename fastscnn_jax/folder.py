"""Your own data as a TFDS dataset: a folder of images and masks with a `classes.json`.

Layout:

  DIR/classes.json                 {"names": [...], "colors": [[r, g, b], ...], "ignore_label": 255}
  DIR/train/images/NAME.png|.jpg   DIR/train/masks/NAME.png
  DIR/val/images/...               DIR/val/masks/...
  DIR/test/...                     (optional)

A mask is a single-channel PNG of class indices (grayscale or palette mode), or an RGB PNG in the colours of
`classes.json` (void in its optional `ignore_color`, default black). Images in a split may differ in size.
As for CamVid, every pair is decoded and checked before anything is written, and all problems are raised at
once in one `DatasetError`, each naming its file: an image without a mask (or a mask without an image), a
mask colour that is not in the palette, a mask value that is neither a class nor the ignore label, a size
mismatch, an unreadable file, or a missing `classes.json`. The prepared dataset stores every mask as class
indices, with the features of CamVid's builder, so the rest of the pipeline cannot tell the two apart.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from fastscnn_jax import camvid, camvid_folder, classes, datasets

CLASSES_FILE = datasets.CLASSES_FILE
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def available_splits(root: str | os.PathLike) -> list[str]:
    """Splits present (those with a `<split>/images/` folder), in SPLITS order."""
    return [s for s in SPLITS if (pathlib.Path(root) / s / "images").is_dir()]


def list_split(root: str | os.PathLike, split: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(image, mask) pairs of a split, matched by file name without extension, sorted by name.

    Raises:
      DatasetError: listing every missing folder, image without a mask, mask without an image, name used by
        two images (`a.png` and `a.jpg`), or an empty split.
    """
    root = pathlib.Path(root)
    image_dir, mask_dir = root / split / "images", root / split / "masks"
    problems = [f"{d}: folder missing" for d in (image_dir, mask_dir) if not d.is_dir()]
    images: dict[str, pathlib.Path] = {}
    for path in sorted(image_dir.glob("*")) if image_dir.is_dir() else []:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            problems.append(f"{path}: same name as {images[path.stem]}; names must be unique in a split")
        images[path.stem] = path
    masks = {p.stem: p for p in sorted(mask_dir.glob("*.png"))} if mask_dir.is_dir() else {}
    problems += [
        f"{images[n]}: image has no mask {mask_dir / (n + '.png')}"
        for n in sorted(images.keys() - masks.keys())
    ]
    problems += [
        f"{masks[n]}: mask has no image in {image_dir}" for n in sorted(masks.keys() - images.keys())
    ]
    pairs = [(images[n], masks[n]) for n in sorted(images.keys() & masks.keys())]
    if not pairs and not problems:
        problems.append(f"{image_dir}: split {split!r} is empty")
    if problems:
        raise camvid.DatasetError(f"split {split!r} in {root} is bad", problems)
    return pairs


def _color_codes(rgb: np.ndarray) -> np.ndarray:
    """One integer per colour, r * 65536 + g * 256 + b."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def mask_indices(mask: np.ndarray, mode: str, class_info: classes.Classes, path) -> np.ndarray | str:
    """Class indices uint8 [H, W] of a decoded mask, or a string naming what is wrong with it.

    Args:
      mask: the mask as PIL gives it (`mode` 'L', 'P', 'I;16', 'I': values; 'RGB', 'RGBA': colours).
      mode: its PIL mode.
      class_info: the dataset's classes.
      path: the file, for messages.
    """
    num_classes, ignore = class_info.num_classes, class_info.ignore_label
    if mode in ("RGB", "RGBA"):
        codes = _color_codes(mask[..., :3])
        palette = _color_codes(np.asarray([*class_info.colors, class_info.ignore_color]))
        lookup = dict(zip(palette.tolist(), [*range(num_classes), ignore], strict=True))
        found, inverse = np.unique(codes, return_inverse=True)
        unknown = [c for c in found.tolist() if c not in lookup]
        if unknown:
            described = []
            for code in unknown[:5]:
                row, col = np.argwhere(codes == code)[0]
                colour = (code >> 16, (code >> 8) & 255, code & 255)
                described.append(f"{colour} (first at row {row}, column {col})")
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            return f"{path}: mask colours not in {CLASSES_FILE}: {', '.join(described)}{more}"
        return np.asarray([lookup[c] for c in found.tolist()], np.uint8)[inverse.reshape(codes.shape)]
    if mode not in ("L", "P", "I;16", "I"):
        return f"{path}: mask mode {mode}, expected class indices (8-bit grayscale or palette) or RGB colours"
    bad = np.unique(mask[(mask >= num_classes) & (mask != ignore)])
    if bad.size:
        return (
            f"{path}: mask values {bad[:8].tolist()} are neither classes 0..{num_classes - 1} nor the "
            f"ignore label {ignore}"
        )
    return mask.astype(np.uint8)


def validate_pair(image_path, mask_path, class_info: classes.Classes) -> tuple[np.ndarray, np.ndarray] | str:
    """Decodes and checks one image and its mask: (image uint8 [H, W, 3], class indices uint8 [H, W]), or a
    string naming every problem found."""
    problems, image, mask = [], None, None
    try:
        with camvid_folder._open_full(image_path) as im:
            image = np.asarray(im.convert("RGB"))
    except camvid_folder._DECODE_ERRORS as e:
        problems.append(f"{image_path}: unreadable image ({e})")
    try:
        with camvid_folder._open_full(mask_path) as m:
            mask = mask_indices(np.asarray(m), m.mode, class_info, mask_path)
    except camvid_folder._DECODE_ERRORS as e:
        problems.append(f"{mask_path}: unreadable mask ({e})")
    if isinstance(mask, str):
        problems.append(mask)
        mask = None
    if image is not None and mask is not None and image.shape[:2] != mask.shape:
        problems.append(
            f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but mask {mask_path} is "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )
    return "; ".join(problems) if problems else (image, mask)


class Folder(tfds.core.GeneratorBasedBuilder):
    """A dataset folder: 'image' uint8 [H, W, 3], 'label' uint8 [H, W, 1] (class indices), 'file_name'.

    Each source folder is its own builder config, named by a digest of its path and its `classes.json`, so
    one TFDS data folder can hold several datasets, and editing the classes prepares anew.
    """

    name = "segmentation_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images and masks of a folder with a classes.json."}

    def __init__(self, *, source_dir: str | os.PathLike, **kwargs):
        """Builder of the folder `source_dir`; `kwargs` go to tfds (data_dir, ...)."""
        self._source_dir = pathlib.Path(source_dir).expanduser().resolve()
        self._classes = datasets.read_classes(self._source_dir)
        digest = hashlib.sha256(str(self._source_dir).encode())
        digest.update((self._source_dir / CLASSES_FILE).read_bytes())
        config = tfds.core.BuilderConfig(
            name=f"d{digest.hexdigest()[:16]}", version=self.VERSION, description=str(self._source_dir)
        )
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        """CamVid's features; disable_shuffling keeps examples in file-name order."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images and class-index masks of a dataset folder.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "file_name": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """One generator per split present; raises DatasetError listing every bad file first."""
        del dl_manager
        folder = self._source_dir
        splits = available_splits(folder)
        if "train" not in splits:
            raise camvid.DatasetError(
                f"{folder / 'train' / 'images'}: folder missing (every dataset needs train)"
            )
        pairs, problems = {}, []
        for split in splits:
            try:
                pairs[split] = list_split(folder, split)
            except camvid.DatasetError as e:
                problems += e.problems
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for split_pairs in pairs.values():
                results = pool.map(lambda p: validate_pair(*p, self._classes), split_pairs)
                problems += [r for r in results if isinstance(r, str)]
        if problems:
            raise camvid.DatasetError(f"bad dataset folder {folder}", problems)
        self.info.metadata["source"] = str(folder)
        self.info.metadata["classes"] = self._classes.to_json()
        return {split: self._generate_examples(p) for split, p in pairs.items()}

    def _generate_examples(self, pairs: list[tuple[pathlib.Path, pathlib.Path]]):
        """Yields (file name, example) in file-name order; pairs were validated already."""
        for image_path, mask_path in pairs:
            # 8-bit RGB PNGs decode in TF to what PIL gives: stored as they are. Masks always go through
            # `validate_pair`, which turns colours into indices.
            image = camvid._stored_png(image_path, 2)
            decoded = validate_pair(image_path, mask_path, self._classes)
            if isinstance(decoded, str):  # Changed on disk since validation.
                raise camvid.DatasetError("bad dataset file", [decoded])
            yield (
                image_path.name,
                {
                    "image": decoded[0] if image is None else image,
                    "label": decoded[1][..., None],
                    "file_name": image_path.name,
                },
            )


def get_builder(dataset_dir: str, data_dir: str | None = None) -> Folder:
    """Returns the prepared builder of a dataset folder, preparing it first unless `data_dir` holds it.

    Several processes may call it at once, as for `camvid.get_builder`.

    Raises:
      DatasetError: no `dataset_dir`, or missing or bad data (see `Folder`).
    """
    if not dataset_dir:
        raise camvid.DatasetError("config.dataset='folder' needs config.dataset_dir, the dataset folder")
    return camvid.prepare(
        lambda: Folder(source_dir=dataset_dir, data_dir=data_dir), f"dataset folder {dataset_dir}"
    )
