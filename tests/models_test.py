"""Tests of fastscnn_jax.models: sizes and shapes, BatchNorm, resize and pooling against references.

Variables are built from the shapes `init` would give and filled with numpy random numbers: a jitted `init`
compiles much longer than `apply` at a quarter width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fastscnn_jax import models

RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


def _count(tree) -> int:
    """Number of scalars in a pytree of arrays or shape structs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _variables(model: models.FastSCNN, shape=(1, 8, 8, 3), seed: int = 0) -> dict:
    """Random variables with the structure `model.init(..., train=True)` gives (He-scaled kernels)."""
    shapes = jax.eval_shape(lambda x: model.init(RNGS, x, train=True), jnp.zeros(shape))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        """A random array for one variable, by its name."""
        name = path[-1].key
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1]) if len(leaf.shape) == 4 else 9
            value = rng.normal(0.0, math.sqrt(2.0 / fan_in), leaf.shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def small_model_and_variables():
    """Quarter-width FastSCNN with an aux head, 19 classes, and random variables for it."""
    model = models.FastSCNN(19, width=0.25, aux_head=True)
    return model, _variables(model)


@jax.jit
def _train_apply(variables, images, key):
    """Train-mode forward of the small model: logits and the mutated collections."""
    model = models.FastSCNN(19, width=0.25, aux_head=True)
    return model.apply(
        variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats", "intermediates"]
    )


def _images(shape, seed=0) -> jax.Array:
    """Random RGB images in 0..255."""
    return jnp.asarray(np.random.default_rng(seed).uniform(0, 255, shape), jnp.float32)


def test_parameter_count_matches_paper():
    """Full-width FastSCNN has ~1.1M parameters; the aux head adds exactly its hand-counted weights."""
    x = jnp.zeros((2, 360, 480, 3))  # Shapes only: eval_shape computes nothing.
    count = {}
    for aux in (False, True):
        for train in (False, True):
            model = models.FastSCNN(19, aux_head=aux)
            params = jax.eval_shape(lambda x, m=model, t=train: m.init(RNGS, x, train=t), x)["params"]
            assert ("aux_head" in params) == (aux and train)
            count[aux, train] = _count(params)
    assert 1.05e6 <= count[False, True] <= 1.2e6, count
    assert count[False, False] == count[False, True] == count[True, False]
    # Aux head: 3x3 conv 64->32 (no bias), BN scale+bias, 1x1 conv 32->19 with bias.
    aux_params = 3 * 3 * 64 * 32 + 2 * 32 + 32 * 19 + 19
    assert count[True, True] - count[False, True] == aux_params
    # The full-width network maps a 360x480 batch to float32 logits of the same size.
    model = models.FastSCNN(19)
    variables = jax.eval_shape(lambda x: model.init(RNGS, x), x)
    logits = jax.eval_shape(model.apply, variables, x)
    assert logits.shape == (2, 360, 480, 19) and logits.dtype == jnp.float32


@pytest.mark.parametrize("size", [(360, 480), (97, 131), (8, 8)])
def test_logits_shape_and_dtype(small_model_and_variables, size):
    """Logits are float32 [B, H, W, classes] at the input size, for even, odd and tiny inputs."""
    model, variables = small_model_and_variables
    images = _images((2, *size, 3)).astype(jnp.uint8)  # Raw uint8 photos are accepted too.
    logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    assert logits.shape == (2, *size, 19)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_off_grid_images_run_at_the_nearest_multiple_of_32(small_model_and_variables):
    """Sides off the network's 32-pixel grid are resized to the nearest multiple and the 1/8 logits
    resized back to the image's size: the same logits as doing that by hand around a model that runs any
    size as is, and not the logits that model gives at the image's own size. Tramac's conventions keep the
    image's size."""
    model, variables = small_model_and_variables
    assert model.grid_size((360, 480)) == (352, 480)
    assert model.grid_size((100, 80)) == (96, 96)  # 2.5 multiples round up
    assert model.grid_size((8, 8)) == (32, 32)
    assert model.clone(torch_compat=True).grid_size((360, 481)) == (360, 481)
    images = _images((2, 100, 131, 3), seed=3)
    logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    as_is = model.clone(input_multiple=1)
    low = as_is.apply(variables, models.resize_bilinear(images, (96, 128)), upsample=False)
    np.testing.assert_allclose(logits, models.resize_bilinear(low, (100, 131)), rtol=1e-3, atol=1e-3)
    assert float(jnp.abs(logits - as_is.apply(variables, images)).max()) > 1e-2


def test_aux_logits_sown_at_input_size(small_model_and_variables):
    """With aux_head and train=True the aux logits are sown at the input height and width."""
    _, variables = small_model_and_variables
    logits, state = _train_apply(variables, _images((2, 17, 23, 3), seed=5), jax.random.key(2))
    (aux,) = state["intermediates"]["aux_logits"]
    assert aux.shape == logits.shape == (2, 17, 23, 19)
    assert aux.dtype == jnp.float32
    assert not np.allclose(aux, logits)


@pytest.mark.parametrize("src,dst", [((45, 60), (360, 480)), ((7, 9), (23, 31)), ((1, 5), (4, 11))])
def test_resize_bilinear_upsampling_equals_jax_image(src, dst):
    """Upsampling equals jax.image.resize bilinear (which antialiases only when downsampling)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *src, 3)), jnp.float32)
    out = models.resize_bilinear(x, dst)
    expected = jax.image.resize(x, (2, *dst, 3), "bilinear")
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _numpy_bilinear(x: np.ndarray, size) -> np.ndarray:
    """Per-pixel half-pixel-centre bilinear resize of NHWC `x`, source coordinates clamped to the edges."""
    in_h, in_w = x.shape[1:3]
    out = np.zeros((x.shape[0], *size, x.shape[3]), np.float64)
    for i in range(size[0]):
        sy = min(max((i + 0.5) * in_h / size[0] - 0.5, 0.0), in_h - 1)
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, in_h - 1), sy - y0
        for j in range(size[1]):
            sx = min(max((j + 0.5) * in_w / size[1] - 0.5, 0.0), in_w - 1)
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, in_w - 1), sx - x0
            top = (1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1]
            bottom = (1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]
            out[:, i, j] = (1 - fy) * top + fy * bottom
    return out


@pytest.mark.parametrize(
    "src,dst", [((23, 31), (7, 9)), ((12, 16), (5, 16)), ((6, 4), (10, 3)), ((36, 48), (35, 48))]
)
@pytest.mark.parametrize("resize", [models.resize_bilinear, models.resize_bilinear_two_tap])
def test_resize_bilinear_equals_numpy_reference(src, dst, resize):
    """Downsampling (and mixed resizes) equal a direct numpy half-pixel bilinear reference, in both forms."""
    x = np.random.default_rng(1).normal(size=(2, *src, 3)).astype(np.float32)
    out = resize(jnp.asarray(x), dst)
    np.testing.assert_allclose(out, _numpy_bilinear(x, dst), rtol=1e-5, atol=1e-5)


def test_resize_bilinear_same_size_is_identity():
    """Resizing to the input size returns the input unchanged."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 6, 2)), jnp.float32)
    np.testing.assert_array_equal(models.resize_bilinear(x, (5, 6)), x)


def _numpy_adaptive_avg_pool(x: np.ndarray, bins: int) -> np.ndarray:
    """PyTorch adaptive_avg_pool2d: bin i covers floor(i*n/b) .. ceil((i+1)*n/b)."""
    h, w = x.shape[1:3]
    out = np.zeros((x.shape[0], bins, bins, x.shape[3]), np.float64)
    for i in range(bins):
        y0, y1 = math.floor(i * h / bins), math.ceil((i + 1) * h / bins)
        for j in range(bins):
            x0, x1 = math.floor(j * w / bins), math.ceil((j + 1) * w / bins)
            out[:, i, j] = x[:, y0:y1, x0:x1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("bins", [6, 3])
def test_adaptive_avg_pool_dividing_size_equals_reshape_mean(bins):
    """When bins divide the size, pooling is the mean over equal reshaped blocks."""
    x = np.random.default_rng(3).normal(size=(2, 12, 18, 4)).astype(np.float32)
    expected = x.reshape(2, bins, 12 // bins, bins, 18 // bins, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(models.adaptive_avg_pool(jnp.asarray(x), bins), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(7, 11), (2, 3)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_adaptive_avg_pool_non_dividing_size_equals_pytorch_bins(bins, size):
    """Non-dividing sizes (even fewer pixels than bins) pool with PyTorch's bin edges; 1 bin is the mean."""
    x = np.random.default_rng(4).normal(size=(2, *size, 3)).astype(np.float32)
    out = models.adaptive_avg_pool(jnp.asarray(x), bins)
    assert out.shape == (2, bins, bins, 3)
    np.testing.assert_allclose(out, _numpy_adaptive_avg_pool(x, bins), rtol=1e-5, atol=1e-6)
    if bins == 1:
        np.testing.assert_allclose(out[:, 0, 0], x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_batchnorm_train_updates_stats_and_eval_is_deterministic(small_model_and_variables):
    """Train mode updates batch_stats (first BN by momentum 0.9); eval is deterministic, dropout off."""
    model, variables = small_model_and_variables
    images = _images((2, 32, 64, 3), seed=5)  # on the 32-pixel grid: the stem sees the images as they are
    logits_a, state = _train_apply(variables, images, jax.random.key(0))
    logits_b, _ = _train_apply(variables, images, jax.random.key(1))
    assert not np.allclose(logits_a, logits_b)  # Dropout is active when training.

    old = variables["batch_stats"]
    new = state["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
        assert not np.allclose(a, b)

    # First BN: running stats <- 0.9 * old + 0.1 * batch stats of the stride-2 3x3 stem conv, computed here.
    stem = variables["params"]["learning_to_downsample"]["ConvBN_0"]["Conv_0"]["kernel"]
    normalised = (images - jnp.asarray(models.IMAGENET_MEAN)) / jnp.asarray(models.IMAGENET_STD)
    conv = lax.conv_general_dilated(
        normalised,
        stem,
        (2, 2),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    bn_old = old["learning_to_downsample"]["ConvBN_0"]["BatchNorm_0"]
    bn_new = new["learning_to_downsample"]["ConvBN_0"]["BatchNorm_0"]
    np.testing.assert_allclose(
        bn_new["mean"], 0.9 * bn_old["mean"] + 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        bn_new["var"], 0.9 * bn_old["var"] + 0.1 * conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4
    )

    eval_fn = jax.jit(lambda v, x: model.apply(v, x))
    first, second = eval_fn(variables, images), eval_fn(variables, images)
    np.testing.assert_array_equal(first, second)
    # Eval uses the running statistics: changing them changes the logits.
    changed = eval_fn({"params": variables["params"], "batch_stats": new}, images)
    assert not np.allclose(first, changed)


def _dense_resize(x: jax.Array, size, align_corners: bool) -> jax.Array:
    """Bilinear resize as two products with the full interpolation matrices (the reference form)."""
    rows = models.interpolation_matrix(size[0], x.shape[1], align_corners)
    cols = models.interpolation_matrix(size[1], x.shape[2], align_corners)
    return jnp.einsum("pw,bowc->bopc", cols, jnp.einsum("oh,bhwc->bowc", rows, x))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
    "src,dst",
    [
        ((48, 60), (384, 480)),
        ((12, 15), (45, 60)),
        ((7, 9), (21, 31)),
        ((1, 3), (12, 15)),
        ((23, 31), (7, 9)),
    ],
)
def test_resize_bilinear_equals_dense_matrices_in_outputs_and_gradients(src, dst, align_corners):
    """Integer (8x, 4x, 3x, 12x on one pixel), non-integer, odd and downsampling resizes, both conventions:
    the shifted two-tap form where it applies gives the dense matrices' outputs and input gradients."""
    rng = np.random.default_rng(src[0] * 100 + dst[1])
    x = jnp.asarray(rng.normal(size=(2, *src, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, *dst, 3)), jnp.float32)
    out = models.resize_bilinear(x, dst, align_corners)
    np.testing.assert_allclose(out, _dense_resize(x, dst, align_corners), rtol=1e-5, atol=1e-5)
    grads = [
        jax.grad(lambda x, f=f: jnp.sum(weights * f(x, dst, align_corners)))(x)
        for f in (models.resize_bilinear, _dense_resize)
    ]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_upsample_phases_are_the_interpolation_matrix():
    """Row k * s + r of the interpolation matrix holds the phase-r weights at columns k - 1, k, k + 1."""
    for scale in (2, 3, 4, 8):
        matrix = models.interpolation_matrix(5 * scale, 5)
        phases = models._upsample_phases(scale)
        for r in range(scale):
            np.testing.assert_allclose(matrix[2 * scale + r, 1:4], phases[r], rtol=0, atol=1e-7)


def test_whole_model_resize_matrix_equals_auto(small_model_and_variables):
    """resize_impl='matrix' (every resize a matrix product, for int8 export) gives the default's logits."""
    _, variables = small_model_and_variables
    images = _images((2, 64, 96, 3), seed=3)  # 8x logits, 4x fusion: the shifted form in 'auto'
    out = {}
    for impl in models.RESIZE_IMPLS:
        model = models.FastSCNN(19, width=0.25, resize_impl=impl)
        out[impl] = jax.jit(lambda v, x, m=model: m.apply(v, x))(variables, images)
    scale = float(jnp.abs(out["matrix"]).max())
    np.testing.assert_allclose(out["auto"], out["matrix"], rtol=1e-5, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="bogus"):
        models.resize_bilinear(images, (8, 8), impl="bogus")
