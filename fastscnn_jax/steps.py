"""Factories and pure steps: the model, optimizer and train state from a config, `train_step` and
`eval_step`, and their jit-compiled forms over a device mesh.

Data parallel: the batch is sharded over a one-axis `Mesh` of every device, parameters are replicated, and
`jax.jit` partitions the step, so BatchNorm normalises with the statistics of the global batch.

A `Layer` names the forms a backend runs the core with. The core's own (`CORE`) runs everywhere;
`config.cpu_layer` can swap in `fastscnn_jax.cpu.LAYER`, equivalent forms that XLA:CPU runs faster. The
choice is made here, once, by `select_layer`.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fastscnn_jax import augmentation, losses, metrics, models

CPU_LAYER_CHOICES = ("auto", "on", "off")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("one_cycle", "poly")


class ConfigError(ValueError):
    """A config value that cannot work, or a workdir made with another model; the message names the key."""


class TrainState(train_state.TrainState):
    """TrainState with BatchNorm statistics and, when `config.ema_decay` > 0, their moving average with the
    parameters' (`ema`: {"params", "batch_stats"}; None otherwise)."""

    batch_stats: Any
    ema: Any = None

    def eval_variables(self) -> dict:
        """The variables to evaluate and ship: the moving average when there is one."""
        if self.ema is not None:
            return self.ema
        return {"params": self.params, "batch_stats": self.batch_stats}


def train_loss(
    apply_fn: Callable,
    variables: dict,
    batch: dict[str, jax.Array],
    dropout_rng: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    weights: jax.Array | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any]]:
    """The training loss of a batch: cross-entropy of the logits at label resolution, plus the weighted
    auxiliary head's.

    Returns:
      (loss, (argmax predictions, the labels they are to be compared with, new BatchNorm statistics)).
    """
    logits, mutated = apply_fn(
        variables,
        batch["image"],
        train=True,
        rngs={"dropout": dropout_rng},
        mutable=["batch_stats", "intermediates"],
    )
    loss_kwargs = loss_settings(config, weights)
    loss = losses.segmentation_loss(logits, batch["label"], **loss_kwargs)
    if config.model.aux_head and config.aux_loss_weight > 0:
        (aux_logits,) = mutated["intermediates"]["aux_logits"]
        aux_loss = losses.segmentation_loss(aux_logits, batch["label"], **loss_kwargs)
        loss = loss + config.aux_loss_weight * aux_loss
    predictions = jnp.argmax(jax.lax.stop_gradient(logits), -1)
    return loss, (predictions, batch["label"], mutated["batch_stats"])


def loss_settings(config: ml_collections.ConfigDict, weights: jax.Array | None) -> dict:
    """The keyword arguments of `losses.segmentation_loss` that the config sets."""
    return dict(
        ignore_label=config.ignore_label,
        weights=weights,
        label_smoothing=config.label_smoothing,
        ohem_threshold=config.ohem_threshold,
        ohem_min_kept=config.ohem_min_kept,
    )


@dataclasses.dataclass(frozen=True)
class Layer:
    """The forms of the core's backend-specific pieces; each default is the core's own.

    Attributes:
      name: for logs and benchmark rows.
      conv: the convolution module the model is built with (`nn.Conv` or an equivalent).
      train_loss: `train_loss`'s signature and results.
      train_compiler_options: XLA compiler options of the jitted train step.
      init_compiler_options: XLA compiler options of the jitted `model.init`.
      resize_logits: the model's resize of its logits to the input size (`models.resize_bilinear`'s
        signature and values).
    """

    name: str = "core"
    conv: models.ModuleDef = nn.Conv
    train_loss: Callable = train_loss
    train_compiler_options: dict | None = None
    init_compiler_options: dict | None = None
    resize_logits: Callable = models.resize_bilinear


CORE = Layer()


