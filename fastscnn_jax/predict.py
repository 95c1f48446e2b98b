r"""Segments photos with a trained Fast-SCNN; by default the CamVid weights shipped with the package.

  python -m fastscnn_jax.predict --input=photo.jpg --output=out/
  python -m fastscnn_jax.predict --input='frames/*.png' --output=out/ --checkpoint=runs/camvid

For each image it writes `<name>_mask.png` (class indices, 8-bit), `<name>_color.png` (the classes' colours)
and `<name>_overlay.png` (the colours blended on the photo), all at the image's own size, and `legend.png`
once. `--scales` and `--flip` average the class probabilities over resized and mirrored copies of each image
(test-time augmentation, `steps.predict_scores`): slower, and usually more accurate on unseen streets.
The class names and colours are those the weights record (`classes.from_meta`): CamVid's for the shipped
weights, those of the dataset trained on for a workdir.
Any size and mode is accepted (RGB, RGBA, grayscale, palette, 16-bit, JPEG with EXIF orientation); files that
are not images are skipped with a message and the rest are still processed. Files are identified by their
content, not their extension, and only common raster formats are decoded (`images.IMAGE_FORMATS`); an image of
more than PIL's `Image.MAX_IMAGE_PIXELS` pixels (89.5 million) is skipped before it is decoded. Runs without
TensorFlow.
"""

import functools
import glob
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from fastscnn_jax import checkpointing, classes, cli, images, steps

FLAGS = flags.FLAGS


def list_inputs(spec: str) -> list[str]:
    """Files named by `spec`: a file, the files of a folder (sorted, not recursive), or a glob's matches."""
    if os.path.isdir(spec):
        return sorted(
            os.path.join(spec, n) for n in os.listdir(spec) if os.path.isfile(os.path.join(spec, n))
        )
    if os.path.isfile(spec):
        return [spec]
    matches = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    if not matches:
        raise FileNotFoundError(f"--input={spec}: no such file or folder, and no file matches it as a glob")
    return matches


