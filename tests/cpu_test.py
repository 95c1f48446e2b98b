"""Tests of the CPU layer (fastscnn_jax/cpu): each form gives the core's outputs and gradients, the whole
model and training loss agree with the core's, and the core never imports the layer."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import tiny
from fastscnn_jax import cpu, losses, metrics, models, steps
from fastscnn_jax.cpu import conv as cpu_conv
from fastscnn_jax.cpu import loss as cpu_loss
from fastscnn_jax.cpu import resize as cpu_resize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_select_layer():
    """'on' is the CPU layer, 'off' the core, 'auto' the CPU layer exactly on the CPU backend; anything
    else is a ConfigError naming the key."""
    assert steps.select_layer("on") is cpu.LAYER
    assert steps.select_layer("off") is steps.CORE
    assert steps.select_layer("auto") is (cpu.LAYER if jax.default_backend() == "cpu" else steps.CORE)
    with pytest.raises(steps.ConfigError, match="config.cpu_layer"):
        steps.select_layer("fast")


def test_the_core_does_not_import_the_cpu_layer():
    """Importing the core (and the loop) and choosing the core layer leaves fastscnn_jax.cpu unimported."""
    code = (
        "import sys\n"
        "from fastscnn_jax import checkpointing, losses, metrics, models, steps, train\n"
        "assert steps.select_layer('off') is steps.CORE\n"
        "print(sorted(m for m in sys.modules if m.startswith('fastscnn_jax.cpu')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(16, 16), (17, 23), (5, 7)])
def test_depthwise_shifted_equals_grouped_conv(stride, size):
    """The shifted depthwise 3x3 conv and the grouped `lax` conv (the core's `nn.Conv`) agree in outputs
    and in gradients w.r.t. input and kernel, and both equal a direct numpy loop."""
    rng = np.random.default_rng(size[0] * 10 + stride)
    x = jnp.asarray(rng.normal(size=(2, *size, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32)
    out_shape = (2, (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1, 5)
    weights = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    def grouped(x, k, stride):
        """The core's form: a grouped convolution with an HWIO [3, 3, 1, C] kernel."""
        return lax.conv_general_dilated(
            x,
            k[:, :, None, :],
            (stride, stride),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )

    def loss(fn):
        """Random-weighted sum of the conv output, a function of (x, kernel)."""
        return lambda x, k: jnp.sum(weights * fn(x, k, stride))

    shifted = cpu_conv.depthwise_conv3x3_shifted(x, kernel, stride)
    reference = grouped(x, kernel, stride)
    assert shifted.shape == reference.shape == out_shape
    np.testing.assert_allclose(shifted, reference, rtol=1e-5, atol=1e-5)
    grads_shifted = jax.grad(loss(cpu_conv.depthwise_conv3x3_shifted), argnums=(0, 1))(x, kernel)
    grads_lax = jax.grad(loss(grouped), argnums=(0, 1))(x, kernel)
    for a, b in zip(grads_shifted, grads_lax, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    direct = np.zeros(out_shape, np.float64)
    for i in range(out_shape[1]):
        for j in range(out_shape[2]):
            window = padded[:, i * stride : i * stride + 3, j * stride : j * stride + 3, :]
            direct[:, i, j, :] = np.einsum("bhwc,hwc->bc", window, np.asarray(kernel))
    np.testing.assert_allclose(shifted, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,kernel,stride,padding,is_lax",
    [
        ((2, 9, 11, 6), (3, 3, 1, 6), 1, 1, False),  # depthwise: shifted multiply-adds
        ((2, 9, 11, 6), (3, 3, 1, 6), 2, 1, False),  # likewise at stride 2
        ((2, 9, 11, 16), (1, 1, 16, 8), 1, 0, False),  # 1x1: a dot over channels
        ((2, 9, 11, 16), (1, 1, 16, 8), 1, "SAME", False),  # as nn.Conv's default padding gives it
        ((2, 17, 23, 3), (3, 3, 3, 8), 2, 1, False),  # the stem: shifted multiply-adds, im2col gradient
        ((2, 16, 12, 3), (3, 3, 3, 8), 2, 0, False),  # torch_compat's unpadded stem
        ((2, 9, 11, 6), (3, 3, 6, 4), 1, 1, True),  # anything else: lax itself
        ((2, 9, 11, 6), (3, 3, 6, 4), 2, 1, True),  # likewise
        ((2, 9, 11, 6), (5, 5, 6, 4), 1, 2, True),  # likewise
        ((2, 9, 11, 6), (3, 3, 2, 6), 1, 1, True),  # grouped but not depthwise: lax
    ],
)
def test_conv_forms_equal_lax_conv_in_outputs_and_gradients(shape, kernel, stride, padding, is_lax):
    """The CPU layer's convolution function gives lax's outputs and gradients w.r.t. input and kernel, and
    uses a convolution op only where no faster form applies."""
    rng = np.random.default_rng(shape[1])
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=kernel), jnp.float32)
    pads = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    dn = lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))
    groups = shape[-1] // kernel[2]

    def reference(x, k):
        """The plain convolution."""
        return lax.conv_general_dilated(
            x, k, (stride, stride), pads, dimension_numbers=dn, feature_group_count=groups
        )

    def fast(x, k):
        """The CPU forms, called the way nn.Conv calls them."""
        return cpu_conv.conv_general_dilated(
            x,
            k,
            (stride, stride),
            pads if isinstance(pads, str) else list(pads),
            lhs_dilation=(1, 1),
            rhs_dilation=(1, 1),
            dimension_numbers=dn,
            feature_group_count=groups,
            precision=None,
        )

    expected = reference(x, k)
    weights = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
    assert ("conv_general_dilated" in str(jax.make_jaxpr(fast)(x, k))) == is_lax
    np.testing.assert_allclose(jax.jit(fast)(x, k), expected, rtol=1e-4, atol=1e-4)
    grads = [
        jax.grad(lambda x, k, f=f: jnp.sum(weights * f(x, k)), argnums=(0, 1))(x, k)
        for f in (fast, reference)
    ]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "src,dst,align_corners",
    [
        ((6, 8), (48, 64), False),  # 8x: width by matrix, height by shifted sums
        ((7, 9), (23, 31), False),  # non-integer factors: matrices
        ((6, 8), (48, 64), True),  # align_corners: matrices
        ((12, 16), (5, 16), False),  # downsampling the height, width unchanged
    ],
)
def test_resize_class_major_equals_resize_bilinear(src, dst, align_corners):
    """[B, K, H, W] resizing gives resize_bilinear's values and gradients, transposed."""
    rng = np.random.default_rng(src[0])
    x = jnp.asarray(rng.normal(size=(2, *src, 5)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, 5, *dst)), jnp.float32)

    def nhwc(x):
        """resize_bilinear, transposed to classes first."""
        return jnp.transpose(models.resize_bilinear(x, dst, align_corners), (0, 3, 1, 2))

    def class_major(x):
        """The class-major resize of the transposed input."""
        return cpu_loss.resize_bilinear_class_major(jnp.transpose(x, (0, 3, 1, 2)), dst, align_corners)

    np.testing.assert_allclose(class_major(x), nhwc(x), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda x, f=f: jnp.sum(weights * f(x)))(x) for f in (class_major, nhwc)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    # The CPU layer's resize of the model's logits: NHWC in and out, computed on class planes.
    np.testing.assert_allclose(
        cpu_resize.resize_logits(x, dst, align_corners),
        models.resize_bilinear(x, dst, align_corners),
        rtol=1e-5,
        atol=1e-5,
    )


