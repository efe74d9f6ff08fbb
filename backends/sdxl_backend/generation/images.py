"""Image bytes in and out: safe decoding of input images, encoding of results."""

from __future__ import annotations

import io
import warnings

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from backends.sdxl_backend.errors import InvalidImage, PayloadTooLarge
from backends.sdxl_backend.limits import Limits

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# What a client's bytes are opened as, and nothing else: Pillow knows dozens of formats, and
# some hand the bytes on (EPS to Ghostscript) or bring decoders no client needs (PSD, ICNS...).
CLIENT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
UNREAD = "not an image this server reads (PNG, JPEG, WebP, GIF or BMP)"


def open_client_image(data: bytes) -> Image.Image:
    """A client's image, lazily (its header read, no pixel yet), as one of `CLIENT_FORMATS`."""
    return Image.open(io.BytesIO(data), formats=CLIENT_FORMATS)


def decode_image(data: bytes, limits: Limits, param: str = "image", mode: str = "RGB") -> Image.Image:
    """Decode an uploaded image to `mode`, refusing oversized payloads and decompression bombs.

    The pixel count is read from the header before any pixel is decoded, so a small file
    that claims 100 megapixels costs nothing.
    """
    if len(data) > limits.max_input_image_bytes:
        raise PayloadTooLarge(
            f"{param}: {len(data)} bytes is over the limit of {limits.max_input_image_bytes} bytes", param
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = open_client_image(data)
            pixels = image.width * image.height
            if pixels > limits.max_input_image_pixels:
                raise PayloadTooLarge(
                    f"{param}: {image.width}x{image.height} pixels is over the limit of "
                    f"{limits.max_input_image_pixels} pixels",
                    param,
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard, which fires in Image.open for the most extreme headers.
        raise PayloadTooLarge(f"{param}: too many pixels ({exc})", param) from exc
    except UnidentifiedImageError:  # (its message would show a Python object and its address)
        raise InvalidImage(f"{param}: {UNREAD}", param) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"{param}: cannot decode the image ({exc})", param) from exc
    return image.convert(mode)


def encode_image(image: Image.Image, fmt: str, quality: int, parameters: str) -> bytes:
    """PNG carries `parameters` in a text chunk under AUTOMATIC1111's key, which image tools
    read back; JPEG and WebP are written at `quality` without metadata."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        image.save(buffer, format=fmt.upper(), quality=quality)
    return buffer.getvalue()
