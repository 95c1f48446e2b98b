r"""Trains and evaluates Fast-SCNN on CamVid, Cityscapes or a folder of your own images and masks.

  python -m fastscnn_jax.main --config=configs/camvid.py --workdir=runs/camvid

This file holds flags and process set-up only, so that the logic lives in `train`, which can be imported,
tested and used from a notebook. Running the same command on the same workdir resumes from its latest
checkpoint.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fastscnn_jax import camvid_folder, checkpointing, cli, multihost, sources, steps, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, summaries and results; default runs/<config file name>.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config"])
# Multi-process jobs (multihost.py, README's Multi-host section): the same command on every host.
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Join a multi-process JAX job: auto = when the flags below or the environment (SLURM, Open MPI, "
    "Cloud TPU, JAX_COORDINATOR_ADDRESS) say so; on = always (JAX detects the cluster); off = never.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (multi-process jobs).")
flags.DEFINE_integer(
    "num_processes", None, "Number of processes in the job (multi-process jobs).", lower_bound=1
)
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (multi-process jobs).")


def default_workdir(config_path: str) -> str:
    """runs/<config file name without .py>, so that repeating a command resumes the same run."""
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    return os.path.join("runs", name)


def main(argv):
    """Sets up the process and runs training."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    cli.quiet_orbax()
    try:
        multihost.initialize(
            FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    sources.keep_tensorflow_off_accelerators()
    workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
    if jax.process_index() == 0:
        print(f"workdir: {os.path.abspath(workdir)}", flush=True)
    else:
        # Process 0 reports progress and scores for the whole job; the others speak only of problems.
        logging.set_verbosity(logging.WARNING)
    logging.info(
        "JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(), jax.local_devices()
    )
    try:
        train.train_and_evaluate(FLAGS.config, workdir)
    except (
        steps.ConfigError,
        camvid_folder.DatasetError,
        checkpointing.CheckpointError,
        FloatingPointError,
    ) as e:
        # Mistakes in the command, config or data, checkpoints that do not restore, a diverged run: the
        # message names the key, file or step, and what was kept; a traceback would add nothing.
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