def test_whole_model_and_train_loss_equal_the_core():
    """The tiny model built with the CPU layer gives the core's logits, and the CPU layer's training loss
    (class weights, label smoothing, aux head) the core's value, parameter gradients and confusion matrix,
    from the same variables."""
    config = tiny.get_config()
    config.label_smoothing = 0.1
    core_model = steps.create_model(config, steps.CORE)
    cpu_model = steps.create_model(config, cpu.LAYER)
    rng = np.random.default_rng(0)
    # 64x96: the 1/32 branch has 2x3 pixels; at fewer, BatchNorm over a handful of values amplifies
    # rounding differences into the gradients.
    images = jnp.asarray(rng.uniform(0, 255, (2, 64, 96, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 12, (2, 64, 96)), jnp.int32)  # 11 = void
    rngs = {"params": jax.random.key(2), "dropout": jax.random.key(3)}
    variables = steps.init_variables(core_model, rngs, images, train=True)
    logits = [jax.jit(m.apply)(variables, images) for m in (core_model, cpu_model)]
    scale = float(jnp.abs(logits[0]).max())
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4 * scale)

    weights = jnp.linspace(0.5, 2.0, 11)
    batch = {"image": images, "label": labels}

    def loss_and_grads(layer, model):
        """The layer's training loss of the variables, its aux outputs and the parameter gradients."""

        def loss(params):
            """The loss of `params` with the fixed BN statistics."""
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            return layer.train_loss(model.apply, v, batch, jax.random.key(5), config=config, weights=weights)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (core_loss, (core_pred, core_labels, _)), core_grads = loss_and_grads(steps.CORE, core_model)
    (cpu_loss_value, (cpu_pred, cpu_labels, _)), cpu_grads = loss_and_grads(cpu.LAYER, cpu_model)
    np.testing.assert_allclose(float(cpu_loss_value), float(core_loss), rtol=1e-5)
    # Gradients to float rounding, relative to the largest: some (the biases of BatchNorms followed by
    # another BatchNorm) are zero but for rounding.
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(core_grads))
    for a, b in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(core_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * largest)
    confusion = [
        metrics.confusion_matrix(p, lab, lab != 11, 11)
        for p, lab in ((core_pred, core_labels), (cpu_pred, cpu_labels))
    ]
    np.testing.assert_array_equal(confusion[1], confusion[0])


