r"""Trains and evaluates Fast-SCNN on CamVid.

  python -m fastscnn_jax.main --config=configs/camvid.py --workdir=runs/camvid

This file holds flags and process set-up only, so that the logic lives in `train`, which can be imported,
tested and used from a notebook. Running the same command on the same workdir resumes from its latest
checkpoint.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from fastscnn_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, summaries and results; default runs/<config file name>.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def default_workdir(config_path: str) -> str:
    """runs/<config file name without .py>, so that repeating a command resumes the same run."""
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    return os.path.join("runs", name)


class _QuietOrbax(logging.logging.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines a checkpoint); its warnings still show."""

    def filter(self, record) -> bool:
        """Keeps warnings and everything not from orbax."""
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    """Sets up the process and runs training."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.get_absl_logger().addFilter(_QuietOrbax())
    import jax
    import tensorflow as tf

    from fastscnn_jax import train

    # tf.data only: TensorFlow must not take GPU memory that JAX needs.
    tf.config.set_visible_devices([], "GPU")
    workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
    print(f"workdir: {os.path.abspath(workdir)}", flush=True)
    logging.info(
        "JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(), jax.local_devices()
    )
    train.train_and_evaluate(FLAGS.config, workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
