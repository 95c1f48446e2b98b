r"""Evaluates a checkpoint on a split of its dataset at full resolution (each image at its own size).

  python -m fastscnn_jax.evaluate                      # the shipped weights, on val
  python -m fastscnn_jax.evaluate --config=configs/camvid.py --workdir=runs/camvid --split=val
  python -m fastscnn_jax.evaluate --checkpoint=PATH --split=test --output=x.json
  python -m fastscnn_jax.evaluate --workdir=runs/held_out --split=train --sequence=0006R0

Writes `WORKDIR/eval_<split>.json` (or `--output`; `eval_<split>.json` in the current folder for the
shipped weights) with `miou`, `pixel_accuracy`, `mean_dice`, `per_class_iou` and the confusion matrix, a
row-normalised confusion-matrix plot beside it (`.png`), and prints a per-class table. The dataset is found
through the config's `dataset_dir`, as for training, so a full copy with a test split evaluates with
`--split=test`. Without `--config`, a workdir trained on another dataset (`config.dataset`) is evaluated on
the data it was trained on: its checkpoint records the data settings (`--config.KEY=VALUE` still overrides
them). The table and the plot name the classes the checkpoint records (CamVid's for the shipped weights).
`--sequence` scores only the frames of one sequence of the split (a CamVid sequence, a Cityscapes city), e.g.
one held out of training with `config.holdout_sequence`; the report is then `eval_<sequence>.json`.
"""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fastscnn_jax import camvid_folder, checkpointing, classes, cli, datasets, metrics, sources, steps, train

FLAGS = flags.FLAGS


def evaluate_checkpoint(config, checkpoint: str, split: str, sequence: str = "", source=None) -> dict:
    """Scores of a checkpoint on a split.

    The checkpoint fixes the network (`checkpointing.load_model`: e.g. imported PyTorch weights are built
    with `torch_compat`) and the class names; the config fixes how it is evaluated: the dataset,
    `eval_batch_size`, the compute `model.dtype` and the `cpu_layer`.

    Args:
      config: the configuration.
      checkpoint: a weights file, workdir or checkpoint step folder.
      split: the split to evaluate.
      sequence: if given, only the frames of this sequence of the split.
      source: the data (`sources.open_source(config)` when not given).

    Returns:
      `metrics.segmentation_scores` plus `split`, `checkpoint` and `confusion_matrix`.

    Raises:
      ConfigError: the dataset has another number of classes than the checkpoint's model.
    """
    config, _ = datasets.resolve(config)
    steps.validate_config(config)
    model, variables, meta = checkpointing.load_model(checkpoint, config.cpu_layer)
    if model.num_classes != config.num_classes:
        raise steps.ConfigError(
            f"{checkpoint} predicts {model.num_classes} classes but config.dataset={config.dataset!r} has "
            f"{config.num_classes}"
        )
    class_names = classes.from_meta(meta).names
    model = model.clone(dtype=jnp.dtype(config.model.dtype))
    source = source or sources.open_source(config)
    mesh = steps.create_mesh()
    eval_step = steps.make_eval_step(model, config, mesh)
    scores, matrix = train.evaluate(eval_step, variables, source, split, config, mesh, sequence, class_names)
    return {
        **scores,
        "split": split,
        **({"sequence": sequence} if sequence else {}),
        "checkpoint": os.path.abspath(checkpoint),
        "confusion_matrix": matrix.astype(int).tolist(),
    }


def with_checkpoint_data(config, meta: dict, overrides: dict):
    """`config` with the data settings the checkpoint records (`meta["data"]`, written by training), except
    the keys in `overrides` (those given on the command line); `config` itself when it records none.

    The number of classes and the void label then come from that data (`datasets.resolve`).
    """
    data = meta.get("data")
    if not isinstance(data, dict):
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key in ("dataset", "dataset_dir", "tfds_data_dir"):
            if key in data and key not in overrides:
                config[key] = data[key]
        for key, value in (("num_classes", 0), ("ignore_label", -1)):
            if key not in overrides:
                config[key] = value
    return config


def plot_confusion(matrix, class_names, path: str, title: str = "") -> None:
    """Saves the row-normalised confusion matrix (recall per true class) as a PNG."""
    # Imported and switched to Agg only when a plot is made: at import, Agg would replace the backend of
    # every importer (a notebook's inline figures).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix, np.float64)
    normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=60, ha="right")
    ax.set_yticks(ticks, class_names)
    for i in ticks:
        for j in ticks:
            ax.text(
                j,
                i,
                f"{normalised[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if normalised[i, j] > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (rows normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    """Evaluates and writes the JSON report."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    sources.keep_tensorflow_off_accelerators()
    checkpoint = FLAGS.checkpoint or FLAGS.workdir or checkpointing.DEFAULT_WEIGHTS
    if not os.path.exists(checkpoint):
        raise app.UsageError(f"checkpoint {checkpoint} does not exist")
    name = FLAGS.sequence or FLAGS.split
    output = FLAGS.output or os.path.join(FLAGS.workdir or ".", f"eval_{name}.json")
    config = FLAGS.config
    try:
        meta = checkpointing.load_variables(checkpoint)[1]
        if not FLAGS["config"].present:
            config = with_checkpoint_data(config, meta, config_flags.get_override_values(FLAGS["config"]))
        result = evaluate_checkpoint(config, checkpoint, FLAGS.split, FLAGS.sequence)
    except (steps.ConfigError, camvid_folder.DatasetError, classes.ClassesError) as e:
        sys.exit(f"error: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    plot = os.path.splitext(output)[0] + ".png"
    title = f"{name}: mIoU {result['miou']:.4f} (rows normalised)"
    plot_confusion(result["confusion_matrix"], list(result["per_class_iou"]), plot, title)
    print(f"{name} ({checkpoint}):\n{metrics.format_table(result)}\nwrote {output} and {plot}")


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so the module stays importable)."""
    default_config = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "camvid.py"
    )
    config_flags.DEFINE_config_file("config", default_config, "Configuration file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Training workdir: its best checkpoint (else latest) is evaluated.")
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Weights file, workdir or checkpoint step folder; overrides --workdir. Default: the shipped weights.",
    )
    flags.DEFINE_string("split", "val", "Split to evaluate: train, val or test.")
    flags.DEFINE_string(
        "sequence", "", "Only this sequence's frames of the split (e.g. train's 0006R0 when held out)."
    )
    flags.DEFINE_string("output", None, "JSON output path; default WORKDIR/eval_<split or sequence>.json.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
