"""Tests of fastscnn_jax.augmentation: image and mask stay aligned under every transform, the draws are a
function of (seed, example index), scale and crop as configured, void where the crop leaves the image, flips
mirror both, canvas padding is never read, and colour jitter touches only the image.

Alignment is checked with images whose colour is the palette colour of their mask class, so any drift of
the geometry between image and mask shows as a colour that does not match the label.
"""

import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fastscnn_jax import augmentation, classes

VOID = classes.IGNORE_LABEL


def _config(**overrides):
    """Tiny config with augmentation off (no scaling, no flip, no jitter), then `overrides`."""
    config = tiny.get_config()
    config.min_scale = config.max_scale = 1.0
    config.flip = False
    config.brightness = config.contrast = config.saturation = config.hue = 0.0
    for key, value in overrides.items():
        config[key] = value
    return config


def _blocky_pair(size, block: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random mask of `block`-sized squares (void included) and the image of its palette colours."""
    h, w = size
    blocks = np.random.default_rng(seed).integers(0, VOID + 1, (-(-h // block), -(-w // block)))
    mask = np.kron(blocks, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
    return classes.PALETTE[mask], mask


@functools.cache
def _augment_fn(config_items: tuple):
    """`augment_batch` jitted for one config (given as its sorted items, so that it can be cached)."""
    config = _config(**dict(config_items))
    return jax.jit(functools.partial(augmentation.augment_batch, config=config))


def _augment(images, labels, config_overrides: dict, indices, sizes=None) -> tuple[np.ndarray, np.ndarray]:
    """Augments the examples (one canvas, all of it real unless `sizes`) as the train step does."""
    images, labels = np.asarray(images), np.asarray(labels)
    if sizes is None:
        sizes = [labels.shape[1:3]] * len(labels)
    batch = {
        "image": images,
        "label": labels,
        "size": np.asarray(sizes, np.int32),
        "index": np.asarray(indices, np.int32),
    }
    out = _augment_fn(tuple(sorted(config_overrides.items())))(batch)
    return np.asarray(out["image"]), np.asarray(out["label"])


def _find_window(out_image, out_label, image, mask) -> tuple[int, int, bool] | None:
    """(y, x, flipped) of the window of the bottom/right void-padded source that the output equals."""
    crop_h, crop_w = out_label.shape
    pad_h, pad_w = max(crop_h - mask.shape[0], 0), max(crop_w - mask.shape[1], 0)
    padded_mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=VOID)
    padded_image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    for flipped in (False, True):
        label = out_label[:, ::-1] if flipped else out_label
        img = out_image[:, ::-1] if flipped else out_image
        for y in range(padded_mask.shape[0] - crop_h + 1):
            for x in range(padded_mask.shape[1] - crop_w + 1):
                if np.array_equal(padded_mask[y : y + crop_h, x : x + crop_w], label) and np.array_equal(
                    padded_image[y : y + crop_h, x : x + crop_w], img
                ):
                    return y, x, flipped
    return None


@pytest.mark.parametrize("crop", [(16, 20), (32, 40), (16, 40)])
def test_crop_and_flip_keep_image_and_mask_aligned(crop):
    """Without scaling, outputs are one (maybe flipped) window of the source, padding void and black."""
    image, mask = _blocky_pair((24, 32), 4)
    n = 12
    out_images, out_labels = _augment([image] * n, [mask] * n, {"crop_size": crop, "flip": True}, range(n))
    assert out_images.shape == (n, *crop, 3) and out_images.dtype == np.float32
    assert out_labels.shape == (n, *crop) and out_labels.dtype == np.int32
    flips = set()
    for out_image, out_label in zip(out_images, out_labels, strict=True):
        # Every pixel's colour is its label's colour (void and padding are black).
        np.testing.assert_array_equal(out_image, classes.PALETTE[out_label].astype(np.float32))
        window = _find_window(out_image, out_label, image, mask)
        assert window is not None, "output is not a window of the source"
        flips.add(window[2])
        if crop[0] > 24:  # Taller than the image: the bottom rows are padding.
            assert window[0] == 0 and np.all(out_label[24:] == VOID) and np.all(out_image[24:] == 0)
    assert flips == {False, True}


def test_scaling_keeps_alignment():
    """With 0.5-2x scaling, pixels inside label regions have exactly their label's colour, others blend."""
    image, mask = _blocky_pair((48, 64), 12, seed=1)
    n = 8
    overrides = {"crop_size": (40, 56), "flip": True, "min_scale": 0.5, "max_scale": 2.0}
    out_images, out_labels = _augment([image] * n, [mask] * n, overrides, range(n))
    sizes, counts = set(), np.zeros(2, np.int64)
    for out_image, out_label in zip(out_images, out_labels, strict=True):
        # Interior: the 3x3 label neighbourhood is one non-void class, so bilinear blending of the image
        # (which only happens across class boundaries) cannot touch it.
        padded = np.pad(out_label, 1, mode="edge")
        neighbours = np.stack([padded[dy : dy + 40, dx : dx + 56] for dy in range(3) for dx in range(3)])
        interior = np.all(neighbours == out_label, axis=0) & (out_label != VOID)
        counts += [interior.sum(), (out_label != VOID).sum()]
        np.testing.assert_allclose(
            out_image[interior], classes.PALETTE[out_label[interior]].astype(np.float32), atol=1e-3
        )
        # Boundary pixels are blends: each channel lies between the colours of the nearby labels.
        colours = classes.PALETTE[neighbours].astype(np.float32)  # [9, h, w, 3]
        assert np.all(out_image >= colours.min(0) - 1e-3) and np.all(out_image <= colours.max(0) + 1e-3)
        sizes.add(int((out_label != VOID).sum()))
    assert len(sizes) > 1  # The scale really varies with the example.
    assert counts[0] >= 0.5 * counts[1]  # Most labelled pixels are interior: the check has teeth.


def test_same_seed_and_index_give_the_same_crop():
    """A (seed, index) pair gives the same output every time; another index or seed gives another."""
    image, mask = _blocky_pair((48, 64), 8, seed=2)
    overrides = {"crop_size": (40, 56), "flip": True, "min_scale": 0.5, "max_scale": 2.0, "brightness": 0.25}
    a = _augment([image] * 3, [mask] * 3, overrides, [5, 6, 5])
    b = _augment([image] * 3, [mask] * 3, overrides, [5, 6, 5])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x[0], x[2])  # the same index in another place of the batch
        assert not np.array_equal(x[0], x[1])
    other_seed = _augment([image] * 3, [mask] * 3, {**overrides, "seed": 1}, [5, 6, 5])
    assert not np.array_equal(other_seed[0][0], a[0][0])


