"""Tests of fastscnn_jax.steps: config checks, schedule and optimizer, the train and eval steps, layer
selection, and data-parallel equivalence."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from fastscnn_jax import steps
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("batch_size", 0, "config.batch_size"),
        ("learning_rate", -1.0, "config.learning_rate"),
        ("num_classes", 0, "config.num_classes"),
        ("ignore_label", 5, "config.ignore_label"),
        ("optimizer", "adam", "config.optimizer"),
        ("lr_schedule", "cosine", "config.lr_schedule"),
        ("crop_size", (0, 10), "config.crop_size"),
        ("class_weighting", "bogus", "class_weighting"),
        ("eval_scales", (), "config.eval_scales"),
        ("eval_scales", (1.0, 0.0), "config.eval_scales"),
    ],
)
def test_validate_config_names_the_key(key, value, pattern):
    """Unworkable values give a ValueError naming the config key."""
    config = tiny.get_config()
    config[key] = value
    with pytest.raises(ValueError, match=pattern):
        steps.validate_config(config)


def test_learning_rate_is_one_cycle():
    """Warm-up to the peak, then decay towards the final fraction."""
    config = tiny.get_config()
    config.warmup_pct = 0.1
    fn = steps.create_learning_rate_fn(config, 100)
    peak = config.learning_rate
    assert float(fn(0)) == pytest.approx(peak * config.initial_lr_fraction, rel=1e-5)
    assert float(fn(10)) == pytest.approx(peak, rel=1e-5)
    assert float(fn(100)) == pytest.approx(peak * config.final_lr_fraction, rel=1e-3)
    assert float(fn(50)) < float(fn(20))


def test_poly_schedule_and_sgd():
    """The paper's recipe: lr * (1 - step / total) ** 0.9, and SGD with momentum and L2 weight decay on
    kernels only (one step from zero momentum: -lr * (grad + decay * param) for a kernel, -lr * grad else)."""
    config = tiny.get_config()
    config.update(optimizer="sgd", lr_schedule="poly", learning_rate=0.1, poly_power=0.9, weight_decay=0.5)
    fn = steps.create_learning_rate_fn(config, 100)
    assert float(fn(0)) == pytest.approx(0.1)
    assert float(fn(50)) == pytest.approx(0.1 * 0.5**0.9, rel=1e-5)
    assert float(fn(100)) == pytest.approx(0.0, abs=1e-9)
    optimizer = steps.create_optimizer(config, fn)
    params = {"kernel": jnp.full((1, 1, 1, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    grads = {"kernel": jnp.full((1, 1, 1, 2), 0.1), "bias": jnp.full((2,), 0.1)}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * (0.1 + 0.5 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -0.1 * 0.1, rtol=1e-6)


def _gradient_tree(scale: float) -> dict:
    """A pytree shaped like some of Fast-SCNN's parameters (scalars to kernels), values times `scale`."""
    rng = np.random.default_rng(3)
    shapes = {
        "kernel": (3, 3, 16, 32),
        "depthwise": (3, 3, 32),
        "bias": (11,),
        "scale": (1,),
        "empty": (0, 4),
    }
    return {k: jnp.asarray(rng.normal(size=s).astype(np.float32) * scale) for k, s in shapes.items()}


@pytest.mark.parametrize("scale, clipped", [(1e-3, False), (10.0, True)], ids=["under", "over"])
def test_optimizer_clips_the_global_norm(scale, clipped):
    """The optimizer's AdamW sees the gradients scaled to a global norm of `grad_clip_norm` when they are
    over it, unchanged under it: its first moment after one step is (1 - b1) times them."""
    config = tiny.get_config()
    config.grad_clip_norm = 1.0
    optimizer = steps.create_optimizer(config, steps.create_learning_rate_fn(config, 10))
    grads = _gradient_tree(scale)
    _, state = jax.jit(optimizer.update)(grads, optimizer.init(grads), grads)
    norm = float(optax.tree.norm(grads))
    assert (norm > 1.0) == clipped
    factor = 1.0 / norm if clipped else 1.0
    adam_state = state[1][0]
    for name, g in grads.items():
        np.testing.assert_allclose(
            adam_state.mu[name], (1 - config.adam_b1) * g * factor, rtol=1e-5, atol=1e-12
        )