def load_rgb(path: str) -> np.ndarray:
    """Decodes any image as uint8 RGB [H, W, 3], upright per its EXIF orientation.

    16-bit and 32-bit grayscale are scaled to 8 bits by their type's range; alpha is dropped.

    Raises:
      PIL.UnidentifiedImageError: not an image of `images.IMAGE_FORMATS` (whatever the extension says).
      PIL.Image.DecompressionBombError: more than `Image.MAX_IMAGE_PIXELS` pixels; nothing is decoded.
      OSError: unreadable, truncated or corrupt file.
    """
    with images.open_image(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image, np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or array.max() <= 65535 else array.max()
            gray = np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        return np.asarray(image.convert("RGB"))


def colorize(mask: np.ndarray, class_info: classes.Classes = classes.CAMVID) -> np.ndarray:
    """The classes' colours [H, W, 3] of a class-index mask (void and other values in `ignore_color`)."""
    palette = np.concatenate([class_info.palette, np.asarray([class_info.ignore_color], np.uint8)])
    return palette[np.minimum(mask, len(palette) - 1)]


def overlay(
    image: np.ndarray, mask: np.ndarray, alpha: float, class_info: classes.Classes = classes.CAMVID
) -> np.ndarray:
    """The photo with the mask's colours blended in at `alpha`."""
    # Integer arithmetic (weights in 1/256) keeps a 24-megapixel image at a few bytes a pixel.
    a = int(round(alpha * 256))
    blended = (256 - a) * image.astype(np.uint16) + a * colorize(mask, class_info).astype(np.uint16) + 128
    return (blended >> 8).astype(np.uint8)


def legend(class_info: classes.Classes = classes.CAMVID) -> Image.Image:
    """A swatch and name per class."""
    row = 22
    width = 70 + 7 * max(len(name) for name in class_info.names)
    image = Image.new("RGB", (max(190, width), row * class_info.num_classes + 8), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, color) in enumerate(zip(class_info.names, class_info.colors, strict=True)):
        y = 4 + i * row
        draw.rectangle([6, y, 36, y + row - 6], fill=tuple(color), outline="black")
        draw.text((46, y + 2), f"{i:2d} {name}", fill="black")
    return image


class Segmenter:
    """A model and its variables, with a jit-compiled image -> class-mask function."""

    def __init__(
        self, checkpoint: str, layer: str = "auto", scales: tuple[float, ...] = (1.0,), flip: bool = False
    ):
        """Loads the weights and builds the model they were trained as (`checkpointing.load_model`), with
        `layer`'s forms ('auto': the CPU layer on a CPU); `scales` and `flip` choose test-time augmentation
        (`steps.predict_scores`)."""
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales {tuple(scales)} must be one or more positive factors")
        model, self.variables, meta = checkpointing.load_model(checkpoint, layer)
        self.num_classes = model.num_classes
        self.classes = classes.from_meta(meta)
        scores = functools.partial(steps.predict_scores, model, scales=tuple(scales), flip=flip)
        self._classes = jax.jit(
            lambda variables, batch: jnp.argmax(scores(variables, batch), -1).astype(jnp.uint8)
        )

    def __call__(self, image: np.ndarray, max_side: int) -> np.ndarray:
        """Class-index mask [H, W] uint8 of an RGB image, at the image's size."""
        height, width = image.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        small = image
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        mask = np.asarray(self._classes(self.variables, small[None]))[0]
        if scale < 1.0:
            mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
        return mask


def output_stems(paths: list[str]) -> list[str]:
    """Output name stems, one per input, never two alike: the file name without its extension, with the
    extension kept where that would collide (`a.png`, `a.jpg` -> `a_png`, `a_jpg`), then numbered."""
    bare = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    stems = [
        b if bare.count(b) == 1 else os.path.basename(p).replace(".", "_")
        for b, p in zip(bare, paths, strict=True)
    ]
    seen: dict[str, int] = {}
    unique = []
    for stem in stems:
        if stems.count(stem) > 1:  # the same file name in two folders
            seen[stem] = seen.get(stem, 0) + 1
            stem = f"{stem}_{seen[stem]}"
        unique.append(stem)
    return unique


def predict_files(
    paths: list[str], output: str, segmenter: Segmenter, max_side: int, alpha: float
) -> list[str]:
    """Segments each file into `output`; returns the files that were skipped, with why."""
    os.makedirs(output, exist_ok=True)
    legend(segmenter.classes).save(os.path.join(output, "legend.png"))
    skipped = []
    for path, name in zip(paths, output_stems(paths), strict=True):
        try:
            image = load_rgb(path)
        except Image.DecompressionBombError as e:
            skipped.append(f"{path}: too large to decode safely ({e})")
            print(f"skipped {skipped[-1]}", file=sys.stderr)
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
            skipped.append(f"{path}: not a readable image ({e})")
            print(f"skipped {skipped[-1]}", file=sys.stderr)
            continue
        mask = segmenter(image, max_side)
        stem = os.path.join(output, name)
        Image.fromarray(mask).save(f"{stem}_mask.png")
        Image.fromarray(colorize(mask, segmenter.classes)).save(f"{stem}_color.png")
        Image.fromarray(overlay(image, mask, alpha, segmenter.classes)).save(f"{stem}_overlay.png")
        print(f"{path} -> {stem}_{{mask,color,overlay}}.png")
    return skipped


def main(argv):
    """Runs prediction over the inputs."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    try:
        paths = list_inputs(FLAGS.input)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None
    if not os.path.exists(FLAGS.checkpoint):
        raise app.UsageError(f"--checkpoint={FLAGS.checkpoint} does not exist")
    try:
        scales = tuple(float(s) for s in FLAGS.scales)
    except ValueError:
        given = ",".join(FLAGS.scales)
        raise app.UsageError(f"--scales={given}: expected numbers, e.g. 0.75,1,1.25") from None
    try:
        segmenter = Segmenter(FLAGS.checkpoint, scales=scales, flip=FLAGS.flip)
    except ValueError as e:  # bad --scales; not a weights file, one without model settings, bad classes
        sys.exit(f"error: {e}")
    skipped = predict_files(paths, FLAGS.output, segmenter, FLAGS.max_side, FLAGS.alpha)
    print(f"{len(paths) - len(skipped)} image(s) segmented into {FLAGS.output}, {len(skipped)} skipped")
    if len(skipped) == len(paths):
        sys.exit(1)


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so the module stays importable)."""
    flags.DEFINE_string("input", None, "An image file, a folder of images, or a glob pattern.")
    flags.DEFINE_string("output", None, "Folder for the masks, colour masks and overlays.")
    flags.DEFINE_string(
        "checkpoint", checkpointing.DEFAULT_WEIGHTS, "Weights file, workdir or checkpoint step folder."
    )
    flags.DEFINE_integer(
        "max_side", 2048, "Images with a longer side are segmented at this size, then upsampled."
    )
    flags.DEFINE_float("alpha", 0.5, "Opacity of the colours in the overlay.")
    flags.DEFINE_list(
        "scales",
        ["1.0"],
        "Test-time augmentation: resize factors whose class probabilities are averaged, e.g. "
        "0.75,1,1.25,1.5,1.75 (one forward pass each).",
    )
    flags.DEFINE_bool("flip", False, "Test-time augmentation: also average each scale's mirrored image.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
