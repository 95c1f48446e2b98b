"""Training augmentation inside the jitted train step: random scale, crop padded with void, flip and colour
jitter, vectorised over the batch.

The reader yields every example whole, on a fixed canvas: a dataset whose images differ in size pads each to
the largest (label `ignore_label`, image black) and passes its true `(height, width)` beside it. Per example,
a scale, a crop offset and a flip define an axis-aligned affine map from the crop's pixel coordinates to the
source's. The image is sampled there bilinearly and the label by nearest neighbour, from the same
coordinates, so the geometry cannot drift between them. Crop pixels that fall outside the scaled source are
void in the label and black in the image. Colour jitter follows, on the image alone.

Every random draw derives from `(config.seed, global example index)`: a resumed run, and each process of a
multi-host job, augments each example as an uninterrupted one-process run does.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Params(NamedTuple):
    """The random choices for one example (each a scalar array)."""

    scale: jax.Array  # resize factor of the source
    offset_y: jax.Array  # top row of the crop in the scaled source
    offset_x: jax.Array  # left column of the crop in the scaled source
    flip: jax.Array  # bool: mirror the crop left to right
    brightness: jax.Array  # added, on the 0..1 scale
    contrast: jax.Array  # factor of each channel's distance to its mean
    saturation: jax.Array  # factor of HSV saturation
    hue: jax.Array  # added to HSV hue (a full turn is 1)


def example_key(seed: int, index: jax.Array) -> jax.Array:
    """The PRNG key of global example `index` of a run seeded with `seed`."""
    return jax.random.fold_in(jax.random.key(seed), index)


def scaled_size(size: jax.Array, scale: jax.Array) -> jax.Array:
    """(height, width) of a source of `size` resized by `scale`, rounded, at least one pixel."""
    return jnp.maximum(jnp.round(size.astype(jnp.float32) * scale), 1.0).astype(jnp.int32)


def draw_params(key: jax.Array, size: jax.Array, config) -> Params:
    """Draws one example's scale, crop offset, flip and jitter.

    Args:
      key: the example's key (`example_key`).
      size: int32 [2], the source's (height, width).
      config: `crop_size`, `min_scale`, `max_scale`, `flip`, `brightness`, `contrast`, `saturation`, `hue`.

    Returns:
      Params; the offset is uniform over the positions that keep the crop inside the scaled source, or 0 on an
      axis where the scaled source is smaller than the crop (the crop then overhangs bottom and right).
    """
    keys = jax.random.split(key, 8)
    scale = jax.random.uniform(keys[0], (), jnp.float32, config.min_scale, config.max_scale)
    room = jnp.maximum(scaled_size(size, scale) - jnp.asarray(config.crop_size, jnp.int32), 0)
    offset_y = jax.random.randint(keys[1], (), 0, room[0] + 1)
    offset_x = jax.random.randint(keys[2], (), 0, room[1] + 1)
    flip = jax.random.bernoulli(keys[3]) if config.flip else jnp.asarray(False)

    def around(k, center, spread):
        """Uniform in [center - spread, center + spread]."""
        return jax.random.uniform(k, (), jnp.float32, center - spread, center + spread)

    return Params(
        scale,
        offset_y,
        offset_x,
        flip,
        around(keys[4], 0.0, config.brightness),
        around(keys[5], 1.0, config.contrast),
        around(keys[6], 1.0, config.saturation),
        around(keys[7], 0.0, config.hue),
    )


class _Axis(NamedTuple):
    """Where the crop's pixels along one axis sample the source."""

    low: jax.Array  # int32 [n]: the lower of the two bilinear neighbours
    high: jax.Array  # int32 [n]: the upper one
    weight: jax.Array  # float32 [n]: the upper one's weight
    nearest: jax.Array  # int32 [n]: the nearest source pixel (the label's)
    inside: jax.Array  # bool [n]: whether the pixel falls inside the scaled source


def _axis(length: jax.Array, scaled: jax.Array, offset: jax.Array, n: int, reverse: jax.Array) -> _Axis:
    """The sampling of `n` crop pixels from `offset` on in a source of `length` pixels resized to `scaled`.

    Pixel centres map as `tf.image.resize` and `jax.image.resize` map them (half-pixel centres, no
    antialiasing): crop pixel t lies at (offset + t + 0.5) * length / scaled - 0.5 in the source. The nearest
    pixel is that coordinate rounded half up, which is the bilinear neighbour of larger weight (the upper one
    on a tie), so a label and the image colour it weighs most come from the same source pixel.
    """
    t = jnp.arange(n)
    t = jnp.where(reverse, n - 1 - t, t)
    position = offset + t
    ratio = length.astype(jnp.float32) / scaled.astype(jnp.float32)
    coordinate = (position.astype(jnp.float32) + 0.5) * ratio - 0.5
    low = jnp.floor(coordinate)
    last = length - 1  # Clamped to the example's own pixels: canvas padding is never read.
    return _Axis(
        low=jnp.clip(low.astype(jnp.int32), 0, last),
        high=jnp.clip(low.astype(jnp.int32) + 1, 0, last),
        weight=coordinate - low,
        nearest=jnp.clip(jnp.floor(coordinate + 0.5).astype(jnp.int32), 0, last),
        inside=position < scaled,
    )


