"""Tests of predict: every image mode, folders and globs, non-images skipped, outputs at the input size."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from fastscnn_jax import checkpointing, classes, cpu, models, predict, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A small randomly initialised model saved as a weights file, with its settings in the metadata."""
    model = models.FastSCNN(num_classes=classes.NUM_CLASSES, width=0.25)
    variables = steps.init_variables(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    path = tmp_path_factory.mktemp("weights") / "tiny.msgpack"
    meta = {"model": {"num_classes": classes.NUM_CLASSES, "width": 0.25, "aux_head": False}}
    checkpointing.save_weights_file(str(path), variables, meta)
    return str(path), model, variables


def test_load_model_builds_the_network_of_the_metadata(tmp_path):
    """`checkpointing.load_model` builds the module the metadata describes (auxiliary head and torch_compat
    included) with the layer asked for, and gives variables that module applies; the same logits whatever
    the layer. A file without model settings is refused, naming it."""
    model = models.FastSCNN(num_classes=5, width=0.25, aux_head=True, torch_compat=True)
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (1, 32, 48, 3)), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = steps.init_variables(model, rngs, images, train=True)  # the auxiliary head too
    assert "aux_head" in variables["params"]
    settings = {"num_classes": 5, "width": 0.25, "aux_head": True, "torch_compat": True}
    path = str(tmp_path / "w.msgpack")
    checkpointing.save_weights_file(path, variables, {"model": settings, "step": 3})
    logits = {}
    for layer, conv in (("off", nn.Conv), ("on", cpu.LAYER.conv)):
        loaded, loaded_variables, meta = checkpointing.load_model(path, layer)
        assert meta["step"] == 3 and set(loaded_variables) == {"params", "batch_stats"}
        built = (loaded.num_classes, loaded.width, loaded.aux_head, loaded.torch_compat)
        assert built == (5, 0.25, True, True)
        assert loaded.conv == conv
        logits[layer] = np.asarray(jax.jit(loaded.apply)(loaded_variables, images))
    scale = float(np.abs(logits["off"]).max())
    np.testing.assert_allclose(logits["on"], logits["off"], rtol=0, atol=1e-5 * scale)
    np.testing.assert_array_equal(logits["off"], jax.jit(model.apply)(variables, images))
    # 'auto' is the CPU layer on a CPU backend, the core elsewhere.
    auto, _, _ = checkpointing.load_model(path)
    assert auto.conv == (cpu.LAYER.conv if jax.default_backend() == "cpu" else nn.Conv)

    bare = str(tmp_path / "bare.msgpack")
    checkpointing.save_weights_file(bare, variables, {"step": 3})
    with pytest.raises(ValueError, match=f"{bare} has no model settings in its metadata"):
        checkpointing.load_model(bare)
    with pytest.raises(ValueError, match="cpu_layer must be one of"):
        checkpointing.load_model(path, "fast")