def select_layer(choice: str) -> Layer:
    """The layer `config.cpu_layer` asks for: 'on' the CPU layer, 'off' the core, 'auto' the CPU layer when
    JAX's default backend is the CPU."""
    if choice not in CPU_LAYER_CHOICES:
        raise ConfigError(f"config.cpu_layer must be one of {CPU_LAYER_CHOICES}, got {choice!r}")
    if choice == "on" or (choice == "auto" and jax.default_backend() == "cpu"):
        # Imported only here: the core never depends on the CPU layer.
        from fastscnn_jax import cpu

        return cpu.LAYER
    return CORE


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the config key for values that cannot work."""
    num_devices, num_processes = jax.device_count(), jax.process_count()
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if value <= 0 or value % num_processes:
            raise ConfigError(
                f"config.{key}={value} (global) must be a positive multiple of the number of processes "
                f"({num_processes}): each process loads {key} / {num_processes} examples"
            )
        if value % num_devices:
            raise ConfigError(
                f"config.{key}={value} must be a positive multiple of the number of devices ({num_devices})"
            )
    if config.learning_rate <= 0:
        raise ConfigError(f"config.learning_rate={config.learning_rate} must be > 0")
    # The dataset's own classes are checked against these by `datasets.resolve`.
    if config.num_classes < 1:
        raise ConfigError(f"config.num_classes={config.num_classes} must be >= 1")
    if not 0 <= config.ignore_label <= 255 or config.ignore_label < config.num_classes:
        raise ConfigError(
            f"config.ignore_label={config.ignore_label} must be in {config.num_classes}..255: a value no "
            "class has, in an 8-bit mask"
        )
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"config.optimizer={config.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"config.lr_schedule={config.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}"
        )
    if len(config.crop_size) != 2 or min(config.crop_size) < 1:
        raise ConfigError(f"config.crop_size={tuple(config.crop_size)} must be (height, width), both >= 1")
    if not 0 <= config.ema_decay < 1:
        raise ConfigError(f"config.ema_decay={config.ema_decay} must be in [0, 1); 0 disables the average")
    if not 0 < config.min_scale <= config.max_scale:
        raise ConfigError(
            f"config.min_scale/max_scale={config.min_scale}/{config.max_scale}: need 0 < min <= max"
        )
    if not config.eval_scales or min(config.eval_scales) <= 0:
        raise ConfigError(
            f"config.eval_scales={tuple(config.eval_scales)}: need one or more positive factors, e.g. (1.0,)"
        )
    select_layer(config.cpu_layer)
    try:
        losses.class_weights(np.ones(1), config.class_weighting)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_signature(config: ml_collections.ConfigDict) -> dict:
    """The config values that fix parameter shapes: a workdir made with others cannot be resumed."""
    return {
        "num_classes": config.num_classes,
        "width": config.model.width,
        "aux_head": config.model.aux_head,
        "torch_compat": config.model.torch_compat,
    }


# Signature values of checkpoints written before a key existed.
_SIGNATURE_DEFAULTS = {"torch_compat": False}


def check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ConfigError when a workdir's checkpoints were made with other parameter shapes."""
    current = model_signature(config)
    saved = {**_SIGNATURE_DEFAULTS, **saved}
    differ = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(
            f"workdir {workdir} holds checkpoints of an incompatible model ({detail}); "
            "use a new --workdir or the matching config"
        )


def model_from_signature(
    signature: dict, layer: Layer = CORE, dtype: Any = jnp.float32, dropout_rate: float = 0.1
) -> models.FastSCNN:
    """Fast-SCNN with the parameter shapes of `signature` (`model_signature`, as checkpoints store it)."""
    signature = {**_SIGNATURE_DEFAULTS, **signature}
    return models.FastSCNN(
        num_classes=signature["num_classes"],
        width=signature["width"],
        dropout_rate=dropout_rate,
        aux_head=signature.get("aux_head", False),
        dtype=dtype,
        torch_compat=signature["torch_compat"],
        conv=layer.conv,
        resize_logits=layer.resize_logits,
    )


