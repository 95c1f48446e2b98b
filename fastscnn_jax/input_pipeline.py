"""tf.data input pipelines, where TensorFlow is installed: the prepared TFDS dataset of a config, the
training stream of whole examples and full-resolution evaluation batches.

A prepared TFDS split is decoded once into a `reader.InMemorySplit` (each example on the split's canvas, with
its size). `train_dataset` batches it in tf.data's threads, in the order `reader.batch_examples` fixes, so it
yields exactly the batches `reader.train_batches` makes without TensorFlow; the train step augments them on
the device (`augmentation`). Batches are a pure function of (seed, step): a run restarted at step N continues
with the batches it would have seen, and each process of a multi-host job takes its own slice of every global
batch.
"""

from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fastscnn_jax import camvid, cityscapes, folder, reader


def get_builder(config):
    """The prepared TFDS builder of `config.dataset` (`camvid`, `folder` or `cityscapes`'s `get_builder`)."""
    data_dir = config.tfds_data_dir or None
    if config.dataset == "folder":
        return folder.get_builder(config.dataset_dir, data_dir)
    if config.dataset == "cityscapes":
        return cityscapes.get_builder(config.dataset_dir, data_dir)
    return camvid.get_builder(config.dataset_dir, data_dir, config.download_url)


def read_split(builder, split: str, ignore_label: int) -> reader.InMemorySplit:
    """A prepared split, decoded into memory in file order."""
    images, labels, names = [], [], []
    for ex in tfds.as_numpy(camvid.load_split(builder, split)):
        images.append(ex["image"])
        labels.append(ex["label"][..., 0])
        names.append(ex["file_name"].decode())
    return reader.InMemorySplit.from_examples(images, labels, names, ignore_label)


def train_dataset(
    split: reader.InMemorySplit,
    config,
    *,
    local_batch_size: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Endless stream of this process's training batches of whole examples, from global step `start_step`.

    Args:
      split: the training examples.
      config: `seed`.
      local_batch_size: examples per step on this process.
      start_step: first step to produce (resume).
      process_index: this process's slice of each global batch.
      process_count: number of processes sharing the global batch.

    Returns:
      dataset of dicts `image` uint8 [b, H, W, 3], `label` uint8 [b, H, W], `size` int32 [b, 2] and `index`
      int32 [b], the input of `augmentation.augment_batch` (the same as `reader.train_batches`).
    """
    # Copied into TensorFlow (CamVid: about 250 MB), so that tf.gather assembles batches in tf.data's threads
    # without Python; the order comes from numpy, so that it is the reader's with or without TensorFlow.
    images, labels, sizes = (tf.constant(a) for a in (split.images, split.labels, split.sizes))
    n = len(split)

    def examples(step):
        """Global indices and split positions of batch `step` (`reader.batch_examples`)."""
        return reader.batch_examples(
            config.seed, n, int(step), local_batch_size, process_index, process_count
        )

    def batch(step):
        """Batch `step`, gathered from the decoded split."""
        index, position = tf.numpy_function(examples, [step], (tf.int32, tf.int64), stateful=False)
        index.set_shape([local_batch_size])
        position.set_shape([local_batch_size])
        return {
            "image": tf.gather(images, position),
            "label": tf.gather(labels, position),
            "size": tf.gather(sizes, position),
            "index": index,
        }

    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    ds = ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_batches(
    builder,
    split_name: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    sequence: str = "",
) -> Iterator[dict[str, np.ndarray]]:
    """Full-resolution batches of a split (only the frames of `sequence`, if given), padded, with `mask`
    marking real examples.

    Each image is evaluated at its own size: a global batch (`batch_size` per process) holds consecutive
    examples of one size, and a change of size starts the next one. Each process takes its slice of every
    global batch, so all processes yield the same number of batches, of the same shape at each step (padded,
    some fully), and each example counts exactly once.
    """
    ds = camvid.load_split(builder, split_name)
    if sequence:
        names = tfds.as_numpy(
            camvid.load_split(builder, split_name, decode=False).map(lambda ex: ex["file_name"])
        )
        if not any(reader.sequence_of(name.decode()) == sequence for name in names):
            raise camvid.DatasetError(f'sequence "{sequence}" has no frames in split "{split_name}"')
        prefix = tf.constant(f"{sequence}_")
        ds = ds.filter(lambda ex: tf.strings.substr(ex["file_name"], 0, len(sequence) + 1) == prefix)
    ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"][..., 0], tf.int32)})
    global_batch = batch_size * process_count

    def local(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """This process's slice of a global batch of same-size examples, padded to `batch_size`."""
        mine = examples[process_index * batch_size : (process_index + 1) * batch_size]
        out = {
            key: np.stack(
                [ex[key] for ex in mine] + [np.zeros_like(examples[0][key])] * (batch_size - len(mine))
            )
            for key in ("image", "label")
        }
        out["mask"] = np.arange(batch_size) < len(mine)
        return out

    pending: list[dict[str, np.ndarray]] = []
    for example in tfds.as_numpy(ds.prefetch(2)):
        if pending and (len(pending) == global_batch or pending[0]["image"].shape != example["image"].shape):
            yield local(pending)
            pending = []
        pending.append(example)
    if pending:
        yield local(pending)