def test_class_major_loss_equals_the_core_loss_in_value_and_gradient():
    """The CPU loss of [B, K, H, W] logits gives the core loss of the [B, H, W, K] ones and the transposed
    gradient (plain; class weights and smoothing; OHEM)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=(2, 5, 6))  # 4 = void
    weights = jnp.asarray([0.5, 2.0, 1.0, 3.0], jnp.float32)
    class_major = jnp.transpose(jnp.asarray(logits), (0, 3, 1, 2))
    cases = [{}, {"weights": weights, "label_smoothing": 0.2}, {"ohem_threshold": 0.3, "ohem_min_kept": 9}]
    for kwargs in cases:

        def core(x, kwargs=kwargs):
            """The core loss of NHWC `x`."""
            return losses.segmentation_loss(x, jnp.asarray(labels), ignore_label=4, **kwargs)

        def class_major_loss(x, kwargs=kwargs):
            """The CPU loss of [B, K, H, W] `x`."""
            return cpu_loss.segmentation_loss(x, jnp.asarray(labels), ignore_label=4, **kwargs)

        last, grad_last = jax.value_and_grad(core)(jnp.asarray(logits))
        first, grad_first = jax.value_and_grad(class_major_loss)(class_major)
        np.testing.assert_allclose(float(first), float(last), rtol=1e-6)
        np.testing.assert_allclose(grad_first, jnp.transpose(grad_last, (0, 3, 1, 2)), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="do not match"):
        cpu_loss.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), ignore_label=4)


@pytest.mark.parametrize("low, size", [((6, 5), (48, 40)), ((3, 7), (48, 28))])
def test_loss_upsampled_inside_equals_loss_of_upsampled_logits(low, size):
    """`loss_logits` + `segmentation_loss(height_scale=...)` (the train step's path, which never writes the
    full-resolution logits) gives the loss and gradient of the logits upsampled by
    `resize_bilinear_class_major`, and `predictions_and_labels` the same confusion matrix as their argmax."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5) + low).astype(np.float32) * 3)
    labels = jnp.asarray(rng.integers(0, 6, size=(2,) + size))  # 5 = void
    weights = jnp.asarray([1.0, 2.0, 0.5, 3.0, 1.0], jnp.float32)
    ohem = {"ohem_threshold": 0.7, "ohem_min_kept": 50}
    cases = [{}, {"weights": weights, "label_smoothing": 0.1, **ohem}]
    for kwargs in cases:

        def full(x, kwargs=kwargs):
            """The loss of the upsampled logits."""
            up = cpu_loss.resize_bilinear_class_major(x, size)
            return cpu_loss.segmentation_loss(up, labels, ignore_label=5, **kwargs)

        def inside(x, kwargs=kwargs):
            """The loss with the height upsampled inside."""
            y, scale = cpu_loss.loss_logits(x, size)
            assert scale == size[0] // low[0]
            return cpu_loss.segmentation_loss(y, labels, ignore_label=5, height_scale=scale, **kwargs)

        want, want_grad = jax.jit(jax.value_and_grad(full))(logits)
        got, got_grad = jax.jit(jax.value_and_grad(inside))(logits)
        np.testing.assert_allclose(float(got), float(want), rtol=2e-6)
        np.testing.assert_allclose(
            got_grad, want_grad, rtol=1e-4, atol=1e-6 * float(jnp.abs(want_grad).max())
        )
    y, scale = cpu_loss.loss_logits(logits, size)
    predictions, phase_labels = cpu_loss.predictions_and_labels(y, labels, scale)
    got = metrics.confusion_matrix(predictions, phase_labels, phase_labels != 5, 5)
    up = cpu_loss.resize_bilinear_class_major(logits, size)
    want = metrics.confusion_matrix(jnp.argmax(up, 1), labels, labels != 5, 5)
    np.testing.assert_array_equal(got, want)
    assert float(want.sum()) == float((labels != 5).sum())


