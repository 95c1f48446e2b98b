"""Where training and evaluation read a config's data from.

`open_source(config)` gives the dataset prepared by TFDS and read through tf.data (`input_pipeline`) where
TensorFlow and TFDS import. Where they do not (GPU images and Colab runtimes without TensorFlow), it gives a
local CamVid folder decoded with PIL into memory (`reader`). Both yield the same training batches, in the
same order (tests/input_pipeline_test.py), so a run resumes exactly on either, and the same evaluation
batches for CamVid, whose frames all have one size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from absl import logging

from fastscnn_jax import camvid_folder, reader, steps

_WHY_NO_TFDS = "not needed"  # why TFDS is not used, for FolderSource's errors
try:
    from fastscnn_jax import input_pipeline
except ImportError as e:  # TensorFlow or TFDS missing: CamVid folders only, through `reader`.
    input_pipeline = None
    _WHY_NO_TFDS = str(e)


class TFDSSource:
    """A dataset prepared by its TFDS builder (downloaded first if need be), read through tf.data."""

    def __init__(self, config, builder=None):
        """Prepares `config.dataset` (`input_pipeline.get_builder`), unless given its prepared `builder`."""
        self.builder = builder or input_pipeline.get_builder(config)
        self.ignore_label = config.ignore_label

    def read(self, split: str) -> reader.InMemorySplit:
        """A split ('train+val' for two) decoded into memory, in file order."""
        return input_pipeline.read_split(self.builder, split, self.ignore_label)

    def train_batches(self, split: reader.InMemorySplit, config, **kwargs) -> Iterator[dict[str, np.ndarray]]:
        """`input_pipeline.train_dataset` as numpy batches; `kwargs` as `reader.train_batches` takes them."""
        return input_pipeline.train_dataset(split, config, **kwargs).as_numpy_iterator()

    def eval_batches(
        self, split: str, batch_size: int, process_index: int, process_count: int, sequence: str = ""
    ) -> Iterator[dict[str, np.ndarray]]:
        """`input_pipeline.eval_batches`: each image at its own size."""
        return input_pipeline.eval_batches(
            self.builder, split, batch_size, process_index, process_count, sequence
        )


class FolderSource:
    """A local CamVid folder (the SegNet layout) decoded with PIL and kept in memory, without TensorFlow."""

    def __init__(self, config):
        """Finds the folder (`config.dataset_dir`, $CAMVID_DIR or ../shared/camvid).

        Raises:
          ConfigError: `config.dataset` is not 'camvid' (the others are prepared by TFDS).
          DatasetError: no CamVid folder is found (without TFDS nothing is downloaded).
        """
        if config.dataset != "camvid":
            raise steps.ConfigError(
                f"config.dataset={config.dataset!r} is read through TensorFlow Datasets, which does not "
                f"import here ({_WHY_NO_TFDS}); without it only a local CamVid folder can be read"
            )
        root = camvid_folder.find_camvid_dir(config.dataset_dir)
        if root is None:
            raise camvid_folder.DatasetError(
                f"TensorFlow Datasets does not import here ({_WHY_NO_TFDS}), so CamVid is read from a local "
                f"folder and not downloaded: set config.dataset_dir or ${camvid_folder.ENV_VAR}"
            )
        logging.info("Reading CamVid from %s with PIL (no TensorFlow here)", root)
        self.root = root
        self.ignore_label = config.ignore_label
        self._splits: dict[str, reader.InMemorySplit] = {}

    def read(self, split: str) -> reader.InMemorySplit:
        """A split ('train+val' for two, in that order, as TFDS sums them) decoded into memory, in file order.

        Raises:
          DatasetError: a missing split, or every missing or bad file of one.
        """
        for name in split.split("+"):
            if name not in self._splits:
                self._splits[name] = reader.InMemorySplit.from_folder(self.root, name, self.ignore_label)
        return reader.concatenate([self._splits[name] for name in split.split("+")], self.ignore_label)

    def train_batches(self, split: reader.InMemorySplit, config, **kwargs) -> Iterator[dict[str, np.ndarray]]:
        """`reader.train_batches`."""
        return reader.train_batches(split, config, **kwargs)

    def eval_batches(
        self, split: str, batch_size: int, process_index: int, process_count: int, sequence: str = ""
    ) -> Iterator[dict[str, np.ndarray]]:
        """`reader.eval_batches` on the split's canvas. The SegNet copy's frames are all 360x480, so each is
        evaluated at its own size, as through TFDS; a folder of mixed sizes would have its smaller frames
        evaluated padded (void, not scored) to the largest."""
        return reader.eval_batches(self.read(split), batch_size, process_index, process_count, sequence)


def keep_tensorflow_off_accelerators() -> None:
    """Hides the GPUs from TensorFlow, which only runs tf.data here and would otherwise take GPU memory that
    JAX needs; nothing to do without TensorFlow. Call before any TensorFlow op runs."""
    if input_pipeline is not None:
        input_pipeline.tf.config.set_visible_devices([], "GPU")


def open_source(config) -> TFDSSource | FolderSource:
    """The data of `config`: through TFDS where it imports, else a CamVid folder through `reader`."""
    if input_pipeline is not None:
        return TFDSSource(config)
    return FolderSource(config)