def test_scale_range_and_void_padding_where_the_crop_leaves_the_image():
    """A crop larger than the scaled image holds it whole at the top left (top right when flipped), at a
    size within the configured scale range; everything else is void and black."""
    h, w = 12, 16
    image = np.full((h, w, 3), 200, np.uint8)
    mask = np.full((h, w), 3, np.uint8)
    n = 16
    overrides = {"crop_size": (40, 56), "flip": True, "min_scale": 0.75, "max_scale": 2.5}
    out_images, out_labels = _augment([image] * n, [mask] * n, overrides, range(n))
    scales = []
    for out_image, out_label in zip(out_images, out_labels, strict=True):
        rows, cols = np.nonzero(out_label != VOID)
        height, width = rows.max() + 1, cols.max() - cols.min() + 1
        assert rows.min() == 0 and (cols.min() == 0 or cols.max() == 55)
        inside = np.zeros_like(out_label, bool)
        inside[:height, cols.min() : cols.max() + 1] = True
        assert np.all(out_label[inside] == 3) and np.all(out_label[~inside] == VOID)
        np.testing.assert_allclose(out_image[inside], 200, atol=1e-3)
        assert np.all(out_image[~inside] == 0)
        # round(h * scale) x round(w * scale), the same scale on both axes
        assert 0.75 * h - 0.5 <= height <= 2.5 * h + 0.5 and 0.75 * w - 0.5 <= width <= 2.5 * w + 0.5
        assert abs(height / h - width / w) <= 0.5 / h + 0.5 / w
        scales.append(width / w)
    assert max(scales) - min(scales) > 0.5  # The range is used, not one value.


def test_draws_respect_the_configured_ranges():
    """Over many keys: scale in [min, max], offsets keep the crop inside the scaled source, jitter within
    its ranges, both flips."""
    config = _config(
        crop_size=(16, 20), flip=True, min_scale=0.5, max_scale=2.0, brightness=0.2, contrast=0.3
    )
    config.saturation, config.hue = 0.4, 0.05
    size = jnp.asarray([24, 32], jnp.int32)
    keys = jax.vmap(functools.partial(augmentation.example_key, 0))(jnp.arange(400))
    params = jax.vmap(lambda k: augmentation.draw_params(k, size, config))(keys)
    p = jax.tree.map(np.asarray, params)
    assert p.scale.min() >= 0.5 and p.scale.max() <= 2.0 and p.scale.max() - p.scale.min() > 1.2
    scaled = np.asarray(jax.vmap(augmentation.scaled_size, (None, 0))(size, params.scale))
    assert np.all(p.offset_y >= 0) and np.all(p.offset_y <= np.maximum(scaled[:, 0] - 16, 0))
    assert np.all(p.offset_x >= 0) and np.all(p.offset_x <= np.maximum(scaled[:, 1] - 20, 0))
    assert 0.3 < p.flip.mean() < 0.7
    for values, low, high in [
        (p.brightness, -0.2, 0.2),
        (p.contrast, 0.7, 1.3),
        (p.saturation, 0.6, 1.4),
        (p.hue, -0.05, 0.05),
    ]:
        assert (
            values.min() >= low and values.max() <= high and values.max() - values.min() > 0.6 * (high - low)
        )


