"""The training loop: data, periodic evaluation and checkpoints, resume, preemption.

The model, loss and steps it runs are built by the factories of `steps`; the data comes from `sources`
(tf.data where TensorFlow is installed, else a CamVid folder read with numpy) and the summaries go where
`summaries` says, so the loop runs with or without TensorFlow.
"""

import json
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fastscnn_jax import (
    camvid_folder,
    checkpointing,
    datasets,
    losses,
    metrics,
    multihost,
    reader,
    sources,
    steps,
    summaries,
)


def evaluate(
    eval_step_fn,
    variables: dict,
    source: sources.TFDSSource | sources.FolderSource,
    split: str,
    config,
    mesh: Mesh,
    sequence: str = "",
    class_names: tuple[str, ...] = (),
) -> tuple[dict, np.ndarray]:
    """Scores of `variables` on a whole split (only the frames of `sequence`, if given) at full resolution,
    each image at its own size.

    Args:
      class_names: the names of the classes in the scores; default those of `config.dataset`.

    Returns:
      (scores dict as `metrics.segmentation_scores` gives it, confusion matrix).
    """
    local_batch = config.eval_batch_size // jax.process_count()
    total = None
    for batch in source.eval_batches(split, local_batch, jax.process_index(), jax.process_count(), sequence):
        step_metrics = eval_step_fn(variables, steps.shard_batch(batch, mesh))
        total = step_metrics if total is None else total.merge(step_metrics)
    matrix = total.compute()["confusion"]
    class_names = class_names or datasets.dataset_classes(config).names
    return metrics.segmentation_scores(matrix, class_names), matrix


