"""tf.data input pipelines: augmented training crops and full-resolution evaluation batches.

Training is indexed by a global example counter rather than by a stateful shuffle: example `i` of the stream
belongs to epoch `i // n`, is picked by a stateless per-epoch permutation, and is augmented with the stateless
seed `(seed, i)`. So the stream is a pure function of (seed, i): a run restarted at step N continues with the
exact batches it would have seen, and each process of a multi-host job takes its own slice of every global
batch. Encoded PNGs of the (small) training split are kept in memory and decoded per example.
"""

from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fastscnn_jax import camvid


def sequence_of(file_name: str) -> str:
    """The CamVid sequence a frame belongs to: its file name up to the first '_' ('0006R0_f02310.png' ->
    '0006R0')."""
    return file_name.split("_", 1)[0]


class InMemorySplit:
    """A split's encoded images and masks, in file order, with its label statistics."""

    def __init__(self, images: list[bytes], labels: list[bytes], names: list[str]):
        """Holds the PNG bytes of each example."""
        if not images:
            raise ValueError("empty split")
        self.images = images
        self.labels = labels
        self.names = names

    @classmethod
    def from_builder(cls, builder, split: str) -> "InMemorySplit":
        """Reads a prepared split without decoding it."""
        images, labels, names = [], [], []
        for ex in tfds.as_numpy(camvid.load_split(builder, split, decode=False)):
            images.append(ex["image"])
            labels.append(ex["label"])
            names.append(ex["file_name"].decode())
        return cls(images, labels, names)

    @classmethod
    def concatenate(cls, splits: list["InMemorySplit"]) -> "InMemorySplit":
        """The examples of `splits`, one after the other."""
        return cls(
            [x for s in splits for x in s.images],
            [x for s in splits for x in s.labels],
            [x for s in splits for x in s.names],
        )

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.images)

    def sequences(self) -> list[str]:
        """The sequences of the split's frames, sorted."""
        return sorted({sequence_of(name) for name in self.names})

    def without_sequence(self, sequence: str) -> "InMemorySplit":
        """The split without the frames of `sequence` (which must have some)."""
        keep = [i for i, name in enumerate(self.names) if sequence_of(name) != sequence]
        if len(keep) == len(self):
            raise ValueError(
                f"no frame of sequence {sequence!r}; the split has {', '.join(self.sequences())}"
            )
        return InMemorySplit(
            [self.images[i] for i in keep], [self.labels[i] for i in keep], [self.names[i] for i in keep]
        )

    def class_pixel_counts(self, num_classes: int) -> np.ndarray:
        """Pixels of each class 0..num_classes-1 over the split (void and other values ignored)."""
        counts = np.zeros(num_classes, np.int64)
        for png in self.labels:
            mask = tf.io.decode_png(png, channels=1).numpy().reshape(-1)
            counts += np.bincount(mask, minlength=256)[:num_classes]
        return counts


def augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, config) -> tuple[tf.Tensor, tf.Tensor]:
    """Joint random scale, pad-and-crop and flip, then photometric jitter of the image alone.

    Args:
      image: [H, W, 3] uint8 or float (0..255).
      label: [H, W, 1] uint8.
      seed: int64 [2] stateless seed; every random choice derives from it, so geometry cannot drift
        between image and mask.
      config: the data keys of the config (`crop_size`, `min_scale`, `max_scale`, `flip`, `brightness`,
        `contrast`, `saturation`, `hue`, `ignore_label`).

    Returns:
      image [crop_h, crop_w, 3] float32 in 0..255 and label [crop_h, crop_w] int32.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=7)
    image = tf.cast(image, tf.float32)
    label = tf.cast(label, tf.float32)
    crop_h, crop_w = config.crop_size

    scale = tf.random.stateless_uniform([], seeds[0], config.min_scale, config.max_scale)
    size = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * scale), tf.int32)
    size = tf.maximum(size, 1)
    image = tf.image.resize(image, size, method="bilinear")
    label = tf.image.resize(label, size, method="nearest")

    # Image and mask travel as one tensor through padding, crop and flip. Padding marks the mask void and
    # the image -1 (told apart from black, then set to 0).
    both = tf.concat([image + 1.0, label - float(config.ignore_label)], axis=-1)
    pad_h = tf.maximum(crop_h - size[0], 0)
    pad_w = tf.maximum(crop_w - size[1], 0)
    both = tf.pad(both, [[0, pad_h], [0, pad_w], [0, 0]])
    both = tf.image.stateless_random_crop(both, [crop_h, crop_w, 4], seeds[1])
    if config.flip:
        both = tf.image.stateless_random_flip_left_right(both, seeds[2])
    image = tf.maximum(both[..., :3] - 1.0, 0.0)
    label = tf.cast(tf.round(both[..., 3] + float(config.ignore_label)), tf.int32)

    image = image / 255.0
    if config.brightness > 0:
        image = tf.image.stateless_random_brightness(image, config.brightness, seeds[3])
    if config.contrast > 0:
        image = tf.image.stateless_random_contrast(image, 1 - config.contrast, 1 + config.contrast, seeds[4])
    if config.saturation > 0:
        image = tf.image.stateless_random_saturation(
            image, 1 - config.saturation, 1 + config.saturation, seeds[5]
        )
    if config.hue > 0:
        image = tf.image.stateless_random_hue(image, config.hue, seeds[6])
    image = tf.clip_by_value(image, 0.0, 1.0) * 255.0
    return image, label


def train_dataset(
    split: InMemorySplit,
    config,
    *,
    local_batch_size: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Endless stream of augmented batches for this process, starting at global step `start_step`.

    Args:
      split: the training examples.
      config: the full config (`seed` and the keys `augment` reads).
      local_batch_size: examples per step on this process.
      start_step: first step to produce (resume).
      process_index: this process's slice of each global batch.
      process_count: number of processes sharing the global batch.

    Returns:
      dataset of dicts `image` [b, h, w, 3] float32, `label` [b, h, w] int32.
    """
    n = len(split)
    global_batch = local_batch_size * process_count
    images = tf.constant(split.images)
    labels = tf.constant(split.labels)
    seed = tf.constant(config.seed, tf.int64)

    def example(i):
        """Example `i` of the global stream, decoded and augmented."""
        epoch, pos = i // n, i % n
        index = tf.random.experimental.index_shuffle(pos, tf.stack([seed, epoch]), n - 1)
        image = tf.io.decode_png(images[index], channels=3)
        label = tf.io.decode_png(labels[index], channels=1)
        image, label = augment(image, label, tf.stack([seed, i]), config)
        return {"image": image, "label": label}

    first = start_step * global_batch + process_index * local_batch_size
    ds = tf.data.Dataset.range(first, np.iinfo(np.int64).max, global_batch)
    ds = ds.flat_map(lambda s: tf.data.Dataset.range(s, s + local_batch_size))
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_batches(
    builder,
    split_name: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    sequence: str = "",
) -> Iterator[dict[str, np.ndarray]]:
    """Full-resolution batches of a split (only the frames of `sequence`, if given), the last padded, with
    `mask` marking real examples.

    Each process gets every `process_count`-th batch of the global sequence; all processes yield the same
    number of batches (extra ones fully padded), so each example counts exactly once.
    """
    ds = camvid.load_split(builder, split_name)
    num_examples = builder.info.splits[split_name].num_examples
    if sequence:
        names = tfds.as_numpy(
            camvid.load_split(builder, split_name, decode=False).map(lambda ex: ex["file_name"])
        )
        num_examples = sum(sequence_of(name.decode()) == sequence for name in names)
        if not num_examples:
            raise camvid.DatasetError(f'sequence "{sequence}" has no frames in split "{split_name}"')
        prefix = tf.constant(f"{sequence}_")
        ds = ds.filter(lambda ex: tf.strings.substr(ex["file_name"], 0, len(sequence) + 1) == prefix)
    num_batches = -(-num_examples // (batch_size * process_count)) * process_count
    ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"][..., 0], tf.int32)})
    it = iter(tfds.as_numpy(ds.batch(batch_size).prefetch(2)))
    template = None
    for b in range(num_batches):
        batch = next(it, None)
        if batch is None:
            batch = {k: v[:0] for k, v in template.items()}
        template = batch
        if b % process_count != process_index:
            continue
        real = len(batch["image"])
        pad = batch_size - real
        out = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        out["mask"] = np.arange(batch_size) < real
        yield out
