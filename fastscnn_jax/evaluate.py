r"""Evaluates a checkpoint on a CamVid split at full resolution.

  python -m fastscnn_jax.evaluate --config=configs/camvid.py --workdir=runs/camvid --split=val
  python -m fastscnn_jax.evaluate --config=configs/camvid.py --checkpoint=PATH --split=test --output=x.json

Writes `WORKDIR/eval_<split>.json` (or `--output`) with `miou`, `pixel_accuracy`, `mean_dice`,
`per_class_iou` and the confusion matrix, and prints a per-class table. The dataset is found through the
config's `dataset_dir`, as for training, so a full copy with a test split evaluates with `--split=test`.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from fastscnn_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/camvid.py", "Configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir: its best checkpoint (else latest) is evaluated.")
flags.DEFINE_string("checkpoint", None, "A workdir or checkpoint step folder; overrides --workdir.")
flags.DEFINE_string("split", "val", "Split to evaluate: train, val or test.")
flags.DEFINE_string("output", None, "JSON output path; default WORKDIR/eval_<split>.json.")


def evaluate_checkpoint(config, checkpoint: str, split: str) -> dict:
    """Scores of a checkpoint on a split.

    Args:
      config: the configuration (model settings, `dataset_dir`, `eval_batch_size`).
      checkpoint: a workdir or checkpoint step folder.
      split: the split to evaluate.

    Returns:
      `metrics.segmentation_scores` plus `split`, `checkpoint` and `confusion_matrix`.
    """
    from fastscnn_jax import camvid, checkpointing, train

    train.validate_config(config)
    variables, meta = checkpointing.load_variables(checkpoint)
    if meta.get("model"):
        train.check_compatible(meta["model"], config, checkpoint)
    builder = camvid.get_builder(config.dataset_dir, config.tfds_data_dir or None, config.download_url)
    mesh = train.create_mesh()
    eval_step = train.make_eval_step(train.create_model(config), config, mesh)
    scores, matrix = train.evaluate(eval_step, variables, builder, split, config, mesh)
    return {
        **scores,
        "split": split,
        "checkpoint": os.path.abspath(checkpoint),
        "confusion_matrix": matrix.astype(int).tolist(),
    }


def main(argv):
    """Evaluates and writes the JSON report."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from fastscnn_jax import metrics

    tf.config.set_visible_devices([], "GPU")
    checkpoint = FLAGS.checkpoint or FLAGS.workdir
    if not checkpoint:
        raise app.UsageError("give --workdir or --checkpoint")
    output = FLAGS.output or os.path.join(FLAGS.workdir or ".", f"eval_{FLAGS.split}.json")
    result = evaluate_checkpoint(FLAGS.config, checkpoint, FLAGS.split)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{FLAGS.split} ({checkpoint}):\n{metrics.format_table(result)}\nwrote {output}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
