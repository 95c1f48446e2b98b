"""Which dataset a config trains on: `config.dataset` is 'camvid', 'folder' (your own images and masks) or
'cityscapes'. This module gives the dataset's classes and the data settings a checkpoint records, without
TensorFlow; `sources` opens the data itself.

All three are prepared by TFDS builders (`camvid`, `folder`, `cityscapes`) with the same features ('image',
'label' as class indices, 'file_name'), so the input pipeline, the training loop and evaluation are the same
for every dataset.
"""

from __future__ import annotations

import os
import pathlib

import ml_collections

from fastscnn_jax import camvid_folder, classes, steps

DATASETS = ("camvid", "folder", "cityscapes")
# The classes of a folder dataset (README's "Your own data").
CLASSES_FILE = "classes.json"


def read_classes(root: str | os.PathLike) -> classes.Classes:
    """The classes of a dataset folder, from its `classes.json`.

    Raises:
      DatasetError: the folder or its `classes.json` is missing, or the file is malformed, naming it.
    """
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise camvid_folder.DatasetError(f"config.dataset_dir={root} is not a folder")
    try:
        return classes.Classes.read(root / CLASSES_FILE)
    except classes.ClassesError as e:
        raise camvid_folder.DatasetError(str(e)) from None


def dataset_classes(config: ml_collections.ConfigDict) -> classes.Classes:
    """The classes of `config.dataset`: CamVid's, Cityscapes' 19, or a folder's `classes.json`.

    Raises:
      ConfigError: an unknown `config.dataset`.
      DatasetError: a folder dataset without a readable `classes.json`.
    """
    if config.dataset == "camvid":
        return classes.CAMVID
    if config.dataset == "cityscapes":
        return classes.CITYSCAPES
    if config.dataset == "folder":
        return read_classes(config.dataset_dir)
    raise steps.ConfigError(f"config.dataset={config.dataset!r}: expected one of {', '.join(DATASETS)}")


def resolve(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, classes.Classes]:
    """(a copy of `config` whose `num_classes` and `ignore_label` are the dataset's, the classes).

    `num_classes` 0 and `ignore_label` -1 (configs/folder.py) mean "the dataset's"; any other value must
    match it, so a config cannot silently train another number of classes than its data has.

    Raises:
      ConfigError: an unknown dataset, or a `num_classes` or `ignore_label` that differs from the data's.
      DatasetError: see `dataset_classes`.
    """
    found = dataset_classes(config)
    problems = []
    if config.num_classes not in (0, found.num_classes):
        problems.append(
            f"config.num_classes={config.num_classes} but the data has {found.num_classes} classes"
        )
    if config.ignore_label not in (-1, found.ignore_label):
        problems.append(f"config.ignore_label={config.ignore_label} but the data's is {found.ignore_label}")
    if problems:
        raise steps.ConfigError(
            f"config.dataset={config.dataset!r}: {'; '.join(problems)} (0 and -1 take the data's)"
        )
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.num_classes = found.num_classes
    resolved.ignore_label = found.ignore_label
    return resolved, found


def data_settings(config: ml_collections.ConfigDict) -> dict:
    """The config's data keys as checkpoint metadata keeps them, so that evaluate and export find the data
    of a workdir with no other flag (`dataset_dir` made absolute)."""
    return {
        "dataset": config.dataset,
        "dataset_dir": _absolute(config.dataset_dir),
        "tfds_data_dir": _absolute(config.tfds_data_dir),
    }


def _absolute(path: str) -> str:
    """`path` absolute, `~` expanded; '' and URLs (gs://...) as they are."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))
