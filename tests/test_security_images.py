"""Security: a client's image bytes are opened as PNG, JPEG, WebP, GIF or BMP and nothing else,
on every route that takes an image: an EPS (which Pillow would hand to Ghostscript), a PSD and
an SVG are a 422 naming the field, and Pillow is never asked to read them as what they are."""

from __future__ import annotations

import base64
import io
import re
import struct

import httpx
import pytest
from PIL import Image

from backends.sdxl_backend.errors import InvalidImage
from backends.sdxl_backend.generation.images import UNREAD, decode_image
from backends.sdxl_backend.limits import Limits


def eps() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(buffer, "EPS")
    return buffer.getvalue()


def psd() -> bytes:
    """A 64x64 RGB Photoshop file, uncompressed: header, three empty sections, the pixels."""
    header = b"8BPS" + struct.pack(">H", 1) + bytes(6) + struct.pack(">HIIHH", 3, 64, 64, 8, 3)
    return header + bytes(12) + struct.pack(">H", 0) + b"\x80" * (64 * 64 * 3)


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
FILES = {"eps": eps(), "psd": psd(), "svg": SVG}


def test_pillow_itself_would_read_them_and_the_server_does_not():
    assert Image.open(io.BytesIO(FILES["eps"])).format == "EPS"  # (what the guard keeps away)
    assert Image.open(io.BytesIO(FILES["psd"])).format == "PSD"
    for data in FILES.values():
        with pytest.raises(InvalidImage, match=re.escape(UNREAD)):
            decode_image(data, Limits(), "image")


@pytest.mark.parametrize("kind", sorted(FILES))
def test_every_route_that_takes_an_image_refuses_them_by_name(server, kind):
    data = FILES[kind]
    encoded = base64.b64encode(data).decode()
    for route, body, param in (
        ("/v1/img2img", {"prompt": "x", "image": encoded}, "image"),
        ("/v1/generate", {"prompt": "x", "image": encoded}, "image"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [encoded], "denoising_strength": 0.5}, "image"),
        ("/sdapi/v1/png-info", {"image": encoded}, "image"),
        ("/sdapi/v1/extra-single-image", {"image": encoded, "upscaler_1": "Lanczos"}, "image"),
        ("/v1/upscale", {"image": encoded, "upscaler": "lanczos"}, "image"),
    ):
        answer = httpx.post(f"{server.url}{route}", json=body, timeout=300)
        assert answer.status_code in (400, 422), (route, answer.status_code, answer.text)
        assert answer.json()["error"]["param"] in (param, "init_images", "init_images.0"), (route, answer.text)
        assert "PNG, JPEG" in answer.json()["error"]["message"], (route, answer.text)
    edit = httpx.post(
        f"{server.url}/v1/images/edits",
        data={"prompt": "x"},
        files={"image": ("a.png", data, "image/png")},
        timeout=300,
    )
    assert edit.status_code == 422 and edit.json()["error"]["param"] == "image", edit.text
