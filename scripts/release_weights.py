r"""Turns a finished training run into the shipped weights, figures and numbers of the model card.

  python scripts/release_weights.py --config=configs/camvid_cpu.py --workdir=runs/camvid_cpu

Writes:
  fastscnn_jax/weights/fastscnn_camvid.msgpack  params + batch_stats of the best checkpoint
                                                (`--checkpoint=last`: the final state's), with metadata
  docs/eval_val.json, docs/eval_val.png          `evaluate` on val with the released file; confusion matrix
  docs/training_curve.png                        train loss and val mIoU against steps (TensorBoard events)
  docs/val_examples.png                          val photos, ground truth and prediction side by side
and prints the per-class table in Markdown for MODEL_CARD.md.
"""

import glob
import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastscnn_jax import camvid, checkpointing, cli, evaluate, predict, steps  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "The finished training run.")
flags.DEFINE_string("docs", "docs", "Folder for the figures and the evaluation JSON.")
flags.DEFINE_integer("num_examples", 4, "Val images in the examples figure.")
flags.DEFINE_enum(
    "checkpoint",
    "best",
    ["best", "last"],
    "best: the best evaluation's weights; last: the final training state's (a fixed schedule, no selection, "
    "as for a run on train+val).",
)


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float, float]]]:
    """{tag: [(step, value, wall_time)]} from the run's TensorBoard event files."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                if array is not None and array.ndim == 0 and array.dtype.kind == "f":
                    scalars.setdefault(value.tag, []).append((event.step, float(array), event.wall_time))
    return {tag: sorted(v) for tag, v in scalars.items()}


def plot_curves(scalars: dict, path: str) -> None:
    """Train loss and val mIoU against steps, on two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, loss, _ = zip(*scalars["train_loss"], strict=True)
    ax.plot(steps, loss, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    twin = ax.twinx()
    steps, miou, _ = zip(*scalars["val_miou"], strict=True)
    twin.plot(steps, miou, "o-", color="tab:red", label="val mIoU")
    twin.set_ylabel("val mIoU (360x480)", color="tab:red")
    ax.set_title("Fast-SCNN on CamVid")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(segmenter, builder, count: int, path: str) -> None:
    """Rows of photo / ground truth / prediction for evenly spaced val images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow_datasets as tfds

    examples = list(tfds.as_numpy(camvid.load_split(builder, "val")))
    chosen = [examples[i] for i in np.linspace(0, len(examples) - 1, count).astype(int)]
    fig, axes = plt.subplots(count, 3, figsize=(12, 3.1 * count))
    for row, example in zip(axes, chosen, strict=True):
        label = example["label"][..., 0]
        prediction = segmenter(example["image"], max_side=2048)
        prediction = np.where(label == camvid.IGNORE_LABEL, camvid.IGNORE_LABEL, prediction)
        for ax, image, title in zip(
            row,
            (example["image"], predict.colorize(label), predict.colorize(prediction)),
            (example["file_name"].decode(), "ground truth", "prediction (void pixels blacked out)"),
            strict=True,
        ):
            ax.imshow(image)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def main(argv):
    """Releases the weights and makes the model card's figures."""
    del argv
    config, workdir = FLAGS.config, FLAGS.workdir
    os.makedirs(FLAGS.docs, exist_ok=True)
    folder = checkpointing.BEST_DIR if FLAGS.checkpoint == "best" else checkpointing.LATEST_DIR
    variables, meta = checkpointing.load_variables(os.path.join(workdir, folder))
    scalars = read_scalars(workdir)
    walls = [w for values in scalars.values() for _, _, w in values]
    meta.update(
        config=os.path.basename(FLAGS["config"].config_filename),
        model=steps.model_signature(config),
        train_minutes=round((max(walls) - min(walls)) / 60, 1),
        trained_on=f"CamVid (SegNet split) {config.train_split}"
        + (f" without sequence {config.holdout_sequence}" if config.holdout_sequence else ""),
        checkpoint=FLAGS.checkpoint,
    )
    checkpointing.save_weights_file(checkpointing.DEFAULT_WEIGHTS, variables, meta)
    size_mb = os.path.getsize(checkpointing.DEFAULT_WEIGHTS) / 2**20
    print(f"wrote {checkpointing.DEFAULT_WEIGHTS} ({size_mb:.1f} MiB), best step {meta['step']}")

    result = evaluate.evaluate_checkpoint(config, checkpointing.DEFAULT_WEIGHTS, "val")
    with open(os.path.join(FLAGS.docs, "eval_val.json"), "w") as f:
        json.dump(result, f, indent=2)
    evaluate.plot_confusion(
        result["confusion_matrix"],
        camvid.CLASS_NAMES,
        os.path.join(FLAGS.docs, "eval_val.png"),
        f"val: mIoU {result['miou']:.4f} (rows normalised)",
    )
    plot_curves(scalars, os.path.join(FLAGS.docs, "training_curve.png"))
    builder = camvid.get_builder(config.dataset_dir, config.tfds_data_dir or None, config.download_url)
    segmenter = predict.Segmenter(checkpointing.DEFAULT_WEIGHTS)
    plot_examples(segmenter, builder, FLAGS.num_examples, os.path.join(FLAGS.docs, "val_examples.png"))

    print(f"train minutes {meta['train_minutes']}, best step {meta['step']}")
    print("| class | IoU |\n|---|---|")
    for name, iou in result["per_class_iou"].items():
        print(f"| {name} | {iou:.4f} |")
    print(f"| **mIoU** | **{result['miou']:.4f}** |")
    print(f"pixel accuracy {result['pixel_accuracy']:.4f}, mean Dice {result['mean_dice']:.4f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)