def create_model(config: ml_collections.ConfigDict, layer: Layer = CORE) -> models.FastSCNN:
    """Fast-SCNN as the config describes it, built with `layer`'s convolution."""
    return model_from_signature(
        model_signature(config), layer, jnp.dtype(config.model.dtype), config.model.dropout_rate
    )


def create_learning_rate_fn(config: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
    """`config.lr_schedule`: 'one_cycle' (linear warm-up for `warmup_pct` of the steps, then cosine decay) or
    'poly' (the Fast-SCNN paper's: `learning_rate * (1 - step / num_train_steps) ** poly_power`)."""
    if config.lr_schedule == "poly":
        return optax.polynomial_schedule(
            init_value=config.learning_rate,
            end_value=0.0,
            power=config.poly_power,
            transition_steps=max(num_train_steps, 1),
        )
    warmup_steps = int(config.warmup_pct * num_train_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=config.learning_rate * config.initial_lr_fraction,
        peak_value=config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(num_train_steps, warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule):
    """Global-norm clipping then `config.optimizer`: AdamW, or SGD with momentum and L2 weight decay (the
    Fast-SCNN paper's); weight decay on convolution kernels only, not on BN or biases."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    if config.optimizer == "sgd":
        return optax.chain(
            optax.clip_by_global_norm(config.grad_clip_norm),
            optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
            optax.sgd(learning_rate_fn, momentum=config.momentum),
        )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            learning_rate_fn,
            b1=config.adam_b1,
            b2=config.adam_b2,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
    )


def init_variables(model: nn.Module, rngs, *args, compiler_options: dict | None = None, **kwargs) -> dict:
    """`model.init(rngs, *args, **kwargs)`, jit-compiled (one program instead of an op-by-op trace)."""
    return jax.jit(functools.partial(model.init, **kwargs), compiler_options=compiler_options)(rngs, *args)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: models.FastSCNN,
    rng: jax.Array,
    optimizer,
    layer: Layer = CORE,
) -> TrainState:
    """Initial parameters (every head, auxiliary included), BN statistics and optimizer state."""
    params_rng, dropout_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *config.crop_size, 3), jnp.float32)
    variables = init_variables(
        model,
        {"params": params_rng, "dropout": dropout_rng},
        dummy,
        train=True,
        compiler_options=layer.init_compiler_options,
    )
    # `TrainState.create` without its eager `optimizer.init`: op by op, that compiles a program for each
    # distinct parameter shape at every start; jitted it is one (cached) program.
    return TrainState(
        step=0,
        apply_fn=model.apply,
        params=variables["params"],
        tx=optimizer,
        opt_state=jax.jit(optimizer.init)(variables["params"]),
        batch_stats=variables["batch_stats"],
        ema=jax.tree.map(jnp.copy, dict(variables)) if config.ema_decay > 0 else None,
    )


def ema_update(ema: dict, variables: dict, decay: float, step: jax.Array) -> dict:
    """One step of the moving average of `variables`. The decay ramps up as (1 + step) / (10 + step) until
    it reaches `decay`, so the first, random-initialised weights are soon forgotten."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, v: d * e + (1.0 - d) * v, ema, variables)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    weights: jax.Array | None,
    dropout_rng: jax.Array,
    layer: Layer = CORE,
    augment: bool = False,
) -> tuple[TrainState, metrics.TrainMetrics]:
    """One optimizer step on a (global) batch; returns the new state and the step's metrics.

    With `augment`, the batch is the reader's whole examples (`augmentation.augment_batch`'s input), made into
    augmented crops here, on the device; without, it is `image` and `label` crops ready for the model.
    """
    if augment:
        batch = augmentation.augment_batch(batch, config)
    step_rng = jax.random.fold_in(dropout_rng, state.step)

    def loss_fn(params):
        """The layer's training loss of `params`."""
        variables = {"params": params, "batch_stats": state.batch_stats}
        return layer.train_loss(state.apply_fn, variables, batch, step_rng, config=config, weights=weights)

    (loss, (predictions, labels, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if state.ema is not None:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        state = state.replace(ema=ema_update(state.ema, variables, config.ema_decay, state.step))
    step_metrics = metrics.TrainMetrics.single_from_model_output(
        loss=loss,
        predictions=predictions,
        num_classes=config.num_classes,
        label=labels,
        valid=labels != config.ignore_label,
    )
    return state, step_metrics


def predict_scores(
    model: models.FastSCNN,
    variables: dict,
    images: jax.Array,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
) -> jax.Array:
    """Class scores [B, H, W, K] of `images`, at their size; the argmax is the prediction.

    With `scales` (1.0,) and no `flip`, the model's logits. Otherwise test-time augmentation, as
    mmsegmentation's multi-scale flip test does it: the images resized by each factor in `scales` (and also
    mirrored, with `flip`), each view's class probabilities resized back to the input size (and mirrored
    back), and the mean of them returned. It costs one forward pass per view, on images of scale**2 the
    pixels. The model computes each view at its `grid_size` (sides that are multiples of its stride).
    """
    if tuple(scales) == (1.0,) and not flip:
        return model.apply(variables, images, train=False)
    height, width = images.shape[1:3]
    views = []
    for scale in scales:
        size = tuple(max(1, round(side * scale)) for side in (height, width))
        rescaled = models.resize_bilinear(images.astype(jnp.float32), size)
        for mirrored in (False, True) if flip else (False,):
            view = rescaled[:, :, ::-1] if mirrored else rescaled
            probs = jax.nn.softmax(model.apply(variables, view, train=False), axis=-1)
            probs = probs[:, :, ::-1] if mirrored else probs
            views.append(models.resize_bilinear(probs, (height, width)))
    return sum(views) / len(views)


def eval_step(
    variables: dict,
    batch: dict[str, jax.Array],
    *,
    model: models.FastSCNN,
    ignore_label: int,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
) -> metrics.EvalMetrics:
    """Confusion matrix of one batch; padding examples (`mask` False) and void pixels are left out.

    `scales` and `flip` choose test-time augmentation (`predict_scores`).
    """
    logits = predict_scores(model, variables, batch["image"], scales, flip)
    valid = (batch["label"] != ignore_label) & batch["mask"][:, None, None]
    return metrics.EvalMetrics.single_from_model_output(logits=logits, label=batch["label"], valid=valid)


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every element of every array in `tree` is finite (one reduction over all the leaves)."""
    return jnp.all(jnp.isfinite(ravel_pytree(tree)[0]))


def create_mesh() -> Mesh:
    """One-axis mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles global arrays, sharded on the batch axis, from this process's part of the batch."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def make_train_step(
    config: ml_collections.ConfigDict,
    weights,
    dropout_rng: jax.Array,
    mesh: Mesh,
    layer: Layer = CORE,
    augment: bool = False,
):
    """`train_step` jit-compiled for the mesh: state replicated and donated, batch sharded; `augment` as
    `train_step` takes it (the training loop's batches: True)."""
    replicated = NamedSharding(mesh, P())
    step = functools.partial(
        train_step, config=config, weights=weights, dropout_rng=dropout_rng, layer=layer, augment=augment
    )
    return jax.jit(
        step,
        in_shardings=(replicated, NamedSharding(mesh, P("data"))),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=layer.train_compiler_options,
    )


def make_eval_step(model: models.FastSCNN, config: ml_collections.ConfigDict, mesh: Mesh):
    """`eval_step` jit-compiled for the mesh: variables replicated, batch sharded; test-time augmentation
    as `config.eval_scales` and `config.eval_flip` say."""
    step = functools.partial(
        eval_step,
        model=model,
        ignore_label=config.ignore_label,
        scales=tuple(config.eval_scales),
        flip=config.eval_flip,
    )
    return jax.jit(
        step,
        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
        out_shardings=NamedSharding(mesh, P()),
    )
