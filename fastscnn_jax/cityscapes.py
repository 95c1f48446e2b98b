"""Cityscapes (fine annotations) as a TFDS dataset, read from the official archives.

The user downloads `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` (registration at
https://www.cityscapes-dataset.com) into one folder, `config.dataset_dir`. The images and the `*_labelIds.png`
masks are read from the archives without extracting them. Label IDs become the 19 train IDs of the benchmark
(`LABEL_TO_TRAIN_ID`, from cityscapesScripts' labels.py); every other ID is void, 255. Train (2975 images)
and val (500) are prepared; test is not, its fine labels being withheld by the benchmark.

TFDS's own `cityscapes` builder reads the same archives, but it does not fit: it extracts them (11 GB) first,
fixes the image shape at 1024x2048 (a test cannot use a miniature), and stores the raw label IDs under other
feature names. This one stores train IDs with CamVid's features, so the pipeline cannot tell them apart.

Before anything is written, every archive member is listed and its PNG header read: an image without a label
(or the reverse), a file that is not an 8-bit PNG of the expected kind, or an image and label of different
sizes are all raised in one `DatasetError`, as for CamVid.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from fastscnn_jax import camvid
from fastscnn_jax.images import open_image

IMAGES_ZIP = "leftImg8bit_trainvaltest.zip"
LABELS_ZIP = "gtFine_trainvaltest.zip"
SPLITS = ("train", "val")
IGNORE_LABEL = 255
# Label ID -> train ID of the 19 evaluated classes (classes.CITYSCAPES' order); the rest are void.
LABEL_TO_TRAIN_ID = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
_LOOKUP = np.full(256, IGNORE_LABEL, np.uint8)
_LOOKUP[list(LABEL_TO_TRAIN_ID)] = list(LABEL_TO_TRAIN_ID.values())
# A member larger than this is refused before it is read (a full-size image is about 2-3 MB).
MAX_MEMBER_BYTES = 64 * 2**20

_IMAGE = re.compile(r"leftImg8bit/(?P<split>[a-z]+)/(?P<city>[^/]+)/(?P<id>[^/]+)_leftImg8bit\.png")
_LABEL = re.compile(r"gtFine/(?P<split>[a-z]+)/(?P<city>[^/]+)/(?P<id>[^/]+)_gtFine_labelIds\.png")


def train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Train IDs (0..18, void 255) of a `*_labelIds.png` mask."""
    return _LOOKUP[label_ids]


