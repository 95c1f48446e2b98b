"""A split as decoded arrays in memory, and its training and evaluation batches made with numpy, without
TensorFlow.

Every example is kept whole on the split's canvas, the largest height and width among its examples: smaller
images are padded black at the bottom and right, their labels with `ignore_label`, and each example's own
(height, width) is kept beside it. `augmentation` turns these into training crops inside the train step.

Training is indexed by a global example counter rather than by a stateful shuffle: example `i` of the stream
belongs to epoch `i // n` and is the split's example `epoch_order(seed, epoch, n)[i % n]`. So the batches are
a pure function of (seed, step): a run restarted at step N continues with the batches it would have seen, and
each process of a multi-host job takes its own slice of every global batch. `input_pipeline.train_dataset`
batches in this order with tf.data where TensorFlow is installed; `train_batches` yields the same batches
with numpy.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
from collections.abc import Iterator, Sequence

import numpy as np

from fastscnn_jax import camvid_folder


def sequence_of(file_name: str) -> str:
    """The CamVid sequence a frame belongs to: its file name up to the first '_' ('0006R0_f02310.png' ->
    '0006R0')."""
    return file_name.split("_", 1)[0]


class InMemorySplit:
    """A split's decoded examples on one canvas, in file order.

    Attributes:
      images: uint8 [N, H, W, 3].
      labels: uint8 [N, H, W].
      sizes: int32 [N, 2], each example's (height, width) at the canvas's top left.
      names: each example's file name.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, sizes: np.ndarray, names: Sequence[str]):
        """Holds canvas arrays as they are (`from_examples` makes them from examples of any size)."""
        if not len(images):
            raise ValueError("empty split")
        self.images, self.labels, self.sizes, self.names = images, labels, sizes, list(names)

    @classmethod
    def from_examples(
        cls,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        names: Sequence[str],
        ignore_label: int,
    ) -> InMemorySplit:
        """Pads each (image uint8 [h, w, 3], label uint8 [h, w]) pair to the largest height and width."""
        if not images:
            raise ValueError("empty split")
        sizes = np.asarray([label.shape[:2] for label in labels], np.int32)
        height, width = sizes.max(0)
        canvas_images = np.zeros((len(images), height, width, 3), np.uint8)
        canvas_labels = np.full((len(images), height, width), ignore_label, np.uint8)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            h, w = label.shape[:2]
            canvas_images[i, :h, :w] = image
            canvas_labels[i, :h, :w] = label.reshape(h, w)
        return cls(canvas_images, canvas_labels, sizes, names)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, split: str, ignore_label: int) -> InMemorySplit:
        """Reads a split of a CamVid folder with PIL (`camvid_folder.list_split`, `validate_pair`).

        Raises:
          camvid_folder.DatasetError: listing every missing, unpaired or bad file.
        """
        pairs = camvid_folder.list_split(root, split)
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            decoded = list(pool.map(lambda pair: camvid_folder.validate_pair(*pair), pairs))
        problems = [d for d in decoded if isinstance(d, str)]
        if problems:
            raise camvid_folder.DatasetError(f"bad CamVid split {split!r} in {root}", problems)
        images, labels = zip(*decoded, strict=True)
        return cls.from_examples(images, labels, [image.name for image, _ in pairs], ignore_label)

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.images)

    def subset(self, keep: Sequence[int]) -> InMemorySplit:
        """The examples at positions `keep`, on the same canvas."""
        keep = np.asarray(keep, np.int64)
        names = [self.names[i] for i in keep]
        return InMemorySplit(self.images[keep], self.labels[keep], self.sizes[keep], names)

    def sequences(self) -> list[str]:
        """The sequences of the split's frames, sorted."""
        return sorted({sequence_of(name) for name in self.names})

    def without_sequence(self, sequence: str) -> InMemorySplit:
        """The split without the frames of `sequence` (which must have some)."""
        keep = [i for i, name in enumerate(self.names) if sequence_of(name) != sequence]
        if len(keep) == len(self):
            raise ValueError(
                f"no frame of sequence {sequence!r}; the split has {', '.join(self.sequences())}"
            )
        return self.subset(keep)

    def class_pixel_counts(self, num_classes: int) -> np.ndarray:
        """Pixels of each class 0..num_classes-1 over the split (void, canvas padding and other values
        ignored)."""
        counts = np.zeros(num_classes, np.int64)
        for label in self.labels:
            counts += np.bincount(label.reshape(-1), minlength=256)[:num_classes]
        return counts


