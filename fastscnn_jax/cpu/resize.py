"""The model's final upsample of its logits, in a form XLA:CPU runs faster."""

import jax
import jax.numpy as jnp

from fastscnn_jax import models


def resize_logits(x: jax.Array, size, align_corners: bool = False, impl: str = "auto") -> jax.Array:
    """`models.resize_bilinear` of NHWC `x`, computed on one [h, w] plane per example and class.

    With classes (11 for CamVid) as the minor dimension, XLA:CPU vectorises the 8x upsample across them; on
    [B * K, h, w, 1] planes it vectorises along each row's pixels, which is faster even with the transposes
    to and from that layout (benchmarks/README.md). Same values to float rounding (tests/cpu_test.py).
    """
    batch, height, width, classes = x.shape
    planes = jnp.transpose(x, (0, 3, 1, 2)).reshape(batch * classes, height, width, 1)
    resized = models.resize_bilinear(planes, size, align_corners, impl)
    return jnp.transpose(resized.reshape(batch, classes, *resized.shape[1:3]), (0, 2, 3, 1))
