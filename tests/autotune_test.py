"""Tests of `fastscnn_jax.autotune`: XLA:CPU's matrix-product library per jitted function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fastscnn_jax import autotune, steps


def test_eigen_option_takes_the_dots_from_ynnpack():
    """The 'eigen' compiler options leave a plain dot to XLA (Eigen); the default gives it to YNNPACK.

    Guards the option's name and value: a jaxlib that renamed it would otherwise fail or do nothing.
    """
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    hlo = {
        name: jax.jit(jnp.matmul, compiler_options=options or None).lower(a, b).compile().as_text()
        for name, options in autotune.COMPILER_OPTIONS.items()
    }
    assert "ynn_fusion" in hlo["ynnpack"]
    assert "ynn_fusion" not in hlo["eigen"] and " dot(" in hlo["eigen"]


@pytest.fixture(scope="module")
def model_and_inputs():
    """The tiny model's inference function, its initial variables and a batch of two images."""
    config = tiny.get_config()
    model = steps.create_model(config)
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)), jnp.float32)
    variables = steps.init_variables(model, jax.random.key(0), images, train=False)
    return (lambda v, x: model.apply(v, x, train=False)), variables, images


@pytest.mark.parametrize("library", autotune.DOT_LIBRARIES)
def test_every_library_gives_the_jitted_models_logits(model_and_inputs, library):
    """Pinned or tuned, the logits are those of `jax.jit` (to float rounding); 'auto' times both and keeps
    the one with the smaller median, pinned ones time nothing."""
    fn, variables, images = model_and_inputs
    tuned = autotune.TunedJit(fn, library, rounds=2)
    assert tuned.library is None  # chosen at the first call
    logits = tuned(variables, images)
    np.testing.assert_allclose(logits, jax.jit(fn)(variables, images), rtol=1e-5, atol=1e-5)
    if library == "auto":
        assert set(tuned.timings_ms) == {"ynnpack", "eigen"}
        assert tuned.library == min(tuned.timings_ms, key=tuned.timings_ms.get)
    else:
        assert tuned.library == library and not tuned.timings_ms
    np.testing.assert_array_equal(tuned(variables, images), logits)  # the same executable again


def test_unknown_library_is_a_clear_error():
    """A library name not in DOT_LIBRARIES raises, naming the setting and the choices."""
    with pytest.raises(ValueError, match="dot_library must be one of auto, ynnpack, eigen, got 'mkl'"):
        autotune.TunedJit(jnp.sum, "mkl")