class Preemption:
    """Context in which SIGTERM (what a preempted VM or `kill` sends) is noted instead of killing.

    The training loop asks `reached(step)` after each step, saves a checkpoint and returns, so a preempted run
    loses no steps. One process: a SIGTERM handler sets a flag (outside the main thread, where signals cannot
    be handled, it does nothing). Several processes: JAX's distributed runtime catches SIGTERM on any of them,
    tells the others, and `multihost_utils.reached_preemption_sync_point` names one step at which all of
    them save together (a process that stopped alone would leave the others waiting in the collective save).
    """

    def __init__(self):
        """Starts with no signal received."""
        self.received = False
        self._previous = None
        self._multiprocess = jax.process_count() > 1

    def __enter__(self) -> "Preemption":
        """Installs the SIGTERM handler (single process only; JAX's own handles multi-process jobs)."""
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (multi-process: every process calls it at every step)."""
        if self._multiprocess:
            self.received = multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def _handle(self, signum, frame) -> None:
        """Notes the signal."""
        del signum, frame
        self.received = True

    def __exit__(self, *exc) -> None:
        """Restores the previous handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _flatten(d: dict, prefix: str = "") -> dict:
    """Flat {'a.b': value} view of a nested config dict, values as TensorBoard hparams accept them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def _kept(checkpoints: checkpointing.Checkpoints, workdir: str) -> str:
    """What remains of a run that stops on non-finite numbers."""
    step = checkpoints.latest_step()
    if step is None:
        return f"No checkpoint had been saved yet in {workdir}."
    return f"The last good checkpoint (step {step}) in {workdir} is kept."


def _write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically: a kill mid-write leaves the previous file, never a truncated one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def training_data(config: ml_collections.ConfigDict, source) -> tuple[reader.InMemorySplit, int, np.ndarray]:
    """(the examples training reads, the number of steps, the class weights or None) for a resolved config.

    The examples are `config.train_split` ('train+val' trains on both, as the published CamVid results are
    trained; val then measures fit) without the frames of `config.holdout_sequence`; the steps are
    `config.num_train_steps` if positive, else `config.num_epochs` epochs of them.

    Raises:
      ConfigError: a split the data lacks, or a held-out sequence the split lacks, naming the key.
    """
    try:
        split = source.read(config.train_split)
    except camvid_folder.DatasetError as e:
        raise steps.ConfigError(f"config.train_split={config.train_split!r}: {e}") from None
    if config.holdout_sequence:
        try:
            split = split.without_sequence(config.holdout_sequence)
        except ValueError as e:
            raise steps.ConfigError(f"config.holdout_sequence={config.holdout_sequence!r}: {e}") from None
    steps_per_epoch = max(len(split) // config.batch_size, 1)
    num_train_steps = (
        config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
    )
    weights = losses.class_weights(split.class_pixel_counts(config.num_classes), config.class_weighting)
    return split, num_train_steps, weights


def create_training(
    config: ml_collections.ConfigDict, num_train_steps: int, weights: np.ndarray | None, mesh
) -> tuple[nn.Module, Callable[[int], Any], steps.TrainState, Callable]:
    """The model, learning-rate schedule, initial state (replicated over `mesh`) and train step of a run.

    The layer is `config.cpu_layer`'s (`steps.select_layer`). The step takes batches of whole examples and
    augments them (scale, crop, flip, colour) on the device; `weights` are the loss's class weights.
    """
    layer = steps.select_layer(config.cpu_layer)
    logging.info("Backend %s, %s layer", jax.default_backend(), layer.name)
    model = steps.create_model(config, layer)
    learning_rate_fn = steps.create_learning_rate_fn(config, num_train_steps)
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    optimizer = steps.create_optimizer(config, learning_rate_fn)
    state = steps.create_train_state(config, model, init_rng, optimizer, layer)
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state.params)
    multihost.wait_for_all_processes("before_the_first_collective")
    state = jax.device_put(state, NamedSharding(mesh, P()))
    train_step = steps.make_train_step(
        config, None if weights is None else jnp.asarray(weights), dropout_rng, mesh, layer, augment=True
    )
    return model, learning_rate_fn, state, train_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, source=None) -> dict:
    """Trains, evaluating and checkpointing periodically; resumes from `workdir` when it has checkpoints.

    Args:
      config: hyperparameters (see configs/camvid.py); `num_classes` and `ignore_label` are the dataset's
        (`datasets.resolve`).
      workdir: checkpoints, TensorBoard events and `eval_<name>.json` (the scores at the best step: `val`,
        and the held-out sequence's when `config.holdout_sequence` is set) go here.
      source: the data (`sources.open_source(config)` when not given).

    Returns:
      scores of the best evaluation of the held-out sequence if any, else of `config.eval_split`
      (`metrics.segmentation_scores` plus `step`).
    """
    config, class_info = datasets.resolve(config)
    steps.validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = steps.create_mesh()
    is_chief = jax.process_index() == 0

    # A workdir of another model fails here, before the data is loaded and anything is compiled.
    checkpoints = checkpointing.Checkpoints(workdir, config.checkpoints_to_keep)
    resuming = checkpoints.latest_step() is not None
    if resuming:
        steps.check_compatible(checkpoints.latest_meta().get("model", {}), config, workdir)

    source = source or sources.open_source(config)
    train_split, num_train_steps, weights = training_data(config, source)
    steps_per_epoch = max(len(train_split) // config.batch_size, 1)
    # (name, split, sequence) of each evaluation; the first selects the best checkpoint. Val shares its
    # sequence with train and flatters the model; a whole train sequence held out of training measures what
    # the test split (other streets) measures, so when there is one it selects, and val is reported beside it.
    targets = [(config.eval_split, config.eval_split, "")]
    if config.holdout_sequence:
        targets.insert(0, (config.holdout_sequence, "train", config.holdout_sequence))
    logging.info(
        "Train: %d examples, %d steps (%d per epoch); class weights %s",
        len(train_split),
        num_train_steps,
        steps_per_epoch,
        weights,
    )

    model, learning_rate_fn, state, p_train_step = create_training(config, num_train_steps, weights, mesh)

    meta = {"step": 0, "best_miou": -1.0, "evals_since_best": 0, "model": steps.model_signature(config)}
    if resuming:
        state, meta = checkpoints.restore_state(state)
        logging.info("Resuming from step %d (checkpoint in %s)", int(state.step), workdir)
    # The classes travel with the weights (predict's colours, evaluate's names); the data settings let
    # evaluate and export find the data of this workdir with no other flag.
    meta.update(classes=class_info.to_json(), data=datasets.data_settings(config))
    start_step = int(state.step)

    # Process 0 writes the job's summaries; the others' writer discards them.
    writer = summaries.create_writer(workdir, is_chief)
    if start_step == 0:
        writer.write_hparams(_flatten(config.to_dict()))

    p_eval_step = steps.make_eval_step(model, config, mesh)
    local_batch = config.batch_size // jax.process_count()
    train_iter = source.train_batches(
        train_split,
        config,
        local_batch_size=local_batch,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    report_progress = summaries.create_progress(num_train_steps, writer)
    train_metrics = None
    best_scores = None
    logging.info("Training from step %d to %d.", start_step, num_train_steps)
    with Preemption() as preemption:
        for step in range(start_step + 1, num_train_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = p_train_step(state, steps.shard_batch(next(train_iter), mesh))
            train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
            report_progress(step)
            is_last = step == num_train_steps

            if step % config.log_every_steps == 0 or is_last:
                computed = train_metrics.compute()
                loss = float(computed["loss"])
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"train loss is {loss} at step {step}; stopping. {_kept(checkpoints, workdir)}"
                    )
                scores = metrics.segmentation_scores(computed["confusion"], class_info.names)
                writer.write_scalars(
                    step,
                    {
                        "train_loss": loss,
                        "train_miou": scores["miou"],
                        "train_pixel_accuracy": scores["pixel_accuracy"],
                        "learning_rate": float(learning_rate_fn(step - 1)),
                    },
                )
                train_metrics = None

            stop = False
            if step % config.eval_every_steps == 0 or is_last:
                variables = state.eval_variables()
                # With a moving average, it is what is evaluated, selected and saved; the raw weights are
                # scored beside it (`raw_` scalars) to show what it gains.
                candidates = {"": variables}
                if state.ema is not None:
                    candidates["raw_"] = {"params": state.params, "batch_stats": state.batch_stats}
                results, raw_results = {}, {}
                with report_progress.timed("eval"):
                    for prefix, candidate in candidates.items():
                        for name, split, sequence in targets:
                            scored = evaluate(
                                p_eval_step,
                                candidate,
                                source,
                                split,
                                config,
                                mesh,
                                sequence,
                                class_info.names,
                            )
                            (raw_results if prefix else results)[name] = scored
                for name, (scores, _) in raw_results.items():
                    writer.write_scalars(step, {f"raw_{name}_miou": scores["miou"]})
                    logging.info("Step %d %s, raw weights: mIoU %.4f", step, name, scores["miou"])
                for name, (scores, _) in results.items():
                    writer.write_scalars(
                        step,
                        {
                            f"{name}_miou": scores["miou"],
                            f"{name}_pixel_accuracy": scores["pixel_accuracy"],
                            f"{name}_mean_dice": scores["mean_dice"],
                            **{f"{name}_iou/{k}": v for k, v in scores["per_class_iou"].items()},
                        },
                    )
                    logging.info("Step %d %s:\n%s", step, name, metrics.format_table(scores))
                selected = targets[0][0]
                scores = results[selected][0]
                if scores["miou"] > meta["best_miou"]:
                    meta.update(best_miou=scores["miou"], evals_since_best=0)
                    best_scores = {"step": step, **scores}
                    checkpoints.save_best(step, variables, {**meta, "step": step, "scores": best_scores})
                    if is_chief:
                        for name, (scores, matrix) in results.items():
                            _write_json(
                                os.path.join(workdir, f"eval_{name}.json"),
                                {
                                    "step": step,
                                    **scores,
                                    "confusion_matrix": np.asarray(matrix).astype(int).tolist(),
                                },
                            )
                else:
                    meta["evals_since_best"] += 1
                patience = config.early_stopping_patience
                if patience > 0 and meta["evals_since_best"] >= patience:
                    logging.info(
                        "Early stopping at step %d: no %s mIoU gain in %d evaluations.",
                        step,
                        selected,
                        patience,
                    )
                    stop = True

            preempted = preemption.reached(step)
            if step % config.checkpoint_every_steps == 0 or is_last or stop or preempted:
                # Never let a diverged state replace a good checkpoint.
                if not bool(steps.all_finite(state.params)):
                    raise FloatingPointError(
                        f"parameters are not finite at step {step}; stopping without saving. "
                        f"{_kept(checkpoints, workdir)}"
                    )
                checkpoints.save_state(step, state, {**meta, "step": step})
            if preempted:
                logging.warning("SIGTERM at step %d: checkpoint saved; run the same command to resume.", step)
            if stop or preempted:
                break

    writer.flush()
    checkpoints.close()
    best_json = os.path.join(workdir, f"eval_{targets[0][0]}.json")
    if best_scores is None and os.path.exists(best_json):
        with open(best_json) as f:
            best_scores = json.load(f)
    return best_scores