def _write_images(folder):
    """One file per supported mode and kind, plus a file that is not an image; returns expected sizes."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (21, 33), dtype=np.uint16)).save(folder / "gray16.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "tiny.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rng.integers(0, 256, (24, 64, 3), dtype=np.uint8)).save(folder / "rotated.jpg", exif=exif)
    (folder / "notes.txt").write_text("not an image")
    return {
        "rgb": (37, 53),
        "rgba": (40, 30),
        "gray": (37, 53),
        "palette": (37, 53),
        "gray16": (21, 33),
        "tiny": (8, 8),
        "rotated": (64, 24),
    }


def test_load_rgb_converts_every_mode(tmp_path):
    """Every mode decodes to uint8 RGB of the displayed size; 16-bit is scaled by its range."""
    sizes = _write_images(tmp_path)
    for name, size in sizes.items():
        path = next(tmp_path.glob(f"{name}.*"))
        image = predict.load_rgb(str(path))
        assert image.shape == (*size, 3) and image.dtype == np.uint8, name
    gray16 = np.asarray(Image.open(tmp_path / "gray16.png"), np.float64)
    np.testing.assert_array_equal(
        predict.load_rgb(str(tmp_path / "gray16.png"))[..., 1],
        np.round(gray16 / 65535 * 255).astype(np.uint8),
    )


def test_predict_folder_writes_masks_at_input_size_and_skips_non_images(tmp_path, weights_file):
    """A folder: three outputs per image at its size, the legend once, the text file skipped."""
    (tmp_path / "in").mkdir()
    sizes = _write_images(tmp_path / "in")
    path, model, variables = weights_file
    segmenter = predict.Segmenter(path)
    skipped = predict.predict_files(
        predict.list_inputs(str(tmp_path / "in")), str(tmp_path / "out"), segmenter, max_side=2048, alpha=0.5
    )
    assert len(skipped) == 1 and "notes.txt" in skipped[0]
    assert (tmp_path / "out" / "legend.png").is_file()
    for name, size in sizes.items():
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        color = np.asarray(Image.open(tmp_path / "out" / f"{name}_color.png"))
        over = np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.png"))
        assert mask.shape == size and color.shape == (*size, 3) and over.shape == (*size, 3), name
        assert mask.max() < classes.NUM_CLASSES
        np.testing.assert_array_equal(color, classes.PALETTE[mask])
    # The mask is the model's argmax on the decoded image (the model as saved, run with the plain core).
    image = predict.load_rgb(str(tmp_path / "in" / "rgb.png"))
    expected = np.argmax(np.asarray(jax.jit(model.apply)(variables, image[None].astype(np.float32))), -1)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "rgb_mask.png")), expected)
    np.testing.assert_array_equal(predict.Segmenter(path, layer="off")(image, max_side=2048), expected)


def test_large_images_are_segmented_at_max_side_and_upsampled(tmp_path, weights_file):
    """An image over max_side comes back at its full size."""
    Image.fromarray(np.zeros((300, 500, 3), np.uint8)).save(tmp_path / "big.png")
    mask = predict.Segmenter(weights_file[0])(predict.load_rgb(str(tmp_path / "big.png")), max_side=100)
    assert mask.shape == (300, 500)


def test_overlay_blends_colours():
    """The overlay is the alpha blend of photo and palette colour."""
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 1], [3, 11]], np.uint8)
    expected = np.round(0.25 * 100 + 0.75 * classes.PALETTE[mask].astype(np.float64)).astype(np.uint8)
    np.testing.assert_array_equal(predict.overlay(image, mask, 0.75), expected)


def test_cli_glob_and_missing_input(tmp_path, weights_file):
    """The command line takes a glob (here with test-time augmentation); a path matching nothing and
    scales that are not positive numbers are one-line errors."""
    _write_images(tmp_path)
    env = {**os.environ, "PYTHONPATH": REPO}
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "fastscnn_jax.predict", *a],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = run(
        f"--input={tmp_path}/r*.png",
        f"--output={tmp_path}/out",
        f"--checkpoint={weights_file[0]}",
        "--scales=0.5,1",
        "--flip",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["legend.png"] + [f"{n}_{k}.png" for n in ("rgb", "rgba") for k in ("mask", "color", "overlay")]
    )
    result = run(
        f"--input={tmp_path}/none*.png", f"--output={tmp_path}/out2", f"--checkpoint={weights_file[0]}"
    )
    assert result.returncode != 0 and "no file matches" in result.stderr and "Traceback" not in result.stderr
    result = run(f"--input={tmp_path}/r*.png", f"--output={tmp_path}/out3", "--scales=1,big")
    assert result.returncode != 0 and "--scales=1,big" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ValueError, match="scales"):
        predict.Segmenter(weights_file[0], scales=(1.0, 0.0))


# Runs the predict command and reports the process's peak resident memory on exit.
PEAK_RSS_SCRIPT = (
    "import atexit, resource, runpy, sys; atexit.register(lambda: print('peak_rss_kib', "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
    "runpy.run_module('fastscnn_jax.predict', run_name='__main__')"
)


def test_24_megapixel_photo_is_segmented_at_max_side_in_bounded_memory(tmp_path, weights_file):
    """A 4000x6000 JPEG through the command line at the default --max_side (2048): outputs at 4000x6000,
    and the process (on CPU) peaks under 6 GiB; most of that is full-size image arrays, the network sees
    1365x2048."""
    rows = (np.arange(4000) // 5 % 256).astype(np.uint8)[:, None]
    cols = (np.arange(6000) // 7 % 256).astype(np.uint8)[None, :]
    image = np.stack(np.broadcast_arrays(rows, cols, rows ^ cols), axis=-1)
    Image.fromarray(image).save(tmp_path / "big.jpg", quality=90)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_RSS_SCRIPT,
            f"--input={tmp_path / 'big.jpg'}",
            f"--output={tmp_path / 'out'}",
            f"--checkpoint={weights_file[0]}",
        ],
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 image(s) segmented" in result.stdout
    for kind in ("mask", "color", "overlay"):
        with Image.open(tmp_path / "out" / f"big_{kind}.png") as out:
            assert out.size == (6000, 4000), kind
    peak_gib = int(result.stderr.split("peak_rss_kib ")[1].split()[0]) / 2**20
    assert peak_gib < 6.0, f"peak resident memory {peak_gib:.2f} GiB"


def test_output_names_never_collide():
    """Inputs that share a file-name stem (a.png and a.jpg, or x.png in two folders) get distinct outputs."""
    paths = ["d/a.png", "d/a.jpg", "d/b.png", "e/x.png", "f/x.png", "d/c.tar.png"]
    stems = predict.output_stems(paths)
    assert stems == ["a_png", "a_jpg", "b", "x_png_1", "x_png_2", "c.tar"]
    assert len(set(stems)) == len(stems)