def test_loss_logits_falls_back_to_full_size():
    """Non-integer height factors and align_corners keep the full-size logits (scale 1)."""
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 3, 5, 6)).astype(np.float32))
    for size, kwargs in [((23, 48), {}), ((40, 48), {"align_corners": True})]:
        y, scale = cpu_loss.loss_logits(logits, size, **kwargs)
        assert scale == 1
        np.testing.assert_allclose(y, cpu_loss.resize_bilinear_class_major(logits, size, **kwargs), atol=1e-6)
    with pytest.raises(ValueError, match="upsampled 8x in height"):
        cpu_loss.segmentation_loss(logits, jnp.zeros((1, 41, 6), jnp.int32), ignore_label=3, height_scale=8)


def test_init_compiler_options_give_the_default_compiles_variables_bit_for_bit():
    """The CPU layer compiles `model.init` with `INIT_COMPILER_OPTIONS` (a shorter compile); every initial
    variable of the tiny network, auxiliary head included, equals those of XLA's default compile, at LLVM
    optimisation level 2 (named here, as the suite's processes compile at level 0: tests/conftest.py)."""
    model = steps.create_model(tiny.get_config())
    rngs = {"params": jax.random.key(3), "dropout": jax.random.key(4)}
    images = jnp.zeros((1, 32, 32, 3))
    fast = steps.init_variables(model, rngs, images, train=True, compiler_options=cpu.INIT_COMPILER_OPTIONS)
    xla_default = {"xla_backend_optimization_level": 2}
    default = jax.jit(functools.partial(model.init, train=True), compiler_options=xla_default)(rngs, images)
    assert jax.tree.structure(fast) == jax.tree.structure(default)
    assert "aux_head" in fast["params"]
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.std(fast["params"]["classifier"]["Conv_0"]["kernel"])) > 0  # random, not constant
