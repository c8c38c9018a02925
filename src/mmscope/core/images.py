"""Safe image loading, the one path every image takes: every mode converted to RGB correctly,
EXIF orientation applied (as phones write it), images over 50 megapixels refused before they
are decoded unless allowed, and bad files refused with a typed error."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from mmscope.core.errors import ImageError, ImageTooLargeError

MAX_PIXELS = 50_000_000
_ORIENTATION = 0x0112  # the EXIF tag of how the camera was held
ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode != "F" and arr.max() > 255:
            arr = arr / hi * 255.0
        elif img.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (a no-op without one)."""
    if img.getexif().get(_ORIENTATION, 1) in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _check_size(img: Image.Image, allow_large: bool, where: str) -> None:
    pixels = img.width * img.height
    if pixels > MAX_PIXELS and not allow_large:
        raise ImageTooLargeError(
            f"{where} has {pixels / 1e6:.1f} megapixels, over the {MAX_PIXELS / 1e6:.0f} MP limit; "
            "pass allow_large=True (CLI: --allow-large) if you trust it"
        )


def load_image(source: ImageLike, *, allow_large: bool = False) -> Image.Image:
    """Load one image as RGB from a path, bytes, a PIL image or an HxW(x3/4) uint8 array.

    The 50-megapixel guard applies to whatever is still to be decoded (files, bytes, and PIL
    images opened but not loaded); an image already in memory is past it.

    Raises:
        ImageError: the file is missing, corrupt, truncated or not an image.
        ImageTooLargeError: over 50 megapixels and ``allow_large`` is false.
    """
    if isinstance(source, Image.Image):
        if isinstance(source, ImageFile.ImageFile) and source.tile:  # not decoded yet
            _check_size(source, allow_large, "the image")
        try:
            return _to_rgb(_upright(source))
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"the image is corrupt or truncated: {err}") from None
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            video = " (a video's frames? pass them as images)" if source.ndim == 4 else ""
            raise ImageError(
                f"an image array must be HxW or HxWx(1|3|4), got {source.shape}{video}"
            )
        arr = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        if arr.dtype != np.uint8:
            raise ImageError(f"an image array must be uint8, got {arr.dtype}")
        return load_image(Image.fromarray(arr), allow_large=allow_large)
    where = "the image bytes" if isinstance(source, bytes) else f"image {os.fspath(source)!s}"
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise ImageError(f"{where} does not exist or is not a file")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                _check_size(img, allow_large, where)
                img.load()
                return _to_rgb(_upright(img))
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{where} is too large to decode safely: {err}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{where} is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{where} is corrupt or truncated: {err}") from None


def probe_image(source: str | os.PathLike, *, allow_large: bool = False) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header, without decoding its pixels:
    refuses what ``load_image`` would refuse before decoding (missing, not an image, over 50
    megapixels unless allowed), so data files are checked before any work."""
    where = f"image {os.fspath(source)!s}"
    if not Path(source).is_file():
        raise ImageError(f"{where} does not exist or is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                _check_size(img, allow_large, where)
                return img.size
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{where} is too large to decode safely: {err}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{where} is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{where} is corrupt or truncated: {err}") from None


def load_images(
    sources: ImageLike | Sequence[ImageLike], *, allow_large: bool = False
) -> list[Image.Image]:
    """Load one or several images (see :func:`load_image`)."""
    if isinstance(sources, (str, os.PathLike, bytes, Image.Image, np.ndarray)):
        return [load_image(sources, allow_large=allow_large)]
    return [load_image(s, allow_large=allow_large) for s in sources]