def test_all_finite_sees_one_bad_element_in_any_leaf():
    """One NaN or infinity anywhere (any leaf, any dtype) makes `all_finite` false; empty leaves are fine."""
    tree = {**_gradient_tree(1.0), "half": jnp.ones((2, 3), jnp.bfloat16)}
    assert bool(steps.all_finite(tree)) and bool(steps.all_finite({}))
    for leaf in ("kernel", "bias", "scale", "half"):
        for bad in (jnp.nan, jnp.inf, -jnp.inf):
            poisoned = dict(tree)
            flat = poisoned[leaf].reshape(-1)
            poisoned[leaf] = flat.at[flat.size // 2].set(bad).reshape(tree[leaf].shape)
            assert not bool(steps.all_finite(poisoned)), (leaf, bad)


def test_moving_average_ramps_up_to_its_decay():
    """Early steps weigh the new weights heavily ((1 + step) / (10 + step) decay), later ones by `decay`."""
    ema, new = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(steps.ema_update(ema, new, 0.99, jnp.asarray(0))["w"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(steps.ema_update(ema, new, 0.99, jnp.asarray(10_000))["w"], 0.01, rtol=1e-5)


def _small_setup(learning_rate=1e-2, batch_size=2, crop_size=(32, 48), model=None):
    """A tiny model (`model` if given), its train state and a fixed batch."""
    config = tiny.get_config()
    config.crop_size = crop_size
    config.learning_rate = learning_rate
    model = model or steps.create_model(config)
    state = steps.create_train_state(
        config,
        model,
        jax.random.key(0),
        steps.create_optimizer(config, steps.create_learning_rate_fn(config, 30)),
    )
    rng = np.random.default_rng(0)
    h, w = crop_size
    label = np.repeat(np.repeat(rng.integers(0, 12, (batch_size, h // 8, w // 8)), 8, 1), 8, 2).astype(
        np.int32
    )
    image = np.asarray([[40, 200, 90]])[0] * (label[..., None] % 3 + 1) / 3 + rng.normal(
        0, 5, label.shape + (3,)
    )
    return config, state, {"image": jnp.asarray(image, jnp.float32), "label": jnp.asarray(label)}


def test_train_step_lowers_loss_on_a_fixed_batch():
    """Repeated steps on one batch reduce the loss; BN statistics and the step counter advance. The step
    is `make_train_step`'s with the layer this host selects (on CPU the CPU layer and its compiler
    options), and a NaN weight still gives a NaN loss."""
    layer = steps.select_layer("auto")
    config, state, batch = _small_setup(model=steps.create_model(tiny.get_config(), layer))
    mesh = steps.create_mesh()
    step = steps.make_train_step(config, None, jax.random.key(1), mesh, layer)
    state = jax.device_put(state, NamedSharding(mesh, P()))  # as the trainer places it: one compilation
    poisoned = jax.tree.map(jnp.copy, state)
    stem = poisoned.params["learning_to_downsample"]["ConvBN_0"]["Conv_0"]
    stem["kernel"] = stem["kernel"].at[0, 0, 0, 0].set(jnp.nan)
    _, m_nan = step(poisoned, batch)  # the options keep NaN arithmetic exact (honor_nans)
    assert np.isnan(float(m_nan.compute()["loss"]))
    losses = []
    first_stats = jax.tree.map(np.asarray, state.batch_stats)  # the step donates the state's buffers
    for _ in range(25):
        state, m = step(state, batch)
        losses.append(float(m.compute()["loss"]))
    assert np.all(np.isfinite(losses))
    # The trajectory depends on the CPU's float arithmetic; a step that learned nothing would leave the loss
    # near its first value.
    assert losses[-1] < 0.75 * losses[0], losses
    assert max(losses[-5:]) < min(losses[:5]), losses
    assert int(state.step) == 25
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), first_stats, state.batch_stats)
    assert max(jax.tree.leaves(moved)) > 0


def test_eval_step_counts_only_real_examples_and_non_void():
    """Padding examples and void pixels add nothing to the confusion matrix."""
    config, state, batch = _small_setup()
    model = steps.create_model(config)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    mask = jnp.asarray([True, False])
    eval_step = steps.make_eval_step(model, config, steps.create_mesh())
    m = eval_step(variables, {**batch, "mask": mask})
    matrix = m.compute()["confusion"]
    label0 = np.asarray(batch["label"][0])
    assert matrix.sum() == (label0 != config.ignore_label).sum()
    np.testing.assert_array_equal(matrix.sum(1), np.bincount(label0.reshape(-1), minlength=12)[:11])


def _confident_variables(state):
    """The state's variables with the classifier's last kernel scaled up: an untrained model's logits are
    about 1e-4 apart, which would make every class about equally likely and every prediction a near tie."""
    params = dict(state.params)
    classifier = dict(params["classifier"])
    classifier["Conv_0"] = {**classifier["Conv_0"], "kernel": classifier["Conv_0"]["kernel"] * 1e4}
    params["classifier"] = classifier
    return {"params": params, "batch_stats": state.batch_stats}


def test_predict_scores_plain_is_the_logits_and_test_time_augmentation_averages_probabilities():
    """With one scale of 1.0 and no flip, `predict_scores` is the model's logits. With scales and a flip it
    gives class probabilities at the input size (non-negative, summing to 1) that mirror with the input,
    which needs each mirrored view mirrored back; two views at 1.0 average to the softmax of the logits."""
    config, state, batch = _small_setup()
    model = steps.create_model(config)
    variables = _confident_variables(state)
    images = batch["image"]
    logits = model.apply(variables, images, train=False)
    np.testing.assert_array_equal(steps.predict_scores(model, variables, images), logits)
    np.testing.assert_allclose(
        steps.predict_scores(model, variables, images, scales=(1.0, 1.0)),
        jax.nn.softmax(logits, -1),
        rtol=1e-5,
        atol=1e-6,
    )
    tta = jax.jit(lambda x: steps.predict_scores(model, variables, x, scales=(0.75, 1.0, 1.5), flip=True))
    probs = tta(images)
    assert probs.shape == logits.shape
    assert float(probs.min()) >= 0
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tta(images[:, :, ::-1]), probs[:, :, ::-1], atol=1e-5)
    # The views disagree somewhere: averaging them is not the plain prediction under another name.
    assert float(jnp.abs(probs - jax.nn.softmax(logits, -1)).max()) > 1e-3


def test_test_time_views_are_the_scaled_sizes_and_come_back_at_the_input_size():
    """Each view is the input resized to scale x its sides (rounded; the model puts them on its grid), and
    its probabilities come back at the input's size."""

    class Recorder:
        """Stands in for the model: records the views' shapes and returns one-hot logits of class 0."""

        def __init__(self):
            self.shapes = []

        def apply(self, variables, images, train):
            self.shapes.append(images.shape)
            return jnp.zeros((*images.shape[:3], 3)).at[..., 0].set(10.0)

    images = jnp.zeros((1, 360, 480, 3))
    recorder = Recorder()
    probs = steps.predict_scores(recorder, {}, images, scales=(0.5, 0.75, 1.25), flip=True)
    assert recorder.shapes == [(1, h, w, 3) for h, w in ((180, 240), (270, 360), (450, 600)) for _ in "ab"]
    assert probs.shape == (1, 360, 480, 3)
    np.testing.assert_allclose(probs[..., 0], 1.0, rtol=1e-4)


def test_eval_step_with_test_time_augmentation_counts_the_same_pixels():
    """`config.eval_scales` and `eval_flip` reach the eval step: the same pixels are counted, and the
    predictions are the argmax of the averaged probabilities."""
    config, state, batch = _small_setup()
    config.eval_scales = (0.5, 1.0)
    config.eval_flip = True
    model = steps.create_model(config)
    variables = _confident_variables(state)
    mask = jnp.asarray([True, True])
    matrix = steps.make_eval_step(model, config, steps.create_mesh())(variables, {**batch, "mask": mask})
    matrix = np.asarray(matrix.compute()["confusion"])
    scores = steps.predict_scores(model, variables, batch["image"], (0.5, 1.0), True)
    predictions = np.asarray(jnp.argmax(scores, -1))
    label = np.asarray(batch["label"])
    valid = label != config.ignore_label
    expected = np.zeros_like(matrix)
    np.add.at(expected, (label[valid], predictions[valid]), 1)
    np.testing.assert_array_equal(matrix, expected)


MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import functools, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    # In float64. The tiny network at its initialisation is ill-conditioned: in float32, changing its weights
    # by 2 ulps moves the first update by about 2% (BatchNorm over channels of almost no spread amplifies
    # rounding), so the other order of the sums on 8 devices gave updates 0.4% and second losses 2e-4 apart
    # on one CPU and not on another. In float64 rounding is 1e-16 and the comparison can be tight: only the
    # partitioning itself could make the runs differ beyond it.
    jax.config.update("jax_enable_x64", True)
    from tests.steps_test import _small_setup
    from fastscnn_jax import steps
    from configs import tiny
    assert jax.device_count() == 8, jax.devices()
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)

    def run(devices, layer):
        config = tiny.get_config()
        config.model.dtype = "float64"
        model = steps.create_model(config, layer)
        config, state, batch = _small_setup(batch_size=8, crop_size=(64, 96), model=model)
        # Plain SGD: Adam would turn float noise in near-zero gradients into lr-sized steps, hiding
        # whether the partitioned computation itself agrees.
        sgd = optax.sgd(0.05)
        params = to64(state.params)
        state = state.replace(
            params=params, batch_stats=to64(state.batch_stats), tx=sgd, opt_state=sgd.init(params))
        batch = {**batch, "image": to64(batch["image"])}
        mesh = Mesh(np.asarray(devices), ("data",))
        rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        step = jax.jit(
            functools.partial(
                steps.train_step, config=config, weights=None, dropout_rng=jax.random.key(1), layer=layer),
            in_shardings=(rep, data), out_shardings=(rep, rep))
        state = jax.device_put(state, rep)
        batch = jax.device_put(batch, data)
        state, m1 = step(state, batch)
        after_one = jax.device_get(state)
        _, m2 = step(state, batch)
        return [float(m1.compute()["loss"]), float(m2.compute()["loss"])], after_one

    # The CPU layer, as `config.cpu_layer='auto'` runs on CPU hosts (its equivalence to the core is
    # tests/cpu_test.py's).
    from fastscnn_jax import cpu
    loss1, state1 = run(jax.devices()[:1], cpu.LAYER)
    loss8, state8 = run(jax.devices(), cpu.LAYER)
    # Only the reduction order differs. The loss and the CPU layer's depthwise kernel gradients still sum in
    # float32, as in training: the parameters may differ by a few float32 ulps.
    np.testing.assert_allclose(loss1, loss8, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(state1.batch_stats), jax.tree.leaves(state8.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    config = tiny.get_config()
    config.batch_size = 12
    try:
        steps.validate_config(config)
        raise SystemExit("batch_size 12 on 8 devices was accepted")
    except ValueError as e:
        assert "config.batch_size=12" in str(e) and "8" in str(e), e
    print("LOSSES", loss1, loss8)
    """
)


def test_one_device_equals_eight_devices():
    """The same global batch on 1 and on 8 (fake CPU) devices gives the same losses and parameters."""
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
        "PYTHONPATH": REPO,
    }
    result = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE_SCRIPT, REPO],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOSSES" in result.stdout