def _png_header(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> tuple[int, int, int, int] | None:
    """(height, width, bit depth, colour type) from a PNG member's IHDR, or None if it is not a PNG."""
    with archive.open(member) as f:
        head = f.read(26)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big"), head[24], head[25]


def list_pairs(
    images: zipfile.ZipFile, labels: zipfile.ZipFile, where: dict[zipfile.ZipFile, pathlib.Path]
) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """({split: [(image member, label member)] sorted by image ID}, problems) of the two archives.

    Problems: a train or val image without its label or the reverse, a member over MAX_MEMBER_BYTES, an
    image that is not an 8-bit RGB PNG, a label that is not an 8-bit grayscale PNG, sizes that differ.
    """
    found: dict[str, dict[str, dict[str, zipfile.ZipInfo]]] = {s: {"image": {}, "label": {}} for s in SPLITS}
    for archive, pattern, kind in ((images, _IMAGE, "image"), (labels, _LABEL, "label")):
        for member in archive.infolist():
            match = pattern.fullmatch(member.filename)
            if match and match["split"] in SPLITS:
                found[match["split"]][kind][match["id"]] = member
    pairs, problems = {}, []
    for split in SPLITS:
        image_members, label_members = found[split]["image"], found[split]["label"]
        problems += [
            f"{where[images]}: {image_members[i].filename} has no label {i}_gtFine_labelIds.png in "
            f"{where[labels]}"
            for i in sorted(image_members.keys() - label_members.keys())
        ]
        problems += [
            f"{where[labels]}: {label_members[i].filename} has no image in {where[images]}"
            for i in sorted(label_members.keys() - image_members.keys())
        ]
        pairs[split] = []
        for image_id in sorted(image_members.keys() & label_members.keys()):
            image, label = image_members[image_id], label_members[image_id]
            bad = [m for m in (image, label) if m.file_size > MAX_MEMBER_BYTES]
            if bad:
                problems += [f"{m.filename}: {m.file_size} bytes, over {MAX_MEMBER_BYTES}" for m in bad]
                continue
            image_header, label_header = _png_header(images, image), _png_header(labels, label)
            if image_header is None or image_header[2:] != (8, 2):
                problems.append(f"{where[images]}: {image.filename} is not an 8-bit RGB PNG")
            elif label_header is None or label_header[2:] != (8, 0):
                problems.append(f"{where[labels]}: {label.filename} is not an 8-bit grayscale PNG")
            elif image_header[:2] != label_header[:2]:
                problems.append(
                    f"{image.filename} is {image_header[1]}x{image_header[0]} but {label.filename} is "
                    f"{label_header[1]}x{label_header[0]}"
                )
            else:
                pairs[split].append((image.filename, label.filename))
        if not pairs[split] and not problems:
            problems.append(
                f"{where[images]}: no {split} images (leftImg8bit/{split}/CITY/*_leftImg8bit.png)"
            )
    return pairs, problems


class Cityscapes(tfds.core.GeneratorBasedBuilder):
    """Cityscapes fine: 'image' uint8 [H, W, 3], 'label' uint8 [H, W, 1] (train IDs), 'file_name'."""

    name = "cityscapes_fine_trainids"  # 'cityscapes' is TFDS's own builder.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "leftImg8bit and gtFine train and val, labels as the 19 train IDs."}

    def __init__(self, *, source_dir: str | os.PathLike, **kwargs):
        """Builder reading the two archives in `source_dir`; `kwargs` go to tfds (data_dir, ...)."""
        self._source_dir = pathlib.Path(source_dir).expanduser().resolve()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        """CamVid's features; disable_shuffling keeps examples in image-ID order."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="Cityscapes fine annotations, 19 train IDs plus void (255).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "file_name": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
            homepage="https://www.cityscapes-dataset.com",
            metadata=tfds.core.MetadataDict(),
        )

    def _archives(self) -> tuple[pathlib.Path, pathlib.Path]:
        """The two archives' paths; DatasetError naming those missing."""
        paths = (self._source_dir / IMAGES_ZIP, self._source_dir / LABELS_ZIP)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise camvid.DatasetError(
                "Cityscapes archives missing: download them from https://www.cityscapes-dataset.com "
                "(registration needed) into config.dataset_dir",
                [f"{p}: missing" for p in missing],
            )
        return paths

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Train and val; raises DatasetError listing every problem of the archives first."""
        del dl_manager
        image_path, label_path = self._archives()
        try:
            with zipfile.ZipFile(image_path) as images, zipfile.ZipFile(label_path) as labels:
                pairs, problems = list_pairs(images, labels, {images: image_path, labels: label_path})
        except zipfile.BadZipFile as e:
            raise camvid.DatasetError(f"truncated or corrupt archive in {self._source_dir} ({e})") from None
        if problems:
            raise camvid.DatasetError(f"bad Cityscapes archives in {self._source_dir}", problems)
        self.info.metadata["source"] = str(self._source_dir)
        return {split: self._generate_examples(p) for split, p in pairs.items()}

    def _generate_examples(self, pairs: list[tuple[str, str]]):
        """Yields (image ID, example); the image PNGs are stored as they are, labels as train IDs."""
        image_path, label_path = self._archives()
        with zipfile.ZipFile(image_path) as images, zipfile.ZipFile(label_path) as labels:
            for image_member, label_member in pairs:
                try:
                    image = images.read(image_member)  # Checks the member's CRC.
                    with open_image(io.BytesIO(labels.read(label_member))) as im:
                        label_ids = np.asarray(im)
                except (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile) as e:
                    raise camvid.DatasetError(f"unreadable member of {self._source_dir}: {e}") from None
                file_name = pathlib.PurePosixPath(image_member).name
                yield (
                    file_name,
                    {"image": image, "label": train_ids(label_ids)[..., None], "file_name": file_name},
                )


def get_builder(dataset_dir: str, data_dir: str | None = None) -> Cityscapes:
    """Returns the prepared Cityscapes builder, preparing it first unless `data_dir` holds it.

    Several processes may call it at once, as for `camvid.get_builder`. A prepared dataset is reused as it
    is, wherever its archives now are.

    Raises:
      DatasetError: no `dataset_dir`, missing archives or bad members (see `Cityscapes`).
    """
    if not dataset_dir:
        raise camvid.DatasetError(
            f"config.dataset='cityscapes' needs config.dataset_dir, the folder holding {IMAGES_ZIP} and "
            f"{LABELS_ZIP}"
        )
    return camvid.prepare(lambda: Cityscapes(source_dir=dataset_dir, data_dir=data_dir), "Cityscapes")