def concatenate(splits: Sequence[InMemorySplit], ignore_label: int) -> InMemorySplit:
    """The examples of `splits` in order, on a canvas as large as the largest of theirs."""
    if len(splits) == 1:
        return splits[0]
    height = max(s.images.shape[1] for s in splits)
    width = max(s.images.shape[2] for s in splits)
    images = np.zeros((sum(map(len, splits)), height, width, 3), np.uint8)
    labels = np.full(images.shape[:3], ignore_label, np.uint8)
    first = 0
    for s in splits:
        h, w = s.images.shape[1:3]
        images[first : first + len(s), :h, :w] = s.images
        labels[first : first + len(s), :h, :w] = s.labels
        first += len(s)
    sizes = np.concatenate([s.sizes for s in splits])
    return InMemorySplit(images, labels, sizes, [name for s in splits for name in s.names])


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixed hash of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The split positions of epoch `epoch`'s examples: a permutation of range(n) fixed by (seed, epoch).

    Positions sorted by a hash of (seed, epoch, position), written out rather than taken from a numpy random
    generator, whose streams numpy does not promise to keep across versions: a run resumes to the same order
    wherever it runs.
    """
    with np.errstate(over="ignore"):
        key = _mix(np.asarray([seed % 2**64], np.uint64))
        key = _mix(key ^ np.asarray([epoch % 2**64], np.uint64))
        return np.argsort(_mix(key ^ np.arange(n, dtype=np.uint64)), kind="stable")


def batch_examples(
    seed: int, n: int, step: int, local_batch_size: int, process_index: int = 0, process_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """This process's part of global batch `step`: the examples' global indices (int32 [b], the
    augmentation's seeds) and their positions in the split (int64 [b])."""
    first = (step * process_count + process_index) * local_batch_size
    index = np.arange(first, first + local_batch_size, dtype=np.int64)
    epoch, position = np.divmod(index, n)
    for e in np.unique(epoch):
        position[epoch == e] = epoch_order(seed, int(e), n)[position[epoch == e]]
    # int32 on the device (JAX's default integer); streams of 2**31 examples are far beyond any recipe here.
    return index.astype(np.int32), position


def train_batches(
    split: InMemorySplit,
    config,
    *,
    local_batch_size: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless stream of this process's training batches of whole examples, from global step `start_step`.

    Args:
      split: the training examples.
      config: `seed`.
      local_batch_size: examples per step on this process.
      start_step: first step to produce (resume).
      process_index: this process's slice of each global batch.
      process_count: number of processes sharing the global batch.

    Yields:
      `image` uint8 [b, H, W, 3], `label` uint8 [b, H, W], `size` int32 [b, 2] and `index` int32 [b], the
      input of `augmentation.augment_batch`.
    """
    for step in itertools.count(start_step):
        index, position = batch_examples(
            config.seed, len(split), step, local_batch_size, process_index, process_count
        )
        yield {
            "image": split.images[position],
            "label": split.labels[position],
            "size": split.sizes[position],
            "index": index,
        }


def eval_batches(
    split: InMemorySplit,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    sequence: str = "",
) -> Iterator[dict[str, np.ndarray]]:
    """Whole-canvas batches of a split (only the frames of `sequence`, if given), the last padded, with
    `mask` marking real examples, as `input_pipeline.eval_batches` gives them.

    Each process gets every `process_count`-th batch of the global sequence; all processes yield the same
    number of batches (extra ones fully padded), so each example counts exactly once. Canvas padding is void
    in the labels, so it is not scored.
    """
    if sequence:
        keep = [i for i, name in enumerate(split.names) if sequence_of(name) == sequence]
        if not keep:
            raise camvid_folder.DatasetError(f'sequence "{sequence}" has no frames in the split')
        split = split.subset(keep)
    num_batches = -(-len(split) // (batch_size * process_count)) * process_count
    for b in range(process_index, num_batches, process_count):
        rows = np.arange(b * batch_size, (b + 1) * batch_size)
        real = rows < len(split)
        rows = np.where(real, rows, 0)
        image = np.where(real[:, None, None, None], split.images[rows], 0)
        label = np.where(real[:, None, None], split.labels[rows], 0).astype(np.int32)
        yield {"image": image, "label": label, "mask": real}