def test_flip_mirrors_image_and_label():
    """With the same draws, the flipped crop is the unflipped one mirrored left to right, image and label."""
    image, mask = _blocky_pair((48, 64), 8, seed=4)
    config = _config(crop_size=(40, 56), min_scale=0.5, max_scale=2.0)
    key = augmentation.example_key(0, 3)
    params = augmentation.draw_params(key, jnp.asarray([48, 64]), config)
    size = jnp.asarray([48, 64], jnp.int32)
    image, mask = jnp.asarray(image), jnp.asarray(mask)
    crop = jax.jit(lambda flip: augmentation.crop(image, mask, size, params._replace(flip=flip), config))
    plain, flipped = crop(jnp.asarray(False)), crop(jnp.asarray(True))
    np.testing.assert_array_equal(np.asarray(flipped[1]), np.asarray(plain[1])[:, ::-1])
    np.testing.assert_allclose(np.asarray(flipped[0]), np.asarray(plain[0])[:, ::-1], atol=1e-4)
    assert not np.array_equal(np.asarray(plain[1]), np.asarray(plain[1])[:, ::-1])  # not symmetric anyway


def test_canvas_padding_is_never_read():
    """An example on a larger canvas, padded with a colour and class found nowhere else, augments exactly as
    the same example alone."""
    image, mask = _blocky_pair((20, 28), 4, seed=5)
    mask[mask == 5] = 4  # class 5 only in the padding
    canvas_image = np.full((32, 40, 3), 255, np.uint8)
    canvas_mask = np.full((32, 40), 5, np.uint8)
    canvas_image[:20, :28], canvas_mask[:20, :28] = image, mask
    overrides = {"crop_size": (24, 36), "flip": True, "min_scale": 0.5, "max_scale": 2.5, "contrast": 0.2}
    indices = range(8)
    on_canvas = _augment([canvas_image] * 8, [canvas_mask] * 8, overrides, indices, sizes=[(20, 28)] * 8)
    alone = _augment([image] * 8, [mask] * 8, overrides, indices)
    np.testing.assert_array_equal(on_canvas[1], alone[1])
    np.testing.assert_allclose(on_canvas[0], alone[0], atol=1e-3)
    assert not np.any(on_canvas[1] == 5)


def test_colour_jitter_changes_the_image_not_the_label():
    """Colour jitter changes the image but, with the same seed and index, never the label; values stay in
    0..255."""
    image, mask = _blocky_pair((48, 64), 8, seed=3)
    geometry = {"crop_size": (40, 56), "flip": True, "min_scale": 0.5, "max_scale": 2.0}
    jitter = {"brightness": 0.25, "contrast": 0.25, "saturation": 0.25, "hue": 0.02}
    plain_images, plain_labels = _augment([image] * 3, [mask] * 3, geometry, range(3))
    jitter_images, jitter_labels = _augment([image] * 3, [mask] * 3, {**geometry, **jitter}, range(3))
    np.testing.assert_array_equal(plain_labels, jitter_labels)
    assert all(np.abs(a - b).max() > 1.0 for a, b in zip(plain_images, jitter_images, strict=True))
    assert jitter_images.min() >= 0.0 and jitter_images.max() <= 255.0


def test_hsv_conversions_match_colorsys():
    """rgb_to_hsv and hsv_to_rgb agree with Python's colorsys, grey and saturated colours included."""
    rgb = np.random.default_rng(0).random((200, 3)).astype(np.float32)
    rgb[:4] = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0]]
    hsv = np.asarray(jax.jit(augmentation.rgb_to_hsv)(rgb))
    np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*c) for c in rgb], atol=1e-5)
    back = np.asarray(jax.jit(augmentation.hsv_to_rgb)(hsv))
    np.testing.assert_allclose(back, rgb, atol=1e-5)