def crop(
    image: jax.Array, label: jax.Array, size: jax.Array, params: Params, config
) -> tuple[jax.Array, jax.Array]:
    """The geometric part of the augmentation: one example's scaled, cropped, maybe flipped image and label.

    Args:
      image: uint8 [H, W, 3], the canvas.
      label: uint8 or int [H, W], the canvas.
      size: int32 [2], the example's (height, width) at the canvas's top left.
      params: the example's draws.
      config: `crop_size` and `ignore_label`.

    Returns:
      image float32 [crop_h, crop_w, 3] in 0..255 (black outside the source), label int32 [crop_h, crop_w]
      (`ignore_label` outside the source).
    """
    crop_h, crop_w = config.crop_size
    scaled = scaled_size(size, params.scale)
    ys = _axis(size[0], scaled[0], params.offset_y, crop_h, jnp.asarray(False))
    xs = _axis(size[1], scaled[1], params.offset_x, crop_w, params.flip)

    # Separable bilinear sampling, rows first: two gathers of whole rows, then two of columns.
    wy = ys.weight[:, None, None]
    rows = image[ys.low].astype(jnp.float32) * (1 - wy) + image[ys.high].astype(jnp.float32) * wy
    wx = xs.weight[None, :, None]
    sampled = rows[:, xs.low] * (1 - wx) + rows[:, xs.high] * wx
    inside = ys.inside[:, None] & xs.inside[None, :]
    sampled = jnp.where(inside[..., None], sampled, 0.0)
    picked = label[ys.nearest][:, xs.nearest].astype(jnp.int32)
    return sampled, jnp.where(inside, picked, config.ignore_label)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """HSV of RGB in 0..1 (hue in 0..1, 0 where there is no chroma), on the last axis."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    chroma = value - jnp.min(rgb, axis=-1)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    sector = jnp.where(
        value == r, ((g - b) / safe) % 6.0, jnp.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    hue = jnp.where(chroma > 0, sector / 6.0, 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """RGB in 0..1 of HSV (hue taken modulo 1), on the last axis."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]

    def channel(n):
        """One channel of the standard piecewise-linear form."""
        k = (n + hue * 6.0) % 6.0
        return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def jitter_colour(image: jax.Array, params: Params, config) -> jax.Array:
    """Brightness (added), contrast (about each channel's mean), saturation and hue (in HSV) jitter of one
    image in 0..255, in tf.image's order; the result is clipped to 0..255. A jitter whose configured range is
    0 is left out of the traced step."""
    if config.brightness > 0:
        image = image + 255.0 * params.brightness  # The range is a fraction of 0..1.
    if config.contrast > 0:
        mean = jnp.mean(image, axis=(0, 1), keepdims=True)
        image = (image - mean) * params.contrast + mean
    if config.saturation > 0 or config.hue > 0:
        # Both in one trip through HSV, which is defined on 0..1.
        hsv = rgb_to_hsv(jnp.clip(image, 0.0, 255.0) / 255.0)
        hue = hsv[..., 0] + params.hue
        saturation = jnp.clip(hsv[..., 1] * params.saturation, 0.0, 1.0)
        image = hsv_to_rgb(jnp.stack([hue, saturation, hsv[..., 2]], axis=-1)) * 255.0
    return jnp.clip(image, 0.0, 255.0)


def augment_example(
    image: jax.Array, label: jax.Array, size: jax.Array, key: jax.Array, config
) -> tuple[jax.Array, jax.Array]:
    """One example's augmentation: draws with `key`, then `crop` and `jitter_colour`."""
    params = draw_params(key, size, config)
    image, label = crop(image, label, size, params, config)
    return jitter_colour(image, params, config), label


def augment_batch(batch: dict[str, jax.Array], config) -> dict[str, jax.Array]:
    """The reader's batch of whole examples as training crops, each augmented with its own key.

    Args:
      batch: `image` uint8 [B, H, W, 3] and `label` uint8 [B, H, W] on the canvas, `size` int32 [B, 2] each
        example's (height, width), `index` int32 [B] each example's position in the global training stream.
      config: `seed`, `crop_size`, `ignore_label` and the ranges `draw_params` reads.

    Returns:
      `image` float32 [B, crop_h, crop_w, 3] in 0..255 and `label` int32 [B, crop_h, crop_w].
    """
    keys = jax.vmap(functools.partial(example_key, config.seed))(batch["index"])
    augment = functools.partial(augment_example, config=config)
    image, label = jax.vmap(augment)(batch["image"], batch["label"], batch["size"], keys)
    return {"image": image, "label": label}
