"""Opening untrusted image files: by content, in common raster formats only, refused above PIL's pixel limit
before anything is decoded (docs/security.md). Used by the CamVid data module and by predict."""

import functools
import os

from PIL import Image

# The only formats images are decoded as (identified by content, whatever the extension says). Leaves out
# the rarely used and the risky, e.g. EPS, which PIL renders by running Ghostscript.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


@functools.cache
def _image_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this PIL can open (WEBP needs libwebp); JPEG also opens multi-picture JPEGs."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image by its content (one of IMAGE_FORMATS), refusing it if it has too many pixels.

    Only the header is read. PIL raises DecompressionBombError above twice `Image.MAX_IMAGE_PIXELS` and
    only warns between once and twice; this refuses everything above once, before any pixel is decoded.

    Raises:
      PIL.UnidentifiedImageError: not an image of IMAGE_FORMATS.
      PIL.Image.DecompressionBombError: more than `Image.MAX_IMAGE_PIXELS` pixels.
      OSError: unreadable file.
    """
    im = Image.open(path, formats=_image_formats())
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        im.close()
        raise Image.DecompressionBombError(
            f"Image size ({im.width}x{im.height} = {im.width * im.height} pixels) exceeds limit of {limit} "
            "pixels, could be decompression bomb DOS attack."
        )
    return im
