r"""Trains a recipe end to end, timed, and leaves its final weights, evaluated, where the caller says.

  python -m fastscnn_jax.recipe --config=configs/camvid_gpu.py --workdir=runs/camvid_gpu \
      --weights=runs/camvid_gpu/fastscnn_camvid_gpu.msgpack

In order:
  1. trains (`train.train_and_evaluate`; a workdir with checkpoints resumes), timed with the data loading and
     every compilation;
  2. writes the final training state's weights (its moving average when the config keeps one; no selection
     by an evaluation, as the published CamVid results are trained) to `--weights`, with the metadata that
     scripts/release_weights.py writes;
  3. evaluates that file on val (`evaluate.evaluate_checkpoint`);
  4. times the input (`--input_steps`, 0 to skip): train steps fed as the training loop feeds them (whole
     examples from host memory, a batch assembled and sent every step, augmented in the step), against as
     many steps on one batch already on the device. Fed steps within 10% of fixed ones mean the input does
     not bound training. `--profile` keeps a `jax.profiler` trace of the fed steps.
It writes `recipe.json` (wall time, steps, val scores, input timing) beside the weights, and prints it.

Runs where TensorFlow is missing (then CamVid is read from a local folder, `sources`), e.g. on a GPU machine
given ml_collections and clu as wheels (scripts/gpu_check.sh).
"""

import json
import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fastscnn_jax import (
    camvid_folder,
    checkpointing,
    cli,
    datasets,
    evaluate,
    sources,
    steps,
    train,
)

FLAGS = flags.FLAGS


def _time_steps(step_fn, state, feed, count: int) -> tuple[object, float]:
    """(state, seconds per step) of `count` steps, each on the batch `feed()` returns."""
    start = time.perf_counter()
    for _ in range(count):
        state, _ = step_fn(state, feed())
    jax.block_until_ready(state)
    return state, (time.perf_counter() - start) / count


def time_input(config, count: int, profile_dir: str | None = None, rounds: int = 2, source=None) -> dict:
    """Seconds per train step fed by the training loop's data path and on one fixed device batch.

    The step, state and batches are built as `train.train_and_evaluate` builds them (single process), so
    after training the step's program comes from JAX's compilation cache where one is set. Each of `rounds`
    rounds times `count` fed steps then `count` fixed ones; the best round of each counts. `source` is the
    data (`sources.open_source(config)` when not given).
    """
    config, _ = datasets.resolve(config)
    source = source or sources.open_source(config)
    split, num_train_steps, weights = train.training_data(config, source)
    mesh = steps.create_mesh()
    _, _, state, step_fn = train.create_training(config, num_train_steps, weights, mesh)
    batches = source.train_batches(split, config, local_batch_size=config.batch_size)
    fixed = steps.shard_batch(next(batches), mesh)
    state, _ = _time_steps(step_fn, state, lambda: fixed, 1)  # compiles
    fed_s, fixed_s = [], []
    for r in range(rounds):
        if profile_dir and r == rounds - 1:
            jax.profiler.start_trace(profile_dir)
        state, seconds = _time_steps(step_fn, state, lambda: steps.shard_batch(next(batches), mesh), count)
        if profile_dir and r == rounds - 1:
            jax.profiler.stop_trace()
        fed_s.append(seconds)
        state, seconds = _time_steps(step_fn, state, lambda: fixed, count)
        fixed_s.append(seconds)
    fed, fixed_best = min(fed_s), min(fixed_s)
    return {
        "steps": count,
        "batch_size": config.batch_size,
        "crop_size": list(config.crop_size),
        "fed_step_s": fed,
        "fixed_step_s": fixed_best,
        "fed_over_fixed": fed / fixed_best,
        "rounds": {"fed_step_s": fed_s, "fixed_step_s": fixed_s},
    }


def run(config, config_name: str, workdir: str, weights_path: str, input_steps: int, profile: bool) -> dict:
    """Steps 1-4 of the module docstring; returns what `recipe.json` holds."""
    start = time.monotonic()
    resolved, _ = datasets.resolve(config)
    # One source for the three steps: a CamVid folder is decoded once.
    source = sources.open_source(resolved)
    train.train_and_evaluate(config, workdir, source)
    train_s = time.monotonic() - start
    variables, meta = checkpointing.load_variables(os.path.join(workdir, checkpointing.LATEST_DIR))
    meta.update(
        config=config_name,
        model=steps.model_signature(resolved),
        train_minutes=round(train_s / 60, 1),
        trained_on=f"{config.dataset} {config.train_split}"
        + (f" without sequence {config.holdout_sequence}" if config.holdout_sequence else ""),
        checkpoint="last",
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
    )
    os.makedirs(os.path.dirname(os.path.abspath(weights_path)), exist_ok=True)
    checkpointing.save_weights_file(weights_path, variables, meta)
    logging.info("Wrote %s (step %d)", weights_path, meta["step"])
    scores = evaluate.evaluate_checkpoint(config, weights_path, config.eval_split, source=source)
    result = {
        "config": config_name,
        "device": meta["device"],
        "train_wall_s": train_s,
        "steps": meta["step"],
        "weights": os.path.abspath(weights_path),
        config.eval_split: {k: scores[k] for k in ("miou", "pixel_accuracy", "mean_dice", "per_class_iou")},
    }
    if input_steps > 0:
        trace = os.path.join(os.path.dirname(os.path.abspath(weights_path)), "trace") if profile else None
        result["input"] = time_input(config, input_steps, trace, source=source)
    return result


def main(argv):
    """Runs the recipe and writes recipe.json beside the weights."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    cli.quiet_orbax()
    sources.keep_tensorflow_off_accelerators()
    config_name = os.path.basename(FLAGS["config"].config_filename)
    try:
        result = run(
            FLAGS.config, config_name, FLAGS.workdir, FLAGS.weights, FLAGS.input_steps, FLAGS.profile
        )
    except (steps.ConfigError, camvid_folder.DatasetError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    path = os.path.join(os.path.dirname(os.path.abspath(FLAGS.weights)), "recipe.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"wrote {FLAGS.weights} and {path}")


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so the module stays importable)."""
    config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Training workdir (checkpoints, summaries).")
    flags.DEFINE_string("weights", None, "Where the final weights go; recipe.json is written beside them.")
    flags.DEFINE_integer("input_steps", 50, "Steps per round of the input timing; 0 skips it.")
    flags.DEFINE_boolean("profile", False, "Keep a jax.profiler trace of the fed steps beside the weights.")
    flags.mark_flags_as_required(["config", "workdir", "weights"])


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
